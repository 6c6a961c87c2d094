//! Real UDP on loopback: a source, two supernodes and three peers, each an engine on its own
//! portable-driver thread, in one process. The peers' output must be the source's bytes,
//! consecutive and complete.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;

use gridcast::driver::Command;
use gridcast::driver::portable::{DriverStats, PortableDriver};
use gridcast::keys::{ChannelKey, NodeId, NodeKey};
use gridcast::node::{Candidate, ChannelMode, Engine, EngineConfig, NodeEvent};
use gridcast::stream::{ChunkPublisher, Chunker, ChunkerConfig, CodingParams, InputFormat};
use gridcast::wire::{Role, StartAt, SubstreamSet};

struct Node {
    addr: SocketAddr,
    id: NodeId,
    commands: Sender<Command>,
    events: Receiver<NodeEvent>,
    thread: JoinHandle<(Engine, DriverStats)>,
}

impl Node {
    fn spawn(seed: u8, config: EngineConfig, stop: &Arc<AtomicBool>) -> Self {
        let key = NodeKey::from_seed(&[seed; 32]);
        let engine = Engine::new(&key, config).unwrap();
        let driver = PortableDriver::bind("127.0.0.1:0".parse().unwrap(), engine).unwrap();
        let addr = driver.local_addr();
        let (commands, rx) = mpsc::channel::<Command>();
        let (tx, events) = mpsc::channel();
        let stop = Arc::clone(stop);
        let thread = thread::spawn(move || driver.run(&rx, &tx, &stop).unwrap());
        Self {
            addr,
            id: key.node_id(),
            commands,
            events,
            thread,
        }
    }

    fn command(&self, f: impl FnOnce(&mut Engine, Instant) + Send + 'static) {
        self.commands.send(Box::new(f)).unwrap();
    }

    fn candidate(&self) -> Candidate {
        Candidate {
            addr: self.addr,
            node: self.id,
        }
    }
}

#[test]
fn a_stream_crosses_real_sockets_byte_exact() {
    let stop = Arc::new(AtomicBool::new(false));
    let channel_key = ChannelKey::from_seed(&[90; 32]);
    let channel = channel_key.channel_id();

    let source = Node::spawn(
        1,
        EngineConfig {
            role: Role::Source,
            serve: true,
            ..Default::default()
        },
        &stop,
    );
    source.command(move |e, _| e.add_channel(channel, ChannelMode::Source));
    let supernodes: Vec<Node> = (2..4)
        .map(|seed| {
            let sn = Node::spawn(
                seed,
                EngineConfig {
                    role: Role::Supernode,
                    serve: true,
                    ..Default::default()
                },
                &stop,
            );
            let (addr, id) = (source.addr, source.id);
            sn.command(move |e, now| {
                e.add_channel(channel, ChannelMode::Relay);
                e.subscribe(
                    now,
                    addr,
                    id,
                    channel,
                    SubstreamSet::first(16),
                    StartAt::Live,
                )
                .unwrap();
            });
            sn
        })
        .collect();
    let candidates: Vec<Candidate> = supernodes.iter().map(Node::candidate).collect();

    let mut chunker = Chunker::new(ChunkerConfig {
        format: InputFormat::Opaque,
        first_seq: 5000,
        ..Default::default()
    })
    .unwrap();
    let mut publisher = ChunkPublisher::new(channel_key, CodingParams::DEFAULT);
    let mut published: BTreeMap<u64, Bytes> = BTreeMap::new();
    let mut fed = 0u64;
    let start = Instant::now();
    let mut peers: Vec<Node> = Vec::new();
    // 500 kbit/s in 50 ms ticks for 7 s; peers join after 1 s.
    while start.elapsed() < Duration::from_secs(7) {
        if peers.is_empty() && start.elapsed() >= Duration::from_secs(1) {
            for seed in 10..13 {
                let peer = Node::spawn(seed, EngineConfig::default(), &stop);
                let candidates = candidates.clone();
                peer.command(move |e, now| {
                    e.add_channel(channel, ChannelMode::Play);
                    e.set_upstream(now, channel, candidates).unwrap();
                });
                peers.push(peer);
            }
        }
        let now = Instant::now();
        let data: Vec<u8> = (fed..fed + 3125)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect();
        fed += data.len() as u64;
        chunker.handle_input(now, &data);
        chunker.handle_timeout(now);
        while let Some(chunk) = chunker.poll_chunk() {
            let ts = (chunk.started - start).as_micros() as u64;
            let coded = publisher
                .publish(chunk.seq, ts, chunk.flags, &chunk.payload)
                .unwrap();
            published.insert(chunk.seq, chunk.payload.clone());
            source.command(move |e, now| e.publish(now, channel, &coded).unwrap());
        }
        thread::sleep(Duration::from_millis(50));
    }
    // Let the last chunks arrive, then stop everything.
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);

    let last_published = *published.keys().next_back().unwrap();
    for (i, peer) in peers.into_iter().enumerate() {
        let chunks: Vec<(u64, Bytes)> = peer
            .events
            .try_iter()
            .filter_map(|ev| match ev {
                NodeEvent::Chunk { seq, payload, .. } => Some((seq, payload.to_bytes())),
                _ => None,
            })
            .collect();
        let (engine, stats) = peer.thread.join().unwrap();
        assert!(
            chunks.len() >= 18,
            "peer {i} played {} chunks",
            chunks.len()
        );
        for w in chunks.windows(2) {
            assert_eq!(
                w[1].0,
                w[0].0 + 1,
                "peer {i} skipped or repeated at {}",
                w[0].0
            );
        }
        for (seq, bytes) in &chunks {
            assert_eq!(bytes, &published[seq], "peer {i} chunk {seq} differs");
        }
        let last = chunks.last().unwrap().0;
        assert!(
            last + 4 >= last_published,
            "peer {i} ends at {last}, source at {last_published}"
        );
        let ch = engine.channel(&channel).unwrap().stats();
        assert_eq!(ch.chunks_skipped, 0);
        println!(
            "loopback peer {i}: chunks={} startup={:?} datagrams_in={} sends={} datagrams_out={}",
            chunks.len(),
            ch.startup,
            stats.datagrams_in,
            stats.sends,
            stats.datagrams_out
        );
    }
    for node in supernodes.into_iter().chain([source]) {
        let (_, stats) = node.thread.join().unwrap();
        assert_eq!(stats.send_errors, 0);
    }
}
