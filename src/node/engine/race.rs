//! Dialling a node known at several addresses: a link's host name with IPv6 and IPv4
//! addresses, or a node a link names twice. These are the connection attempts of RFC 8305
//! ("Happy Eyeballs"):
//! - The first address is dialled. While no handshake has completed, the next is dialled
//!   every [`ATTEMPT_DELAY`], and the earlier attempts run on.
//! - The first handshake to complete wins, and the other attempts are closed.
//! - An attempt that fails outright (the address answers as another node, or refuses) does
//!   not end the race: if it was the first, a later attempt takes its place, or the next
//!   address is dialled at once (RFC 8305, section 5).
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
//!   events handed back ([`Dialling::entry_of`], [`Dialling::endpoint_event`]). A first
//!   attempt that failed and was replaced, and then won with another, has been swapped twice,
//!   so the translation is a permutation, kept both ways.
//! - quinn-proto reuses a handle once its connection has drained. A reused handle would land
//!   on an entry the engine still holds under that number. So a drained connection is released
//!   to the endpoint only once the entry numbered by its handle is gone too.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quinn_proto::{ConnectionEvent, ConnectionHandle, Endpoint, EndpointEvent};
use rustc_hash::FxHashMap;

use super::Engine;
use super::conn::{Conn, mark};
use crate::keys::NodeId;
use crate::wire::ParentCandidate;

/// How long an attempt has before the next address is dialled too (RFC 8305's recommended
/// Connection Attempt Delay).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Addresses kept per node (and dialled, at most).
const MAX_ADDRESSES: usize = 8;

/// Nodes whose addresses are kept. The book is filled by the application from the links and
/// bootstrap nodes it was given, and from nodes named with several addresses in answers
/// (these only while the book is less than half full, and never over what the application
/// gave).
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
    /// Entries whose connection quinn-proto knows by another handle (after a swap), and the
    /// handle it knows it by.
    quinn_of: FxHashMap<ConnectionHandle, ConnectionHandle>,
    /// The reverse: the entry holding each connection in `quinn_of`.
    held_by: FxHashMap<ConnectionHandle, ConnectionHandle>,
    /// Drained events of connections (by quinn-proto's handle) whose same-numbered entry is
    /// still alive, held until it is gone.
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
    /// The address the first attempt dialled, when a later attempt has taken the place of a
    /// first that failed outright.
    replaced: Option<SocketAddr>,
}

impl Dialling {
    /// The entry that holds quinn-proto's connection `quinn`.
    pub(super) fn entry_of(&self, quinn: ConnectionHandle) -> ConnectionHandle {
        if self.held_by.is_empty() {
            return quinn;
        }
        self.held_by.get(&quinn).copied().unwrap_or(quinn)
    }

    /// The handle quinn-proto knows the connection in entry `entry` by.
    fn quinn_of(&self, entry: ConnectionHandle) -> ConnectionHandle {
        self.quinn_of.get(&entry).copied().unwrap_or(entry)
    }

    /// Records that entry `entry` now holds quinn-proto's connection `quinn`.
    fn place(&mut self, entry: ConnectionHandle, quinn: ConnectionHandle) {
        if entry == quinn {
            self.quinn_of.remove(&entry);
            self.held_by.remove(&quinn);
        } else {
            self.quinn_of.insert(entry, quinn);
            self.held_by.insert(quinn, entry);
        }
    }

    /// Records that entries `a` and `b` have exchanged their connections.
    fn swapped(&mut self, a: ConnectionHandle, b: ConnectionHandle) {
        let (qa, qb) = (self.quinn_of(a), self.quinn_of(b));
        // Clear both first: `place` of one would otherwise overwrite the other's reverse.
        for e in [a, b] {
            if let Some(q) = self.quinn_of.remove(&e) {
                self.held_by.remove(&q);
            }
        }
        self.place(a, qb);
        self.place(b, qa);
    }

