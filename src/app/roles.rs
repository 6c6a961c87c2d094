//! What the three commands share: starting a node, the stop flag, printing a link, node
//! keys, rates, and logging the engine's events. The roles themselves: [`super::source`]
//! (`gridcast broadcast`), [`super::relay`] (`gridcast relay`), [`super::play`]
//! (`gridcast play`).
//!
//! Each role owns one [`Node`] and talks to its engine through commands; the calling thread
//! reads input (broadcast) or writes output (play), and polls a stop flag that SIGINT and
//! SIGTERM set.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::driver::{IoBackend, Node, StartError};
use crate::keys::NodeKey;
use crate::node::{Congestion, Engine, EngineConfig, NodeEvent};
use crate::wire::RefuseReason;

pub use super::play::{Output, PlayConfig, play};
pub use super::relay::{OpenRelay, RelayConfig, relay};
pub use super::source::{BroadcastConfig, Input, broadcast};

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
    // Membership info versions follow the wall clock, as chunk sequences and title serials
    // do: a node restarted with its key is believed over its last run.
    #[allow(clippy::disallowed_methods)]
    let started_unix_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
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
                    started_unix_us,
                    ..config.clone()
                },
            )
        },
        &tx,
    )?;
    Ok((node, rx))
}

/// [`start_node`] for a command: the error names the address.
pub(crate) fn serve(
    backend: IoBackend,
    listen: SocketAddr,
    workers: usize,
    key: &NodeKey,
    config: &EngineConfig,
) -> anyhow::Result<(Node, Receiver<NodeEvent>)> {
    start_node(backend, listen, workers, key, config)
        .with_context(|| format!("cannot serve on {listen}"))
}

/// Prints a line for whoever reads this process's output (a link, a URL). A reader that
/// took what it wanted and closed the pipe is no error: the node goes on serving.
pub(crate) fn say(line: &dyn std::fmt::Display) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Every address of this host on `port`, the default place to listen: the IPv6 wildcard,
/// which the drivers make dual-stack (IPv6 and IPv4 peers on one socket), or the IPv4 one
/// where this host has no IPv6 (a kernel booted with `ipv6.disable=1`).
pub(crate) fn any_addr(port: u16) -> SocketAddr {
    static HAS_IPV6: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let v6 = *HAS_IPV6
        .get_or_init(|| std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).is_ok());
    if v6 {
        SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port)
    } else {
        SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port)
    }
}

/// Makes worker 0 a member of the supernodes' membership, announced at the first of
/// `advertise` (the others announced with it); where none was given, at the listening
/// address, or, where that is a wildcard, at the local address the first neighbour reaches it
/// at (its upstream, for a relay; its first child, for a source). Announcing the loopback
/// address a link prints for a wildcard would send other hosts' viewers to themselves.
pub(crate) fn announce(node: &Node, advertise: &[SocketAddr]) {
    let bound = node.local_addr();
    let set: crate::driver::Command = match advertise {
        [first, also @ ..] => {
            let (first, also) = (*first, also.to_vec());
            Box::new(move |e, _| {
                e.set_advertise(first);
                e.set_advertise_also(also);
            })
        }
        [] if !bound.ip().is_unspecified() => Box::new(move |e, _| e.set_advertise(bound)),
        [] => {
            let port = bound.port();
            Box::new(move |e, _| e.learn_advertise(port))
        }
    };
    node.command(0, set);
}

/// The address to print in a link: the bound one, or loopback where it is unspecified.
pub(crate) fn link_addr(node: &Node) -> SocketAddr {
    let mut addr = node.local_addr();
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    addr
}

/// The node key in `path` (created there if missing), or a fresh one.
pub(crate) fn node_key(path: Option<&std::path::Path>) -> anyhow::Result<NodeKey> {
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

/// Logs what the application should hear about a node's upstreams and neighbours.
pub(crate) fn log_event(event: &NodeEvent) {
    match event {
        NodeEvent::Failover {
            lost,
            replacement,
            resume,
            why,
            ..
        } => tracing::info!(%lost, ?replacement, resume, %why, "parent replaced"),
        NodeEvent::ParentMoved {
            from,
            to,
            from_rtt,
            to_rtt,
            resume,
            ..
        } => tracing::info!(
            %from, %to, ?from_rtt, ?to_rtt, resume,
            "parent moved to a nearer node"
        ),
        NodeEvent::Skipped {
            channel,
            first,
            last,
        } => tracing::warn!(
            %channel,
            first,
            last,
            "chunks skipped: no parent delivered enough of them within the playout delay"
        ),
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
            connected_or_dialling = connected,
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

/// How a node's uploads share its uplink with the host's other traffic (`play` and `relay`
/// `--upload-priority`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UploadPriority {
    /// Below everything else the host sends: a scavenger congestion controller (LEDBAT) keeps
    /// the queue it adds near 60 ms and backs off when other traffic fills it. A player's
    /// default.
    #[default]
    Low,
    /// Like any other upload: loss-based (CUBIC, which a loss cuts only when the path shows a
    /// queue: [`crate::node::gated_cubic`]), taking its share of a full link. A relay's
    /// default.
    Normal,
}

impl UploadPriority {
    /// The congestion controller it means.
    pub fn congestion(self) -> Congestion {
        match self {
            Self::Low => Congestion::Ledbat,
            Self::Normal => Congestion::GatedCubic,
        }
    }
}

impl std::str::FromStr for UploadPriority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "low" => Ok(Self::Low),
            "normal" => Ok(Self::Normal),
            other => Err(format!(
                "unknown upload priority {other:?} (expected low or normal)"
            )),
        }
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
