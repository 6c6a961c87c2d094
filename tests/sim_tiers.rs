//! Simulator scenarios for relays that heal like peers: tiers of relays losing parents one at
//! a time, every parent of a peer cut off at once, a parent starved by its own upstream, a
//! channel nobody carries, subscribers that come before a relay's first chunk, a source whose
//! input comes in bursts over a second apart, a relay cut off from its only upstream for half a
//! minute.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::time::Duration;

use common::grid::Grid;
use gridcast::node::{Candidate, ChannelMode, EngineConfig, NodeEvent};
use gridcast::sim::{LinkConfig, NodeIx, SimConfig};
use gridcast::wire::RefuseReason;

#[test]
fn first_tier_supernodes_killed_one_by_one_until_one_remains_cost_no_peer_a_chunk() {
    // Source → three first-tier relays (each K substreams from the source, regenerating the
    // rest) → two second-tier relays, each drawing from all three → peers below the second
    // tier only.
    let mut grid = Grid::new(21, 0, Grid::relay_config);
    let source = grid.candidate(grid.source.node);
    let first: Vec<NodeIx> = (0..3)
        .map(|_| grid.add_policy_relay(vec![source]))
        .collect();
    grid.run(Duration::from_secs(2));
    let channel = grid.source.channel;
    for &sn in &first {
        assert_eq!(
            grid.sim.node(sn).engine.upstream_status(&channel),
            Some((8, 1)),
            "a first-tier relay draws K from its only upstream"
        );
    }
    let first_tier: Vec<Candidate> = first.iter().map(|&sn| grid.candidate(sn)).collect();
    let second: Vec<NodeIx> = (0..2)
        .map(|_| grid.add_policy_relay(first_tier.clone()))
        .collect();
    grid.run(Duration::from_secs(3));
    for &sn in &second {
        let (held, parents) = grid.sim.node(sn).engine.upstream_status(&channel).unwrap();
        assert!(parents >= 2 && held >= 8 + 4, "{held} from {parents}");
    }
    grid.supernodes = second.clone();
    grid.add_policy_peers(6, 0);
    grid.run(Duration::from_secs(5));
    for (n, &sn) in first.iter().take(2).enumerate() {
        grid.sim.kill(sn);
        grid.run(Duration::from_secs(4));
        for &t2 in &second {
            let (held, parents) = grid.sim.node(t2).engine.upstream_status(&channel).unwrap();
            println!(
                "after {} first-tier kills: second tier holds {held} from {parents}",
                n + 1
            );
            // The first-tier survivors, and perhaps the other second-tier relay (named in
            // the first tier's answers): enough that losing any one still leaves K.
            let invariant = if parents == 1 {
                8
            } else {
                parents * 8usize.div_ceil(parents - 1)
            };
            assert!(parents >= 1 && held >= invariant, "{held} from {parents}");
        }
    }
    grid.run(Duration::from_secs(4));
    for &t2 in &second {
        assert!(grid.sim.node(t2).engine.stats().failovers >= 2);
    }
    grid.assert_perfect("first-tier-kills");
}

#[test]
fn every_parent_partitioned_at_once_is_noticed_within_two_seconds() {
    // Five supernodes; each peer draws from three and keeps the other two as standbys. Cut
    // each peer off from its three parents at once (they live on, and still serve others): no
    // parent delivers while another does, so only silence on the path itself gives it away.
    let mut grid = Grid::new(22, 5, Grid::relay_config);
    grid.run(Duration::from_secs(2));
    grid.add_policy_peers(4, 0);
    grid.run(Duration::from_secs(6));
    let cut_at = grid.sim.now();
    for i in 0..grid.peers.len() {
        for sn in 0..3 {
            let (p, sn) = (grid.peers[i], grid.supernodes[sn]);
            grid.sim.partition(p, sn, true);
        }
    }
    grid.run(Duration::from_secs(10));
    let channel = grid.source.channel;
    for (i, played) in grid.played.iter().enumerate() {
        let (at, _) = played.failovers.first().copied().expect("a failover");
        println!(
            "all-parents partition: peer {i} failed over after {:?}",
            at - cut_at
        );
        assert!(
            at - cut_at <= Duration::from_secs(2),
            "peer {i} failed over after {:?}",
            at - cut_at
        );
        let (held, parents) = grid
            .sim
            .node(grid.peers[i])
            .engine
            .upstream_status(&channel)
            .unwrap();
        assert!(
            held >= 16 && parents == 2,
            "peer {i}: {held} from {parents}"
        );
    }
    grid.assert_perfect("all-parents-partition");
}

