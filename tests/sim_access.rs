//! Simulator scenarios for a viewer whose own access link is the bottleneck: every parent's
//! packets cross the same queue, so a parent that falls behind there is no worse than the
//! others, and replacing it only resends chunks into that queue.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::grid::{Broadcast, Grid};
use gridcast::node::EngineConfig;
use gridcast::sim::{LinkConfig, SimConfig};

#[test]
fn a_viewer_whose_own_link_is_the_bottleneck_does_not_keep_replacing_its_parents() {
    // A 4 Mbit/s stream in 250-ms chunks; four relays; six viewers each drawing from three of
    // them, behind 10 Mbit/s access links with a 50-ms drop-tail queue. The three parents'
    // chunk bursts meet in that queue and overflow it, one parent's packets are lost more
    // than the others', and it falls behind. It used to be replaced about once a second,
    // each time resending from the resume point into the same queue.
    let config = SimConfig {
        seed: 5,
        link: LinkConfig {
            latency: Duration::from_millis(40),
            loss: 0.0,
        },
        ..Default::default()
    };
    let mut grid = Grid::with_bitrate(
        config,
        Broadcast::config(),
        4_000_000,
        4,
        Grid::relay_config,
    );
    grid.run(Duration::from_secs(2));
    grid.add_policy_peers_with(6, 0, EngineConfig::default);
    for &p in &grid.peers {
        grid.sim.set_downlink(p, Some(1_250_000), Some(62_500));
    }
    grid.run(Duration::from_secs(20));
    // Every chunk, byte-exact; on time is not asked of a link the stream's start-up floods.
    grid.assert_complete("own-access-link");
    let failovers: Vec<usize> = grid.played.iter().map(|p| p.failovers.len()).collect();
    println!(
        "own-access-link: failovers={failovers:?} queue_drops={} least_real_time_lead_ms={:.0}",
        grid.sim.stats().queue_drops,
        grid.least_real_time_lead()
    );
    let most = failovers.iter().copied().max().unwrap_or(0);
    assert!(
        most <= 6,
        "a viewer replaced its parents {most} times in 20 s over its own link's queue \
         (each viewer: {failovers:?})"
    );
}

#[test]
fn viewers_whose_address_changes_keep_their_parents() {
    // Six viewers each draw from three of four relays. Eight seconds in, every viewer gets a
    // new address at once (a new lease, a NAT rebinding): whatever its parents send to the
    // old one is lost, and a viewer that only acknowledges sends nothing while nothing
    // arrives. Whichever parent's keep-alive fires first moves to the new path and delivers
    // what it owes at once; the others must follow (a probe), not be replaced as behind.
    let mut grid = Grid::new(11, 4, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    grid.add_policy_peers_with(6, 0, EngineConfig::default);
    // Parents at different distances, so their last packets before the change, and so their
    // keep-alives, are tens of milliseconds apart.
    for &p in &grid.peers.clone() {
        for (j, &sn) in grid.supernodes.clone().iter().enumerate() {
            let link = LinkConfig {
                latency: Duration::from_millis(5 + 45 * j as u64),
                loss: 0.0,
            };
            grid.sim.set_link(p, sn, link);
            grid.sim.set_link(sn, p, link);
        }
    }
    grid.run(Duration::from_secs(8));
    let handshakes: Vec<u64> = grid
        .peers
        .iter()
        .map(|&p| grid.sim.node(p).engine.stats().handshakes_ok)
        .collect();
    for (i, &p) in grid.peers.clone().iter().enumerate() {
        let to: SocketAddr = format!("10.200.0.{}:4433", i + 1).parse().unwrap();
        grid.sim.renumber(p, to);
    }
    grid.run(Duration::from_secs(10));
    grid.assert_complete("renumbered-viewers");
    let failovers: Vec<usize> = grid.played.iter().map(|p| p.failovers.len()).collect();
    let dialled: Vec<u64> = grid
        .peers
        .iter()
        .zip(&handshakes)
        .map(|(&p, before)| grid.sim.node(p).engine.stats().handshakes_ok - before)
        .collect();
    println!(
        "renumbered-viewers: failovers={failovers:?} handshakes_after={dialled:?} \
         least_real_time_lead_ms={:.0}",
        grid.least_real_time_lead()
    );
    assert!(
        failovers.iter().all(|&f| f == 0),
        "a viewer replaced a parent that had only lost its old address: {failovers:?}"
    );
    assert!(
        dialled.iter().all(|&d| d == 0),
        "a viewer dialled again instead of moving its connections: {dialled:?}"
    );
}
