//! A viewer whose address changes mid-stream plays on, with no gap and no new connection.
//! This is what a DHCP renewal, a NAT rebinding or a laptop's new lease does.
//!
//! Three hosts of the bed (network namespaces behind one switch, `common::bed`): a source, a
//! relay joining it, and a player drawing from the relay. Five seconds in, the player's host
//! gets a new IPv4 address and loses the old one. The player's socket, bound to the wildcard
//! address, then sends from the new address, and the relay must follow it there.
//!
//! QUIC connection migration: quinn-proto validates the new path and moves the connection
//! to it. The checks:
//! - The player must play the broadcast from its first byte to its end, byte for byte.
//! - Its connection must be the one it started with. The relay must count no handshake
//!   after the change, where a player that lost its connection would have dialled again.
//!
//! No ffmpeg: the source reads a paced file of pseudo-random bytes. Needs root, iproute2 and
//! /dev/net/tun; skipped (with a message) without them unless `GRIDCAST_REQUIRE_NETNS=1` (CI).

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use common::bed::{Bed, Shape};
use common::http::sample;
use common::procs::*;

use std::time::Duration;

const SOURCE: usize = 0;
const RELAY: usize = 1;
const PLAYER: usize = 2;
/// 4 MB at 2 Mbit/s: a 16-s broadcast.
const INPUT_BYTES: usize = 4_000_000;
/// The player's new address, in the bed's /24.
const NEW_ADDR: &str = "10.79.0.103";

/// The relay's completed handshakes, from its admin listener (127.0.0.1:9464 on its host).
fn relay_handshakes(bed: &Bed) -> f64 {
    let body = bed.metrics(RELAY).unwrap();
    sample(&body, "gridcast_quic_handshakes_total{result=\"ok\"}")
}

#[test]
fn a_player_whose_address_changes_plays_on_over_the_same_connection() {
    if !Bed::can_run() {
        return;
    }
    let mut bed = Bed::new(3, Shape::CLEAN, Shape::CLEAN);
    let dir = tempfile::tempdir().unwrap();
    let (reference, source_link) =
        bed.paced_source(SOURCE, dir.path(), 0x9e37_79b9_7f4a_7c15, INPUT_BYTES);
    let relay_link = bed.relay(RELAY, &source_link);
    let relay_link = with_host(&relay_link, &bed.addr(RELAY));
    let out = dir.path().join("player.bin");
    let player = bed.player(PLAYER, &relay_link, &out);

    std::thread::sleep(Duration::from_secs(5));
    let before = relay_handshakes(&bed);
    bed.renumber(PLAYER, NEW_ADDR);

    let status = bed.wait_for(player, Duration::from_secs(40), |_| {});
    assert!(status.success(), "play failed: {status}");
    let after = relay_handshakes(&bed);
    let (start, played) = assert_exact_tail(&out, &reference, 0.9);
    println!(
        "the player moved to {NEW_ADDR} 5 s in and played {played} bytes from offset {start}; \
         the relay's handshakes {before} before, {after} after"
    );
    assert_eq!(
        before, after,
        "the player dialled the relay again: its connection did not follow its new address"
    );
}
