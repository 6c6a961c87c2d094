//! `gridcast broadcast`: the source. Reads a live byte stream (stdin, a file, TCP, UDP, an
//! Icecast source endpoint), cuts it into chunks, signs and encodes them and serves them.

use std::fs::File;
use std::io::{self, Read};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use super::icecast::{self, SourceEndpoint};
use super::link::ChannelLink;
use super::ops::admin::TitleRoute;
use super::ops::{AdminListen, NodeRole, Ops, SourceCounters};
use crate::driver::{IoBackend, Node};
use crate::keys::{ChannelId, ChannelKey};
use crate::node::{ChannelMode, EngineConfig};
use crate::stream::{
    Chunk, ChunkPublisher, Chunker, ChunkerConfig, CodingError, CodingParams, InputFormat,
};
use crate::wire::{Role, SignedStreamHeader, StreamTitle};

use super::roles::{link_addr, node_key, say, serve};

/// Where a broadcast's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Standard input.
    Stdin,
    /// A file, paced at `rate_bps` or read as fast as the grid takes it (`None`).
    File {
        /// The file.
        path: PathBuf,
        /// Pace (bits per second).
        rate_bps: Option<u64>,
    },
    /// A TCP listener: one sender at a time (ffmpeg `-f mpegts tcp://host:port`).
    Tcp(SocketAddr),
    /// UDP datagrams, unicast or multicast (the broadcast industry's MPEG-TS hand-off).
    Udp(SocketAddr),
    /// An Icecast-compatible source endpoint: encoders `PUT` (or `SOURCE`) to this address and
    /// mount point with the source password.
    Icecast {
        /// Listening address.
        addr: SocketAddr,
        /// Mount point, starting with `/`.
        mount: String,
    },
}

impl std::str::FromStr for Input {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let addr = |rest: &str| {
            rest.parse::<SocketAddr>()
                .map_err(|e| format!("input {s:?}: bad address {rest:?}: {e}"))
        };
        if s == "-" {
            Ok(Self::Stdin)
        } else if let Some(rest) = s.strip_prefix("tcp://") {
            Ok(Self::Tcp(addr(rest)?))
        } else if let Some(rest) = s.strip_prefix("udp://") {
            Ok(Self::Udp(addr(rest)?))
        } else if let Some(rest) = s.strip_prefix("icecast://") {
            let (host, mount) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            if host.contains('@') {
                return Err(format!(
                    "input {s:?}: give the password with --source-password, not in the URL"
                ));
            }
            Ok(Self::Icecast {
                addr: addr(host)?,
                mount: if mount.is_empty() { "/" } else { mount }.to_owned(),
            })
        } else if s.contains("://") {
            Err(format!(
                "input {s:?}: use -, a file path, tcp://host:port, udp://host:port or \
                 icecast://host:port/mount"
            ))
        } else {
            Ok(Self::File {
                path: s.into(),
                rate_bps: None,
            })
        }
    }
}

/// `gridcast broadcast` settings.
#[derive(Debug, Clone)]
pub struct BroadcastConfig {
    /// The admin listener (`None`: the command's default).
    pub admin: Option<super::ops::AdminListen>,
    /// The channel key file.
    pub key: PathBuf,
    /// The input.
    pub input: Input,
    /// UDP address the source serves supernodes on.
    pub listen: SocketAddr,
    /// Seconds to keep serving after the input ends (or a signal ends the broadcast), so
    /// subscribers fetch the last chunks.
    pub linger: Duration,
    /// How much stream each chunk carries (the chunker's duration); `None`:
    /// [`AUDIO_CHUNK`] for audio alone, the chunker's default (250 ms) for anything else.
    pub chunk: Option<Duration>,
    /// The password encoders give to an `icecast://` input, and title updates (on that
    /// input's port, or on the admin listener's `/admin/metadata` for any input).
    pub source_password: Option<String>,
    /// A node key file (the source's node id, and so its link, survive restarts); a fresh
    /// key if `None`.
    pub node_key: Option<PathBuf>,
    /// The first tier's size (see [`crate::node::EngineConfig::max_children`]).
    pub max_children: usize,
    /// The address announced to supernodes (`None`: the link's).
    pub advertise: Vec<SocketAddr>,
    /// Data plane.
    pub backend: IoBackend,
}

