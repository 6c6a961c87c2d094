//! Grid scenarios in the deterministic simulator: real engines, real QUIC, virtual time.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::time::Duration;

use common::grid::Grid;
use gridcast::node::{Candidate, ChannelMode, EngineConfig, NodeEvent, UpstreamConfig};
use gridcast::sim::NodeIx;
use gridcast::stream::ChunkFlags;
use gridcast::wire::{StartAt, SubstreamSet};

#[test]
fn a_killed_supernode_costs_no_peer_a_single_chunk() {
    let mut grid = Grid::new(1, 3, Grid::relay_config);
    // Let the supernodes fill up, then the peers join.
    grid.run(Duration::from_secs(2));
    grid.add_peers(6);
    grid.run(Duration::from_secs(10));
    // Kill one parent of every peer, without a goodbye.
    let victim = grid.supernodes[0];
    grid.sim.kill(victim);
    grid.run(Duration::from_secs(10));
    grid.assert_perfect("kill-one-parent");
    assert!(grid.peer_verify_failures().iter().all(|&f| f == 0));
}

#[test]
fn five_percent_loss_on_every_link_keeps_continuity() {
    for seed in [5, 21, 42] {
        five_percent_loss_with_seed(seed);
    }
}

fn five_percent_loss_with_seed(seed: u64) {
    let mut grid = Grid::new(seed, 4, Grid::relay_config);
    grid.sim.set_loss_everywhere(0.05);
    grid.run(Duration::from_secs(2));
    grid.add_policy_peers(6, 0);
    grid.run(Duration::from_secs(20));
    assert!(
        grid.sim.stats().lost > 100,
        "loss was applied: {:?}",
        grid.sim.stats()
    );
    grid.assert_perfect(&format!("loss-5% seed={seed}"));
    assert!(grid.peer_verify_failures().iter().all(|&f| f == 0));
}

