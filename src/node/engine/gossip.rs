//! Membership put to work (see [`crate::node::membership`]): a supernode or source with an
//! advertised address runs foca; its packets travel as QUIC datagrams on a connection to the
//! member, dialled when there is none, and are taken only from connections whose far end
//! proved its node id and is not a plain peer. What membership knows feeds the parent
//! answers ([`super::discovery`]); this node's own info (channels carried, draining, load,
//! declared capacity) goes out when it changes and every few seconds. In the simulator a
//! shared [`crate::node::directory::Board`] may stand in for the gossip.

use std::time::Instant;

use bytes::Bytes;
use quinn_proto::ConnectionHandle;

use crate::keys::NodeId;
use crate::node::channel::ChannelMode;
use crate::node::directory::{Advert, Carrier, Directory, MembershipStats};
use crate::node::membership::Membership;
use crate::node::upstream::Candidate;
use crate::wire::Role;

use super::{Engine, NodeEvent};

/// How often this node's load is measured and, if it changed, announced.
const LOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Gossip packets held for a member whose connection is still being set up.
const GOSSIP_BACKLOG: usize = 16;

impl Engine {
    /// Membership for this node, if its settings make it a member (a serving supernode or
    /// source with an advertised address).
    pub(super) fn new_membership(&self) -> Option<Box<dyn Directory>> {
        let addr = self.config.advertise?;
        if !self.config.serve || self.config.role == Role::Peer {
            return None;
        }
        let seed = self.config.rng_seed.map_or_else(
            || u64::from_le_bytes(self.node.as_bytes()[..8].try_into().unwrap_or([0; 8])),
            |s| u64::from_le_bytes(s[..8].try_into().unwrap_or([0; 8])),
        );
        if let Some(board) = &self.config.directory {
            return Some(Box::new(board.member(self.node, addr)));
        }
        Some(Box::new(Membership::new(
            &self.key,
            addr,
            seed,
            self.config.started_unix_us,
        )))
    }

    /// Makes this node a member, reachable at `addr` (a driver learns its address only once
    /// bound). Ignored for peers and nodes that do not serve, and when already a member.
    pub fn set_advertise(&mut self, addr: std::net::SocketAddr) {
        if self.membership.is_none() {
            self.config.advertise = Some(addr);
            self.membership = self.new_membership();
            self.info_stale = true;
        }
    }

    /// Other addresses this node is reached at, announced with the one it is a member at
    /// ([`super::EngineConfig::advertise_also`]).
    pub fn set_advertise_also(&mut self, also: Vec<std::net::SocketAddr>) {
        self.config.advertise_also = also;
        self.info_stale = true;
    }

    /// Makes this node a member once it knows where it is reached: at the local address the
    /// first datagram of a connection arrived at (a relay's upstream answered it there; a
    /// source's first child dialled it there), on `port`. For a node listening on
    /// a wildcard address with no address given to announce, which would otherwise announce
    /// one nobody else can dial. Ignored when already a member.
    pub fn learn_advertise(&mut self, port: u16) {
        if self.membership.is_none() {
            self.learn_advertise = Some(port);
        }
    }

    /// Applies what [`Engine::learn_advertise`] waits for, once a datagram has settled it,
    /// and joins the membership through the upstreams set meanwhile (as
    /// [`Engine::set_upstream`] does for a node that is a member from the start).
    pub(super) fn advertise_learnt(&mut self, now: Instant) {
        let (Some(port), Some(ip)) = (self.learn_advertise, self.learnt_ip.take()) else {
            return;
        };
        self.learn_advertise = None;
        let addr = std::net::SocketAddr::new(ip.to_canonical(), port);
        tracing::info!(%addr, "announced to the other supernodes at the address a neighbour reached (--advertise to choose another)");
        self.set_advertise(addr);
        let known: Vec<Candidate> = self
            .upstreams
            .values()
            .flat_map(|up| up.candidates.iter().map(|(c, _)| *c))
            .collect();
        self.gossip_join(now, &known);
    }

    /// A worker of a multi-worker node that is not the member itself hands the gossip it
    /// receives to the application ([`NodeEvent::Gossip`]) for the worker that is.
    pub fn set_forward_gossip(&mut self, forward: bool) {
        self.forward_gossip = forward;
    }

    /// Gossip another worker of this node received from `from` (see
    /// [`Engine::set_forward_gossip`]).
    pub fn handle_gossip(&mut self, now: Instant, from: NodeId, data: &[u8]) {
        if let Some(m) = &mut self.membership {
            m.handle_data(now, from, data);
        }
        self.gossip_flush(now);
        self.drive(now);
    }

    /// Membership counters (`None`: this node is not a member).
    pub fn membership_stats(&self) -> Option<MembershipStats> {
        self.membership.as_ref().map(|m| m.stats())
    }

    /// Members known (this node excluded; 0 when it is not a member).
    pub fn members(&self) -> usize {
        self.membership.as_ref().map_or(0, |m| m.members())
    }

    /// Joins the membership through `candidates` (any of them that is a member answers).
    pub(super) fn gossip_join(&mut self, now: Instant, candidates: &[Candidate]) {
        let Some(m) = &mut self.membership else {
            return;
        };
        for c in candidates {
            m.announce(now, c.node, c.addr);
        }
        self.gossip_flush(now);
    }

