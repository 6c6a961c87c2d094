//! Locality in the simulator: a peer keeps drawing from the nearest parents it can find, by
//! measured round trip, without a skip, and an equal-distance grid never moves.

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::grid::Grid;
use gridcast::node::EngineConfig;
use gridcast::sim::LinkConfig;

/// Six supernodes; the peer's candidates name the three far ones (60 ms each way) first and
/// the near ones (5 ms) after them. The policy dials five (three parents, two standbys): the
/// three far ones and two near. Sets go nearest first, so one far node is a parent; the sixth
/// candidate, near, is never dialled. Over a minute the peer must end with near parents alone
/// and play every chunk.
#[test]
fn a_peer_moves_to_the_nearest_parents_it_can_find() {
    let mut grid = Grid::new(23, 6, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    let candidates = grid
        .supernodes
        .iter()
        .map(|&sn| grid.candidate(sn))
        .collect();
    let peer = grid.add_policy_peer(EngineConfig::default(), candidates);
    for (i, &sn) in grid.supernodes.clone().iter().enumerate() {
        let latency = Duration::from_millis(if i < 3 { 60 } else { 5 });
        let link = LinkConfig {
            latency,
            ..LinkConfig::default()
        };
        grid.sim.set_link(peer, sn, link);
        grid.sim.set_link(sn, peer, link);
    }
    let near: Vec<std::net::SocketAddr> = grid.supernodes[3..]
        .iter()
        .map(|&sn| grid.sim.node(sn).addr)
        .collect();
    let channel = grid.source.channel;
    grid.run(Duration::from_secs(8));
    let early = grid.sim.node(peer).engine.upstream_parents(&channel);
    grid.run(Duration::from_secs(52));
    let late = grid.sim.node(peer).engine.upstream_parents(&channel);
    grid.assert_perfect("locality");
    let moves = grid.sim.node(peer).engine.stats().parent_moves;
    println!("locality: parents_at_10s={early:?} parents_at_60s={late:?} moves={moves}");
    assert!(
        early.iter().any(|p| !near.contains(&p.addr)),
        "a far parent from the start was expected (the scenario no longer tests anything): {early:?}"
    );
    assert!(
        late.len() >= 3 && late.iter().all(|p| near.contains(&p.addr)),
        "parents after a minute: {late:?} (near: {near:?})"
    );
    assert!(moves <= 3, "{moves} moves for one far parent");
}

/// Every path alike: nothing is nearer, nothing moves.
#[test]
fn an_equal_distance_grid_never_moves() {
    let mut grid = Grid::new(29, 6, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    grid.add_policy_peers(4, 0);
    grid.run(Duration::from_secs(60));
    grid.assert_perfect("locality-equal");
    for &p in &grid.peers {
        assert_eq!(grid.sim.node(p).engine.stats().parent_moves, 0, "peer {p}");
    }
}
