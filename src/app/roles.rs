//! `gridcast broadcast`, `relay` and `play`: one node each, run until the input ends or a
//! signal arrives.
//!
//! Each role owns one [`Node`] and talks to its engine through commands; the calling thread
//! reads input (broadcast) or writes output (play), and polls a stop flag that SIGINT and
//! SIGTERM set.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;

use super::icecast::{self, SourceEndpoint};
use super::link::ChannelLink;
use super::output::{Gate, HttpOutput};
use crate::driver::{IoBackend, Node, StartError};
use crate::keys::{ChannelId, ChannelKey, NodeKey};
use crate::node::{
    Candidate, ChannelMode, Engine, EngineConfig, NodeEvent, OpenChannels, UpstreamConfig,
};
use crate::stream::{
    Chunk, ChunkFlags, ChunkPublisher, Chunker, ChunkerConfig, CodingError, CodingParams,
};
use crate::wire::{RefuseReason, Role, SignedStreamHeader};

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
    /// The channel key file.
    pub key: PathBuf,
    /// The input.
    pub input: Input,
    /// UDP address the source serves supernodes on.
    pub listen: SocketAddr,
    /// Seconds to keep serving after the input ends, so subscribers fetch the last chunks.
    pub linger: Duration,
    /// The password encoders give to an `icecast://` input.
    pub source_password: Option<String>,
    /// A node key file (the source's node id, and so its link, survive restarts); a fresh
    /// key if `None`.
    pub node_key: Option<PathBuf>,
    /// The first tier's size (see [`crate::node::EngineConfig::max_children`]).
    pub max_children: usize,
    /// The address announced to supernodes (`None`: the link's).
    pub advertise: Option<SocketAddr>,
    /// Data plane.
    pub backend: IoBackend,
}

/// `gridcast relay` settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// UDP address to serve on.
    pub listen: SocketAddr,
    /// Channels to carry; every node a channel's links name is a candidate upstream.
    pub join: Vec<ChannelLink>,
    /// io_uring workers (one per core by default).
    pub workers: usize,
    /// A node key file (the node id stays the same across restarts); a fresh key if `None`.
    pub node_key: Option<PathBuf>,
    /// The address announced to the other supernodes (`None`: the link's).
    pub advertise: Option<SocketAddr>,
    /// Most bits per second sent to subscribers (`None`: no limit).
    pub max_upload_bps: Option<u64>,
    /// Most connections at once (`None`: no limit).
    pub max_connections: Option<usize>,
    /// Most subscriptions at once (`None`: no limit).
    pub max_subscribers: Option<usize>,
    /// How long a drain may take before the relay exits.
    pub drain_timeout: Duration,
    /// Announce the relay on the local network (mDNS).
    pub mdns: bool,
    /// Carry any channel asked for (`--open`).
    pub open: Option<OpenRelay>,
    /// Data plane.
    pub backend: IoBackend,
}

/// An open relay's settings.
#[derive(Debug, Clone)]
pub struct OpenRelay {
    /// Nodes to ask for a channel's upstream.
    pub bootstrap: Vec<super::link::LinkNode>,
    /// Most channels at once.
    pub max_channels: usize,
    /// How long a channel nobody watches is kept.
    pub idle: Duration,
}

/// Where `play` writes the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Standard output (`| mpv -`).
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// A local HTTP server any number of players can open (`http://127.0.0.1:8080/`).
    Http(SocketAddr),
}

impl std::str::FromStr for Output {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "-" {
            Ok(Self::Stdout)
        } else if let Some(rest) = s.strip_prefix("http://") {
            let host = rest.trim_end_matches('/');
            host.parse()
                .map(Self::Http)
                .map_err(|e| format!("output {s:?}: bad address {host:?}: {e}"))
        } else if s.contains("://") {
            Err(format!(
                "output {s:?}: use -, a file path or http://127.0.0.1:port/"
            ))
        } else {
            Ok(Self::File(s.into()))
        }
    }
}

