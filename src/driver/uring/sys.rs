//! The unsafe part of the io_uring backend, kept small: the ring, the provided-buffer ring the
//! kernel receives into, the send slots whose memory the kernel reads, and the socket options
//! std and socket2 do not cover. Everything above this module is safe code.

#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use io_uring::types::{BufRingEntry, Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};

/// Which optional ring features the kernel accepted.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RingFeatures {
    /// `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN` (kernel 6.1+).
    pub(crate) defer_taskrun: bool,
    /// `IORING_FEAT_MIN_TIMEOUT` (kernel 6.12+): a wait can ask for several completions but
    /// settle for one after a short while.
    pub(crate) min_timeout: bool,
}

/// Completions a busy worker's wait gathers before its loop runs (past its own sends).
const BATCH_WAKE: usize = 64;

/// One worker's ring.
pub(crate) struct Ring {
    ring: IoUring,
    pub(crate) features: RingFeatures,
    /// Sends queued since completions were last taken: each will post one completion.
    sends_unreaped: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

impl Ring {
    /// A ring with `entries` submission slots, created on (and only ever used from) the calling
    /// thread. Asks for single-issuer deferred task running and falls back without it.
    pub(crate) fn new(entries: u32) -> io::Result<Self> {
        let cq = entries.saturating_mul(4);
        let tuned = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_cqsize(cq)
            .build(entries);
        match tuned {
            Ok(ring) => Ok(Self {
                features: RingFeatures {
                    defer_taskrun: true,
                    min_timeout: ring.params().is_feature_min_timeout(),
                },
                ring,
                sends_unreaped: 0,
            }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let ring = IoUring::builder().setup_cqsize(cq).build(entries)?;
                Ok(Self {
                    features: RingFeatures {
                        defer_taskrun: false,
                        min_timeout: ring.params().is_feature_min_timeout(),
                    },
                    ring,
                    sends_unreaped: 0,
                })
            }
            Err(e) => Err(e),
        }
    }

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry built by this module points only at memory that stays valid
            // until its completion: the boxed msghdrs of `RecvHeader` and `SendSlot`, the buffer
            // ring, and nothing else. The callers keep those alive (see their docs).
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            // Full: hand what is queued to the kernel and try again.
            self.ring.submit()?;
        }
    }

    /// Arms the multishot receive on `fd` into buffer group `group`.
    pub(crate) fn push_recv(
        &mut self,
        fd: RawFd,
        header: &RecvHeader,
        group: u16,
        user_data: u64,
    ) -> io::Result<()> {
        let entry = opcode::RecvMsgMulti::new(Fd(fd), &raw const *header.msg, group)
            .build()
            .user_data(user_data);
        self.push(&entry)
    }

    /// Queues the datagram(s) in `slot` for sending on `fd`.
    pub(crate) fn push_send(
        &mut self,
        fd: RawFd,
        slot: &SendSlot,
        user_data: u64,
    ) -> io::Result<()> {
        let entry = opcode::SendMsg::new(Fd(fd), &raw const *slot.msg)
            .build()
            .user_data(user_data);
        self.push(&entry)?;
        self.sends_unreaped += 1;
        Ok(())
    }

    /// Arms a multishot readiness poll on `fd` (the worker's eventfd).
    pub(crate) fn push_poll(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(user_data);
        self.push(&entry)
    }

    /// Cancels the operation queued with `target`.
    pub(crate) fn push_cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data);
        self.push(&entry)
    }

    /// Sends queued since completions were last taken.
    pub(crate) fn sends_unreaped(&self) -> usize {
        self.sends_unreaped
    }

    /// Submits everything queued and waits for one completion, at most `timeout`
    /// (`None`: do not wait). One `io_uring_enter`.
    pub(crate) fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.enter(timeout, 1, None)
    }

    /// Like [`Ring::submit_and_wait`], but the completions of the sends queued since
    /// completions were last taken do not count: they mostly arrive at once (UDP sends finish
    /// during submission), and waking for them would cost a second trip round the loop, and a
    /// second `io_uring_enter`, for every one that sends.
    ///
    /// Where the kernel has minimum-wait timeouts, a wait that starts while input is flowing
    /// gathers up to [`BATCH_WAKE`] completions for at most `window` before the loop runs: a
    /// busy node then handles several children's ACKs per turn and sends in larger batches,
    /// while an idle one still wakes at the first completion once the window has passed (the
    /// window counts from the start of the wait). Past the window any completion in the queue
    /// ends the wait, sends' included, so the worker takes its sends' completions before it
    /// waits there. The kernel holds the wait for the whole
    /// window even when `timeout` is shorter, so a caller that wants its timers on time passes
    /// a window no longer than the timeout.
    pub(crate) fn submit_and_wait_past_sends(
        &mut self,
        timeout: Option<Duration>,
        window: Duration,
    ) -> io::Result<()> {
        if self.features.min_timeout {
            self.enter(timeout, self.sends_unreaped + BATCH_WAKE, Some(window))
        } else {
            self.enter(timeout, self.sends_unreaped + 1, None)
        }
    }

    fn enter(
        &mut self,
        timeout: Option<Duration>,
        want: usize,
        min_wait: Option<Duration>,
    ) -> io::Result<()> {
        let ready = self.ring.completion().len();
        let result = match timeout {
            None => self.ring.submit(),
            Some(_) if ready >= want => self.ring.submit(),
            Some(t) => {
                let ts = Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
                let mut args = SubmitArgs::new();
                if let Some(w) = min_wait {
                    args = args.min_wait_usec(u32::try_from(w.as_micros()).unwrap_or(u32::MAX));
                }
                let args = args.timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Completions the kernel dropped so far because the completion queue was full.
    pub(crate) fn overflows(&mut self) -> u64 {
        u64::from(self.ring.completion().overflow())
    }

    /// Takes every completion now available: `(user_data, result, flags)`.
    pub(crate) fn completions(&mut self, out: &mut Vec<(u64, i32, u32)>) {
        self.sends_unreaped = 0;
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            out.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
    }

    /// Registers `bufs` as provided-buffer group `group`.
    pub(crate) fn register(&mut self, bufs: &BufRing, group: u16) -> io::Result<()> {
        // SAFETY: `bufs.ring` is a page-aligned allocation of `bufs.entries` entries that lives
        // until `BufRing` is dropped, and the worker drops its `BufRing` only after the ring
        // (field order in `Worker`), whose closing unregisters the group.
        unsafe {
            self.ring.submitter().register_buf_ring_with_flags(
                bufs.ring.as_ptr() as u64,
                bufs.entries,
                group,
                0,
            )
        }
    }
}

/// Whether more completions follow for a multishot operation.
pub(crate) fn cqe_more(flags: u32) -> bool {
    cqueue::more(flags)
}

/// The provided buffer a completion used.
pub(crate) fn cqe_buffer(flags: u32) -> Option<u16> {
    cqueue::buffer_select(flags)
}

/// The buffers the kernel receives into. Each is a `BytesMut` of its own; a completed buffer is
/// handed to the engine as is (no copy) and its slot gets a fresh one.
pub(crate) struct BufRing {
    ring: NonNull<BufRingEntry>,
    layout: Layout,
    entries: u16,
    tail: u16,
    buf_size: usize,
    bufs: Vec<Option<BytesMut>>,
}

impl std::fmt::Debug for BufRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufRing")
            .field("entries", &self.entries)
            .field("buf_size", &self.buf_size)
            .finish_non_exhaustive()
    }
}

