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
use gridcast::wire::{Message, SUB_OF_STREAM, ShardFrame, StartAt};

/// The first `count` shard frames a plain-quinn child reads after subscribing as `sub` from
/// `start`, `after` the node began publishing.
fn read_shard_frames(
    seeds: (u8, u8, u8),
    after: Duration,
    sub: u32,
    start: StartAt,
    count: usize,
) -> Vec<ShardFrame> {
    let mut source = common::quic::PublishingNode::start(seeds.0, seeds.1);
    let (addr, id, channel) = (source.node.local_addr(), source.id, source.channel);
    std::thread::sleep(after);
    let frames: Vec<ShardFrame> = common::quic::runtime().block_on(async move {
        let (endpoint, conn) = common::quic::dial(addr, id, seeds.2)
            .await
            .expect("the handshake with the node failed");
        let _control = common::quic::hello_and_subscribe_from(&conn, sub, channel, start).await;
        let mut shards = tokio::time::timeout(Duration::from_secs(10), conn.accept_uni())
            .await
            .expect("no shard stream within 10 s")
            .unwrap();
        let mut frames = Vec::new();
        let mut buf = BytesMut::new();
        let mut read = vec![0u8; 64 * 1024];
        while frames.len() < count {
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
    frames
}

/// The stream's rules: the first frame names `sub`, every later one the stream's
/// subscription, and each chunk's header comes with its first frame on the stream only.
fn assert_stream_form(frames: &[ShardFrame], sub: u32) {
    assert_eq!(frames[0].sub, sub, "the first frame names the subscription");
    assert!(frames[0].header.is_some(), "and carries its chunk's header");
    assert!(
        frames[1..].iter().all(|f| f.sub == SUB_OF_STREAM),
        "every later frame is the stream's: {:?}",
        frames.iter().map(|f| f.sub).collect::<Vec<_>>()
    );
    let mut seen = std::collections::HashSet::new();
    for f in frames {
        assert_eq!(f.header.is_some(), seen.insert(f.seq), "chunk {}", f.seq);
    }
}

#[test]
fn a_shard_stream_names_its_subscription_in_its_first_frame_only() {
    // Three chunks' worth: 16 shards each.
    let frames = read_shard_frames((0x61, 0x62, 0x63), Duration::ZERO, 7, StartAt::Live, 48);
    assert_stream_form(&frames, 7);
    let chunks: std::collections::HashSet<u64> = frames.iter().map(|f| f.seq).collect();
    assert!(chunks.len() >= 3);
}

/// A subscriber that starts behind the live edge gets the held chunks first, framed for it
/// alone around the stored shards (not the frames shared by the live fan-out), and then the
/// live ones: one stream, in the same form throughout.
#[test]
fn a_catch_up_from_held_chunks_keeps_the_stream_form_into_the_live_edge() {
    // The node publishes a chunk every 100 ms: about 6 are held when the child subscribes
    // from the first, and 10 chunks' frames reach past them into the live fan-out.
    let frames = read_shard_frames(
        (0x66, 0x67, 0x68),
        Duration::from_millis(600),
        9,
        StartAt::Seq(0),
        160,
    );
    assert_stream_form(&frames, 9);
    assert_eq!(
        frames[0].seq, 0,
        "the catch-up starts where the child asked"
    );
    let seqs: Vec<u64> = frames.iter().map(|f| f.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] <= w[1]),
        "chunks in order: {seqs:?}"
    );
    assert_eq!(seqs.last(), Some(&9), "160 frames are chunks 0 to 9");
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
