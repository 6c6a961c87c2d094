//! Membership among supernodes: who is up, where to dial them, and which channels each
//! carries. SWIM failure detection and dissemination come from `foca`, which has no clock and
//! no I/O of its own; this module gives it virtual time and hands its packets to the engine,
//! which carries them as QUIC datagrams on connections whose far end proved its node id.
//!
//! ```text
//!  engine datagram from a proven supernode ─▶ handle_data ─▶ foca ─▶ sends, timers, members
//!  handle_timeout(now) ─▶ foca timers due ─▶ sends
//!  set_info(advert) ─▶ a new version of this node's NodeInfo, signed, broadcast
//!  carriers(channel) ─▶ up members (neither suspect nor down) that carry it, not draining
//! ```
//!
//! It is the [`Directory`] every real node runs. The foca packets ride connections that
//! proved the sender's node id, and a packet whose header names another sender is dropped.
//! An info, though, is relayed from member to member, so each is signed with its node's key
//! and names the address the node is dialled at: a member can pass another's info on but
//! cannot forge one (mark a rival as draining, or claim a channel in its name), and a member
//! that foca lists at an address other than its own info's is never named.
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

use crate::keys::{ChannelId, NodeId, NodeKey};
pub use crate::node::directory::{Advert, Carrier, Directory, MAX_ALSO, MembershipStats};

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

/// What a supernode tells the others about itself. It travels signed by the node's key
/// ([`SignedInfo`]), so a member can relay another's info but never forge or alter it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    node: [u8; 32],
    /// Newer replaces older.
    version: u64,
    /// Where it is dialled: a member that foca lists at another address is not named.
    addr: SocketAddr,
    /// Channels carried.
    channels: Vec<[u8; 32]>,
    /// Draining: name it to nobody.
    draining: bool,
    /// Load in permille of its capacity.
    load_permille: u16,
    /// Declared upload capacity in bits per second (0: not declared).
    capacity_bps: u64,
    /// Other addresses it is reached at (at most [`MAX_ALSO`] are used).
    also: Vec<SocketAddr>,
}

/// A [`NodeInfo`] as gossiped: its encoding and the node's Ed25519 signature over it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SignedInfo {
    body: Vec<u8>,
    /// 64 bytes (serde derives arrays up to 32 only).
    signature: Vec<u8>,
}

/// What the signature covers: a context string, then the info's encoding.
fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(INFO_CONTEXT.len() + body.len());
    message.extend_from_slice(INFO_CONTEXT);
    message.extend_from_slice(body);
    message
}

const INFO_CONTEXT: &[u8] = b"gridcast node info v1\0";

/// Largest encoded info accepted: every channel listed and some room.
const MAX_INFO_BYTES: usize = MAX_INFO_CHANNELS * 33 + MAX_ALSO * 24 + 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InfoKey {
    node: [u8; 32],
    version: u64,
}

