//! A real `gridcast relay` process for benches that measure one: started on loopback with an
//! admin listener, waited for until ready, killed when dropped. And the stream such benches
//! feed a `gridcast broadcast`: a file of random bytes (a relay never looks inside).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use gridcast::keys::{ChannelId, NodeId};

use super::clients::Clients;
use super::procs::{free_udp_port, gridcast, spawn_with_link};
use super::sys::{this_thread_id, thread_cpu_ns};

/// What `cmd` printed on stdout, trimmed; panics when it fails.
pub fn stdout_of(mut cmd: Command) -> String {
    let out = cmd.stderr(Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Waits (bounded) until `addr` answers `/readyz` with 200.
pub fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if super::http::get(addr, "/readyz").is_some_and(|(s, _)| s == 200) {
            return;
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!("the relay at {addr} was not ready within 20 s");
}

/// The figure `name` of the relay's metrics (summed over its label sets).
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    let Some((200, body)) = super::http::get(addr, "/metrics") else {
        return f64::NAN;
    };
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `secs` seconds of stream at `rate_bps` as random bytes in `dir`; returns the file's path.
pub fn random_stream_file(dir: &Path, rate_bps: u64, secs: u64) -> PathBuf {
    let input = dir.join("stream.bin");
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
    let total = rate_bps / 8 * secs;
    for _ in 0..total.div_ceil(block.len() as u64) {
        f.write_all(&block).unwrap();
    }
    input
}

/// A `gridcast broadcast` of `key`'s channel on a free loopback port, pacing `input` at
/// `rate_bps` in chunks of `chunk_ms`; returns it with its link.
pub fn paced_broadcast(key: &Path, input: &Path, rate_bps: u64, chunk_ms: u64) -> (Child, String) {
    spawn_with_link(gridcast(&[
        "broadcast",
        "--key",
        key.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_udp_port()),
        "--input",
        input.to_str().unwrap(),
        "--rate",
        &rate_bps.to_string(),
        "--chunk-ms",
        &chunk_ms.to_string(),
    ]))
}

/// A `gridcast relay` joined to a channel's link, as an operator starts one (the default
/// worker count: one per core), with its node key kept in a scratch directory.
pub struct Relay {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub id: NodeId,
}

impl Relay {
    /// Starts a relay with `extra` arguments after the usual ones, and waits until it is ready.
    pub fn start(link: &str, dir: &Path, extra: &[&str]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", super::http::free_tcp_port())
            .parse()
            .unwrap();
        let node_key = dir.join("relay.key");
        let mut args = vec![
            "relay".to_owned(),
            "--join".to_owned(),
            link.to_owned(),
            "--listen".to_owned(),
            addr.to_string(),
            "--node-key".to_owned(),
            node_key.to_str().unwrap().to_owned(),
            "--admin".to_owned(),
            admin.to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = gridcast(&args).stdout(Stdio::null()).spawn().unwrap();
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

/// A relay's audience: `n` gridcast engines in this process on their own sockets, driven by
/// `threads` threads (unpinned: they take whatever CPU the relay leaves), each subscribed to
/// the first 8 substreams (enough to decode every chunk) and playing what it decodes.
pub struct Audience {
    threads: Vec<thread::JoinHandle<Vec<Vec<u64>>>>,
    stop: Arc<AtomicBool>,
    newest: Arc<AtomicU64>,
    bytes: Arc<Vec<AtomicU64>>,
    lost: Arc<Vec<AtomicU64>>,
    /// The driving threads' ids, for their CPU time.
    pub tids: Vec<u32>,
}

impl Audience {
    pub fn start(n: usize, threads: usize, relay: &Relay, channel: ChannelId) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let newest = Arc::new(AtomicU64::new(0));
        let per_thread = || -> Arc<Vec<AtomicU64>> {
            Arc::new((0..threads).map(|_| AtomicU64::new(0)).collect())
        };
        let (bytes, lost) = (per_thread(), per_thread());
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let handles = (0..threads)
            .map(|t| {
                let share = n / threads + usize::from(t < n % threads);
                let (addr, id) = (relay.addr, relay.id);
                let (stop, newest, bytes, lost, tids) = (
                    Arc::clone(&stop),
                    Arc::clone(&newest),
                    Arc::clone(&bytes),
                    Arc::clone(&lost),
                    tid_tx.clone(),
                );
                thread::spawn(move || {
                    tids.send(this_thread_id()).unwrap();
                    let mut clients = Clients::new(share, addr, id, channel, 8);
                    let mut last = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        if !clients.turn() {
                            thread::sleep(Duration::from_micros(200));
                        }
                        if last.elapsed() >= Duration::from_millis(20) {
                            last = Instant::now();
                            let top = clients.clients.iter().filter_map(|c| c.played.last());
                            if let Some(&top) = top.max() {
                                newest.fetch_max(top, Ordering::Relaxed);
                            }
                            let played = clients.clients.iter().map(|c| c.played_bytes).sum();
                            bytes[t].store(played, Ordering::Relaxed);
                            let gone = clients.clients.iter().map(|c| c.lost as u64).sum();
                            lost[t].store(gone, Ordering::Relaxed);
                        }
                    }
                    clients.clients.into_iter().map(|c| c.played).collect()
                })
            })
            .collect();
        let tids = (0..threads).map(|_| tid_rx.recv().unwrap()).collect();
        Self {
            threads: handles,
            stop,
            newest,
            bytes,
            lost,
            tids,
        }
    }

    /// The newest chunk any subscriber played.
    pub fn newest(&self) -> u64 {
        self.newest.load(Ordering::Relaxed)
    }

    /// Stream bytes the subscribers played, all told (as of the last 20 ms).
    pub fn played_bytes(&self) -> u64 {
        self.bytes.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Connections the subscribers lost (refused, closed by the relay, timed out), all told
    /// (as of the last 20 ms).
    pub fn lost(&self) -> u64 {
        self.lost.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// CPU time of the driving threads.
    pub fn cpu_ns(&self) -> u64 {
        self.tids.iter().map(|&t| thread_cpu_ns(t)).sum()
    }

    /// Stops the subscribers; returns the chunks each one played.
    pub fn finish(self) -> Vec<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

/// Each subscriber's share of the chunks `first..=last` that it played: the smallest share
/// and the mean (a subscriber that played none of them scores 0).
pub fn continuity(played: &[Vec<u64>], first: u64, last: u64) -> (f64, f64) {
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
    let min = shares.iter().copied().fold(1.0, f64::min);
    (min, shares.iter().sum::<f64>() / shares.len().max(1) as f64)
}
