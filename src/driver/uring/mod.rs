//! The io_uring backend (Linux): one worker thread per core, each with its own ring, its own UDP
//! socket on the node's shared port (a `SO_REUSEPORT` group) and its own engine.
//!
//! - **Steering.** A classic BPF program on the socket group sends each packet to the socket
//!   `dcid[0] % workers` (see [`crate::node::cid`]); each worker's engine issues only connection
//!   ids that map to itself, so every packet of a connection reaches the worker holding it,
//!   whatever the client's address. Packets that arrive elsewhere are counted
//!   ([`DriverStats::misrouted`]).
//! - **Receive.** One multishot `recvmsg` per worker into a provided-buffer ring. Each buffer is
//!   a `BytesMut`; a completed one goes to the engine as is (the payload is not copied: quinn
//!   decrypts it in place) and a new buffer takes its slot. GRO batches are split by the segment
//!   size from their control message; ECN and the local address come from control messages too.
//!   When the kernel runs out of buffers the receive ends with `ENOBUFS`: counted, buffers
//!   refilled, receive re-armed, nothing stalls.
//! - **Send.** `sendmsg` with `UDP_SEGMENT` straight from the engine's transmit, ECN and source
//!   address as control messages; every send of a loop turn goes to the kernel in the one
//!   `io_uring_enter` that also waits. If the kernel refuses GSO, it is switched off for good
//!   (counted in [`DriverStats::gso_disabled`]) and the batch is resent datagram by datagram.
//! - **Timers.** The engine's own timer set; the worker waits no longer than its next deadline
//!   and reads the clock once per turn.
//! - **Across workers.** A shard stored by one worker (received from a parent, or published) is
//!   handed to every sibling as shared references through its mailbox, and the sibling's
//!   eventfd wakes it; siblings serve it to their own subscribers. No bytes are copied and no
//!   lock is shared on the way.

mod cmsg;
mod lock;
mod sys;
mod worker;

use worker::Worker;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::pulse::{Beat, Pulse};

use bytes::{Buf, BytesMut};
use quinn_proto::EcnCodepoint;
use socket2::{Domain, Protocol, Socket, Type};

use super::{Command, DriverStats, StartError};
use crate::keys::ChannelId;
use crate::node::{Engine, EngineError, NodeEvent, StoredShard, WorkerTag};

use sys::{BufRing, RecvHeader, Ring, SendSlot};

/// Longest a worker sleeps with nothing to do. Commands, imports and the stop flag wake it
/// by eventfd, and every deadline the engine has is a timer, so this only bounds how stale
/// its pulse grows (`/livez` calls a worker stuck at 5 s). An idle worker turns once a
/// second: every turn is a wake-up, which on a quiet relay was most of its CPU.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Datagrams up to this size are copied out and their buffer reused at once.
const SMALL_DATAGRAM: usize = 512;

/// Receive buffer size: a whole GRO batch (up to 64 KiB) plus name and control messages.
const RECV_BUF: usize = 64 * 1024 + 16 + sys::RECV_NAME_LEN as usize + sys::RECV_CONTROL_LEN;

const TAG_MASK: u64 = 0b11 << 62;
const TAG_SEND: u64 = 0;
const TAG_RECV: u64 = 1 << 62;
const TAG_WAKE: u64 = 2 << 62;
const TAG_CANCEL: u64 = 3 << 62;

/// The provided-buffer group id of every worker's receive ring (one group per ring).
const BUFFER_GROUP: u16 = 0;

/// io_uring backend settings.
#[derive(Debug, Clone)]
pub struct UringConfig {
    /// Worker threads (one ring, socket and engine each). Default: one per core.
    pub workers: usize,
    /// Pin worker `i` to CPU `i`.
    pub pin_cores: bool,
    /// Submission queue entries per ring.
    pub ring_entries: u32,
    /// Receive buffers per worker (a power of two), each a whole GRO batch.
    pub recv_buffers: u16,
    /// Sends in flight per worker.
    pub send_slots: usize,
    /// How long a worker's wait may gather completions once input is flowing, before its
    /// loop runs (kernel 6.12+; older kernels wake at the first completion). Longer means
    /// fewer loop turns and larger send batches per byte, and up to this much added to the
    /// handling of a datagram that arrives while the node is otherwise idle. QUIC's timers
    /// are not held back: a wait ends at the next one even within the window. At 3 ms the
    /// fan-out bench's worker ran under half the turns it ran at 0.5 ms and cost less per
    /// byte (docs/performance.md).
    pub batch_window: Duration,
    /// How late a QUIC timer may fire so that timers due close together run in one loop
    /// turn, as the kernel's own timer slack coalesces wake-ups: the wait ends at the last
    /// connection deadline within this of the first ([`Engine::poll_timeout_coalesced`]), and
    /// a deadline with none close behind it stays on time. Pacing is the timer that fires
    /// most: each connection sending a burst sets one for its next, and with many connections
    /// they fall microseconds apart. A late pacing timer does not make a burst larger (the
    /// pacer's bucket is capped at one burst); it shifts it. Zero: every timer ends the wait
    /// on time.
    pub timer_slack: Duration,
    /// Bytes of sends a loop turn queues before it hands them to the kernel and takes their
    /// completions back, instead of submitting everything at the end of the turn. The kernel
    /// copies each send while quinn-proto's packets are still in the core's cache, and the
    /// send slots come back at once, so the next packets are written into a buffer that is
    /// still in cache too (the free list hands out the slot freed last). Submitting only at
    /// the end, a turn that fans a chunk out wrote megabytes into up to every slot: on an
    /// Intel Xeon the io_uring worker then cost about 1.3× the portable backend, which writes
    /// and sends one buffer, at 100 subscribers and 1.5–1.8× at 10 (docs/performance.md).
    /// `usize::MAX`: only at the end of the turn, or when every slot is in flight.
    pub submit_after: usize,
    /// Attach the connection-id steering program. Only tests turn it off, to show what it
    /// prevents.
    pub steering: bool,
}

