//! Dialling a node known at several addresses: a link's host name with IPv6 and IPv4
//! addresses, or a node a link names twice. These are the connection attempts of RFC 8305
//! ("Happy Eyeballs"):
//! - The first address is dialled. While no handshake has completed, the next is dialled
//!   every [`ATTEMPT_DELAY`], and the earlier attempts run on.
//! - The first handshake to complete wins, and the other attempts are closed.
//! - The node's address book then lists the winner first, so the next dial of that node goes
//!   there at once.
//!
//! Without this, a name whose first address does not answer (a host with an AAAA record on a
//! network whose IPv6 is broken, or a node that listens on IPv4 only) was dialled there alone
//! until the connect timeout, and the viewer was never served.
//!
//! The winner takes the first attempt's place. The rest of the engine holds the first
//! attempt's handle: the upstream policy's slot, the Hello and any Subscribe queued on it. So
//! the two entries swap their quinn-proto connections:
//! - The first attempt's entry gets the winning connection, and the winner's entry gets the
//!   losing one, which is closed.
//! - quinn-proto still knows each connection by the handle it gave it. The engine translates
//!   between the two where it meets the endpoint: datagrams routed to a handle, and endpoint
//!   events handed back ([`Dialling::at_endpoint`]).
//! - quinn-proto reuses a handle once its connection has drained. A reused handle would land
//!   on an entry the engine still holds under that number. So neither connection of a swapped
//!   pair is released to the endpoint until both have drained.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quinn_proto::{ConnectionEvent, ConnectionHandle, Endpoint, EndpointEvent};
use rustc_hash::FxHashMap;

use super::Engine;
use super::conn::{Conn, mark};
use crate::keys::NodeId;

/// How long an attempt has before the next address is dialled too (RFC 8305's recommended
/// Connection Attempt Delay).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Addresses kept per node (and dialled, at most).
const MAX_ADDRESSES: usize = 8;

/// Nodes whose addresses are kept. The book is filled by the application from the links and
/// bootstrap nodes it was given, never from the network.
const MAX_NODES: usize = 1024;

/// Connection attempts to nodes known at several addresses, and the handle translation that
/// swapping a winner into place needs (see the module documentation).
#[derive(Debug, Default)]
pub(super) struct Dialling {
    /// Every address each node is known at, the one to dial first first.
    book: FxHashMap<NodeId, Vec<SocketAddr>>,
    /// Races under way, by the first attempt's handle.
    races: FxHashMap<ConnectionHandle, Race>,
    /// Later attempts, each with its race's first attempt.
    spare_of: FxHashMap<ConnectionHandle, ConnectionHandle>,
    /// Swapped pairs. Each entry's connection is known to quinn-proto by the other's handle,
    /// so one lookup translates either way.
    moved: FxHashMap<ConnectionHandle, ConnectionHandle>,
    /// The drained event of one side of a swapped pair, held until the other has drained too.
    held: FxHashMap<ConnectionHandle, EndpointEvent>,
}

#[derive(Debug)]
struct Race {
    node: NodeId,
    /// Addresses not dialled yet, in order.
    rest: VecDeque<SocketAddr>,
    /// When the next of them is dialled.
    next_at: Instant,
    /// The later attempts started so far.
    spares: Vec<ConnectionHandle>,
}

impl Dialling {
    /// The handle quinn-proto knows the connection in entry `handle` by, or the entry that
    /// holds quinn-proto's connection `handle`. The two are the same map, because a swap
    /// exchanges both ways.
    pub(super) fn at_endpoint(&self, handle: ConnectionHandle) -> ConnectionHandle {
        if self.moved.is_empty() {
            return handle;
        }
        self.moved.get(&handle).copied().unwrap_or(handle)
    }

    /// Hands an endpoint event of entry `handle` to quinn-proto. The drained event of one side
    /// of a swapped pair is held until the other has drained too; then both go.
    pub(super) fn endpoint_event(
        &mut self,
        endpoint: &mut Endpoint,
        handle: ConnectionHandle,
        event: EndpointEvent,
    ) -> Option<ConnectionEvent> {
        let Some(&partner) = self.moved.get(&handle) else {
            return endpoint.handle_event(handle, event);
        };
        if !event.is_drained() {
            return endpoint.handle_event(partner, event);
        }
        let Some(other) = self.held.remove(&partner) else {
            self.held.insert(handle, event);
            return None;
        };
        self.moved.remove(&handle);
        self.moved.remove(&partner);
        // Entry `handle` held quinn-proto's `partner` and the reverse.
        let _ = endpoint.handle_event(partner, event);
        let _ = endpoint.handle_event(handle, other);
        None
    }

