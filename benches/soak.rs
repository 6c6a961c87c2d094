//! The soak: the resilience bed (`tests/common/bed.rs`) for half an hour, with churn every
//! few seconds. Host 0 runs `broadcast` fed live ffmpeg, hosts 1-3 a `relay` each, hosts 4-6
//! a `play` each drawing from all three relays. Every path has 40 ms ± 10 ms of delay and 1%
//! loss. Every `--churn` seconds one relay, in turn, is stopped and started again on the same
//! address and key. Kills (SIGKILL) and drains (SIGTERM, waited for) alternate, and a relay is
//! always back before the next one goes.
//!
//! Every minute it prints, for every process:
//!
//! `soak minute=… proc=… pid=… rss_mb=… fds=… threads=…`
//!
//! At the end it prints each long-lived process's RSS growth from minute 2 to the last
//! sample taken while it still ran (`soak growth proc=… rss_minute2_mb=… rss_last_mb=…
//! fds_minute2=… fds_last=… last_minute=… flat=…`) and fails if one was not flat (more than
//! a quarter more RSS plus 2 MB, or more than two more fds), and it holds every player's
//! file to the tests' rule: a byte-exact run of the encoder's bytes to its very end that
//! decodes cleanly. That rule is continuity 100%: one lost chunk breaks it.
//!
//! `--minutes N` (30), `--churn S` (5). Needs root, iproute2, /dev/net/tun and ffmpeg. It is
//! not run in CI (CI only builds it).

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::disallowed_methods,
    unreachable_pub
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use common::bed::{Bed, PORT, Relay, Shape, start_relay};
use common::procs::{Live, assert_tail, have_ffmpeg, keygen, nodes_of, signal};
use common::sys::{fd_count, rss_kb, thread_count};

const SOURCE: usize = 0;
const RELAYS: [usize; 3] = [1, 2, 3];
const PLAYERS: [usize; 3] = [4, 5, 6];

/// Half of a path's 40 ms ± 10 ms and 1% loss, on each end of it.
const SHAPE: Shape = Shape {
    delay_ms: 20,
    jitter_ms: 5,
    loss_pct: 0.5,
    rate_kbit: None,
    max_frame: None,
};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a whole number"))
}

/// A long-lived process: its name, pid, and (RSS MB, fds) each minute.
type Watched = (String, u32, Vec<(f64, usize)>);

/// RSS (MB), open fds and threads of `pid`.
fn sample(pid: u32) -> (f64, usize, usize) {
    (rss_kb(pid) / 1024.0, fd_count(pid), thread_count(pid))
}

