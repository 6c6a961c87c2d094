//! Nodes that stop tell their neighbours. Real processes: ffmpeg feeds a `broadcast`, one
//! `relay` carries it, one `play` draws from that relay. The player is sent SIGTERM: the relay
//! must count its connection closed by the application (the player's close) and stop serving
//! it, never by its idle timeout (10 s of silence, during which it would go on sending the
//! stream to nobody). Then the relay is sent SIGTERM, and the source must see the same of the
//! relay. A node that stopped without a word would show up in `idle_timeout` instead. Once
//! on the default backend (io_uring here) and once on the portable one.
//!
//! And a broadcast stopped by its broadcaster (SIGTERM to `broadcast` while its input still
//! flows) ends for its players: a `play` writing to a file must finish by itself, its file a
//! byte-exact run of the input.
//!
//! Skipped (with a message) where ffmpeg is missing, unless `GRIDCAST_REQUIRE_FFMPEG=1` (CI).

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use common::http::{free_tcp_port, get, poll, sample};
use common::procs::*;

use std::io::Write;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const STREAM_SECS: u64 = 20;
/// Shorter than the engine's 10-s idle timeout, so that only a close can end the subscription
/// in time; an idle timeout is caught by the counters below in any case.
const FORGET_WITHIN: Duration = Duration::from_secs(8);

fn closed(scrape: &str, reason: &str) -> f64 {
    sample(
        scrape,
        &format!("gridcast_quic_connections_closed_total{{reason=\"{reason}\"}}"),
    )
}

/// Waits until the node at `admin` serves no subscription; its scrape then.
fn forgotten(admin: SocketAddr, who: &str) -> String {
    let (_, scrape) = poll(admin, "/metrics", FORGET_WITHIN, |status, body| {
        status == 200 && sample(body, "gridcast_subscribers") == 0.0
    })
    .unwrap_or_else(|| panic!("{who}: no scrape"));
    assert_eq!(
        sample(&scrape, "gridcast_subscribers"),
        0.0,
        "{who} still serves the node that stopped {FORGET_WITHIN:?} later"
    );
    scrape
}

#[test]
fn a_player_and_a_relay_that_stop_are_forgotten_at_once_by_their_parents() {
    run("auto");
}

#[test]
fn a_player_and_a_relay_on_the_portable_backend_are_forgotten_at_once_too() {
    run("portable");
}

/// The relay and the player on `backend` (the source on the default one).
fn run(backend: &str) {
    if !have_ffmpeg() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let source_admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let mut source = loopback_source(&key, 4);
    source.args(["--admin", &source_admin.to_string()]);
    let live = Live::start(source, STREAM_SECS);
    let relay_admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let (relay, relay_link) = spawn_with_link(gridcast(&[
        "relay",
        "--join",
        &live.link,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        &relay_admin.to_string(),
        "--io-backend",
        backend,
    ]));
    let out = dir.path().join("player.ts");
    let player = gridcast(&[
        "play",
        &relay_link,
        "--output",
        out.to_str().unwrap(),
        "--io-backend",
        backend,
    ])
    .spawn()
    .unwrap();
    let mut children = Reaper(vec![relay, player]);

    // The player plays, through the relay.
    let started = Instant::now();
    while std::fs::metadata(&out).map_or(0, |m| m.len()) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the player wrote nothing"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, scrape) = get(relay_admin, "/metrics").unwrap();
    assert!(sample(&scrape, "gridcast_subscribers") >= 1.0, "{scrape}");

    signal(&children.0[1], "-TERM");
    assert!(children.0[1].wait().unwrap().success(), "play failed");
    let scrape = forgotten(relay_admin, "the relay");
    assert!(closed(&scrape, "application") >= 1.0, "{scrape}");
    assert_eq!(closed(&scrape, "idle_timeout"), 0.0, "{scrape}");
    println!("the player's connection closed by the player, not by silence");

    signal(&children.0[0], "-TERM");
    assert!(children.0[0].wait().unwrap().success(), "relay failed");
    let scrape = forgotten(source_admin, "the source");
    assert!(closed(&scrape, "application") >= 1.0, "{scrape}");
    assert_eq!(closed(&scrape, "idle_timeout"), 0.0, "{scrape}");
    println!("the relay's connection closed by the relay, not by silence");
    drop(live);
}

#[test]
fn a_broadcast_stopped_by_a_signal_ends_for_its_players() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let mut source = loopback_source(&key, 2);
    source.stdin(Stdio::piped());
    let (mut source, link) = spawn_with_link(source);
    // An endless input: 20 KB of a fixed pseudo-random sequence every 100 ms, kept as the
    // reference, until the source stops reading.
    let mut stdin = source.stdin.take().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut written = Vec::new();
            let mut noise = Noise::new(0x9e37_79b9_7f4a_7c15);
            while !done.load(Ordering::Relaxed) && written.len() < 64 << 20 {
                let block = noise.bytes(20_000);
                if stdin.write_all(&block).is_err() {
                    break;
                }
                written.extend_from_slice(&block);
                std::thread::sleep(Duration::from_millis(100));
            }
            written
        })
    };
    let out = dir.path().join("player.bin");
    let player = gridcast(&["play", &link, "--output", out.to_str().unwrap()])
        .spawn()
        .unwrap();
    let mut children = Reaper(vec![player]);
    let started = Instant::now();
    while std::fs::metadata(&out).map_or(0, |m| m.len()) < 100_000 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the player wrote too little"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    signal(&source, "-TERM");
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = children.0[0].try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(15),
            "the player still waits on a broadcast that was stopped"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "the player finished {:?} after the source's SIGTERM",
        signalled.elapsed()
    );
    assert!(status.success(), "play failed: {status}");
    assert!(source.wait().unwrap().success(), "broadcast failed");
    done.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();

    // A contiguous run of the input, from where the player joined.
    let played = std::fs::read(&out).unwrap();
    let head = &played[..64];
    let at = written
        .windows(head.len())
        .position(|w| w == head)
        .expect("the player's first bytes are not in the input");
    assert!(
        at + played.len() <= written.len(),
        "the player has bytes the input never had"
    );
    assert!(
        written[at..at + played.len()] == played[..],
        "the player's file is not a byte-exact run of the input"
    );
}
