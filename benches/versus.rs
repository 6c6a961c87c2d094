//! The relay against what an operator would run instead: one live stream to a room of
//! listeners, served by `gridcast relay` and by Icecast 2 (Debian's `icecast2`), the server
//! internet radio and many small video streams run on today. What each server's process
//! (every thread) spends in CPU time per GB of stream its listeners received.
//!
//! The two do not do the same work: the relay's listeners get QUIC (every packet encrypted and
//! authenticated, each chunk's signature checked once by the relay), erasure-coded substreams,
//! congestion control and pacing in user space; Icecast's get the bytes over plain HTTP on TCP,
//! with the kernel's congestion control and no encryption. The comparison is what a listener
//! costs the machine either way, which is what an operator pays for.
//!
//! Real processes on loopback, the listeners in this process:
//! - gridcast: `gridcast broadcast` paces a file of random bytes at the rate (a relay never
//!   looks inside the payload); one `gridcast relay` joins it as an operator starts one (one
//!   worker per core); the listeners are gridcast engines on their own sockets, driven by 2
//!   threads, each drawing the 8 substreams that decode the stream and playing every chunk.
//! - Icecast: `icecast2` with a configuration written here (a loopback port, a source
//!   password, room for the listeners, its defaults otherwise: a 512 KB queue per listener
//!   and a 64 KB burst on connect). This process is its source (a `SOURCE` request, then the
//!   same random bytes paced as the broadcast paces them, a quarter second of stream every
//!   250 ms) and its listeners (HTTP GETs read on 2 threads; the warm-up starts once Icecast
//!   has answered all of them, which at a thousand takes it seconds).
//!
//! For each size the two run in turn, `--rounds` times (3), interleaved, each on a fresh
//! server; after a warm-up the window is measured. One line per run:
//!
//! `versus server=<gridcast|icecast2> listeners=… rate_kbps=… cpu_s_per_gb=… server_cores=…
//! delivered_mb=… continuity_min=… dropped=… listener_cores=… idle_ms_per_s=…` (gridcast's
//! with `chunk_ms=…`)
//!
//! then per size `versus median listeners=… gridcast_cpu_s_per_gb=… icecast2_cpu_s_per_gb=…
//! gridcast_vs_icecast2=… gridcast_idle_ms_per_s=… icecast2_idle_ms_per_s=…`.
//!
//! - idle_ms_per_s: before its listeners come, the server's CPU time per second while the
//!   stream flows into it and nobody listens (6 s, 2 s after the relay is ready or Icecast's
//!   mount is up): what carrying the channel costs whatever the audience. In a small room it
//!   is much of the cost per listener.
//! - cpu_s_per_gb: the server's CPU time in the window over the stream bytes every listener
//!   received in it (gridcast: the bytes of the chunks they played; Icecast: the body bytes
//!   they read), per 10⁹ bytes.
//! - continuity_min: the worst listener's share of the window's stream (gridcast: chunks
//!   played; Icecast: bytes read over the bytes the source sent). A server that falls short
//!   is not cheap but failing, so read this first. dropped: listeners whose connection the
//!   server closed or lost during the run (Icecast drops one that falls a queue behind).
//!
//! `--channels C` (1): the server carries C channels of the same rate at once (C broadcasts
//! joined by the one relay; C sources on as many Icecast mounts), the listeners all on the
//! first, so idle_ms_per_s is what C quiet channels cost together: what a supernode carrying
//! many small rooms pays before anyone listens. Lines then say `channels=C`.
//!
//! `--listeners N`: one size (default 50 and 100). `--rate BPS` (4000000; 128000 is a radio
//! channel, where each listener's quarter second is 4 KB and what a server pays per listener
//! and per write, not per byte, decides), `--chunk-ms MS` (the broadcast's chunks, 250 unless
//! given; Icecast's source stays paced at 250 ms, as an encoder writes whatever gridcast
//! does), `--window S` (20), `--rounds N` (3). Without
//! `icecast2` on the PATH the gridcast lines alone are printed.

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::disallowed_methods,
    unreachable_pub
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::http::free_tcp_port;
use common::procs::{gridcast, have_tool, keygen};
use common::relay::{Audience, Relay, continuity, paced_broadcast, random_stream_file, stdout_of};
use common::sys::{process_cpu_ns, raise_fd_limit, this_thread_id, thread_cpu_ns};
use gridcast::keys::ChannelId;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Threads driving the listeners, for either server.
const LISTENER_THREADS: usize = 2;
/// From the listeners' start to the window: handshakes, bursts on connect, the first chunks.
const WARMUP: Duration = Duration::from_secs(8);
/// How long Icecast may take to answer every listener.
const ANSWER_WITHIN: Duration = Duration::from_secs(60);
/// From the server's start (the relay ready, Icecast's mount up) to its idle window.
const SETTLE: Duration = Duration::from_secs(2);
/// The idle window: the stream flows into the server and nobody listens. What carrying a
/// channel costs whatever the audience, which decides a small room's cost per listener.
const IDLE: Duration = Duration::from_secs(6);
/// Past the window, so that a chunk published at its very end can still be played.
const GRACE: Duration = Duration::from_secs(2);
/// How the source is paced: a quarter second of stream at a time, as gridcast cuts chunks.
const TICK: Duration = Duration::from_millis(250);
/// Icecast's mount prefix (`/live`, `/live2`, …) and source password (loopback only, for this
/// run).
const MOUNT: &str = "/live";
const SOURCE_PASSWORD: &str = "gridcast-bench";

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

