//! A deterministic grid simulator: real [`Engine`]s exchanging real QUIC datagrams over a
//! simulated network with virtual time.
//!
//! ```text
//!   step(): every live node's poll_transmit ─▶ links (uplink bandwidth, latency, seeded loss)
//!           ─▶ in-flight queue ordered by arrival
//!           virtual clock jumps to min(next arrival, next node timeout)
//!           arrivals ─▶ handle_datagram; due timers ─▶ handle_timeout; events collected
//! ```
//!
//! Time never waits for the wall clock: minutes of stream time run in seconds. The network's
//! randomness (loss) comes from one seeded RNG, so a scenario replays identically for a seed
//! (TLS key shares are still random, but they do not change packet sizes or timing). A node can
//! be killed (it stops at once, without a goodbye) and links can be partitioned. Every run is
//! bounded by a step limit so a livelock fails loudly instead of hanging.
//!
//! Modelled on quinn-proto's own test `Pair`, extended to any number of nodes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::keys::{NodeId, NodeKey};
use crate::node::{Engine, EngineConfig, EngineError, NodeEvent};

/// Properties of the path from one node to another.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkConfig {
    /// One-way delay.
    pub latency: Duration,
    /// Probability that a datagram is lost.
    pub loss: f64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(10),
            loss: 0.0,
        }
    }
}

/// Simulator settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed for the network's randomness.
    pub seed: u64,
    /// Link used between any two nodes unless overridden.
    pub link: LinkConfig,
    /// Most steps before the simulation declares a livelock.
    pub max_steps: u64,
    /// Membership among the supernodes through one shared in-memory table instead of gossip
    /// (see [`crate::node::directory`]); `None`: the real gossip over the simulated network.
    pub directory: Option<crate::node::directory::Board>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            link: LinkConfig::default(),
            max_steps: 50_000_000,
            directory: None,
        }
    }
}

/// The simulation stopped abnormally.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// More steps than [`SimConfig::max_steps`].
    #[error("step limit of {0} reached: livelock?")]
    StepLimit(u64),
}

/// Network counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Datagrams sent by any node.
    pub datagrams: u64,
    /// Datagram bytes sent by any node.
    pub bytes: u64,
    /// Datagrams lost to random loss.
    pub lost: u64,
    /// Datagrams dropped because the queue in front of a node's capped uplink or downlink
    /// was full ([`Sim::set_uplink_queue`], [`Sim::set_downlink`]).
    pub queue_drops: u64,
    /// Datagrams dropped because the receiver was dead or partitioned away.
    pub undeliverable: u64,
    /// Steps taken.
    pub steps: u64,
}

/// Index of a node in the simulation.
pub type NodeIx = usize;

/// One simulated node.
#[derive(Debug)]
pub struct SimNode {
    /// The engine under test.
    pub engine: Engine,
    /// Its address.
    pub addr: SocketAddr,
    /// Its id.
    pub id: NodeId,
    alive: bool,
    /// What leaves the node.
    uplink: Shaper,
    /// What reaches the node.
    downlink: Shaper,
    /// UDP payload bytes this node sent.
    pub bytes_sent: u64,
    /// Datagrams this node sent.
    pub datagrams_sent: u64,
    events: Vec<(Instant, NodeEvent)>,
}

/// A link of limited rate with a queue in front of it, as at a bottleneck.
#[derive(Debug)]
struct Shaper {
    /// Bytes per second (`None`: unlimited, and nothing waits).
    rate: Option<u64>,
    /// Most bytes waiting (`None`: no limit); a datagram that would go past it is dropped, as
    /// a router's drop-tail queue does.
    queue: Option<u64>,
    /// When the datagrams already taken will have gone.
    free: Instant,
}

impl Shaper {
    fn new(now: Instant) -> Self {
        Self {
            rate: None,
            queue: None,
            free: now,
        }
    }

