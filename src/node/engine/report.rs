//! What the engine tells its operator: one snapshot of counters and state, taken on a cold
//! path (a scrape, a health check) and never while packets are being handled. Counters that
//! live in connections or channels are summed with those of the ones already gone, so
//! every total only ever grows.

use std::time::{Duration, Instant};

use crate::keys::ChannelId;
use crate::node::channel::{ChannelMode, ChannelStats};
use crate::wire::Role;

use super::{Engine, EngineStats, QuicTotals};

/// One channel as the engine carries it.
#[derive(Debug, Clone)]
pub struct ChannelReport {
    /// The channel.
    pub channel: ChannelId,
    /// How it is carried.
    pub mode: ChannelMode,
    /// Parents delivering to it now (upstream policy), and the substreams they hold.
    pub parents: usize,
    /// Those parents: where each is, what it carries, how far it is.
    pub drawn_from: Vec<ParentReport>,
    /// Substreams drawn.
    pub substreams_held: usize,
    /// The coding's K (`None` until the first chunk).
    pub needed: Option<usize>,
    /// Whether some parent delivered within the stall timeout (`None`: no upstream policy,
    /// as at the source).
    pub delivering: Option<bool>,
    /// Subscriptions served.
    pub subscribers: usize,
    /// The oldest and newest chunk held.
    pub window: Option<(u64, u64)>,
    /// A player's buffer: the stream time from the next chunk to play to the newest held.
    pub buffer: Option<Duration>,
    /// The newest title (a radio's song title) the channel's source set.
    pub title: Option<String>,
    /// Its counters.
    pub stats: ChannelStats,
}

/// One parent a channel is drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParentReport {
    /// Its address.
    pub addr: std::net::SocketAddr,
    /// Substreams it carries.
    pub substreams: usize,
    /// The least round trip measured to it (`None` before its handshake finished).
    pub min_rtt: Option<Duration>,
}

/// Connections by the role the far end announced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionsByRole {
    /// Peers (viewers).
    pub peer: usize,
    /// Supernodes (relays).
    pub supernode: usize,
    /// Sources.
    pub source: usize,
    /// Not yet said (handshake or Hello under way).
    pub unknown: usize,
}

/// The engine's snapshot (see the module doc).
#[derive(Debug, Clone)]
pub struct EngineReport {
    /// The engine's own counters.
    pub stats: EngineStats,
    /// QUIC path counters, live connections and gone ones.
    pub quic: QuicTotals,
    /// Every channel's counters, carried now or before.
    pub channel_totals: ChannelStats,
    /// Connections now.
    pub connections: ConnectionsByRole,
    /// Smoothed round-trip time of every established connection.
    pub rtts: Vec<Duration>,
    /// Subscriptions served, and the substreams they ask for in all.
    pub subscriptions: usize,
    /// Substreams served in all.
    pub substreams_served: usize,
    /// Draining (see [`Engine::drain`]).
    pub draining: bool,
    /// Supernodes known to the membership.
    pub members: usize,
    /// Each channel carried.
    pub channels: Vec<ChannelReport>,
    /// The queuing delay the node's uplink adds, as its LEDBAT connections measure it
    /// (`None` unless its congestion controller is [`super::Congestion::Ledbat`]).
    pub uplink_queuing_delay: Option<Duration>,
}

impl Engine {
    /// The engine's snapshot (see [`EngineReport`]).
    pub fn report(&self, now: Instant) -> EngineReport {
        let mut quic = self.stats.retired_quic;
        let mut connections = ConnectionsByRole::default();
        let mut rtts = Vec::new();
        let mut substreams_served = 0;
        for conn in self.conns.values() {
            quic.add(&conn.quic.stats().path);
            match conn.hello.as_ref().map(|h| h.role) {
                Some(Role::Peer) => connections.peer += 1,
                Some(Role::Supernode) => connections.supernode += 1,
                Some(Role::Source) => connections.source += 1,
                None => connections.unknown += 1,
            }
            if conn.established && !conn.closed {
                rtts.push(conn.quic.rtt());
            }
            substreams_served += conn
                .served
                .values()
                .map(|s| s.substreams.len())
                .sum::<usize>();
        }
        let mut channel_totals = self.retired_channels;
        let mut channels: Vec<ChannelReport> = self
            .channels
            .iter()
            .map(|(id, ch)| {
                let stats = ch.stats();
                channel_totals.absorb(&stats);
                let (substreams_held, parents) = self.upstream_status(id).unwrap_or((0, 0));
                ChannelReport {
                    channel: *id,
                    mode: ch.mode(),
                    parents,
                    drawn_from: self.upstream_parents(id),
                    substreams_held,
                    needed: ch.params().map(|p| p.original()),
                    delivering: self.upstream_delivering(id),
                    subscribers: self.subscribers.get(id).map_or(0, Vec::len),
                    window: ch.range(),
                    buffer: match (ch.next_play(), ch.range()) {
                        (Some(next), Some((_, newest))) if ch.mode() == ChannelMode::Play => {
                            let ahead = newest.saturating_sub(next) + 1;
                            Some(Duration::from_millis(
                                ahead * u64::from(ch.chunk_ms_estimate()),
                            ))
                        }
                        _ => None,
                    },
                    title: ch.title().map(|t| t.text.clone()),
                    stats,
                }
            })
            .collect();
        channels.sort_by_key(|c| c.channel);
        EngineReport {
            stats: self.stats,
            quic,
            channel_totals,
            connections,
            rtts,
            subscriptions: self.served_subscriptions(),
            substreams_served,
            draining: self.draining,
            members: self.members(),
            channels,
            uplink_queuing_delay: self.uplink_queuing_delay(now),
        }
    }

    /// The queuing delay the node's uplink adds, as its LEDBAT connections measure it
    /// ([`crate::node::ledbat::LedbatConfig::uplink_queuing_delay`]); `None` unless its
    /// congestion controller is [`super::Congestion::Ledbat`].
    pub fn uplink_queuing_delay(&self, now: Instant) -> Option<std::time::Duration> {
        (self.config.congestion == super::Congestion::Ledbat)
            .then(|| self.config.ledbat.uplink_queuing_delay(now))
            .flatten()
    }
}
