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
/// and play every chunk. With `unreachable`, a seventh supernode the peer cannot reach is named
/// before the sixth: exploring must not try it over and over and never get to the sixth.
fn moves_to_the_nearest(seed: u64, unreachable: bool) {
    let mut grid = Grid::new(seed, 7, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    let sn = grid.supernodes.clone();
    let mut order = vec![sn[0], sn[1], sn[2], sn[3], sn[4]];
    if unreachable {
        order.push(sn[6]);
    }
    order.push(sn[5]);
    let candidates = order.iter().map(|&n| grid.candidate(n)).collect();
    let peer = grid.add_policy_peer(EngineConfig::default(), candidates);
    for (i, &n) in sn.iter().enumerate() {
        let latency = Duration::from_millis(if i < 3 { 60 } else { 5 });
        let link = LinkConfig {
            latency,
            ..LinkConfig::default()
        };
        grid.sim.set_link(peer, n, link);
        grid.sim.set_link(n, peer, link);
    }
    grid.sim.partition(peer, sn[6], true);
    let near: Vec<std::net::SocketAddr> = sn[3..6].iter().map(|&n| grid.sim.node(n).addr).collect();
    let channel = grid.source.channel;
    grid.run(Duration::from_secs(8));
    let early = grid.sim.node(peer).engine.upstream_parents(&channel);
    grid.run(Duration::from_secs(62));
    let late = grid.sim.node(peer).engine.upstream_parents(&channel);
    grid.assert_perfect("locality");
    let moves = grid.sim.node(peer).engine.stats().parent_moves;
    println!(
        "locality unreachable={unreachable}: parents_at_10s={early:?} parents_at_70s={late:?} \
         moves={moves}"
    );
    assert!(
        early.iter().any(|p| !near.contains(&p.addr)),
        "a far parent from the start was expected (the scenario no longer tests anything): {early:?}"
    );
    assert!(
        late.len() >= 3 && late.iter().all(|p| near.contains(&p.addr)),
        "parents after 70 s: {late:?} (near: {near:?})"
    );
    assert!(moves <= 3, "{moves} moves for one far parent");
}

#[test]
fn a_peer_moves_to_the_nearest_parents_it_can_find() {
    moves_to_the_nearest(23, false);
}

#[test]
fn an_unreachable_candidate_does_not_stop_the_search() {
    moves_to_the_nearest(31, true);
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