fn main() {
    if std::env::args().any(|a| a == "--bench") && !std::env::args().any(|a| a == "--minutes") {
        // `cargo bench` runs every bench: this one only when asked by name with its options
        // (`cargo bench --bench soak -- --minutes 30`), since it needs root and half an hour.
        println!("soak: skipped (run `cargo bench --bench soak -- --minutes 30`)");
        return;
    }
    let minutes = arg("--minutes", 30);
    let churn = Duration::from_secs(arg("--churn", 5));
    assert!(
        Bed::can_run() && have_ffmpeg(),
        "the soak needs root, iproute2, /dev/net/tun and ffmpeg"
    );
    let mut bed = Bed::new(7, SHAPE, SHAPE);
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let key = keygen(dir);
    let secs = minutes * 60;
    let live = Live::start(
        bed.gridcast(
            SOURCE,
            &[
                "broadcast",
                "--key",
                key.to_str().unwrap(),
                "--listen",
                &format!("{}:{PORT}", bed.addr(SOURCE)),
                "--linger",
                "6",
            ],
        ),
        secs,
    );
    let source_pid = live.source_pid();
    let keys: Vec<PathBuf> = RELAYS
        .iter()
        .map(|h| dir.join(format!("relay{h}.key")))
        .collect();
    let mut relays: Vec<Relay> = RELAYS
        .iter()
        .zip(&keys)
        .map(|(&h, k)| start_relay(&bed, h, &live.link, k))
        .collect();
    let channel = live.link.split_once('@').unwrap().0.to_owned();
    let play_link = format!(
        "{channel}@{}",
        relays
            .iter()
            .map(|r| nodes_of(&r.link))
            .collect::<Vec<_>>()
            .join(",")
    );
    thread::sleep(Duration::from_secs(1));
    let outputs: Vec<PathBuf> = PLAYERS
        .iter()
        .map(|h| dir.join(format!("player{h}.ts")))
        .collect();
    let players: Vec<usize> = PLAYERS
        .iter()
        .zip(&outputs)
        .map(|(&h, out)| {
            let child = bed
                .gridcast(h, &["play", &play_link, "--output", out.to_str().unwrap()])
                .spawn()
                .unwrap();
            bed.keep(child)
        })
        .collect();
    let player_pids: Vec<u32> = players.iter().map(|&p| bed.child(p).id()).collect();

    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut next_churn = start + churn;
    let mut next_minute = start + Duration::from_secs(60);
    let mut minute = 0;
    let mut churns = 0usize;
    // Per long-lived process: (name, pid, samples of (rss, fds)).
    let mut long: Vec<Watched> = vec![("source".into(), source_pid, vec![])];
    for (h, pid) in PLAYERS.iter().zip(&player_pids) {
        long.push((format!("player{h}"), *pid, vec![]));
    }
    loop {
        let now = Instant::now();
        let over = now >= end;
        if !over && now >= next_churn {
            next_churn += churn;
            let i = churns % relays.len();
            let kill = churns.is_multiple_of(2);
            let r = &mut relays[i];
            if kill {
                r.child.kill().unwrap();
            } else {
                signal(&r.child, "-TERM");
            }
            let status = r.child.wait().unwrap();
            assert!(kill || status.success(), "a drained relay failed: {status}");
            relays[i] = start_relay(&bed, RELAYS[i], &live.link, &keys[i]);
            churns += 1;
        }
        // Each minute, and once more at the end.
        if now >= next_minute || over {
            next_minute += Duration::from_secs(60);
            minute += 1;
            for (name, pid, samples) in &mut long {
                let (rss, fds, threads) = sample(*pid);
                samples.push((rss, fds));
                println!(
                    "soak minute={minute} proc={name} pid={pid} rss_mb={rss:.1} fds={fds} \
                     threads={threads}"
                );
            }
            for (h, r) in RELAYS.iter().zip(&relays) {
                let pid = r.child.id();
                let (rss, fds, threads) = sample(pid);
                println!(
                    "soak minute={minute} proc=relay{h} pid={pid} rss_mb={rss:.1} fds={fds} \
                     threads={threads}"
                );
            }
        }
        if over {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let (reference, _) = live.finish_at();
    thread::sleep(Duration::from_secs(5));
    for &p in &players {
        signal(bed.child(p), "-TERM");
    }
    for &p in &players {
        let status = bed.child(p).wait().unwrap();
        assert!(status.success(), "play failed: {status}");
    }
    drop(relays);
    let mut grown = Vec::new();
    for (name, _, samples) in &long {
        // Minute 2 is after warm-up. The last sample is the last one taken while the process
        // still ran: the input ends with the run, and a player writing a file ends with it.
        let alive: Vec<(usize, &(f64, usize))> = samples
            .iter()
            .enumerate()
            .filter(|(_, s)| s.1 > 0)
            .collect();
        if let (Some(&(_, first)), Some(&(at, last))) = (alive.get(1), alive.last()) {
            // Flat: a quarter more RSS plus 2 MB of allocator slack at most, and no more
            // than two more descriptors.
            let flat = last.0 <= first.0 * 1.25 + 2.0 && last.1 <= first.1 + 2;
            println!(
                "soak growth proc={name} rss_minute2_mb={:.1} rss_last_mb={:.1} fds_minute2={} \
                 fds_last={} last_minute={} flat={flat}",
                first.0,
                last.0,
                first.1,
                last.1,
                at + 1
            );
            if !flat {
                grown.push(name.clone());
            }
        }
    }
    assert!(grown.is_empty(), "not flat after warm-up: {grown:?}");
    for out in &outputs {
        assert_tail(out, &reference, 0.9);
    }
    println!("soak done minutes={minutes} churns={churns} players_byte_exact=3");
}
