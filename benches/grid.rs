//! The simulator as a benchmark: how many seconds of stream a grid of real engines (real QUIC,
//! real crypto, real coding) processes per second of wall time on one core, against real time
//! (1×), the baseline any live deployment must beat. The grid: a 500 kbit/s source, 4
//! supernodes, and policy peers each drawing 12 of 16 substreams from 3 parents.
//!
//! Prints one line per audience size:
//! `grid peers=<n> stream_s=<s> wall_s=<w> speedup_vs_realtime=<x> shards_per_wall_s=<y>`.
//!
//! `--streams`: the two shard stream layouts, each with CUBIC and with BBR, and the default
//! layout with the gated CUBIC (`Congestion::GatedCubic`), side by side on a path with 5% loss and 40 ms of delay (`grid-streams
//! shard_streams=… congestion=… continuity_min=… startup_ms_p50=… delay_ms_p99=… mb_sent=…
//! failovers_behind=… failovers_short=… failovers_silent=… failovers_lost=…`, the peers'
//! parent replacements by why),
//! first with the supernodes' uplinks uncapped, then capped at 5 Mbit/s behind a queue that
//! never overflows, then (with no random loss) capped behind a 50-ms drop-tail queue, where a
//! burst one connection sends costs datagrams of its own and of its neighbours; and nothing
//! else.
//!
//! `--congestion cubic,gated,bbr` runs only the controllers named (every one by default).
//!
//! `--bursts`: the default layout with CUBIC, the gated CUBIC and BBR, a 4 Mbit/s stream (three parents
//! each send a peer about 42 KB a chunk at once), no random loss, first with the peers'
//! downlinks uncapped, then each peer behind a 10 Mbit/s access link with a 50-ms drop-tail
//! queue: how a sender's bursts fare at a viewer's own bottleneck (`grid-streams` lines with
//! `peer_downlink_kbps` and `peer_queue_bytes` set); and nothing else.
//!
//! Then a grid that forms itself: a source with a first tier of 10, 30 relays and 1,000 peers
//! that know only the source (discovery, membership and peer exchange at work), for 60 s of
//! stream (`--quick`: 10 relays, 100 peers, 20 s; `--relays`, `--peers` and `--stream` set
//! them, `--board` puts the simulator's in-memory directory in place of gossip):
//! `grid-discovery membership=<gossip|board> supernodes=<n> peers=<n> stream_s=<s> wall_s=<w> speedup_vs_realtime=<x>
//! continuity_min=<c> source_upload_bytes=<b> delivered_bytes=<d>`.

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::disallowed_methods)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::grid::Grid;
use gridcast::node::directory::Board;
use gridcast::node::{Congestion, EngineConfig, FailoverWhy, ShardStreams};
use gridcast::sim::{LinkConfig, SimConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<usize>().expect("a number"))
    };
    let quick = flag("--quick");
    // `--congestion cubic,gated,bbr`: those controllers alone (all three by default).
    let only: Option<Vec<Congestion>> = args
        .iter()
        .position(|a| a == "--congestion")
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.split(',')
                .map(|c| match c {
                    "cubic" => Congestion::Cubic,
                    "gated" => Congestion::GatedCubic,
                    "bbr" => Congestion::Bbr,
                    other => panic!("unknown controller {other:?} (cubic, gated, bbr)"),
                })
                .collect()
        });
    let runs = |c: Congestion| only.as_ref().is_none_or(|o| o.contains(&c));
    if flag("--streams") {
        streams(quick, &runs);
        return;
    }
    if flag("--bursts") {
        bursts(quick, &runs);
        return;
    }
    if !flag("--discovery-only") {
        fixed(quick);
    }
    let (relays, peers, stream) = if quick { (10, 100, 20) } else { (30, 1000, 60) };
    discovery(
        value("--relays").unwrap_or(relays),
        value("--peers").unwrap_or(peers),
        value("--stream").unwrap_or(stream) as u64,
        flag("--board"),
    );
}

