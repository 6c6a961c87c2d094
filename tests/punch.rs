//! Peers behind a NAT or stateful firewall relay to each other: hole punching through their
//! common parent. Three hosts of the bed (network namespaces behind one switch,
//! `common::bed`): a source that serves one child (`--max-children 1`), a player behind a
//! firewall that admits UDP only from an address and port it has sent to (a home router's
//! NAT or IPv6 firewall, as the switch models it), and a newcomer.
//!
//! The first player is the source's one child, and relays (a player does by default). The
//! newcomer, given the source's link, is turned away and told of the first player, and
//! dials it. That dial's packets meet the firewall. The source tells the first player where
//! the newcomer dials from, the first player sends it a datagram, and the firewall lets the
//! newcomer in: it must be served by the first player and play the broadcast to its end, byte
//! for byte; the first player must count a punch sent and a subscriber.
//!
//! Without the punch, the newcomer's packets were all dropped: it was never served and
//! exited after its connect timeout ("nobody serves channel …").
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
const BEHIND: usize = 1;
const NEWCOMER: usize = 2;
/// 4 MB at 2 Mbit/s: a 16-s broadcast.
const INPUT_BYTES: usize = 4_000_000;

#[test]
fn a_newcomer_reaches_a_relaying_player_behind_a_firewall_through_their_parent() {
    if !Bed::can_run() {
        return;
    }
    // 10 ms each way on every attachment.
    let shape = Shape {
        delay_ms: 5,
        ..Shape::CLEAN
    };
    let mut bed = Bed::new(3, shape, shape);
    bed.firewall(BEHIND);
    let dir = tempfile::tempdir().unwrap();
    let (reference, source_link) = bed.paced_source_with(
        SOURCE,
        dir.path(),
        0x3c6e_f372_fe94_f82b,
        INPUT_BYTES,
        &["--max-children", "1"],
    );
    let first = dir.path().join("first.bin");
    let behind = bed.player_with(BEHIND, &source_link, &first, &["--admin", "127.0.0.1:9464"]);
    // The first player plays: it is the source's one child.
    let started = Instant::now();
    while std::fs::metadata(&first).map_or(0, |m| m.len()) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the first player got nothing within 15 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = dir.path().join("newcomer.bin");
    let newcomer = bed.player(NEWCOMER, &source_link, &out);
    let (mut punches, mut subscribers) = (0.0, 0.0);
    let status = bed.wait_for(newcomer, Duration::from_secs(45), |bed| {
        if let Some(body) = bed.metrics(BEHIND) {
            punches = sample(&body, "gridcast_punches_total{kind=\"sent\"}");
            subscribers = f64::max(subscribers, sample(&body, "gridcast_subscribers"));
        }
    });
    let filtered = bed.counts()[BEHIND].filtered;
    assert!(
        status.success(),
        "the newcomer failed: {status} (punches sent {punches}, datagrams filtered {filtered})"
    );
    assert!(
        punches >= 1.0 && subscribers >= 1.0,
        "the player behind the firewall sent {punches} punches and served {subscribers} \
         subscribers"
    );
    let (start, played) = assert_exact_tail(&out, &reference, 1.0 / 3.0);
    let status = bed.wait_for(behind, Duration::from_secs(30), |_| {});
    assert!(status.success(), "the first player failed: {status}");
    assert_exact_tail(&first, &reference, 1.0 / 2.0);
    println!(
        "the newcomer, let through the firewall by {punches} punch(es) ({filtered} datagrams \
         filtered), played {played} bytes from offset {start}"
    );
}
