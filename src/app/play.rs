//! `gridcast play`: a peer. Draws a channel from several parents (found from its link, the
//! grid or the local network), writes it in order to stdout, a file or local HTTP players,
//! and relays to other peers within its upload cap.

use std::fs::File;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;

use super::link::ChannelLink;
use super::output::{Gate, HttpOutput};
use crate::driver::IoBackend;
use crate::keys::ChannelId;
use crate::node::{ChannelConfig, ChannelMode, Engine, EngineConfig, NodeEvent};
use crate::stream::ChunkFlags;
use crate::wire::StreamTitle;

use super::roles::{UploadPriority, link_addr, log_event, node_key, say, serve};

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

/// `gridcast play` settings.
#[derive(Debug, Clone)]
pub struct PlayConfig {
    /// The admin listener (`None`: the command's default).
    pub admin: Option<super::ops::AdminListen>,
    /// The channel and the nodes to start from.
    pub link: ChannelLink,
    /// Output.
    pub output: Output,
    /// Local UDP address (port 0: any).
    pub listen: SocketAddr,
    /// Node key file (created if missing); `None`: a new node id each run.
    pub node_key: Option<PathBuf>,
    /// Data plane.
    pub backend: IoBackend,
    /// Give up if no chunk has arrived within this long (saying why).
    pub connect_timeout: Duration,
    /// How far behind live to play (the engine's target delay).
    pub delay: Duration,
    /// Most bits per second relayed to other peers (`None`: no cap; `Some(0)`: relay nothing).
    pub upload_bps: Option<u64>,
    /// Whether relaying yields to this host's other traffic.
    pub upload_priority: UploadPriority,
    /// Print a one-line live status on stderr (for a terminal).
    pub status: bool,
    /// Look for nodes on the local network too (preferring them) and announce this peer
    /// there while it relays; always so with a bare channel id.
    pub mdns: bool,
}

/// A player's window and playout settings for playing `delay` behind live: it starts that
/// far back, and waits for a missing chunk as long as that buffer lasts (at least the
/// engine's default wait) before it skips it.
fn playing_behind(delay: Duration) -> ChannelConfig {
    let default = ChannelConfig::default();
    ChannelConfig {
        target_delay: delay,
        playout_delay: default.playout_delay.max(delay),
        ..default
    }
}