    /// Hands an endpoint event of entry `handle` to quinn-proto, under the handle quinn-proto
    /// knows its connection by. A drained connection whose handle numbers another entry that
    /// is still alive is held until that entry is gone; the entry that drained is gone now,
    /// so a connection held for it is released.
    pub(super) fn endpoint_event(
        &mut self,
        endpoint: &mut Endpoint,
        handle: ConnectionHandle,
        event: EndpointEvent,
    ) -> Option<ConnectionEvent> {
        if self.quinn_of.is_empty() && self.held.is_empty() {
            return endpoint.handle_event(handle, event);
        }
        let quinn = self.quinn_of(handle);
        if !event.is_drained() {
            return endpoint.handle_event(quinn, event);
        }
        if let Some(q) = self.quinn_of.remove(&handle) {
            self.held_by.remove(&q);
        }
        // Entry `quinn` is alive only if it was swapped too (it holds another connection).
        if quinn == handle || !self.quinn_of.contains_key(&quinn) {
            let _ = endpoint.handle_event(quinn, event);
        } else {
            self.held.insert(quinn, event);
        }
        if quinn != handle
            && let Some(waiting) = self.held.remove(&handle)
        {
            let _ = endpoint.handle_event(handle, waiting);
        }
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

    /// Nodes named in an answer, a refusal or a go-away that came over a connection to `via`,
    /// with each node's addresses in the order to dial them: those of `via`'s family first
    /// (this node reaches that family; a relay announcing IPv6 and IPv4 is dialled over IPv4
    /// by an IPv4-only node). A node named at several addresses goes into the address book,
    /// so a dial of it tries the others in turn, unless the book knows it already.
    pub(super) fn heard_of(
        &mut self,
        via: SocketAddr,
        named: &[ParentCandidate],
    ) -> Vec<ParentCandidate> {
        let mut out = named.to_vec();
        for c in &mut out {
            c.addrs.truncate(MAX_ADDRESSES);
            c.addrs.sort_by_key(|a| a.is_ipv4() != via.is_ipv4());
            let book = &mut self.dialling.book;
            if c.addrs.len() > 1 && !book.contains_key(&c.node) && book.len() < MAX_NODES / 2 {
                book.insert(c.node, c.addrs.clone());
            }
        }
        out
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
                replaced: None,
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
            self.dial_next(now, first);
        }
    }

    /// Dials the next address of the race of `first` that quinn-proto can dial, as a later
    /// attempt. An address it cannot dial (another family than the socket's, say) is skipped.
    fn dial_next(&mut self, now: Instant, first: ConnectionHandle) -> Option<ConnectionHandle> {
        loop {
            let race = self.dialling.races.get_mut(&first)?;
            let addr = race.rest.pop_front()?;
            race.next_at = now + ATTEMPT_DELAY;
            let node = race.node;
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
            return Some(handle);
        }
    }

    /// The first attempt of a race failed outright (its address answered as another node, or
    /// refused). A later attempt still under way takes its place, or, if none is, the next
    /// address is dialled at once and takes it: RFC 8305 starts the next attempt when one
    /// fails rather than waiting out the delay. The failed connection goes to the later
    /// attempt's entry, where it is reported and drains. False if no address is left.
    fn race_replace_first(&mut self, now: Instant, first: ConnectionHandle) -> bool {
        let alive = |e: &Engine, h: &ConnectionHandle| {
            e.conns
                .get(h)
                .is_some_and(|c| !c.closed && !c.quic.is_closed())
        };
        let Some(race) = self.dialling.races.get(&first) else {
            return false;
        };
        let waiting = race.spares.iter().copied().find(|h| alive(self, h));
        let Some(next) = waiting.or_else(|| self.dial_next(now, first)) else {
            return false;
        };
        let Some((a, b)) = self.conns.pair_mut(first, next) else {
            return false;
        };
        a.exchange_quic(b);
        let (failed, trying) = (b.remote, a.remote);
        self.dialling.swapped(first, next);
        self.dialling.spare_of.remove(&next);
        if let Some(race) = self.dialling.races.get_mut(&first) {
            race.spares.retain(|&s| s != next);
            race.replaced.get_or_insert(failed);
        }
        tracing::info!(%failed, %trying, "an address of a node failed outright; dialling its next");
        self.swapped_timers(first, next);
        true
    }