/// A grid wired by hand: 4 supernodes, peers drawing from 3 of them.
fn fixed(quick: bool) {
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

/// The two shard stream layouts on a lossy, delayed path: 5% loss and 40 ms one way on every
/// link, a source, 4 supernodes and 20 policy peers (3 seeds each). What a viewer would notice:
/// continuity, start-up (first subscription to first chunk out) and the delay from a chunk's
/// first byte at the source to its playout (the 1 s target delay is part of it; head-of-line
/// waits behind a lost packet add to it).
fn streams(quick: bool, runs: &dyn Fn(Congestion) -> bool) {
    let (stream_s, seeds): (u64, &[u64]) = if quick {
        (15, &[5])
    } else {
        (30, &[5, 21, 42])
    };
    let variants = [
        (ShardStreams::PerChunk, Congestion::Cubic),
        (ShardStreams::PerSubscription, Congestion::Cubic),
        (ShardStreams::PerSubscription, Congestion::GatedCubic),
        (ShardStreams::PerChunk, Congestion::Bbr),
        (ShardStreams::PerSubscription, Congestion::Bbr),
    ];
    // Then each supernode's uplink capped at 5 Mbit/s, about 1.3 times what its share of the
    // peers asks of it: the peers' connections compete for one queue, and a controller that
    // let one of them crowd out the others would show as a peer with gaps. Last, the same
    // cap behind a queue of 50 ms (31,250 bytes) that drops what does not fit, and no random
    // loss: what a sender's bursts cost on a shallow bottleneck.
    let cap = 625_000u64;
    let lossy = Path {
        bitrate: 500_000,
        uplink: None,
        queue: None,
        loss: 0.05,
        downlink: None,
    };
    let paths = [
        lossy,
        Path {
            uplink: Some(cap),
            ..lossy
        },
        Path {
            uplink: Some(cap),
            queue: Some(cap / 20),
            loss: 0.0,
            ..lossy
        },
    ];
    for path in paths {
        for &(layout, congestion) in variants.iter().filter(|(_, c)| runs(*c)) {
            streams_one(stream_s, seeds, layout, congestion, path);
        }
    }
}

/// A sender's bursts at the viewers' own bottleneck (see the module docs, `--bursts`).
fn bursts(quick: bool, runs: &dyn Fn(Congestion) -> bool) {
    let (stream_s, seeds): (u64, &[u64]) = if quick {
        (15, &[5])
    } else {
        (30, &[5, 21, 42])
    };
    let clean = Path {
        bitrate: 4_000_000,
        uplink: None,
        queue: None,
        loss: 0.0,
        downlink: None,
    };
    // 10 Mbit/s, and 50 ms of it queued.
    let access = Path {
        downlink: Some((1_250_000, 62_500)),
        ..clean
    };
    for path in [clean, access] {
        for congestion in [Congestion::Cubic, Congestion::GatedCubic, Congestion::Bbr]
            .into_iter()
            .filter(|&c| runs(c))
        {
            streams_one(
                stream_s,
                seeds,
                ShardStreams::PerSubscription,
                congestion,
                path,
            );
        }
    }
}

/// The stream, the supernodes' uplinks, the peers' downlinks and the loss on every link, for
/// [`streams_one`].
#[derive(Clone, Copy)]
struct Path {
    /// The source's stream, bits per second.
    bitrate: usize,
    /// Bytes per second (`None`: uncapped).
    uplink: Option<u64>,
    /// Most bytes waiting for the uplink (`None`: no limit).
    queue: Option<u64>,
    loss: f64,
    /// Each peer's access link: bytes per second and the most bytes its queue holds.
    downlink: Option<(u64, u64)>,
}

fn streams_one(
    stream_s: u64,
    seeds: &[u64],
    layout: ShardStreams,
    congestion: Congestion,
    path: Path,
) {
    {
        let with = |mut c: EngineConfig| {
            c.shard_streams = layout;
            c.congestion = congestion;
            c
        };
        let (mut continuity_min, mut startups, mut delays, mut lost, mut sent) =
            (1.0f64, vec![], vec![], 0, 0);
        // The peers' parent replacements, by why: behind, short, silent, lost.
        let mut whys = [0usize; 4];
        let wall = Instant::now();
        for &seed in seeds {
            let config = SimConfig {
                seed,
                link: LinkConfig {
                    latency: Duration::from_millis(40),
                    loss: path.loss,
                },
                ..Default::default()
            };
            let mut grid = Grid::with_bitrate(
                config,
                with(common::grid::Broadcast::config()),
                path.bitrate,
                4,
                |i| with(Grid::relay_config(i)),
            );
            for &sn in &grid.supernodes {
                grid.sim.set_uplink(sn, path.uplink);
                grid.sim.set_uplink_queue(sn, path.queue);
            }
            grid.run(Duration::from_secs(2));
            grid.add_policy_peers_with(20, 0, || with(EngineConfig::default()));
            if let Some((rate, queue)) = path.downlink {
                for &p in &grid.peers {
                    grid.sim.set_downlink(p, Some(rate), Some(queue));
                }
            }
            grid.run(Duration::from_secs(stream_s));
            for (i, &p) in grid.peers.iter().enumerate() {
                let s = grid.peer_stats(p);
                continuity_min = continuity_min.min(
                    s.chunks_played as f64 / (s.chunks_played + s.chunks_skipped).max(1) as f64,
                );
                if let Some(t) = s.startup {
                    startups.push(t.as_secs_f64() * 1e3);
                }
                for why in &grid.played[i].failover_why {
                    whys[match why {
                        FailoverWhy::Behind => 0,
                        FailoverWhy::Short => 1,
                        FailoverWhy::Silent => 2,
                        FailoverWhy::Lost => 3,
                    }] += 1;
                }
                for (seq, _, _, at) in &grid.played[i].chunks {
                    if let Some(&started) = grid.source.started.get(seq) {
                        delays.push((*at - started).as_secs_f64() * 1e3);
                    }
                }
            }
            lost += grid.sim.stats().lost + grid.sim.stats().queue_drops;
            sent += grid.sim.stats().bytes;
        }
        let pct = |v: &mut Vec<f64>, q: f64| {
            v.sort_by(f64::total_cmp);
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        println!(
            "grid-streams shard_streams={layout:?} congestion={congestion:?} bitrate_kbps={} supernode_uplink_kbps={} uplink_queue_bytes={} peer_downlink_kbps={} peer_queue_bytes={} loss={} latency_ms=40 seeds={} peers=20 stream_s={stream_s} \
             continuity_min={continuity_min:.4} startup_ms_p50={:.0} startup_ms_max={:.0} \
             delay_ms_p50={:.0} delay_ms_p99={:.0} delay_ms_max={:.0} datagrams_lost={lost} mb_sent={:.1} \
             failovers_behind={} failovers_short={} failovers_silent={} failovers_lost={} wall_s={:.1}",
            path.bitrate / 1000,
            path.uplink
                .map_or("none".to_owned(), |b| (b * 8 / 1000).to_string()),
            path.queue.map_or("none".to_owned(), |b| b.to_string()),
            path.downlink
                .map_or("none".to_owned(), |(b, _)| (b * 8 / 1000).to_string()),
            path.downlink
                .map_or("none".to_owned(), |(_, q)| q.to_string()),
            path.loss,
            seeds.len(),
            pct(&mut startups, 0.5),
            pct(&mut startups, 1.0),
            pct(&mut delays, 0.5),
            pct(&mut delays, 0.99),
            pct(&mut delays, 1.0),
            sent as f64 / 1e6,
            whys[0],
            whys[1],
            whys[2],
            whys[3],
            wall.elapsed().as_secs_f64(),
        );
    }
}

/// A grid that forms itself from the source's link alone.
/// With `board`, membership comes from the simulator's in-memory directory, not gossip.
fn discovery(relays: usize, peers: usize, stream: u64, board: bool) {
    let config = SimConfig {
        seed: 2,
        directory: board.then(Board::new),
        ..Default::default()
    };
    let mut grid = Grid::self_forming_with(config, 10, relays, Duration::from_secs(3));
    let source_ix = grid.source.node;
    let source = grid.source_candidate();
    for _ in 0..peers {
        grid.add_policy_peer(EngineConfig::default(), vec![source]);
    }
    let wall = Instant::now();
    grid.run(Duration::from_secs(stream));
    let wall_s = wall.elapsed().as_secs_f64();
    let continuity_min = grid
        .peers
        .iter()
        .map(|&p| {
            let s = grid.peer_stats(p);
            s.chunks_played as f64 / (s.chunks_played + s.chunks_skipped).max(1) as f64
        })
        .fold(1.0f64, f64::min);
    let delivered = grid.assert_perfect(&format!("bench-discovery-{peers}"));
    println!(
        "grid-discovery membership={} supernodes={relays} peers={peers} stream_s={stream} wall_s={wall_s:.1} \
         speedup_vs_realtime={:.2} continuity_min={continuity_min:.4} source_upload_bytes={} \
         delivered_bytes={delivered}",
        if board { "board" } else { "gossip" },
        stream as f64 / wall_s,
        grid.sim.node(source_ix).bytes_sent,
    );
}
