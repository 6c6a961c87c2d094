//! Parent discovery on the control stream: a node names the nodes it knows carry a channel
//! (its own serving children, which announced their node id in Hello, and the alternatives the
//! application gave it), and a node drawing a channel asks each parent it connects to and adds
//! the answer to its candidates. Also the first-tier limit (`EngineConfig::max_children`):
//! beyond it, or for a peer once a relay child carries the channel, a subscription is refused
//! with those candidates, so that tiers form by themselves.
//!
//! Everything here is a hint: answers are bounded ([`MAX_PARENTS`] candidates, the first
//! address of each), never trusted for identity (every dial proves the node id it was told),
//! and a node that lies only costs the asker one failed subscription.

use std::time::{Duration, Instant};

use quinn_proto::ConnectionHandle;

use crate::keys::ChannelId;
use crate::node::channel::ChannelMode;
use crate::node::directory::Carrier;
use crate::node::upstream::Candidate;
use crate::node::upstream::Slot;
use crate::wire::{
    MAX_ADDRS_PER_PARENT, MAX_PARENTS, Message, ParentAnswer, ParentCandidate, ParentQuery, Role,
};

use super::{Engine, NodeEvent};

/// A child silent this long is left out of answers (it acknowledges every burst it gets and
/// answers keep-alives every second while alive).
const CHILD_SILENT: Duration = Duration::from_secs(3);

/// How often a node asks its parents again.
const ASK_AGAIN: Duration = Duration::from_secs(10);

/// Candidates a node asks each parent for.
const ASK_FOR: u8 = 8;

impl Engine {
    /// The nodes this node names for `channel` to a newcomer that asks (its live serving
    /// children, relays first, then the alternatives set), at most `max`.
    pub fn named_parents(
        &self,
        now: Instant,
        channel: ChannelId,
        max: usize,
    ) -> Vec<ParentCandidate> {
        self.candidates_for(now, ConnectionHandle(usize::MAX), channel, max)
    }

    /// Sets the first-tier limit ([`super::EngineConfig::max_children`]).
    pub fn set_max_children(&mut self, max: Option<usize>) {
        self.config.max_children = max;
    }

