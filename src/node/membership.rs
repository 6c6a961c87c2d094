//! Membership among supernodes: who is up, where to dial them, and which channels each
//! carries. SWIM failure detection and dissemination come from `foca`, which has no clock and
//! no I/O of its own; this module gives it virtual time and hands its packets to the engine,
//! which carries them as QUIC datagrams on connections whose far end proved its node id.
//!
//! ```text
//!  engine datagram from a proven supernode ─▶ handle_data ─▶ foca ─▶ sends, timers, members
//!  handle_timeout(now) ─▶ foca timers due ─▶ sends
//!  set_info(channels, draining, load) ─▶ a new version of this node's NodeInfo, broadcast
//!  carriers(channel) ─▶ up members (neither suspect nor down) that carry it, not draining
//! ```
//!
//! Each node's [`NodeInfo`] is a foca custom broadcast, versioned, so a newer one replaces an
//! older one everywhere; it is re-broadcast every [`REFRESH`] so that nodes that joined since
//! learn it. A member's info is only ever taken from a member that foca lists: a node that has
//! gone is forgotten with its info. Sizes are bounded: [`MAX_INFO_CHANNELS`] channels per info,
//! [`MAX_MEMBERS`] members whose info is kept, and foca's own packet size.
//!
//! Pure: every input carries `now`; sends are pulled with [`Membership::poll_send`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foca::{
    AccumulatingRuntime, BroadcastHandler, Codec, Config, Foca, Identity, Invalidates,
    PostcardCodec, State, Timer,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

use crate::keys::{ChannelId, NodeId};

/// How often a node re-broadcasts its info, so that nodes that joined since learn it.
pub const REFRESH: Duration = Duration::from_secs(10);
/// Most channels one info may list.
pub const MAX_INFO_CHANNELS: usize = 256;
/// Most members whose info is kept.
pub const MAX_MEMBERS: usize = 4096;
/// Largest gossip packet: fits a QUIC datagram at the minimum path MTU (1200 bytes).
pub const MAX_PACKET: usize = 1100;

/// A member as foca knows it: its node id, where to dial it, and a bump that lets a node
/// that was declared down rejoin under the same id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemberId {
    node: [u8; 32],
    addr: SocketAddr,
    bump: u16,
}

impl MemberId {
    /// The member at `addr` holding `node`'s key.
    pub fn new(node: NodeId, addr: SocketAddr) -> Self {
        Self {
            node: *node.as_bytes(),
            addr,
            bump: 0,
        }
    }

    /// Its node id.
    pub fn node(&self) -> NodeId {
        NodeId::from_bytes(self.node)
    }

    /// Where to dial it.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Identity for MemberId {
    type Addr = [u8; 32];

    fn renew(&self) -> Option<Self> {
        Some(Self {
            bump: self.bump.wrapping_add(1),
            ..*self
        })
    }

    fn addr(&self) -> [u8; 32] {
        self.node
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// What a supernode tells the others about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    node: [u8; 32],
    /// Newer replaces older.
    version: u64,
    /// Channels carried.
    channels: Vec<[u8; 32]>,
    /// Draining: name it to nobody.
    draining: bool,
    /// Load in permille of its capacity.
    load_permille: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InfoKey {
    node: [u8; 32],
    version: u64,
}

impl Invalidates for InfoKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node && self.version > other.version
    }
}

/// Why a gossiped info was dropped.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    /// It did not decode.
    #[error("undecodable node info: {0}")]
    Decode(#[from] postcard::Error),
    /// It lists more channels than allowed.
    #[error("node info lists {0} channels (at most {MAX_INFO_CHANNELS})")]
    TooManyChannels(usize),
}

/// The infos received, newest per node. foca owns its broadcast handler and lends it to
/// nobody, so the map is shared with [`Membership`] (one thread uses both; the lock is never
/// contended).
#[derive(Debug, Default, Clone)]
struct Infos {
    by_node: Arc<Mutex<HashMap<[u8; 32], NodeInfo>>>,
}

