//! Connection-id steering on a real io_uring supernode with four workers sharing one UDP port:
//! 200 client connections spread over the workers, every packet of each handled by the worker
//! that owns it (misrouted packets: zero), including for clients whose address changes
//! mid-stream. A control run without the steering program shows the counter does see
//! misrouted packets.
//!
//! The 200 clients are real engines on real UDP sockets, driven round-robin by one thread of
//! this test (200 driver threads would only measure the scheduler).
//!
//! Skipped with a message where io_uring is refused, unless `GRIDCAST_REQUIRE_URING=1`.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use common::clients::Clients;
use gridcast::driver::uring::{UringConfig, UringNode};
use gridcast::driver::{DriverStats, IoBackend, Node};
use gridcast::keys::{ChannelId, ChannelKey, NodeId, NodeKey};
use gridcast::node::{ChannelMode, Engine, EngineConfig, NodeEvent};
use gridcast::stream::{ChunkPublisher, Chunker, ChunkerConfig, CodingParams, InputFormat};
use gridcast::wire::{Role, StartAt, SubstreamSet};

struct Source {
    node: Node,
    id: NodeId,
    _events: Receiver<NodeEvent>,
    chunker: Chunker,
    publisher: ChunkPublisher,
    channel: ChannelId,
    fed: u64,
    start: Instant,
}

impl Source {
    fn start(channel_key: ChannelKey) -> Self {
        let key = NodeKey::from_seed(&[201; 32]);
        let (tx, events) = mpsc::channel();
        let config = EngineConfig {
            role: Role::Source,
            serve: true,
            ..Default::default()
        };
        let node = Node::start(
            IoBackend::Portable,
            "127.0.0.1:0".parse().unwrap(),
            1,
            |_| Engine::new(&key, config.clone()),
            &tx,
        )
        .unwrap();
        let channel = channel_key.channel_id();
        node.command(
            0,
            Box::new(move |e, _| e.add_channel(channel, ChannelMode::Source)),
        );
        Self {
            node,
            id: key.node_id(),
            _events: events,
            chunker: Chunker::new(ChunkerConfig {
                format: InputFormat::Opaque,
                ..Default::default()
            })
            .unwrap(),
            publisher: ChunkPublisher::new(channel_key, CodingParams::DEFAULT),
            channel,
            fed: 0,
            start: Instant::now(),
        }
    }

    /// Feeds what the stream (40 kbit/s) has produced by now.
    fn feed(&mut self) {
        let now = Instant::now();
        let due = (now - self.start).as_millis() as u64 * 5;
        if due > self.fed {
            let data: Vec<u8> = (self.fed..due).map(|i| (i * 31) as u8).collect();
            self.fed = due;
            self.chunker.handle_input(now, &data);
        }
        self.chunker.handle_timeout(now);
        while let Some(chunk) = self.chunker.poll_chunk() {
            let coded = self
                .publisher
                .publish(chunk.seq, 0, chunk.flags, &chunk.payload)
                .unwrap();
            let channel = self.channel;
            self.node.command(
                0,
                Box::new(move |e, now| e.publish(now, channel, &coded).unwrap()),
            );
        }
    }
}

fn uring_or_skip() -> bool {
    match gridcast::driver::choose(IoBackend::Uring) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("GRIDCAST_REQUIRE_URING").as_deref() != Ok("1"),
                "GRIDCAST_REQUIRE_URING=1 but io_uring is unavailable: {e}"
            );
            println!("skipped: {e}");
            false
        }
    }
}

/// A supernode with `workers` io_uring workers relaying `channel` from `source`.
fn relay(source: &Source, workers: usize, steering: bool) -> (UringNode, NodeId) {
    let key = NodeKey::from_seed(&[202; 32]);
    let (tx, _events) = mpsc::channel();
    let config = UringConfig {
        workers,
        steering,
        ..Default::default()
    };
    let node = UringNode::start(
        "127.0.0.1:0".parse().unwrap(),
        &config,
        |tag| {
            Engine::new(
                &key,
                EngineConfig {
                    role: Role::Supernode,
                    serve: true,
                    worker: Some(tag),
                    export_shards: true,
                    ..Default::default()
                },
            )
        },
        &tx,
    )
    .unwrap();
    let channel = source.channel;
    for w in 0..workers {
        node.command(
            w,
            Box::new(move |e, _| e.add_channel(channel, ChannelMode::Relay)),
        );
    }
    let (addr, id) = (source.node.local_addr(), source.id);
    node.command(
        0,
        Box::new(move |e, now| {
            e.subscribe(
                now,
                addr,
                id,
                channel,
                SubstreamSet::first(16),
                StartAt::Live,
            )
            .unwrap();
        }),
    );
    (node, key.node_id())
}

