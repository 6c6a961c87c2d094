//! What a node does with `Punch` messages it did not ask for: a real node (portable backend,
//! real UDP on loopback) that plays a channel and relays, and two neighbours written with
//! plain quinn.
//!
//! - Its parent (the node subscribes through it) sends fifty punches at once, all naming one
//!   probe socket: the node must send the probe at least one datagram and at most eight, its
//!   limit per second, so a parent cannot aim it at anyone at any rate.
//! - A child of its (a connection it serves, not one it draws from) sends punches naming
//!   another probe socket: the node must send that probe nothing.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use gridcast::driver::{IoBackend, Node};
use gridcast::keys::{ChannelKey, NodeKey};
use gridcast::node::tls::{self, Identity};
use gridcast::node::{Candidate, ChannelMode, Engine, EngineConfig};
use gridcast::wire::{Hello, Message, PROTOCOL_VERSION, Punch, Role};

/// One-byte datagrams `probe` receives within `window`.
fn punches_at(probe: &UdpSocket, window: Duration) -> usize {
    probe
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let end = Instant::now() + window;
    let mut buf = [0u8; 64];
    let mut count = 0;
    while Instant::now() < end {
        if let Ok((1, _)) = probe.recv_from(&mut buf) {
            count += 1;
        }
    }
    count
}

fn hello(role: Role) -> Vec<u8> {
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        role,
        agent: "punch-guards-test".into(),
        serves: true,
    })
    .to_bytes()
    .to_vec()
}

fn punches(addr: SocketAddr, n: usize) -> Vec<u8> {
    let one = Message::Punch(Punch { addr }).to_bytes();
    one.iter().copied().cycle().take(one.len() * n).collect()
}

#[test]
fn only_a_parent_may_ask_for_punches_and_only_a_few_a_second() {
    let parent_key = NodeKey::from_seed(&[0x61; 32]);
    let channel = ChannelKey::from_seed(&[0x62; 32]).channel_id();
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    let probe_addr = probe.local_addr().unwrap();
    let other_probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    let other_addr = other_probe.local_addr().unwrap();

    // The parent: a quinn server proving its node key, which sends a Hello and fifty punches
    // on the control stream the node opens, then holds the connection.
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let parent = thread::spawn(move || {
        common::quic::runtime().block_on(async move {
            let config = quinn::ServerConfig::with_crypto(
                tls::server_crypto(&Identity::new(&parent_key).unwrap()).unwrap(),
            );
            let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
            ready_tx.send(endpoint.local_addr().unwrap()).unwrap();
            let conn = endpoint.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let mut buf = [0u8; 256];
            let _ = recv.read(&mut buf).await;
            send.write_all(&hello(Role::Supernode)).await.unwrap();
            send.write_all(&punches(probe_addr, 50)).await.unwrap();
            tokio::task::spawn_blocking(move || done_rx.recv_timeout(Duration::from_secs(30)))
                .await
                .unwrap()
                .ok();
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
        });
    });
    let parent_addr = ready_rx.recv().unwrap();

    let key = NodeKey::from_seed(&[0x63; 32]);
    let (events, _ev) = mpsc::channel();
    let node = Node::start(
        IoBackend::Portable,
        "127.0.0.1:0".parse().unwrap(),
        1,
        |tag| {
            Engine::new(
                &key,
                EngineConfig {
                    role: Role::Peer,
                    serve: true,
                    worker: Some(tag),
                    ..Default::default()
                },
            )
        },
        &events,
    )
    .unwrap();
    let upstream = Candidate {
        addr: parent_addr,
        node: NodeKey::from_seed(&[0x61; 32]).node_id(),
    };
    assert!(node.command(
        0,
        Box::new(move |e, now| {
            e.add_channel(channel, ChannelMode::Play);
            e.set_upstream(now, channel, vec![upstream]).unwrap();
        }),
    ));
    let from_parent = punches_at(&probe, Duration::from_secs(3));

    // A child of the node asks too.
    let from_child = common::quic::runtime().block_on(async {
        let (endpoint, conn) = common::quic::dial(node.local_addr(), key.node_id(), 0x64)
            .await
            .expect("the handshake with the node failed");
        let (mut control, _replies) = conn.open_bi().await.unwrap();
        control.write_all(&hello(Role::Peer)).await.unwrap();
        control.write_all(&punches(other_addr, 5)).await.unwrap();
        let seen = tokio::task::spawn_blocking(move || {
            punches_at(&other_probe, Duration::from_millis(1500))
        })
        .await
        .unwrap();
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        seen
    });
    let _ = done_tx.send(());
    parent.join().unwrap();
    let (stats_tx, stats_rx) = mpsc::channel();
    node.command(
        0,
        Box::new(move |e, _| {
            let _ = stats_tx.send(e.stats().punches_sent);
        }),
    );
    let sent = stats_rx.recv_timeout(Duration::from_secs(5)).ok();
    node.stop().unwrap();
    println!(
        "from the parent: {from_parent} datagrams; from a child: {from_child}; counted {sent:?}"
    );
    assert!(
        (1..=8).contains(&from_parent),
        "fifty punches from the parent made {from_parent} datagrams, not 1 to 8"
    );
    assert_eq!(from_child, 0, "a child's punches made datagrams");
    assert_eq!(sent, Some(from_parent as u64));
}