/// A rate in bits per second: a number with an optional `k`, `M` or `G` suffix (`2M`, `500k`).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, scale) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1e3),
        Some((i, 'M' | 'm')) => (&t[..i], 1e6),
        Some((i, 'G' | 'g')) => (&t[..i], 1e9),
        _ => (t, 1.0),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate in bits per second (like 2M or 500k)"))?;
    if !n.is_finite() || n < 0.0 || n * scale > 1e12 {
        return Err(format!(
            "{s:?} is not a rate between 0 and 1T bits per second"
        ));
    }
    Ok((n * scale).round() as u64)
}

/// `gridcast play` settings.
#[derive(Debug, Clone)]
pub struct PlayConfig {
    /// The channel and the nodes to start from.
    pub link: ChannelLink,
    /// Output.
    pub output: Output,
    /// Local UDP address (port 0: any).
    pub listen: SocketAddr,
    /// Data plane.
    pub backend: IoBackend,
    /// Give up if no chunk has arrived within this long (saying why).
    pub connect_timeout: Duration,
    /// Most bits per second relayed to other peers (`None`: no cap; `Some(0)`: relay nothing).
    pub upload_bps: Option<u64>,
    /// Print a one-line live status on stderr (for a terminal).
    pub status: bool,
}

/// Set by SIGINT or SIGTERM.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&flag))
            .context("installing the signal handler")?;
    }
    Ok(flag)
}

/// Starts a node whose engines all run `config`, each with its worker tag (and shard export
/// when there are siblings). Events of every engine arrive on the returned receiver.
pub(crate) fn start_node(
    backend: IoBackend,
    listen: SocketAddr,
    workers: usize,
    key: &NodeKey,
    config: &EngineConfig,
) -> Result<(Node, Receiver<NodeEvent>), StartError> {
    let (tx, rx) = mpsc::channel();
    let node = Node::start(
        backend,
        listen,
        workers,
        |tag| {
            Engine::new(
                key,
                EngineConfig {
                    worker: Some(tag),
                    export_shards: tag.count > 1,
                    ..config.clone()
                },
            )
        },
        &tx,
    )?;
    Ok((node, rx))
}

/// [`start_node`] for a command: the error names the address.
fn serve(
    backend: IoBackend,
    listen: SocketAddr,
    workers: usize,
    key: &NodeKey,
    config: &EngineConfig,
) -> anyhow::Result<(Node, Receiver<NodeEvent>)> {
    start_node(backend, listen, workers, key, config)
        .with_context(|| format!("cannot serve on {listen}"))
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
}