fn run_for(source: &mut Source, clients: &mut Clients, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        source.feed();
        if !clients.turn() {
            thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn two_hundred_connections_each_stay_on_their_worker() {
    if !uring_or_skip() {
        return;
    }
    let workers = 4;
    let mut source = Source::start(ChannelKey::from_seed(&[200; 32]));
    let (node, relay_id) = relay(&source, workers, true);
    // Let the relay join the source before the audience arrives.
    let mut nobody = Clients::new(0, node.local_addr(), relay_id, source.channel, 8);
    run_for(&mut source, &mut nobody, Duration::from_millis(600));
    let mut clients = Clients::new(200, node.local_addr(), relay_id, source.channel, 8);
    run_for(&mut source, &mut clients, Duration::from_secs(3));
    // A tenth of the clients change address, as behind a NAT that rebinds.
    for i in (0..200).step_by(10) {
        clients.rebind(i);
    }
    run_for(&mut source, &mut clients, Duration::from_secs(3));

    let results: Vec<(Engine, DriverStats)> = node.stop().unwrap();
    let mut total = 0;
    for (w, (engine, stats)) in results.iter().enumerate() {
        let es = engine.stats();
        println!(
            "worker {w}: accepted={} connections={} datagrams_in={} misrouted={} shards_out={} imported={}",
            es.accepted,
            engine.connection_count(),
            stats.datagrams_in,
            stats.misrouted,
            es.shards_out,
            es.shards_imported
        );
        assert_eq!(
            stats.misrouted, 0,
            "worker {w} got another worker's packets"
        );
        assert!(
            es.accepted >= 20,
            "worker {w} accepted only {} of 200 connections",
            es.accepted
        );
        total += es.accepted;
    }
    assert_eq!(total, 200);
    for (i, c) in clients.clients.iter().enumerate() {
        assert!(
            c.played.len() >= 15,
            "client {i} played {} chunks",
            c.played.len()
        );
        for w in c.played.windows(2) {
            assert_eq!(w[1], w[0] + 1, "client {i} skipped or repeated at {}", w[0]);
        }
        if let Some(at) = c.rebound_at {
            assert!(
                c.played.len() >= at + 8,
                "client {i} played {} chunks after its address changed",
                c.played.len() - at
            );
        }
    }
    source.node.stop().unwrap();
}

#[test]
fn without_the_steering_program_packets_reach_the_wrong_worker() {
    if !uring_or_skip() {
        return;
    }
    let mut source = Source::start(ChannelKey::from_seed(&[210; 32]));
    let (node, relay_id) = relay(&source, 4, false);
    let mut clients = Clients::new(40, node.local_addr(), relay_id, source.channel, 8);
    run_for(&mut source, &mut clients, Duration::from_secs(2));
    let results = node.stop().unwrap();
    let misrouted: u64 = results.iter().map(|(_, s)| s.misrouted).sum();
    println!("misrouted without steering: {misrouted}");
    assert!(misrouted > 0);
    source.node.stop().unwrap();
}

#[test]
fn a_second_node_cannot_join_a_served_port() {
    if !uring_or_skip() {
        return;
    }
    let source = Source::start(ChannelKey::from_seed(&[220; 32]));
    let (node, _) = relay(&source, 2, true);
    let (tx, _events) = mpsc::channel();
    let key = NodeKey::from_seed(&[221; 32]);
    let start = |at: std::net::SocketAddr| {
        UringNode::start(
            at,
            &UringConfig {
                workers: 2,
                ..Default::default()
            },
            |tag| {
                Engine::new(
                    &key,
                    EngineConfig {
                        serve: true,
                        worker: Some(tag),
                        ..Default::default()
                    },
                )
            },
            &tx,
        )
    };
    let err = start(node.local_addr()).unwrap_err().to_string();
    assert!(
        err.contains("another gridcast node already serves UDP"),
        "{err}"
    );
    // Another address of the host on the same port is a group of its own (its datagrams go
    // to its sockets alone), so a node serves there: one relay per address of a server.
    let beside = std::net::SocketAddr::new([127, 0, 0, 2].into(), node.local_addr().port());
    let other = start(beside).unwrap();
    assert_eq!(other.local_addr(), beside);
    // A node on every address may join the port too: the kernel gives the exact addresses'
    // datagrams to the nodes bound there. But a node on one more address must not then
    // take that address's connections from it.
    let port = node.local_addr().port();
    let every = start(std::net::SocketAddr::new([0, 0, 0, 0].into(), port)).unwrap();
    let err = start(std::net::SocketAddr::new([127, 0, 0, 3].into(), port))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("already serves UDP 0.0.0.0:{port}")),
        "{err}"
    );
    every.stop().unwrap();
    other.stop().unwrap();
    node.stop().unwrap();
    source.node.stop().unwrap();
}
