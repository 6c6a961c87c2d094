//! Simulator scenarios for a viewer whose own access link is the bottleneck: every parent's
//! packets cross the same queue, so a parent that falls behind there is no worse than the
//! others, and replacing it only resends chunks into that queue.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

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
