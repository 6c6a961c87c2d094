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

use super::link::ChannelLink;
use crate::driver::{IoBackend, Node, StartError};
use crate::keys::{ChannelId, ChannelKey, NodeKey};
use crate::node::{ChannelMode, Engine, EngineConfig, NodeEvent};
use crate::stream::{Chunk, ChunkPublisher, Chunker, ChunkerConfig, CodingError, CodingParams};
use crate::wire::{Role, StartAt, SubstreamSet};

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
        } else if s.contains("://") {
            Err(format!(
                "input {s:?}: use -, a file path, tcp://host:port or udp://host:port"
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
    /// Data plane.
    pub backend: IoBackend,
}

/// `gridcast relay` settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// UDP address to serve on.
    pub listen: SocketAddr,
    /// Channels to carry, each from the first node of its link.
    pub join: Vec<ChannelLink>,
    /// io_uring workers (one per core by default).
    pub workers: usize,
    /// A node key file (the node id stays the same across restarts); a fresh key if `None`.
    pub node_key: Option<PathBuf>,
    /// Data plane.
    pub backend: IoBackend,
}

/// Where `play` writes the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Standard output (`| mpv -`).
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
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
    /// Give up if no node of the link answers within this long.
    pub connect_timeout: Duration,
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
/// it to worker 0 of the node.
pub(crate) struct Publishing<'a> {
    node: &'a Node,
    channel: ChannelId,
    publisher: ChunkPublisher,
    /// Chunk timestamps count from here.
    start: Instant,
}

impl<'a> Publishing<'a> {
    pub(crate) fn new(node: &'a Node, key: ChannelKey, start: Instant) -> Self {
        Self {
            node,
            channel: key.channel_id(),
            publisher: ChunkPublisher::new(key, CodingParams::DEFAULT),
            start,
        }
    }

    /// Publishes every closed chunk; `each` sees each one first.
    pub(crate) fn drain(
        &mut self,
        chunker: &mut Chunker,
        mut each: impl FnMut(&Chunk),
    ) -> Result<(), CodingError> {
        while let Some(chunk) = chunker.poll_chunk() {
            let ts = (chunk.started - self.start).as_micros() as u64;
            let coded = self
                .publisher
                .publish(chunk.seq, ts, chunk.flags, &chunk.payload)?;
            each(&chunk);
            let channel = self.channel;
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
        Ok(())
    }
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
fn read_input(input: &Input) -> anyhow::Result<Receiver<io::Result<Vec<u8>>>> {
    let (tx, rx) = mpsc::sync_channel(64);
    match input.clone() {
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
    let node_key = NodeKey::generate()?;
    let (node, _events) = serve(
        config.backend,
        config.listen,
        1,
        &node_key,
        &EngineConfig {
            role: Role::Source,
            serve: true,
            ..Default::default()
        },
    )?;
    node.command(
        0,
        Box::new(move |e, _| e.add_channel(channel, ChannelMode::Source)),
    );
    let link = ChannelLink::single(channel, link_addr(&node), node_key.node_id());
    #[allow(clippy::print_stdout)]
    {
        println!("{link}");
    }
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
    let input = read_input(&config.input)?;
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

/// Runs a supernode until a signal arrives.
#[allow(clippy::disallowed_methods)] // the relay reads the clock
pub fn relay(config: &RelayConfig, stop: &AtomicBool) -> anyhow::Result<()> {
    let key = match &config.node_key {
        Some(path) if path.exists() => NodeKey::load(path)?,
        Some(path) => {
            let key = NodeKey::generate()?;
            key.save(path, false)?;
            key
        }
        None => NodeKey::generate()?,
    };
    if config.join.is_empty() {
        anyhow::bail!("nothing to carry: give at least one --join <channel link>");
    }
    let (node, _events) = serve(
        config.backend,
        config.listen,
        config.workers,
        &key,
        &EngineConfig {
            role: Role::Supernode,
            serve: true,
            ..Default::default()
        },
    )?;
    for link in &config.join {
        let channel = link.channel;
        let upstream = link
            .candidates()?
            .into_iter()
            .next()
            .context("the link names no node")?;
        for w in 0..node.workers() {
            node.command(
                w,
                Box::new(move |e, _| e.add_channel(channel, ChannelMode::Relay)),
            );
        }
        // One worker draws the channel from upstream; its siblings get it by import.
        node.command(
            0,
            Box::new(move |e, now| {
                if let Err(err) = e.subscribe(
                    now,
                    upstream.addr,
                    upstream.node,
                    channel,
                    SubstreamSet::first(16),
                    StartAt::Live,
                ) {
                    tracing::error!(%err, "subscribing upstream");
                }
            }),
        );
        let own = ChannelLink::single(channel, link_addr(&node), key.node_id());
        #[allow(clippy::print_stdout)]
        {
            println!("{own}");
        }
        tracing::info!(link = %own, upstream = %upstream.addr, "carrying");
    }
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("stopping");
    node.stop()?;
    Ok(())
}

/// Runs a peer until a signal arrives or the output is closed.
#[allow(clippy::disallowed_methods)] // the connect timeout reads the clock
pub fn play(config: &PlayConfig, stop: &AtomicBool) -> anyhow::Result<()> {
    let candidates = config.link.candidates()?;
    let mut out: Box<dyn Write> = match &config.output {
        Output::Stdout => Box::new(io::stdout().lock()),
        Output::File(path) => Box::new(
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        ),
    };
    let key = NodeKey::generate()?;
    let (node, events) = serve(
        config.backend,
        config.listen,
        1,
        &key,
        &EngineConfig::default(),
    )?;
    let channel = config.link.channel;
    node.command(
        0,
        Box::new(move |e, now| {
            e.add_channel(channel, ChannelMode::Play);
            if let Err(err) = e.set_upstream(now, channel, candidates) {
                tracing::error!(%err, "choosing parents");
            }
        }),
    );
    tracing::info!(%channel, backend = %node.backend(), "playing");
    let started = Instant::now();
    let mut connected = false;
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        if !connected && started.elapsed() >= config.connect_timeout {
            let hosts: Vec<&str> = config.link.nodes.iter().map(|n| n.host.as_str()).collect();
            break Err(anyhow::anyhow!(
                "no node of the link answered within {:?}: {}",
                config.connect_timeout,
                hosts.join(", ")
            ));
        }
        match events.recv_timeout(Duration::from_millis(100)) {
            Ok(NodeEvent::Connected { .. }) => connected = true,
            Ok(NodeEvent::Chunk { payload, .. }) => {
                let written = payload
                    .parts()
                    .iter()
                    .try_for_each(|part| out.write_all(part))
                    .and_then(|()| out.flush());
                if let Err(e) = written {
                    // A player that quits closes the pipe: that ends playback, not an error.
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        break Ok(());
                    }
                    break Err(e).context("writing the output");
                }
            }
            Ok(NodeEvent::Failover {
                lost,
                replacement,
                resume,
                ..
            }) => {
                tracing::info!(%lost, ?replacement, resume, "parent replaced");
            }
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break Err(anyhow::anyhow!("the node stopped")),
        }
    };
    node.stop()?;
    result
}