/// One server's measured window.
struct Run {
    cpu_ns: u64,
    delivered: u64,
    secs: f64,
    continuity_min: f64,
    /// Listeners the server dropped or lost during the run.
    dropped: u64,
    listener_cpu_ns: u64,
    /// The server's CPU time per second of the idle window, in milliseconds.
    idle_ms_per_s: f64,
    /// gridcast's chunk duration.
    chunk_ms: Option<u64>,
    /// Channels the server carried.
    channels: usize,
}

impl Run {
    fn cpu_s_per_gb(&self) -> f64 {
        self.cpu_ns as f64 / self.delivered.max(1) as f64
    }

    fn print(&self, server: &str, listeners: usize, rate: u64) {
        println!(
            "versus server={server} listeners={listeners} rate_kbps={} cpu_s_per_gb={:.3} server_cores={:.3} delivered_mb={:.1} continuity_min={:.4} dropped={} listener_cores={:.3} idle_ms_per_s={:.2}{}{}",
            rate / 1000,
            self.cpu_s_per_gb(),
            self.cpu_ns as f64 / 1e9 / self.secs,
            self.delivered as f64 / 1e6,
            self.continuity_min,
            self.dropped,
            self.listener_cpu_ns as f64 / 1e9 / self.secs,
            self.idle_ms_per_s,
            self.chunk_ms
                .map_or(String::new(), |ms| format!(" chunk_ms={ms}")),
            if self.channels > 1 {
                format!(" channels={}", self.channels)
            } else {
                String::new()
            },
        );
    }
}

/// A fresh `gridcast relay` on the broadcasts at `links`, `n` listeners on the first.
fn gridcast_run(
    n: usize,
    links: &[String],
    channel: ChannelId,
    dir: &Path,
    window: Duration,
    chunk_ms: u64,
) -> Run {
    let extra: Vec<&str> = links[1..]
        .iter()
        .flat_map(|l| ["--join", l.as_str()])
        .collect();
    let relay = Relay::start(&links[0], dir, &extra);
    let pid = relay.child.id();
    let idle_ms_per_s = idle(pid);
    let audience = Audience::start(n, LISTENER_THREADS, &relay, channel);
    thread::sleep(WARMUP);
    let (r0, b0, c0, s0, t0) = (
        process_cpu_ns(pid),
        audience.played_bytes(),
        audience.cpu_ns(),
        audience.newest(),
        Instant::now(),
    );
    thread::sleep(window);
    let (r1, b1, c1, s1, t1) = (
        process_cpu_ns(pid),
        audience.played_bytes(),
        audience.cpu_ns(),
        audience.newest(),
        Instant::now(),
    );
    thread::sleep(GRACE);
    let dropped = audience.lost();
    let played = audience.finish();
    drop(relay);
    let (continuity_min, _) = continuity(&played, s0 + 1, s1);
    Run {
        cpu_ns: r1 - r0,
        delivered: b1 - b0,
        secs: (t1 - t0).as_secs_f64(),
        continuity_min,
        dropped,
        listener_cpu_ns: c1 - c0,
        idle_ms_per_s,
        chunk_ms: Some(chunk_ms),
        channels: links.len(),
    }
}