#[test]
fn dialling_the_wrong_node_id_fails_the_handshake() {
    let mut grid = Grid::new(2, 1, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    let p = grid.sim.add_node(EngineConfig::default()).unwrap();
    let now = grid.sim.now();
    let sn = grid.supernodes[0];
    let addr = grid.sim.node(sn).addr;
    // The source's id at the supernode's address: an impostor from the dialler's view.
    let wrong = grid.sim.node(grid.source.node).id;
    let channel = grid.source.channel;
    grid.sim
        .node_mut(p)
        .engine
        .add_channel(channel, ChannelMode::Play);
    grid.sim
        .node_mut(p)
        .engine
        .subscribe(
            now,
            addr,
            wrong,
            channel,
            SubstreamSet::first(16),
            StartAt::Live,
        )
        .unwrap();
    grid.run(Duration::from_secs(3));
    let events = grid.sim.take_events(p);
    assert!(
        events
            .iter()
            .all(|(_, e)| !matches!(e, NodeEvent::Chunk { .. } | NodeEvent::Connected { .. })),
        "an impostor must not get through"
    );
    assert!(
        events
            .iter()
            .any(|(_, e)| matches!(e, NodeEvent::ProofFailed { node, .. } if *node == wrong)),
        "the handshake must fail visibly, as a failed proof: {events:?}"
    );
    assert_eq!(
        grid.sim
            .node(p)
            .engine
            .channel(&channel)
            .unwrap()
            .stats()
            .shards_in,
        0
    );
}

#[test]
fn a_corrupting_supernode_is_dropped_and_no_bad_byte_is_played() {
    // Supernode 1 flips a byte in every shard it sends.
    let mut grid = Grid::new(6, 4, |i| EngineConfig {
        corrupt_outgoing_shards: i == 1,
        ..Grid::relay_config(i)
    });
    grid.run(Duration::from_secs(2));
    // Every peer has the corrupting supernode among its first parents.
    grid.add_policy_peers(6, 0);
    grid.run(Duration::from_secs(10));
    let bad = grid.supernodes[1];
    let bad_id = grid.sim.node(bad).id;
    for &p in &grid.peers {
        let engine = &grid.sim.node(p).engine;
        assert!(
            engine.stats().misbehaving_closed >= 1,
            "peer {p} kept the corrupting parent"
        );
        // The bad parent is refused from now on.
        let now = grid.sim.now();
        let addr = grid.sim.node(bad).addr;
        let channel = grid.source.channel;
        let err = grid
            .sim
            .node_mut(p)
            .engine
            .subscribe(
                now,
                addr,
                bad_id,
                channel,
                SubstreamSet::first(4),
                StartAt::Live,
            )
            .unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
    }
    // Every byte played is the source's (assert_perfect compares each chunk).
    grid.assert_perfect("corrupting-supernode");
    assert!(grid.peer_verify_failures().iter().all(|&f| f >= 1));
}

#[test]
fn peers_replace_a_killed_parent_within_two_seconds() {
    let mut grid = Grid::new(7, 4, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    // Every peer lists supernode 0 first, so it is a parent of every peer.
    grid.add_policy_peers(12, 0);
    grid.run(Duration::from_secs(8));
    let channel = grid.source.channel;
    for &p in &grid.peers {
        assert_eq!(
            grid.sim.node(p).engine.upstream_status(&channel),
            Some((12, 3)),
            "peer {p}"
        );
    }
    let killed_at = grid.sim.now();
    grid.sim.kill(grid.supernodes[0]);
    grid.run(Duration::from_secs(2));
    for (i, &p) in grid.peers.iter().enumerate() {
        let engine = &grid.sim.node(p).engine;
        assert_eq!(
            engine.upstream_status(&channel),
            Some((12, 3)),
            "peer {i} not back to full redundancy"
        );
        let (at, _) = grid.played[i]
            .failovers
            .first()
            .copied()
            .expect("a failover");
        assert!(
            at - killed_at <= Duration::from_secs(2),
            "peer {i} failed over after {:?}",
            at - killed_at
        );
    }
    grid.run(Duration::from_secs(8));
    grid.assert_perfect("kill-parent-of-every-peer");
    let worst = grid
        .played
        .iter()
        .map(|p| p.failovers[0].0 - killed_at)
        .max()
        .unwrap();
    println!(
        "kill-parent-of-every-peer: failovers={} slowest_failover={worst:?}",
        grid.played.iter().map(|p| p.failovers.len()).sum::<usize>()
    );
}

#[test]
fn killing_half_the_supernodes_one_by_one_keeps_continuity() {
    let mut grid = Grid::new(8, 4, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    grid.add_policy_peers(12, 0);
    grid.run(Duration::from_secs(6));
    grid.sim.kill(grid.supernodes[0]);
    grid.run(Duration::from_secs(10));
    grid.sim.kill(grid.supernodes[1]);
    grid.run(Duration::from_secs(10));
    let channel = grid.source.channel;
    for &p in &grid.peers {
        // Two supernodes left: they share all the substreams the peer drew.
        let (held, parents) = grid.sim.node(p).engine.upstream_status(&channel).unwrap();
        assert_eq!(parents, 2, "peer {p}");
        assert!(held >= 8, "peer {p} holds {held} substreams");
    }
    grid.assert_perfect("kill-half-one-by-one");
}

#[test]
fn a_late_joiner_plays_within_a_second() {
    let mut grid = Grid::new(9, 4, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    grid.add_policy_peers(4, 0);
    grid.run(Duration::from_secs(10));
    let joined = grid.sim.now();
    let edge_at_join = *grid.source.published.keys().next_back().unwrap();
    grid.add_policy_peers(1, 2);
    grid.run(Duration::from_secs(3));
    let late = grid.played.last().unwrap();
    let (first_seq, _, _, first) = late
        .chunks
        .first()
        .cloned()
        .expect("the late joiner played");
    let behind = edge_at_join.saturating_sub(first_seq);
    println!(
        "late-joiner: first_byte_after={:?} started_chunks_behind_edge={behind}",
        first - joined
    );
    assert!(
        first - joined <= Duration::from_secs(1),
        "first byte after {:?}",
        first - joined
    );
    // It starts about the target delay (1.5 s = 6 chunks) behind the live edge, not at it, so
    // the buffer absorbs jitter and parent changes.
    assert!(
        behind >= 3,
        "started at {first_seq}, live edge {edge_at_join}"
    );
    grid.assert_perfect("late-joiner");
}

/// Source upload for a grid of `peers` policy peers over 8 s of stream.
fn source_upload_with(peers: usize) -> (u64, u64) {
    let mut grid = Grid::new(10, 4, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    let before = grid.sim.node(grid.source.node).bytes_sent;
    grid.add_policy_peers(peers, 0);
    grid.run(Duration::from_secs(8));
    let upload = grid.sim.node(grid.source.node).bytes_sent - before;
    let delivered = grid.assert_perfect(&format!("audience-{peers}"));
    (upload, delivered)
}

#[test]
fn source_upload_does_not_grow_with_the_audience() {
    let (small, small_delivered) = source_upload_with(10);
    let (large, large_delivered) = source_upload_with(200);
    println!(
        "audience: source_upload_10={small} delivered_10={small_delivered} \
         source_upload_200={large} delivered_200={large_delivered}"
    );
    assert!(
        large_delivered > 15 * small_delivered,
        "the large grid delivered more"
    );
    // Same first tier, same stream: within 5% (QUIC control traffic differs a little).
    let ratio = large as f64 / small as f64;
    assert!(
        (0.95..=1.05).contains(&ratio),
        "source upload grew {ratio:.3}x with 20x the audience"
    );
}

#[test]
fn peers_that_stop_reading_cost_bounded_memory_and_nobody_else_anything() {
    // Small QUIC windows so that stalled readers push back within the test.
    let small = || EngineConfig {
        connection_window: 128 * 1024,
        send_window: 128 * 1024,
        max_backlog_bytes: 128 * 1024,
        ..Default::default()
    };
    let mut grid = Grid::new(11, 4, |i| EngineConfig {
        connection_window: 128 * 1024,
        send_window: 128 * 1024,
        max_backlog_bytes: 128 * 1024,
        ..Grid::relay_config(i)
    });
    grid.run(Duration::from_secs(2));
    grid.add_policy_peers_with(10, 0, small);
    let good = grid.peers.len();
    grid.add_policy_peers_with(50, 1, small);
    grid.run(Duration::from_secs(2));
    let now = grid.sim.now();
    for &p in &grid.peers[good..] {
        grid.sim.node_mut(p).engine.set_reading(now, false);
    }
    grid.run(Duration::from_secs(20));
    let channel = grid.source.channel;
    let window_bound = EngineConfig::default().channel.window_bytes;
    let mut drops = 0;
    let mut closed = 0;
    for &sn in &grid.supernodes {
        let engine = &grid.sim.node(sn).engine;
        drops += engine.stats().backlog_drops;
        closed += engine.stats().stalled_closed;
        assert!(
            engine.max_connection_backlog() <= 128 * 1024 + 64 * 1024,
            "backlog unbounded"
        );
        assert!(engine.channel(&channel).unwrap().window_bytes() <= window_bound);
    }
    println!("stalled-readers: supernode_backlog_drops={drops} stalled_closed={closed}");
    assert!(
        drops > 0,
        "the stalled readers never pushed back: the test proves nothing"
    );
    // Judge only the peers that kept reading.
    grid.peers.truncate(good);
    grid.played.truncate(good);
    grid.assert_perfect("stalled-readers");
}

#[test]
fn two_minutes_of_stream_reach_twenty_peers_byte_exact() {
    let mut grid = Grid::new(12, 4, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    for first in 0..4 {
        grid.add_policy_peers(5, first);
    }
    grid.run(Duration::from_secs(120));
    let delivered = grid.assert_perfect("two-minutes");
    assert!(
        grid.played.iter().all(|p| p.chunks.len() >= 470),
        "each peer played about 2 minutes"
    );
    assert!(
        grid.played.iter().all(|p| p.failovers.is_empty()),
        "no parent was lost"
    );
    assert_eq!(delivered, 20 * grid.played[0].chunks.len() as u64 * 15_625);
}

/// A peer that serves others: it plays from the supernodes and relays within `cap`.
fn relaying_peer(grid: &mut Grid, cap: Option<u64>, serve: bool) -> NodeIx {
    let config = move || EngineConfig {
        serve,
        upload_cap: cap,
        ..Default::default()
    };
    grid.add_policy_peers_with(1, 0, config);
    *grid.peers.last().unwrap()
}

/// A peer whose first candidate is `first_parent`, then every supernode.
fn peer_behind(grid: &mut Grid, first_parent: NodeIx) -> NodeIx {
    let mut candidates = vec![grid.candidate(first_parent)];
    candidates.extend(grid.supernodes.iter().map(|&sn| grid.candidate(sn)));
    grid.add_policy_peer(EngineConfig::default(), candidates)
}

#[test]
fn peers_relay_to_peers_within_their_upload_cap() {
    let mut grid = Grid::new(13, 4, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    // An uncapped relaying peer, a capped one, and one that uploads nothing.
    let open = relaying_peer(&mut grid, None, true);
    let cap = 20_000; // bytes per second: about a third of one child's 4 substreams
    let capped = relaying_peer(&mut grid, Some(cap), true);
    let silent = relaying_peer(&mut grid, None, false);
    grid.run(Duration::from_secs(3));
    let behind_open = peer_behind(&mut grid, open);
    let behind_capped = peer_behind(&mut grid, capped);
    let behind_silent = peer_behind(&mut grid, silent);
    let started = grid.sim.now();
    grid.run(Duration::from_secs(12));
    let secs = (grid.sim.now() - started).as_secs_f64();
    grid.assert_perfect("peer-relay");

    let sent = |ix: NodeIx| grid.sim.node(ix).engine.stats();
    // The open relay carried a share of its child's substreams the whole time.
    assert!(sent(open).shard_bytes_out > 100_000, "{:?}", sent(open));
    // The capped relay never exceeded its cap (plus one second of burst)…
    assert!(
        sent(capped).shard_bytes_out as f64 <= cap as f64 * (secs + 1.0),
        "capped relay sent {} bytes in {secs:.1}s",
        sent(capped).shard_bytes_out
    );
    assert!(sent(capped).upload_cap_drops > 0);
    // …and its child moved those substreams to a parent with room.
    let capped_child = grid.peers.iter().position(|&p| p == behind_capped).unwrap();
    assert!(
        !grid.played[capped_child].failovers.is_empty(),
        "the capped parent was never replaced"
    );
    // The peer that uploads nothing sent nothing, and its would-be child plays regardless.
    assert_eq!(sent(silent).shard_bytes_out, 0);
    assert_eq!(grid.sim.node(silent).engine.stats().accepted, 0);
    for child in [behind_open, behind_capped, behind_silent] {
        let (held, parents) = grid
            .sim
            .node(child)
            .engine
            .upstream_status(&grid.source.channel)
            .unwrap();
        assert!(
            held >= 8 && parents >= 2,
            "child {child}: {held} substreams from {parents} parents"
        );
    }
    println!(
        "peer-relay: open_relay_bytes={} capped_relay_bytes={} cap_bytes_per_s={cap} silent_relay_bytes=0",
        sent(open).shard_bytes_out,
        sent(capped).shard_bytes_out
    );
}

#[test]
fn a_parent_that_lags_for_good_is_taken_back_ever_more_rarely() {
    // A relaying peer capped at a third of what its child asks of it lags every time the
    // child takes it back. The child, given only that peer, learns its parents and has no
    // other candidate to spare, so it takes the peer back whenever the peer's back-off ends,
    // and replaces it each time without a gap. The back-off now grows (0.5 s doubling to
    // 10 s) instead of starting over at the parent's first shard, which took it back about
    // every 1.6 s.
    let mut grid = Grid::new(19, 1, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    let capped = relaying_peer(&mut grid, Some(20_000), true);
    grid.run(Duration::from_secs(3));
    let only = grid.candidate(capped);
    let child = grid.add_policy_peer(EngineConfig::default(), vec![only]);
    grid.run(Duration::from_secs(10));
    let i = grid.peers.iter().position(|&p| p == child).unwrap();
    let early = grid.played[i].failovers.len();
    let from = grid.sim.now();
    grid.run(Duration::from_secs(30));
    let late = grid.played[i]
        .failovers
        .iter()
        .filter(|&&(at, _)| at >= from)
        .count();
    grid.assert_perfect("lagging-parent");
    assert!(early >= 1, "the capped parent was never replaced");
    assert!(
        late <= 5,
        "the child replaced its lagging parent {late} times in 30 s (and {early} in the 10 s \
         before)"
    );
    println!("lagging-parent: failovers_first_10s={early} failovers_next_30s={late}");
}

#[test]
fn children_that_know_only_a_relaying_peer_learn_its_parents_and_survive_losing_it() {
    // Two peers given nothing but a relaying peer (a shared link, the local network): its
    // answers name its own parents too, so they draw from those as well and lose nothing
    // when every path from it to them is cut.
    let mut grid = Grid::new(17, 4, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    let parent = relaying_peer(&mut grid, None, true);
    grid.run(Duration::from_secs(3));
    let only = grid.candidate(parent);
    let children: Vec<NodeIx> = (0..2)
        .map(|_| grid.add_policy_peer(EngineConfig::default(), vec![only]))
        .collect();
    grid.run(Duration::from_secs(6));
    let channel = grid.source.channel;
    for &c in &children {
        let (held, parents) = grid.sim.node(c).engine.upstream_status(&channel).unwrap();
        assert!(
            parents >= 2 && held >= 8,
            "child {c}: {held} substreams from {parents} parents"
        );
    }
    let relayed = grid.sim.node(parent).engine.stats().shard_bytes_out;
    assert!(relayed > 0, "the relaying peer sent its children nothing");
    let cut_at = grid.sim.now();
    for &c in &children {
        grid.sim.partition(c, parent, true);
    }
    grid.run(Duration::from_secs(8));
    for &c in &children {
        let i = grid.peers.iter().position(|&p| p == c).unwrap();
        let (at, _) = grid.played[i]
            .failovers
            .first()
            .copied()
            .expect("a failover");
        assert!(at >= cut_at, "child {c} moved before the cut");
    }
    grid.assert_perfect("peer-exchange");
    println!("peer-exchange: relayed_before_cut_bytes={relayed}");
}

#[test]
fn a_second_tier_draws_k_plus_r_across_parents_and_survives_a_first_tier_kill() {
    // Source → 3 first-tier supernodes → 2 second-tier supernodes (policy: 3 parents × 4 = 12
    // substreams, regenerating the other 4) → peers drawing only from the second tier.
    let mut grid = Grid::new(14, 3, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    let channel = grid.source.channel;
    let first_tier: Vec<Candidate> = grid
        .supernodes
        .iter()
        .map(|&sn| grid.candidate(sn))
        .collect();
    let second: Vec<NodeIx> = (0..2)
        .map(|i| {
            let sn = grid.sim.add_node(Grid::relay_config(i)).unwrap();
            let now = grid.sim.now();
            let engine = &mut grid.sim.node_mut(sn).engine;
            engine.add_channel(channel, ChannelMode::Relay);
            engine
                .set_upstream(now, channel, first_tier.clone())
                .unwrap();
            sn
        })
        .collect();
    grid.run(Duration::from_secs(3));
    for &sn in &second {
        assert_eq!(
            grid.sim.node(sn).engine.upstream_status(&channel),
            Some((12, 3))
        );
    }
    // Peers see only the second tier.
    let first_tier_ix = std::mem::replace(&mut grid.supernodes, second.clone());
    grid.add_policy_peers(6, 0);
    grid.run(Duration::from_secs(6));
    grid.sim.kill(first_tier_ix[0]);
    grid.run(Duration::from_secs(10));
    for &sn in &second {
        let engine = &grid.sim.node(sn).engine;
        let (held, parents) = engine.upstream_status(&channel).unwrap();
        // Two first-tier parents left, and perhaps the other second-tier relay, which the
        // first tier names in its answers.
        assert!(
            held >= 8 && parents >= 2,
            "second tier holds {held} from {parents}"
        );
        assert!(engine.channel(&channel).unwrap().stats().regenerated > 0);
    }
    grid.assert_perfect("second-tier");
}

#[test]
fn a_partitioned_parent_is_replaced_like_a_dead_one() {
    let mut grid = Grid::new(15, 4, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    grid.add_policy_peers(4, 0);
    grid.run(Duration::from_secs(6));
    // Cut every peer off from supernode 0; the supernode itself lives on.
    let cut_at = grid.sim.now();
    for i in 0..grid.peers.len() {
        let (p, sn) = (grid.peers[i], grid.supernodes[0]);
        grid.sim.partition(p, sn, true);
    }
    grid.run(Duration::from_secs(10));
    for (i, played) in grid.played.iter().enumerate() {
        let (at, _) = played.failovers.first().copied().expect("a failover");
        assert!(
            at - cut_at <= Duration::from_secs(2),
            "peer {i} failed over after {:?}",
            at - cut_at
        );
    }
    grid.assert_perfect("partition");
}

#[test]
fn stream_headers_reach_late_joiners_and_forged_ones_are_refused() {
    use gridcast::keys::ChannelKey;
    use gridcast::wire::SignedStreamHeader;
    // Supernode 1 corrupts what it sends, stream headers included.
    let mut grid = Grid::new(9, 4, |i| EngineConfig {
        corrupt_outgoing_shards: i == 1,
        ..Grid::relay_config(i)
    });
    grid.run(Duration::from_secs(2));
    let key = ChannelKey::from_seed(&[77; 32]);
    let channel = grid.source.channel;
    let first = SignedStreamHeader::sign(&key, 1, bytes::Bytes::from_static(b"OggS first"));
    let now = grid.sim.now();
    let source = grid.source.node;
    assert!(
        grid.sim
            .node_mut(source)
            .engine
            .set_stream_header(now, channel, first.clone())
            .unwrap()
    );
    grid.run(Duration::from_secs(1));
    for (i, &sn) in grid.supernodes.iter().enumerate() {
        let held = grid.sim.node(sn).engine.channel(&channel).unwrap();
        assert_eq!(held.stream_header(), Some(&first), "supernode {i}");
    }
    // Late joiners get it with the channel information.
    grid.add_policy_peers(6, 0);
    grid.run(Duration::from_secs(4));
    for (i, played) in grid.played.iter().enumerate() {
        assert_eq!(played.headers.first(), Some(&first), "peer {i}");
        assert!(played.headers.iter().all(|h| h == &first));
    }
    // A new header (an encoder restart) reaches subscribers already playing; an older one is
    // ignored.
    let second = SignedStreamHeader::sign(&key, 2, bytes::Bytes::from_static(b"OggS second"));
    let now = grid.sim.now();
    let engine = &mut grid.sim.node_mut(source).engine;
    assert!(
        engine
            .set_stream_header(now, channel, second.clone())
            .unwrap()
    );
    assert!(!engine.set_stream_header(now, channel, first).unwrap());
    grid.run(Duration::from_secs(2));
    for (i, played) in grid.played.iter().enumerate() {
        assert_eq!(played.headers.last(), Some(&second), "peer {i}");
    }
    // Whoever took anything from the corrupting supernode dropped it; no forged header was
    // passed on to a player.
    let bad = grid.sim.node(grid.supernodes[1]).addr;
    for &p in &grid.peers {
        let engine = &grid.sim.node(p).engine;
        assert!(engine.stats().misbehaving_closed >= 1, "peer kept {bad}");
    }
    grid.assert_perfect("stream-headers");
}

#[test]
fn a_draining_supernode_sends_its_children_away_before_it_stops() {
    let mut grid = Grid::new(11, 4, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    // Peers know supernodes 0..3; supernode 3 is named only in supernode 0's go-away.
    let known: Vec<_> = (0..3).map(|i| grid.candidate(grid.supernodes[i])).collect();
    for _ in 0..6 {
        grid.add_policy_peer(EngineConfig::default(), known.clone());
    }
    let channel = grid.source.channel;
    let spare = grid.candidate(grid.supernodes[3]);
    let draining = grid.supernodes[0];
    grid.sim
        .node_mut(draining)
        .engine
        .set_alternatives(channel, vec![spare]);
    grid.run(Duration::from_secs(6));
    let before = grid.sim.node(draining).engine.served_subscriptions();
    assert!(before >= 6, "supernode 0 serves every peer: {before}");
    let now = grid.sim.now();
    grid.sim.node_mut(draining).engine.drain(now);
    grid.run(Duration::from_secs(2));
    let engine = &grid.sim.node(draining).engine;
    assert_eq!(engine.served_subscriptions(), 0, "children still attached");
    assert_eq!(engine.stats().go_aways_sent as usize, before);
    for &p in &grid.peers {
        let engine = &grid.sim.node(p).engine;
        assert_eq!(engine.stats().go_aways_received, 1);
        assert_eq!(engine.upstream_status(&channel), Some((12, 3)));
    }
    // The alternative took children.
    assert!(
        grid.sim
            .node(grid.supernodes[3])
            .engine
            .served_subscriptions()
            > 0
    );
    // Then it exits; nobody notices.
    grid.sim.kill(draining);
    grid.run(Duration::from_secs(6));
    grid.assert_perfect("drain");
}

#[test]
fn a_drained_child_hears_of_it_within_a_round_trip_between_chunks() {
    // Messages a node writes outside a connection's own events (a drain's go-aways, the Haves
    // standbys get) must leave at once, not with the connection's next ACK or chunk.
    let mut grid = Grid::new(14, 2, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    let known = vec![grid.candidate(grid.supernodes[0])];
    for _ in 0..4 {
        grid.add_policy_peer(
            EngineConfig {
                upstream: UpstreamConfig {
                    parents: 1,
                    standby: 0,
                    ..UpstreamConfig::default()
                },
                ..EngineConfig::default()
            },
            known.clone(),
        );
    }
    grid.run(Duration::from_secs(4));
    let draining = grid.supernodes[0];
    assert!(grid.sim.node(draining).engine.served_subscriptions() >= 4);
    // Between chunks: a new chunk out, 60 ms for it to arrive and be acknowledged (10-ms
    // links), so nothing of it is left in flight.
    let chunks = grid.source.published.len();
    for _ in 0..50 {
        grid.run(Duration::from_millis(5));
        if grid.source.published.len() > chunks {
            break;
        }
    }
    assert!(grid.source.published.len() > chunks, "no chunk in 250 ms");
    grid.run(Duration::from_millis(60));
    let now = grid.sim.now();
    grid.sim.node_mut(draining).engine.drain(now);
    // One way is 10 ms; 40 ms leaves room for timers and the other hop, and is far short of
    // the next chunk (about 190 ms away) or a keep-alive.
    grid.run(Duration::from_millis(40));
    for &p in &grid.peers {
        assert_eq!(
            grid.sim.node(p).engine.stats().go_aways_received,
            1,
            "a child had not heard of the drain 40 ms after it"
        );
    }
}

#[test]
fn connection_and_subscriber_limits_send_peers_elsewhere_without_a_gap() {
    let mut grid = Grid::new(12, 4, |i| EngineConfig {
        max_subscribers: (i == 0).then_some(4),
        // The source's connection plus three peers.
        max_connections: (i == 1).then_some(4),
        ..Grid::relay_config(i)
    });
    grid.run(Duration::from_secs(2));
    // Six peers want 18 parents; the four supernodes take 4 + 3 + 6 + 6.
    grid.add_policy_peers(6, 0);
    grid.run(Duration::from_secs(10));
    let full = &grid.sim.node(grid.supernodes[0]).engine;
    assert!(full.served_subscriptions() <= 4);
    assert!(full.stats().subscriptions_turned_away >= 1);
    let crowded = &grid.sim.node(grid.supernodes[1]).engine;
    assert!(crowded.connection_count() <= 4);
    assert!(crowded.stats().connections_refused >= 1);
    let channel = grid.source.channel;
    // Standby connections take slots too, so not every peer finds three parents; every one
    // still draws at least K substreams from parents that took it.
    for (i, &p) in grid.peers.iter().enumerate() {
        let (held, parents) = grid.sim.node(p).engine.upstream_status(&channel).unwrap();
        assert!(held >= 8 && parents >= 2, "peer {i}: {held} from {parents}");
    }
    grid.assert_perfect("limits");
}

/// Datagrams the peers of a 3-supernode grid send (their ACKs and control messages) in 6 s,
/// with the supernodes asking them for an ACK every `threshold + 1` packets.
fn peer_upload_with_ack_threshold(threshold: u32) -> (u64, u64) {
    let mut grid = Grid::new(23, 3, |i| EngineConfig {
        ack_eliciting_threshold: threshold,
        ..Grid::relay_config(i)
    });
    // A 16 Mbit/s uplink each: a supernode's packets reach a peer spread out in time, as on a
    // real path, not in one burst.
    for sn in grid.supernodes.clone() {
        grid.sim.set_uplink(sn, Some(2_000_000));
    }
    grid.add_peers(4);
    grid.run(Duration::from_secs(6));
    let upload = grid
        .peers
        .iter()
        .map(|&p| grid.sim.node(p).datagrams_sent)
        .sum();
    let delivered = grid.assert_perfect(&format!("ack-threshold-{threshold}"));
    (upload, delivered)
}

#[test]
fn supernodes_ask_their_children_for_fewer_acks() {
    let (every_other, delivered_before) = peer_upload_with_ack_threshold(0);
    let (thinned, delivered_after) = peer_upload_with_ack_threshold(9);
    println!(
        "acks: peer_datagrams_quic_default={every_other} peer_datagrams_threshold_9={thinned} \
         delivered={delivered_before}/{delivered_after}"
    );
    assert_eq!(delivered_before, delivered_after);
    assert!(
        thinned * 2 < every_other,
        "peers sent {thinned} datagrams with ACK frequency, {every_other} without"
    );
}

#[test]
fn a_go_away_overtakes_the_chunks_queued_before_it() {
    let mut grid = Grid::new(29, 0, Grid::relay_config);
    let (source, channel) = (grid.source.node, grid.source.channel);
    let (addr, id) = (grid.sim.node(source).addr, grid.sim.node(source).id);
    let peer = grid.sim.add_node(EngineConfig::default()).unwrap();
    let now = grid.sim.now();
    let engine = &mut grid.sim.node_mut(peer).engine;
    engine.add_channel(channel, ChannelMode::Play);
    engine
        .subscribe(
            now,
            addr,
            id,
            channel,
            SubstreamSet::first(16),
            StartAt::Live,
        )
        .unwrap();
    grid.run(Duration::from_secs(2));
    let bytes_in = |grid: &Grid| {
        grid.sim
            .node(peer)
            .engine
            .channel(&channel)
            .unwrap()
            .stats()
            .bytes_in
    };
    let before = bytes_in(&grid);
    assert!(before > 0, "the peer is subscribed and receiving");

    // A 1 MB chunk (2 MB of shards to this peer, far beyond its congestion window) is queued,
    // then the source drains: its go-away is written after every byte of that chunk.
    let seq = grid.source.published.keys().next_back().unwrap() + 1;
    let body: bytes::Bytes = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let coded = grid
        .source
        .publisher
        .publish(seq, 10_000_000, ChunkFlags::empty(), &body)
        .unwrap();
    let queued: u64 = coded.shards().iter().map(|s| s.len() as u64).sum();
    let now = grid.sim.now();
    let engine = &mut grid.sim.node_mut(source).engine;
    engine.publish(now, channel, &coded).unwrap();
    engine.drain(now);

    // Control goes first: the go-away reaches the peer while most of the chunk is still
    // on its way.
    let mut at_go_away = None;
    for _ in 0..5000 {
        grid.sim.run_for(Duration::from_millis(1)).unwrap();
        if grid.sim.node(peer).engine.stats().go_aways_received > 0 {
            at_go_away = Some(bytes_in(&grid) - before);
            break;
        }
    }
    let received = at_go_away.expect("the go-away arrives");
    println!("go-away after {received} of {queued} queued shard bytes");
    // Without the control stream's priority it arrives after the chunk (1 MB counted, the
    // eight shards that rebuild it); with it, before any shard byte.
    assert!(
        received * 4 < queued,
        "the go-away waited behind {received} of {queued} shard bytes"
    );
}

/// The io_uring worker's timer slack: the wake-up it is given lies between the first deadline
/// and that plus the slack, is the first deadline itself with no slack, and with a supernode
/// serving a dozen peers it does gather later deadlines (pacers) into one turn.
#[test]
fn coalesced_timers_wake_between_the_first_deadline_and_the_slack() {
    let mut grid = Grid::new(8, 3, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    grid.add_peers(12);
    grid.run(Duration::from_secs(3));
    let sn = grid.supernodes[0];
    let slack = Duration::from_millis(1);
    let (mut checked, mut gathered) = (0, 0);
    for _ in 0..400 {
        grid.run(Duration::from_millis(5));
        let engine = &mut grid.sim.node_mut(sn).engine;
        let first = engine
            .poll_timeout()
            .expect("a serving node always has a deadline");
        assert_eq!(engine.poll_timeout_coalesced(Duration::ZERO), Some(first));
        let wake = engine.poll_timeout_coalesced(slack).unwrap();
        assert!(
            wake >= first && wake <= first + slack,
            "woken {:?} after the first deadline, slack {slack:?}",
            wake.saturating_duration_since(first)
        );
        checked += 1;
        gathered += usize::from(wake > first);
    }
    assert_eq!(checked, 400);
    println!("coalesced timers: {gathered} of {checked} wake-ups gathered a later deadline");
    assert!(
        gathered > 0,
        "12 peers' deadlines never fell within 1 ms of each other in {checked} looks"
    );
    grid.assert_perfect("coalesced-timers");
}