impl BroadcastHandler<MemberId> for Infos {
    type Key = InfoKey;
    type Error = InfoError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&MemberId>,
    ) -> Result<Option<InfoKey>, InfoError> {
        let info: NodeInfo = postcard::from_bytes(data)?;
        if info.channels.len() > MAX_INFO_CHANNELS {
            return Err(InfoError::TooManyChannels(info.channels.len()));
        }
        let mut by_node = self.by_node.lock().unwrap_or_else(PoisonError::into_inner);
        let newer = by_node
            .get(&info.node)
            .is_none_or(|old| info.version > old.version);
        if !newer || (by_node.len() >= MAX_MEMBERS && !by_node.contains_key(&info.node)) {
            return Ok(None);
        }
        let key = InfoKey {
            node: info.node,
            version: info.version,
        };
        by_node.insert(info.node, info);
        Ok(Some(key))
    }
}

/// A supernode that carries a channel, as membership knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carrier {
    /// Its node id.
    pub node: NodeId,
    /// Where to dial it.
    pub addr: SocketAddr,
    /// Its load in permille.
    pub load_permille: u16,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MembershipStats {
    /// Gossip packets handed to foca.
    pub packets_in: u64,
    /// Gossip packets foca wanted sent.
    pub packets_out: u64,
    /// Packets foca refused (undecodable, bad info), or whose sender was not the node that
    /// carried them.
    pub rejected: u64,
}

/// foca with this node's info, virtual time and a send queue.
pub struct Membership {
    foca: Foca<MemberId, PostcardCodec, SmallRng, Infos>,
    runtime: AccumulatingRuntime<MemberId>,
    timers: BTreeMap<(Instant, u64), Timer<MemberId>>,
    timer_seq: u64,
    outbox: Vec<(MemberId, Bytes)>,
    infos: Infos,
    me: NodeInfo,
    refresh_at: Option<Instant>,
    stats: MembershipStats,
    /// Members that came up (`true`) or went down since the last poll.
    changes: Vec<(MemberId, bool)>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("me", &self.me.node)
            .field("members", &self.foca.num_members())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Timings for supernodes in one network: a dead member is probed within about a period and
/// declared down two seconds after it is first suspected, so it leaves every answer within
/// about 3-4 s (answers leave out suspects at once).
fn config() -> Config {
    // Sized for a fleet of a few dozen: each update and info is sent 6 times.
    let mut config = Config::new_lan(NonZeroU32::new(32).unwrap_or(NonZeroU32::MIN));
    config.probe_period = Duration::from_millis(500);
    config.probe_rtt = Duration::from_millis(250);
    config.suspect_to_down_after = Duration::from_secs(2);
    config.max_packet_size = NonZeroUsize::new(MAX_PACKET).unwrap_or(NonZeroUsize::MIN);
    config
}

impl Membership {
    /// Membership for the node `node` reachable at `addr`; `seed` makes it deterministic.
    pub fn new(node: NodeId, addr: SocketAddr, seed: u64) -> Self {
        let me = NodeInfo {
            node: *node.as_bytes(),
            version: 0,
            channels: Vec::new(),
            draining: false,
            load_permille: 0,
        };
        let infos = Infos::default();
        Self {
            foca: Foca::with_custom_broadcast(
                MemberId::new(node, addr),
                config(),
                SmallRng::seed_from_u64(seed),
                PostcardCodec,
                infos.clone(),
            ),
            infos,
            runtime: AccumulatingRuntime::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            outbox: Vec::new(),
            me,
            refresh_at: None,
            stats: MembershipStats::default(),
            changes: Vec::new(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> MembershipStats {
        self.stats
    }

    /// Members foca lists as active, this node excluded.
    pub fn members(&self) -> usize {
        self.foca.num_members()
    }

    /// Joins through `to` (any member): it answers with what it knows.
    pub fn announce(&mut self, now: Instant, to: MemberId) {
        let _ = self.foca.announce(to, &mut self.runtime);
        self.settle(now);
    }

    /// A gossip packet from `from` (the node id its connection proved). A packet whose foca
    /// header names another sender is dropped: nobody speaks for another node.
    pub fn handle_data(&mut self, now: Instant, from: NodeId, data: &[u8]) {
        let sender = PostcardCodec
            .decode_header(data)
            .ok()
            .map(|h: foca::Header<MemberId>| h.src.node);
        if sender != Some(*from.as_bytes()) {
            self.stats.rejected += 1;
            return;
        }
        self.stats.packets_in += 1;
        if self.foca.handle_data(data, &mut self.runtime).is_err() {
            self.stats.rejected += 1;
        }
        self.settle(now);
    }

    /// Fires the timers that are due, and the periodic refresh of this node's info.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((&(at, seq), _)) = self.timers.first_key_value() {
            if at > now {
                break;
            }
            if let Some(timer) = self.timers.remove(&(at, seq)) {
                let _ = self.foca.handle_timer(timer, &mut self.runtime);
            }
        }
        if self.refresh_at.is_some_and(|t| t <= now) {
            self.publish(now);
        }
        self.settle(now);
    }

    /// When [`Membership::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timer = self.timers.first_key_value().map(|(&(at, _), _)| at);
        timer.into_iter().chain(self.refresh_at).min()
    }