impl Default for UringConfig {
    fn default() -> Self {
        Self {
            workers: thread::available_parallelism().map_or(1, |n| n.get()),
            pin_cores: false,
            ring_entries: 1024,
            recv_buffers: 256,
            send_slots: 256,
            batch_window: Duration::from_millis(3),
            timer_slack: Duration::from_millis(1),
            submit_after: 64 * 1024,
            steering: true,
        }
    }
}

/// Checks that this process may use io_uring with everything the backend needs (ring, provided
/// buffer ring, multishot `recvmsg`), by receiving one datagram through it on loopback.
/// The error is what a refusing kernel or seccomp profile said.
pub fn probe() -> io::Result<()> {
    let mut ring = Ring::new(8)?;
    let bufs = BufRing::new(2, 2048)?;
    ring.register(&bufs, BUFFER_GROUP)?;
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let header = RecvHeader::new();
    ring.push_recv(sys::raw(&socket), &header, BUFFER_GROUP, TAG_RECV)?;
    ring.submit_and_wait(None)?;
    socket.send_to(b"probe", socket.local_addr()?)?;
    let mut done = Vec::new();
    #[allow(clippy::disallowed_methods)] // a driver reads the clock
    let deadline = Instant::now() + Duration::from_secs(1);
    #[allow(clippy::disallowed_methods)]
    while done.is_empty() && Instant::now() < deadline {
        ring.submit_and_wait(Some(Duration::from_millis(50)))?;
        ring.completions(&mut done);
    }
    let result = match done.first() {
        Some(&(_, res, _)) if res >= 0 => Ok(()),
        Some(&(_, res, _)) => Err(io::Error::from_raw_os_error(-res)),
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "multishot recvmsg delivered nothing",
        )),
    };
    // Stop the receive before its buffers go away.
    ring.push_cancel(TAG_RECV, TAG_CANCEL)?;
    let mut rest = Vec::new();
    for _ in 0..20 {
        ring.submit_and_wait(Some(Duration::from_millis(10)))?;
        ring.completions(&mut rest);
        if rest
            .iter()
            .any(|&(d, _, f)| d == TAG_RECV && !sys::cqe_more(f))
        {
            drop(ring);
            drop(bufs);
            return result;
        }
    }
    // The kernel still holds the receive: keep its buffers alive rather than risk a write
    // into freed memory.
    std::mem::forget(bufs);
    result
}

/// The classic BPF steering program: socket index = first destination-connection-id byte
/// modulo `workers`. Long headers carry the DCID at offset 6, short headers at offset 1.
fn steering_program(workers: u8) -> [libc::sock_filter; 7] {
    // BPF_LD | BPF_B | BPF_ABS (BPF_LD is 0).
    const LD_B_ABS: u16 = 0x10 | 0x20;
    // BPF_JMP | BPF_JSET | BPF_K (BPF_K is 0).
    const JSET_K: u16 = 0x05 | 0x40;
    // BPF_JMP | BPF_JA (BPF_JA is 0).
    const JA: u16 = 0x05;
    // BPF_ALU | BPF_MOD | BPF_K.
    const MOD_K: u16 = 0x04 | 0x90;
    // BPF_RET | BPF_A.
    const RET_A: u16 = 0x06 | 0x10;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        op(LD_B_ABS, 0, 0, 0),
        op(JSET_K, 0, 2, 0x80),
        op(LD_B_ABS, 0, 0, 6),
        op(JA, 0, 0, 1),
        op(LD_B_ABS, 0, 0, 1),
        op(MOD_K, 0, 0, u32::from(workers.max(1))),
        op(RET_A, 0, 0, 0),
    ]
}

