//! The QUIC side of the engine: datagrams in, transmits out, timers, dialling, and the
//! per-connection event loop that turns quinn-proto events into protocol inputs.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto::{
    ClientConfig, ConnectionError, ConnectionHandle, DatagramEvent, Dir, EcnCodepoint, Event,
    StreamEvent, StreamId, Transmit,
};

use crate::keys::NodeId;
use crate::node::channel::Channel;
use crate::node::tls::{self, SERVER_NAME};
use crate::wire::Message;
use rustls::pki_types::CertificateDer;

use super::conn::{Conn, InStream, Input, control_first, mark, read_stream};
use super::{Engine, EngineError, MAX_GSO_BYTES, NodeEvent, close_code};

impl Engine {
    /// Stops (or resumes) consuming shard streams, as a paused or stuck player does. QUIC flow
    /// control then pushes back on the parents, whose bounded backlogs drop the oldest chunks.
    pub fn set_reading(&mut self, now: Instant, reading: bool) {
        self.reading = reading;
        if reading {
            let mut inputs = Vec::new();
            let handles: Vec<ConnectionHandle> = self.order.clone();
            for handle in handles {
                if let Some(conn) = self.conns.get_mut(&handle) {
                    let ids: Vec<StreamId> = conn.in_streams.keys().copied().collect();
                    for id in ids {
                        read_stream(conn, id, &mut inputs, &mut self.stats.stream_bytes_copied);
                    }
                    for input in inputs.drain(..) {
                        self.apply(now, handle, input);
                    }
                }
                self.touch(handle);
            }
        }
        self.drive(now);
    }

    /// Queues a connection for driving.
    pub(super) fn touch(&mut self, handle: ConnectionHandle) {
        if let Some(conn) = self.conns.get_mut(&handle) {
            mark(&mut self.dirty, conn, handle);
        }
    }

    /// Dials `node` at `remote`, or, if the node is known at several addresses, at the one
    /// that answered last, racing the others (see `race`). The Hello goes first.
    pub(super) fn connect(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        node: NodeId,
    ) -> Result<ConnectionHandle, EngineError> {
        let mut order = self.dial_order(remote, node);
        let first = order.remove(0);
        let (handle, quic) = self.dial_quic(now, first, node)?;
        let mut conn = Conn::new(now, quic, first, Some(node));
        conn.send_control(&self.hello());
        self.conns.insert(handle, conn);
        self.order.push(handle);
        self.touch(handle);
        self.start_race(now, handle, node, order);
        Ok(handle)
    }

    /// A QUIC connection to `remote`, which must prove `node`.
    pub(super) fn dial_quic(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        node: NodeId,
    ) -> Result<(ConnectionHandle, quinn_proto::Connection), EngineError> {
        let mut client = ClientConfig::new(tls::client_crypto(node, &self.identity)?);
        client.transport_config(Arc::clone(&self.transport));
        self.endpoint
            .connect(now, client, remote, SERVER_NAME)
            .map_err(|e| EngineError::Connect(remote, e.to_string()))
    }

    /// Closes the connection to `handle` (a parent the application gave up on).
    pub fn disconnect(&mut self, now: Instant, handle: ConnectionHandle) {
        if let Some(conn) = self.conns.get_mut(&handle) {
            conn.close(now, close_code::DONE, "unsubscribed");
        }
        self.touch(handle);
        self.drive(now);
    }

    /// Closes every connection, for a node that is stopping: each neighbour learns it at once
    /// from the close (a child moves to its other parents, a parent stops sending) instead of
    /// by ten seconds of silence, during which a parent would go on sending to nobody. The
    /// close packets are then in [`Engine::poll_transmit`]; the driver sends them before it
    /// exits.
    pub fn close_all(&mut self, now: Instant) {
        if !self.farewell {
            return;
        }
        for &handle in &self.order {
            if let Some(conn) = self.conns.get_mut(&handle) {
                conn.close(now, close_code::DONE, "stopping");
                mark(&mut self.dirty, conn, handle);
            }
        }
        self.drive(now);
    }

    /// With `false`, [`Engine::close_all`] closes nothing: the node's stop looks like a crash
    /// to its neighbours (the demo's supernode killed without warning).
    pub fn set_farewell(&mut self, on: bool) {
        self.farewell = on;
    }

    pub(super) fn hello(&self) -> Message {
        self.hello.clone()
    }

