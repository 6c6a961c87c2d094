//! `gridcast demo`: a whole grid on 127.0.0.1 in one process, with a supernode killed without
//! warning halfway through, and a report of what every peer played.
//!
//! A source is fed the built-in test stream ([`super::teststream`]) in real time; every
//! supernode draws 10 of the 16 substreams from the source and regenerates the rest; every peer chooses its own parents among the
//! supernodes (the same policy as `gridcast play`). Each node is a real [`Node`] on real UDP
//! sockets with its own driver thread. At the halfway mark one supernode is stopped without a
//! word to anyone: its children notice by themselves (lag or loss) and move its substreams.
//! The report compares every peer's played bytes with what the source published.

use std::collections::BTreeMap;
use std::sync::mpsc::Receiver;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use super::roles::start_node;
use super::source::Publishing;
use super::teststream::TestStream;
use crate::driver::{IoBackend, Node, StartError};
use crate::keys::{ChannelKey, KeyError, NodeId, NodeKey};
use crate::node::{Candidate, ChannelMode, Engine, EngineConfig, NodeEvent};
use crate::stream::{Chunker, ChunkerConfig, CodingError, InputFormat};
use crate::wire::{Role, StartAt, SubstreamSet};

/// Substreams each supernode draws from the source (K = 8 of 16, plus 2 spare).
const UPSTREAM_SUBSTREAMS: usize = 10;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Supernodes (at least 2: one is killed, the rest must carry the peers).
    pub supernodes: usize,
    /// Peers.
    pub peers: usize,
    /// How long the source streams.
    pub duration: Duration,
    /// Test stream bitrate.
    pub bitrate_bps: u64,
    /// Kill one supernode halfway through.
    pub kill: bool,
    /// Data plane.
    pub backend: IoBackend,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            supernodes: 3,
            peers: 6,
            duration: Duration::from_secs(16),
            bitrate_bps: 1_000_000,
            kill: true,
            backend: IoBackend::Auto,
        }
    }
}

