//! What a supernode knows of the other supernodes, behind one trait: who is up, where to dial
//! them, what each carries and how much it can still take. The engine asks a [`Directory`]
//! and never cares how it learnt the answer.
//!
//! Two implementations:
//! - [`crate::node::membership::Membership`]: SWIM gossip (foca) whose packets the engine
//!   carries as QUIC datagrams. What every real node runs, and what the simulator runs by
//!   default, so that its scenarios test the gossip too.
//! - [`Board`]: one shared in-memory table for every node of a simulation. A member writes
//!   its advert and a heartbeat there; a member whose heartbeat is older than
//!   [`BOARD_DOWN_AFTER`] counts as down, so a killed node leaves every answer as it does with
//!   gossip. It sends no packets, which makes a simulated grid cheaper to run and isolates
//!   the discovery rules (ranking, tiers, peer exchange) from the gossip when a scenario
//!   fails.
//!
//! Sans-IO like the engine: every input carries `now`; packets to send are pulled with
//! [`Directory::poll_send`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::keys::{ChannelId, NodeId};

/// What a supernode says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Advert {
    /// Channels carried.
    pub channels: Vec<ChannelId>,
    /// Draining: name it to nobody.
    pub draining: bool,
    /// Current load, in permille of what it can take.
    pub load_permille: u16,
    /// Declared upload capacity in bits per second (0: not declared).
    pub capacity_bps: u64,
    /// Other addresses it is reached at, besides the one it is a member at (its other
    /// address family, say); at most [`MAX_ALSO`] are kept.
    pub also: Vec<SocketAddr>,
}

/// Most other addresses a member announces besides the one it is a member at: as many as an
/// answer can name a parent at, with the first.
pub const MAX_ALSO: usize = crate::wire::MAX_ADDRS_PER_PARENT - 1;

/// A supernode that carries a channel, as the directory knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carrier {
    /// Its node id.
    pub node: NodeId,
    /// Where to dial it.
    pub addr: SocketAddr,
    /// Other addresses it is reached at ([`Advert::also`]).
    pub also: Vec<SocketAddr>,
    /// Its load in permille.
    pub load_permille: u16,
    /// Its declared upload capacity in bits per second (0: not declared).
    pub capacity_bps: u64,
}