    /// Feeds one received UDP datagram (or GRO batch: one call per datagram).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        ecn: Option<EcnCodepoint>,
        data: BytesMut,
    ) {
        self.stats.udp_bytes_in += data.len() as u64;
        // While this node's address is to be learnt: the one the first datagram of a QUIC
        // connection (one this node dialled, or one it accepts) arrived at.
        let learning = self.learn_advertise.is_some() && self.learnt_ip.is_none();
        let arrived_at = local_ip.filter(|ip| learning && !ip.is_unspecified());
        let mut buf = Vec::new();
        match self
            .endpoint
            .handle(now, remote, local_ip, ecn, data, &mut buf)
        {
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                let handle = self.dialling.entry_of(handle);
                if let Some(conn) = self.conns.get_mut(&handle) {
                    if arrived_at.is_some() {
                        self.learnt_ip = arrived_at;
                    }
                    conn.last_rx = now;
                    conn.quic.handle_event(event);
                    // A neighbour whose address changed (a NAT rebinding, a new lease) is
                    // followed there by QUIC; answers naming it name where it is now.
                    conn.remote = conn.quic.remote_address();
                    mark(&mut self.dirty, conn, handle);
                }
            }
            Some(DatagramEvent::NewConnection(incoming))
                if !self.draining
                    && !incoming.remote_address_validated()
                    && self.handshaking >= self.config.validate_above =>
            {
                // Under a flood of Initials (or a burst of real ones), no state is kept for
                // an address until it shows it receives there: it must come back with the
                // Retry's token. Until then quinn-proto answers it only with this Retry.
                match self.endpoint.retry(incoming, &mut buf) {
                    Ok(t) => {
                        self.stats.retries_sent += 1;
                        self.responses.push_back((t, buf));
                    }
                    Err(e) => self.endpoint.ignore(e.into_incoming()),
                }
            }
            Some(DatagramEvent::NewConnection(incoming))
                if self.draining
                    || self
                        .config
                        .max_connections
                        .is_some_and(|max| self.conns.len() >= max) =>
            {
                self.stats.connections_refused += 1;
                if self.draining {
                    self.stats.connections_refused_draining += 1;
                }
                let t = self.endpoint.refuse(incoming, &mut buf);
                self.responses.push_back((t, buf));
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                match self.endpoint.accept(incoming, now, &mut buf, None) {
                    Ok((handle, quic)) => {
                        if arrived_at.is_some() {
                            self.learnt_ip = arrived_at;
                        }
                        self.stats.accepted += 1;
                        self.handshaking += 1;
                        self.conns
                            .insert(handle, Conn::new(now, quic, remote, None));
                        self.order.push(handle);
                        self.touch(handle);
                    }
                    Err(e) => {
                        if let Some(t) = e.response {
                            self.responses.push_back((t, std::mem::take(&mut buf)));
                        }
                    }
                }
            }
            Some(DatagramEvent::Response(t)) => {
                self.stats.datagrams_answered += 1;
                self.responses.push_back((t, buf));
            }
            None => self.stats.datagrams_dropped += 1,
        }
        self.drive(now);
    }

    /// Handles expired timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(handle) = self.timers.pop_due(now) {
            if let Some(conn) = self.conns.get_mut(&handle) {
                conn.quic.handle_timeout(now);
                mark(&mut self.dirty, conn, handle);
            }
        }
        self.drive(now);
        if self.dialling.poll_timeout().is_some_and(|t| t <= now) {
            self.race_timeout(now);
            self.drive(now);
        }
        if self
            .upstreams
            .values()
            .any(|u| u.next_check.is_some_and(|t| t <= now))
        {
            self.upstream_check(now);
            self.drive(now);
        }
        if self.membership.is_some()
            && (self.info_stale || self.gossip_poll_timeout().is_some_and(|t| t <= now))
        {
            self.gossip_timeout(now);
            self.drive(now);
        }
    }

    /// The next instant [`Engine::handle_timeout`] must run.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let conns = self.timers.first().map(|(t, _)| t);
        let channels = self.channels.values().filter_map(Channel::poll_timeout);
        let upstream = self.upstreams.values().filter_map(|u| u.next_check);
        let gossip = self.gossip_poll_timeout();
        let races = self.dialling.poll_timeout();
        conns
            .into_iter()
            .chain(channels)
            .chain(upstream)
            .chain(gossip)
            .chain(races)
            .min()
    }

    /// When a driver should wake for the timers, given that it may wake up to `slack` late
    /// to run several in one turn: the first deadline, or, if connection deadlines follow it
    /// within `slack`, the last of those. A deadline with none close behind it is kept on
    /// time, so a lone connection's pacing is never stretched; where many connections' fall
    /// microseconds apart (each one sending a burst sets its pacer for the next), they run
    /// together.
    pub fn poll_timeout_coalesced(&mut self, slack: Duration) -> Option<Instant> {
        let first = self.poll_timeout()?;
        let Some(end) = first.checked_add(slack) else {
            return Some(first);
        };
        let last = self.timers.last_until(end).unwrap_or(first);
        Some(first.max(last))
    }

    /// The next datagram(s) to send. The bytes are written to `buf`; with `segment_size` set,
    /// `buf` holds several datagrams of that size (the last may be shorter).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        if let Some((t, data)) = self.responses.pop_front() {
            buf.clear();
            buf.extend_from_slice(&data);
            return Some(t);
        }
        while let Some(handle) = self.tx_queue.pop_front() {
            let Some(conn) = self.conns.get_mut(&handle) else {
                continue;
            };
            buf.clear();
            // A GSO send carries at most 64 KiB (the UDP length field): fewer, full-size
            // segments rather than a batch the kernel refuses.
            let segments = self
                .config
                .max_gso_segments
                .min(MAX_GSO_BYTES / usize::from(conn.quic.current_mtu()))
                .max(1);
            let sent = conn.quic.poll_transmit(now, segments, buf);
            if sent.is_some() {
                // It may have more; round-robin behind the others.
                self.tx_queue.push_back(handle);
            } else {
                conn.queued_tx = false;
            }
            // Sending arms loss-detection timers. (It produces no endpoint or application
            // events in quinn-proto 0.11, so the connection is not marked for driving: doing
            // that kept every connection that ever sent dirty on every loop turn.)
            self.rearm(handle);
            if sent.is_some() {
                return sent;
            }
        }
        None
    }

    /// Re-files a connection's QUIC deadline in the timer set.
    pub(super) fn rearm(&mut self, handle: ConnectionHandle) {
        let Some(conn) = self.conns.get_mut(&handle) else {
            return;
        };
        self.timers.set(handle, conn.quic.poll_timeout());
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// Runs everything that follows from new input: QUIC events, protocol messages, fan-out,
    /// playout.
    pub(super) fn drive(&mut self, now: Instant) {
        while let Some(handle) = self.dirty.pop_front() {
            let Some(conn) = self.conns.get_mut(&handle) else {
                continue;
            };
            conn.dirty = false;
            self.drive_conn(now, handle);
            self.retire_streams_of(handle);
            if let Some(conn) = self.conns.get_mut(&handle)
                && !conn.queued_tx
            {
                conn.queued_tx = true;
                self.tx_queue.push_back(handle);
            }
            self.rearm(handle);
        }
        self.advertise_learnt(now);
        // Playout.
        let mut out = Vec::new();
        for (id, channel) in &mut self.channels {
            for (seq, flags, payload) in channel.poll_playout(now, &mut self.coder) {
                out.push(NodeEvent::Chunk {
                    channel: *id,
                    seq,
                    flags,
                    payload,
                });
            }
            for (first, last) in channel.take_skipped() {
                out.push(NodeEvent::Skipped {
                    channel: *id,
                    first,
                    last,
                });
            }
        }
        self.events.extend(out);
    }

    pub(super) fn drive_conn(&mut self, now: Instant, handle: ConnectionHandle) {
        // A race's winner takes the first attempt's place before its events are read.
        self.race_check(now, handle);
        let mut inputs = Vec::new();
        let mut drained = false;
        {
            let Some(conn) = self.conns.get_mut(&handle) else {
                return;
            };
            loop {
                let mut progressed = false;
                while let Some(ev) = conn.quic.poll_endpoint_events() {
                    progressed = true;
                    drained |= ev.is_drained();
                    if let Some(back) = self.dialling.endpoint_event(&mut self.endpoint, handle, ev)
                    {
                        conn.quic.handle_event(back);
                    }
                }
                while let Some(ev) = conn.quic.poll() {
                    progressed = true;
                    match ev {
                        Event::Connected => {
                            conn.established = true;
                            self.stats.handshakes_ok += 1;
                            if conn.node.is_none() {
                                self.handshaking = self.handshaking.saturating_sub(1);
                                // An accepted connection: the dialler proved its node id with
                                // its certificate (see `tls::AnyNodeVerifier`).
                                conn.peer = conn
                                    .quic
                                    .crypto_session()
                                    .peer_identity()
                                    .and_then(|any| {
                                        any.downcast::<Vec<CertificateDer<'static>>>().ok()
                                    })
                                    .and_then(|chain| tls::peer_node(&chain));
                                if conn.peer.is_some_and(|p| self.refused.contains(&p)) {
                                    self.stats.connections_refused += 1;
                                    self.stats.connections_refused_misbehaved += 1;
                                    conn.close(now, close_code::BAD_DATA, "sent bad data before");
                                    continue;
                                }
                            }
                            for data in std::mem::take(&mut conn.gossip_out) {
                                let _ = conn.quic.datagrams().send(data, true);
                            }
                            conn.flush_control();
                            self.events.push_back(NodeEvent::Connected {
                                conn: handle,
                                remote: conn.remote,
                            });
                        }
                        Event::Stream(StreamEvent::Available { dir: Dir::Bi }) => {
                            conn.flush_control();
                        }
                        Event::ConnectionLost { reason } => {
                            self.lost_conns.push(handle);
                            count_close(&mut self.stats.closed, &reason);
                            if !conn.established {
                                self.stats.handshakes_failed += 1;
                            }
                            if let Some(node) = conn.node
                                && !conn.established
                                && handshake_refused(&reason)
                            {
                                self.stats.handshakes_proof_failed += 1;
                                self.events.push_back(NodeEvent::ProofFailed {
                                    remote: conn.remote,
                                    node,
                                    reason: reason.to_string(),
                                });
                            }
                            self.events.push_back(NodeEvent::ConnectionLost {
                                conn: handle,
                                remote: conn.remote,
                                reason: reason.to_string(),
                            });
                        }
                        Event::Stream(StreamEvent::Opened { dir }) => {
                            while let Some(id) = conn.quic.streams().accept(dir) {
                                match dir {
                                    Dir::Bi => {
                                        if conn.control.is_none() {
                                            conn.control = Some(id);
                                            control_first(&mut conn.quic, id);
                                            conn.send_control(&self.hello);
                                        }
                                    }
                                    Dir::Uni => {
                                        conn.in_streams.insert(id, InStream::default());
                                    }
                                }
                                if self.reading || conn.control == Some(id) {
                                    read_stream(
                                        conn,
                                        id,
                                        &mut inputs,
                                        &mut self.stats.stream_bytes_copied,
                                    );
                                }
                            }
                        }
                        Event::Stream(StreamEvent::Readable { id }) => {
                            if self.reading || conn.control == Some(id) {
                                read_stream(
                                    conn,
                                    id,
                                    &mut inputs,
                                    &mut self.stats.stream_bytes_copied,
                                );
                            }
                        }
                        Event::Stream(StreamEvent::Writable { .. }) => {
                            conn.flush_control();
                        }
                        Event::Stream(_) | Event::HandshakeDataReady => {}
                        Event::DatagramReceived => {
                            while let Some(data) = conn.quic.datagrams().recv() {
                                inputs.push(Input::Gossip(data));
                            }
                        }
                        Event::DatagramsUnblocked => {}
                    }
                }
                if !progressed {
                    break;
                }
            }
        }
        if drained {
            if let Some(conn) = self.conns.remove(&handle) {
                if !conn.established && conn.node.is_none() {
                    self.handshaking = self.handshaking.saturating_sub(1);
                }
                self.stats.retired_quic.add(&conn.quic.stats().path);
                self.timers.remove(handle);
            }
            self.order.retain(|h| *h != handle);
            for listed in self.subscribers.values_mut() {
                listed.retain(|(h, _)| *h != handle);
            }
            self.race_forget(now, handle);
            return;
        }
        for input in inputs {
            self.apply(now, handle, input);
        }
        let before = self.conns.get(&handle).map(|c| c.taken_bytes);
        self.flush_out_streams(handle);
        let stall = self.config.stall_timeout;
        if let Some(conn) = self.conns.get_mut(&handle) {
            if conn.backlog == 0 || Some(conn.taken_bytes) != before {
                conn.progress_at = now;
            } else if !conn.closed && now.saturating_duration_since(conn.progress_at) > stall {
                // Its windows are full and stay full: it does not read (or cannot be
                // reached fast enough to be of use). What waits for it is already older
                // than live playback could use; the connection goes, and what it pinned.
                self.stats.stalled_closed += 1;
                conn.close(
                    now,
                    close_code::STALLED,
                    "took no data for the stall timeout",
                );
            }
        }
    }
}

/// Counts why a connection ended.
fn count_close(closed: &mut super::CloseReasons, reason: &ConnectionError) {
    match reason {
        ConnectionError::TimedOut => closed.idle_timeout += 1,
        ConnectionError::ApplicationClosed(_) => closed.application += 1,
        ConnectionError::TransportError(_) | ConnectionError::ConnectionClosed(_) => {
            closed.transport_error += 1;
        }
        ConnectionError::Reset => closed.reset += 1,
        _ => closed.other += 1,
    }
}

/// Whether a connection we dialled ended in its TLS handshake on our side's verdict: the node
/// that answered did not prove the id we expected (a QUIC crypto error, 0x100-0x1ff).
fn handshake_refused(reason: &ConnectionError) -> bool {
    matches!(reason, ConnectionError::TransportError(e)
        if (0x100..0x200).contains(&u64::from(e.code)))
}