#[test]
fn a_node_that_does_not_carry_the_channel_refuses_at_once() {
    // A peer whose only candidate carries another channel hears so within a round trip and
    // keeps retrying with back-off; it never waits in silence.
    let mut grid = Grid::new(23, 1, Grid::relay_config);
    grid.run(Duration::from_secs(1));
    let other = gridcast::keys::ChannelKey::from_seed(&[9; 32]).channel_id();
    let p = grid.sim.add_node(EngineConfig::default()).unwrap();
    let now = grid.sim.now();
    let cand = grid.candidate(grid.supernodes[0]);
    let engine = &mut grid.sim.node_mut(p).engine;
    engine.add_channel(other, ChannelMode::Play);
    engine.set_upstream(now, other, vec![cand]).unwrap();
    grid.run(Duration::from_secs(6));
    let events = grid.sim.take_events(p);
    let refusals: Vec<_> = events
        .iter()
        .filter_map(|(at, e)| match e {
            NodeEvent::SubscriptionRefused {
                channel, reason, ..
            } if *channel == other => Some((*at, *reason)),
            _ => None,
        })
        .collect();
    assert!(!refusals.is_empty(), "no refusal: {events:?}");
    assert!(refusals[0].0 - now < Duration::from_millis(500));
    assert!(refusals.iter().all(|(_, r)| *r == RefuseReason::NotCarried));
    // Back-off: retried, but not in a tight loop (0.5 + 1 + 2 s fit in the 6 s).
    assert!(
        (2..=5).contains(&refusals.len()),
        "{} refusals",
        refusals.len()
    );
    assert!(
        events.iter().any(
            |(_, e)| matches!(e, NodeEvent::UpstreamLost { channel, .. } if *channel == other)
        )
    );
    assert!(
        grid.sim
            .node(grid.supernodes[0])
            .engine
            .stats()
            .unknown_channel_refusals
            >= 2
    );
}

#[test]
fn peers_that_ask_a_relay_before_it_has_a_chunk_play_from_its_first() {
    // The relay starts with nothing; its upstream, the source, has published nothing yet
    // either. Peers subscribe to the relay at once and must be served when the chunks come.
    let mut grid = Grid::new(24, 0, Grid::relay_config);
    let source = grid.candidate(grid.source.node);
    let relay = grid.add_policy_relay(vec![source]);
    let cand = grid.candidate(relay);
    for _ in 0..4 {
        grid.add_policy_peer(EngineConfig::default(), vec![cand]);
    }
    grid.sim.run_for(Duration::from_millis(500)).unwrap();
    grid.run(Duration::from_secs(8));
    grid.assert_perfect("before-first-chunk");
}

#[test]
fn a_parent_starved_by_its_own_upstream_is_left_for_a_standby_that_has_the_chunks() {
    // The peer draws everything from X and keeps Y as a standby. X's own upstream path is cut:
    // X lives on and answers keep-alives but delivers nothing, so no other parent shows it up.
    // Y's announcements of the chunks it holds do.
    let mut grid = Grid::new(25, 0, Grid::relay_config);
    let source = grid.candidate(grid.source.node);
    let x = grid.add_policy_relay(vec![source]);
    let y = grid.add_policy_relay(vec![source]);
    grid.run(Duration::from_secs(2));
    let mut config = EngineConfig::default();
    config.upstream.parents = 1;
    config.upstream.standby = 1;
    let (cx, cy) = (grid.candidate(x), grid.candidate(y));
    grid.add_policy_peer(config, vec![cx, cy]);
    grid.run(Duration::from_secs(5));
    let channel = grid.source.channel;
    let peer = grid.peers[0];
    assert_eq!(
        grid.sim.node(peer).engine.upstream_status(&channel),
        Some((8, 1))
    );
    let cut_at = grid.sim.now();
    let src = grid.source.node;
    grid.sim.partition(x, src, true);
    grid.run(Duration::from_secs(8));
    let (at, _) = grid.played[0]
        .failovers
        .first()
        .copied()
        .expect("a failover");
    println!("starved parent left after {:?}", at - cut_at);
    assert!(at - cut_at <= Duration::from_secs(3), "{:?}", at - cut_at);
    grid.assert_perfect("starved-parent");
}

