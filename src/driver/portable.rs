//! The portable backend: one thread driving one engine on one UDP socket via quinn-udp.
//!
//! Each loop turn: wait for a datagram (no longer than the engine's next timeout, and at most
//! [`MAX_WAIT`] so commands are not delayed), read the clock once, feed every received datagram
//! (GRO batches split by their stride), run queued commands, fire due timers, send every
//! transmit (GSO batches in one `sendmsg`), and forward the engine's events.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};

use super::{Command, DriverStats};
use crate::node::{Engine, NodeEvent};

/// Longest a loop turn waits for a datagram before looking at commands and timers again.
pub const MAX_WAIT: Duration = Duration::from_millis(5);

/// Largest UDP payload received in one piece (a whole GRO batch fits).
const RECV_BUF: usize = 64 * 1024;

/// One engine on one UDP socket.
#[derive(Debug)]
pub struct PortableDriver {
    socket: UdpSocket,
    state: UdpSocketState,
    engine: Engine,
    local: SocketAddr,
    stats: DriverStats,
}

impl PortableDriver {
    /// Binds `addr` and prepares the socket (GRO, ECN, packet info) for `engine`.
    pub fn bind(addr: SocketAddr, engine: Engine) -> io::Result<Self> {
        let socket = {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )?;
            if addr.is_ipv6() {
                // Dual-stack whatever the host's `net.ipv6.bindv6only`: IPv4 peers arrive
                // as mapped addresses (made plain again below).
                s.set_only_v6(false)?;
            }
            s.bind(&addr.into())?;
            UdpSocket::from(s)
        };
        let state = UdpSocketState::new((&socket).into())?;
        // quinn-udp leaves the socket non-blocking (it is made for async runtimes); this loop
        // blocks in recv with a timeout instead, so it must not spin.
        socket.set_nonblocking(false)?;
        // Large kernel buffers absorb bursts (a thousand children's ACKs) between loop turns,
        // as in the io_uring driver; the kernel caps them at rmem_max / wmem_max.
        let sock = socket2::SockRef::from(&socket);
        let _ = sock.set_recv_buffer_size(4 << 20);
        let _ = sock.set_send_buffer_size(4 << 20);
        if state.may_fragment() && engine.config().mtu_discovery {
            // Probes would pass as IP fragments and prove nothing about the path.
            tracing::warn!(
                "this platform cannot set the don't-fragment bit; path MTU discovery is unreliable"
            );
        }
        let local = socket.local_addr()?;
        let mut engine = engine;
        // What this socket can segment (1 where the platform has no GSO).
        let segments = engine
            .config()
            .max_gso_segments
            .min(state.max_gso_segments());
        engine.set_max_gso_segments(segments);
        Ok(Self {
            socket,
            state,
            engine,
            local,
            stats: DriverStats::default(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The engine, for setup before [`PortableDriver::run`].
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Sends everything the engine has to send now.
    fn send_all(&mut self, now: Instant, tx: &mut Vec<u8>) {
        while let Some(t) = self.engine.poll_transmit(now, tx) {
            let transmit = Transmit {
                destination: wire_addr(self.local, t.destination),
                ecn: t
                    .ecn
                    .and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
                contents: &tx[..t.size],
                segment_size: t.segment_size,
                src_ip: t.src_ip,
            };
            self.stats.sends += 1;
            self.stats.datagrams_out +=
                t.segment_size.map_or(1, |s| t.size.div_ceil(s.max(1))) as u64;
            self.stats.bytes_out += t.size as u64;
            if let Err(e) = self.state.try_send((&self.socket).into(), &transmit) {
                self.stats
                    .send_refused(e.raw_os_error().unwrap_or(libc::EAGAIN));
            }
        }
    }

    /// Runs until `stop` is set or `commands` is closed. Events go to `events` (dropped if nobody
    /// listens). Returns the engine and the counters.
    pub fn run(
        mut self,
        commands: &Receiver<Command>,
        events: &Sender<NodeEvent>,
        stop: &Arc<AtomicBool>,
        pulse: &Arc<super::pulse::Pulse>,
    ) -> io::Result<(Engine, DriverStats)> {
        let mut bufs: Vec<Vec<u8>> = (0..quinn_udp::BATCH_SIZE.min(8))
            .map(|_| vec![0u8; RECV_BUF])
            .collect();
        let mut meta = vec![RecvMeta::default(); bufs.len()];
        let mut tx = Vec::with_capacity(RECV_BUF);
        #[allow(clippy::disallowed_methods)] // the driver owns the clock
        let mut now = Instant::now();
        let mut beat = super::pulse::Beat::new(Arc::clone(pulse), now);
        while !stop.load(Ordering::Relaxed) {
            self.stats.turns += 1;
            // Work of the previous turn ends where this wait begins.
            #[allow(clippy::disallowed_methods)] // twice per turn: busy time is measured
            beat.worked(now, Instant::now());
            // Wait for input, no longer than the next timer.
            let wait = self
                .engine
                .poll_timeout()
                .map_or(MAX_WAIT, |t| t.saturating_duration_since(now))
                .clamp(Duration::from_micros(50), MAX_WAIT);
            self.socket.set_read_timeout(Some(wait))?;
            let received = {
                let mut slices: Vec<IoSliceMut<'_>> =
                    bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                self.state
                    .recv((&self.socket).into(), &mut slices, &mut meta)
            };
            #[allow(clippy::disallowed_methods)] // read once per loop turn
            {
                now = Instant::now();
            }
            beat.turn(now, &self.stats);
            match received {
                Ok(n) => {
                    for (m, buf) in meta.iter().zip(&bufs).take(n) {
                        let stride = m.stride.max(1);
                        self.stats.gro_batches += 1;
                        self.stats.bytes_in += m.len as u64;
                        for datagram in buf[..m.len].chunks(stride) {
                            self.stats.datagrams_in += 1;
                            self.stats.rx_bytes_copied += datagram.len() as u64;
                            let ecn = m
                                .ecn
                                .and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
                            self.engine.handle_datagram(
                                now,
                                plain_addr(m.addr),
                                m.dst_ip.map(|ip| ip.to_canonical()),
                                ecn,
                                BytesMut::from(datagram),
                            );
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                // ICMP errors surface here on Linux; the engine's timers handle the loss.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e),
            }
            loop {
                match commands.try_recv() {
                    Ok(command) => command(&mut self.engine, now),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            }
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine.handle_timeout(now);
            }
            self.send_all(now, &mut tx);
            while let Some(event) = self.engine.poll_event() {
                let _ = events.send(event);
            }
        }
        // Every neighbour hears that this node stops (one close packet each, best effort).
        self.engine.close_all(now);
        self.send_all(now, &mut tx);
        beat.flush(now, &self.stats);
        Ok((self.engine, self.stats))
    }
}

/// The address to give the kernel: IPv4 peers of a dual-stack socket as mapped addresses.
/// quinn-udp passes the destination as it is; Linux takes a `sockaddr_in` on a dual-stack
/// socket, but the BSDs and macOS, where this backend also runs, refuse it.
fn wire_addr(local: SocketAddr, to: SocketAddr) -> SocketAddr {
    match (local, to) {
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        _ => to,
    }
}

/// A peer's address as the engine keeps it: an IPv4 peer of a dual-stack socket as the plain
/// IPv4 address its link names, not the mapped form the kernel reports.
fn plain_addr(from: SocketAddr) -> SocketAddr {
    match from {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => from,
        },
        SocketAddr::V4(_) => from,
    }
}
