//! LAN discovery by mDNS across two network namespaces each test creates: a source and a
//! relay announcing with `--mdns` on one host, players on the other given nothing but the
//! channel id, or a link and `--mdns`. The veth pair between them is all the "local
//! network" there is; every player's file must be a byte-exact tail of ffmpeg's output and
//! decode cleanly. The namespaces are removed at the end, also when a test fails.
//!
//! Needs root, `ip` (iproute2) and ffmpeg; skipped (with a message) without them unless
//! `GRIDCAST_REQUIRE_NETNS=1` (CI) makes that a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::process::{Child, Command};
use std::thread;
use std::time::Duration;

use common::bed::{can_use_netns, ip, remove_stale};
use common::procs::*;

/// Prefix of the namespaces these tests make: `gc-lan-<pid>-<slot>-a` and `…-b`.
const LAN_PREFIX: &str = "gc-lan-";

/// Two namespaces joined by a veth pair, removed on drop.
struct Lan {
    names: [String; 2],
    tag: u32,
}

impl Lan {
    /// `ns-a` at 10.77.<n>.1/24 and `ns-b` at 10.77.<n>.2/24, `n` from the process id and
    /// the test's `slot` (0 or 1) so that tests and runs side by side do not collide.
    fn new(slot: u32) -> Option<Self> {
        // Named after the whole process id, so that those of a run killed before it cleaned
        // up are known for stale and removed, and never collide with this run's.
        remove_stale(LAN_PREFIX);
        let pid = std::process::id();
        let tag = pid % 100 * 2 + slot;
        let names = [
            format!("{LAN_PREFIX}{pid}-{slot}-a"),
            format!("{LAN_PREFIX}{pid}-{slot}-b"),
        ];
        let lan = Self { names, tag };
        let [a, b] = &lan.names;
        let (va, vb) = (format!("gcva{tag}"), format!("gcvb{tag}"));
        let net = format!("10.77.{tag}");
        let ok = ip(&["netns", "add", a])
            && ip(&["netns", "add", b])
            && ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])
            && ip(&["link", "set", &va, "netns", a])
            && ip(&["link", "set", &vb, "netns", b])
            && ip(&["-n", a, "addr", "add", &format!("{net}.1/24"), "dev", &va])
            && ip(&["-n", b, "addr", "add", &format!("{net}.2/24"), "dev", &vb])
            && ip(&["-n", a, "link", "set", &va, "up", "multicast", "on"])
            && ip(&["-n", b, "link", "set", &vb, "up", "multicast", "on"])
            && ip(&["-n", a, "link", "set", "lo", "up"])
            && ip(&["-n", b, "link", "set", "lo", "up"]);
        ok.then_some(lan)
    }

    fn addr(&self, host: usize) -> String {
        format!("10.77.{}.{}", self.tag, host + 1)
    }

    /// `gridcast args…` inside namespace `host`.
    fn gridcast(&self, host: usize, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names[host]])
            .arg(env!("CARGO_BIN_EXE_gridcast"))
            .args(args)
            .args(["--log-level", "warn"]);
        c
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for name in &self.names {
            ip(&["netns", "del", name]);
        }
    }
}

/// On host 0: a source fed `secs` of live ffmpeg and a relay joined to it that announces
/// itself by mDNS. Returns the stream, the channel id and the relay.
fn source_and_announced_relay(
    lan: &Lan,
    dir: &std::path::Path,
    secs: u64,
) -> (Live, String, Child) {
    let key = keygen(dir);
    let channel = String::from_utf8(
        gridcast(&["channel-id", key.to_str().unwrap()])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();
    let host_a = lan.addr(0);
    let live = Live::start(
        lan.gridcast(
            0,
            &[
                "broadcast",
                "--key",
                key.to_str().unwrap(),
                "--listen",
                &format!("{host_a}:4433"),
                "--linger",
                "4",
            ],
        ),
        secs,
    );
    let source_link = live.link.clone();
    let (relay, _) = spawn_with_link(lan.gridcast(
        0,
        &[
            "relay",
            "--join",
            &source_link,
            "--listen",
            &format!("{host_a}:4434"),
            "--workers",
            "1",
            "--mdns",
        ],
    ));
    (live, channel, relay)
}

fn can_run() -> bool {
    can_use_netns(false)
}

#[test]
fn a_player_given_only_the_channel_id_finds_a_relay_on_the_local_network() {
    if !can_run() || !have_ffmpeg() {
        return;
    }
    let lan = Lan::new(0).expect("creating the network namespaces");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (live, channel, relay) = source_and_announced_relay(&lan, dir, 10);
    thread::sleep(Duration::from_secs(1));
    let out = dir.join("lan.ts");
    let mut player = lan
        .gridcast(1, &["play", &channel, "--output", out.to_str().unwrap()])
        .spawn()
        .unwrap();
    let reference = live.finish();
    thread::sleep(Duration::from_secs(3));
    signal(&player, "-TERM");
    let played = player.wait().unwrap();
    let mut rest: Vec<Child> = vec![relay];
    reap(&mut rest);
    assert!(played.success(), "play failed: {played}");
    assert_tail(&out, &reference, 0.5);
}

#[test]
fn a_relaying_peer_found_on_the_local_network_carries_a_player_when_the_relay_dies() {
    // Host 1 has two players. The first has the source's link and `--mdns`: it prefers the
    // relay it finds on the local network, keeps the source as a candidate, and announces
    // itself since it relays. The second has only the channel id and finds both the relay
    // and the first player. The relay is then killed: the first player goes on from the
    // source, the second from the first player (or what it learnt from it), neither with a
    // gap.
    if !can_run() || !have_ffmpeg() {
        return;
    }
    let lan = Lan::new(1).expect("creating the network namespaces");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (live, channel, mut relay) = source_and_announced_relay(&lan, dir, 14);
    thread::sleep(Duration::from_secs(1));
    let (out1, out2) = (dir.join("linked.ts"), dir.join("bare.ts"));
    let link = live.link.clone();
    let mut first = lan
        .gridcast(
            1,
            &["play", &link, "--mdns", "--output", out1.to_str().unwrap()],
        )
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_secs(2));
    let mut second = lan
        .gridcast(1, &["play", &channel, "--output", out2.to_str().unwrap()])
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_secs(4));
    relay.kill().unwrap();
    relay.wait().unwrap();
    let reference = live.finish();
    thread::sleep(Duration::from_secs(3));
    signal(&first, "-TERM");
    signal(&second, "-TERM");
    let (a, b) = (first.wait().unwrap(), second.wait().unwrap());
    assert!(a.success() && b.success(), "play failed: {a}, {b}");
    assert_tail(&out1, &reference, 0.6);
    assert_tail(&out2, &reference, 0.4);
}