/// The process `pid`'s CPU time per second, in milliseconds, over [`IDLE`] after [`SETTLE`].
fn idle(pid: u32) -> f64 {
    thread::sleep(SETTLE);
    let (c0, t0) = (process_cpu_ns(pid), Instant::now());
    thread::sleep(IDLE);
    let (c1, t1) = (process_cpu_ns(pid), Instant::now());
    (c1 - c0) as f64 / 1e6 / (t1 - t0).as_secs_f64()
}

/// `icecast2` on its own configuration in `dir`, killed when dropped.
struct Icecast {
    child: Child,
    addr: SocketAddr,
}

impl Icecast {
    fn start(dir: &Path, listeners: usize, channels: usize) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let logs = dir.join("icecast-logs");
        std::fs::create_dir_all(&logs).unwrap();
        // Icecast will not run as root: it drops to nobody, which must be able to write its
        // logs.
        let owner = if rustix::process::geteuid().is_root() {
            let (uid, gid) = nobody();
            std::os::unix::fs::chown(&logs, Some(uid), Some(gid)).unwrap();
            "<changeowner><user>nobody</user><group>nogroup</group></changeowner>"
        } else {
            ""
        };
        let config = format!(
            "<icecast>
  <location>loopback</location><admin>bench@localhost</admin>
  <limits><clients>{clients}</clients><sources>{sources}</sources></limits>
  <authentication>
    <source-password>{SOURCE_PASSWORD}</source-password>
    <admin-user>admin</admin-user><admin-password>{SOURCE_PASSWORD}</admin-password>
  </authentication>
  <hostname>127.0.0.1</hostname>
  <listen-socket><port>{port}</port><bind-address>127.0.0.1</bind-address></listen-socket>
  <paths>
    <basedir>/usr/share/icecast2</basedir><logdir>{logs}</logdir>
    <webroot>/usr/share/icecast2/web</webroot><adminroot>/usr/share/icecast2/admin</adminroot>
  </paths>
  <logging><accesslog>access.log</accesslog><errorlog>error.log</errorlog><loglevel>2</loglevel></logging>
  <security><chroot>0</chroot>{owner}</security>
</icecast>
",
            clients = listeners + channels + 16,
            sources = channels + 1,
            port = addr.port(),
            logs = logs.display(),
        );
        let path = dir.join("icecast.xml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("icecast2")
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "icecast2 did not listen on {addr} within 10 s (its log: {})",
                logs.display()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Self { child, addr }
    }
}

impl Drop for Icecast {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The uid and gid of `nobody` in /etc/passwd (Debian's 65534 if it is not there).
fn nobody() -> (u32, u32) {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            let line = p.lines().find(|l| l.starts_with("nobody:"))?.to_owned();
            let mut f = line.split(':').skip(2);
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .unwrap_or((65534, 65534))
}

/// A response's status line and where its body starts, once `got` holds the whole head.
fn parse_head(got: &[u8]) -> Option<(String, usize)> {
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        assert!(
            got.len() < 64 * 1024,
            "icecast2's answer has no end of head"
        );
        return None;
    };
    let line = got.split(|&b| b == b'\r').next().unwrap_or(&[]);
    Some((String::from_utf8_lossy(line).into_owned(), end + 4))
}

/// Reads a response's head off `stream` (blocking) and returns its status line.
fn read_head(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "icecast2 closed before answering");
        got.extend_from_slice(&buf[..n]);
        if let Some((status, _)) = parse_head(&got) {
            return status;
        }
    }
}