/// Titles held for chunks not played yet: a source changes its title a few times a minute.
const MAX_PENDING_TITLES: usize = 16;

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

    /// What plays from the next chunk on. A file or pipe carries audio alone; HTTP players
    /// that ask for ICY metadata get it in band.
    fn title(&mut self, text: &str) {
        if let Self::Http(http) = self {
            http.set_title(text);
        }
    }

    fn chunk(&mut self, flags: ChunkFlags, payload: Bytes) -> io::Result<()> {
        if flags.contains(ChunkFlags::NO_DATA) {
            return Ok(());
        }
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
#[derive(Debug, Default, Clone)]
struct PlayStatus {
    parents: usize,
    substreams: usize,
    needed: usize,
    buffer: Duration,
    played: u64,
    skipped: u64,
    uploaded: u64,
    /// The queue its yielding uploads measure on the uplink, if they yield.
    uplink_queue: Option<Duration>,
    /// The title playing, if the source set one.
    title: Option<String>,
}

/// Characters of a title the status line shows: it must fit a terminal's line.
const STATUS_TITLE_CHARS: usize = 48;

fn read_status(e: &Engine, channel: &ChannelId, now: Instant) -> PlayStatus {
    let (substreams, parents) = e.upstream_status(channel).unwrap_or((0, 0));
    let mut status = PlayStatus {
        parents,
        substreams,
        uploaded: e.stats().shard_bytes_out,
        uplink_queue: e.uplink_queuing_delay(now),
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
    // Past LEDBAT's target, relaying is giving way to the host's other traffic: say so, or
    // a viewer wonders why nothing goes up.
    let yielding = match s.uplink_queue {
        Some(q) if q >= crate::node::ledbat::TARGET => {
            format!(" (yielding: uplink queue {} ms)", q.as_millis())
        }
        _ => String::new(),
    };
    let title = match &s.title {
        Some(t) if t.chars().count() > STATUS_TITLE_CHARS => {
            let cut: String = t.chars().take(STATUS_TITLE_CHARS - 1).collect();
            format!(" | now: {cut}…")
        }
        Some(t) => format!(" | now: {t}"),
        None => String::new(),
    };
    format!(
        "parents {} | substreams {}/{} | buffer {:.1}s | {:.2} Mbit/s | continuity {:.2}% | up {:.1} MB{yielding}{title}",
        s.parents,
        s.substreams,
        s.needed,
        s.buffer.as_secs_f64(),
        bps / 1e6,
        continuity,
        s.uploaded as f64 / 1e6
    )
}

/// Runs a peer until a signal arrives, the output is closed, or (writing to a file or a
/// pipe) the broadcast ends.
#[allow(clippy::disallowed_methods)] // the connect timeout and the status line read the clock
pub fn play(config: &PlayConfig, stop: &AtomicBool) -> anyhow::Result<()> {
    let channel = config.link.channel;
    let bare = config.link.nodes.is_empty();
    // The link's nodes known at several addresses (a host name with IPv6 and IPv4 ones):
    // a dial of one races them (`Engine::learn_addresses`).
    let mut resolved = super::link::Resolved::default();
    let candidates = if bare {
        // A bare channel id: a node on the local network that carries it (a hint until its
        // handshake proves the node id the record names).
        let wait = config.connect_timeout.min(Duration::from_secs(3));
        let mut found = super::lan::find(channel, wait, Duration::from_millis(300))?;
        found.retain(|c| super::link::reaches(config.listen, c.addr));
        if found.is_empty() {
            anyhow::bail!(
                "no node on the local network carries channel {channel} (mDNS, {wait:?}); \
                 give a link with a node's address"
            );
        }
        log_found(&found);
        found
    } else if config.mdns {
        // The link's nodes, behind any that the local network offers: those are dialled
        // first and, being nearest, are given substreams first.
        resolved = config.link.resolve(config.listen)?;
        let link = resolved.candidates.clone();
        let mut found =
            super::lan::find(channel, Duration::from_secs(1), Duration::from_millis(300))
                .unwrap_or_else(|err| {
                    tracing::warn!(%err, "not looking on the local network");
                    Vec::new()
                });
        found.retain(|c| super::link::reaches(config.listen, c.addr));
        log_found(&found);
        local_first(found, link)
    } else {
        resolved = config.link.resolve(config.listen)?;
        resolved.candidates.clone()
    };
    let addresses = resolved.addresses.clone();
    let mut sink = Sink::open(&config.output)?;
    let key = node_key(config.node_key.as_deref())?;
    let engine_config = EngineConfig {
        serve: config.upload_bps != Some(0),
        upload_cap: config.upload_bps.filter(|&b| b > 0).map(|b| b.div_ceil(8)),
        congestion: config.upload_priority.congestion(),
        channel: playing_behind(config.delay),
        ..Default::default()
    };
    let (node, events) = serve(config.backend, config.listen, 1, &key, &engine_config)?;
    let _ops = super::ops::Ops::start(
        &node,
        super::ops::NodeRole::Peer,
        config.admin.unwrap_or(super::ops::AdminListen::Off),
        false,
        None,
        None,
    )?;
    // The link's host names are looked up again while nothing arrives (see `names`).
    let names = super::names::Names::watch(
        node.commander(),
        config.link.nodes.clone(),
        config.listen,
        &resolved,
    )?;
    node.command(
        0,
        Box::new(move |e, now| {
            for (node, addrs) in &addresses {
                e.learn_addresses(*node, addrs);
            }
            e.add_channel(channel, ChannelMode::Play);
            if let Err(err) = e.set_upstream(now, channel, candidates) {
                tracing::error!(%err, "choosing parents");
            }
        }),
    );
    // A peer that relays, where the local network is looked at, is announced there too, so
    // that players nearby draw from it (withdrawn when dropped).
    let mut _lan = None;
    if engine_config.serve {
        let own = ChannelLink::single(channel, link_addr(&node), key.node_id());
        tracing::info!(
            link = %own,
            upload_bps = ?config.upload_bps,
            upload_priority = ?config.upload_priority,
            "relaying to other peers"
        );
        if bare || config.mdns {
            let bound = node.local_addr();
            let ip = (!bound.ip().is_unspecified()).then(|| bound.ip());
            match super::lan::LanAnnouncer::start(key.node_id(), ip, bound.port(), &[channel]) {
                Ok(lan) => _lan = Some(lan),
                Err(err) => tracing::warn!(%err, "not announced on the local network"),
            }
        }
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
    // Titles not yet due, by the chunk each belongs to.
    let mut titles: Vec<StreamTitle> = Vec::new();
    let mut playing: Option<String> = None;
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
                Box::new(move |e, now| {
                    let _ = tx.send((read_status(e, &channel, now), bps));
                }),
            );
        }
        while let Ok((mut status, bps)) = status_rx.try_recv() {
            status.title = playing.clone();
            eprint!("\r\x1b[2K{}", status_line(&status, bps));
        }
        match events.recv_timeout(Duration::from_millis(100)) {
            Ok(NodeEvent::Connected { .. }) => connected = true,
            Ok(NodeEvent::StreamHeader { header, .. }) => sink.header(header.data),
            Ok(NodeEvent::StreamTitle { title }) => {
                titles.push(title);
                titles.sort_by_key(|t| (t.from_seq, t.serial));
                if titles.len() > MAX_PENDING_TITLES {
                    titles.remove(0);
                }
            }
            Ok(NodeEvent::Chunk {
                seq,
                flags,
                payload,
                ..
            }) => {
                // A title shows with the chunk it belongs to (a late joiner's, at once).
                let due = titles.partition_point(|t| t.from_seq <= seq);
                if let Some(now) = titles.drain(..due).next_back() {
                    tracing::info!(%channel, title = %now.text, "now playing");
                    sink.title(&now.text);
                    playing = Some(now.text);
                }
                served = true;
                bytes_since += payload.len() as u64;
                if let Err(e) = sink.chunk(flags, payload.to_bytes()) {
                    // A player that quits closes the pipe: that ends playback, not an error.
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        tracing::info!(%channel, "the output was closed (its reader quit); stopping");
                        break Ok(());
                    }
                    break Err(e).context("writing the output");
                }
                // The broadcast is over: a file or pipe is complete, so the player at its
                // other end sees the end too. HTTP players' streams end; the server stays up
                // (for a restarted broadcast) until stopped.
                if flags.contains(ChunkFlags::END_OF_STREAM) {
                    tracing::info!(%channel, "the stream ended: its source finished it");
                    match &sink {
                        Sink::Writer(..) => break Ok(()),
                        Sink::Http(http) => http.end(),
                    }
                }
            }
            Ok(event) => {
                match &event {
                    NodeEvent::UpstreamLost { ended: false, .. } => {
                        names.as_ref().inspect(|n| n.set_outage(true));
                    }
                    NodeEvent::UpstreamRestored { .. } => {
                        names.as_ref().inspect(|n| n.set_outage(false));
                    }
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

fn log_found(found: &[crate::node::Candidate]) {
    for c in found {
        tracing::info!(addr = %c.addr, node = %c.node, "found on the local network");
    }
}

/// The nodes found on the local network, then the link's nodes that are not among them.
fn local_first(
    found: Vec<crate::node::Candidate>,
    link: Vec<crate::node::Candidate>,
) -> Vec<crate::node::Candidate> {
    let mut out = found;
    for c in link {
        if !out.iter().any(|o| o.node == c.node) {
            out.push(c);
        }
    }
    out
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
    use super::{PlayStatus, local_first, status_line};
    use crate::keys::NodeKey;
    use crate::node::Candidate;
    use std::time::Duration;

    #[test]
    fn the_status_line_says_when_relaying_yields_and_what_plays() {
        let mut s = PlayStatus {
            parents: 3,
            substreams: 12,
            needed: 8,
            played: 99,
            skipped: 1,
            uploaded: 2_500_000,
            ..Default::default()
        };
        let line = status_line(&s, 2e6);
        assert_eq!(
            line,
            "parents 3 | substreams 12/8 | buffer 0.0s | 2.00 Mbit/s | continuity 99.00% | up 2.5 MB"
        );
        s.uplink_queue = Some(Duration::from_millis(20));
        assert_eq!(status_line(&s, 2e6), line);
        s.uplink_queue = Some(Duration::from_millis(86));
        assert!(
            status_line(&s, 2e6).ends_with("up 2.5 MB (yielding: uplink queue 86 ms)"),
            "{}",
            status_line(&s, 2e6)
        );
        // The title playing goes last, cut to fit a terminal's line.
        s.uplink_queue = None;
        s.title = Some("Nina Simone – Sinnerman".to_owned());
        assert_eq!(
            status_line(&s, 2e6),
            format!("{line} | now: Nina Simone – Sinnerman")
        );
        s.title = Some("é".repeat(100));
        assert!(
            status_line(&s, 2e6).ends_with(&format!(" | now: {}…", "é".repeat(47))),
            "{}",
            status_line(&s, 2e6)
        );
    }

    #[test]
    fn nodes_on_the_local_network_come_before_the_links_and_none_twice() {
        let c = |i: u8, port: u16| Candidate {
            addr: std::net::SocketAddr::from(([10, 0, 0, i], port)),
            node: NodeKey::from_seed(&[i; 32]).node_id(),
        };
        let merged = local_first(vec![c(2, 7000), c(3, 7000)], vec![c(1, 4433), c(2, 4434)]);
        assert_eq!(merged, vec![c(2, 7000), c(3, 7000), c(1, 4433)]);
    }
}
