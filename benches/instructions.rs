//! The fan-out node's own work counted in instructions: the same node and subscribers as
//! `benches/fanout.rs`, run in virtual time so that a run repeats exactly, and counted by
//! callgrind instead of timed.
//!
//! Why: one run of the fan-out bench moves by 10–30% on these shared machines, more than most
//! single changes to the data path gain, so a lever worth 3% cannot be told from noise in
//! CPU time. Instructions do not depend on the other tenants. They do not see cache misses
//! or the kernel either, so this complements the fan-out bench's CPU figures (which hold the
//! targets) and does not replace them: use it to decide whether a change to gridcast's or
//! quinn-proto's work per byte pays, then confirm in CPU time.
//!
//! What runs: one serving engine (`Role::Source`, as the fan-out bench's node) and M
//! subscriber engines drawing 8 of 16 substreams, exchanging real QUIC datagrams (real
//! quinn-proto, real AES-128-GCM) through an in-memory network with 5 ms one way and no
//! loss, and a chunk every 250 ms of virtual time, 0.2 Gbit/s in all as in the fan-out bench.
//! Chunks are coded and signed outside the count, as the fan-out bench's feed thread does. Every
//! call into the node's engine during the measured window (after 2 s of virtual time for the
//! handshakes and the windows to open) goes through [`counted`], and callgrind is told to
//! count only inside it (`--collect-atstart=no --toggle-collect=*counted*`): the node's
//! instructions, not the subscribers' or the network's. The floor is counted the same way:
//! copying and sealing the same payload bytes in 1436-byte pieces with AES-128-GCM, as the
//! fan-out bench's raw floor does before its send.
//!
//! Output: `instructions subscribers=M node_per_byte=… floor_per_byte=… node_vs_floor=…`
//! per size, and a `detail` line of the node's datagrams per MiB in the window. The bench
//! starts itself under valgrind once per size and side (`--inner node|floor`), so valgrind
//! must be installed. `--subscribers <M>`: that size alone (10, 100 and 1000 otherwise).
//! `--chunks <n>`: chunks in the measured window (8). `--keep <dir>`: keep the callgrind
//! output files there, for `callgrind_annotate`.

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::disallowed_methods,
    unreachable_pub
)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

#[path = "../tests/common/mod.rs"]
mod common;
use common::floor::{DATAGRAM, Sealer, TAG};

use gridcast::keys::{ChannelId, ChannelKey, NodeKey};
use gridcast::node::{ChannelMode, Engine, EngineConfig};
use gridcast::stream::{ChunkFlags, ChunkPublisher, CodingParams};
use gridcast::wire::{Role, StartAt, SubstreamSet};

/// The allocator the `gridcast` binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHUNK: Duration = Duration::from_millis(250);
const LATENCY: Duration = Duration::from_millis(5);
const WARMUP: Duration = Duration::from_secs(2);
/// Total egress, as in the fan-out bench.
const TOTAL_BPS: f64 = 0.2e9;
const SUBSTREAMS: usize = 8;

/// Runs `f`; callgrind counts only inside this function.
#[inline(never)]
fn counted<R>(f: impl FnOnce() -> R) -> R {
    std::hint::black_box(f())
}

/// Runs `f` inside [`counted`] when `on`.
fn maybe_counted<R>(on: bool, f: impl FnOnce() -> R) -> R {
    if on { counted(f) } else { f() }
}

