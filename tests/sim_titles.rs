//! Simulator scenarios for titles (a radio's song titles): they reach every listener through
//! two tiers of relays, a late joiner gets the one playing now, and a title a relay forged
//! never reaches a listener.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::time::Duration;

use common::grid::Grid;
use gridcast::keys::ChannelKey;
use gridcast::node::{Candidate, EngineConfig};
use gridcast::sim::NodeIx;
use gridcast::wire::StreamTitle;

/// The source's title `text`, from the chunk it is cutting now.
fn set_title(grid: &mut Grid, serial: u32, text: &str) -> u64 {
    let from = grid.source.chunker.next_seq();
    let title = StreamTitle::sign(grid.source.publisher.key(), serial, from, text);
    let now = grid.sim.now();
    assert!(
        grid.sim
            .node_mut(grid.source.node)
            .engine
            .set_title(now, title)
            .unwrap()
    );
    from
}

fn texts(grid: &Grid, peer: usize) -> Vec<(u64, String)> {
    grid.played[peer]
        .titles
        .iter()
        .map(|(_, t)| (t.from_seq, t.text.clone()))
        .collect()
}

#[test]
fn titles_reach_every_listener_through_two_tiers_and_a_late_joiner_gets_the_current_one() {
    let mut grid = Grid::new(31, 0, Grid::relay_config);
    let source = grid.candidate(grid.source.node);
    let first: Vec<NodeIx> = (0..2)
        .map(|_| grid.add_policy_relay(vec![source]))
        .collect();
    let first: Vec<Candidate> = first.iter().map(|&sn| grid.candidate(sn)).collect();
    let second: Vec<NodeIx> = (0..2)
        .map(|_| grid.add_policy_relay(first.clone()))
        .collect();
    let second: Vec<Candidate> = second.iter().map(|&sn| grid.candidate(sn)).collect();
    grid.run(Duration::from_secs(2));
    for _ in 0..3 {
        grid.add_policy_peer(EngineConfig::default(), second.clone());
    }
    grid.run(Duration::from_secs(3));
    let at = grid.sim.now();
    let one = set_title(&mut grid, 1, "Nina Simone – Sinnerman");
    grid.run(Duration::from_secs(2));
    for p in 0..3 {
        assert_eq!(
            texts(&grid, p),
            [(one, "Nina Simone – Sinnerman".to_owned())]
        );
        // Three hops of 10 ms, whatever a parent was doing: not the next chunk or keep-alive.
        let took = grid.played[p].titles[0].0 - at;
        assert!(took < Duration::from_millis(100), "peer {p}: {took:?}");
    }
    let two = set_title(&mut grid, 2, "Miles Davis – So What");
    grid.run(Duration::from_secs(2));
    for p in 0..3 {
        assert_eq!(
            texts(&grid, p),
            [
                (one, "Nina Simone – Sinnerman".to_owned()),
                (two, "Miles Davis – So What".to_owned())
            ]
        );
    }
    // A listener who comes now hears of the song playing, and of no other.
    let late = grid.add_policy_peer(EngineConfig::default(), second);
    grid.run(Duration::from_secs(3));
    let late = grid.peers.iter().position(|&p| p == late).unwrap();
    assert_eq!(
        texts(&grid, late),
        [(two, "Miles Davis – So What".to_owned())]
    );
    grid.assert_perfect("titles");
}

#[test]
fn a_title_a_relay_forged_never_reaches_a_listener() {
    let mut grid = Grid::new(32, 3, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    grid.add_policy_peers(4, 0);
    grid.run(Duration::from_secs(4));
    // Supernode 0 passes on a title the channel key did not sign.
    let hostile: NodeIx = grid.supernodes[0];
    let from = grid.source.chunker.next_seq();
    let forged = StreamTitle {
        channel: grid.source.channel,
        ..StreamTitle::sign(&ChannelKey::from_seed(&[9; 32]), 7, from, "Buy pills")
    };
    let now = grid.sim.now();
    grid.sim
        .node_mut(hostile)
        .engine
        .set_title(now, forged)
        .unwrap();
    grid.run(Duration::from_secs(3));
    let mut closed = 0;
    for (p, &peer) in grid.peers.clone().iter().enumerate() {
        assert!(
            texts(&grid, p).is_empty(),
            "peer {p} was told a forged title"
        );
        closed += grid.sim.node(peer).engine.stats().misbehaving_closed;
    }
    assert!(closed >= 1, "no child closed the relay that forged a title");
    // The real title still comes, and nobody missed a chunk.
    let real = set_title(&mut grid, 8, "The real one");
    grid.run(Duration::from_secs(3));
    for p in 0..grid.peers.len() {
        assert_eq!(texts(&grid, p), [(real, "The real one".to_owned())]);
    }
    grid.assert_perfect("forged title");
}