    /// The next gossip packet to send: to whom, where, what.
    pub fn poll_send(&mut self) -> Option<(NodeId, SocketAddr, Bytes)> {
        self.outbox
            .pop()
            .map(|(to, data)| (to.node(), to.addr, data))
    }

    /// The next member that came up (`true`) or went down.
    pub fn poll_change(&mut self) -> Option<(NodeId, SocketAddr, bool)> {
        if self.changes.is_empty() {
            return None;
        }
        let (m, up) = self.changes.remove(0);
        Some((m.node(), m.addr, up))
    }

    /// Tells the others what this node carries now (a new version of its info, at once).
    pub fn set_info(
        &mut self,
        now: Instant,
        channels: impl IntoIterator<Item = ChannelId>,
        draining: bool,
        load_permille: u16,
    ) {
        let mut list: Vec<[u8; 32]> = channels.into_iter().map(|c| *c.as_bytes()).collect();
        list.sort_unstable();
        list.truncate(MAX_INFO_CHANNELS);
        let same = list == self.me.channels
            && draining == self.me.draining
            && load_permille == self.me.load_permille;
        if same && self.refresh_at.is_some() {
            return;
        }
        self.me.channels = list;
        self.me.draining = draining;
        self.me.load_permille = load_permille.min(1000);
        self.publish(now);
    }

    fn publish(&mut self, now: Instant) {
        self.me.version += 1;
        if let Ok(data) = postcard::to_allocvec(&self.me) {
            let _ = self.foca.add_broadcast(&data);
        }
        self.refresh_at = Some(now + REFRESH);
        // Broadcasts ride the next messages; gossip now so that a change (a drain, a new
        // channel) spreads at once rather than at the next probe.
        let _ = self.foca.gossip(&mut self.runtime);
        self.settle(now);
    }

    /// Up members (neither suspected nor down) that carry `channel` and are not draining.
    pub fn carriers(&self, channel: &ChannelId) -> Vec<Carrier> {
        let infos = self
            .infos
            .by_node
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.foca
            .iter_members()
            .filter(|m| m.state() == State::Alive)
            .filter_map(|m| {
                let id = m.id();
                let info = infos.get(&id.node)?;
                (!info.draining && info.channels.contains(channel.as_bytes())).then(|| Carrier {
                    node: id.node(),
                    addr: id.addr,
                    load_permille: info.load_permille,
                })
            })
            .collect()
    }

    /// Whether `node` should be named to nobody: it is draining, or a member foca suspects
    /// or has declared down.
    pub fn shunned(&self, node: &NodeId) -> bool {
        let draining = self
            .infos
            .by_node
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node.as_bytes())
            .is_some_and(|i| i.draining);
        draining
            || self
                .foca
                .iter_membership_state()
                .any(|m| m.id().node == *node.as_bytes() && m.state() != State::Alive)
    }

    /// Whether foca lists `node` as up (alive or suspected).
    pub fn is_member(&self, node: &NodeId) -> bool {
        self.foca
            .iter_members()
            .any(|m| m.id().node == *node.as_bytes())
    }