impl Invalidates for InfoKey {
    fn invalidates(&self, other: &Self) -> bool {
        // An equal version replaces the queued one: a refresh of an info is sent afresh.
        self.node == other.node && self.version >= other.version
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
    /// It is larger than any honest info.
    #[error("node info of {0} bytes (at most {MAX_INFO_BYTES})")]
    TooLarge(usize),
    /// Its signature is not its node's.
    #[error("node info not signed by its node")]
    BadSignature,
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
        sender: Option<&MemberId>,
    ) -> Result<Option<InfoKey>, InfoError> {
        let signed: SignedInfo = postcard::from_bytes(data)?;
        if signed.body.len() > MAX_INFO_BYTES {
            return Err(InfoError::TooLarge(signed.body.len()));
        }
        let info: NodeInfo = postcard::from_bytes(&signed.body)?;
        if info.channels.len() > MAX_INFO_CHANNELS {
            return Err(InfoError::TooManyChannels(info.channels.len()));
        }
        let mut by_node = self.by_node.lock().unwrap_or_else(PoisonError::into_inner);
        // This node's own info comes with no sender, and its refresh is the version the
        // members already hold: queued again for whoever joined since, and verified by none
        // of those that hold it.
        let local = sender.is_none();
        let newer = by_node
            .get(&info.node)
            .is_none_or(|old| info.version > old.version || (local && info.version == old.version));
        if !newer || (by_node.len() >= MAX_MEMBERS && !by_node.contains_key(&info.node)) {
            return Ok(None);
        }
        // Checked only for an info that would be kept: one verification per new version.
        let signature: &[u8; 64] = signed
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| InfoError::BadSignature)?;
        if !NodeId::from_bytes(info.node).verify(&signed_message(&signed.body), signature) {
            return Err(InfoError::BadSignature);
        }
        let key = InfoKey {
            node: info.node,
            version: info.version,
        };
        by_node.insert(info.node, info);
        Ok(Some(key))
    }
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
    key: NodeKey,
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
    /// Membership for the node holding `key`, reachable at `addr`; `seed` makes it
    /// deterministic. `started_us` is the wall clock at start, in microseconds since the Unix
    /// epoch: this node's info versions count up from it. The members keep each node's newest
    /// info, so a node started again with its key (an upgrade, a restart after a drain) must
    /// publish versions newer than any its last run reached, or they keep that run's info (a
    /// drain's, which names it to nobody). A run publishes far fewer infos than it lasts
    /// microseconds.
    pub fn new(key: &NodeKey, addr: SocketAddr, seed: u64, started_us: u64) -> Self {
        let node = key.node_id();
        let me = NodeInfo {
            node: *node.as_bytes(),
            version: started_us,
            addr,
            channels: Vec::new(),
            draining: false,
            load_permille: 0,
            capacity_bps: 0,
            also: Vec::new(),
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
            key: key.clone(),
            refresh_at: None,
            stats: MembershipStats::default(),
            changes: Vec::new(),
        }
    }

    /// Broadcasts this node's info: a new version when it changed, the same one again on a
    /// refresh (the members that hold it drop it unverified; members that joined since take
    /// it).
    fn publish(&mut self, now: Instant, changed: bool) {
        if changed {
            self.me.version += 1;
        }
        if let Ok(body) = postcard::to_allocvec(&self.me) {
            let signature = self.key.sign(&signed_message(&body)).to_vec();
            if let Ok(data) = postcard::to_allocvec(&SignedInfo { body, signature }) {
                let _ = self.foca.add_broadcast(&data);
            }
        }
        self.refresh_at = Some(now + REFRESH);
        // Broadcasts ride the next messages; gossip now so that a change (a drain, a new
        // channel) spreads at once rather than at the next probe.
        let _ = self.foca.gossip(&mut self.runtime);
        self.settle(now);
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

impl Directory for Membership {
    fn announce(&mut self, now: Instant, node: NodeId, addr: SocketAddr) {
        let _ = self
            .foca
            .announce(MemberId::new(node, addr), &mut self.runtime);
        self.settle(now);
    }

    /// A packet whose foca header names another sender than the proven `from` is dropped:
    /// nobody speaks for another node.
    fn handle_data(&mut self, now: Instant, from: NodeId, data: &[u8]) {
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
    fn handle_timeout(&mut self, now: Instant) {
        while let Some((&(at, seq), _)) = self.timers.first_key_value() {
            if at > now {
                break;
            }
            if let Some(timer) = self.timers.remove(&(at, seq)) {
                let _ = self.foca.handle_timer(timer, &mut self.runtime);
            }
        }
        if self.refresh_at.is_some_and(|t| t <= now) {
            self.publish(now, false);
        }
        self.settle(now);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let timer = self.timers.first_key_value().map(|(&(at, _), _)| at);
        timer.into_iter().chain(self.refresh_at).min()
    }

    fn poll_send(&mut self) -> Option<(NodeId, SocketAddr, Bytes)> {
        self.outbox
            .pop()
            .map(|(to, data)| (to.node(), to.addr, data))
    }

    fn poll_change(&mut self) -> Option<(NodeId, SocketAddr, bool)> {
        if self.changes.is_empty() {
            return None;
        }
        let (m, up) = self.changes.remove(0);
        Some((m.node(), m.addr, up))
    }

    /// A new version of this node's info goes out at once when anything changed.
    fn set_info(&mut self, now: Instant, advert: Advert) {
        let mut list: Vec<[u8; 32]> = advert.channels.iter().map(|c| *c.as_bytes()).collect();
        list.sort_unstable();
        list.truncate(MAX_INFO_CHANNELS);
        let load_permille = advert.load_permille.min(1000);
        let mut also = advert.also;
        also.truncate(MAX_ALSO);
        let same = list == self.me.channels
            && advert.draining == self.me.draining
            && load_permille == self.me.load_permille
            && advert.capacity_bps == self.me.capacity_bps
            && also == self.me.also;
        if same && self.refresh_at.is_some() {
            return;
        }
        self.me.channels = list;
        self.me.draining = advert.draining;
        self.me.load_permille = load_permille;
        self.me.capacity_bps = advert.capacity_bps;
        self.me.also = also;
        self.publish(now, true);
    }

    /// A member counts when foca lists it alive at the address its own signed info gives.
    fn carriers(&self, channel: &ChannelId) -> Vec<Carrier> {
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
                (info.addr == id.addr
                    && !info.draining
                    && info.channels.contains(channel.as_bytes()))
                .then(|| Carrier {
                    node: id.node(),
                    addr: id.addr,
                    also: info.also.iter().take(MAX_ALSO).copied().collect(),
                    load_permille: info.load_permille,
                    capacity_bps: info.capacity_bps,
                })
            })
            .collect()
    }

    fn shunned(&self, node: &NodeId) -> bool {
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

    fn is_member(&self, node: &NodeId) -> bool {
        self.foca
            .iter_members()
            .any(|m| m.id().node == *node.as_bytes())
    }

    fn members(&self) -> usize {
        self.foca.num_members()
    }

    fn stats(&self) -> MembershipStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // one base instant; time moves by hand
    use super::*;
    use crate::keys::{ChannelKey, NodeKey};

    /// The wall clock the test clusters start at (µs since the Unix epoch).
    const STARTED_US: u64 = 1_796_000_000_000_000;

    /// `n` memberships on a perfect in-memory network, all joined through the first.
    fn cluster(n: usize) -> (Vec<Membership>, Instant) {
        let t0 = Instant::now();
        let mut nodes: Vec<Membership> = (0..n)
            .map(|i| {
                let key = NodeKey::from_seed(&[i as u8 + 1; 32]);
                let addr = SocketAddr::from(([127, 0, 0, 1], 5000 + i as u16));
                Membership::new(&key, addr, i as u64, STARTED_US)
            })
            .collect();
        let first = MemberId::new(
            NodeId::from_bytes(nodes[0].me.node),
            SocketAddr::from(([127, 0, 0, 1], 5000)),
        );
        for m in nodes.iter_mut().skip(1) {
            m.announce(t0, first.node(), first.addr());
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

    fn advert(channel: ChannelId, draining: bool) -> Advert {
        Advert {
            channels: vec![channel],
            draining,
            load_permille: 100,
            capacity_bps: 50_000_000,
            // Another family, and more than are announced: the extra is not.
            also: (1..=4)
                .map(|i| SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, i], 5000)))
                .collect(),
        }
    }

    #[test]
    fn members_learn_each_other_and_what_they_carry_and_lose_the_dead_within_five_seconds() {
        let (mut nodes, t0) = cluster(6);
        let channel = ChannelKey::from_seed(&[7; 32]).channel_id();
        for m in nodes.iter_mut().skip(2) {
            m.set_info(t0, advert(channel, false));
        }
        let mut alive = vec![true; 6];
        let now = run(&mut nodes, &alive, t0, Duration::from_secs(3));
        for m in &nodes {
            assert_eq!(m.members(), 5, "everyone knows everyone");
        }
        let carriers = nodes[0].carriers(&channel);
        assert_eq!(carriers.len(), 4);
        assert!(carriers.iter().all(|c| c.capacity_bps == 50_000_000));
        // Their other addresses travel signed with their infos, at most MAX_ALSO of them.
        assert!(
            carriers
                .iter()
                .all(|c| c.also.len() == MAX_ALSO && c.also[0].is_ipv6())
        );
        // Node 5 dies; node 4 drains.
        alive[5] = false;
        nodes[4].set_info(now, advert(channel, true));
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
    fn a_member_restarted_with_its_key_is_named_again_after_it_drained() {
        // A relay runs a while (its info at some version), drains on SIGTERM (a newer version,
        // draining) and is started again with the same node key: the others must take the
        // restarted relay's infos, not keep the old draining one.
        let (mut nodes, t0) = cluster(3);
        let channel = ChannelKey::from_seed(&[7; 32]).channel_id();
        nodes[2].set_info(t0, advert(channel, false));
        let mut now = run(&mut nodes, &[true; 3], t0, Duration::from_secs(3));
        // Ten minutes of refreshes.
        for _ in 0..60 {
            now = run(&mut nodes, &[true; 3], now, REFRESH);
        }
        let ran = now - t0;
        nodes[2].set_info(now, advert(channel, true));
        now = run(&mut nodes, &[true; 3], now, Duration::from_secs(1));
        let relay = NodeId::from_bytes(nodes[2].me.node);
        assert!(
            nodes[0].carriers(&channel).is_empty(),
            "draining still named"
        );
        // Stopped, and started again a second later with the same key and address.
        now = run(
            &mut nodes,
            &[true, true, false],
            now,
            Duration::from_secs(1),
        );
        let key = NodeKey::from_seed(&[3; 32]);
        let again = STARTED_US + (ran + Duration::from_secs(2)).as_micros() as u64;
        nodes[2] = Membership::new(&key, SocketAddr::from(([127, 0, 0, 1], 5002)), 77, again);
        let first = NodeId::from_bytes(nodes[0].me.node);
        nodes[2].announce(now, first, SocketAddr::from(([127, 0, 0, 1], 5000)));
        nodes[2].set_info(now, advert(channel, false));
        now = run(&mut nodes, &[true; 3], now, Duration::from_secs(3));
        let named: Vec<NodeId> = nodes[0].carriers(&channel).iter().map(|c| c.node).collect();
        assert_eq!(named, vec![relay], "the restarted relay is not named");
        let _ = now;
    }

    #[test]
    fn a_refresh_reaches_a_late_member_and_costs_the_others_no_new_version() {
        // Every REFRESH each node sends its info again. The members that hold it must not
        // take it as a new version (each would verify its signature again, every 10 s for
        // every member); a member that joins later must still learn it.
        let (mut nodes, t0) = cluster(4);
        let channel = ChannelKey::from_seed(&[7; 32]).channel_id();
        nodes[1].set_info(t0, advert(channel, false));
        let alive = [true, true, true, false];
        let mut now = run(&mut nodes, &alive, t0, Duration::from_secs(3));
        let node1 = nodes[1].me.node;
        let held = |m: &Membership| {
            m.infos
                .by_node
                .lock()
                .unwrap()
                .get(&node1)
                .map(|i| i.version)
        };
        let version = held(&nodes[0]).expect("node 1's info");
        let sent = nodes[1].stats().packets_out;
        for _ in 0..3 {
            now = run(&mut nodes, &alive, now, REFRESH);
        }
        assert!(nodes[1].stats().packets_out > sent);
        assert_eq!(
            held(&nodes[0]),
            Some(version),
            "a refresh taken as a new version"
        );
        assert_eq!(held(&nodes[2]), Some(version));
        // Node 3 joins now, long after node 1's info went out.
        let first = NodeId::from_bytes(nodes[0].me.node);
        nodes[3].announce(now, first, SocketAddr::from(([127, 0, 0, 1], 5000)));
        now = run(&mut nodes, &[true; 4], now, Duration::from_secs(3));
        let named: Vec<NodeId> = nodes[3].carriers(&channel).iter().map(|c| c.node).collect();
        assert_eq!(
            named,
            vec![NodeId::from_bytes(node1)],
            "the late member never learnt it"
        );
        assert_eq!(held(&nodes[3]), Some(version));
        let _ = now;
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

    #[test]
    fn an_info_is_kept_only_when_its_own_node_signed_it() {
        let key = NodeKey::from_seed(&[1; 32]);
        let other = NodeKey::from_seed(&[2; 32]);
        let info = NodeInfo {
            node: *key.node_id().as_bytes(),
            version: 1,
            addr: SocketAddr::from(([127, 0, 0, 1], 5000)),
            channels: vec![[7; 32]],
            draining: true,
            load_permille: 0,
            capacity_bps: 0,
            also: vec![SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 5000))],
        };
        let encode = |info: &NodeInfo, signer: &NodeKey, flip: bool| {
            let mut body = postcard::to_allocvec(info).unwrap();
            let signature = signer.sign(&signed_message(&body)).to_vec();
            if flip {
                let last = body.len() - 1;
                body[last] ^= 1;
            }
            postcard::to_allocvec(&SignedInfo { body, signature }).unwrap()
        };
        let mut infos = Infos::default();
        // Another member speaking for this node (marking it as draining), or an honest info
        // altered on the way: both refused.
        let forged = encode(&info, &other, false);
        assert!(matches!(
            infos.receive_item(&forged, None),
            Err(InfoError::BadSignature)
        ));
        let altered = encode(&info, &key, true);
        assert!(infos.receive_item(&altered, None).is_err());
        assert!(infos.by_node.lock().unwrap().is_empty());
        let honest = encode(&info, &key, false);
        assert!(matches!(infos.receive_item(&honest, None), Ok(Some(_))));
        // The same version again is not news from another member; from this node itself (no
        // sender) it is its refresh, queued again.
        let member = MemberId::new(key.node_id(), info.addr);
        assert!(matches!(
            infos.receive_item(&honest, Some(&member)),
            Ok(None)
        ));
        assert!(matches!(infos.receive_item(&honest, None), Ok(Some(_))));
    }
}
