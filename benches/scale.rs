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
//! subscriber_drops=… chunk_ms=…`
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
//! `--chunk-ms MS`: the broadcast's chunk duration (250; a real audio channel, MP3, AAC or
//! Ogg, is cut into 1000-ms chunks, but these random bytes are no format).

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::disallowed_methods,
    unreachable_pub
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::procs::{gridcast, keygen};
use common::relay::{
    Audience, Relay, continuity, metric, paced_broadcast, random_stream_file, stdout_of,
};
use common::sys::{process_cpu_ns, raise_fd_limit, rss_kb};
use gridcast::keys::ChannelId;

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

fn step(n: usize, link: &str, channel: ChannelId, dir: &Path, window: Duration) -> Step {
    let relay = Relay::start(link, dir, &["--workers", "2"]);
    let pid = relay.child.id();
    // Let the relay draw its first chunks before measuring its memory without subscribers.
    thread::sleep(Duration::from_secs(2));
    let base_kb = rss_kb(pid);

    let audience = Audience::start(n, CLIENT_THREADS, &relay, channel);
    thread::sleep(WARMUP);

    let (r0, c0, s0, t0) = (
        process_cpu_ns(pid),
        audience.cpu_ns(),
        audience.newest(),
        Instant::now(),
    );
    thread::sleep(window);
    let (r1, c1, s1, t1) = (
        process_cpu_ns(pid),
        audience.cpu_ns(),
        audience.newest(),
        Instant::now(),
    );
    let rss = rss_kb(pid);
    let subscriber_drops = metric(relay.admin, "gridcast_subscriber_drops_total");
    thread::sleep(GRACE);
    let played = audience.finish();
    // The subscribers' sockets are closed without a word: the relay drops each connection at
    // its idle timeout (10 s). What its memory comes back to then tells live state per
    // connection from what the allocator keeps.
    thread::sleep(IDLE_GONE);
    let rss_after = rss_kb(pid);
    drop(relay);

    // The window's chunks: after the newest played at its start, up to the newest at its end.
    let (continuity_min, continuity_mean) = continuity(&played, s0 + 1, s1);
    let secs = (t1 - t0).as_secs_f64();
    Step {
        subscribers: n,
        continuity_min,
        continuity_mean,
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
    let chunk_ms: u64 = arg(&args, "--chunk-ms").unwrap_or(250);

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
    let input = random_stream_file(dir.path(), RATE_BPS, stream_secs);
    let (mut source, link) = paced_broadcast(&key, &input, RATE_BPS, chunk_ms);

    let mut held = None;
    for n in steps {
        let s = step(n, &link, channel, dir.path(), window);
        println!(
            "scale subscribers={} continuity_min={:.4} continuity_mean={:.4} relay_cores={:.3} rss_mb={:.1} kb_per_connection={:.1} base_mb={:.1} rss_after_mb={:.1} live_kb_per_connection={:.1} subscriber_cores={:.3} subscriber_drops={} chunk_ms={chunk_ms}",
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