/// A source's publishing half: signs and encodes every chunk the chunker has closed and hands
/// it to worker 0 of the node, and signs and hands over every stream header it captured.
pub(crate) struct Publishing<'a> {
    node: &'a Node,
    channel: ChannelId,
    publisher: ChunkPublisher,
    /// Chunk timestamps count from here.
    start: Instant,
    /// Serial of the last stream header published.
    header_serial: u32,
    /// Serial of the last title published.
    title_serial: u32,
    /// The input's format has been logged.
    format_told: bool,
}

impl<'a> Publishing<'a> {
    pub(crate) fn new(node: &'a Node, key: ChannelKey, start: Instant) -> Self {
        Self {
            node,
            channel: key.channel_id(),
            publisher: ChunkPublisher::new(key, CodingParams::DEFAULT),
            start,
            header_serial: 0,
            title_serial: 0,
            format_told: false,
        }
    }

    /// Signs `text` as what plays from chunk `from_seq` on and hands it to worker 0, which
    /// tells every subscriber.
    #[allow(clippy::disallowed_methods)] // title serials follow the wall clock
    pub(crate) fn set_title(&mut self, text: &str, from_seq: u64) {
        let channel = self.channel;
        // As header serials: a restarted source's titles are newer than what relays hold.
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32);
        self.title_serial = now_s.max(self.title_serial + 1);
        let title = StreamTitle::sign(self.publisher.key(), self.title_serial, from_seq, text);
        let _ = self.node.command(
            0,
            Box::new(move |e, now| {
                if let Err(err) = e.set_title(now, title) {
                    tracing::warn!(%err, %channel, "title");
                }
            }),
        );
    }

    /// Publishes every closed chunk and then every captured stream header (so the header's
    /// own chunk, which fixes the coding parameters, goes first); `each` sees each chunk first.
    #[allow(clippy::disallowed_methods)] // header serials follow the wall clock
    pub(crate) fn drain(
        &mut self,
        chunker: &mut Chunker,
        mut each: impl FnMut(&Chunk),
    ) -> Result<(), CodingError> {
        let channel = self.channel;
        if !self.format_told
            && let Some(format) = chunker.format()
        {
            self.format_told = true;
            let cut = match format {
                InputFormat::MpegTs => "on packets, a chunk at each keyframe",
                InputFormat::Ogg => "on pages, the stream header replayed to late joiners",
                InputFormat::Mp4 => "a chunk per fragment, the init segment replayed",
                InputFormat::MpegAudio | InputFormat::Adts => "where frames start",
                _ => "anywhere (no format recognised)",
            };
            tracing::info!(
                ?format,
                chunk = ?chunker.duration(),
                "input recognised: chunks are cut {cut}"
            );
        }
        while let Some(chunk) = chunker.poll_chunk() {
            let ts = (chunk.started - self.start).as_micros() as u64;
            let coded = self
                .publisher
                .publish(chunk.seq, ts, chunk.flags, &chunk.payload)?;
            each(&chunk);
            // A stopped node ignores commands; the caller notices it stopped elsewhere.
            let _ = self.node.command(
                0,
                Box::new(move |e, now| {
                    if let Err(err) = e.publish(now, channel, &coded) {
                        tracing::warn!(%err, "publish");
                    }
                }),
            );
        }
        while let Some(data) = chunker.poll_stream_header() {
            // Serials follow the wall clock, so a restarted source's header is newer than
            // whatever relays still hold from before.
            let now_s = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as u32);
            self.header_serial = now_s.max(self.header_serial + 1);
            tracing::info!(
                bytes = data.len(),
                serial = self.header_serial,
                "stream header captured"
            );
            let header = SignedStreamHeader::sign(self.publisher.key(), self.header_serial, data);
            let _ = self.node.command(
                0,
                Box::new(move |e, now| {
                    if let Err(err) = e.set_stream_header(now, channel, header) {
                        tracing::warn!(%err, "stream header");
                    }
                }),
            );
        }
        Ok(())
    }
}

/// Byte blocks of a source's input, in order; the channel closes when the input ends.
type InputBytes = Receiver<io::Result<Vec<u8>>>;

