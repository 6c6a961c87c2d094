//! Hostile neighbours of real processes. ffmpeg feeds a `broadcast`; a real `relay` carries
//! it; two real `play`s name two parents: a hostile relay first, the real one second. The
//! hostile relay is a gridcast engine in this process, on its own socket and driver, drawing
//! the channel from the source like any relay, but flipping a byte in every shard and chunk
//! header it forwards (forged headers and shards). Meanwhile a hostile child dials the real
//! relay with a valid node identity and sends a frame that does not decode on its control
//! stream, then comes back with the same identity.
//!
//! Each player must close the hostile parent, count it, and still keep a byte-exact copy that
//! decodes cleanly: nothing forged reaches a player. The real relay must close the hostile
//! child with the protocol-error code, refuse it when it returns (its handshake proves the
//! same node id), and count both.
//!
//! Skipped (with a message) where ffmpeg is missing, unless `GRIDCAST_REQUIRE_FFMPEG=1` (CI).

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use common::http::{free_tcp_port, get, sample};
use common::procs::*;

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::Duration;

use gridcast::app::link::ChannelLink;
use gridcast::driver::{IoBackend, Node};
use gridcast::keys::{NodeId, NodeKey};
use gridcast::node::engine::close_code;
use gridcast::node::{ChannelMode, Engine, EngineConfig};
use gridcast::wire::{Role, StartAt, SubstreamSet};

const STREAM_SECS: u64 = 16;

/// A relay in this process that corrupts what it forwards.
fn hostile_relay(source: &ChannelLink) -> (Node, NodeId) {
    let key = NodeKey::from_seed(&[0x48; 32]);
    let (tx, _events) = mpsc::channel();
    let node = Node::start(
        IoBackend::Auto,
        "127.0.0.1:0".parse().unwrap(),
        1,
        |tag| {
            Engine::new(
                &key,
                EngineConfig {
                    role: Role::Supernode,
                    serve: true,
                    worker: Some(tag),
                    corrupt_outgoing_shards: true,
                    ..Default::default()
                },
            )
        },
        &tx,
    )
    .unwrap();
    let channel = source.channel;
    let addr: SocketAddr = source.nodes[0].host.parse().unwrap();
    let id = source.nodes[0].node;
    node.command(
        0,
        Box::new(move |e, now| {
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
        }),
    );
    (node, key.node_id())
}

/// How the relay at `addr` (node `id`) ended a connection from a child with node key
/// `seed`: the application close code, after sending `garbage` on the control stream if
/// given. `None` if the connection failed some other way or stayed open for 10 s.
fn child_session(addr: SocketAddr, id: NodeId, seed: u8, garbage: Option<&[u8]>) -> Option<u64> {
    common::quic::runtime().block_on(async move {
        let (_endpoint, conn) = common::quic::dial(addr, id, seed).await?;
        if let Some(bytes) = garbage {
            let (mut send, _recv) = conn.open_bi().await.ok()?;
            send.write_all(bytes).await.ok()?;
        }
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .ok()?;
        match closed {
            quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
            other => {
                println!("hostile child: closed otherwise: {other}");
                None
            }
        }
    })
}

#[test]
fn forged_shards_and_malformed_frames_are_closed_refused_and_never_played() {
    if !have_ffmpeg() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let live = Live::on_loopback(&key, STREAM_SECS);
    let source: ChannelLink = live.link.parse().unwrap();
    let relay_admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let (relay, relay_link) = spawn_with_link(gridcast(&[
        "relay",
        "--join",
        &live.link,
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--admin",
        &relay_admin.to_string(),
    ]));
    let good: ChannelLink = relay_link.parse().unwrap();
    let (hostile, hostile_id) = hostile_relay(&source);
    // The hostile parent first: a player meets it before the good one.
    let play_link = format!(
        "{}@{}/{hostile_id},{}",
        live.link.split_once('@').unwrap().0,
        hostile.local_addr(),
        nodes_of(&relay_link)
    );
    let admins: Vec<SocketAddr> = (0..2)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_tcp_port())))
        .collect();
    let outputs: Vec<_> = (0..2)
        .map(|i| dir.path().join(format!("p{i}.ts")))
        .collect();
    let mut children = Reaper(vec![relay]);
    for (out, admin) in outputs.iter().zip(&admins) {
        children.0.push(
            gridcast(&[
                "play",
                &play_link,
                "--output",
                out.to_str().unwrap(),
                "--admin",
                &admin.to_string(),
            ])
            .spawn()
            .unwrap(),
        );
    }
    std::thread::sleep(Duration::from_secs(3));

    // The hostile child: a frame of a type no version defines, then back with the same id.
    let relay_addr: SocketAddr = good.nodes[0].host.parse().unwrap();
    let relay_id = good.nodes[0].node;
    let first = child_session(relay_addr, relay_id, 0x77, Some(&[0x3f, 0x01, 0x00]));
    // The worker that caught it tells its siblings through the relay's event loop.
    std::thread::sleep(Duration::from_millis(500));
    let again = child_session(relay_addr, relay_id, 0x77, None);
    println!("hostile child: first close {first:?}, back again {again:?}");
    assert_eq!(first, Some(u64::from(close_code::PROTOCOL)));
    assert_eq!(again, Some(u64::from(close_code::BAD_DATA)));

    // Mid-stream, while the players run.
    let mut bad_data = Vec::new();
    for admin in &admins {
        let (_, scrape) = get(*admin, "/metrics").expect("a player's admin answers");
        bad_data.push(sample(
            &scrape,
            "gridcast_misbehaving_closed_total{reason=\"bad_data\"}",
        ));
    }
    let (_, scrape) = get(relay_admin, "/metrics").expect("the relay's admin answers");
    let protocol = sample(
        &scrape,
        "gridcast_misbehaving_closed_total{reason=\"protocol_error\"}",
    );
    let refused = sample(
        &scrape,
        "gridcast_quic_connections_refused_total{reason=\"misbehaved\"}",
    );
    println!(
        "hostile players_bad_data_closed={bad_data:?} relay_protocol_error_closed={protocol} \
         relay_refused_misbehaved={refused}"
    );
    let (reference, _) = live.finish_at();
    std::thread::sleep(Duration::from_secs(3));
    for p in &children.0[1..] {
        signal(p, "-TERM");
    }
    for p in &mut children.0[1..] {
        assert!(p.wait().unwrap().success(), "play failed");
    }
    drop(hostile);
    for (i, n) in bad_data.iter().enumerate() {
        assert!(*n >= 1.0, "player {i} never caught the hostile parent");
    }
    assert!(protocol >= 1.0 && refused >= 1.0);
    for out in &outputs {
        assert_tail(out, &reference, 0.6);
    }
}
