//! Hostile traffic at a real relay process while real players watch through it: ffmpeg feeds a
//! `broadcast`, one `relay` (two workers) carries it, and two `play`s draw it from that relay
//! alone. Mid-stream, bounded floods hit the relay's port from many loopback source addresses:
//! junk datagrams of the shapes a QUIC endpoint must sort out statelessly, and real QUIC
//! Initial packets of connections that never go on. The players must keep a byte-exact,
//! cleanly decoding copy to the end of the stream; the relay must stay up, count what it
//! dropped, turn the Initial flood into QUIC Retries once more handshakes are under way than
//! `--validate-above` allows, and never send any source address more than three times the
//! bytes it received from it (QUIC's limit before an address is validated).
//!
//! Skipped (with a message) where ffmpeg is missing, unless `GRIDCAST_REQUIRE_FFMPEG=1` (CI).

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use common::flood::{initial_flood, initial_probe, junk_flood};
use common::http::{free_tcp_port, get, poll, sample};
use common::procs::*;

use std::net::SocketAddr;
use std::time::Duration;

use gridcast::keys::NodeId;

const STREAM_SECS: u64 = 24;

#[test]
fn floods_of_junk_and_initials_cost_the_viewers_nothing() {
    if !have_ffmpeg() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let live = Live::on_loopback(&key, STREAM_SECS);
    let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let (relay, relay_link) = spawn_with_link(gridcast(&[
        "relay",
        "--join",
        &live.link,
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--admin",
        &admin.to_string(),
        // Per worker: 16 handshakes under way, then Retry. The flood below keeps far more
        // than that under way (each lasts until the idle timeout).
        "--validate-above",
        "32",
    ]));
    let node = nodes_of(&relay_link);
    let (addr, id) = node.split_once('/').unwrap();
    let target: SocketAddr = addr.parse().unwrap();
    let id: NodeId = id.parse().unwrap();
    let outputs: Vec<_> = (0..2)
        .map(|i| dir.path().join(format!("p{i}.ts")))
        .collect();
    let players: Vec<_> = outputs
        .iter()
        .map(|out| {
            gridcast(&["play", &relay_link, "--output", out.to_str().unwrap()])
                .spawn()
                .unwrap()
        })
        .collect();
    let mut children = Reaper(vec![relay]);
    children.0.extend(players);
    std::thread::sleep(Duration::from_secs(4));

    // Junk throughout; meanwhile a few lone Initials whose handshakes the relay keeps
    // retransmitting (below the threshold, so accepted), then the Initial flood. Each is
    // bounded in count and time.
    let junk = std::thread::spawn(move || junk_flood(target, 80_000, Duration::from_secs(14), 32));
    let probe = initial_probe(target, id, 8, Duration::from_secs(5));
    let initials = initial_flood(target, id, 3_000, Duration::from_secs(7), 32);
    let junk = junk.join().unwrap();
    println!("flood junk: {junk:?}");
    println!("flood probe: {probe:?}");
    println!("flood initials: {initials:?}");

    let (_, scrape) = get(admin, "/metrics").expect("the flooded relay's admin answers");
    let retries = sample(&scrape, "gridcast_quic_retries_total");
    let dropped = sample(
        &scrape,
        "gridcast_udp_datagrams_unrouted_total{outcome=\"dropped\"}",
    );
    let answered = sample(
        &scrape,
        "gridcast_udp_datagrams_unrouted_total{outcome=\"answered\"}",
    );
    let failed = sample(&scrape, "gridcast_quic_handshakes_total{result=\"failed\"}");
    println!(
        "flood relay: retries={retries} unrouted_dropped={dropped} unrouted_answered={answered} \
         handshakes_failed={failed} worst_amplification_junk={:.3} \
         worst_amplification_lone_initial={:.3} worst_amplification_initials={:.3}",
        junk.worst_amplification, probe.worst_amplification, initials.worst_amplification
    );
    assert!(
        junk.sent > 70_000 && initials.sent > 2_500 && probe.sent == 8,
        "the floods did not run"
    );
    // The lone handshakes were answered (and retransmitted into silence) up to the limit.
    assert!(
        probe.worst_amplification > 1.0,
        "the relay never answered a lone Initial: {probe:?}"
    );
    // Nearly every Initial beyond the threshold is answered with a Retry, not a handshake.
    assert!(
        retries >= (initials.sent - 200) as f64 * 0.9,
        "{retries} Retries for {} Initials",
        initials.sent
    );
    // Most junk reaches the relay and is dropped there without state (loopback may drop
    // some at the socket under the flood; those it never saw).
    assert!(
        dropped + answered >= junk.sent as f64 * 0.5,
        "the relay accounts for {dropped} + {answered} of {} junk datagrams",
        junk.sent
    );
    assert!(answered > 0.0, "no version negotiation or reset answered");
    for (what, f) in [
        ("junk", &junk),
        ("lone Initial", &probe),
        ("initials", &initials),
    ] {
        assert!(
            f.worst_amplification <= 3.0,
            "a {what} source got {:.2}x the bytes it sent",
            f.worst_amplification
        );
    }

    let (reference, _) = live.finish_at();
    std::thread::sleep(Duration::from_secs(3));
    for p in &children.0[1..] {
        signal(p, "-TERM");
    }
    for p in &mut children.0[1..] {
        assert!(p.wait().unwrap().success(), "play failed");
    }
    // The relay outlived the floods and still serves its admin.
    assert!(
        children.0[0].try_wait().unwrap().is_none(),
        "the relay died under the flood"
    );
    let live_now = poll(admin, "/livez", Duration::from_secs(5), |s, _| s == 200);
    assert!(
        live_now.is_some_and(|(s, _)| s == 200),
        "the flooded relay is not live"
    );
    for out in &outputs {
        assert_tail(out, &reference, 0.6);
    }
}