    /// Where to dial `node`, which the caller names at `remote`: the addresses the book
    /// lists, the last one that answered first, then `remote` if the book does not list it
    /// (the book is the newer word: a host name looked up again, say).
    fn order(&self, remote: SocketAddr, node: NodeId) -> Vec<SocketAddr> {
        let Some(known) = self.book.get(&node) else {
            return vec![remote];
        };
        let mut out = known.clone();
        if !known.contains(&remote) {
            out.push(remote);
        }
        out
    }

    /// Whether a connection to `node` at `at` serves a caller that names the node at
    /// `named`: the same address, or one the node's book lists.
    pub(super) fn same_node(&self, node: NodeId, at: SocketAddr, named: SocketAddr) -> bool {
        at == named || self.book.get(&node).is_some_and(|k| k.contains(&at))
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.races
            .values()
            .filter(|r| !r.rest.is_empty())
            .map(|r| r.next_at)
            .min()
    }
}

impl Engine {
    /// Tells the engine every address `node` is known at now, the one to dial first first:
    /// a link's host name that resolved to several, a node a link names more than once, or
    /// a name looked up again after its address changed. A dial of the node goes to these
    /// (before any other address the caller names), the next one each [`ATTEMPT_DELAY`]
    /// that passes without a handshake (see the `race` module). An empty list forgets the
    /// node. Only the first [`MAX_ADDRESSES`] are kept, and the addresses of at most
    /// [`MAX_NODES`] nodes.
    pub fn learn_addresses(&mut self, node: NodeId, addrs: &[SocketAddr]) {
        let mut list: Vec<SocketAddr> = Vec::with_capacity(addrs.len().min(MAX_ADDRESSES));
        for &a in addrs {
            if list.len() < MAX_ADDRESSES && !list.contains(&a) {
                list.push(a);
            }
        }
        let book = &mut self.dialling.book;
        if list.is_empty() {
            book.remove(&node);
        } else if book.len() < MAX_NODES || book.contains_key(&node) {
            book.insert(node, list);
        }
    }

    /// The addresses to dial `node` at, named at `remote` by the caller: the first now, the
    /// others as a race (see [`Engine::start_race`]).
    pub(super) fn dial_order(&self, remote: SocketAddr, node: NodeId) -> Vec<SocketAddr> {
        self.dialling.order(remote, node)
    }

    /// Registers a race for the attempt `first` to `node`, with `rest` still to try.
    pub(super) fn start_race(
        &mut self,
        now: Instant,
        first: ConnectionHandle,
        node: NodeId,
        rest: Vec<SocketAddr>,
    ) {
        if rest.is_empty() {
            return;
        }
        self.dialling.races.insert(
            first,
            Race {
                node,
                rest: rest.into(),
                next_at: now + ATTEMPT_DELAY,
                spares: Vec::new(),
            },
        );
    }

    /// Dials the next address of every race whose attempt delay has passed.
    pub(super) fn race_timeout(&mut self, now: Instant) {
        let due: Vec<ConnectionHandle> = self
            .dialling
            .races
            .iter()
            .filter(|(_, r)| !r.rest.is_empty() && r.next_at <= now)
            .map(|(h, _)| *h)
            .collect();
        for first in due {
            let Some(race) = self.dialling.races.get_mut(&first) else {
                continue;
            };
            let Some(addr) = race.rest.pop_front() else {
                continue;
            };
            race.next_at = now + ATTEMPT_DELAY;
            let node = race.node;
            // An address quinn-proto cannot dial (another family than the socket's, say) is
            // skipped; the next goes at the next delay.
            let Ok((handle, quic)) = self.dial_quic(now, addr, node) else {
                continue;
            };
            if let Some(race) = self.dialling.races.get_mut(&first) {
                race.spares.push(handle);
            }
            self.dialling.spare_of.insert(handle, first);
            self.stats.dial_attempts_extra += 1;
            let mut conn = Conn::new(now, quic, addr, Some(node));
            conn.spare = true;
            self.conns.insert(handle, conn);
            self.order.push(handle);
            self.touch(handle);
        }
    }

    /// Settles the race `handle` takes part in, if its handshake is over: run first when a
    /// connection is driven, before its events are read.
    pub(super) fn race_check(&mut self, now: Instant, handle: ConnectionHandle) {
        if self.dialling.races.is_empty() {
            return;
        }
        let state = |e: &Engine| {
            e.conns
                .get(&handle)
                .map(|c| (c.quic.is_handshaking(), c.quic.is_closed() || c.closed))
        };
        if let Some(&first) = self.dialling.spare_of.get(&handle) {
            match state(self) {
                Some((true, false)) => {}
                Some((false, false)) => self.race_end(now, first, Some(handle)),
                // This attempt failed; the others run on.
                _ => {
                    self.dialling.spare_of.remove(&handle);
                    if let Some(race) = self.dialling.races.get_mut(&first) {
                        race.spares.retain(|&s| s != handle);
                    }
                }
            }
        } else if self.dialling.races.contains_key(&handle) {
            // The first attempt's handshake completed, or it failed: either way the race is
            // over. (A failed first attempt takes its later ones with it; the caller's own
            // retry races again.)
            if !matches!(state(self), Some((true, false))) {
                self.race_end(now, handle, None);
            }
        }
    }

