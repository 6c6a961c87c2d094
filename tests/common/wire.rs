//! The bed's network: a learning Ethernet switch in user space that every host's TAP device
//! is plugged into, with each host's attachment shaped in both directions: delay, jitter,
//! loss, and a rate limit with a bounded queue. It stands where `tc netem` on a bridge would:
//! this kernel has no netem (`CONFIG_NET_SCH_NETEM` is off), and reading real frames off real
//! interfaces and writing them back later is the same thing netem does inside the kernel.
//!
//! A frame from host a to host b is first a's uplink's (lost with its loss, queued behind its
//! rate, delayed by its delay ± jitter), then b's downlink's. Jitter varies each frame's delay
//! but keeps each direction's frames in order, as a path's queues do. A cut host's frames, both
//! ways, are all lost. Broadcast, multicast and not-yet-learnt destinations go to every other
//! host. A host may sit behind a stateful firewall, as behind a home router's NAT: a UDP
//! datagram reaches it only from an address and port it has sent a datagram to from the
//! port it arrives at (address- and port-dependent filtering, RFC 4787). The switch runs on its own thread of the test process and stops when dropped; its
//! TAP devices go with its file descriptors.

#![allow(clippy::unwrap_used, unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

/// One direction of a host's attachment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// One-way delay added, in milliseconds.
    pub delay_ms: u32,
    /// Each frame's delay varies uniformly by up to this much either way, in milliseconds.
    pub jitter_ms: u32,
    /// Share of frames lost, in percent.
    pub loss_pct: f64,
    /// Rate limit in kbit/s, behind a queue that holds 100 ms of it (tail drop).
    pub rate_kbit: Option<u32>,
    /// Frames longer than this many bytes (Ethernet header included) are dropped, with no
    /// ICMP to say so: a path whose MTU is smaller than the hosts' interfaces (a tunnel on
    /// the way), and a black hole for packets sized to the interfaces.
    pub max_frame: Option<usize>,
}

impl Shape {
    /// No delay, no loss, no limit.
    pub const CLEAN: Self = Self {
        delay_ms: 0,
        jitter_ms: 0,
        loss_pct: 0.0,
        rate_kbit: None,
        max_frame: None,
    };
}

/// A host's attachment: what its uplink and downlink do, whether it is cut, and whether it
/// is behind a stateful firewall.
#[derive(Debug, Clone, Copy)]
struct Port {
    up: Shape,
    down: Shape,
    cut: bool,
    firewall: bool,
}

/// A UDP datagram's addresses (IPv4 or IPv6, the IP as 16 bytes) and ports, if the Ethernet
/// frame holds one.
fn udp_ends(frame: &[u8]) -> Option<([u8; 16], u16, [u8; 16], u16)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let (src, dst, udp) = match ethertype {
        0x0800 => {
            let ihl = usize::from(frame.get(14)? & 0x0f) * 4;
            if *frame.get(23)? != 17 {
                return None;
            }
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src[12..].copy_from_slice(frame.get(26..30)?);
            dst[12..].copy_from_slice(frame.get(30..34)?);
            (src, dst, 14 + ihl)
        }
        0x86dd => {
            if *frame.get(20)? != 17 {
                return None;
            }
            (
                frame.get(22..38)?.try_into().ok()?,
                frame.get(38..54)?.try_into().ok()?,
                54,
            )
        }
        _ => return None,
    };
    let ports = frame.get(udp..udp + 4)?;
    Some((
        src,
        u16::from_be_bytes([ports[0], ports[1]]),
        dst,
        u16::from_be_bytes([ports[2], ports[3]]),
    ))
}

/// What the switch did, per host.
#[derive(Debug, Clone, Copy, Default)]
pub struct PortCounts {
    /// Frames the host sent.
    pub sent: u64,
    /// Frames delivered to the host.
    pub delivered: u64,
    /// Bytes of the frames the host sent (Ethernet frames, lost ones too): what its uplink
    /// carried.
    pub sent_bytes: u64,
    /// Bytes of the frames delivered to the host.
    pub delivered_bytes: u64,
    /// Frames to or from it lost by its loss rate or its cut.
    pub lost: u64,
    /// Frames dropped at its full rate-limit queues.
    pub queue_drops: u64,
    /// Frames to or from it dropped as longer than its path takes ([`Shape::max_frame`]).
    pub too_big: u64,
    /// UDP datagrams to it its firewall dropped: from an address and port it had not sent to.
    pub filtered: u64,
}

