//! The scale benchmark: how many viewers one relay holds, and what each costs it.
//!
//! Real processes: `gridcast broadcast` paces a file of random bytes at 128 kbit/s (an audio
//! channel's rate; the relay never looks inside the payload), and one `gridcast relay` on 2
//! workers joins it. The subscribers are gridcast engines in this process, on their own UDP
//! sockets on loopback, driven round-robin by [`CLIENT_THREADS`] threads (unpinned: they take
//! whatever CPU the relay leaves). Each subscribes to the first 8 substreams, enough to decode
//! every chunk, and plays what it decodes.
//!
//! For each size: the relay starts afresh, its memory is read before any subscriber connects,
//! the subscribers connect all at once, and after a warm-up the window is measured:
//!
//! `scale subscribers=… continuity_min=… continuity_mean=… relay_cores=… rss_mb=…
//! kb_per_connection=… base_mb=… rss_after_mb=… live_kb_per_connection=… subscriber_cores=…
//! subscriber_drops=…`
//!
//! - continuity: the share of the window's chunks each subscriber played (every chunk
//!   published between the window's start and end; a subscriber that played nothing scores 0).
//! - relay_cores: the relay process's CPU time (every thread) over the window's wall time.
//! - rss_mb: the relay's resident memory at the window's end; kb_per_connection: its growth
//!   from before the first connection (base_mb), per subscriber; rss_after_mb: what it is
//!   once the relay has dropped every connection (at its idle timeout), and
//!   live_kb_per_connection the part of the growth that went with them, per subscriber (the
//!   rest is what the allocator keeps of the handshake burst and what tables keep of their
//!   largest size).
//! - subscriber_cores: this process's subscriber threads' CPU over the window: near the cores
//!   the relay leaves free, the subscribers' side, not the relay, is the limit.
//!
//! Default: 2000 subscribers. `--subscribers N`: that size. `--ramp`: then 1000 more at a
//! time (at most 8000) until a size falls short of 100% continuity, then prints
//! `scale held=…` with the largest size at 100%. `--window S`: seconds measured (30).

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::disallowed_methods,
    unreachable_pub
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::clients::Clients;
use common::procs::{free_udp_port, gridcast, keygen, spawn_with_link};
use common::sys::{process_cpu_ns, raise_fd_limit, rss_kb, this_thread_id, thread_cpu_ns};
use gridcast::keys::{ChannelId, NodeId};

/// The allocator the `gridcast` binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Threads driving the subscribers.
const CLIENT_THREADS: usize = 2;
/// The channel's rate (bits per second).
const RATE_BPS: u64 = 128_000;
/// Seconds from the subscribers' start to the window: handshakes, the first chunks.
const WARMUP: Duration = Duration::from_secs(10);
/// Seconds past the window the subscribers keep running, so a chunk published at its very
/// end can arrive.
const GRACE: Duration = Duration::from_secs(3);
/// Long enough for the relay to drop connections gone silent (its idle timeout is 10 s).
const IDLE_GONE: Duration = Duration::from_secs(13);
/// The ramp's last size.
const RAMP_MAX: usize = 8000;

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