    /// The nodes this node would name to `asker` for `channel`, at most `max`: serving
    /// children that draw the channel (supernodes before peers; to a relay, supernodes
    /// only), then the alternatives the
    /// application set, each node once and never the asker itself. The children are rotated
    /// by the asker's connection so that not every asker gets the same few.
    pub(super) fn candidates_for(
        &self,
        now: Instant,
        asker: ConnectionHandle,
        channel: ChannelId,
        max: usize,
    ) -> Vec<ParentCandidate> {
        let asker_hello = self.conns.get(&asker).and_then(|c| c.hello.as_ref());
        let asker_node = self.conns.get(&asker).and_then(|c| c.peer);
        // A relay is never sent to a peer: peers' uploads are capped and they come and go.
        let asker_is_relay = asker_hello.is_some_and(|h| h.role != Role::Peer);
        // A source keeps the relays of its first tier to itself: it names other relays to a
        // relay only when it turns that relay away.
        if self.config.role == Role::Source
            && asker_is_relay
            && !self.over_first_tier(now, asker, channel)
        {
            return Vec::new();
        }
        let mut relays = Vec::new();
        let mut peers = Vec::new();
        for &(handle, sub) in self.subscribers.get(&channel).into_iter().flatten() {
            let Some(conn) = self.conns.get(&handle) else {
                continue;
            };
            // Named by the id it proved in the handshake, and only if it accepts connections.
            let Some(hello) = conn.hello.as_ref().filter(|h| h.serves) else {
                continue;
            };
            let Some(node) = conn.peer else { continue };
            if handle == asker
                || conn.closed
                // A child not heard from (not even an acknowledgement) for a while is dead or
                // cut off: never named, long before its connection times out.
                || now.saturating_duration_since(conn.last_rx) >= CHILD_SILENT
                // Membership knows it drains, or suspects it is dead.
                || self.membership.as_ref().is_some_and(|m| m.shunned(&node))
                || Some(node) == asker_node
                || conn
                    .served
                    .get(&sub)
                    .is_none_or(|s| s.substreams.is_empty())
            {
                continue;
            }
            let list = if hello.role == Role::Peer {
                &mut peers
            } else {
                &mut relays
            };
            if !list.iter().any(|c: &ParentCandidate| c.node == node) {
                list.push(ParentCandidate {
                    node,
                    addrs: vec![conn.remote],
                    load_permille: 0,
                });
            }
        }
        // A peer also names its own parents (peer exchange): a child that found it alone (a
        // shared link, the local network) learns where the channel comes from, and has
        // somewhere to go when this peer leaves. Those delivering first, then the standbys;
        // a supernode or source before a peer.
        if self.config.role == Role::Peer {
            for c in self.own_parents(now, channel) {
                let list = if c.1 == Role::Peer {
                    &mut peers
                } else {
                    &mut relays
                };
                if !list.iter().any(|o: &ParentCandidate| o.node == c.0.node) {
                    list.push(ParentCandidate {
                        node: c.0.node,
                        addrs: vec![c.0.addr],
                        load_permille: 0,
                    });
                }
            }
        }
        let spread = asker.0;
        for list in [&mut relays, &mut peers] {
            if !list.is_empty() {
                let by = spread % list.len();
                list.rotate_left(by);
            }
        }
        // Then the supernodes membership knows to carry it (up, not draining, not full),
        // rotated the same way, then ranked by spare capacity.
        let mut carriers: Vec<_> = self
            .gossip_carriers(&channel)
            .into_iter()
            .filter(|c| c.load_permille < 1000)
            .collect();
        if !carriers.is_empty() {
            let by = spread % carriers.len();
            carriers.rotate_left(by);
            rank_by_spare_capacity(&mut carriers);
        }
        let members = carriers.into_iter().map(|c| ParentCandidate {
            node: c.node,
            addrs: std::iter::once(c.addr).chain(c.also).collect(),
            load_permille: c.load_permille,
        });
        let mut out: Vec<ParentCandidate> = Vec::new();
        let alternatives = self.alternatives.get(&channel).into_iter().flatten();
        let named = alternatives.map(|c| ParentCandidate {
            load_permille: 0,
            ..c.clone()
        });
        if asker_is_relay {
            peers.clear();
        }
        for c in relays.into_iter().chain(members).chain(peers).chain(named) {
            if Some(c.node) == asker_node || c.node == self.node {
                continue;
            }
            // A node named twice (a relay child that membership also lists) is named once,
            // at every address either gave: where it reached this node first, then where it
            // announced itself (its other address family, say).
            if let Some(o) = out.iter_mut().find(|o| o.node == c.node) {
                for a in c.addrs {
                    if o.addrs.len() < MAX_ADDRS_PER_PARENT && !o.addrs.contains(&a) {
                        o.addrs.push(a);
                    }
                }
            } else if out.len() < 4 * MAX_PARENTS {
                out.push(c);
            }
        }
        // Nodes on the asker's own network first (the order above kept within each group):
        // traffic that can stay local does.
        if let Some(asker_addr) = self.conns.get(&asker).map(|c| c.remote.ip()) {
            out.sort_by_key(|c| {
                c.addrs
                    .first()
                    .is_none_or(|a| !same_network(asker_addr, a.ip()))
            });
        }
        out.truncate(max.min(MAX_PARENTS));
        out
    }