#[test]
fn a_source_whose_input_comes_in_bursts_over_a_second_apart_costs_no_failover() {
    // ffmpeg's Ogg muxer flushes its pages once a second, so a radio source gets its input,
    // and publishes its chunks, in bursts about a second apart, the parents' stall timeout,
    // and a little more when the encoder's timing wavers. Every parent is then a second quiet
    // just before each burst. The peer draws from two relays and from the source itself, one
    // hop nearer: the source's shards of each burst come first, and the relays', which are
    // just as healthy, a link later. Neither relay may be judged silent for it.
    let config = SimConfig {
        seed: 31,
        link: LinkConfig {
            latency: Duration::from_millis(30),
            loss: 0.0,
        },
        ..Default::default()
    };
    let mut grid = Grid::with_sim_config(config, 0, Grid::relay_config);
    grid.source.burst = Some(Duration::from_millis(1300));
    let source = grid.source_candidate();
    let x = grid.add_policy_relay(vec![source]);
    let y = grid.add_policy_relay(vec![source]);
    grid.run(Duration::from_secs(3));
    let (cx, cy) = (grid.candidate(x), grid.candidate(y));
    grid.add_policy_peer(EngineConfig::default(), vec![cx, cy, source]);
    grid.run(Duration::from_secs(40));
    let failovers = grid.played[0].failovers.len();
    let outages = grid.played[0].outages.len();
    println!("bursty source: failovers={failovers} outages={outages}");
    assert_eq!(failovers, 0, "healthy parents replaced");
    assert_eq!(
        outages, 0,
        "an outage announced while parents delivered every burst"
    );
    grid.assert_perfect("bursty-source");
}

#[test]
fn an_upstream_cut_off_for_half_a_minute_is_one_failover_not_one_per_redial() {
    // A relay whose only upstream is the source loses its path to it for 30 s. It replaces the
    // silent parent once, then redials it with back-off; every attempt that cannot reach it is
    // a dial that failed, not another failover (nor another `Failover` event for its log). Once
    // the path is back, the relay draws the channel again.
    let mut grid = Grid::new(24, 0, Grid::relay_config);
    let channel = grid.source.channel;
    let source = grid.source.node;
    let relay = grid.add_policy_relay(vec![grid.candidate(source)]);
    grid.run(Duration::from_secs(3));
    assert_eq!(
        grid.sim.node(relay).engine.upstream_status(&channel),
        Some((8, 1)),
        "the relay draws K from the source"
    );
    grid.sim.partition(relay, source, true);
    grid.run(Duration::from_secs(30));
    let cut_off = grid.sim.node(relay).engine.stats().failovers;
    grid.sim.partition(relay, source, false);
    grid.run(Duration::from_secs(30));
    let after = grid.sim.node(relay).engine.upstream_status(&channel);
    println!("upstream cut for 30 s: failovers={cut_off} after the mend: {after:?}");
    assert_eq!(cut_off, 1, "one parent lost, replaced once");
    let (held, parents) = after.unwrap();
    assert!(held >= 8 && parents == 1, "{held} from {parents}");
}

#[test]
fn a_relay_whose_parent_goes_after_the_stream_ended_does_not_announce_it_flowing_again() {
    // The broadcast ends; a second-tier relay announces it once ("the stream ended"). Then
    // one of its two parents goes, as a source does when its linger is over. The relay
    // replaces it, and the survivor resends the last chunks from the failover's resume point:
    // chunks of a stream that ended, which are no sign of the channel arriving again.
    let mut grid = Grid::new(26, 0, Grid::relay_config);
    let source = grid.candidate(grid.source.node);
    let x = grid.add_policy_relay(vec![source]);
    let y = grid.add_policy_relay(vec![source]);
    grid.run(Duration::from_secs(2));
    let (cx, cy) = (grid.candidate(x), grid.candidate(y));
    let z = grid.add_policy_relay(vec![cx, cy]);
    grid.run(Duration::from_secs(4));
    grid.source.finish(&mut grid.sim);
    grid.sim.run_for(Duration::from_secs(5)).unwrap();
    let channel = grid.source.channel;
    let before = grid.sim.take_events(z);
    let ended = |e: &NodeEvent| matches!(e, NodeEvent::UpstreamLost { ended: true, .. });
    assert_eq!(
        before.iter().filter(|(_, e)| ended(e)).count(),
        1,
        "the end announced once"
    );
    grid.sim.kill(x);
    grid.sim.run_for(Duration::from_secs(8)).unwrap();
    let after = grid.sim.take_events(z);
    assert!(
        after
            .iter()
            .any(|(_, e)| matches!(e, NodeEvent::Failover { channel: c, .. } if *c == channel)),
        "the lost parent is replaced as before: {after:?}"
    );
    assert!(
        !after
            .iter()
            .any(|(_, e)| matches!(e, NodeEvent::UpstreamRestored { .. })),
        "an ended stream announced as flowing again: {after:?}"
    );
}