    /// Moves what foca produced into the timer set and the send queue.
    fn settle(&mut self, now: Instant) {
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timer_seq += 1;
            self.timers.insert((now + after, self.timer_seq), timer);
        }
        while let Some((to, data)) = self.runtime.to_send() {
            self.stats.packets_out += 1;
            self.outbox.push((to, data));
        }
        while let Some(n) = self.runtime.to_notify() {
            match n {
                foca::OwnedNotification::MemberUp(m) => {
                    // A newcomer has none of the infos sent before it joined: send ours again
                    // soon rather than at the next refresh (the join-time pull foca leaves to
                    // the application, done as a push by everyone who sees it join).
                    if self.refresh_at.is_some() {
                        self.refresh_at = Some(now + Duration::from_millis(200));
                    }
                    self.changes.push((m, true));
                }
                foca::OwnedNotification::MemberDown(m) => self.changes.push((m, false)),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // one base instant; time moves by hand
    use super::*;
    use crate::keys::{ChannelKey, NodeKey};

    /// `n` memberships on a perfect in-memory network, all joined through the first.
    fn cluster(n: usize) -> (Vec<Membership>, Instant) {
        let t0 = Instant::now();
        let mut nodes: Vec<Membership> = (0..n)
            .map(|i| {
                let node = NodeKey::from_seed(&[i as u8 + 1; 32]).node_id();
                let addr = SocketAddr::from(([127, 0, 0, 1], 5000 + i as u16));
                Membership::new(node, addr, i as u64)
            })
            .collect();
        let first = MemberId::new(
            NodeId::from_bytes(nodes[0].me.node),
            SocketAddr::from(([127, 0, 0, 1], 5000)),
        );
        for m in nodes.iter_mut().skip(1) {
            m.announce(t0, first);
        }
        (nodes, t0)
    }

    /// Delivers every queued packet to live nodes and fires timers, in 50 ms steps.
    fn run(nodes: &mut [Membership], alive: &[bool], from: Instant, d: Duration) -> Instant {
        let ids: Vec<NodeId> = nodes
            .iter()
            .map(|m| NodeId::from_bytes(m.me.node))
            .collect();
        let mut now = from;
        let end = from + d;
        while now < end {
            for _ in 0..8 {
                let mut packets = Vec::new();
                for (i, m) in nodes.iter_mut().enumerate() {
                    while let Some((to, _, data)) = m.poll_send() {
                        packets.push((ids[i], to, data));
                    }
                }
                if packets.is_empty() {
                    break;
                }
                for (from_id, to, data) in packets {
                    if let Some(j) = ids.iter().position(|id| *id == to)
                        && alive[j]
                        && alive[ids.iter().position(|id| *id == from_id).unwrap_or(0)]
                    {
                        nodes[j].handle_data(now, from_id, &data);
                    }
                }
            }
            now += Duration::from_millis(50);
            for (i, m) in nodes.iter_mut().enumerate() {
                if alive[i] {
                    m.handle_timeout(now);
                }
            }
        }
        now
    }

    #[test]
    fn members_learn_each_other_and_what_they_carry_and_lose_the_dead_within_five_seconds() {
        let (mut nodes, t0) = cluster(6);
        let channel = ChannelKey::from_seed(&[7; 32]).channel_id();
        for m in nodes.iter_mut().skip(2) {
            m.set_info(t0, [channel], false, 100);
        }
        let mut alive = vec![true; 6];
        let now = run(&mut nodes, &alive, t0, Duration::from_secs(3));
        for m in &nodes {
            assert_eq!(m.members(), 5, "everyone knows everyone");
        }
        assert_eq!(nodes[0].carriers(&channel).len(), 4);
        // Node 5 dies; node 4 drains.
        alive[5] = false;
        nodes[4].set_info(now, [channel], true, 100);
        let after = run(&mut nodes, &alive, now, Duration::from_millis(500));
        let carriers: Vec<NodeId> = nodes[0].carriers(&channel).iter().map(|c| c.node).collect();
        assert!(
            !carriers.contains(&NodeId::from_bytes(nodes[4].me.node)),
            "draining still named"
        );
        let dead = NodeId::from_bytes(nodes[5].me.node);
        let mut gone_after = None;
        let mut t = after;
        for step in 0..10 {
            t = run(&mut nodes, &alive, t, Duration::from_millis(500));
            let named = (0..5).any(|i| nodes[i].carriers(&channel).iter().any(|c| c.node == dead));
            if !named {
                gone_after = Some(Duration::from_millis(500) * (step + 2));
                break;
            }
        }
        let gone_after = gone_after.expect("a dead member is still named after 5.5 s");
        assert!(gone_after <= Duration::from_secs(5), "{gone_after:?}");
    }

    #[test]
    fn a_packet_that_speaks_for_another_node_is_dropped() {
        let (mut nodes, t0) = cluster(2);
        let (_, _, data) = nodes[1].poll_send().expect("an announce");
        let impostor = NodeKey::from_seed(&[99; 32]).node_id();
        nodes[0].handle_data(t0, impostor, &data);
        assert_eq!(nodes[0].stats().rejected, 1);
        assert_eq!(nodes[0].members(), 0);
        let honest = NodeId::from_bytes(nodes[1].me.node);
        nodes[0].handle_data(t0, honest, b"garbage");
        assert_eq!(nodes[0].stats().rejected, 2);
    }
}
