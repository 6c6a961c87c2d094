//! The shard stream as a foreign child reads it: a real node (portable backend, real UDP on
//! loopback) publishing a channel, and a child written with plain quinn that subscribes and
//! decodes the shard stream itself. The stream's first frame names the subscription; every
//! later frame says `SUB_OF_STREAM`, the form in which one frame of a shard serves every
//! subscriber. A subscription numbered 0, which would make that form ambiguous, closes the
//! connection as a protocol error.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

mod common;

use std::time::Duration;

use bytes::BytesMut;

use gridcast::node::engine::close_code;
use gridcast::wire::{Message, SUB_OF_STREAM, ShardFrame};

#[test]
fn a_shard_stream_names_its_subscription_in_its_first_frame_only() {
    let mut source = common::quic::PublishingNode::start(0x61, 0x62);
    let (addr, id, channel) = (source.node.local_addr(), source.id, source.channel);
    let frames: Vec<ShardFrame> = common::quic::runtime().block_on(async move {
        let (endpoint, conn) = common::quic::dial(addr, id, 0x63)
            .await
            .expect("the handshake with the node failed");
        let _control = common::quic::hello_and_subscribe(&conn, 7, channel).await;
        let mut shards = tokio::time::timeout(Duration::from_secs(10), conn.accept_uni())
            .await
            .expect("no shard stream within 10 s")
            .unwrap();
        // Three chunks' worth: 16 shards each.
        let mut frames = Vec::new();
        let mut buf = BytesMut::new();
        let mut read = vec![0u8; 64 * 1024];
        while frames.len() < 48 {
            match tokio::time::timeout(Duration::from_secs(10), shards.read(&mut read)).await {
                Ok(Ok(Some(n))) => buf.extend_from_slice(&read[..n]),
                other => panic!("the shard stream stopped: {other:?}"),
            }
            while let Some(msg) = Message::decode_frame(&mut buf).unwrap() {
                match msg {
                    Message::Shard(frame) => frames.push(frame),
                    other => panic!("not a shard frame on a shard stream: {other:?}"),
                }
            }
        }
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        frames
    });
    source.stop();
    assert_eq!(frames[0].sub, 7, "the first frame names the subscription");
    assert!(frames[0].header.is_some(), "and carries its chunk's header");
    assert!(
        frames[1..].iter().all(|f| f.sub == SUB_OF_STREAM),
        "every later frame is the stream's: {:?}",
        frames.iter().map(|f| f.sub).collect::<Vec<_>>()
    );
    // Each chunk's header comes with its first frame on the stream, and only then.
    let mut seen = std::collections::HashSet::new();
    for f in &frames {
        assert_eq!(f.header.is_some(), seen.insert(f.seq), "chunk {}", f.seq);
    }
    assert!(seen.len() >= 3);
}

#[test]
fn a_subscription_numbered_zero_closes_the_connection_as_a_protocol_error() {
    let mut source = common::quic::PublishingNode::start(0x64, 0x65);
    let (addr, id, channel) = (source.node.local_addr(), source.id, source.channel);
    let code = common::quic::runtime().block_on(async move {
        let (_endpoint, conn) = common::quic::dial(addr, id, 0x66)
            .await
            .expect("the handshake with the node failed");
        let _control = common::quic::hello_and_subscribe(&conn, 0, channel).await;
        match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => Some(c.error_code.into_inner()),
            other => {
                println!("closed otherwise, or not within 10 s: {other:?}");
                None
            }
        }
    });
    source.stop();
    assert_eq!(code, Some(u64::from(close_code::PROTOCOL)));
}