impl Carrier {
    /// Upload it has left, in bits per second, counting an undeclared capacity as
    /// `assumed_bps`.
    pub fn spare_bps(&self, assumed_bps: u64) -> u64 {
        let capacity = if self.capacity_bps == 0 {
            assumed_bps
        } else {
            self.capacity_bps
        };
        let free = 1000 - u64::from(self.load_permille.min(1000));
        capacity / 1000 * free
    }
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MembershipStats {
    /// Gossip packets handed in.
    pub packets_in: u64,
    /// Gossip packets sent.
    pub packets_out: u64,
    /// Packets refused (undecodable, a bad or unsigned info), or whose sender was not the
    /// node that carried them.
    pub rejected: u64,
}

/// Membership among supernodes, as the engine uses it.
pub trait Directory: Send + std::fmt::Debug {
    /// Joins through `node` at `addr` (any member).
    fn announce(&mut self, now: Instant, node: NodeId, addr: SocketAddr);
    /// A packet from `from` (the node id its connection proved).
    fn handle_data(&mut self, now: Instant, from: NodeId, data: &[u8]);
    /// Runs what is due.
    fn handle_timeout(&mut self, now: Instant);
    /// When [`Directory::handle_timeout`] must run next.
    fn poll_timeout(&self) -> Option<Instant>;
    /// The next packet to send: to whom, where, what.
    fn poll_send(&mut self) -> Option<(NodeId, SocketAddr, Bytes)>;
    /// The next member that came up (`true`) or went down.
    fn poll_change(&mut self) -> Option<(NodeId, SocketAddr, bool)>;
    /// Tells the others what this node is now (at once when it changed).
    fn set_info(&mut self, now: Instant, advert: Advert);
    /// Up members (not suspected, not down) that carry `channel` and are not draining.
    fn carriers(&self, channel: &ChannelId) -> Vec<Carrier>;
    /// Whether `node` should be named to nobody: draining, suspected or down.
    fn shunned(&self, node: &NodeId) -> bool;
    /// Whether `node` is a member that is up.
    fn is_member(&self, node: &NodeId) -> bool;
    /// Members up, this node excluded.
    fn members(&self) -> usize;
    /// Counters.
    fn stats(&self) -> MembershipStats;
}

/// How often a [`Board`] member writes its heartbeat.
pub const BOARD_BEAT: Duration = Duration::from_millis(500);
/// A [`Board`] member whose last heartbeat is older than this counts as down (gossip takes
/// about as long: a probe period plus `suspect_to_down_after`).
pub const BOARD_DOWN_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Entry {
    addr: SocketAddr,
    advert: Advert,
    beat: Instant,
}

#[derive(Debug, Default)]
struct Table {
    /// The latest time any member reported: the board's clock (the simulator's nodes share
    /// one virtual clock).
    clock: Option<Instant>,
    entries: HashMap<NodeId, Entry>,
}

impl Table {
    fn up(&self, entry: &Entry) -> bool {
        self.clock
            .is_some_and(|c| c.saturating_duration_since(entry.beat) < BOARD_DOWN_AFTER)
    }
}

/// The in-memory directory shared by every node of one simulation (see the module doc).
/// Clones share the table.
#[derive(Clone, Debug, Default)]
pub struct Board(Arc<Mutex<Table>>);

impl Board {
    /// An empty board.
    pub fn new() -> Self {
        Self::default()
    }