/// Which worker the steering rule gives `packet` to (`None`: too short to say).
fn steered_to(packet: &[u8], workers: u8) -> Option<u8> {
    let first = *packet.first()?;
    let byte = if first & 0x80 != 0 {
        *packet.get(6)?
    } else {
        *packet.get(1)?
    };
    Some(WorkerTag::owner_of(workers, byte))
}

/// The address to give the kernel: IPv4 peers of a dual-stack socket as mapped addresses.
fn wire_addr(v6_socket: bool, to: SocketAddr) -> SocketAddr {
    match (v6_socket, to) {
        (true, SocketAddr::V4(v4)) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        _ => to,
    }
}

/// What a worker's mailbox carries.
enum Mail {
    Command(Command),
    Import(Arc<Vec<(ChannelId, Vec<StoredShard>)>>),
}

/// A worker's mailbox: the queue and the eventfd that wakes it.
#[derive(Clone)]
pub(crate) struct Mailbox {
    queue: Sender<Mail>,
    wake: Arc<File>,
}

impl Mailbox {
    /// Runs `command` on the worker's engine. False if the worker has stopped.
    pub(crate) fn command(&self, command: Command) -> bool {
        self.post(Mail::Command(command))
    }

    fn post(&self, mail: Mail) -> bool {
        let sent = self.queue.send(mail).is_ok();
        self.wake();
        sent
    }

    fn wake(&self) {
        let _ = (&*self.wake).write(&1u64.to_ne_bytes());
    }
}

/// A running io_uring node: its workers, their mailboxes, and the port lock.
pub struct UringNode {
    local: SocketAddr,
    mailboxes: Vec<Mailbox>,
    threads: Vec<JoinHandle<io::Result<(Engine, DriverStats)>>>,
    pulses: Vec<Arc<Pulse>>,
    stop: Arc<AtomicBool>,
    _lock: UnixDatagram,
}

impl std::fmt::Debug for UringNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringNode")
            .field("local", &self.local)
            .field("workers", &self.mailboxes.len())
            .finish_non_exhaustive()
    }
}

fn bind_member(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Large kernel buffers absorb bursts between loop turns; the kernel caps them at rmem_max.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    let fd = sys::raw(&socket);
    sys::setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1)?;
    // Each datagram's arrival time, so that QUIC dates it by when it came and not by when the
    // loop turned to it (see `driver/arrival.rs`). Without it, the turn's time is used.
    let _ = sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1);
    if addr.is_ipv6() {
        sys::setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS, 1)?;
        sys::setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
        sys::setsockopt_int(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
        )?;
        // The dual-stack socket's IPv4 side: ECN, the local address, and the don't-fragment
        // bit on datagrams to IPv4 peers (IPV6_MTU_DISCOVER governs only IPv6 ones, and
        // without it path MTU probes to an IPv4 peer could pass as fragments).
        let _ = sys::setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVTOS, 1);
        let _ = sys::setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1);
        let _ = sys::setsockopt_int(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        );
    } else {
        sys::setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVTOS, 1)?;
        sys::setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
        sys::setsockopt_int(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        )?;
    }
    Ok(socket)
}

/// Ephemeral ports tried before giving up when each one turns out shared.
const EPHEMERAL_TRIES: usize = 32;