impl BufRing {
    /// `entries` (a power of two, at most 32768) buffers of `buf_size` bytes.
    pub(crate) fn new(entries: u16, buf_size: usize) -> io::Result<Self> {
        if !entries.is_power_of_two() || entries > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "receive buffer count must be a power of two up to 32768",
            ));
        }
        let size = usize::from(entries) * std::mem::size_of::<BufRingEntry>();
        let layout = Layout::from_size_align(size.max(4096), 4096)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ring = NonNull::new(raw.cast::<BufRingEntry>())
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let mut this = Self {
            ring,
            layout,
            entries,
            tail: 0,
            buf_size,
            bufs: (0..entries).map(|_| None).collect(),
        };
        for bid in 0..entries {
            this.provide(bid);
        }
        this.publish();
        Ok(this)
    }

    /// Puts a fresh buffer in slot `bid` and queues it for the kernel (seen after `publish`).
    fn provide(&mut self, bid: u16) {
        self.offer(BytesMut::with_capacity(self.buf_size), bid);
    }

    /// Queues `buf` as buffer `bid` at the ring's tail (seen after `publish`).
    fn offer(&mut self, mut buf: BytesMut, bid: u16) {
        let addr = buf.as_mut_ptr() as u64;
        let index = usize::from(self.tail & (self.entries - 1));
        // SAFETY: `index` is below `entries`, the number of entries allocated; the kernel reads
        // entries only up to the published tail, and this one is past it until `publish`.
        let entry = unsafe { &mut *self.ring.as_ptr().add(index) };
        entry.set_addr(addr);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.bufs[usize::from(bid)] = Some(buf);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every provided buffer visible to the kernel.
    pub(crate) fn publish(&self) {
        // SAFETY: the tail field lives in the first entry of the ring allocation, which is
        // valid and initialised (zeroed); the kernel reads it concurrently, so it is written
        // atomically with release ordering, after the entries it publishes.
        unsafe {
            let tail = BufRingEntry::tail(self.ring.as_ptr()).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    /// The `len` bytes the kernel wrote into buffer `bid`, without taking it.
    pub(crate) fn peek(&mut self, bid: u16, len: usize) -> Option<&[u8]> {
        let buf = self.bufs.get_mut(usize::from(bid))?.as_mut()?;
        let len = len.min(buf.capacity());
        // SAFETY: the completion says the kernel wrote `len` bytes at the start of this buffer,
        // and `len` does not exceed its capacity (the length we registered).
        unsafe { buf.set_len(len) };
        Some(&buf[..])
    }

    /// Gives buffer `bid` back to the kernel as it is (after `peek`; call `publish` after a
    /// batch).
    pub(crate) fn recycle(&mut self, bid: u16) {
        let Some(mut buf) = self.bufs.get_mut(usize::from(bid)).and_then(Option::take) else {
            return;
        };
        buf.clear();
        self.offer(buf, bid);
    }

    /// Takes buffer `bid`, which the kernel filled with `len` bytes, and provides a new one in
    /// its place (call `publish` after a batch).
    pub(crate) fn take(&mut self, bid: u16, len: usize) -> Option<BytesMut> {
        let mut buf = self.bufs.get_mut(usize::from(bid))?.take()?;
        let len = len.min(buf.capacity());
        // SAFETY: the completion says the kernel wrote `len` bytes at the start of this buffer,
        // and `len` does not exceed its capacity (the length we registered).
        unsafe { buf.set_len(len) };
        self.provide(bid);
        Some(buf)
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the ring that read it is closed.
        unsafe { alloc::dealloc(self.ring.as_ptr().cast(), self.layout) };
    }
}

/// Room for the name and control messages of one received datagram.
pub(crate) const RECV_NAME_LEN: u32 = 32;
/// Room for the receive timestamp, GRO, TOS/TCLASS and PKTINFO control messages (a dual-stack
/// socket may be handed both the IPv4 and the IPv6 ones: 176 bytes in all).
pub(crate) const RECV_CONTROL_LEN: usize = 192;

/// The msghdr template of the multishot receive: only its name and control lengths matter.
pub(crate) struct RecvHeader {
    msg: Box<libc::msghdr>,
}

impl std::fmt::Debug for RecvHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecvHeader")
    }
}

