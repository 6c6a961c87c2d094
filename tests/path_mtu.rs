//! A path whose MTU shrinks mid-stream, with no ICMP to say so: a route change through a
//! tunnel, or a link renegotiated to smaller frames, behind a firewall that drops the "packet
//! too big" messages. Three hosts of the bed (network namespaces behind one switch,
//! `common::bed`): a source, a relay and a player.
//!
//! QUIC has raised each connection's packets to the 1452-byte UDP payload the hosts'
//! interfaces allow (path MTU discovery) by the time, 4 s in, the player's downlink starts
//! dropping every frame over 1400 bytes. Everything the relay sends the player in full-sized
//! packets is lost from then on. quinn-proto must notice the black hole, go back to its
//! 1200-byte base size and send again what was lost; the player must play the broadcast to
//! its end, byte for byte. The switch must have dropped large frames, or the test proves
//! nothing.
//!
//! No ffmpeg: the source reads a paced file of pseudo-random bytes. Needs root, iproute2 and
//! /dev/net/tun; skipped (with a message) without them unless `GRIDCAST_REQUIRE_NETNS=1` (CI).

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use common::bed::{Bed, Shape};
use common::procs::*;

use std::time::Duration;

const SOURCE: usize = 0;
const RELAY: usize = 1;
const PLAYER: usize = 2;
/// 4 MB at 2 Mbit/s: a 16-s broadcast.
const INPUT_BYTES: usize = 4_000_000;
/// A path of 1400-byte frames: IPv4 packets of at most 1386 bytes, UDP payloads of 1358.
const SMALLER: usize = 1400;

#[test]
fn a_path_whose_mtu_shrinks_without_a_word_keeps_its_player_playing() {
    if !Bed::can_run() {
        return;
    }
    // 10 ms each way on every attachment: a real path's round trip for QUIC's loss timers.
    let shape = Shape {
        delay_ms: 5,
        ..Shape::CLEAN
    };
    let mut bed = Bed::new(3, shape, shape);
    let dir = tempfile::tempdir().unwrap();
    let (reference, source_link) =
        bed.paced_source(SOURCE, dir.path(), 0xbb67_ae85_84ca_a73b, INPUT_BYTES);
    let relay_link = bed.relay(RELAY, &source_link);
    let out = dir.path().join("player.bin");
    let player = bed.player(PLAYER, &with_host(&relay_link, &bed.addr(RELAY)), &out);

    std::thread::sleep(Duration::from_secs(4));
    let before = bed.counts()[PLAYER];
    bed.reshape(
        PLAYER,
        shape,
        Shape {
            max_frame: Some(SMALLER),
            ..shape
        },
    );
    let status = bed.wait_for(player, Duration::from_secs(60), |_| {});
    let after = bed.counts()[PLAYER];
    assert!(status.success(), "play failed: {status}");
    assert_eq!(before.too_big, 0);
    assert!(
        after.too_big > 0,
        "no frame to the player was over {SMALLER} bytes: the path never shrank under it"
    );
    let (start, played) = assert_exact_tail(&out, &reference, 1.0 / 3.0);
    println!(
        "the player's path dropped {} frames over {SMALLER} bytes; it played {played} bytes \
         from offset {start}, to the end",
        after.too_big
    );
}