fn payload(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn chunk_bytes(subscribers: usize) -> usize {
    (TOTAL_BPS / 8.0 * CHUNK.as_secs_f64() / subscribers as f64) as usize
}

fn addr_of(ix: usize) -> SocketAddr {
    SocketAddr::from((
        Ipv4Addr::new(10, (ix >> 16) as u8, (ix >> 8) as u8, ix as u8),
        4433,
    ))
}

/// Datagrams in flight, by arrival time.
type InFlight = BinaryHeap<Reverse<(Instant, u64, usize, usize, Vec<u8>)>>;

/// The node (index 0) and its subscribers (1..=M) on an in-memory network in virtual time.
struct Bed {
    engines: Vec<Engine>,
    by_addr: HashMap<SocketAddr, usize>,
    in_flight: InFlight,
    order: u64,
    /// Each engine's deadline as last read, and the heap of them (stale entries skipped).
    deadline: Vec<Option<Instant>>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    touched: Vec<usize>,
    is_touched: Vec<bool>,
    now: Instant,
    /// Whether the node's calls are being counted.
    measuring: bool,
    node_datagrams: u64,
    buf: Vec<u8>,
}

impl Bed {
    fn new(subscribers: usize, channel: ChannelId, start: Instant) -> Self {
        let node_key = NodeKey::from_seed(&[71; 32]);
        let mut node = Engine::new(
            &node_key,
            EngineConfig {
                role: Role::Source,
                serve: true,
                max_backlog_bytes: 16 << 20,
                rng_seed: Some([1; 32]),
                ..Default::default()
            },
        )
        .unwrap();
        node.add_channel(channel, ChannelMode::Source);
        let mut engines = vec![node];
        for i in 1..=subscribers {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            seed[8] = 0x5c;
            let mut e = Engine::new(
                &NodeKey::from_seed(&seed),
                EngineConfig {
                    rng_seed: Some(seed),
                    ..Default::default()
                },
            )
            .unwrap();
            e.add_channel(channel, ChannelMode::Play);
            e.subscribe(
                start,
                addr_of(0),
                node_key.node_id(),
                channel,
                SubstreamSet::first(SUBSTREAMS),
                StartAt::Live,
            )
            .unwrap();
            engines.push(e);
        }
        let n = engines.len();
        Self {
            engines,
            by_addr: (0..n).map(|ix| (addr_of(ix), ix)).collect(),
            in_flight: BinaryHeap::new(),
            order: 0,
            deadline: vec![None; n],
            timers: BinaryHeap::new(),
            touched: (0..n).collect(),
            is_touched: vec![true; n],
            now: start,
            measuring: false,
            node_datagrams: 0,
            buf: Vec::with_capacity(64 * 1024),
        }
    }

    fn touch(&mut self, ix: usize) {
        if !self.is_touched[ix] {
            self.is_touched[ix] = true;
            self.touched.push(ix);
        }
    }

    /// Sends what every touched engine has to send, and files its next deadline.
    fn flush(&mut self) {
        let now = self.now;
        while let Some(ix) = self.touched.pop() {
            self.is_touched[ix] = false;
            let node = ix == 0;
            let counting = node && self.measuring;
            loop {
                let (engine, buf) = (&mut self.engines[ix], &mut self.buf);
                let Some(t) = maybe_counted(counting, || engine.poll_transmit(now, buf)) else {
                    break;
                };
                let Some(&to) = self.by_addr.get(&t.destination) else {
                    continue;
                };
                let segment = t.segment_size.unwrap_or(t.size).max(1);
                for datagram in self.buf[..t.size].chunks(segment) {
                    if node && self.measuring {
                        self.node_datagrams += 1;
                    }
                    self.order += 1;
                    self.in_flight.push(Reverse((
                        now + LATENCY,
                        self.order,
                        ix,
                        to,
                        datagram.to_vec(),
                    )));
                }
            }
            let engine = &mut self.engines[ix];
            let next = maybe_counted(counting, || engine.poll_timeout());
            if next != self.deadline[ix] {
                self.deadline[ix] = next;
                if let Some(t) = next {
                    self.timers.push(Reverse((t, ix)));
                }
            }
            // Events are not looked at; they are drained so they do not pile up.
            while maybe_counted(counting, || engine.poll_event()).is_some() {}
        }
    }

    fn next_timer(&mut self) -> Option<Instant> {
        while let Some(&Reverse((t, ix))) = self.timers.peek() {
            if self.deadline[ix] == Some(t) {
                return Some(t);
            }
            self.timers.pop();
        }
        None
    }

    /// Runs everything due before `until`, then moves the clock to it.
    fn run_until(&mut self, until: Instant) {
        loop {
            self.flush();
            let arrival = self.in_flight.peek().map(|Reverse(p)| p.0);
            let Some(next) = [arrival, self.next_timer()].into_iter().flatten().min() else {
                break;
            };
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            let now = self.now;
            while self.in_flight.peek().is_some_and(|Reverse(p)| p.0 <= now) {
                let Some(Reverse((_, _, from, to, data))) = self.in_flight.pop() else {
                    break;
                };
                let from = addr_of(from);
                let engine = &mut self.engines[to];
                maybe_counted(to == 0 && self.measuring, || {
                    engine.handle_datagram(now, from, None, None, BytesMut::from(&data[..]));
                });
                self.touch(to);
            }
            while let Some(&Reverse((t, ix))) = self.timers.peek() {
                if t > now {
                    break;
                }
                self.timers.pop();
                if self.deadline[ix] != Some(t) {
                    continue;
                }
                self.deadline[ix] = None;
                let engine = &mut self.engines[ix];
                maybe_counted(ix == 0 && self.measuring, || engine.handle_timeout(now));
                self.touch(ix);
            }
        }
        self.now = self.now.max(until);
    }

    /// The node's UDP datagrams and QUIC packets sent, by quinn-proto's counters.
    fn node_packets(&self) -> (u64, u64) {
        self.engines[0].quic_stats().fold((0, 0), |(d, p), s| {
            (d + s.udp_tx.datagrams, p + s.path.sent_packets)
        })
    }

    fn delivered(&self, channel: &ChannelId) -> u64 {
        self.engines[1..]
            .iter()
            .filter_map(|e| e.channel(channel))
            .map(|c| c.stats().bytes_in)
            .sum()
    }
}

/// Counts the node's work; prints `payload_bytes=… node_datagrams=…` for the outer run.
fn inner_node(subscribers: usize, chunks: u64) {
    let start = Instant::now();
    let channel_key = ChannelKey::from_seed(&[72; 32]);
    let channel = channel_key.channel_id();
    let mut bed = Bed::new(subscribers, channel, start);
    let mut publisher = ChunkPublisher::new(channel_key, CodingParams::DEFAULT);
    let body = payload(chunk_bytes(subscribers));
    let warm = WARMUP.as_millis() as u64 / CHUNK.as_millis() as u64;
    let mut before = 0;
    let mut packets_before = (0, 0);
    for seq in 0..warm + chunks + 1 {
        let at = start + CHUNK * seq as u32;
        bed.run_until(at);
        if seq == warm {
            before = bed.delivered(&channel);
            packets_before = bed.node_packets();
            bed.measuring = true;
        }
        if seq == warm + chunks {
            break;
        }
        let coded = publisher
            .publish(seq, seq * 250_000, ChunkFlags::RANDOM_ACCESS, &body)
            .unwrap();
        let (node, now) = (&mut bed.engines[0], bed.now);
        maybe_counted(bed.measuring, || {
            node.publish(now, channel, &coded).unwrap()
        });
        bed.touch(0);
    }
    let bytes = bed.delivered(&channel) - before;
    let packets = bed.node_packets();
    println!(
        "payload_bytes={bytes} node_datagrams={} quic_datagrams={} quic_packets={}",
        bed.node_datagrams,
        packets.0 - packets_before.0,
        packets.1 - packets_before.1
    );
}

/// Counts the floor's work for the same payload: copy and seal, as the fan-out bench's floor.
fn inner_floor(subscribers: usize, chunks: u64) {
    let mut sealer = Sealer::new();
    let body = payload(chunk_bytes(subscribers));
    let mut out = Vec::with_capacity(64 * 1024);
    let mut bytes = 0u64;
    for _ in 0..chunks {
        for _ in 0..subscribers {
            counted(|| {
                out.clear();
                for piece in body.chunks(DATAGRAM) {
                    if out.len() + DATAGRAM + TAG > out.capacity() {
                        out.clear();
                    }
                    sealer.seal_onto(&mut out, piece);
                }
            });
            bytes += body.len() as u64;
        }
    }
    println!("payload_bytes={bytes} node_datagrams={}", sealer.sealed());
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let at = args.iter().position(|a| a == name)?;
    let value = args.get(at + 1)?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}: cannot parse {value:?}")),
    )
}