impl UringNode {
    /// Binds `addr` with `config.workers` sockets in one reuseport group, makes each worker's
    /// engine with `make` (given its [`WorkerTag`]; set [`crate::node::EngineConfig::worker`]
    /// and `export_shards` from it), and starts the workers. Events from every worker go to
    /// `events`.
    pub fn start(
        addr: SocketAddr,
        config: &UringConfig,
        mut make: impl FnMut(WorkerTag) -> Result<Engine, EngineError>,
        events: &Sender<NodeEvent>,
    ) -> Result<Self, StartError> {
        let count = config.workers.clamp(1, 128);
        // The lock (see `lock`) is taken before joining the group when the port is fixed, so
        // a refused second process never receives a packet; port 0 picks a fresh port nobody
        // else has yet.
        let lock_port = |port: u16| lock::lock_port(addr.ip(), port);
        let early = if addr.port() == 0 {
            None
        } else {
            Some(lock_port(addr.port())?)
        };
        let bound = |socket: &Socket| -> Result<SocketAddr, StartError> {
            Ok(socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("bound socket has no IP address"))?)
        };
        let (first, local, lock) = match early {
            Some(lock) => {
                let first = bind_member(addr)?;
                let local = bound(&first)?;
                (first, local, lock)
            }
            None => {
                // With SO_REUSEPORT the kernel may hand out an ephemeral port that another
                // gridcast process's group already holds: that is no conflict of the user's
                // making, so take another port (a bounded number of times).
                // Shared ones are held until a free one is found, so none comes back twice.
                let mut shared = Vec::new();
                loop {
                    let first = bind_member(addr)?;
                    let local = bound(&first)?;
                    match lock_port(local.port()) {
                        Ok(lock) => break (first, local, lock),
                        Err(StartError::PortShared(_)) if shared.len() < EPHEMERAL_TRIES => {
                            tracing::debug!(port = local.port(), "ephemeral port shared; another");
                            shared.push(first);
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        };
        let mut sockets = vec![first];
        for _ in 1..count {
            sockets.push(bind_member(local)?);
        }
        if config.steering && count > 1 {
            sys::attach_reuseport_cbpf(sys::raw(&sockets[0]), &steering_program(count as u8))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut mailboxes = Vec::with_capacity(count);
        let mut inboxes = Vec::with_capacity(count);
        for _ in 0..count {
            let (queue, inbox) = mpsc::channel();
            mailboxes.push(Mailbox {
                queue,
                wake: Arc::new(sys::eventfd()?),
            });
            inboxes.push(inbox);
        }
        let mut threads = Vec::with_capacity(count);
        let mut pulses = Vec::with_capacity(count);
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        for (index, (socket, inbox)) in sockets.into_iter().zip(inboxes).enumerate() {
            let tag = WorkerTag {
                index: index as u8,
                count: count as u8,
            };
            let engine = make(tag)?;
            let siblings: Vec<Mailbox> = mailboxes
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != index)
                .map(|(_, m)| m.clone())
                .collect();
            let wake = Arc::clone(&mailboxes[index].wake);
            let events = events.clone();
            let stop = Arc::clone(&stop);
            let config = config.clone();
            let ready = ready_tx.clone();
            #[allow(clippy::disallowed_methods)] // the pulse starts now
            let pulse = Pulse::new(Instant::now());
            pulses.push(Arc::clone(&pulse));
            let thread = thread::Builder::new()
                .name(format!("gridcast-io-{index}"))
                .spawn(move || {
                    if config.pin_cores {
                        let _ = sys::pin_to_cpu(index);
                    }
                    let beat = Arc::clone(&pulse);
                    let worker = match Worker::new(
                        tag, &config, socket, engine, inbox, wake, siblings, events, stop, beat,
                    ) {
                        Ok(w) => {
                            let _ = ready.send(Ok(()));
                            w
                        }
                        Err(e) => {
                            let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
                            return Err(e);
                        }
                    };
                    let result = worker.run();
                    pulse.mark_stopped();
                    result
                })?;
            threads.push(thread);
        }
        drop(ready_tx);
        let mut node = Self {
            local,
            mailboxes,
            threads,
            pulses,
            stop,
            _lock: lock,
        };
        for _ in 0..count {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    node.shutdown();
                    return Err(e.into());
                }
                Err(_) => {
                    node.shutdown();
                    return Err(io::Error::other("an io_uring worker died while starting").into());
                }
            }
        }
        Ok(node)
    }

    /// The bound address (shared by every worker).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.mailboxes.len()
    }

    /// Every worker's pulse, in worker order.
    pub fn pulses(&self) -> Vec<Arc<Pulse>> {
        self.pulses.clone()
    }

    /// Every worker's mailbox, in worker order.
    pub(crate) fn mailboxes(&self) -> Vec<Mailbox> {
        self.mailboxes.clone()
    }

    /// Runs `command` on worker `worker`'s engine. False if that worker has stopped.
    pub fn command(&self, worker: usize, command: Command) -> bool {
        self.mailboxes
            .get(worker)
            .is_some_and(|m| m.post(Mail::Command(command)))
    }

    fn shutdown(&mut self) -> Vec<io::Result<(Engine, DriverStats)>> {
        self.stop.store(true, Ordering::Relaxed);
        for m in &self.mailboxes {
            m.wake();
        }
        self.threads
            .drain(..)
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(io::Error::other("io_uring worker panicked")))
            })
            .collect()
    }

    /// Stops every worker and returns their engines and counters, in worker order.
    pub fn stop(mut self) -> io::Result<Vec<(Engine, DriverStats)>> {
        self.shutdown().into_iter().collect()
    }
}

impl Drop for UringNode {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            let _ = self.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steering_rule_reads_the_dcid_of_both_header_forms() {
        // Short header: flags, then the DCID.
        assert_eq!(steered_to(&[0x40, 7, 1, 2], 4), Some(3));
        // Long header: flags, version (4), DCID length, DCID.
        assert_eq!(steered_to(&[0xc0, 0, 0, 0, 1, 8, 9, 0], 4), Some(1));
        assert_eq!(steered_to(&[0xc0, 0, 0], 4), None);
        assert_eq!(steered_to(&[], 4), None);
    }
}
