//! Hole punching through a parent. A parent that names one of its serving children to a node
//! asking for parents tells that child where the node will dial it from ([`Punch`]); the
//! child sends that address one datagram. Behind a NAT or a stateful firewall (a home
//! router's, for IPv4 and IPv6 alike) that datagram is what lets the node's connection in:
//! such a box admits a packet from an address only after the host behind it has sent there.
//! The asker's own box lets the child's answers in because the asker dialled. The parent is
//! the go-between both already reach.
//!
//! The datagram is a single byte, which no QUIC endpoint answers (it is not a packet).
//! It is sent only for a parent this node draws from, at most [`PUNCH_BURST`] a second, so a
//! parent cannot aim a child's socket at anyone at any rate.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quinn_proto::{ConnectionHandle, Transmit};

use super::Engine;
use super::conn::mark;
use crate::wire::{Message, ParentCandidate, Punch};

/// Most punch datagrams a node sends in any second.
const PUNCH_BURST: usize = 8;

impl Engine {
    /// After naming `named` to the node on `asker`: each of them that is a serving child of
    /// this node is told to open a path to the asker.
    pub(super) fn punch_for(&mut self, asker: ConnectionHandle, named: &[ParentCandidate]) {
        let Some(at) = self.conns.get(&asker).map(|c| c.remote) else {
            return;
        };
        for c in named {
            let child = self.conns.iter().find(|(h, conn)| {
                *h != asker
                    && !conn.closed
                    && !conn.spare
                    && conn.peer == Some(c.node)
                    && conn.hello.as_ref().is_some_and(|h| h.serves)
                    && !conn.served.is_empty()
            });
            let Some((handle, _)) = child else { continue };
            if let Some(conn) = self.conns.get_mut(&handle) {
                conn.send_control(&Message::Punch(Punch { addr: at }));
                mark(&mut self.dirty, conn, handle);
                self.stats.punches_asked += 1;
            }
        }
    }

    /// A parent asks this node to open a path to `addr` (see the module documentation).
    pub(super) fn punch(&mut self, now: Instant, handle: ConnectionHandle, addr: SocketAddr) {
        let Some(conn) = self.conns.get(&handle) else {
            return;
        };
        // Only a parent this node draws from, only a node that serves, and never an address
        // nothing can be sent to.
        if conn.taken.is_empty()
            || !self.config.serve
            || addr.port() == 0
            || addr.ip().is_unspecified()
            || addr.ip().is_multicast()
        {
            return;
        }
        // The rate limit comes before the walk over the connections below, so that a parent
        // sending punches without end costs that walk only a few times a second.
        let second = Duration::from_secs(1);
        while self
            .punched
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= second)
        {
            self.punched.pop_front();
        }
        if self.punched.len() >= PUNCH_BURST {
            return;
        }
        self.punched.push_back(now);
        // An address this node already talks to needs no opening.
        if self.conns.values().any(|c| c.remote == addr) {
            return;
        }
        self.stats.punches_sent += 1;
        self.responses.push_back((
            Transmit {
                destination: addr,
                ecn: None,
                size: 1,
                segment_size: None,
                src_ip: None,
            },
            vec![0],
        ));
    }
}
