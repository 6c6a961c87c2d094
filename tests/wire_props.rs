//! Properties of the wire codec: every message round-trips with the advertised `encoded_len`,
//! incomplete frames are waited for, and arbitrary bytes never panic a decoder.

#![allow(clippy::unwrap_used)] // test helpers: a panic here is a test failure, which is what we want

use std::net::{IpAddr, SocketAddr};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use gridcast::keys::{ChannelId, ChannelKey, NodeId};
use gridcast::stream::header::SignedChunkHeader;
use gridcast::stream::{ChunkFlags, ChunkHeader, CodingParams};
use gridcast::wire::*;

fn channel() -> impl Strategy<Value = ChannelId> {
    any::<[u8; 32]>().prop_map(ChannelId::from_bytes)
}

fn substreams() -> impl Strategy<Value = SubstreamSet> {
    any::<u128>().prop_map(SubstreamSet::from_bits)
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<u16>(),
        prop_oneof![Just(Role::Source), Just(Role::Supernode), Just(Role::Peer)],
        "\\PC{0,16}",
        any::<bool>(),
    )
        .prop_filter("agent fits", |(_, _, a, _)| a.len() <= MAX_AGENT_LEN)
        .prop_map(|(version, role, agent, serves)| Hello {
            version,
            role,
            agent,
            serves,
        })
}

fn subscribe() -> impl Strategy<Value = Subscribe> {
    (
        any::<u32>(),
        channel(),
        substreams(),
        prop_oneof![Just(StartAt::Live), any::<u64>().prop_map(StartAt::Seq)],
    )
        .prop_map(|(sub, channel, substreams, start)| Subscribe {
            sub,
            channel,
            substreams,
            start,
        })
}

fn stream_header() -> impl Strategy<Value = SignedStreamHeader> {
    (
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 0..2_000),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
    )
        .prop_map(|(serial, data, s1, s2)| {
            let mut signature = [0u8; 64];
            signature[..32].copy_from_slice(&s1);
            signature[32..].copy_from_slice(&s2);
            SignedStreamHeader {
                serial,
                data: Bytes::from(data),
                signature,
            }
        })
}

fn params() -> impl Strategy<Value = CodingParams> {
    (1u8..=64, 1u8..=64).prop_map(|(k, r)| CodingParams::new(k, r).unwrap())
}

fn channel_info() -> impl Strategy<Value = ChannelInfo> {
    (
        channel(),
        params(),
        any::<u32>(),
        any::<Option<u64>>(),
        prop::option::of(stream_header()),
    )
        .prop_map(
            |(channel, params, chunk_ms, latest, stream_header)| ChannelInfo {
                channel,
                params,
                chunk_ms,
                latest,
                stream_header,
            },
        )
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
    ]
}

fn candidate() -> impl Strategy<Value = ParentCandidate> {
    (
        any::<[u8; 32]>(),
        prop::collection::vec(addr(), 1..=MAX_ADDRS_PER_PARENT),
        0u16..=1000,
    )
        .prop_map(|(node, addrs, load_permille)| ParentCandidate {
            node: NodeId::from_bytes(node),
            addrs,
            load_permille,
        })
}