    /// When a datagram of `len` bytes that reaches the link at `at` has gone through it, or
    /// `None` if the queue has no room for it.
    fn pass(&mut self, at: Instant, len: usize) -> Option<Instant> {
        let Some(rate) = self.rate else {
            return Some(at);
        };
        if let Some(limit) = self.queue {
            let waiting = self.free.saturating_duration_since(at);
            let queued = (waiting.as_nanos() * u128::from(rate) / 1_000_000_000) as u64;
            if queued + len as u64 > limit {
                return None;
            }
        }
        let start = self.free.max(at);
        self.free = start + Duration::from_nanos(len as u64 * 1_000_000_000 / rate.max(1));
        Some(self.free)
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Instant,
    order: u64,
    from: NodeIx,
    to: NodeIx,
    /// The address it was sent to: the receiver's when it was sent, which it may since have
    /// lost ([`Sim::renumber`]).
    to_addr: SocketAddr,
    data: Vec<u8>,
}

/// The simulated network and its nodes.
#[derive(Debug)]
pub struct Sim {
    config: SimConfig,
    start: Instant,
    now: Instant,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, NodeIx>,
    links: HashMap<(NodeIx, NodeIx), LinkConfig>,
    partitioned: HashSet<(NodeIx, NodeIx)>,
    queue: BinaryHeap<Reverse<InFlight>>,
    rng: SmallRng,
    order: u64,
    stats: SimStats,
    buf: Vec<u8>,
}

impl Sim {
    /// An empty network whose clock starts at `start`.
    pub fn new(start: Instant, config: SimConfig) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(config.seed),
            config,
            start,
            now: start,
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            links: HashMap::new(),
            partitioned: HashSet::new(),
            queue: BinaryHeap::new(),
            order: 0,
            stats: SimStats::default(),
            buf: Vec::with_capacity(64 * 1024),
        }
    }

    /// Adds a node with a key derived from its index; its address is 10.0.x.y:4433 (and what it
    /// advertises, unless its config says otherwise).
    pub fn add_node(&mut self, mut config: EngineConfig) -> Result<NodeIx, EngineError> {
        let ix = self.nodes.len();
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(ix as u64 + 1).to_le_bytes());
        seed[8..16].copy_from_slice(&self.config.seed.to_le_bytes());
        let key = NodeKey::from_seed(&seed);
        config.rng_seed.get_or_insert(seed);
        let addr = SocketAddr::from((
            Ipv4Addr::new(10, 0, (ix >> 8) as u8, (ix & 0xff) as u8 + 1),
            4433,
        ));
        // Supernodes and sources know where others dial them, so they join the membership.
        config.advertise.get_or_insert(addr);
        if config.directory.is_none() {
            config.directory.clone_from(&self.config.directory);
        }
        let engine = Engine::new(&key, config)?;
        self.by_addr.insert(addr, ix);
        self.nodes.push(SimNode {
            id: engine.node_id(),
            engine,
            addr,
            alive: true,
            uplink: Shaper::new(self.now),
            downlink: Shaper::new(self.now),
            bytes_sent: 0,
            datagrams_sent: 0,
            events: Vec::new(),
        });
        Ok(ix)
    }

    /// The current virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Network counters.
    pub fn stats(&self) -> SimStats {
        self.stats
    }

    /// A node.
    pub fn node(&self, ix: NodeIx) -> &SimNode {
        &self.nodes[ix]
    }

    /// A node, mutably (to issue commands; call them with [`Sim::now`]).
    pub fn node_mut(&mut self, ix: NodeIx) -> &mut SimNode {
        &mut self.nodes[ix]
    }

    /// Whether a node is alive.
    pub fn is_alive(&self, ix: NodeIx) -> bool {
        self.nodes[ix].alive
    }

    /// Overrides the link from `a` to `b` (one direction).
    pub fn set_link(&mut self, a: NodeIx, b: NodeIx, link: LinkConfig) {
        self.links.insert((a, b), link);
    }

    /// Sets every link's loss probability.
    pub fn set_loss_everywhere(&mut self, loss: f64) {
        self.config.link.loss = loss;
        for link in self.links.values_mut() {
            link.loss = loss;
        }
    }

    /// Limits a node's uplink to `bytes_per_sec`.
    pub fn set_uplink(&mut self, ix: NodeIx, bytes_per_sec: Option<u64>) {
        self.nodes[ix].uplink.rate = bytes_per_sec;
    }

    /// Bounds the bytes waiting for a node's capped uplink (see [`Sim::set_uplink`]): past
    /// `bytes` a datagram is dropped (`None`: the queue never overflows). The default is no
    /// bound, so a burst only waits; a real bottleneck holds a few tens of milliseconds.
    pub fn set_uplink_queue(&mut self, ix: NodeIx, bytes: Option<u64>) {
        self.nodes[ix].uplink.queue = bytes;
    }

    /// Limits what reaches a node to `bytes_per_sec`, behind a queue of at most `queue` bytes
    /// (`None`: unlimited), as an access link does. A datagram joins the queue when it
    /// arrives, in the order datagrams are sent: with links of different delays into one
    /// node, one may queue behind another sent before it that arrives after it.
    pub fn set_downlink(&mut self, ix: NodeIx, bytes_per_sec: Option<u64>, queue: Option<u64>) {
        let downlink = &mut self.nodes[ix].downlink;
        downlink.rate = bytes_per_sec;
        downlink.queue = queue;
    }

    /// Cuts (or restores) both directions between `a` and `b`.
    pub fn partition(&mut self, a: NodeIx, b: NodeIx, cut: bool) {
        for pair in [(a, b), (b, a)] {
            if cut {
                self.partitioned.insert(pair);
            } else {
                self.partitioned.remove(&pair);
            }
        }
    }

    /// Gives a node a new address and takes the old one away, as a new DHCP lease or a NAT
    /// rebinding does: what it sends from now on comes from `to`, and what is sent (or still
    /// in flight) to the old address is lost.
    pub fn renumber(&mut self, ix: NodeIx, to: SocketAddr) {
        let old = self.nodes[ix].addr;
        self.by_addr.remove(&old);
        self.by_addr.insert(to, ix);
        self.nodes[ix].addr = to;
    }

    /// Kills a node: it stops at once, sends nothing more (no goodbye), and receives nothing.
    pub fn kill(&mut self, ix: NodeIx) {
        self.nodes[ix].alive = false;
    }

    /// Takes the events a node emitted so far, with the virtual time of each.
    pub fn take_events(&mut self, ix: NodeIx) -> Vec<(Instant, NodeEvent)> {
        std::mem::take(&mut self.nodes[ix].events)
    }

    /// Sends everything every live node wants to send now.
    fn flush(&mut self) {
        let now = self.now;
        for ix in 0..self.nodes.len() {
            if !self.nodes[ix].alive {
                continue;
            }
            loop {
                let mut buf = std::mem::take(&mut self.buf);
                let Some(t) = self.nodes[ix].engine.poll_transmit(now, &mut buf) else {
                    self.buf = buf;
                    break;
                };
                let data = &buf[..t.size];
                let segment = t.segment_size.unwrap_or(t.size).max(1);
                for datagram in data.chunks(segment) {
                    self.send(ix, t.destination, datagram.to_vec());
                }
                self.buf = buf;
            }
        }
    }

    fn send(&mut self, from: NodeIx, to_addr: SocketAddr, data: Vec<u8>) {
        self.stats.datagrams += 1;
        self.stats.bytes += data.len() as u64;
        let node = &mut self.nodes[from];
        node.bytes_sent += data.len() as u64;
        node.datagrams_sent += 1;
        let Some(depart) = node.uplink.pass(self.now, data.len()) else {
            self.stats.queue_drops += 1;
            return;
        };
        let Some(&to) = self.by_addr.get(&to_addr) else {
            self.stats.undeliverable += 1;
            return;
        };
        let link = self
            .links
            .get(&(from, to))
            .copied()
            .unwrap_or(self.config.link);
        if link.loss > 0.0 && self.rng.random_bool(link.loss.min(1.0)) {
            self.stats.lost += 1;
            return;
        }
        let Some(at) = self.nodes[to]
            .downlink
            .pass(depart + link.latency, data.len())
        else {
            self.stats.queue_drops += 1;
            return;
        };
        self.order += 1;
        self.queue.push(Reverse(InFlight {
            at,
            order: self.order,
            from,
            to,
            to_addr,
            data,
        }));
    }

    fn next_wakeup(&mut self) -> Option<Instant> {
        let arrival = self.queue.peek().map(|Reverse(p)| p.at);
        let timers = self
            .nodes
            .iter_mut()
            .filter(|n| n.alive)
            .filter_map(|n| n.engine.poll_timeout())
            .min();
        match (arrival, timers) {
            (Some(a), Some(t)) => Some(a.min(t)),
            (a, t) => a.or(t),
        }
    }

    /// Advances to the next wake-up (no further than `limit`) and processes it. Returns false
    /// when nothing is due before `limit`.
    fn step(&mut self, limit: Instant) -> Result<bool, SimError> {
        self.stats.steps += 1;
        if self.stats.steps > self.config.max_steps {
            return Err(SimError::StepLimit(self.config.max_steps));
        }
        self.flush();
        let Some(next) = self.next_wakeup() else {
            return Ok(false);
        };
        if next > limit {
            return Ok(false);
        }
        self.now = self.now.max(next);
        let now = self.now;
        while self.queue.peek().is_some_and(|Reverse(p)| p.at <= now) {
            let Some(Reverse(p)) = self.queue.pop() else {
                break;
            };
            if !self.nodes[p.to].alive
                || self.nodes[p.to].addr != p.to_addr
                || self.partitioned.contains(&(p.from, p.to))
            {
                self.stats.undeliverable += 1;
                continue;
            }
            let from = self.nodes[p.from].addr;
            self.nodes[p.to].engine.handle_datagram(
                now,
                from,
                None,
                None,
                BytesMut::from(&p.data[..]),
            );
        }
        for node in self.nodes.iter_mut().filter(|n| n.alive) {
            if node.engine.poll_timeout().is_some_and(|t| t <= now) {
                node.engine.handle_timeout(now);
            }
        }
        self.collect_events();
        Ok(true)
    }

    fn collect_events(&mut self) {
        let now = self.now;
        for node in self.nodes.iter_mut().filter(|n| n.alive) {
            while let Some(ev) = node.engine.poll_event() {
                node.events.push((now, ev));
            }
        }
    }

    /// Runs until virtual time `until`, processing everything due before it.
    pub fn run_until(&mut self, until: Instant) -> Result<(), SimError> {
        while self.step(until)? {}
        self.now = self.now.max(until);
        self.flush();
        self.collect_events();
        Ok(())
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) -> Result<(), SimError> {
        let until = self.now + d;
        self.run_until(until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A network of two idle nodes: the start of its clock, the network, the sender and the
    /// receiver's address.
    #[allow(clippy::disallowed_methods)] // a start instant for virtual time
    fn two_nodes() -> (Instant, Sim, NodeIx, NodeIx, SocketAddr) {
        let start = Instant::now();
        let mut sim = Sim::new(start, SimConfig::default());
        let a = sim.add_node(EngineConfig::default()).unwrap();
        let b = sim.add_node(EngineConfig::default()).unwrap();
        let to = sim.node(b).addr;
        (start, sim, a, b, to)
    }

    /// A capped uplink with a bounded queue passes what fits in the queue and drops the rest
    /// of a burst; once the link has drained, it passes a burst again. Unbounded, it drops
    /// nothing.
    #[test]
    fn a_full_uplink_queue_drops_the_rest_of_a_burst() {
        let (start, mut sim, a, _, to) = two_nodes();
        // 1 MB/s: a 1000-byte datagram takes 1 ms on the wire.
        sim.set_uplink(a, Some(1_000_000));
        let burst = |sim: &mut Sim| {
            for _ in 0..20 {
                sim.send(a, to, vec![0; 1000]);
            }
        };
        burst(&mut sim);
        assert_eq!(
            sim.stats().queue_drops,
            0,
            "an unbounded queue drops nothing"
        );
        assert_eq!(sim.queue.len(), 20);

        sim.now = start + Duration::from_millis(20);
        sim.set_uplink_queue(a, Some(10_000));
        burst(&mut sim);
        assert_eq!(
            sim.stats().queue_drops,
            10,
            "ten 1000-byte datagrams fill 10 KB"
        );
        assert_eq!(sim.queue.len(), 30);

        // Half drained: five more fit.
        sim.now += Duration::from_millis(5);
        burst(&mut sim);
        assert_eq!(sim.stats().queue_drops, 25);
        assert_eq!(sim.queue.len(), 35);
    }

    /// A renumbered node loses what is in flight to its old address and what is sent there
    /// later; what is sent to its new address reaches it.
    #[test]
    fn a_renumbered_node_is_reached_only_at_its_new_address() {
        let (start, mut sim, a, b, old) = two_nodes();
        sim.send(a, old, vec![0; 100]);
        let new: SocketAddr = "10.200.0.1:4433".parse().unwrap();
        sim.renumber(b, new);
        assert_eq!(sim.node(b).addr, new);
        sim.send(a, old, vec![0; 100]);
        assert_eq!(
            sim.stats().undeliverable,
            1,
            "sent to the old address after the change"
        );
        sim.send(a, new, vec![0; 100]);
        sim.run_until(start + Duration::from_secs(1)).unwrap();
        // The one in flight when it moved is lost too; the one sent to `new` arrives.
        assert_eq!(sim.stats().undeliverable, 2);
        assert!(sim.node(b).engine.stats().udp_bytes_in >= 100);
    }

    /// A capped downlink delays what reaches a node by its rate and drops what its queue has
    /// no room for; the sender's uplink is not involved.
    #[test]
    fn a_capped_downlink_spaces_arrivals_and_drops_past_its_queue() {
        let (start, mut sim, a, b, to) = two_nodes();
        sim.set_downlink(b, Some(1_000_000), Some(10_000));
        for _ in 0..20 {
            sim.send(a, to, vec![0; 1000]);
        }
        assert_eq!(sim.stats().queue_drops, 10);
        let mut arrivals: Vec<Duration> = sim.queue.iter().map(|p| p.0.at - start).collect();
        arrivals.sort();
        let latency = SimConfig::default().link.latency;
        let want: Vec<Duration> = (1..=10)
            .map(|k| latency + Duration::from_millis(k))
            .collect();
        assert_eq!(
            arrivals, want,
            "one every millisecond after the path's delay"
        );
    }
}