/// The switch; see the module doc.
pub struct Wire {
    ports: Arc<Mutex<Vec<Port>>>,
    counts: Arc<Mutex<Vec<PortCounts>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Creates TAP device `name` in this process's network namespace; its file descriptor.
pub fn tap(name: &str) -> OwnedFd {
    assert!(name.len() < 16, "interface name {name:?} too long");
    // SAFETY: a plain open of the TUN control device; the descriptor is owned below.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    assert!(fd >= 0, "/dev/net/tun: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just opened and is owned by nothing else.
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // struct ifreq: a 16-byte name, then the flags (the rest of its 40 bytes unused here).
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    ifreq[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which ifreq is laid out as.
    let r = unsafe { libc::ioctl(fd, TUNSETIFF, ifreq.as_mut_ptr()) };
    assert!(
        r == 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    owned
}

/// A small seeded generator (xorshift64*): loss and jitter only, nothing secret.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A frame due to leave the switch towards `port` at `due` (ns from the switch's start).
type Due = Reverse<(u64, u64, usize, Vec<u8>)>;

struct Switch {
    fds: Vec<OwnedFd>,
    ports: Arc<Mutex<Vec<Port>>>,
    counts: Arc<Mutex<Vec<PortCounts>>>,
    start: Instant,
    rng: Rng,
    macs: HashMap<[u8; 6], usize>,
    /// When each uplink's and downlink's rate-limited sender is next free (ns).
    up_free: Vec<u64>,
    down_free: Vec<u64>,
    /// The last due time per (from, to): frames of one direction stay in order.
    last_due: Vec<Vec<u64>>,
    queue: BinaryHeap<Due>,
    seq: u64,
    /// (host, its port, remote address, remote port) of every UDP datagram a host sent: what
    /// a firewall in front of that host lets back in.
    opened: HashSet<(usize, u16, [u8; 16], u16)>,
}

fn ms_ns(ms: u32) -> u64 {
    u64::from(ms) * 1_000_000
}

impl Switch {
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Passes a frame through a rate limit whose sender is free at `*free`: when it has left,
    /// or `None` if the queue in front already holds 100 ms.
    fn through_rate(shape: &Shape, free: &mut u64, at: u64, len: usize) -> Option<u64> {
        let Some(kbit) = shape.rate_kbit else {
            return Some(at);
        };
        let begin = (*free).max(at);
        if begin - at > 100_000_000 {
            return None;
        }
        *free = begin + (len as u64 * 8 * 1_000_000) / u64::from(kbit.max(1));
        Some(*free)
    }

    fn delayed(&mut self, shape: &Shape, at: u64) -> u64 {
        let jitter = ms_ns(shape.jitter_ms) as f64 * (2.0 * self.rng.unit() - 1.0);
        (at + ms_ns(shape.delay_ms)).saturating_add_signed(jitter as i64)
    }

    fn arrive(&mut self, from: usize, frame: &[u8], ports: &[Port], counts: &mut [PortCounts]) {
        if frame.len() < 14 {
            return;
        }
        counts[from].sent += 1;
        counts[from].sent_bytes += frame.len() as u64;
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        let mut src = [0u8; 6];
        src.copy_from_slice(&frame[6..12]);
        self.macs.insert(src, from);
        // What the host sends opens its firewall at once: it stands at the host's end.
        if let Some((_, sport, dip, dport)) = udp_ends(frame) {
            self.opened.insert((from, sport, dip, dport));
        }
        let p = ports[from];
        if p.up.max_frame.is_some_and(|max| frame.len() > max) {
            counts[from].too_big += 1;
            return;
        }
        if p.cut || self.rng.unit() * 100.0 < p.up.loss_pct {
            counts[from].lost += 1;
            return;
        }
        let now = self.now();
        let Some(left) = Self::through_rate(&p.up, &mut self.up_free[from], now, frame.len())
        else {
            counts[from].queue_drops += 1;
            return;
        };
        let at_switch = self.delayed(&p.up, left);
        let targets: Vec<usize> = match self.macs.get(&dst) {
            Some(&to) if dst[0] & 1 == 0 => vec![to],
            _ => (0..ports.len()).collect(),
        };
        for to in targets.into_iter().filter(|&t| t != from) {
            let q = ports[to];
            if q.down.max_frame.is_some_and(|max| frame.len() > max) {
                counts[to].too_big += 1;
                continue;
            }
            if q.cut || self.rng.unit() * 100.0 < q.down.loss_pct {
                counts[to].lost += 1;
                continue;
            }
            let Some(left) =
                Self::through_rate(&q.down, &mut self.down_free[to], at_switch, frame.len())
            else {
                counts[to].queue_drops += 1;
                continue;
            };
            let due = self.delayed(&q.down, left).max(self.last_due[from][to]);
            self.last_due[from][to] = due;
            self.seq += 1;
            self.queue
                .push(Reverse((due, self.seq, to, frame.to_vec())));
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut buf = vec![0u8; 65536];
        let mut pollfds: Vec<libc::pollfd> = self
            .fds
            .iter()
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        while !stop.load(Ordering::Relaxed) {
            let now = self.now();
            let wait_ns = self
                .queue
                .peek()
                .map_or(50_000_000, |Reverse((due, ..))| due.saturating_sub(now))
                .min(50_000_000);
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: wait_ns as libc::c_long,
            };
            // SAFETY: pollfds is a live array of pollfd of the length given.
            unsafe {
                libc::ppoll(
                    pollfds.as_mut_ptr(),
                    pollfds.len() as libc::nfds_t,
                    &raw const ts,
                    std::ptr::null(),
                );
            }
            let ports = self.ports.lock().unwrap().clone();
            let counts = Arc::clone(&self.counts);
            let mut counts = counts.lock().unwrap();
            for (i, pfd) in pollfds.iter().enumerate() {
                if pfd.revents & libc::POLLIN == 0 {
                    continue;
                }
                // At most 256 frames from one host per turn, so that none starves the rest.
                for _ in 0..256 {
                    // SAFETY: buf is a live buffer of the length given.
                    let n = unsafe { libc::read(pfd.fd, buf.as_mut_ptr().cast(), buf.len()) };
                    let Ok(n) = usize::try_from(n) else { break };
                    if n == 0 {
                        break;
                    }
                    self.arrive(i, &buf[..n], &ports, &mut counts);
                }
            }
            let now = self.now();
            while self
                .queue
                .peek()
                .is_some_and(|Reverse((due, ..))| *due <= now)
            {
                let Reverse((_, _, to, frame)) = self.queue.pop().unwrap();
                // A firewall stands at the host's end of its attachment: it judges a frame as
                // it arrives there, by what the host had sent by then.
                if ports[to].firewall
                    && let Some((sip, sport, _, dport)) = udp_ends(&frame)
                    && !self.opened.contains(&(to, dport, sip, sport))
                {
                    counts[to].filtered += 1;
                    continue;
                }
                // SAFETY: frame is a live buffer of the length given.
                let n = unsafe {
                    libc::write(self.fds[to].as_raw_fd(), frame.as_ptr().cast(), frame.len())
                };
                if n > 0 {
                    counts[to].delivered += 1;
                    counts[to].delivered_bytes += frame.len() as u64;
                } else {
                    counts[to].queue_drops += 1;
                }
            }
        }
    }
}

impl Wire {
    /// A switch for the TAP devices `fds` (host h on `fds[h]`), each attachment shaped `up`
    /// and `down`; `seed` drives its loss and jitter.
    pub fn start(fds: Vec<OwnedFd>, up: Shape, down: Shape, seed: u64) -> Self {
        let n = fds.len();
        let ports = Arc::new(Mutex::new(vec![
            Port {
                up,
                down,
                cut: false,
                firewall: false,
            };
            n
        ]));
        let counts = Arc::new(Mutex::new(vec![PortCounts::default(); n]));
        let stop = Arc::new(AtomicBool::new(false));
        let switch = Switch {
            fds,
            ports: Arc::clone(&ports),
            counts: Arc::clone(&counts),
            start: Instant::now(),
            rng: Rng(seed | 1),
            macs: HashMap::new(),
            up_free: vec![0; n],
            down_free: vec![0; n],
            last_due: vec![vec![0; n]; n],
            queue: BinaryHeap::new(),
            seq: 0,
            opened: HashSet::new(),
        };
        let flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("bed-wire".into())
            .spawn(move || switch.run(&flag))
            .unwrap();
        Self {
            ports,
            counts,
            stop,
            thread: Some(thread),
        }
    }

    /// Gives host `h`'s attachment new shapes.
    pub fn reshape(&self, h: usize, up: Shape, down: Shape) {
        let mut ports = self.ports.lock().unwrap();
        ports[h].up = up;
        ports[h].down = down;
    }

    /// Cuts host `h` off (`true`) or puts it back (`false`).
    pub fn set_cut(&self, h: usize, cut: bool) {
        self.ports.lock().unwrap()[h].cut = cut;
    }

    /// Puts host `h` behind a stateful firewall (`true`; see the module documentation) or
    /// takes it away.
    pub fn set_firewall(&self, h: usize, on: bool) {
        self.ports.lock().unwrap()[h].firewall = on;
    }

    /// What the switch did so far, per host.
    pub fn counts(&self) -> Vec<PortCounts> {
        self.counts.lock().unwrap().clone()
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // It wakes at least every 50 ms to look at the flag.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