    /// This node's parents and standbys for `channel` that are there (open, heard from
    /// within [`CHILD_SILENT`], handshake done) with the role they said they have: the
    /// delivering ones first.
    fn own_parents(&self, now: Instant, channel: ChannelId) -> Vec<(Candidate, Role)> {
        let Some(up) = self.upstreams.get(&channel) else {
            return Vec::new();
        };
        let mut out: Vec<(bool, Candidate, Role)> = up
            .candidates
            .iter()
            .filter_map(|(cand, slot)| {
                let (conn, active) = match slot {
                    Slot::Active { conn, .. } => (conn, true),
                    Slot::Standby { conn, .. } => (conn, false),
                    _ => return None,
                };
                let c = self.conns.get(conn)?;
                let role = c.hello.as_ref()?.role;
                let there = c.established
                    && !c.closed
                    && now.saturating_duration_since(c.last_rx) < CHILD_SILENT;
                there.then_some((active, *cand, role))
            })
            .collect();
        out.sort_by_key(|&(active, _, _)| !active);
        out.into_iter().map(|(_, c, r)| (c, r)).collect()
    }

    /// Whether a new subscription from `asker` on `channel` is over the first-tier limit:
    /// the node serves `max_children` live children already, or the asker is a peer and a
    /// live relay child carries the channel (peers go to the relays; the first tier is for
    /// relays). A child that went silent or that membership shuns is not counted: a relay
    /// killed or cut off frees its place long before its connection times out, so the peers
    /// it served can fall back to this node.
    pub(super) fn over_first_tier(
        &self,
        now: Instant,
        asker: ConnectionHandle,
        channel: ChannelId,
    ) -> bool {
        let Some(max) = self.config.max_children else {
            return false;
        };
        if self.conns.get(&asker).is_some_and(|c| !c.served.is_empty()) {
            // Already a child: a changed subscription is no newcomer.
            return false;
        }
        let children = self
            .conns
            .values()
            .filter(|c| !c.served.is_empty() && self.live_child(now, c))
            .count();
        let asker_is_peer = self
            .conns
            .get(&asker)
            .and_then(|c| c.hello.as_ref())
            .is_none_or(|h| h.role == Role::Peer);
        let relay_carries = self
            .subscribers
            .get(&channel)
            .into_iter()
            .flatten()
            .any(|(h, sub)| {
                self.conns.get(h).is_some_and(|c| {
                    self.live_child(now, c)
                        && c.hello
                            .as_ref()
                            .is_some_and(|h| h.role == Role::Supernode && h.serves)
                        && c.served.get(sub).is_some_and(|s| !s.substreams.is_empty())
                })
            });
        children >= max || (asker_is_peer && relay_carries)
    }

    /// A child that is still there: open, heard from (at least an acknowledgement)
    /// within [`CHILD_SILENT`], and not shunned by membership (draining or suspected dead).
    fn live_child(&self, now: Instant, conn: &super::conn::Conn) -> bool {
        !conn.closed
            && now.saturating_duration_since(conn.last_rx) < CHILD_SILENT
            && conn
                .peer
                .is_none_or(|node| !self.membership.as_ref().is_some_and(|m| m.shunned(&node)))
    }

    /// Asks the parent on `handle` for more candidates for `channel`: when it first answers,
    /// and again every [`ASK_AGAIN`] while it stays a parent or standby (peer exchange: what
    /// it names changes as its children come and go).
    pub(super) fn ask_for_parents(
        &mut self,
        now: Instant,
        handle: ConnectionHandle,
        channel: ChannelId,
    ) {
        if self
            .upstreams
            .get(&channel)
            .is_none_or(|u| u.slot_of(handle).is_none())
        {
            return;
        }
        let due = self.conns.get(&handle).is_some_and(|c| {
            c.asked
                .is_none_or(|(_, _, at)| now.saturating_duration_since(at) >= ASK_AGAIN)
        });
        if !due {
            return;
        }
        self.next_sub += 1;
        let query = self.next_sub;
        if let Some(conn) = self.conns.get_mut(&handle) {
            conn.asked = Some((query, channel, now));
            conn.send_control(&Message::ParentQuery(ParentQuery {
                query,
                channel,
                max: ASK_FOR,
            }));
            super::conn::mark(&mut self.dirty, conn, handle);
        }
    }

