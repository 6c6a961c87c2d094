//! A relay announced at more than one address. Three hosts of the bed (network namespaces
//! behind one switch, `common::bed`): a source and a relay with IPv6 and IPv4 addresses, and
//! a player with IPv4 alone.
//!
//! The relay joins the source over IPv6 and announces itself at its IPv6 address, then its
//! IPv4 one (`--advertise` twice), as a dual-stack server would. The player is given the
//! source's IPv4 link; once the relay carries the channel the source sends viewers there,
//! naming the relay (its child, and a member) at the IPv6 address it connected from and at
//! both it announced. The player has no IPv6 route: it must dial the relay at
//! the address of the family it reached the source over, be served by the relay, and play
//! the broadcast to its end, byte for byte.
//!
//! A relay announced one address before, and `--advertise` took one. Announced at its IPv6
//! address alone, the relay was named to the player at an address it cannot reach; and a
//! relay named both as a child and as a member was named at the child's address alone.
//!
//! No ffmpeg: the source reads a paced file of pseudo-random bytes. Needs root, iproute2 and
//! /dev/net/tun; skipped (with a message) without them unless `GRIDCAST_REQUIRE_NETNS=1` (CI).

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use common::bed::{Bed, PORT, Shape};
use common::http::sample;
use common::procs::*;

use std::time::{Duration, Instant};

const SOURCE: usize = 0;
const RELAY: usize = 1;
const PLAYER: usize = 2;
/// 4 MB at 2 Mbit/s: a 16-s broadcast.
const INPUT_BYTES: usize = 4_000_000;
/// The relay's port (its default).
const RELAY_PORT: u16 = 4434;

#[test]
fn a_relay_announced_at_both_families_serves_a_player_that_has_ipv4_alone() {
    if !Bed::can_run() {
        return;
    }
    let mut bed = Bed::new(3, Shape::CLEAN, Shape::CLEAN);
    let source_v6 = bed.add_ipv6(SOURCE);
    let relay_v6 = bed.add_ipv6(RELAY);
    let dir = tempfile::tempdir().unwrap();
    let (reference, source_link) =
        bed.paced_source(SOURCE, dir.path(), 0x9e37_79b9_7f4a_7c15, INPUT_BYTES);
    let over_v6 = with_host(&source_link, &format!("[{source_v6}]"));
    let announced = [
        format!("[{relay_v6}]:{RELAY_PORT}"),
        format!("{}:{RELAY_PORT}", bed.addr(RELAY)),
    ];
    bed.relay_with(
        RELAY,
        &over_v6,
        &["--advertise", &announced[0], "--advertise", &announced[1]],
    );

    // The relay is a member and carries the channel: the source names it to viewers both as
    // its child, at the address it connected from (IPv6), and as a member, at the addresses
    // it announced.
    let started = Instant::now();
    loop {
        let (members, shards) = bed.metrics(RELAY).map_or((0.0, 0.0), |s| {
            (
                sample(&s, "gridcast_members"),
                sample(&s, "gridcast_received_shards_total"),
            )
        });
        if members >= 1.0 && shards >= 32.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the relay did not join the membership and carry the channel within 20 s \
             (members {members}, shards {shards})"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    let out = dir.path().join("player.bin");
    let player = bed.player(PLAYER, &source_link, &out);
    let mut served = false;
    let status = bed.wait_for(player, Duration::from_secs(45), |bed| {
        served = served
            || bed
                .metrics(RELAY)
                .is_some_and(|s| sample(&s, "gridcast_subscribers") >= 1.0);
    });
    assert!(
        status.success(),
        "play failed: {status} (source on port {PORT})"
    );
    assert!(
        served,
        "the relay, announced at {announced:?}, never served the player"
    );
    let (start, played) = assert_exact_tail(&out, &reference, 1.0 / 3.0);
    println!(
        "the player, sent to the relay announced at {announced:?}, played {played} bytes from \
         offset {start}"
    );
}
