//! A child that ends a subscription but keeps its connection: a real node (portable backend,
//! real UDP on loopback) publishing a channel, and a child written with plain quinn that
//! subscribes, reads shards, then sends `Unsubscribe`. The node must finish that
//! subscription's stream (the child reads its end) and keep the connection open. A node that
//! only walked its subscription streams when it had shards queued would leave the stream
//! open forever, since nothing more is queued for a subscription that ended.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use bytes::Bytes;

use gridcast::driver::{IoBackend, Node};
use gridcast::keys::{ChannelId, ChannelKey, NodeId, NodeKey};
use gridcast::node::{ChannelMode, Engine, EngineConfig};
use gridcast::stream::{ChunkFlags, ChunkPublisher, CodingParams};
use gridcast::wire::{
    Hello, Message, PROTOCOL_VERSION, Role, StartAt, Subscribe, SubstreamSet, Unsubscribe,
};

/// What the child saw.
#[derive(Debug)]
struct Seen {
    /// Bytes read on the subscription's stream before unsubscribing.
    before: usize,
    /// The stream ended (FIN) after the unsubscribe, within the time allowed.
    finished: bool,
    /// The connection was still open after that.
    open_after: bool,
}

fn child(addr: SocketAddr, node: NodeId, channel: ChannelId) -> Seen {
    common::quic::runtime().block_on(async move {
        let (endpoint, conn) = common::quic::dial(addr, node, 0x55)
            .await
            .expect("the handshake with the node failed");
        let (mut control, _replies) = conn.open_bi().await.unwrap();
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: Role::Peer,
            agent: "unsubscribe-test".into(),
            serves: false,
        });
        let subscribe = Message::Subscribe(Subscribe {
            sub: 1,
            channel,
            substreams: SubstreamSet::from_bits(0xffff),
            start: StartAt::Live,
        });
        control.write_all(&hello.to_bytes()).await.unwrap();
        control.write_all(&subscribe.to_bytes()).await.unwrap();
        let mut shards = tokio::time::timeout(Duration::from_secs(10), conn.accept_uni())
            .await
            .expect("no shard stream within 10 s")
            .unwrap();
        // Some shards first: the subscription is live.
        let mut before = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while before < 20_000 {
            match tokio::time::timeout(Duration::from_secs(10), shards.read(&mut buf)).await {
                Ok(Ok(Some(n))) => before += n,
                other => panic!("shard stream stopped before unsubscribing: {other:?}"),
            }
        }
        let unsubscribe = Message::Unsubscribe(Unsubscribe {
            sub: 1,
            substreams: SubstreamSet::EMPTY,
        });
        control.write_all(&unsubscribe.to_bytes()).await.unwrap();
        // The rest of what was already framed, then the end of the stream.
        let finished = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match shards.read(&mut buf).await {
                    Ok(Some(_)) => {}
                    Ok(None) => return true,
                    Err(e) => {
                        println!("shard stream ended with {e}");
                        return false;
                    }
                }
            }
        })
        .await
        .unwrap_or(false);
        let open_after = conn.close_reason().is_none();
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        Seen {
            before,
            finished,
            open_after,
        }
    })
}

#[test]
fn an_unsubscribed_stream_is_finished_and_the_connection_stays() {
    let key = NodeKey::from_seed(&[0x54; 32]);
    let channel_key = ChannelKey::from_seed(&[0x56; 32]);
    let channel = channel_key.channel_id();
    let (events, _ev) = mpsc::channel();
    let node = Node::start(
        IoBackend::Portable,
        "127.0.0.1:0".parse().unwrap(),
        1,
        |tag| {
            Engine::new(
                &key,
                EngineConfig {
                    role: Role::Source,
                    serve: true,
                    worker: Some(tag),
                    ..Default::default()
                },
            )
        },
        &events,
    )
    .unwrap();
    assert!(node.command(
        0,
        Box::new(move |e, _| e.add_channel(channel, ChannelMode::Source)),
    ));
    // A chunk every 100 ms until the child is done (at most 30 s).
    let done = Arc::new(AtomicBool::new(false));
    let feeder = {
        let done = Arc::clone(&done);
        let node = node.commander();
        thread::spawn(move || {
            let mut publisher = ChunkPublisher::new(channel_key, CodingParams::DEFAULT);
            let body = Bytes::from(vec![0x5a; 16 * 1024]);
            for seq in 0..300u64 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let coded = publisher
                    .publish(seq, seq * 100_000, ChunkFlags::RANDOM_ACCESS, &body)
                    .unwrap();
                node.command(
                    0,
                    Box::new(move |e, now| e.publish(now, channel, &coded).unwrap()),
                );
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let seen = child(node.local_addr(), key.node_id(), channel);
    done.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    println!("{seen:?}");
    assert!(seen.before >= 20_000);
    assert!(
        seen.finished,
        "the node left the ended subscription's stream open"
    );
    assert!(seen.open_after, "the node closed the connection");
}
