//! A child that ends a subscription but keeps its connection: a real node (portable backend,
//! real UDP on loopback) publishing a channel, and a child written with plain quinn that
//! subscribes, reads shards, then sends `Unsubscribe`. The node must finish that
//! subscription's stream (the child reads its end) and keep the connection open. A node that
//! only walked its subscription streams when it had shards queued would leave the stream
//! open forever, since nothing more is queued for a subscription that ended.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use gridcast::keys::{ChannelId, NodeId};
use gridcast::wire::{Message, SubstreamSet, Unsubscribe};

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
        let (mut control, _replies) = common::quic::hello_and_subscribe(&conn, 1, channel).await;
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
    let mut source = common::quic::PublishingNode::start(0x54, 0x56);
    let seen = child(source.node.local_addr(), source.id, source.channel);
    source.stop();
    println!("{seen:?}");
    assert!(seen.before >= 20_000);
    assert!(
        seen.finished,
        "the node left the ended subscription's stream open"
    );
    assert!(seen.open_after, "the node closed the connection");
}
