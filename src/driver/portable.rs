//! The portable backend: one thread driving one engine on one UDP socket via quinn-udp.
//!
//! Each loop turn: while input flows, let [`BATCH_WINDOW`] gather more of it; take what waits
//! in the socket without blocking, and only when nothing does, wait in `poll` for the socket
//! or the driver's [`Waker`] (no longer than the engine's next timer, and at most
//! [`MAX_WAIT`]); read the clock once, feed every received datagram (GRO batches split by
//! their stride), run queued commands, fire due timers, send every transmit (GSO batches in
//! one `sendmsg`), and forward the engine's events. The io_uring worker's loop has the same
//! shape, its wait in the ring.
//!
//! The socket stays non-blocking, as quinn-udp expects: its `recvmmsg` asks for a whole batch
//! without `MSG_WAITFORONE`, so on a blocking socket with a read timeout (this driver before
//! it had a waker) a turn that had one datagram waited for the batch's other seven, each up to
//! the timeout.

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

/// Longest a loop turn waits with nothing due: commands and the stop flag wake the wait
/// ([`Waker`]) and every deadline is an engine timer, so this only keeps the pulse fresh
/// (`/livez` calls a worker stuck at 5 s), as the io_uring worker's longest wait does. It
/// was 5 ms before commands could wake the wait: 200 wake-ups a second on an idle node.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// How long a turn's wait gathers input once it is flowing, the io_uring worker's default
/// (`UringConfig::batch_window`): fewer loop turns and larger send batches per byte, and up to
/// this much added to a datagram's handling while datagrams keep coming.
pub const BATCH_WINDOW: Duration = Duration::from_millis(3);

/// How late a QUIC timer may fire so that timers due close together run in one turn, the
/// io_uring worker's default (`UringConfig::timer_slack`; `Engine::poll_timeout_coalesced`).
pub const TIMER_SLACK: Duration = Duration::from_millis(1);

/// Receive calls in one turn at most while each fills every buffer (8 GRO batches each).
const RECV_ROUNDS: usize = 8;

/// Largest UDP payload received in one piece (a whole GRO batch fits).
const RECV_BUF: usize = 64 * 1024;

/// One engine on one UDP socket.
#[derive(Debug)]
pub struct PortableDriver {
    socket: UdpSocket,
    state: UdpSocketState,
    engine: Engine,
    local: SocketAddr,
    /// Where the [`Waker`]'s bytes arrive (polled with the socket, drained unread).
    wake_rx: UdpSocket,
    waker: Waker,
    stats: DriverStats,
    /// Received datagrams dated by their arrival (`driver/arrival.rs`).
    dating: super::Dating,
}

/// Ends a [`PortableDriver`]'s wait from another thread: one byte over a loopback socket pair
/// of the driver's own, polled with its socket. Wakes are coalesced: only the first since the
/// driver last drained them sends. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Waker(Arc<WakerInner>);

#[derive(Debug)]
struct WakerInner {
    tx: UdpSocket,
    /// A byte is on its way that the driver has not drained yet.
    pending: AtomicBool,
}

impl Waker {
    /// The waker and the socket its bytes arrive on, connected to each other so that
    /// nothing else reaches it; on 127.0.0.1, or ::1 where a host has no IPv4 loopback.
    fn pair() -> io::Result<(Self, UdpSocket)> {
        let connected = |ip: std::net::IpAddr| -> io::Result<(UdpSocket, UdpSocket)> {
            let tx = UdpSocket::bind(SocketAddr::new(ip, 0))?;
            let rx = UdpSocket::bind(SocketAddr::new(ip, 0))?;
            tx.connect(rx.local_addr()?)?;
            rx.connect(tx.local_addr()?)?;
            tx.set_nonblocking(true)?;
            rx.set_nonblocking(true)?;
            Ok((tx, rx))
        };
        let (tx, rx) = connected(std::net::Ipv4Addr::LOCALHOST.into())
            .or_else(|_| connected(std::net::Ipv6Addr::LOCALHOST.into()))?;
        let waker = Self(Arc::new(WakerInner {
            tx,
            pending: AtomicBool::new(false),
        }));
        Ok((waker, rx))
    }

    /// Ends the driver's current or next wait.
    pub fn wake(&self) {
        if !self.0.pending.swap(true, Ordering::AcqRel) && self.0.tx.send(&[0]).is_err() {
            // Nothing left to drain: let the next wake try again (this one's command is
            // found at the latest when the longest wait ends).
            self.0.pending.store(false, Ordering::Release);
        }
    }
}

/// Queues commands for a [`PortableDriver`] and wakes it.
#[derive(Debug, Clone)]
pub struct Mailbox {
    commands: Sender<Command>,
    waker: Waker,
}

impl Mailbox {
    /// Queues `command` and wakes the driver. False if the driver has stopped.
    pub fn command(&self, command: Command) -> bool {
        let sent = self.commands.send(command).is_ok();
        if sent {
            self.waker.wake();
        }
        sent
    }