    /// The member `node`, dialled at `addr`.
    pub fn member(&self, node: NodeId, addr: SocketAddr) -> BoardMember {
        BoardMember {
            board: self.clone(),
            me: node,
            addr,
            next_beat: None,
            known: HashSet::new(),
            changes: Vec::new(),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One node's view of a [`Board`].
#[derive(Debug)]
pub struct BoardMember {
    board: Board,
    me: NodeId,
    addr: SocketAddr,
    next_beat: Option<Instant>,
    /// Members up at the last beat, to report changes.
    known: HashSet<NodeId>,
    changes: Vec<(NodeId, SocketAddr, bool)>,
}

impl BoardMember {
    fn beat(&mut self, now: Instant, advert: Option<Advert>) {
        let mut table = self.board.table();
        table.clock = Some(table.clock.map_or(now, |c| c.max(now)));
        let entry = table.entries.entry(self.me).or_insert_with(|| Entry {
            addr: self.addr,
            advert: Advert::default(),
            beat: now,
        });
        entry.beat = now;
        if let Some(advert) = advert {
            entry.advert = advert;
        }
        let up: HashSet<NodeId> = table
            .entries
            .iter()
            .filter(|(id, e)| **id != self.me && table.up(e))
            .map(|(id, _)| *id)
            .collect();
        for id in up.difference(&self.known) {
            self.changes.push((*id, table.entries[id].addr, true));
        }
        for id in self.known.difference(&up) {
            if let Some(e) = table.entries.get(id) {
                self.changes.push((*id, e.addr, false));
            }
        }
        drop(table);
        self.known = up;
        self.next_beat = Some(now + BOARD_BEAT);
    }
}

impl Directory for BoardMember {
    fn announce(&mut self, now: Instant, _node: NodeId, _addr: SocketAddr) {
        self.beat(now, None);
    }

    fn handle_data(&mut self, _now: Instant, _from: NodeId, _data: &[u8]) {
        // A board member sends nothing, so it expects nothing: gossip from a node that runs
        // the real thing is not understood here.
    }

    fn handle_timeout(&mut self, now: Instant) {
        if self.next_beat.is_some_and(|t| t <= now) {
            self.beat(now, None);
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.next_beat
    }

    fn poll_send(&mut self) -> Option<(NodeId, SocketAddr, Bytes)> {
        None
    }

    fn poll_change(&mut self) -> Option<(NodeId, SocketAddr, bool)> {
        (!self.changes.is_empty()).then(|| self.changes.remove(0))
    }

    fn set_info(&mut self, now: Instant, advert: Advert) {
        self.beat(now, Some(advert));
    }

    fn carriers(&self, channel: &ChannelId) -> Vec<Carrier> {
        let table = self.board.table();
        table
            .entries
            .iter()
            .filter(|(id, e)| {
                **id != self.me
                    && table.up(e)
                    && !e.advert.draining
                    && e.advert.channels.contains(channel)
            })
            .map(|(id, e)| Carrier {
                node: *id,
                addr: e.addr,
                also: e.advert.also.iter().take(MAX_ALSO).copied().collect(),
                load_permille: e.advert.load_permille,
                capacity_bps: e.advert.capacity_bps,
            })
            .collect()
    }

    fn shunned(&self, node: &NodeId) -> bool {
        let table = self.board.table();
        table
            .entries
            .get(node)
            .is_some_and(|e| e.advert.draining || !table.up(e))
    }

    fn is_member(&self, node: &NodeId) -> bool {
        let table = self.board.table();
        *node != self.me && table.entries.get(node).is_some_and(|e| table.up(e))
    }

    fn members(&self) -> usize {
        let table = self.board.table();
        table
            .entries
            .iter()
            .filter(|(id, e)| **id != self.me && table.up(e))
            .count()
    }

    fn stats(&self) -> MembershipStats {
        MembershipStats::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // one base instant; time moves by hand
    use super::*;
    use crate::keys::{ChannelKey, NodeKey};

    fn member(board: &Board, i: u8) -> BoardMember {
        let node = NodeKey::from_seed(&[i; 32]).node_id();
        board.member(
            node,
            SocketAddr::from(([127, 0, 0, 1], 5000 + u16::from(i))),
        )
    }

    #[test]
    fn board_members_see_carriers_and_lose_the_silent_and_the_draining() {
        let board = Board::new();
        let channel = ChannelKey::from_seed(&[9; 32]).channel_id();
        let t0 = Instant::now();
        let mut nodes: Vec<BoardMember> = (1..=4).map(|i| member(&board, i)).collect();
        let advert = Advert {
            channels: vec![channel],
            load_permille: 250,
            capacity_bps: 100_000_000,
            ..Advert::default()
        };
        for m in &mut nodes {
            m.set_info(t0, advert.clone());
        }
        assert_eq!(nodes[0].members(), 3);
        assert_eq!(nodes[0].carriers(&channel).len(), 3);
        let c = nodes[0].carriers(&channel)[0].clone();
        assert_eq!(c.spare_bps(0), 75_000_000);
        // Node 3 drains: shunned at once. Node 4 goes silent: down after 2 s.
        nodes[2].set_info(
            t0,
            Advert {
                draining: true,
                ..advert
            },
        );
        assert!(nodes[0].shunned(&nodes[2].me));
        assert_eq!(nodes[0].carriers(&channel).len(), 2);
        let mut now = t0;
        for _ in 0..5 {
            now += BOARD_BEAT;
            for m in &mut nodes[..3] {
                m.handle_timeout(now);
            }
        }
        let silent = nodes[3].me;
        assert!(nodes[0].shunned(&silent) && !nodes[0].is_member(&silent));
        assert_eq!(nodes[0].carriers(&channel).len(), 1);
        let mut changes = Vec::new();
        while let Some(c) = nodes[0].poll_change() {
            changes.push(c);
        }
        assert!(
            changes.contains(&(silent, nodes[3].addr, false)),
            "{changes:?}"
        );
    }
}