    /// Re-registers the deadlines of two entries that exchanged their connections, and drives
    /// both.
    fn swapped_timers(&mut self, a: ConnectionHandle, b: ConnectionHandle) {
        for h in [a, b] {
            self.rearm(h);
            self.touch(h);
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
                // This attempt failed; the others run on, and the next address is dialled
                // now rather than after the delay.
                _ => {
                    self.dialling.spare_of.remove(&handle);
                    if let Some(race) = self.dialling.races.get_mut(&first) {
                        race.spares.retain(|&s| s != handle);
                        race.next_at = race.next_at.min(now);
                    }
                }
            }
        } else if self.dialling.races.contains_key(&handle) {
            match state(self) {
                Some((true, false)) => {}
                // The first attempt's handshake completed: the race is over.
                Some((false, false)) => self.race_end(now, handle, None),
                // It failed. Unless the engine closed it (the caller gave up), a later
                // attempt takes its place; with none left the race is over, and the caller's
                // own retry races again.
                _ => {
                    let given_up = self.conns.get(&handle).is_none_or(|c| c.closed);
                    if given_up || !self.race_replace_first(now, handle) {
                        self.race_end(now, handle, None);
                    }
                }
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
            // The first attempt's own connection completed. If it is a replacement, its
            // address goes first in the book.
            if let Some(tried) = race.replaced
                && let Some(conn) = self.conns.get(&first)
                && !conn.closed
                && !conn.quic.is_closed()
            {
                let reached = conn.remote;
                self.reached_at(race.node, reached, tried);
            }
            return;
        };
        let (tried, reached) = match self.conns.pair_mut(first, winner) {
            Some((a, b)) => {
                a.exchange_quic(b);
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
        self.dialling.swapped(first, winner);
        self.reached_at(race.node, reached, race.replaced.unwrap_or(tried));
        // Each entry's deadline is now the other connection's.
        self.swapped_timers(first, winner);
    }

    /// `node` was reached at `reached` after its first address, `tried`, did not serve:
    /// `reached` goes first in its book.
    fn reached_at(&mut self, node: NodeId, reached: SocketAddr, tried: SocketAddr) {
        if let Some(known) = self.dialling.book.get_mut(&node)
            && let Some(i) = known.iter().position(|&a| a == reached)
        {
            let addr = known.remove(i);
            known.insert(0, addr);
        }
        self.stats.dial_fallbacks += 1;
        tracing::info!(%node, %reached, %tried, "node reached at another of its addresses (the first did not answer in time, or failed)");
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

    #[test]
    #[allow(clippy::disallowed_methods)] // one base instant for quinn-proto's dials
    fn a_drained_connection_is_released_once_no_live_entry_bears_its_handle() {
        use std::sync::Arc;

        use quinn_proto::{ClientConfig, EndpointConfig};

        use crate::node::tls;

        let key = NodeKey::from_seed(&[6; 32]);
        let identity = tls::Identity::new(&key).unwrap();
        let client = ClientConfig::new(tls::client_crypto(key.node_id(), &identity).unwrap());
        let mut endpoint = Endpoint::new(Arc::new(EndpointConfig::default()), None, true, None);
        let now = Instant::now();
        let to: SocketAddr = "192.0.2.1:4433".parse().unwrap();
        let handles: Vec<ConnectionHandle> = (0..3)
            .map(|_| endpoint.connect(now, client.clone(), to, "x").unwrap().0)
            .collect();
        let [e0, e1, e2] = [handles[0], handles[1], handles[2]];
        let mut d = Dialling::default();
        // A first attempt (entry 0) failed and a later one (1) took its place; then another
        // (2) won. Entry 0 holds connection 2, entry 1 holds 0, entry 2 holds 1.
        d.swapped(e0, e1);
        d.swapped(e0, e2);
        assert_eq!(
            [d.entry_of(e0), d.entry_of(e1), d.entry_of(e2)],
            [e1, e2, e0]
        );
        let drained = EndpointEvent::drained;
        // Entry 1 drains: its connection is 0, and entry 0 is alive, so 0 is held.
        assert!(d.endpoint_event(&mut endpoint, e1, drained()).is_none());
        assert_eq!(endpoint.open_connections(), 3);
        // Entry 2 drains: its connection is 1, whose entry is gone: released.
        d.endpoint_event(&mut endpoint, e2, drained());
        assert_eq!(endpoint.open_connections(), 2);
        // Entry 0 drains: its connection 2 is released (entry 2 is gone), and so is 0, which
        // waited for entry 0.
        d.endpoint_event(&mut endpoint, e0, drained());
        assert_eq!(endpoint.open_connections(), 0);
        assert!(d.quinn_of.is_empty() && d.held_by.is_empty() && d.held.is_empty());
    }

    #[test]
    fn nodes_named_at_several_addresses_are_dialled_over_the_family_that_works_first() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mut engine = Engine::new(
            &NodeKey::from_seed(&[7; 32]),
            crate::node::EngineConfig::default(),
        )
        .unwrap();
        let (relay, linked) = (
            NodeKey::from_seed(&[8; 32]).node_id(),
            NodeKey::from_seed(&[9; 32]).node_id(),
        );
        let named = |node, addrs: &[&str]| ParentCandidate {
            node,
            addrs: addrs.iter().map(|s| a(s)).collect(),
            load_permille: 0,
        };
        // A link gave `linked`'s addresses: an answer does not override them.
        engine.learn_addresses(linked, &[a("192.0.2.9:1")]);
        let heard = engine.heard_of(
            a("192.0.2.1:4433"),
            &[
                named(relay, &["[2001:db8::2]:4434", "192.0.2.2:4434"]),
                named(linked, &["[2001:db8::9]:1", "192.0.2.66:1"]),
            ],
        );
        // Reached over IPv4: IPv4 first.
        assert_eq!(
            heard[0].addrs,
            vec![a("192.0.2.2:4434"), a("[2001:db8::2]:4434")]
        );
        assert_eq!(
            engine.dial_order(a("192.0.2.2:4434"), relay),
            vec![a("192.0.2.2:4434"), a("[2001:db8::2]:4434")]
        );
        assert_eq!(
            engine.dial_order(a("192.0.2.9:1"), linked),
            vec![a("192.0.2.9:1")]
        );
        // Over IPv6, IPv6 first; the order within a family is the announcer's.
        let heard = engine.heard_of(
            a("[2001:db8::1]:4433"),
            &[named(
                relay,
                &["192.0.2.2:4434", "[2001:db8::2]:4434", "[2001:db8::3]:4434"],
            )],
        );
        assert_eq!(
            heard[0].addrs,
            vec![
                a("[2001:db8::2]:4434"),
                a("[2001:db8::3]:4434"),
                a("192.0.2.2:4434")
            ]
        );
    }
}