/// Starts a reader thread for `input`; byte blocks arrive on the first channel returned,
/// and song titles (an Icecast input's) on the second.
fn read_input(
    input: &Input,
    source_password: Option<&str>,
    title_tx: SyncSender<String>,
) -> anyhow::Result<InputBytes> {
    let (tx, rx) = mpsc::sync_channel(64);
    match input.clone() {
        Input::Icecast { addr, mount } => {
            let password = source_password
                .filter(|p| !p.is_empty())
                .context(
                    "an icecast:// input needs --source-password (or GRIDCAST_SOURCE_PASSWORD)",
                )?
                .to_owned();
            let listener = crate::app::accept::listen(addr)
                .with_context(|| format!("cannot listen for icecast sources on {addr}"))?;
            let endpoint = SourceEndpoint { mount, password };
            let server = crate::app::http::HttpServer::start()?;
            icecast::serve(&server, listener, endpoint, tx, title_tx)
                .with_context(|| format!("cannot serve icecast sources on {addr}"))?;
            // It serves encoders as long as the source runs.
            server.keep_for_process();
        }
        Input::Stdin => spawn_reader(tx, io::stdin(), None),
        Input::File { path, rate_bps } => {
            let file =
                File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            spawn_reader(tx, file, rate_bps);
        }
        Input::Tcp(addr) => {
            let listener = crate::app::accept::listen(addr)
                .with_context(|| format!("cannot listen on tcp {addr}"))?;
            thread::spawn(move || {
                // One sender at a time; the stream goes on when the next one connects.
                for conn in listener.incoming() {
                    let mut conn = match conn {
                        Ok(conn) => conn,
                        Err(err) => {
                            // Out of descriptors, say: wait for some to close, not spin.
                            tracing::warn!(%err, "tcp input: accept failed");
                            thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    };
                    if !pump(&tx, &mut conn, None) {
                        return;
                    }
                }
            });
        }
        Input::Udp(addr) => {
            let socket = bind_udp_input(addr)?;
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    match socket.recv(&mut buf) {
                        Ok(n) => {
                            if tx.send(Ok(buf[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
            });
        }
    }
    Ok(rx)
}

fn bind_udp_input(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let ip = addr.ip();
    if ip.is_multicast() {
        let any: SocketAddr = match ip {
            std::net::IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, addr.port()).into(),
            std::net::IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, addr.port()).into(),
        };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(any),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        socket.set_reuse_address(true)?;
        socket.bind(&any.into())?;
        match ip {
            std::net::IpAddr::V4(group) => {
                socket.join_multicast_v4(&group, &std::net::Ipv4Addr::UNSPECIFIED)?;
            }
            std::net::IpAddr::V6(group) => socket.join_multicast_v6(&group, 0)?,
        }
        Ok(socket.into())
    } else {
        UdpSocket::bind(addr).with_context(|| format!("cannot listen on udp {addr}"))
    }
}

fn spawn_reader<R: Read + Send + 'static>(
    tx: SyncSender<io::Result<Vec<u8>>>,
    mut reader: R,
    rate_bps: Option<u64>,
) {
    thread::spawn(move || {
        pump(&tx, &mut reader, rate_bps);
    });
}

/// Copies `reader` into `tx` until it ends; false once nobody listens any more.
#[allow(clippy::disallowed_methods)] // pacing reads the clock
fn pump(
    tx: &SyncSender<io::Result<Vec<u8>>>,
    reader: &mut impl Read,
    rate_bps: Option<u64>,
) -> bool {
    let start = Instant::now();
    let mut sent = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let want = match rate_bps {
            // Pace in 20 ms slices.
            Some(bps) => ((bps / 8 / 50) as usize).clamp(188, buf.len()),
            None => buf.len(),
        };
        match reader.read(&mut buf[..want]) {
            Ok(0) => return true,
            Ok(n) => {
                if tx.send(Ok(buf[..n].to_vec())).is_err() {
                    return false;
                }
                sent += n as u64;
                if let Some(bps) = rate_bps {
                    let due = Duration::from_secs_f64(sent as f64 * 8.0 / bps as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        thread::sleep(wait);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.send(Err(e));
                return true;
            }
        }
    }
}

/// An input silent this long no longer counts as connected.
const INPUT_QUIET: Duration = Duration::from_secs(2);

/// A broadcast's chunk duration for audio alone (MP3, AAC, Ogg with no video) unless
/// `--chunk-ms` sets one: at radio rates a relay pays per packet and acknowledgement, and
/// 1-s chunks halve its CPU per listener of 250-ms ones at 128 kbit/s (docs/icecast.md),
/// for listeners about 1.5 s further behind live (a player starts two whole chunks back,
/// where 250-ms ones let it start 1.5 s back).
pub const AUDIO_CHUNK: Duration = Duration::from_secs(1);

/// Runs a source until its input ends or a signal arrives; either way the last chunk says the
/// broadcast ended, and it is served for the linger.
#[allow(clippy::disallowed_methods)] // the source reads the clock
pub fn broadcast(config: &BroadcastConfig, stop: &AtomicBool) -> anyhow::Result<()> {
    let channel_key = ChannelKey::load(&config.key)?;
    let channel = channel_key.channel_id();
    let node_key = node_key(config.node_key.as_deref())?;
    let (node, _events) = serve(
        config.backend,
        config.listen,
        1,
        &node_key,
        &EngineConfig {
            role: Role::Source,
            serve: true,
            max_children: Some(config.max_children),
            ..Default::default()
        },
    )?;
    super::roles::announce(&node, &config.advertise);
    node.command(
        0,
        Box::new(move |e, _| e.add_channel(channel, ChannelMode::Source)),
    );
    let counters = Arc::new(SourceCounters::default());
    // Titles come from the Icecast input's encoders and from the admin listener's route, for
    // inputs with no port of their own.
    let (title_tx, titles) = mpsc::sync_channel(16);
    let source_password = config.source_password.clone().filter(|p| !p.is_empty());
    let _ops = Ops::start(
        &node,
        NodeRole::Source,
        config.admin.unwrap_or(AdminListen::Off),
        false,
        Some(Arc::clone(&counters)),
        Some(TitleRoute {
            password: source_password.clone(),
            titles: title_tx.clone(),
        }),
    )?;

    // Sequence numbers start at the wall clock in milliseconds, so a restarted source never
    // reuses a number that caches still hold.
    let first_seq = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64);
    let mut chunker = Chunker::new(ChunkerConfig {
        first_seq,
        duration: config.chunk.unwrap_or(ChunkerConfig::default().duration),
        audio_duration: Some(config.chunk.unwrap_or(AUDIO_CHUNK)),
        ..Default::default()
    })?;
    let input = read_input(&config.input, source_password.as_deref(), title_tx)?;
    // The link is printed once every listener is bound (node, admin, input), so whoever
    // waits for it can connect an encoder, a relay or a scraper at once.
    let link = ChannelLink::single(channel, link_addr(&node), node_key.node_id());
    say(&link);
    tracing::info!(%link, backend = %node.backend(), "broadcasting");
    let mut publishing = Publishing::new(&node, channel_key, Instant::now());
    let published = Arc::clone(&counters);
    let mut publish = |chunker: &mut Chunker| {
        // A title goes with the chunk being cut when it came.
        while let Ok(title) = titles.try_recv() {
            publishing.set_title(&title, chunker.next_seq());
        }
        publishing.drain(chunker, |_| {
            published.chunks_published.fetch_add(1, Ordering::Relaxed);
        })
    };
    let mut ended = None;
    // The input counts as connected while bytes arrive (an encoder may connect late, or
    // stall).
    let mut last_input: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        counters.encoder_connected.store(
            last_input.is_some_and(|t| now.duration_since(t) < INPUT_QUIET),
            Ordering::Relaxed,
        );
        let wait = chunker
            .poll_timeout()
            .map_or(Duration::from_millis(100), |t| {
                t.saturating_duration_since(now)
            })
            .min(Duration::from_millis(100));
        match input.recv_timeout(wait) {
            Ok(Ok(bytes)) => {
                last_input = Some(Instant::now());
                counters
                    .ingest_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                chunker.handle_input(Instant::now(), &bytes);
            }
            Ok(Err(e)) => return Err(e).context("reading the input"),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                chunker.finish(Instant::now());
                publish(&mut chunker)?;
                ended = Some(Instant::now());
                counters.encoder_connected.store(false, Ordering::Relaxed);
                break;
            }
        }
        chunker.handle_timeout(Instant::now());
        publish(&mut chunker)?;
    }
    if ended.is_none() {
        // Stopped by a signal while the input still flowed (a broadcaster's Ctrl-C, a service
        // stop): the broadcast ends here, and its last chunk says so, so that players writing
        // to a file or a pipe finish too instead of waiting on a source that is gone. It is
        // served for the linger like an input's end; a second signal stops at once.
        chunker.finish(Instant::now());
        publish(&mut chunker)?;
        ended = Some(Instant::now());
        stop.store(false, Ordering::Relaxed);
        tracing::info!(
            linger = ?config.linger,
            "stopping: the broadcast ends with the last chunk, served for the linger (signal again to stop now)"
        );
    } else {
        tracing::info!(linger = ?config.linger, "input ended; serving the last chunks");
    }
    if let Some(at) = ended {
        while at.elapsed() < config.linger && !stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(50));
        }
    }
    node.stop()?;
    Ok(())
}