impl<'a> Publishing<'a> {
    pub(crate) fn new(node: &'a Node, key: ChannelKey, start: Instant) -> Self {
        Self {
            node,
            channel: key.channel_id(),
            publisher: ChunkPublisher::new(key, CodingParams::DEFAULT),
            start,
            header_serial: 0,
        }
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

/// Prints a line for whoever reads this process's output (a link, a URL). A reader that
/// took what it wanted and closed the pipe is no error: the node goes on serving.
fn say(line: &dyn std::fmt::Display) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The address to print in a link: the bound one, or loopback where it is unspecified.
fn link_addr(node: &Node) -> SocketAddr {
    let mut addr = node.local_addr();
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    addr
}

/// Starts a reader thread for `input`; byte blocks arrive on the returned channel, which
/// closes when the input ends.
fn read_input(
    input: &Input,
    source_password: Option<&str>,
) -> anyhow::Result<Receiver<io::Result<Vec<u8>>>> {
    let (tx, rx) = mpsc::sync_channel(64);
    match input.clone() {
        Input::Icecast { addr, mount } => {
            let password = source_password
                .filter(|p| !p.is_empty())
                .context(
                    "an icecast:// input needs --source-password (or GRIDCAST_SOURCE_PASSWORD)",
                )?
                .to_owned();
            let listener = TcpListener::bind(addr)
                .with_context(|| format!("cannot listen for icecast sources on {addr}"))?;
            let endpoint = SourceEndpoint { mount, password };
            thread::spawn(move || icecast::serve(&listener, endpoint, &tx));
        }
        Input::Stdin => spawn_reader(tx, io::stdin(), None),
        Input::File { path, rate_bps } => {
            let file =
                File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            spawn_reader(tx, file, rate_bps);
        }
        Input::Tcp(addr) => {
            let listener =
                TcpListener::bind(addr).with_context(|| format!("cannot listen on tcp {addr}"))?;
            thread::spawn(move || {
                // One sender at a time; the stream goes on when the next one connects.
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { continue };
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

/// Runs a source until its input ends (then lingers) or a signal arrives.
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
    let advertise = config.advertise.unwrap_or_else(|| link_addr(&node));
    node.command(
        0,
        Box::new(move |e, _| {
            e.set_advertise(advertise);
            e.add_channel(channel, ChannelMode::Source);
        }),
    );
    let link = ChannelLink::single(channel, link_addr(&node), node_key.node_id());
    say(&link);
    tracing::info!(%link, backend = %node.backend(), "broadcasting");

    // Sequence numbers start at the wall clock in milliseconds, so a restarted source never
    // reuses a number that caches still hold.
    let first_seq = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64);
    let mut chunker = Chunker::new(ChunkerConfig {
        first_seq,
        ..Default::default()
    })?;
    let input = read_input(&config.input, config.source_password.as_deref())?;
    let mut publishing = Publishing::new(&node, channel_key, Instant::now());
    let mut publish = |chunker: &mut Chunker| publishing.drain(chunker, |_| {});
    let mut ended = None;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = chunker
            .poll_timeout()
            .map_or(Duration::from_millis(100), |t| {
                t.saturating_duration_since(now)
            })
            .min(Duration::from_millis(100));
        match input.recv_timeout(wait) {
            Ok(Ok(bytes)) => chunker.handle_input(Instant::now(), &bytes),
            Ok(Err(e)) => return Err(e).context("reading the input"),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                chunker.finish(Instant::now());
                publish(&mut chunker)?;
                ended = Some(Instant::now());
                break;
            }
        }
        chunker.handle_timeout(Instant::now());
        publish(&mut chunker)?;
    }
    if let Some(at) = ended {
        tracing::info!(linger = ?config.linger, "input ended; serving the last chunks");
        while at.elapsed() < config.linger && !stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(50));
        }
    }
    node.stop()?;
    Ok(())
}

/// The node key in `path` (created there if missing), or a fresh one.
fn node_key(path: Option<&std::path::Path>) -> anyhow::Result<NodeKey> {
    Ok(match path {
        Some(path) if path.exists() => NodeKey::load(path)?,
        Some(path) => {
            let key = NodeKey::generate()?;
            key.save(path, false)?;
            key
        }
        None => NodeKey::generate()?,
    })
}

/// Every candidate upstream per channel, over all the links given for it (a channel may be
/// joined with several links), each node once and never this node itself.
fn upstreams(
    links: &[ChannelLink],
    me: crate::keys::NodeId,
) -> anyhow::Result<Vec<(ChannelId, Vec<Candidate>)>> {
    let mut out: Vec<(ChannelId, Vec<Candidate>)> = Vec::new();
    for link in links {
        let candidates = link.candidates()?;
        let entry = match out.iter_mut().position(|(c, _)| *c == link.channel) {
            Some(i) => &mut out[i].1,
            None => {
                out.push((link.channel, Vec::new()));
                &mut out.last_mut().context("just pushed")?.1
            }
        };
        for c in candidates {
            if c.node != me && !entry.iter().any(|e| e.node == c.node) {
                entry.push(c);
            }
        }
    }
    for (channel, candidates) in &out {
        if candidates.is_empty() {
            anyhow::bail!("the links for channel {channel} name no node but this one");
        }
    }
    Ok(out)
}

/// Logs what the application should hear about a node's upstreams and neighbours.
fn log_event(event: &NodeEvent) {
    match event {
        NodeEvent::Failover {
            lost,
            replacement,
            resume,
            ..
        } => tracing::info!(%lost, ?replacement, resume, "parent replaced"),
        NodeEvent::UpstreamLost {
            channel,
            ended: true,
            ..
        } => tracing::info!(%channel, "the stream ended: its source finished it"),
        NodeEvent::UpstreamLost {
            channel,
            candidates,
            connected,
            ..
        } => tracing::warn!(
            %channel,
            candidates,
            connected,
            "nothing of the channel arrives from any parent (upstreams lost, unreachable or quiet); lost ones are redialled with back-off"
        ),
        NodeEvent::UpstreamRestored { channel, after } => {
            tracing::info!(%channel, ?after, "a parent delivers the channel again");
        }
        NodeEvent::SubscriptionRefused {
            channel,
            remote,
            reason: RefuseReason::NotCarried,
        } => tracing::warn!(%channel, %remote, "refused: the node does not carry the channel"),
        // Full or draining: routine, the node named others to ask.
        NodeEvent::SubscriptionRefused {
            channel,
            remote,
            reason,
        } => tracing::debug!(%channel, %remote, "refused: the node {reason}; asking others"),
        NodeEvent::ProofFailed {
            remote,
            node,
            reason,
        } => tracing::warn!(%remote, expected = %node, %reason, "did not prove node id {node}"),
        NodeEvent::Misbehaved { remote, reason, .. } => {
            tracing::warn!(%remote, %reason, "neighbour sent bad data; disconnected")
        }
        NodeEvent::Membership {
            node,
            addr,
            up: true,
        } => {
            tracing::info!(%node, %addr, "supernode joined");
        }
        NodeEvent::Membership {
            node,
            addr,
            up: false,
        } => {
            tracing::info!(%node, %addr, "supernode left");
        }
        NodeEvent::ConnectionLost { remote, reason, .. } => {
            tracing::debug!(%remote, %reason, "connection closed");
        }
        _ => {}
    }
}

/// Runs a supernode until a signal arrives.
#[allow(clippy::disallowed_methods)] // the relay reads the clock
pub fn relay(config: &RelayConfig, stop: &AtomicBool) -> anyhow::Result<()> {
    let key = node_key(config.node_key.as_deref())?;
    if config.join.is_empty() && config.open.is_none() {
        anyhow::bail!("nothing to carry: give at least one --join <channel link>, or --open");
    }
    let upstreams = upstreams(&config.join, key.node_id())?;
    let open = match &config.open {
        Some(open) => {
            let mut bootstrap = Vec::new();
            for n in &open.bootstrap {
                bootstrap.push(n.candidate()?);
            }
            // The joined channels' nodes are nodes of the grid too.
            for (_, list) in &upstreams {
                for c in list {
                    if !bootstrap.iter().any(|b: &Candidate| b.node == c.node) {
                        bootstrap.push(*c);
                    }
                }
            }
            Some(OpenChannels {
                bootstrap,
                max_channels: open.max_channels,
                idle_after: open.idle,
            })
        }
        None => None,
    };
    let (node, events) = serve(
        config.backend,
        config.listen,
        config.workers,
        &key,
        &EngineConfig {
            role: Role::Supernode,
            serve: true,
            upstream: UpstreamConfig::relay(),
            // Limits are per node; each worker takes its share (steering spreads connections
            // evenly over the workers).
            upload_cap: config
                .max_upload_bps
                .map(|bps| (bps / 8).div_ceil(config.workers as u64)),
            max_connections: config.max_connections.map(|m| m.div_ceil(config.workers)),
            max_subscribers: config.max_subscribers.map(|m| m.div_ceil(config.workers)),
            open,
            ..Default::default()
        },
    )?;

    // Worker 0 is this node's member of the supernodes' membership; the others hand it the
    // gossip they receive.
    let advertise = config.advertise.unwrap_or_else(|| link_addr(&node));
    node.command(0, Box::new(move |e, _| e.set_advertise(advertise)));
    for w in 1..node.workers() {
        node.command(w, Box::new(|e, _| e.set_forward_gossip(true)));
    }
    let link_nodes: Vec<(ChannelId, Vec<Candidate>)> = upstreams.clone();
    for (channel, candidates) in upstreams {
        // The same nodes carry the channel too: a drain sends children there.
        for w in 0..node.workers() {
            let alternatives = candidates.clone();
            node.command(
                w,
                Box::new(move |e, _| {
                    e.add_channel(channel, ChannelMode::Relay);
                    e.set_alternatives(channel, alternatives);
                }),
            );
        }
        // One worker draws the channel from upstream, with the parent policy (from every
        // candidate, failing over, redialling with back-off); its siblings get it by import.
        let parents: Vec<String> = candidates.iter().map(|c| c.addr.to_string()).collect();
        node.command(
            0,
            Box::new(move |e, now| {
                if let Err(err) = e.set_upstream(now, channel, candidates) {
                    tracing::error!(%err, "choosing upstreams");
                }
            }),
        );
        let own = ChannelLink::single(channel, link_addr(&node), key.node_id());
        say(&own);
        tracing::info!(link = %own, upstreams = %parents.join(","), "carrying");
    }
    // Then this node, whatever it carries: `host:port/node-id`, what others' links and
    // `--bootstrap` name (after the channel links, so that the first line is still a link
    // when there is one).
    say(&format!("{}/{}", link_addr(&node), key.node_id()));
    // On the local network, players find this relay by channel id alone.
    let _lan = if config.mdns {
        let channels: Vec<ChannelId> = link_nodes.iter().map(|(c, _)| *c).collect();
        let bound = node.local_addr();
        let ip = (!bound.ip().is_unspecified()).then(|| bound.ip());
        match super::lan::LanAnnouncer::start(key.node_id(), ip, bound.port(), &channels) {
            Ok(lan) => Some(lan),
            Err(err) => {
                tracing::warn!(%err, "not announced on the local network");
                None
            }
        }
    } else {
        None
    };
    let mut last_share = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match events.recv_timeout(Duration::from_millis(50)) {
            // The worker that draws the channel got a new stream header: its siblings serve
            // subscribers too.
            Ok(NodeEvent::StreamHeader { channel, header }) => {
                for w in 1..node.workers() {
                    let header = header.clone();
                    node.command(
                        w,
                        Box::new(move |e, now| {
                            let _ = e.set_stream_header(now, channel, header);
                        }),
                    );
                }
            }
            // A worker opened a channel on demand: its siblings carry it too (by import).
            Ok(NodeEvent::ChannelOpened { channel }) => {
                tracing::info!(%channel, "carrying a channel on demand");
                for w in 0..node.workers() {
                    node.command(
                        w,
                        Box::new(move |e, _| {
                            if e.channel(&channel).is_none() {
                                e.add_channel(channel, ChannelMode::Relay);
                            }
                        }),
                    );
                }
            }
            Ok(NodeEvent::ChannelClosed { channel }) => {
                tracing::info!(%channel, "dropped a channel nobody watches");
                for w in 0..node.workers() {
                    node.command(w, Box::new(move |e, now| e.drop_channel(now, channel)));
                }
            }
            Ok(NodeEvent::Gossip { from, data }) => {
                node.command(0, Box::new(move |e, now| e.handle_gossip(now, from, &data)));
            }
            Ok(event) => log_event(&event),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if node.workers() > 1 && last_share.elapsed() >= Duration::from_secs(1) {
            last_share = Instant::now();
            share_carriers(&node, &link_nodes);
        }
    }
    drain(&node, config.drain_timeout);
    node.stop()?;
    Ok(())
}

/// Hands what worker 0 (the member) knows of each channel's carriers to the other workers
/// as alternatives, beside the nodes the links name, so that every worker's answers and
/// go-aways name the grid's supernodes.
fn share_carriers(node: &Node, link_nodes: &[(ChannelId, Vec<Candidate>)]) {
    let (tx, rx) = mpsc::channel();
    let channels: Vec<ChannelId> = link_nodes.iter().map(|(c, _)| *c).collect();
    let asked = node.command(
        0,
        Box::new(move |e, now| {
            let known: Vec<(ChannelId, Vec<Candidate>)> = channels
                .iter()
                .map(|&c| {
                    let named = e.named_parents(now, c, 32);
                    let list = named
                        .into_iter()
                        .filter_map(|p| {
                            Some(Candidate {
                                addr: *p.addrs.first()?,
                                node: p.node,
                            })
                        })
                        .collect();
                    (c, list)
                })
                .collect();
            let _ = tx.send(known);
        }),
    );
    if !asked {
        return;
    }
    let Ok(known) = rx.recv_timeout(Duration::from_secs(1)) else {
        return;
    };
    for (channel, mut list) in known {
        for (c, linked) in link_nodes {
            if *c == channel {
                for l in linked {
                    if !list.iter().any(|k| k.node == l.node) {
                        list.push(*l);
                    }
                }
            }
        }
        for w in 1..node.workers() {
            let list = list.clone();
            node.command(w, Box::new(move |e, _| e.set_alternatives(channel, list)));
        }
    }
}

/// Sends every subscriber away and waits until all have moved or `timeout` passes.
#[allow(clippy::disallowed_methods)] // the drain deadline reads the clock
fn drain(node: &Node, timeout: Duration) {
    let started = Instant::now();
    let served = |node: &Node| {
        let (tx, rx) = mpsc::channel();
        let mut asked = 0;
        for w in 0..node.workers() {
            let tx = tx.clone();
            if node.command(
                w,
                Box::new(move |e, _| {
                    let _ = tx.send(e.served_subscriptions());
                }),
            ) {
                asked += 1;
            }
        }
        (0..asked)
            // A worker that does not answer counts as still serving.
            .map(|_| rx.recv_timeout(Duration::from_secs(1)).unwrap_or(1))
            .sum::<usize>()
    };
    let before = served(node);
    tracing::info!(subscriptions = before, deadline = ?timeout, "draining");
    for w in 0..node.workers() {
        node.command(w, Box::new(|e, now| e.drain(now)));
    }
    let mut left = before;
    while left > 0 && started.elapsed() < timeout {
        thread::sleep(Duration::from_millis(100));
        left = served(node);
    }
    if left == 0 {
        tracing::info!(moved = before, took = ?started.elapsed(), "drained; stopping");
    } else {
        tracing::warn!(
            left,
            moved = before - left,
            "drain deadline passed; stopping"
        );
    }
}

/// Where a peer's chunks go.
enum Sink {
    Writer(Box<dyn Write>, Gate),
    Http(HttpOutput),
}

impl Sink {
    fn open(output: &Output) -> anyhow::Result<Self> {
        Ok(match output {
            Output::Stdout => Self::Writer(Box::new(io::stdout().lock()), Gate::new()),
            Output::File(path) => Self::Writer(
                Box::new(
                    File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                ),
                Gate::new(),
            ),
            Output::Http(addr) => {
                let http = HttpOutput::bind(*addr)
                    .with_context(|| format!("cannot serve HTTP on {addr}"))?;
                let url = format!("http://{}/", http.local_addr());
                say(&url);
                tracing::info!(%url, "players can open the stream here");
                Self::Http(http)
            }
        })
    }