    /// Forgets the race of a connection that is gone.
    pub(super) fn race_forget(&mut self, now: Instant, handle: ConnectionHandle) {
        if self.dialling.races.is_empty() {
            return;
        }
        if self.dialling.races.contains_key(&handle) {
            self.race_end(now, handle, None);
        } else if let Some(first) = self.dialling.spare_of.remove(&handle)
            && let Some(race) = self.dialling.races.get_mut(&first)
        {
            race.spares.retain(|&s| s != handle);
        }
    }

    /// Ends the race of the first attempt `first`. With a `winner` (a later attempt whose
    /// handshake completed), its connection takes the first attempt's place and the first
    /// attempt's goes. Every other attempt is closed.
    fn race_end(
        &mut self,
        now: Instant,
        first: ConnectionHandle,
        winner: Option<ConnectionHandle>,
    ) {
        let Some(race) = self.dialling.races.remove(&first) else {
            return;
        };
        for &spare in &race.spares {
            self.dialling.spare_of.remove(&spare);
            if Some(spare) != winner
                && let Some(conn) = self.conns.get_mut(&spare)
            {
                conn.close(
                    now,
                    super::close_code::DONE,
                    "another address answered first",
                );
                mark(&mut self.dirty, conn, spare);
            }
        }
        let Some(winner) = winner else {
            return;
        };
        let (tried, reached) = match self.conns.pair_mut(first, winner) {
            Some((a, b)) => {
                std::mem::swap(&mut a.quic, &mut b.quic);
                std::mem::swap(&mut a.remote, &mut b.remote);
                std::mem::swap(&mut a.last_rx, &mut b.last_rx);
                b.close(
                    now,
                    super::close_code::DONE,
                    "another address answered first",
                );
                (b.remote, a.remote)
            }
            None => {
                // The first attempt is gone: nothing holds the winner.
                if let Some(conn) = self.conns.get_mut(&winner) {
                    conn.close(now, super::close_code::DONE, "nothing waits for it");
                    mark(&mut self.dirty, conn, winner);
                }
                return;
            }
        };
        self.dialling.moved.insert(first, winner);
        self.dialling.moved.insert(winner, first);
        if let Some(known) = self.dialling.book.get_mut(&race.node)
            && let Some(i) = known.iter().position(|&a| a == reached)
        {
            let addr = known.remove(i);
            known.insert(0, addr);
        }
        self.stats.dial_fallbacks += 1;
        tracing::info!(node = %race.node, %reached, %tried, "node reached at another of its addresses (the first did not answer in time)");
        // Each entry's deadline is now the other connection's.
        for h in [first, winner] {
            if let Some(conn) = self.conns.get_mut(&h)
                && let Some(t) = conn.timer.take()
            {
                self.timers.remove(&(t, h));
            }
            self.rearm(h);
            self.touch(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NodeKey;

    #[test]
    fn a_node_is_dialled_where_its_book_says_first() {
        let node = NodeKey::from_seed(&[5; 32]).node_id();
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mut d = Dialling::default();
        // Unknown node: where the caller names it.
        assert_eq!(d.order(a("192.0.2.1:1"), node), vec![a("192.0.2.1:1")]);
        d.book
            .insert(node, vec![a("[2001:db8::1]:1"), a("192.0.2.1:1")]);
        // Known: the book's order, whichever of its addresses the caller names.
        assert_eq!(
            d.order(a("192.0.2.1:1"), node),
            vec![a("[2001:db8::1]:1"), a("192.0.2.1:1")]
        );
        // A stale address (the name moved): the book first, the caller's last.
        assert_eq!(
            d.order(a("192.0.2.9:1"), node),
            vec![a("[2001:db8::1]:1"), a("192.0.2.1:1"), a("192.0.2.9:1")]
        );
        // A connection at a listed address serves a caller naming another; one at a stale
        // address does not.
        assert!(d.same_node(node, a("192.0.2.1:1"), a("192.0.2.9:1")));
        assert!(!d.same_node(node, a("192.0.2.9:1"), a("192.0.2.1:1")));
        assert!(d.same_node(node, a("192.0.2.9:1"), a("192.0.2.9:1")));
    }
}
