//! Simulator scenarios for the chunk durations a broadcaster may choose (`broadcast
//! --chunk-ms`, 100 to 2000 ms): at each end, at the default and at the 1 s suggested for radio,
//! a 128 kbit/s stream reaches peers through relays, one relay is killed under them, and every
//! peer plays every chunk, byte-exact, early enough for a player that plays in real time from
//! its first chunk on never to wait, with no outage announced between chunks.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::time::Duration;

use common::grid::{Broadcast, Grid};
use gridcast::sim::{LinkConfig, SimConfig};

fn chunks_of(ms: u64, seed: u64) {
    let scenario = format!("chunks-of-{ms}ms");
    let chunk = Duration::from_millis(ms);
    let config = SimConfig {
        seed,
        link: LinkConfig {
            latency: Duration::from_millis(30),
            loss: 0.0,
        },
        ..Default::default()
    };
    let mut grid = Grid::with_bitrate(config, Broadcast::config(), 128_000, 3, Grid::relay_config);
    grid.source.set_chunk_duration(chunk);
    // The relays hold a few chunks before the peers come.
    grid.run(chunk * 2 + Duration::from_secs(1));
    grid.add_policy_peers(6, 0);
    grid.run(Duration::from_secs(12));
    let victim = grid.supernodes[0];
    grid.sim.kill(victim);
    grid.run(Duration::from_secs(12));
    grid.assert_perfect(&scenario);
    assert!(grid.peer_verify_failures().iter().all(|&f| f == 0));
    let sizes: Vec<usize> = grid.source.published.values().map(|c| c.len()).collect();
    let mean = sizes.iter().sum::<usize>() / sizes.len();
    // 128 kbit/s is 16 bytes a millisecond: the chunks are as long as asked.
    assert!(
        mean.abs_diff(16 * ms as usize) <= 16 * ms as usize / 5,
        "{scenario}: chunks of {mean} bytes on average"
    );
    // On time for a real-time player: `assert_perfect` checks it; here each peer's figures.
    for (i, played) in grid.played.iter().enumerate() {
        let (lead_ms, delay) = played.real_time_lead(&grid.source.started);
        println!(
            "{scenario}: peer {i} least_real_time_lead_ms={lead_ms:.0} first_chunk_after={delay:?} \
             failovers={} outages={}",
            played.failovers.len(),
            played.outages.len()
        );
        assert!(
            played.outages.is_empty(),
            "{scenario}: peer {i} announced the stream lost between chunks"
        );
    }
}

#[test]
fn chunks_of_100_ms_ride_out_a_relay_kill_in_real_time() {
    chunks_of(100, 51);
}

#[test]
fn chunks_of_250_ms_ride_out_a_relay_kill_in_real_time() {
    chunks_of(250, 52);
}

#[test]
fn chunks_of_a_second_ride_out_a_relay_kill_in_real_time() {
    chunks_of(1000, 53);
}

#[test]
fn chunks_of_2_s_ride_out_a_relay_kill_in_real_time() {
    chunks_of(2000, 54);
}