    fn header(&mut self, data: Bytes) {
        match self {
            Self::Writer(_, gate) => gate.set_header(data),
            Self::Http(http) => http.set_header(data),
        }
    }

    fn chunk(&mut self, flags: ChunkFlags, payload: Bytes) -> io::Result<()> {
        match self {
            Self::Writer(out, gate) => {
                for part in gate.admit(flags, payload) {
                    out.write_all(&part)?;
                }
                out.flush()
            }
            Self::Http(http) => {
                http.chunk(flags, &payload);
                Ok(())
            }
        }
    }
}

/// What the status line shows, read from the engine.
#[derive(Debug, Default, Clone, Copy)]
struct PlayStatus {
    parents: usize,
    substreams: usize,
    needed: usize,
    buffer: Duration,
    played: u64,
    skipped: u64,
    uploaded: u64,
}

fn read_status(e: &Engine, channel: &ChannelId) -> PlayStatus {
    let (substreams, parents) = e.upstream_status(channel).unwrap_or((0, 0));
    let mut status = PlayStatus {
        parents,
        substreams,
        uploaded: e.stats().shard_bytes_out,
        ..Default::default()
    };
    if let Some(ch) = e.channel(channel) {
        status.needed = ch.params().map_or(0, |p| p.original());
        let stats = ch.stats();
        status.played = stats.chunks_played;
        status.skipped = stats.chunks_skipped;
        if let (Some(next), Some((_, newest))) = (ch.next_play(), ch.range()) {
            let ahead = newest.saturating_sub(next) + 1;
            status.buffer = Duration::from_millis(ahead * u64::from(ch.chunk_ms_estimate()));
        }
    }
    status
}

fn status_line(s: &PlayStatus, bps: f64) -> String {
    let continuity = if s.played + s.skipped == 0 {
        100.0
    } else {
        100.0 * s.played as f64 / (s.played + s.skipped) as f64
    };
    format!(
        "parents {} | substreams {}/{} | buffer {:.1}s | {:.2} Mbit/s | continuity {:.2}% | up {:.1} MB",
        s.parents,
        s.substreams,
        s.needed,
        s.buffer.as_secs_f64(),
        bps / 1e6,
        continuity,
        s.uploaded as f64 / 1e6
    )
}

/// Runs a peer until a signal arrives or the output is closed.
#[allow(clippy::disallowed_methods)] // the connect timeout and the status line read the clock
pub fn play(config: &PlayConfig, stop: &AtomicBool) -> anyhow::Result<()> {
    let channel = config.link.channel;
    let candidates = if config.link.nodes.is_empty() {
        // A bare channel id: a node on the local network that carries it (a hint until its
        // handshake proves the node id the record names).
        let wait = config.connect_timeout.min(Duration::from_secs(3));
        let found = super::lan::find(channel, wait, Duration::from_millis(300))?;
        if found.is_empty() {
            anyhow::bail!(
                "no node on the local network carries channel {channel} (mDNS, {wait:?}); \
                 give a link with a node's address"
            );
        }
        for c in &found {
            tracing::info!(addr = %c.addr, node = %c.node, "found on the local network");
        }
        found
    } else {
        config.link.candidates()?
    };
    let mut sink = Sink::open(&config.output)?;
    let key = NodeKey::generate()?;
    let engine_config = EngineConfig {
        serve: config.upload_bps != Some(0),
        upload_cap: config.upload_bps.filter(|&b| b > 0).map(|b| b.div_ceil(8)),
        ..Default::default()
    };
    let (node, events) = serve(config.backend, config.listen, 1, &key, &engine_config)?;
    node.command(
        0,
        Box::new(move |e, now| {
            e.add_channel(channel, ChannelMode::Play);
            if let Err(err) = e.set_upstream(now, channel, candidates) {
                tracing::error!(%err, "choosing parents");
            }
        }),
    );
    if engine_config.serve {
        let own = ChannelLink::single(channel, link_addr(&node), key.node_id());
        tracing::info!(link = %own, upload_bps = ?config.upload_bps, "relaying to other peers");
    }
    tracing::info!(%channel, backend = %node.backend(), "playing");
    let started = Instant::now();
    // Served once the first chunk plays; until then every refusal and failed proof is kept,
    // so that a player nobody serves can say why when it gives up.
    let mut served = false;
    let mut connected = false;
    let mut why: Vec<(SocketAddr, String)> = Vec::new();
    let (status_tx, status_rx) = mpsc::channel();
    let mut last_status = Instant::now();
    let mut bytes_since = 0u64;
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        if !served && started.elapsed() >= config.connect_timeout {
            break Err(not_served(config, connected, &why));
        }
        if config.status && last_status.elapsed() >= Duration::from_secs(1) {
            let bps = bytes_since as f64 * 8.0 / last_status.elapsed().as_secs_f64();
            last_status = Instant::now();
            bytes_since = 0;
            let tx = status_tx.clone();
            node.command(
                0,
                Box::new(move |e, _| {
                    let _ = tx.send((read_status(e, &channel), bps));
                }),
            );
        }
        while let Ok((status, bps)) = status_rx.try_recv() {
            eprint!("\r\x1b[2K{}", status_line(&status, bps));
        }
        match events.recv_timeout(Duration::from_millis(100)) {
            Ok(NodeEvent::Connected { .. }) => connected = true,
            Ok(NodeEvent::StreamHeader { header, .. }) => sink.header(header.data),
            Ok(NodeEvent::Chunk { flags, payload, .. }) => {
                served = true;
                bytes_since += payload.len() as u64;
                if let Err(e) = sink.chunk(flags, payload.to_bytes()) {
                    // A player that quits closes the pipe: that ends playback, not an error.
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        break Ok(());
                    }
                    break Err(e).context("writing the output");
                }
            }
            Ok(event) => {
                match &event {
                    NodeEvent::SubscriptionRefused { remote, reason, .. } => {
                        note(&mut why, *remote, format!("{remote} {reason}"));
                    }
                    NodeEvent::ProofFailed { remote, node, .. } => {
                        note(
                            &mut why,
                            *remote,
                            format!("{remote} did not prove node id {node}"),
                        );
                    }
                    _ => {}
                }
                log_event(&event);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break Err(anyhow::anyhow!("the node stopped")),
        }
    };
    if config.status {
        eprintln!();
    }
    node.stop()?;
    result
}