    /// Asks every parent and standby of every channel whose last question is old.
    pub(super) fn ask_again(&mut self, now: Instant) {
        let due: Vec<(ConnectionHandle, ChannelId)> = self
            .upstreams
            .iter()
            .flat_map(|(channel, up)| {
                up.candidates
                    .iter()
                    .filter_map(move |(_, slot)| match slot {
                        Slot::Active { conn, .. } | Slot::Standby { conn, .. } => {
                            Some((*conn, *channel))
                        }
                        _ => None,
                    })
            })
            .collect();
        for (conn, channel) in due {
            self.ask_for_parents(now, conn, channel);
        }
    }

    /// Answers a parent query with what [`Engine::candidates_for`] knows.
    pub(super) fn answer_parent_query(
        &mut self,
        now: Instant,
        handle: ConnectionHandle,
        query: &ParentQuery,
    ) {
        let parents = self.candidates_for(now, handle, query.channel, usize::from(query.max));
        self.punch_for(handle, &parents);
        if let Some(conn) = self.conns.get_mut(&handle) {
            conn.send_control(&Message::ParentAnswer(ParentAnswer {
                query: query.query,
                parents,
            }));
        }
    }

    /// Adds the candidates a parent named, for the channel it was asked about.
    pub(super) fn take_parent_answer(&mut self, handle: ConnectionHandle, answer: &ParentAnswer) {
        let Some(conn) = self.conns.get(&handle) else {
            return;
        };
        let Some((query, channel, _)) = conn.asked else {
            return;
        };
        if query != answer.query {
            return;
        }
        let from = conn.node;
        let me = self.node;
        let parents = self.heard_of(conn.remote, &answer.parents);
        if let Some(up) = self.upstreams.get_mut(&channel) {
            up.add_alternatives(&parents, from, me);
        }
    }

    /// An open relay ([`super::EngineConfig::open`]) starts carrying a channel a subscriber
    /// asks for: it draws it with the relay policy from the members that carry it and the
    /// bootstrap nodes (which name carriers in their answers or refusals). False when the
    /// node is not open, is draining, or carries as many channels as it may.
    pub(super) fn open_channel(&mut self, now: Instant, channel: ChannelId) -> bool {
        let Some(open) = &self.config.open else {
            return false;
        };
        if self.draining || self.channels.len() >= open.max_channels {
            return false;
        }
        let mut candidates: Vec<Candidate> = self
            .gossip_carriers(&channel)
            .into_iter()
            .map(|c| Candidate {
                addr: c.addr,
                node: c.node,
            })
            .collect();
        for b in &open.bootstrap {
            if !candidates.iter().any(|c| c.node == b.node) {
                candidates.push(*b);
            }
        }
        self.add_channel(channel, ChannelMode::Relay);
        self.opened.insert(channel, None);
        self.upstream_start(now, channel, candidates);
        self.events.push_back(NodeEvent::ChannelOpened { channel });
        true
    }

    /// Drops the channels an open relay opened once nobody has subscribed to them for
    /// `idle_after`.
    pub(super) fn drop_idle_channels(&mut self, now: Instant) {
        let Some(idle_after) = self.config.open.as_ref().map(|o| o.idle_after) else {
            return;
        };
        let mut idle = Vec::new();
        for (channel, since) in &mut self.opened {
            // Watched: some subscriber heard from lately (a dead one still holds its
            // subscription until its connection times out).
            let watched = self.subscribers.get(channel).is_some_and(|l| {
                l.iter().any(|(h, _)| {
                    self.conns.get(h).is_some_and(|c| {
                        !c.closed && now.saturating_duration_since(c.last_rx) < CHILD_SILENT
                    })
                })
            });
            if watched {
                *since = None;
            } else if now.saturating_duration_since(*since.get_or_insert(now)) >= idle_after {
                idle.push(*channel);
            }
        }
        for channel in idle {
            self.drop_channel(now, channel);
        }
    }