fn shard_frame() -> impl Strategy<Value = ShardFrame> {
    (
        any::<u32>(),
        any::<u64>(),
        params(),
        any::<prop::sample::Index>(),
        any::<bool>(),
        1u32..100_000,
        0u8..8,
        prop::collection::vec(any::<u8>(), 1..3_000),
    )
        .prop_map(
            |(sub, seq, params, index, with_header, payload_len, flags, shard)| {
                let index = index.index(params.total()) as u8;
                let header = with_header.then(|| SignedChunkHeader {
                    header: ChunkHeader {
                        seq,
                        timestamp_us: seq.rotate_left(7),
                        payload_len,
                        params,
                        flags: ChunkFlags::from_bits(flags).unwrap(),
                        hashes: (0..params.total())
                            .map(|i| [i as u8; gridcast::stream::SHARD_HASH_LEN])
                            .collect(),
                    },
                    signature: [9; 64],
                });
                ShardFrame {
                    sub,
                    seq,
                    index,
                    header,
                    shard: Bytes::from(shard),
                }
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        hello().prop_map(Message::Hello),
        subscribe().prop_map(Message::Subscribe),
        (any::<u32>(), substreams())
            .prop_map(|(sub, substreams)| Message::Unsubscribe(Unsubscribe { sub, substreams })),
        channel_info().prop_map(Message::ChannelInfo),
        (channel(), any::<u64>(), any::<u64>()).prop_map(|(channel, a, b)| Message::Have(Have {
            channel,
            oldest: a.min(b),
            latest: a.max(b),
        })),
        (any::<u32>(), channel(), 1u8..=MAX_PARENTS as u8).prop_map(|(query, channel, max)| {
            Message::ParentQuery(ParentQuery {
                query,
                channel,
                max,
            })
        }),
        (
            any::<u32>(),
            prop::collection::vec(candidate(), 0..=MAX_PARENTS)
        )
            .prop_map(|(query, parents)| Message::ParentAnswer(ParentAnswer { query, parents })),
        (
            prop_oneof![
                Just(GoAwayReason::Shutdown),
                Just(GoAwayReason::Overloaded),
                Just(GoAwayReason::ChannelGone)
            ],
            prop::collection::vec(candidate(), 0..8)
        )
            .prop_map(|(reason, alternatives)| Message::GoAway(GoAway {
                reason,
                alternatives
            })),
        (
            any::<u32>(),
            channel(),
            prop_oneof![
                Just(RefuseReason::NotCarried),
                Just(RefuseReason::Full),
                Just(RefuseReason::Draining)
            ],
            prop::collection::vec(candidate(), 0..8)
        )
            .prop_map(
                |(sub, channel, reason, alternatives)| Message::Refused(Refused {
                    sub,
                    channel,
                    reason,
                    alternatives
                })
            ),
        addr().prop_map(|addr| Message::Punch(Punch { addr })),
        (
            any::<u32>(),
            any::<u64>(),
            prop::collection::vec(any::<char>(), 0..80),
            any::<[u8; 32]>()
        )
            .prop_map(|(serial, from_seq, text, seed)| {
                let key = ChannelKey::from_seed(&seed);
                let text: String = text.into_iter().collect();
                Message::StreamTitle(StreamTitle::sign(&key, serial, from_seq, &text))
            }),
        shard_frame().prop_map(Message::Shard),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips_with_its_encoded_len(msg in message()) {
        let bytes = msg.to_bytes();
        prop_assert_eq!(bytes.len(), msg.encoded_len());
        let mut buf = BytesMut::from(&bytes[..]);
        let decoded = Message::decode_frame(&mut buf).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decoded, msg);
    }

    #[test]
    fn an_incomplete_frame_is_waited_for(msg in message(), cut in any::<prop::sample::Index>()) {
        let bytes = msg.to_bytes();
        let cut = cut.index(bytes.len());
        let mut buf = BytesMut::from(&bytes[..cut]);
        prop_assert_eq!(Message::decode_frame(&mut buf), Ok(None));
        prop_assert_eq!(buf.len(), cut, "a partial frame must not be consumed");
        buf.extend_from_slice(&bytes[cut..]);
        prop_assert_eq!(Message::decode_frame(&mut buf).unwrap(), Some(msg));
    }

    #[test]
    fn frames_back_to_back_decode_in_order(msgs in prop::collection::vec(message(), 1..6)) {
        let mut buf = BytesMut::new();
        for m in &msgs {
            m.encode(&mut buf);
        }
        let mut out = Vec::new();
        while let Some(m) = Message::decode_frame(&mut buf).unwrap() {
            out.push(m);
        }
        prop_assert_eq!(out, msgs);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoder(data in prop::collection::vec(any::<u8>(), 0..4_096)) {
        let _ = decode_all_frames(&data);
    }

    #[test]
    fn arbitrary_bodies_never_panic_any_message_decoder(
        kind in prop_oneof![1u64..=0x0a, Just(0x10u64)],
        data in prop::collection::vec(any::<u8>(), 0..4_096),
    ) {
        // Random bodies behind a valid type reach every field decoder.
        let _ = Message::decode_body(kind, Bytes::from(data.clone()));
        let _ = SignedChunkHeader::decode(&mut Bytes::from(data));
    }

    #[test]
    fn a_mutated_frame_never_panics(msg in message(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = msg.to_bytes().to_vec();
        let at = at.index(bytes.len());
        bytes[at] = byte;
        let _ = decode_all_frames(&bytes);
    }

    #[test]
    fn stream_headers_verify_only_under_their_channel(data in prop::collection::vec(any::<u8>(), 0..4_096), serial in any::<u32>()) {
        let key = ChannelKey::from_seed(&[4; 32]);
        let h = SignedStreamHeader::sign(&key, serial, Bytes::from(data));
        prop_assert!(h.signature_valid(&key.channel_id()));
        prop_assert!(!h.signature_valid(&ChannelKey::from_seed(&[5; 32]).channel_id()));
        let mut tampered = h;
        tampered.serial = serial.wrapping_add(1);
        prop_assert!(!tampered.signature_valid(&key.channel_id()));
    }
}

#[test]
fn oversized_declared_lengths_are_refused_before_buffering() {
    // A Hello frame claiming a 1 GiB body: refused from four bytes, nothing buffered.
    let mut buf = BytesMut::new();
    put_varint(&mut buf, 0x01);
    put_varint(&mut buf, 1 << 30);
    let err = Message::decode_frame(&mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::TooLong {
                what: "frame length",
                ..
            }
        ),
        "{err}"
    );
    // A shard frame may be large, but not beyond the shard limit.
    let mut buf = BytesMut::new();
    put_varint(&mut buf, 0x10);
    put_varint(&mut buf, (MAX_SHARD_BODY + 1) as u64);
    assert!(Message::decode_frame(&mut buf).is_err());
    // Unknown types are named.
    let mut buf = BytesMut::from(&[0x3f, 0x00][..]);
    assert_eq!(
        Message::decode_frame(&mut buf),
        Err(DecodeError::UnknownMessage(0x3f))
    );
}

#[test]
fn limits_inside_bodies_are_enforced() {
    // An agent string longer than the limit.
    let hello = Hello {
        version: 1,
        role: Role::Peer,
        agent: "x".repeat(MAX_AGENT_LEN + 1),
        serves: false,
    };
    let frame = Message::Hello(hello).to_bytes();
    let err = Message::decode_frame(&mut BytesMut::from(&frame[..])).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::TooLong {
                what: "hello.agent",
                ..
            }
        ),
        "{err}"
    );
    // Trailing bytes after a message.
    let mut body = BytesMut::new();
    Unsubscribe {
        sub: 1,
        substreams: SubstreamSet::EMPTY,
    }
    .encode(&mut body);
    body.extend_from_slice(b"junk");
    assert!(matches!(
        Message::decode_body(0x03, body.freeze()),
        Err(DecodeError::Trailing {
            what: "unsubscribe",
            extra: 4
        })
    ));
}
