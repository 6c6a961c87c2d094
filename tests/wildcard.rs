//! Nodes on a wildcard address are announced where other hosts reach them. Four hosts of the
//! bed (network namespaces behind one switch, `common::bed`): a source and two relays
//! started as the deploy files start them, on the default listening address (`[::]`, every
//! address of the host) with no `--advertise`, both relays joining the source; and a player
//! on the fourth host given only the source's link.
//!
//! The relays are not each other's neighbours: they find each other through the
//! supernodes' membership, at the address each announces, and gossip directly. Each must
//! count the other as a member and hold a connection to it, and no handshake may have
//! proved the wrong node. A node on a wildcard address used to announce the loopback address
//! its printed link shows: each relay dialled 127.0.0.1:4434 for the other, reached itself,
//! and counted a failed proof a second or so. The player must be served by a relay (the
//! source sends viewers there once one carries the channel) and play the broadcast to its
//! end, byte for byte.
//!
//! No ffmpeg: the source reads a paced file of pseudo-random bytes. Needs root, iproute2 and
//! /dev/net/tun; skipped (with a message) without them unless `GRIDCAST_REQUIRE_NETNS=1` (CI).

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use common::bed::{Bed, Shape};
use common::http::sample;
use common::procs::*;

use std::time::{Duration, Instant};

const SOURCE: usize = 0;
const RELAYS: [usize; 2] = [1, 2];
const PLAYER: usize = 3;
/// 4 MB at 2 Mbit/s: a 16-s broadcast.
const INPUT_BYTES: usize = 4_000_000;

#[test]
fn nodes_on_the_wildcard_address_are_announced_where_other_hosts_reach_them() {
    if !Bed::can_run() {
        return;
    }
    let mut bed = Bed::new(4, Shape::CLEAN, Shape::CLEAN);
    let dir = tempfile::tempdir().unwrap();
    let (reference, source_link) =
        bed.paced_source(SOURCE, dir.path(), 0x853c_49e6_748f_ea9b, INPUT_BYTES);
    for h in RELAYS {
        bed.relay(h, &source_link);
    }

    // The relays find each other through the membership and gossip directly.
    let started = Instant::now();
    let counts = |s: &str| {
        (
            sample(s, "gridcast_members"),
            sample(s, "gridcast_quic_connections{role=\"supernode\"}"),
            sample(s, "gridcast_quic_handshakes_total{result=\"proof_failed\"}"),
        )
    };
    loop {
        let seen: Vec<(f64, f64, f64)> = RELAYS
            .iter()
            .map(|&h| bed.metrics(h).map_or((0.0, 0.0, 0.0), |s| counts(&s)))
            .collect();
        if seen
            .iter()
            .all(|&(members, supernodes, _)| members >= 2.0 && supernodes >= 1.0)
        {
            for (h, (members, supernodes, wrong)) in RELAYS.iter().zip(&seen) {
                println!(
                    "relay on host {h}: members {members}, supernode connections {supernodes}, proofs failed {wrong}"
                );
                assert_eq!(
                    *wrong, 0.0,
                    "relay on host {h} dialled a node that proved another id: it was sent to \
                     an address that is not the member's"
                );
            }
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the relays did not gossip with each other within 20 s (members, supernode \
             connections, failed proofs: {seen:?})"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let out = dir.path().join("player.bin");
    let player = bed.player(PLAYER, &source_link, &out);
    let mut served = false;
    let status = bed.wait_for(player, Duration::from_secs(45), |bed| {
        served = served
            || RELAYS.iter().any(|&h| {
                bed.metrics(h)
                    .is_some_and(|s| sample(&s, "gridcast_subscribers") >= 1.0)
            });
    });
    assert!(status.success(), "play failed: {status}");
    assert!(served, "no relay served the player");
    let (start, played) = assert_exact_tail(&out, &reference, 1.0 / 3.0);
    println!("the player, sent to a relay, played {played} bytes from offset {start}");
}
