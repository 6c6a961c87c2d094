//! A player keeps to near parents, on real hosts: eight network namespaces behind the bed's
//! switch (`common::bed`). A source, three relays 40 ms away (their attachments delayed 40 ms
//! each way, so 42 ms from the player), three relays 2 ms away (4 ms from the player), and a
//! player whose link names the three far relays first and the near ones after them.
//!
//! The player dials five of the six (three parents, two standbys) and gives substreams to the
//! nearest whose handshakes finished, which leaves a far relay among its first parents when
//! the far handshakes finish before it has chosen, and leaves the sixth relay, near, undialled.
//! Within the broadcast it must try the sixth as an extra standby and move every far parent's
//! substreams to near relays: its `/debug/channels` must show near parents only, its
//! `gridcast_parent_moves_total` must count the moves, and its file must be the broadcast,
//! byte for byte, with no skip.
//!
//! No ffmpeg: the source reads a paced file of pseudo-random bytes. Needs root, iproute2 and
//! /dev/net/tun; skipped (with a message) without them unless `GRIDCAST_REQUIRE_NETNS=1` (CI).

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use common::bed::{Bed, PORT, Shape};
use common::http::sample;
use common::procs::*;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

const SOURCE: usize = 0;
const FAR: [usize; 3] = [1, 2, 3];
const NEAR: [usize; 3] = [4, 5, 6];
const PLAYER: usize = 7;
/// 10 MB at 2 Mbit/s: a 40-s broadcast.
const INPUT_BYTES: usize = 10_000_000;

/// The addresses of the parents the player draws from, from its `/debug/channels`.
fn parents(bed: &Bed) -> Option<Vec<String>> {
    let admin: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let (code, body) = bed.get(PLAYER, admin, "/debug/channels")?;
    if code != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    let mut addrs = Vec::new();
    for worker in json["workers"].as_array()? {
        for channel in worker["channels"].as_array()? {
            for parent in channel["drawn_from"].as_array()? {
                addrs.push(parent["addr"].as_str()?.to_owned());
            }
        }
    }
    Some(addrs)
}

#[test]
fn a_player_moves_from_far_relays_to_near_ones_without_a_skip() {
    if !Bed::can_run() {
        return;
    }
    let near_shape = Shape {
        delay_ms: 2,
        ..Shape::CLEAN
    };
    let far_shape = Shape {
        delay_ms: 40,
        ..Shape::CLEAN
    };
    let mut bed = Bed::new(8, near_shape, near_shape);
    for h in FAR {
        bed.reshape(h, far_shape, far_shape);
    }
    let dir = tempfile::tempdir().unwrap();
    let (reference, source_link) =
        bed.paced_source(SOURCE, dir.path(), 0x9e37_79b9_7f4a_7c15, INPUT_BYTES);
    let channel = source_link.split_once('@').unwrap().0.to_owned();
    let mut nodes = Vec::new();
    for h in FAR.into_iter().chain(NEAR) {
        let listen = format!("{}:{PORT}", bed.addr(h));
        let link = bed.relay_with(h, &source_link, &["--listen", &listen]);
        nodes.push(nodes_of(&link).to_owned());
    }
    let near: Vec<String> = NEAR
        .iter()
        .map(|&h| format!("{}:{PORT}", bed.addr(h)))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let out = dir.path().join("player.bin");
    let play_link = format!("{channel}@{}", nodes.join(","));
    let player = bed.player_with(PLAYER, &play_link, &out, &["--admin", "127.0.0.1:9464"]);
    let started = Instant::now();
    let (mut first, mut last, mut moves) = (None, None, 0.0);
    let status = bed.wait_for(player, Duration::from_secs(90), |bed| {
        let Some(now) = parents(bed).filter(|p| !p.is_empty()) else {
            return;
        };
        if first.is_none() && started.elapsed() >= Duration::from_secs(3) {
            first = Some(now.clone());
        }
        last = Some(now);
        if let Some(body) = bed.metrics(PLAYER) {
            moves = sample(&body, "gridcast_parent_moves_total");
        }
    });
    assert!(status.success(), "the player failed: {status}");
    let (start, played) = assert_exact_tail(&out, &reference, 0.75);
    let (first, last) = (first.unwrap(), last.unwrap());
    println!(
        "parents after 3 s: {first:?}; at the end: {last:?}; moves {moves}; played {played} \
         bytes from offset {start}"
    );
    assert!(
        last.len() >= 3 && last.iter().all(|p| near.contains(p)),
        "the player still draws from far relays at the end: {last:?} (near: {near:?})"
    );
    let far_at_first = first.iter().filter(|p| !near.contains(p)).count();
    assert!(
        moves >= far_at_first as f64,
        "{far_at_first} far parent(s) after 3 s but {moves} move(s) counted"
    );
}