/// Keeps the newest reason per node.
fn note(why: &mut Vec<(SocketAddr, String)>, remote: SocketAddr, reason: String) {
    why.retain(|(r, _)| *r != remote);
    why.push((remote, reason));
}

/// The error of a player that nobody served within its connect timeout: which channel, and
/// what each node said (refused it, failed its proof), or that none answered at all.
fn not_served(config: &PlayConfig, connected: bool, why: &[(SocketAddr, String)]) -> anyhow::Error {
    let channel = config.link.channel;
    let waited = config.connect_timeout;
    if !why.is_empty() {
        let said: Vec<&str> = why.iter().map(|(_, w)| w.as_str()).collect();
        anyhow::anyhow!(
            "nobody serves channel {channel} (waited {waited:?}): {}",
            said.join("; ")
        )
    } else if connected {
        anyhow::anyhow!(
            "no chunk of channel {channel} arrived within {waited:?}: the nodes answered, but \
             have nothing of the channel yet (is its source running?)"
        )
    } else {
        let hosts: Vec<&str> = config.link.nodes.iter().map(|n| n.host.as_str()).collect();
        anyhow::anyhow!(
            "no node of the link answered within {waited:?} for channel {channel}: {}",
            hosts.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_suffixes() {
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(parse_rate("2M"), Ok(2_000_000));
        assert_eq!(parse_rate("1.5m"), Ok(1_500_000));
        assert_eq!(parse_rate("500k"), Ok(500_000));
        assert_eq!(parse_rate("64000"), Ok(64_000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("").is_err());
    }

    #[test]
    fn outputs_and_inputs_parse() {
        assert_eq!("-".parse(), Ok(Output::Stdout));
        assert_eq!(
            "http://127.0.0.1:8080/".parse(),
            Ok(Output::Http("127.0.0.1:8080".parse().unwrap()))
        );
        assert_eq!("show.ts".parse(), Ok(Output::File("show.ts".into())));
        assert!("http://nowhere".parse::<Output>().is_err());
        assert!("rtmp://x".parse::<Output>().is_err());
        assert_eq!(
            "icecast://0.0.0.0:8000/live.ogg".parse(),
            Ok(Input::Icecast {
                addr: "0.0.0.0:8000".parse().unwrap(),
                mount: "/live.ogg".into()
            })
        );
        assert_eq!(
            "icecast://127.0.0.1:8000"
                .parse::<Input>()
                .map(|i| match i {
                    Input::Icecast { mount, .. } => mount,
                    _ => String::new(),
                }),
            Ok("/".to_owned())
        );
        assert!(
            "icecast://source:pw@127.0.0.1:8000/x"
                .parse::<Input>()
                .is_err()
        );
    }
}