fn stdout_of(mut cmd: Command) -> String {
    let out = cmd.stderr(Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Waits (bounded) until `addr` answers `/readyz` with 200.
fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if common::http::get(addr, "/readyz").is_some_and(|(s, _)| s == 200) {
            return;
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!("the relay at {addr} was not ready within 20 s");
}

/// The figure `name` of the relay's metrics (summed over its label sets).
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let Some((200, body)) = common::http::get(addr, "/metrics") else {
        return f64::NAN;
    };
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Relay {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    id: NodeId,
}

impl Relay {
    fn start(link: &str, dir: &Path) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", common::http::free_tcp_port())
            .parse()
            .unwrap();
        let node_key = dir.join("relay.key");
        let child = gridcast(&[
            "relay",
            "--join",
            link,
            "--listen",
            &addr.to_string(),
            "--workers",
            "2",
            "--node-key",
            node_key.to_str().unwrap(),
            "--admin",
            &admin.to_string(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
        wait_ready(admin);
        let id = stdout_of(gridcast(&["node-id", node_key.to_str().unwrap()]))
            .parse()
            .unwrap();
        Self {
            child,
            addr,
            admin,
            id,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Step {
    subscribers: usize,
    continuity_min: f64,
    continuity_mean: f64,
    relay_cores: f64,
    rss_mb: f64,
    kb_per_connection: f64,
    rss_after_mb: f64,
    live_kb_per_connection: f64,
    base_mb: f64,
    subscriber_cores: f64,
    subscriber_drops: f64,
}

/// The subscribers' threads: each drives its share of clients until told to stop, keeping
/// the newest chunk any of them played in `newest`; returns the chunks each client played.
fn run_clients(
    n: usize,
    relay: &Relay,
    channel: ChannelId,
    stop: &Arc<AtomicBool>,
    newest: &Arc<AtomicU64>,
    tids: &std::sync::mpsc::Sender<u32>,
) -> Vec<thread::JoinHandle<Vec<Vec<u64>>>> {
    (0..CLIENT_THREADS)
        .map(|t| {
            let share = n / CLIENT_THREADS + usize::from(t < n % CLIENT_THREADS);
            let (addr, id) = (relay.addr, relay.id);
            let (stop, newest, tids) = (Arc::clone(stop), Arc::clone(newest), tids.clone());
            thread::spawn(move || {
                tids.send(this_thread_id()).unwrap();
                let mut clients = Clients::new(share, addr, id, channel, 8);
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if !clients.turn() {
                        thread::sleep(Duration::from_micros(200));
                    }
                    if last.elapsed() >= Duration::from_millis(100) {
                        last = Instant::now();
                        let top = clients.clients.iter().filter_map(|c| c.played.last());
                        if let Some(&top) = top.max() {
                            newest.fetch_max(top, Ordering::Relaxed);
                        }
                    }
                }
                clients.clients.into_iter().map(|c| c.played).collect()
            })
        })
        .collect()
}

fn step(n: usize, link: &str, channel: ChannelId, dir: &Path, window: Duration) -> Step {
    let relay = Relay::start(link, dir);
    let pid = relay.child.id();
    // Let the relay draw its first chunks before measuring its memory without subscribers.
    thread::sleep(Duration::from_secs(2));
    let base_kb = rss_kb(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let newest = Arc::new(AtomicU64::new(0));
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let threads = run_clients(n, &relay, channel, &stop, &newest, &tid_tx);
    let tids: Vec<u32> = (0..CLIENT_THREADS)
        .map(|_| tid_rx.recv().unwrap())
        .collect();
    thread::sleep(WARMUP);

    let clients_cpu = || tids.iter().map(|&t| thread_cpu_ns(t)).sum::<u64>();
    let (r0, c0, s0, t0) = (
        process_cpu_ns(pid),
        clients_cpu(),
        newest.load(Ordering::Relaxed),
        Instant::now(),
    );
    thread::sleep(window);
    let (r1, c1, s1, t1) = (
        process_cpu_ns(pid),
        clients_cpu(),
        newest.load(Ordering::Relaxed),
        Instant::now(),
    );
    let rss = rss_kb(pid);
    let subscriber_drops = metric(relay.admin, "gridcast_subscriber_drops_total");
    thread::sleep(GRACE);
    stop.store(true, Ordering::Relaxed);
    let played: Vec<Vec<u64>> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    // The subscribers' sockets are closed without a word: the relay drops each connection at
    // its idle timeout (10 s). What its memory comes back to then tells live state per
    // connection from what the allocator keeps.
    thread::sleep(IDLE_GONE);
    let rss_after = rss_kb(pid);
    drop(relay);

    // The window's chunks: after the newest played at its start, up to the newest at its end.
    let (first, last) = (s0 + 1, s1);
    assert!(
        last > first,
        "no chunk reached any subscriber in the window"
    );
    let expected = (last - first + 1) as f64;
    let shares: Vec<f64> = played
        .iter()
        .map(|p| {
            let got: BTreeSet<u64> = p
                .iter()
                .copied()
                .filter(|s| (first..=last).contains(s))
                .collect();
            got.len() as f64 / expected
        })
        .collect();
    let secs = (t1 - t0).as_secs_f64();
    Step {
        subscribers: n,
        continuity_min: shares.iter().copied().fold(1.0, f64::min),
        continuity_mean: shares.iter().sum::<f64>() / shares.len() as f64,
        relay_cores: (r1 - r0) as f64 / 1e9 / secs,
        rss_mb: rss / 1024.0,
        kb_per_connection: (rss - base_kb) / n as f64,
        rss_after_mb: rss_after / 1024.0,
        live_kb_per_connection: (rss - rss_after) / n as f64,
        base_mb: base_kb / 1024.0,
        subscriber_cores: (c1 - c0) as f64 / 1e9 / secs,
        subscriber_drops,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    raise_fd_limit();
    let first: usize = arg(&args, "--subscribers").unwrap_or(2000);
    let ramp = args.iter().any(|a| a == "--ramp");
    let window = Duration::from_secs(arg(&args, "--window").unwrap_or(30));

    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let channel: ChannelId = stdout_of(gridcast(&["channel-id", key.to_str().unwrap()]))
        .parse()
        .unwrap();
    // Enough stream for every size the ramp may try.
    let steps: Vec<usize> = if ramp {
        (first..=RAMP_MAX.max(first)).step_by(1000).collect()
    } else {
        vec![first]
    };
    let per_step =
        2 + WARMUP.as_secs() + window.as_secs() + GRACE.as_secs() + IDLE_GONE.as_secs() + 5;
    let stream_secs = 10 + per_step * steps.len() as u64;
    let input = dir.path().join("stream.bin");
    {
        let mut f = std::fs::File::create(&input).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let block: Vec<u8> = (0..64 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let total = RATE_BPS / 8 * stream_secs;
        for _ in 0..total.div_ceil(block.len() as u64) {
            f.write_all(&block).unwrap();
        }
    }
    let (mut source, link) = spawn_with_link(gridcast(&[
        "broadcast",
        "--key",
        key.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_udp_port()),
        "--input",
        input.to_str().unwrap(),
        "--rate",
        &RATE_BPS.to_string(),
    ]));

    let mut held = None;
    for n in steps {
        let s = step(n, &link, channel, dir.path(), window);
        println!(
            "scale subscribers={} continuity_min={:.4} continuity_mean={:.4} relay_cores={:.3} rss_mb={:.1} kb_per_connection={:.1} base_mb={:.1} rss_after_mb={:.1} live_kb_per_connection={:.1} subscriber_cores={:.3} subscriber_drops={}",
            s.subscribers,
            s.continuity_min,
            s.continuity_mean,
            s.relay_cores,
            s.rss_mb,
            s.kb_per_connection,
            s.base_mb,
            s.rss_after_mb,
            s.live_kb_per_connection,
            s.subscriber_cores,
            s.subscriber_drops,
        );
        if s.continuity_min < 1.0 {
            break;
        }
        held = Some(n);
    }
    if ramp {
        match held {
            Some(n) => println!("scale held={n}"),
            None => println!("scale held=none"),
        }
    }
    let _ = source.kill();
    let _ = source.wait();
}