impl RecvHeader {
    pub(crate) fn new() -> Self {
        // SAFETY: msghdr is plain data; all-zero is a valid value (null pointers, zero lengths).
        let mut msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        msg.msg_namelen = RECV_NAME_LEN;
        msg.msg_controllen = RECV_CONTROL_LEN as _;
        Self { msg }
    }

    pub(crate) fn msghdr(&self) -> &libc::msghdr {
        &self.msg
    }
}

/// Control-message space of a send: UDP_SEGMENT, TOS/TCLASS and PKTINFO.
#[repr(C, align(8))]
struct SendControl([u8; 128]);

/// One send in flight: the bytes, address and control messages the kernel reads until the
/// completion arrives. Boxed so the addresses stay put.
pub(crate) struct SendSlot {
    msg: Box<libc::msghdr>,
    iov: Box<libc::iovec>,
    addr: Box<socket2::SockAddr>,
    control: Box<SendControl>,
    /// The datagram bytes (several of `segment_size` with GSO).
    pub(crate) buf: Vec<u8>,
    /// Set while the kernel owns this slot.
    pub(crate) busy: bool,
    /// What was sent, for a resend without GSO.
    pub(crate) destination: SocketAddr,
    pub(crate) segment_size: Option<usize>,
    pub(crate) ecn: u8,
    pub(crate) src_ip: Option<std::net::IpAddr>,
}