    /// Ends the driver's wait (after its stop flag is set).
    pub fn wake(&self) {
        self.waker.wake();
    }
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
        // quinn-udp leaves the socket non-blocking (it is made for async runtimes); the loop
        // waits in `poll`.
        let state = UdpSocketState::new((&socket).into())?;
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
        let (waker, wake_rx) = Waker::pair()?;
        Ok(Self {
            socket,
            state,
            engine,
            local,
            wake_rx,
            waker,
            stats: DriverStats::default(),
            dating: super::Dating::default(),
        })
    }

    /// A mailbox for commands to this driver, which wakes it; `commands` is the sending end
    /// of what [`PortableDriver::run`] is given.
    pub fn mailbox(&self, commands: Sender<Command>) -> Mailbox {
        Mailbox {
            commands,
            waker: self.waker.clone(),
        }
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

    /// Takes the datagrams waiting in the socket, without blocking.
    fn recv(&self, bufs: &mut [Vec<u8>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        self.state.recv((&self.socket).into(), &mut slices, meta)
    }

    /// Feeds what one [`PortableDriver::recv`] took to the engine (GRO batches split by their
    /// stride). How many receive buffers it filled; an error that ends the driver is
    /// returned, the ones that only mean "nothing now" count as none.
    fn feed(
        &mut self,
        now: Instant,
        received: io::Result<usize>,
        bufs: &[Vec<u8>],
        meta: &[RecvMeta],
    ) -> io::Result<usize> {
        let n = match received {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(0);
            }
            // ICMP errors surface here on Linux; the engine's timers handle the loss.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(0),
            Err(e) => return Err(e),
        };
        let real_now = super::wall_clock();
        for (m, buf) in meta.iter().zip(bufs).take(n) {
            let stride = m.stride.max(1);
            // The kernel's receive time (quinn-udp asks for `SO_TIMESTAMPNS`), not the turn's.
            let at = self.dating.date(now, real_now, m.timestamp);
            if m.timestamp.is_some() {
                self.stats.rx_timestamped += 1;
            }
            self.stats.gro_batches += 1;
            self.stats.bytes_in += m.len as u64;
            for datagram in buf[..m.len].chunks(stride) {
                self.stats.datagrams_in += 1;
                self.stats.rx_bytes_copied += datagram.len() as u64;
                let ecn = m
                    .ecn
                    .and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
                self.engine.handle_datagram(
                    at,
                    plain_addr(m.addr),
                    m.dst_ip.map(|ip| ip.to_canonical()),
                    ecn,
                    BytesMut::from(datagram),
                );
            }
        }
        Ok(n)
    }

    /// Waits up to `wait` for the [`Waker`] to ring (draining its bytes) or, with `input`,
    /// for the socket to be readable. Whether the socket is readable (an error to report
    /// counts), and whether the waker rang.
    fn wait(&mut self, wait: Duration, input: bool) -> io::Result<(bool, bool)> {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let timeout =
            Timespec::try_from(wait).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let socket = if input {
            PollFlags::IN
        } else {
            PollFlags::empty()
        };
        let mut fds = [
            PollFd::new(&self.wake_rx, PollFlags::IN),
            PollFd::new(&self.socket, socket),
        ];
        let polled = if input { &mut fds[..] } else { &mut fds[..1] };
        match rustix::event::poll(polled, Some(&timeout)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok((false, false)),
            Err(e) => return Err(e.into()),
        }
        let rang = !fds[0].revents().is_empty();
        if rang {
            self.stats.wakes += 1;
            let mut byte = [0u8; 8];
            while self.wake_rx.recv(&mut byte).is_ok() {}
            // Drained first: a wake after this sends again, one before it had its command
            // queued already, and the loop looks at commands next.
            self.waker.0.pending.store(false, Ordering::Release);
        }
        Ok((input && !fds[1].revents().is_empty(), rang))
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
        let mut flowing = false;
        while !stop.load(Ordering::Relaxed) {
            self.stats.turns += 1;
            // Work of the previous turn ends where this wait begins.
            #[allow(clippy::disallowed_methods)] // twice per turn: busy time is measured
            let worked = Instant::now();
            beat.worked(now, worked);
            let until_timer = self
                .engine
                .poll_timeout_coalesced(TIMER_SLACK)
                .map_or(MAX_WAIT, |t| t.saturating_duration_since(worked))
                .min(MAX_WAIT);
            // While input flows, the window gathers more of it before the turn (a command
            // ends it, a timer is never held back).
            let gathered = if flowing {
                until_timer.min(BATCH_WINDOW)
            } else {
                Duration::ZERO
            };
            // A command or the stop flag that ended the window is handled this turn.
            let rang = !gathered.is_zero() && self.wait(gathered, false)?.1;
            // What is waiting, and only when nothing is, a wait for input or a wake until
            // the next timer.
            let mut received = self.recv(&mut bufs, &mut meta);
            let left = until_timer.saturating_sub(gathered);
            if !rang
                && !left.is_zero()
                && received
                    .as_ref()
                    .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
                && self.wait(left, true)?.0
            {
                received = self.recv(&mut bufs, &mut meta);
            }
            #[allow(clippy::disallowed_methods)] // read once per loop turn
            {
                now = Instant::now();
            }
            beat.turn(now, &self.stats);
            // A full batch means more waits: take it too, a bounded number of times so that
            // timers and sends still run.
            let mut filled = self.feed(now, received, &bufs, &meta)?;
            flowing = filled > 0;
            for _ in 1..RECV_ROUNDS {
                if filled < bufs.len() {
                    break;
                }
                let received = self.recv(&mut bufs, &mut meta);
                filled = self.feed(now, received, &bufs, &meta)?;
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
            // What arrives from here on is dated no earlier than this turn.
            self.dating.turn_seen(now);
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
