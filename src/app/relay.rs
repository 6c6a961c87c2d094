//! `gridcast relay`: a supernode. Draws its channels with the relay policy from every node
//! its links name (or, open, any channel asked for), serves them on every core, joins the
//! supernodes' membership, and drains on SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::link::{ChannelLink, Resolved, resolve_nodes};
use crate::driver::{IoBackend, Node};
use crate::keys::ChannelId;
use crate::node::{Candidate, ChannelMode, EngineConfig, NodeEvent, OpenChannels, UpstreamConfig};
use crate::wire::{ParentCandidate, Role};

use super::roles::{link_addr, log_event, node_key, say, serve};

/// Where a relay's admin listener listens unless told otherwise.
pub const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// `gridcast relay` settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The admin listener (`None`: the command's default).
    pub admin: Option<super::ops::AdminListen>,
    /// UDP address to serve on.
    pub listen: SocketAddr,
    /// Channels to carry; every node a channel's links name is a candidate upstream.
    pub join: Vec<ChannelLink>,
    /// io_uring workers (one per core by default).
    pub workers: usize,
    /// A node key file (the node id stays the same across restarts); a fresh key if `None`.
    pub node_key: Option<PathBuf>,
    /// The address announced to the other supernodes (`None`: the link's).
    pub advertise: Vec<SocketAddr>,
    /// Most bits per second sent to subscribers (`None`: no limit).
    pub max_upload_bps: Option<u64>,
    /// Whether its uploads yield to the host's other traffic (a relay at home).
    pub upload_priority: super::roles::UploadPriority,
    /// Most connections at once (`None`: no limit).
    pub max_connections: Option<usize>,
    /// Most subscriptions at once (`None`: no limit).
    pub max_subscribers: Option<usize>,
    /// Incoming handshakes under way before new addresses are asked to validate (QUIC Retry).
    pub validate_above: usize,
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

/// A channel and its candidate upstreams.
pub(crate) type ChannelUpstreams = (ChannelId, Vec<Candidate>);

/// Every candidate upstream per channel, over all the links given for it (a channel may be
/// joined with several links), each node once and never this node itself; and the nodes
/// known at several addresses, with all of them (`Engine::learn_addresses`).
pub(crate) fn upstreams(
    links: &[ChannelLink],
    me: crate::keys::NodeId,
    local: SocketAddr,
) -> anyhow::Result<(Vec<ChannelUpstreams>, Resolved)> {
    let mut out: Vec<ChannelUpstreams> = Vec::new();
    let mut all = Resolved::default();
    for link in links {
        let resolved = link.resolve(local)?.without(me);
        let entry = match out.iter_mut().position(|(c, _)| *c == link.channel) {
            Some(i) => &mut out[i].1,
            None => {
                out.push((link.channel, Vec::new()));
                &mut out.last_mut().context("just pushed")?.1
            }
        };
        for &c in &resolved.candidates {
            if !entry.iter().any(|e| e.node == c.node) {
                entry.push(c);
            }
        }
        all.merge(resolved);
    }
    for (channel, candidates) in &out {
        if candidates.is_empty() {
            anyhow::bail!("the links for channel {channel} name no node but this one");
        }
    }
    Ok((out, all))
}