impl std::fmt::Debug for SendSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendSlot")
            .field("busy", &self.busy)
            .field("len", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl SendSlot {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            // SAFETY: msghdr and iovec are plain data; all-zero is valid for both.
            msg: Box::new(unsafe { std::mem::zeroed() }),
            iov: Box::new(unsafe { std::mem::zeroed() }),
            addr: Box::new(socket2::SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0)))),
            control: Box::new(SendControl([0; 128])),
            buf: Vec::with_capacity(capacity),
            busy: false,
            destination: SocketAddr::from(([0, 0, 0, 0], 0)),
            segment_size: None,
            ecn: 0,
            src_ip: None,
        }
    }

    /// Points the msghdr at this slot's bytes, `destination`, and `control` (encoded control
    /// messages, at most 128 bytes, already laid out as cmsghdrs).
    pub(crate) fn prepare(&mut self, len: usize, destination: SocketAddr, control: &[u8]) {
        let len = len.min(self.buf.len());
        *self.addr = socket2::SockAddr::from(destination);
        self.iov.iov_base = self.buf.as_mut_ptr().cast();
        self.iov.iov_len = len;
        let n = control.len().min(self.control.0.len());
        self.control.0[..n].copy_from_slice(&control[..n]);
        self.msg.msg_name = self.addr.as_ptr().cast_mut().cast();
        self.msg.msg_namelen = self.addr.len();
        self.msg.msg_iov = &raw mut *self.iov;
        self.msg.msg_iovlen = 1;
        if n == 0 {
            self.msg.msg_control = std::ptr::null_mut();
            self.msg.msg_controllen = 0;
        } else {
            self.msg.msg_control = self.control.0.as_mut_ptr().cast();
            self.msg.msg_controllen = n as _;
        }
    }
}

/// Sets an integer socket option.
pub(crate) fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the option value is a live c_int and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Attaches a classic BPF program to the reuseport group `fd` belongs to.
pub(crate) fn attach_reuseport_cbpf(fd: RawFd, program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A non-blocking eventfd, as a `File` (reads and writes through it are safe).
pub(crate) fn eventfd() -> io::Result<File> {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The raw descriptor of a socket, for SQEs.
pub(crate) fn raw(socket: &impl AsRawFd) -> RawFd {
    socket.as_raw_fd()
}
