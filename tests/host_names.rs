//! Links name nodes by host name, and a name's first address may not answer. Three hosts of
//! the bed (network namespaces behind one switch, `common::bed`): a source, a relay and a
//! player.
//!
//! The relay's and the player's hosts have IPv6 addresses and their own hosts files:
//! - On the relay's host, `source.bed` is an IPv6 address no host has (a broken IPv6 path),
//!   then the source's IPv4 address.
//! - On the player's host, `relay.bed` is the same dead address, then the relay's IPv4 one.
//!
//! The resolver lists the IPv6 address first there; the test checks that first, so it cannot
//! pass on an order that skips the dead address. The relay joins `source.bed` and the player
//! plays from `relay.bed`. Each must reach its node at its second address, within the attempt
//! delay rather than a connect timeout:
//! - The relay's metrics must count the dial that fell back.
//! - The player must play the broadcast to its end, byte for byte.
//!
//! A name was dialled at its first address alone before. The relay logged "nothing of the
//! channel arrives" and never carried the channel, and the player exited after its 10-s
//! connect timeout: "no node of the link answered".
//!
//! No ffmpeg: the source reads a paced file of pseudo-random bytes. Needs root, iproute2 and
//! /dev/net/tun; skipped (with a message) without them unless `GRIDCAST_REQUIRE_NETNS=1` (CI).

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use common::bed::{Bed, PORT, Shape};
use common::http::sample;
use common::procs::*;

use std::time::Duration;

const SOURCE: usize = 0;
const RELAY: usize = 1;
const PLAYER: usize = 2;
/// 3 MB at 2 Mbit/s: a 12-s broadcast.
const INPUT_BYTES: usize = 3_000_000;
/// An address in the hosts' IPv6 prefix that no host has: nothing answers there.
const DEAD: &str = "2001:db8:79::99";

/// The first address `name` resolves to on host `h`, as the programs there see it.
fn first_address(bed: &Bed, h: usize, name: &str) -> String {
    let out = bed
        .command(h, "getent", &["ahosts", name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_host_name_whose_first_address_does_not_answer_is_reached_at_its_next() {
    if !Bed::can_run() {
        return;
    }
    let mut bed = Bed::new(3, Shape::CLEAN, Shape::CLEAN);
    for (h, name, at) in [(RELAY, "source.bed", SOURCE), (PLAYER, "relay.bed", RELAY)] {
        bed.add_ipv6(h);
        bed.hosts_file(
            h,
            &format!(
                "127.0.0.1 localhost\n{DEAD} {name}\n{} {name}\n",
                bed.addr(at)
            ),
        );
        assert_eq!(
            first_address(&bed, h, name),
            DEAD,
            "the resolver on host {h} must list {name}'s dead IPv6 address first, or this test \
             proves nothing"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (reference, source_link) =
        bed.paced_source(SOURCE, dir.path(), 0x2545_f491_4f6c_dd1d, INPUT_BYTES);
    let relay_link = bed.relay(RELAY, &with_host(&source_link, "source.bed"));
    let out = dir.path().join("player.bin");
    let player = bed.player(PLAYER, &with_host(&relay_link, "relay.bed"), &out);
    let mut fallbacks = 0.0;
    let status = bed.wait_for(player, Duration::from_secs(45), |bed| {
        if let Some(body) = bed.metrics(RELAY) {
            fallbacks = sample(&body, "gridcast_dial_fallbacks_total");
        }
    });
    assert!(
        status.success(),
        "play failed: {status} (relay.bed on port {PORT})"
    );
    assert!(
        fallbacks >= 1.0,
        "the relay counts no dial completed at the source's second address: {fallbacks}"
    );
    let (start, played) = assert_exact_tail(&out, &reference, 1.0 / 3.0);
    println!(
        "the relay reached source.bed at its IPv4 address ({fallbacks} fallback); the player \
         reached relay.bed likewise and played {played} bytes from offset {start}"
    );
}

/// A source reached by a host name whose address changes mid-stream: a broadcaster at home
/// behind a dynamic-DNS name whose line gets a new address. QUIC cannot follow a server to a
/// new address, so the relay loses the source. The relay then looks the name up again and
/// dials the source at its new address, and resumes where it stopped.
///
/// A name was looked up once, at start, before. The relay redialled the old address for
/// good, and its player got nothing more.
#[test]
fn a_source_whose_host_name_moves_to_a_new_address_is_found_there() {
    if !Bed::can_run() {
        return;
    }
    let mut bed = Bed::new(3, Shape::CLEAN, Shape::CLEAN);
    let hosts = |at: &str| format!("127.0.0.1 localhost\n{at} source.bed\n");
    bed.hosts_file(RELAY, &hosts(&bed.addr(SOURCE)));
    let dir = tempfile::tempdir().unwrap();
    let (reference, source_link) =
        bed.paced_source(SOURCE, dir.path(), 0x6a09_e667_f3bc_c908, 4_000_000);
    let relay_link = bed.relay(RELAY, &with_host(&source_link, "source.bed"));
    let out = dir.path().join("player.bin");
    let player = bed.player(PLAYER, &with_host(&relay_link, &bed.addr(RELAY)), &out);

    std::thread::sleep(std::time::Duration::from_secs(4));
    // The source's host moves to a new address, and the name follows it.
    let moved = "10.79.0.101";
    bed.renumber(SOURCE, moved);
    bed.hosts_file(RELAY, &hosts(moved));
    assert_eq!(first_address(&bed, RELAY, "source.bed"), moved);

    let status = bed.wait_for(player, Duration::from_secs(60), |_| {});
    assert!(status.success(), "play failed: {status}");
    let played = std::fs::read(&out).unwrap();
    let at = reference.len() - played.len();
    assert!(
        played.len() > reference.len() / 2 && reference[at..] == played[..],
        "the player's file is not the end of the broadcast: {} of {} bytes",
        played.len(),
        reference.len()
    );
    println!(
        "the source moved to {moved} 4 s in; the relay found it there and the player played \
         {} bytes, to the end",
        played.len()
    );
}