/// The source: sends `stream` to Icecast's mount at `rate` until `stop`, a tick's worth at a
/// time, the ticks at `start`, `start + TICK`, and so on. Returns once the mount is live; the
/// thread runs on.
fn icecast_source(
    addr: SocketAddr,
    mount: &str,
    stream: Arc<Vec<u8>>,
    rate: u64,
    start: Instant,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> thread::JoinHandle<()> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let auth = data_encoding::BASE64.encode(format!("source:{SOURCE_PASSWORD}").as_bytes());
    write!(
        s,
        "SOURCE {mount} HTTP/1.0\r\nAuthorization: Basic {auth}\r\nContent-Type: application/octet-stream\r\nIce-Name: bench\r\nIce-Public: 0\r\n\r\n"
    )
    .unwrap();
    let status = read_head(&mut s);
    assert!(
        status.contains(" 200"),
        "icecast2 refused the source: {status}"
    );
    let per_tick = (rate / 8 * TICK.as_millis() as u64 / 1000) as usize;
    thread::spawn(move || {
        let mut at = 0usize;
        let mut ticks = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let end = (at + per_tick).min(stream.len());
            if s.write_all(&stream[at..end]).is_err() {
                return;
            }
            sent.fetch_add((end - at) as u64, Ordering::Relaxed);
            at = if end == stream.len() { 0 } else { end };
            ticks += 1;
            let next = start + TICK * ticks;
            thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    })
}