/// Runs a supernode until a signal arrives.
#[allow(clippy::disallowed_methods)] // the relay reads the clock
pub fn relay(config: &RelayConfig, stop: &AtomicBool) -> anyhow::Result<()> {
    let key = node_key(config.node_key.as_deref())?;
    if config.join.is_empty() && config.open.is_none() {
        anyhow::bail!("nothing to carry: give at least one --join <channel link>, or --open");
    }
    let (upstreams, mut addresses) = upstreams(&config.join, key.node_id(), config.listen)?;
    let open = match &config.open {
        Some(open) => {
            let resolved = resolve_nodes(&open.bootstrap, config.listen)?.without(key.node_id());
            let mut bootstrap = resolved.candidates.clone();
            addresses.merge(resolved);
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
            validate_above: config.validate_above.div_ceil(config.workers),
            open,
            congestion: config.upload_priority.congestion(),
            ..Default::default()
        },
    )?;

    let _ops = super::ops::Ops::start(
        &node,
        super::ops::NodeRole::Relay,
        config
            .admin
            .unwrap_or(super::ops::AdminListen::At(DEFAULT_ADMIN)),
        config.admin.is_none(),
        None,
        None,
    )?;
    // Worker 0 is this node's member of the supernodes' membership; the others hand it the
    // gossip they receive.
    super::roles::announce(&node, &config.advertise);
    for w in 0..node.workers() {
        let book = addresses.addresses.clone();
        node.command(
            w,
            Box::new(move |e, _| {
                for (n, addrs) in &book {
                    e.learn_addresses(*n, addrs);
                }
            }),
        );
    }
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
    if config.upload_priority == super::roles::UploadPriority::Low {
        tracing::info!("uploads yield to this host's other traffic (upload priority low, LEDBAT)");
    }
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
    // The links' and bootstrap nodes' host names are looked up again while a channel has
    // no parent delivering, and every minute (see `names`).
    let mut named: Vec<super::link::LinkNode> = config
        .join
        .iter()
        .flat_map(|l| l.nodes.iter().cloned())
        .collect();
    if let Some(open) = &config.open {
        named.extend(open.bootstrap.iter().cloned());
    }
    named.retain(|n| n.node != key.node_id());
    let names = super::names::Names::watch(node.commander(), named, config.listen, &addresses)?;
    let mut out_of: std::collections::HashSet<ChannelId> = std::collections::HashSet::new();
    let mut last_share = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Events wake this thread; the timeout only bounds how late it sees the stop flag
        // (SIGINT, SIGTERM) and the carriers' share, so it is long: every wake-up is CPU a
        // quiet relay spends for nothing.
        match events.recv_timeout(STOP_POLL) {
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
            // A worker's parent told it a new title: its siblings' subscribers get it too (the
            // worker that has it already keeps it as it is).
            Ok(NodeEvent::StreamTitle { title }) => {
                tracing::info!(channel = %title.channel, title = %title.text, "title");
                for w in 0..node.workers() {
                    let title = title.clone();
                    node.command(
                        w,
                        Box::new(move |e, now| {
                            let _ = e.set_title(now, title);
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
            // One worker caught a node sending bad data: every worker refuses it.
            Ok(NodeEvent::NodeRefused { node: bad }) => {
                tracing::info!(node = %bad, "refusing a node that sent bad data");
                for w in 0..node.workers() {
                    node.command(w, Box::new(move |e, now| e.refuse_node(now, bad)));
                }
            }
            Ok(NodeEvent::Gossip { from, data }) => {
                node.command(0, Box::new(move |e, now| e.handle_gossip(now, from, &data)));
            }
            Ok(event) => {
                match &event {
                    NodeEvent::UpstreamLost {
                        channel,
                        ended: false,
                        ..
                    } => {
                        out_of.insert(*channel);
                    }
                    NodeEvent::UpstreamRestored { channel, .. }
                    | NodeEvent::UpstreamLost { channel, .. } => {
                        out_of.remove(channel);
                    }
                    _ => {}
                }
                if let Some(n) = &names {
                    n.set_outage(!out_of.is_empty());
                }
                log_event(&event);
            }
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

/// How often the relay's main thread looks at the stop flag when no event comes.
const STOP_POLL: Duration = Duration::from_millis(250);

/// Hands what worker 0 (the member) knows of each channel's carriers to the other workers
/// as alternatives, beside the nodes the links name, so that every worker's answers and
/// go-aways name the grid's supernodes.
fn share_carriers(node: &Node, link_nodes: &[(ChannelId, Vec<Candidate>)]) {
    let (tx, rx) = mpsc::channel();
    let channels: Vec<ChannelId> = link_nodes.iter().map(|(c, _)| *c).collect();
    let asked = node.command(
        0,
        Box::new(move |e, now| {
            let known: Vec<(ChannelId, Vec<ParentCandidate>)> = channels
                .iter()
                .map(|&c| (c, e.named_parents(now, c, 32)))
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
                        list.push(ParentCandidate {
                            node: l.node,
                            addrs: vec![l.addr],
                            load_permille: 0,
                        });
                    }
                }
            }
        }
        for w in 1..node.workers() {
            let list = list.clone();
            node.command(
                w,
                Box::new(move |e, _| e.set_alternatives_named(channel, list)),
            );
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
    super::ops::notify::stopping();
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
