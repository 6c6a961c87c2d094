//! The simulator as a benchmark: how many seconds of stream a grid of real engines (real QUIC,
//! real crypto, real coding) processes per second of wall time on one core, against real time
//! (1×), the baseline any live deployment must beat. The grid: a 500 kbit/s source, 4
//! supernodes, and policy peers each drawing 12 of 16 substreams from 3 parents.
//!
//! Prints one line per audience size:
//! `grid peers=<n> stream_s=<s> wall_s=<w> speedup_vs_realtime=<x> shards_per_wall_s=<y>`.

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::grid::Grid;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (stream, sizes): (u64, &[usize]) = if quick {
        (10, &[10])
    } else {
        (30, &[10, 50, 200])
    };
    for &peers in sizes {
        let mut grid = Grid::new(1, 4, Grid::relay_config);
        grid.run(Duration::from_secs(2));
        grid.add_policy_peers(peers, 0);
        let wall = Instant::now();
        grid.run(Duration::from_secs(stream));
        let wall_s = wall.elapsed().as_secs_f64();
        let shards: u64 = grid
            .supernodes
            .iter()
            .map(|&sn| grid.sim.node(sn).engine.stats().shards_out)
            .sum();
        grid.assert_perfect(&format!("bench-{peers}"));
        println!(
            "grid peers={peers} stream_s={stream} wall_s={wall_s:.2} speedup_vs_realtime={:.1} shards_per_wall_s={:.0}",
            stream as f64 / wall_s,
            shards as f64 / wall_s
        );
    }
}