    /// Tells the members what this node carries now.
    pub(super) fn gossip_info(&mut self, now: Instant) {
        let channels: Vec<_> = self
            .channels
            .iter()
            .filter(|(_, ch)| ch.mode() != ChannelMode::Play)
            .map(|(id, _)| *id)
            .collect();
        // Load: the larger of the upload used against the cap (since the last info) and the
        // subscriptions against their limit; 0 when neither is bounded.
        let sent = self.stats.shard_bytes_out;
        let by_upload = match (self.config.upload_cap, self.load_mark) {
            (Some(cap), Some((at, before))) if cap > 0 => {
                let secs = now.saturating_duration_since(at).as_secs_f64().max(0.001);
                let rate = sent.saturating_sub(before) as f64 / secs;
                (rate / cap as f64 * 1000.0).min(1000.0) as u16
            }
            _ => 0,
        };
        self.load_mark = Some((now, sent));
        let by_subscriptions = match self.config.max_subscribers {
            Some(max) if max > 0 => (self.served_subscriptions() * 1000 / max).min(1000) as u16,
            _ => 0,
        };
        let load = by_upload.max(by_subscriptions);
        self.info_due = Some(now + LOAD_EVERY);
        let advert = Advert {
            channels,
            draining: self.draining,
            load_permille: load,
            // The upload cap is what this node declares it can send.
            capacity_bps: self.config.upload_cap.map_or(0, |c| c.saturating_mul(8)),
            also: self.config.advertise_also.clone(),
        };
        if let Some(m) = &mut self.membership {
            m.set_info(now, advert);
        }
        self.info_stale = false;
        self.gossip_flush(now);
    }

    /// Runs membership timers and sends what it produced.
    pub(super) fn gossip_timeout(&mut self, now: Instant) {
        if self.info_stale || self.info_due.is_some_and(|t| t <= now) {
            self.gossip_info(now);
        }
        let due = self
            .membership
            .as_ref()
            .and_then(|m| m.poll_timeout())
            .is_some_and(|t| t <= now);
        if due && let Some(m) = &mut self.membership {
            m.handle_timeout(now);
        }
        self.gossip_flush(now);
    }

    /// When membership must run next.
    pub(super) fn gossip_poll_timeout(&self) -> Option<Instant> {
        let m = self.membership.as_ref()?;
        m.poll_timeout().into_iter().chain(self.info_due).min()
    }

    /// A datagram arrived on `handle`: gossip, if its sender is a proven non-peer node.
    pub(super) fn gossip_received(&mut self, now: Instant, handle: ConnectionHandle, data: &[u8]) {
        let Some(conn) = self.conns.get(&handle) else {
            return;
        };
        let from = conn.peer;
        let role_ok = conn.hello.as_ref().is_none_or(|h| h.role != Role::Peer);
        match (&mut self.membership, from) {
            (Some(m), Some(from)) if role_ok => m.handle_data(now, from, data),
            (None, Some(from)) if role_ok && self.forward_gossip => {
                self.events.push_back(NodeEvent::Gossip {
                    from,
                    data: Bytes::copy_from_slice(data),
                });
            }
            _ => self.stats.gossip_dropped += 1,
        }
        self.gossip_flush(now);
    }

    /// Sends every queued gossip packet: on a connection to the member, dialling it if none.
    pub(super) fn gossip_flush(&mut self, now: Instant) {
        let mut out = Vec::new();
        if let Some(m) = &mut self.membership {
            while let Some(packet) = m.poll_send() {
                out.push(packet);
            }
            while let Some((node, addr, up)) = m.poll_change() {
                self.events
                    .push_back(NodeEvent::Membership { node, addr, up });
            }
        }
        for (node, addr, data) in out {
            self.gossip_send(now, node, addr, data);
        }
    }

    fn gossip_send(&mut self, now: Instant, node: NodeId, addr: std::net::SocketAddr, data: Bytes) {
        if node == self.node {
            return;
        }
        let existing = self
            .conns
            .iter()
            .filter(|(_, c)| !c.closed && !c.spare && c.peer == Some(node))
            .max_by_key(|(_, c)| c.established)
            .map(|(h, _)| h);
        let handle = match existing {
            Some(h) => h,
            None => match self.connect(now, addr, node) {
                Ok(h) => h,
                Err(_) => return,
            },
        };
        if let Some(conn) = self.conns.get_mut(&handle) {
            if conn.established {
                if conn.quic.datagrams().send(data, true).is_err() {
                    self.stats.gossip_dropped += 1;
                }
            } else if conn.gossip_out.len() < GOSSIP_BACKLOG {
                conn.gossip_out.push(data);
            }
        }
        self.touch(handle);
    }

    /// Members that carry `channel`, as candidates (see [`Directory::carriers`]).
    pub(super) fn gossip_carriers(&self, channel: &crate::keys::ChannelId) -> Vec<Carrier> {
        self.membership
            .as_ref()
            .map(|m| m.carriers(channel))
            .unwrap_or_default()
    }
}
