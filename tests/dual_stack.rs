//! IPv6 and dual-stack nodes, with real processes on loopback (::1 and 127.0.0.1). A source
//! listens on IPv6 only and a relay joins it by its IPv6 link, listening on the IPv6 wildcard
//! (which gridcast makes dual-stack). Three players: two on the default local address (which
//! is that wildcard), one given the relay's IPv6 address and one its IPv4 address; both must
//! play the broadcast to its end, byte for byte. A third player bound to IPv4 and given only
//! the IPv6 address must refuse at once and say how to listen instead, not wait in silence
//! for a node its socket cannot reach. Once on the default backend (io_uring here) and once
//! on the portable one.
//!
//! No ffmpeg: the source reads a paced file of pseudo-random bytes, whose end ends the
//! broadcast, so every player exits by itself. Skipped (with a message) where this host has
//! no IPv6 loopback, unless `GRIDCAST_REQUIRE_IPV6=1` (CI).

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use common::procs::*;

use std::process::Stdio;
use std::time::{Duration, Instant};

/// 2.5 MB at 2 Mbit/s: a 10-s broadcast.
const INPUT_BYTES: usize = 2_500_000;

fn have_ipv6() -> bool {
    let found = std::net::UdpSocket::bind("[::1]:0").is_ok();
    if !found {
        assert!(
            !std::env::var("GRIDCAST_REQUIRE_IPV6").is_ok_and(|v| v == "1"),
            "IPv6 loopback is required (GRIDCAST_REQUIRE_IPV6=1) but ::1 cannot be bound"
        );
        println!("no IPv6 loopback: skipping");
    }
    found
}

fn run(backend: &str) {
    if !have_ipv6() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let reference = Noise::new(0x2545_f491_4f6c_dd1d).bytes(INPUT_BYTES);
    let file = dir.path().join("input.bin");
    std::fs::write(&file, &reference).unwrap();

    let (source, link) = spawn_with_link(gridcast(&[
        "broadcast",
        "--key",
        key.to_str().unwrap(),
        "--input",
        file.to_str().unwrap(),
        "--rate",
        "2M",
        "--listen",
        "[::1]:0",
        "--linger",
        "3",
        "--io-backend",
        backend,
    ]));
    let mut children = Reaper(vec![source]);
    assert!(link.contains("@[::1]:"), "not an IPv6 link: {link}");
    let (relay, relay_link) = spawn_with_link(gridcast(&[
        "relay",
        "--join",
        &link,
        "--listen",
        "[::]:0",
        "--admin",
        "off",
        "--io-backend",
        backend,
    ]));
    children.0.push(relay);
    // The relay prints its link at 127.0.0.1 (its address is the wildcard); the same socket
    // answers on ::1.
    let over_v4 = with_host(&relay_link, "127.0.0.1");
    let over_v6 = with_host(&relay_link, "[::1]");

    // Bound to IPv4, given an IPv6 node: refused at once, saying what to do.
    let wrong = gridcast(&[
        "play",
        &over_v6,
        "--listen",
        "127.0.0.1:0",
        "--output",
        dir.path().join("never.bin").to_str().unwrap(),
        "--io-backend",
        backend,
    ])
    .stderr(Stdio::piped())
    .output()
    .unwrap();
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success(), "an unreachable link was accepted");
    assert!(
        said.contains("IPv6 only") && said.contains("[::]:0"),
        "the refusal does not say why: {said}"
    );

    let mut outs = Vec::new();
    for (name, link) in [("v6", &over_v6), ("v4", &over_v4)] {
        let out = dir.path().join(format!("player-{name}.bin"));
        children.0.push(
            gridcast(&[
                "play",
                link,
                "--output",
                out.to_str().unwrap(),
                "--io-backend",
                backend,
            ])
            .spawn()
            .unwrap(),
        );
        outs.push((name, out));
    }
    // Each player finishes by itself when the broadcast ends (10 s of input).
    let started = Instant::now();
    for i in 2..4 {
        let status = loop {
            if let Some(status) = children.0[i].try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(40),
                "player {} still runs 40 s in",
                outs[i - 2].0
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            status.success(),
            "player {} failed: {status}",
            outs[i - 2].0
        );
    }
    for (name, out) in &outs {
        let (start, played) = assert_exact_tail(out, &reference, 0.5);
        println!("{backend}: player {name} played {played} bytes from offset {start}");
    }
}

#[test]
fn ipv6_and_ipv4_players_draw_from_a_dual_stack_relay_of_an_ipv6_source() {
    run("auto");
}

#[test]
fn ipv6_and_ipv4_players_draw_from_a_dual_stack_relay_of_an_ipv6_source_portable() {
    run("portable");
}
