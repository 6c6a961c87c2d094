//! Grid scenarios in the deterministic simulator: real engines, real QUIC, virtual time.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use gridcast::keys::{ChannelId, ChannelKey};
use gridcast::node::{ChannelMode, EngineConfig, NodeEvent};
use gridcast::sim::{NodeIx, Sim, SimConfig};
use gridcast::stream::{ChunkPublisher, Chunker, ChunkerConfig, CodingParams, InputFormat};
use gridcast::wire::{Role, StartAt, SubstreamSet};

/// A live source: a chunker fed at a constant bitrate, a publisher, and a record of every chunk.
struct Broadcast {
    node: NodeIx,
    channel: ChannelId,
    chunker: Chunker,
    publisher: ChunkPublisher,
    /// What the source published, by sequence.
    published: BTreeMap<u64, Bytes>,
    fed: u64,
    bytes_per_tick: usize,
}

impl Broadcast {
    const TICK: Duration = Duration::from_millis(50);

    fn new(sim: &mut Sim, bitrate_bps: usize) -> Self {
        let node = sim
            .add_node(EngineConfig {
                role: Role::Source,
                serve: true,
                ..Default::default()
            })
            .unwrap();
        let key = ChannelKey::from_seed(&[77; 32]);
        let channel = key.channel_id();
        sim.node_mut(node)
            .engine
            .add_channel(channel, ChannelMode::Source);
        Self {
            node,
            channel,
            chunker: Chunker::new(ChunkerConfig {
                format: InputFormat::Opaque,
                first_seq: 1000,
                ..Default::default()
            })
            .unwrap(),
            publisher: ChunkPublisher::new(key, CodingParams::DEFAULT),
            published: BTreeMap::new(),
            fed: 0,
            bytes_per_tick: bitrate_bps / 8 / 20,
        }
    }

    /// Deterministic stream bytes (position-dependent, so any misplaced byte shows).
    fn byte_at(i: u64) -> u8 {
        (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
    }

    /// Runs the grid for `d`, feeding the source every tick.
    fn run(&mut self, sim: &mut Sim, d: Duration) {
        let end = sim.now() + d;
        while sim.now() < end {
            let now = sim.now();
            let data: Vec<u8> = (self.fed..self.fed + self.bytes_per_tick as u64)
                .map(Self::byte_at)
                .collect();
            self.fed += data.len() as u64;
            self.chunker.handle_input(now, &data);
            self.chunker.handle_timeout(now);
            while let Some(chunk) = self.chunker.poll_chunk() {
                let coded = self
                    .publisher
                    .publish(chunk.seq, 0, chunk.flags, &chunk.payload)
                    .unwrap();
                self.published.insert(chunk.seq, chunk.payload.clone());
                sim.node_mut(self.node)
                    .engine
                    .publish(now, self.channel, &coded)
                    .unwrap();
            }
            sim.run_for(Self::TICK).unwrap();
        }
    }
}

/// What a peer played.
#[derive(Default)]
struct Played {
    chunks: Vec<(u64, Bytes, Instant)>,
}

fn collect(sim: &mut Sim, peer: NodeIx, played: &mut Played) {
    for (at, ev) in sim.take_events(peer) {
        if let NodeEvent::Chunk { seq, payload, .. } = ev {
            played.chunks.push((seq, payload.to_bytes(), at));
        }
    }
}

#[test]
fn a_killed_supernode_costs_no_peer_a_single_chunk() {
    let t0 = Instant::now();
    let mut sim = Sim::new(t0, SimConfig::default());
    let mut source = Broadcast::new(&mut sim, 500_000);
    let src_addr = sim.node(source.node).addr;
    let src_id = sim.node(source.node).id;
    let all = SubstreamSet::first(16);

    let supernodes: Vec<NodeIx> = (0..3)
        .map(|_| {
            let sn = sim
                .add_node(EngineConfig {
                    role: Role::Supernode,
                    serve: true,
                    ..Default::default()
                })
                .unwrap();
            let now = sim.now();
            let engine = &mut sim.node_mut(sn).engine;
            engine.add_channel(source.channel, ChannelMode::Relay);
            engine
                .subscribe(now, src_addr, src_id, source.channel, all, StartAt::Live)
                .unwrap();
            sn
        })
        .collect();

    // Let the supernodes fill up, then the peers join.
    source.run(&mut sim, Duration::from_secs(2));
    let peers: Vec<NodeIx> = (0..6)
        .map(|_| {
            let p = sim.add_node(EngineConfig::default()).unwrap();
            let now = sim.now();
            sim.node_mut(p)
                .engine
                .add_channel(source.channel, ChannelMode::Play);
            for (i, &sn) in supernodes.iter().enumerate() {
                let (addr, id) = (sim.node(sn).addr, sim.node(sn).id);
                let mut set = SubstreamSet::EMPTY;
                for s in 4 * i..4 * i + 4 {
                    set.insert(s);
                }
                sim.node_mut(p)
                    .engine
                    .subscribe(now, addr, id, source.channel, set, StartAt::Live)
                    .unwrap();
            }
            p
        })
        .collect();
    let mut played: Vec<Played> = peers.iter().map(|_| Played::default()).collect();

    source.run(&mut sim, Duration::from_secs(10));
    // Kill one parent of every peer, without a goodbye.
    sim.kill(supernodes[0]);
    source.run(&mut sim, Duration::from_secs(10));
    for (i, &p) in peers.iter().enumerate() {
        collect(&mut sim, p, &mut played[i]);
    }

    let last_published = *source.published.keys().next_back().unwrap();
    for (i, p) in played.iter().enumerate() {
        let seqs: Vec<u64> = p.chunks.iter().map(|c| c.0).collect();
        assert!(!seqs.is_empty(), "peer {i} played nothing");
        // Consecutive: no skip, no repeat.
        for w in seqs.windows(2) {
            assert_eq!(w[1], w[0] + 1, "peer {i} skipped or repeated at {}", w[0]);
        }
        // Caught up to the live edge (within a second of chunks).
        let last = *seqs.last().unwrap();
        assert!(
            last + 4 >= last_published,
            "peer {i} ends at {last}, source at {last_published}"
        );
        // Byte-exact.
        for (seq, bytes, _) in &p.chunks {
            assert_eq!(
                bytes, &source.published[seq],
                "peer {i} chunk {seq} differs"
            );
        }
        let stats = sim
            .node(peers[i])
            .engine
            .channel(&source.channel)
            .unwrap()
            .stats();
        assert_eq!(stats.chunks_skipped, 0, "peer {i}");
        assert_eq!(stats.verify_failures, 0, "peer {i}");
        println!(
            "peer {i}: played {} chunks {}..={} skipped 0, first byte at {:?}",
            seqs.len(),
            seqs[0],
            last,
            p.chunks[0].2 - t0
        );
    }
    let src_up = sim.node(source.node).bytes_sent;
    let delivered: u64 = played
        .iter()
        .flat_map(|p| &p.chunks)
        .map(|c| c.1.len() as u64)
        .sum();
    println!(
        "source upload {src_up} bytes, delivered {delivered} bytes to {} peers, sim {:?}",
        peers.len(),
        sim.stats()
    );
}