/// Why the demo could not run (not: why a peer failed; that is in the [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A node could not start.
    #[error("starting a node: {0}")]
    Start(#[from] StartError),
    /// A key could not be made.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The configuration cannot work.
    #[error("{0}")]
    Config(&'static str),
    /// A node's thread died.
    #[error("a node stopped unexpectedly: {0}")]
    Stopped(#[from] std::io::Error),
    /// A chunk could not be encoded.
    #[error("encoding a chunk: {0}")]
    Coding(#[from] CodingError),
}

/// One peer's result.
#[derive(Debug, Clone, Serialize)]
pub struct PeerReport {
    /// Chunks played.
    pub chunks_played: u64,
    /// Played ÷ due, from its first chunk to the last one published.
    pub continuity: f64,
    /// Every played byte equals the source's byte at that position.
    pub byte_exact: bool,
    /// First subscription to first chunk out, in milliseconds.
    pub startup_ms: Option<u64>,
    /// Parents it replaced.
    pub failovers: u64,
    /// Bytes it played.
    pub bytes: u64,
}

/// The demo's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Per peer.
    pub peers: Vec<PeerReport>,
    /// The worst peer's continuity.
    pub continuity_min: f64,
    /// Every peer byte-exact.
    pub byte_exact: bool,
    /// Stream bytes the source published.
    pub stream_bytes: u64,
    /// Shard bytes the source sent (its upload).
    pub source_upload_bytes: u64,
    /// Bytes all peers played.
    pub delivered_bytes: u64,
    /// Supernodes stopped without warning.
    pub supernodes_killed: usize,
    /// Parent replacements across all peers.
    pub failovers: u64,
    /// Chunks the source published.
    pub chunks_published: u64,
    /// Data plane the nodes ran on.
    pub backend: String,
}

impl Report {
    /// True when every peer played every chunk due, byte for byte.
    pub fn perfect(&self) -> bool {
        self.byte_exact && self.continuity_min >= 1.0 && self.peers.iter().all(|p| p.bytes > 0)
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        out.push_str("peer  chunks  continuity  byte-exact  start-up  failovers\n");
        for (i, p) in self.peers.iter().enumerate() {
            let startup = p
                .startup_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms"));
            out.push_str(&format!(
                "{i:>4}  {:>6}  {:>9.2}%  {:>10}  {startup:>8}  {:>9}\n",
                p.chunks_played,
                p.continuity * 100.0,
                if p.byte_exact { "yes" } else { "NO" },
                p.failovers
            ));
        }
        let ratio = self.source_upload_bytes as f64 / self.delivered_bytes.max(1) as f64;
        out.push_str(&format!(
            "\nbackend {}; {} chunks published ({} bytes); {} supernode(s) killed; {} failovers\n\
             source upload {} bytes for {} bytes delivered to {} peers ({ratio:.2} upload bytes per delivered byte)\n\
             continuity min {:.2}%; byte-exact: {}\n{}\n",
            self.backend,
            self.chunks_published,
            self.stream_bytes,
            self.supernodes_killed,
            self.failovers,
            self.source_upload_bytes,
            self.delivered_bytes,
            self.peers.len(),
            self.continuity_min * 100.0,
            if self.byte_exact { "yes" } else { "NO" },
            if self.perfect() {
                "PASS: every peer played every chunk, byte for byte"
            } else {
                "FAIL: a peer missed a chunk or played a wrong byte"
            }
        ));
        out
    }
}

struct Running {
    node: Node,
    id: NodeId,
    events: Receiver<NodeEvent>,
}

impl Running {
    fn start(backend: IoBackend, config: &EngineConfig) -> Result<Self, DemoError> {
        let key = NodeKey::generate()?;
        let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let (node, events) = start_node(backend, loopback, 1, &key, config)?;
        Ok(Self {
            node,
            id: key.node_id(),
            events,
        })
    }

    fn on(&self, f: impl FnOnce(&mut Engine, Instant) + Send + 'static) {
        // A stopped node ignores commands; the report shows what that cost.
        let _ = self.node.command(0, Box::new(f));
    }

    fn candidate(&self) -> Candidate {
        Candidate {
            addr: self.node.local_addr(),
            node: self.id,
        }
    }
}

#[derive(Default)]
struct Played {
    chunks: Vec<(u64, Bytes)>,
    failovers: u64,
}

impl Played {
    fn drain(&mut self, events: &Receiver<NodeEvent>) {
        for ev in events.try_iter() {
            match ev {
                NodeEvent::Chunk { seq, payload, .. } => {
                    self.chunks.push((seq, payload.to_bytes()))
                }
                NodeEvent::Failover { .. } => self.failovers += 1,
                _ => {}
            }
        }
    }
}

/// Runs the demo grid; `progress` gets one line per stage.
#[allow(clippy::disallowed_methods)] // the demo runs in real time
pub fn run(config: &DemoConfig, mut progress: impl FnMut(&str)) -> Result<Report, DemoError> {
    if config.supernodes < 2 && config.kill {
        return Err(DemoError::Config("killing a supernode needs at least two"));
    }
    let channel_key = ChannelKey::generate()?;
    let channel = channel_key.channel_id();
    let source = Running::start(
        config.backend,
        &EngineConfig {
            role: Role::Source,
            serve: true,
            ..Default::default()
        },
    )?;
    let backend = source.node.backend().to_string();
    source.on(move |e, _| e.add_channel(channel, ChannelMode::Source));
    let mut supernodes = Vec::new();
    for i in 0..config.supernodes {
        // K + 2 substreams each, a different slice per supernode: any K rebuild a chunk and the
        // supernode regenerates the rest, so the source's upload does not grow with the grid.
        let mut substreams = SubstreamSet::EMPTY;
        for j in 0..UPSTREAM_SUBSTREAMS {
            substreams.insert((i * 5 + j) % 16);
        }
        let sn = Running::start(
            config.backend,
            &EngineConfig {
                role: Role::Supernode,
                serve: true,
                ..Default::default()
            },
        )?;
        let up = source.candidate();
        sn.on(move |e, now| {
            e.add_channel(channel, ChannelMode::Relay);
            // Cannot fail: the channel was just added.
            let _ = e.subscribe(now, up.addr, up.node, channel, substreams, StartAt::Live);
        });
        supernodes.push(Some(sn));
    }
    let candidates: Vec<Candidate> = supernodes
        .iter()
        .flatten()
        .map(Running::candidate)
        .collect();
    progress(&format!(
        "demo: source on {}, {} supernodes, {} peers joining after 1 s, backend {backend}",
        source.node.local_addr(),
        config.supernodes,
        config.peers
    ));

    let mut chunker = Chunker::new(ChunkerConfig {
        format: InputFormat::Auto,
        first_seq: 1,
        ..Default::default()
    })
    .map_err(|_| DemoError::Config("chunker settings"))?;
    let mut published: BTreeMap<u64, Bytes> = BTreeMap::new();
    let mut stream = TestStream::new(config.bitrate_bps);
    let mut peers: Vec<(Running, Played)> = Vec::new();
    let mut killed = 0;
    let start = Instant::now();
    let tick = Duration::from_millis(20);
    let mut buf = Vec::new();
    let mut publishing = Publishing::new(&source.node, channel_key, start);
    let mut publish = |chunker: &mut Chunker, published: &mut BTreeMap<u64, Bytes>| {
        publishing.drain(chunker, |chunk| {
            published.insert(chunk.seq, chunk.payload.clone());
        })
    };
    while start.elapsed() < config.duration {
        let elapsed = start.elapsed();
        if peers.is_empty() && elapsed >= Duration::from_secs(1) {
            for i in 0..config.peers {
                let peer = Running::start(config.backend, &EngineConfig::default())?;
                // Each peer lists the supernodes in another order, as parent answers would.
                let mut mine = candidates.clone();
                mine.rotate_left(i % candidates.len().max(1));
                peer.on(move |e, now| {
                    e.add_channel(channel, ChannelMode::Play);
                    let _ = e.set_upstream(now, channel, mine);
                });
                peers.push((peer, Played::default()));
            }
        }
        if config.kill
            && killed == 0
            && elapsed >= config.duration / 2
            && let Some(victim) = supernodes.get_mut(1).and_then(Option::take)
        {
            let addr = victim.node.local_addr();
            victim.node.halt()?;
            killed = 1;
            progress(&format!(
                "demo: killed supernode {addr} without warning at {:.1} s",
                elapsed.as_secs_f64()
            ));
        }
        buf.clear();
        stream.fill_until(elapsed.as_micros() as u64, &mut buf);
        let now = Instant::now();
        chunker.handle_input(now, &buf);
        chunker.handle_timeout(now);
        publish(&mut chunker, &mut published)?;
        for (peer, played) in &mut peers {
            played.drain(&peer.events);
        }
        thread::sleep(tick);
    }
    chunker.finish(Instant::now());
    publish(&mut chunker, &mut published)?;
    progress("demo: source finished; waiting for the peers to play out");
    // Every published chunk is due within the start delay plus the playout delay.
    let settle = Instant::now();
    let last = published.keys().next_back().copied().unwrap_or(0);
    while settle.elapsed() < Duration::from_secs(4) {
        for (peer, played) in &mut peers {
            played.drain(&peer.events);
        }
        if peers
            .iter()
            .all(|(_, p)| p.chunks.last().is_some_and(|c| c.0 >= last))
        {
            break;
        }
        thread::sleep(tick);
    }

    let mut reports = Vec::new();
    for (peer, mut played) in peers {
        played.drain(&peer.events);
        let stopped = peer.node.stop()?;
        let startup = stopped
            .first()
            .and_then(|(e, _)| e.channel(&channel))
            .and_then(|c| c.stats().startup);
        reports.push(peer_report(&played, &published, last, startup));
    }
    let source_upload_bytes = source
        .node
        .stop()?
        .iter()
        .map(|(e, _)| e.stats().shard_bytes_out)
        .sum();
    for sn in supernodes.into_iter().flatten() {
        sn.node.stop()?;
    }
    Ok(Report {
        continuity_min: reports.iter().map(|p| p.continuity).fold(1.0, f64::min),
        byte_exact: reports.iter().all(|p| p.byte_exact),
        delivered_bytes: reports.iter().map(|p| p.bytes).sum(),
        failovers: reports.iter().map(|p| p.failovers).sum(),
        peers: reports,
        stream_bytes: published.values().map(|b| b.len() as u64).sum(),
        source_upload_bytes,
        supernodes_killed: killed,
        chunks_published: published.len() as u64,
        backend,
    })
}

/// Continuity: chunks played ÷ chunks due, where due is every published chunk from the first
/// one played to the last one published.
fn peer_report(
    played: &Played,
    published: &BTreeMap<u64, Bytes>,
    last: u64,
    startup: Option<Duration>,
) -> PeerReport {
    let first = played.chunks.first().map(|c| c.0);
    let due = first.map_or(0, |f| published.range(f..=last).count()) as u64;
    let mut seen = std::collections::BTreeSet::new();
    let mut exact = true;
    for (seq, bytes) in &played.chunks {
        exact &= published.get(seq) == Some(bytes) && seen.insert(*seq);
    }
    let chunks_played = played.chunks.len() as u64;
    PeerReport {
        chunks_played,
        continuity: if due == 0 {
            0.0
        } else {
            (seen.len() as f64 / due as f64).min(1.0)
        },
        byte_exact: exact && chunks_played > 0,
        startup_ms: startup.map(|d| d.as_millis() as u64),
        failovers: played.failovers,
        bytes: played.chunks.iter().map(|c| c.1.len() as u64).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(seqs: std::ops::RangeInclusive<u64>) -> BTreeMap<u64, Bytes> {
        seqs.map(|s| (s, Bytes::from(vec![s as u8; 10]))).collect()
    }

    #[test]
    fn continuity_counts_gaps_repeats_and_wrong_bytes() {
        let pubd = published(1..=10);
        let mut p = Played {
            chunks: (3..=10).map(|s| (s, pubd[&s].clone())).collect(),
            ..Default::default()
        };
        let r = peer_report(&p, &pubd, 10, None);
        assert_eq!(r.continuity, 1.0);
        assert!(r.byte_exact);

        p.chunks.remove(2);
        let r = peer_report(&p, &pubd, 10, None);
        assert!((r.continuity - 7.0 / 8.0).abs() < 1e-9);

        p.chunks.push((10, pubd[&10].clone()));
        assert!(!peer_report(&p, &pubd, 10, None).byte_exact, "a repeat");

        p.chunks = vec![(4, Bytes::from_static(b"wrong"))];
        assert!(!peer_report(&p, &pubd, 10, None).byte_exact);

        let empty = peer_report(&Played::default(), &pubd, 10, None);
        assert_eq!(empty.continuity, 0.0);
        assert!(!empty.byte_exact);
    }
}