/// Waits (bounded) until Icecast serves the mount: it lists a source's mount only once the
/// source's first data is in, later at a radio's rate than at a video's.
fn wait_mount(addr: SocketAddr, mount: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {mount} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let status = read_head(&mut s);
        if status.contains(" 200") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "icecast2 did not serve {mount} within 10 s: {status}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// One of Icecast's listeners: its connection, and its response head until that has ended.
struct Listener {
    index: usize,
    stream: TcpStream,
    head: Option<Vec<u8>>,
    /// Whether Icecast closed it.
    closed: bool,
    /// Listeners whose head has ended, all told.
    answered: Arc<AtomicUsize>,
}

impl Listener {
    /// Takes bytes read from the connection; returns how many of them are body.
    fn body(&mut self, got: &[u8]) -> usize {
        let Some(head) = &mut self.head else {
            return got.len();
        };
        head.extend_from_slice(got);
        let Some((status, start)) = parse_head(head) else {
            return 0;
        };
        assert!(
            status.contains(" 200"),
            "icecast2 refused listener {}: {status}",
            self.index
        );
        let body = head.len() - start;
        self.head = None;
        self.answered.fetch_add(1, Ordering::Relaxed);
        body
    }
}

/// Icecast's listeners: `n` HTTP GETs of the mount, read on [`LISTENER_THREADS`] threads;
/// each listener's body bytes counted in `counts`.
fn icecast_listeners(
    addr: SocketAddr,
    n: usize,
    stop: &Arc<AtomicBool>,
    counts: &Arc<Vec<AtomicU64>>,
    answered: &Arc<AtomicUsize>,
    dropped: &Arc<AtomicU64>,
) -> (Vec<thread::JoinHandle<()>>, Vec<u32>) {
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let handles = (0..LISTENER_THREADS)
        .map(|t| {
            let mine: Vec<usize> = (0..n).filter(|i| i % LISTENER_THREADS == t).collect();
            let (stop, counts, answered, dropped, tid_tx) = (
                Arc::clone(stop),
                Arc::clone(counts),
                Arc::clone(answered),
                Arc::clone(dropped),
                tid_tx.clone(),
            );
            thread::spawn(move || {
                tid_tx.send(this_thread_id()).unwrap();
                // Every request goes out before any answer is read: Icecast answers a
                // listener from its source loop, on the source's next data, so reading each
                // head before the next request would take a quarter second per listener at
                // this bench's pacing.
                let mut listeners: Vec<Listener> = mine
                    .into_iter()
                    .map(|i| {
                        let mut s = TcpStream::connect(addr).unwrap();
                        write!(s, "GET {MOUNT} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
                        s.set_nonblocking(true).unwrap();
                        Listener {
                            index: i,
                            stream: s,
                            head: Some(Vec::new()),
                            closed: false,
                            answered: Arc::clone(&answered),
                        }
                    })
                    .collect();
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    let mut any = false;
                    for l in listeners.iter_mut().filter(|l| !l.closed) {
                        loop {
                            match l.stream.read(&mut buf) {
                                Ok(0) => {
                                    // Counted, and its share of the stream stops growing: the
                                    // run's continuity shows it.
                                    l.closed = true;
                                    dropped.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                                Ok(got) => {
                                    any = true;
                                    let body = l.body(&buf[..got]);
                                    counts[l.index].fetch_add(body as u64, Ordering::Relaxed);
                                }
                                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                                Err(e) => panic!("listener {}: {e}", l.index),
                            }
                        }
                    }
                    if !any {
                        thread::sleep(Duration::from_micros(200));
                    }
                }
            })
        })
        .collect();
    let tids = (0..LISTENER_THREADS)
        .map(|_| tid_rx.recv().unwrap())
        .collect();
    (handles, tids)
}

/// Icecast's `i`th mount (0 is the listeners').
fn mount(i: usize) -> String {
    if i == 0 {
        MOUNT.to_owned()
    } else {
        format!("{MOUNT}{}", i + 1)
    }
}

/// A fresh `icecast2` with this process as the source of its `channels` mounts and `n`
/// listeners on the first.
fn icecast_run(
    n: usize,
    stream: &Path,
    rate: u64,
    dir: &Path,
    window: Duration,
    channels: usize,
) -> Run {
    let server = Icecast::start(dir, n, channels);
    let pid = server.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(std::fs::read(stream).unwrap());
    let start = Instant::now();
    // The other mounts' bytes are not counted: only the listeners' mount's are compared.
    let sources: Vec<_> = (0..channels)
        .map(|i| {
            let counted = if i == 0 {
                Arc::clone(&sent)
            } else {
                Arc::new(AtomicU64::new(0))
            };
            icecast_source(
                server.addr,
                &mount(i),
                Arc::clone(&bytes),
                rate,
                start,
                Arc::clone(&stop),
                counted,
            )
        })
        .collect();
    // The window opens and closes halfway between two of the source's ticks, when every
    // listener has read the last one: the counts then compare like with like.
    let mid_tick = || {
        let since = start.elapsed().as_nanos() % TICK.as_nanos();
        let half = TICK.as_nanos() / 2;
        let wait = (half + TICK.as_nanos() - since) % TICK.as_nanos();
        thread::sleep(Duration::from_nanos(wait as u64));
    };
    for i in 0..channels {
        wait_mount(server.addr, &mount(i));
    }
    let idle_ms_per_s = idle(pid);
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let answered = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let (listeners, tids) = icecast_listeners(server.addr, n, &stop, &counts, &answered, &dropped);
    // The warm-up starts once Icecast has answered every listener: it takes them in from its
    // source loop, and a thousand of them take it seconds.
    let deadline = Instant::now() + ANSWER_WITHIN;
    while answered.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "icecast2 answered {} of {n} listeners within {} s",
            answered.load(Ordering::Relaxed),
            ANSWER_WITHIN.as_secs()
        );
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(WARMUP);
    mid_tick();
    let snapshot = || -> Vec<u64> { counts.iter().map(|c| c.load(Ordering::Relaxed)).collect() };
    let listener_cpu = || tids.iter().map(|&t| thread_cpu_ns(t)).sum::<u64>();
    let (r0, l0, c0, x0, t0) = (
        process_cpu_ns(pid),
        snapshot(),
        listener_cpu(),
        sent.load(Ordering::Relaxed),
        Instant::now(),
    );
    thread::sleep(window);
    mid_tick();
    let (r1, l1, c1, x1, t1) = (
        process_cpu_ns(pid),
        snapshot(),
        listener_cpu(),
        sent.load(Ordering::Relaxed),
        Instant::now(),
    );
    stop.store(true, Ordering::Relaxed);
    for l in listeners {
        l.join().unwrap();
    }
    for source in sources {
        source.join().unwrap();
    }
    drop(server);
    let sent = (x1 - x0).max(1) as f64;
    let got: Vec<u64> = l0.iter().zip(&l1).map(|(a, b)| b - a).collect();
    Run {
        cpu_ns: r1 - r0,
        delivered: got.iter().sum(),
        secs: (t1 - t0).as_secs_f64(),
        // A listener may read a few bytes the source sent just before the window (Icecast's
        // writes trail its reads): capped at 1.
        continuity_min: got
            .iter()
            .map(|&g| (g as f64 / sent).min(1.0))
            .fold(1.0, f64::min),
        dropped: dropped.load(Ordering::Relaxed),
        listener_cpu_ns: c1 - c0,
        idle_ms_per_s,
        chunk_ms: None,
        channels,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    raise_fd_limit();
    let sizes: Vec<usize> = arg(&args, "--listeners").map_or(vec![50, 100], |n| vec![n]);
    let rate: u64 = arg(&args, "--rate").unwrap_or(4_000_000);
    let window = Duration::from_secs(arg(&args, "--window").unwrap_or(20));
    let rounds: usize = arg(&args, "--rounds").unwrap_or(3).max(1);
    let chunk_ms: u64 = arg(&args, "--chunk-ms").unwrap_or(250);
    let channels: usize = arg(&args, "--channels").unwrap_or(1).max(1);
    let icecast = have_tool("icecast2", &["-v"], "GRIDCAST_REQUIRE_ICECAST");

    let dir = tempfile::tempdir().unwrap();
    // Enough stream for every run of both servers (the broadcast paces it from its start).
    let per_run = 10
        + SETTLE.as_secs()
        + IDLE.as_secs()
        + WARMUP.as_secs()
        + window.as_secs()
        + GRACE.as_secs();
    let icecast_wait = if icecast {
        per_run + ANSWER_WITHIN.as_secs()
    } else {
        0
    };
    let stream_secs = 10 + (per_run + icecast_wait) * (sizes.len() * rounds) as u64;
    let input: PathBuf = random_stream_file(dir.path(), rate, stream_secs);
    // One broadcast per channel, each with its own key, all pacing the same bytes.
    let mut sources = Vec::new();
    let mut links = Vec::new();
    let mut channel_ids = Vec::new();
    for i in 0..channels {
        let at = dir.path().join(format!("channel{i}"));
        std::fs::create_dir_all(&at).unwrap();
        let key = keygen(&at);
        let id: ChannelId = stdout_of(gridcast(&["channel-id", key.to_str().unwrap()]))
            .parse()
            .unwrap();
        let (source, link) = paced_broadcast(&key, &input, rate, chunk_ms);
        sources.push(source);
        links.push(link);
        channel_ids.push(id);
    }
    let channel = channel_ids[0];

    for &n in &sizes {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let (mut ours_idle, mut theirs_idle) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let g = gridcast_run(n, &links, channel, dir.path(), window, chunk_ms);
            g.print("gridcast", n, rate);
            ours.push(g.cpu_s_per_gb());
            ours_idle.push(g.idle_ms_per_s);
            if icecast {
                let i = icecast_run(n, &input, rate, dir.path(), window, channels);
                i.print("icecast2", n, rate);
                theirs.push(i.cpu_s_per_gb());
                theirs_idle.push(i.idle_ms_per_s);
            }
        }
        let (ours, ours_idle) = (median(ours), median(ours_idle));
        if icecast {
            let (theirs, theirs_idle) = (median(theirs), median(theirs_idle));
            println!(
                "versus median channels={channels} listeners={n} gridcast_cpu_s_per_gb={ours:.3} icecast2_cpu_s_per_gb={theirs:.3} gridcast_vs_icecast2={:.2} gridcast_idle_ms_per_s={ours_idle:.2} icecast2_idle_ms_per_s={theirs_idle:.2}",
                ours / theirs
            );
        } else {
            println!(
                "versus median channels={channels} listeners={n} gridcast_cpu_s_per_gb={ours:.3} gridcast_idle_ms_per_s={ours_idle:.2}"
            );
        }
    }
    for mut source in sources {
        let _ = source.kill();
        let _ = source.wait();
    }
}