    /// Stops carrying `channel`: its upstream connections close, its window goes, and the
    /// members hear of it.
    pub fn drop_channel(&mut self, now: Instant, channel: ChannelId) {
        if let Some(up) = self.upstreams.remove(&channel) {
            for (_, slot) in up.candidates {
                if let Slot::Active { conn, .. } | Slot::Standby { conn, .. } = slot
                    && let Some(c) = self.conns.get_mut(&conn)
                {
                    c.close(now, super::close_code::DONE, "channel dropped");
                    super::conn::mark(&mut self.dirty, c, conn);
                }
            }
        }
        let removed = self.channels.remove(&channel);
        if let Some(ch) = &removed {
            self.retired_channels.absorb(&ch.stats());
        }
        let was = removed.is_some();
        self.subscribers.remove(&channel);
        self.awaiting_info.remove(&channel);
        self.opened.remove(&channel);
        self.info_stale = true;
        if was {
            self.events.push_back(NodeEvent::ChannelClosed { channel });
        }
    }
}

/// Whether two addresses are on one network: the same /24 (IPv4) or /64 (IPv6).
fn same_network(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a.octets()[..3] == b.octets()[..3],
        (IpAddr::V6(a), IpAddr::V6(b)) => a.octets()[..8] == b.octets()[..8],
        _ => false,
    }
}

/// Orders carriers by the upload they have left, most first, in steps of a tenth of the
/// largest capacity among them, so that the order they came in (spread by asker) holds
/// among those alike. A carrier that declared no capacity counts as large as the largest
/// that did; when none did, this is the order of their load in tenths.
fn rank_by_spare_capacity(carriers: &mut [Carrier]) {
    let largest = carriers.iter().map(|c| c.capacity_bps).max().unwrap_or(0);
    let assumed = if largest == 0 { 1_000_000_000 } else { largest };
    let step = (assumed / 10).max(1);
    carriers.sort_by_key(|c| std::cmp::Reverse(c.spare_bps(assumed) / step));
}

#[cfg(test)]
mod tests {
    use super::{rank_by_spare_capacity, same_network};
    use crate::keys::NodeKey;
    use crate::node::directory::Carrier;

    #[test]
    fn networks_are_slash_24_and_slash_64() {
        let ip = |s: &str| s.parse().unwrap();
        assert!(same_network(ip("192.0.2.7"), ip("192.0.2.200")));
        assert!(!same_network(ip("192.0.2.7"), ip("192.0.3.7")));
        assert!(same_network(ip("2001:db8:1:2::1"), ip("2001:db8:1:2::ff")));
        assert!(!same_network(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1")));
        assert!(!same_network(ip("192.0.2.7"), ip("::ffff:192.0.2.7")));
    }

    #[test]
    fn carriers_with_more_upload_left_come_first_and_alike_keep_their_order() {
        let carrier = |i: u8, load_permille: u16, capacity_bps: u64| Carrier {
            node: NodeKey::from_seed(&[i; 32]).node_id(),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 5000 + u16::from(i))),
            also: Vec::new(),
            load_permille,
            capacity_bps,
        };
        // 10 Gbit/s half used has far more left than 1 Gbit/s idle; two alike keep the
        // order they came in (the per-asker spread); the undeclared counts as 10 Gbit/s.
        let mut list = vec![
            carrier(1, 0, 1_000_000_000),
            carrier(2, 500, 10_000_000_000),
            carrier(3, 900, 0),
            carrier(4, 520, 10_000_000_000),
        ];
        rank_by_spare_capacity(&mut list);
        let order: Vec<u8> = list
            .iter()
            .map(|c| (1..=4).find(|&i| carrier(i, 0, 0).node == c.node).unwrap())
            .collect();
        assert_eq!(order, vec![2, 4, 1, 3]);
        // None declared: the least loaded first, in tenths.
        let mut list = vec![carrier(1, 350, 0), carrier(2, 120, 0), carrier(3, 150, 0)];
        rank_by_spare_capacity(&mut list);
        assert_eq!(list[0].load_permille, 120);
        assert_eq!(list[2].load_permille, 350);
    }
}