fn field(text: &str, name: &str) -> Option<u64> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// Runs this bench's `--inner <side>` under callgrind; returns (instructions, payload bytes,
/// datagrams).
fn under_callgrind(
    side: &str,
    subscribers: usize,
    chunks: u64,
    keep: Option<&PathBuf>,
) -> (u64, u64, u64) {
    let out = match keep {
        Some(dir) => dir.join(format!("callgrind.{side}.{subscribers}")),
        None => std::env::temp_dir().join(format!(
            "gridcast-instructions-{}-{side}-{subscribers}",
            std::process::id()
        )),
    };
    let exe = std::env::current_exe().unwrap();
    let run = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--collect-atstart=no",
            "--toggle-collect=*counted*",
        ])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(&exe)
        .args(["--inner", side, "--subscribers"])
        .arg(subscribers.to_string())
        .arg("--chunks")
        .arg(chunks.to_string())
        .output();
    let run = match run {
        Ok(run) => run,
        Err(e) => {
            eprintln!(
                "instructions: cannot start valgrind ({e}); install it (apt-get install valgrind)"
            );
            std::process::exit(2);
        }
    };
    let stdout = String::from_utf8_lossy(&run.stdout);
    if !run.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&run.stderr));
        panic!("the {side} run under callgrind failed: {}", run.status);
    }
    let profile = std::fs::read_to_string(&out).unwrap();
    if keep.is_none() {
        let _ = std::fs::remove_file(&out);
    }
    let instructions = profile
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("callgrind's output has no total");
    (
        instructions,
        field(&stdout, "payload_bytes").expect("the inner run printed no byte count"),
        field(&stdout, "node_datagrams").unwrap_or(0),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let chunks: u64 = arg(&args, "--chunks").unwrap_or(8);
    let one: Option<usize> = arg(&args, "--subscribers");
    if let Some(side) = arg::<String>(&args, "--inner") {
        let subscribers = one.expect("--inner needs --subscribers");
        match side.as_str() {
            "node" => inner_node(subscribers, chunks),
            "floor" => inner_floor(subscribers, chunks),
            other => panic!("--inner {other}: node or floor"),
        }
        return;
    }
    let keep: Option<PathBuf> = arg(&args, "--keep");
    if let Some(dir) = &keep {
        std::fs::create_dir_all(dir).unwrap();
    }
    let sizes = one.map_or_else(|| vec![10, 100, 1000], |m| vec![m]);
    for subscribers in sizes {
        let (node_ir, node_bytes, datagrams) =
            under_callgrind("node", subscribers, chunks, keep.as_ref());
        let (floor_ir, floor_bytes, _) =
            under_callgrind("floor", subscribers, chunks, keep.as_ref());
        let node = node_ir as f64 / node_bytes.max(1) as f64;
        let floor = floor_ir as f64 / floor_bytes.max(1) as f64;
        println!(
            "instructions subscribers={subscribers} node_per_byte={node:.3} floor_per_byte={floor:.3} node_vs_floor={:.2}",
            node / floor
        );
        println!(
            "instructions detail subscribers={subscribers} payload_mib={:.1} node_datagrams_per_mib={:.0} node_instructions_per_datagram={:.0}",
            node_bytes as f64 / f64::from(1 << 20),
            datagrams as f64 / (node_bytes as f64 / f64::from(1 << 20)),
            node_ir as f64 / datagrams.max(1) as f64
        );
    }
}
