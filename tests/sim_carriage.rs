//! How shards ride QUIC streams, in the deterministic simulator: a subscriber's shards are
//! framed and handed to QUIC in batches, one write per subscription, and a batch that flow
//! control lets through only in part must still reach the player whole and in order.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::time::Duration;

use common::grid::{Broadcast, Grid, Played};
use gridcast::node::{ChannelMode, EngineConfig};
use gridcast::sim::SimConfig;
use gridcast::wire::{StartAt, SubstreamSet};

/// Peers whose per-stream receive window is smaller than any one parent's share of a chunk,
/// so that every batch a supernode frames for them is cut by flow control: frames begun and
/// finished in a later write, the rest put back whole. Each peer draws exactly the 8 shards a
/// chunk needs, all from one supernode, so that one shard lost on the way (which the erasure
/// code would otherwise hide) is a chunk skipped, and a chunk header that does not come on
/// that one stream (which another parent's stream would otherwise supply) is a chunk
/// refused.
fn every_batch_cut_by_flow_control(
    scenario: &str,
    bitrate_bps: usize,
    stream_window: u32,
    burst: Option<Duration>,
) {
    let mut grid = Grid::with_bitrate(
        SimConfig {
            seed: 31,
            ..Default::default()
        },
        Broadcast::config(),
        bitrate_bps,
        1,
        Grid::relay_config,
    );
    grid.source.burst = burst;
    grid.run(Duration::from_secs(2));
    // The parent's share of a chunk: 8 of the 16 shards of bitrate × 250 ms coded 8 of 16.
    let share = bitrate_bps / 8 / 4;
    assert!(
        share > 2 * stream_window as usize,
        "the window ({stream_window}) must cut every share ({share})"
    );
    let channel = grid.source.channel;
    for _ in 0..4 {
        let p = grid
            .sim
            .add_node(EngineConfig {
                stream_window,
                ..Default::default()
            })
            .unwrap();
        let now = grid.sim.now();
        grid.sim
            .node_mut(p)
            .engine
            .add_channel(channel, ChannelMode::Play);
        let sn = grid.supernodes[0];
        let (addr, id) = (grid.sim.node(sn).addr, grid.sim.node(sn).id);
        grid.sim
            .node_mut(p)
            .engine
            .subscribe(
                now,
                addr,
                id,
                channel,
                SubstreamSet::first(8),
                StartAt::Live,
            )
            .unwrap();
        grid.peers.push(p);
        grid.played.push(Played::default());
    }
    grid.run(Duration::from_secs(20));
    grid.assert_perfect(scenario);
    assert!(grid.peer_verify_failures().iter().all(|&f| f == 0));
    for &p in &grid.peers {
        let played = grid.peer_stats(p).chunks_played;
        // 20 s of stream: 80 chunks of 250 ms, or 20 of a second when the input comes in bursts.
        let expected = if burst.is_some() { 19 } else { 79 };
        assert!(played >= expected, "{scenario}: {played} chunks played");
    }
    let relay = grid.sim.node(grid.supernodes[0]).engine.stats();
    assert_eq!(relay.backlog_drops, 0, "{scenario}");
}

#[test]
fn small_shards_survive_windows_smaller_than_a_chunk() {
    // 500 kbit/s: 2 KB shards, several frames in a window.
    every_batch_cut_by_flow_control("small-shards", 500_000, 3 * 1024, None);
}

#[test]
fn a_burst_of_input_cut_by_flow_control_still_brings_every_chunk_header() {
    // An encoder that flushes once a second (as ffmpeg's Ogg muxer does) makes one chunk a
    // second, and its shards are queued while the last chunk's still wait on flow control: a
    // frame carrying a chunk's header is then sometimes put back unsent, and must carry it
    // again when it goes.
    every_batch_cut_by_flow_control("bursts", 500_000, 3 * 1024, Some(Duration::from_secs(1)));
}

#[test]
fn large_shards_survive_windows_smaller_than_a_chunk() {
    // 5 Mbit/s: 20 KB shards, each cut by the window.
    every_batch_cut_by_flow_control("large-shards", 5_000_000, 24 * 1024, None);
}
