//! Properties of the stream model: chunking is lossless, any K of N shards rebuild the exact
//! chunk, regeneration reproduces the source's shards, and nothing corrupted or forged is
//! accepted.

#![allow(clippy::unwrap_used)] // test helpers: a panic here is a test failure, which is what we want
#![allow(clippy::disallowed_methods)] // tests take one base Instant and move time by hand

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::subsequence;

use gridcast::keys::ChannelKey;
use gridcast::stream::header::SignedChunkHeader;
use gridcast::stream::{
    ChunkFlags, ChunkPublisher, Chunker, ChunkerConfig, CodingParams, HeaderVerifier, InputFormat,
    PartialChunk, ShardCoder, ShardError,
};

fn params() -> impl Strategy<Value = CodingParams> {
    (1u8..=64, 1u8..=64).prop_map(|(k, r)| CodingParams::new(k, r).unwrap())
}

/// Parameters, a payload, and which K shard indices survive.
fn coded_case() -> impl Strategy<Value = (CodingParams, Vec<u8>, Vec<usize>)> {
    (params(), prop::collection::vec(any::<u8>(), 1..40_000)).prop_flat_map(|(p, payload)| {
        let kept = subsequence((0..p.total()).collect::<Vec<_>>(), p.original());
        (Just(p), Just(payload), kept)
    })
}

fn publisher(p: CodingParams) -> ChunkPublisher {
    ChunkPublisher::new(ChannelKey::from_seed(&[42; 32]), p)
}

proptest! {
    #[test]
    fn any_k_of_n_rebuilds_the_exact_chunk((p, payload, kept) in coded_case()) {
        let coded = publisher(p).publish(7, 1, ChunkFlags::empty(), &Bytes::from(payload.clone())).unwrap();
        let mut partial = PartialChunk::new(coded.header().clone());
        for &i in &kept {
            partial.insert(i, coded.shards()[i].clone()).unwrap();
        }
        prop_assert!(partial.is_complete_enough());
        let mut coder = ShardCoder::new();
        let rebuilt = partial.rebuild(&mut coder).unwrap();
        prop_assert_eq!(&rebuilt.to_bytes()[..], &payload[..]);
        prop_assert_eq!(rebuilt.len(), payload.len());
        // Decoding is skipped when every original that holds payload bytes is present (the
        // originals past them are pure padding).
        let used = payload.len().div_ceil(p.shard_len(payload.len()));
        let skip = (0..used).all(|i| kept.contains(&i));
        prop_assert_eq!(coder.stats().decode_skipped, u64::from(skip));
        prop_assert_eq!(coder.stats().decoded, u64::from(!skip));
    }

    #[test]
    fn regeneration_reproduces_the_source_shards((p, payload, kept) in coded_case()) {
        let coded = publisher(p).publish(9, 2, ChunkFlags::RANDOM_ACCESS, &Bytes::from(payload.clone())).unwrap();
        let mut partial = PartialChunk::new(coded.header().clone());
        for &i in &kept {
            partial.insert(i, coded.shards()[i].clone()).unwrap();
        }
        let mut coder = ShardCoder::new();
        // The originals are the payload followed by zero padding: the layout every
        // implementation must share for regenerated shards to match the signed hashes.
        let originals: Vec<u8> = coded.shards()[..p.original()].iter().flat_map(|s| s.to_vec()).collect();
        prop_assert_eq!(&originals[..payload.len()], &payload[..]);
        prop_assert!(originals[payload.len()..].iter().all(|&b| b == 0));
        let made = partial.regenerate(&mut coder).unwrap();
        prop_assert_eq!(made, p.total() - p.original());
        for (i, shard) in coded.shards().iter().enumerate() {
            prop_assert_eq!(partial.shard(i), Some(shard), "shard {} differs", i);
        }
    }

    #[test]
    fn one_coder_reused_across_chunk_shapes(
        cases in prop::collection::vec((params(), 1usize..20_000, any::<u8>()), 1..6)
    ) {
        // The same coder must give the same answers whatever it coded before.
        let mut coder = ShardCoder::new();
        for (p, len, fill) in cases {
            let payload: Bytes = (0..len).map(|i| (i as u8).wrapping_mul(fill) ^ fill).collect();
            let all = coder.encode(p, &payload).unwrap();
            let fresh = ShardCoder::new().encode(p, &payload).unwrap();
            prop_assert_eq!(&all, &fresh);
            // Keep the last K shards: the most recovery-heavy subset.
            let shards: Vec<Option<Bytes>> = all
                .iter()
                .enumerate()
                .map(|(i, shard)| (i >= p.recovery()).then(|| shard.clone()))
                .collect();
            prop_assert_eq!(coder.rebuild(p, len, &shards).unwrap().to_bytes(), payload);
        }
    }

    #[test]
    fn a_flipped_bit_in_any_shard_is_rejected(
        (p, payload, _) in coded_case(),
        which in any::<prop::sample::Index>(),
        bit in 0u8..8,
        at in any::<prop::sample::Index>(),
    ) {
        let coded = publisher(p).publish(3, 3, ChunkFlags::empty(), &Bytes::from(payload)).unwrap();
        let i = which.index(p.total());
        let mut bad = coded.shards()[i].to_vec();
        let at = at.index(bad.len());
        bad[at] ^= 1 << bit;
        let mut partial = PartialChunk::new(coded.header().clone());
        prop_assert_eq!(
            partial.insert(i, Bytes::from(bad)),
            Err(ShardError::Hash { seq: 3, index: i })
        );
        prop_assert_eq!(partial.held(), 0);
        // The genuine shard is still accepted afterwards.
        prop_assert!(partial.insert(i, coded.shards()[i].clone()).is_ok());
    }

    #[test]
    fn a_flipped_bit_in_any_header_byte_is_rejected(
        len in 1usize..5_000,
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let key = ChannelKey::from_seed(&[5; 32]);
        let payload = vec![0xa5u8; len];
        let coded = ChunkPublisher::new(ChannelKey::from_seed(&[5; 32]), CodingParams::DEFAULT)
            .publish(11, 4, ChunkFlags::empty(), &Bytes::from(payload))
            .unwrap();
        let mut wire = Vec::new();
        coded.header().encode(&mut wire);
        let at = at.index(wire.len());
        wire[at] ^= 1 << bit;
        let mut verifier = HeaderVerifier::new(key.channel_id(), 16);
        // Verify the genuine header first so the flipped one cannot ride on the cache.
        verifier.verify((**coded.header()).clone()).unwrap();
        let mut buf = Bytes::from(wire);
        match SignedChunkHeader::decode(&mut buf) {
            Err(_) => {}
            Ok(h) => prop_assert!(verifier.verify(h).is_err()),
        }
    }

    #[test]
    fn a_header_signed_by_another_key_is_rejected(seed in any::<[u8; 32]>(), len in 1usize..5_000) {
        prop_assume!(seed != [1; 32]);
        let channel = ChannelKey::from_seed(&[1; 32]).channel_id();
        let forged = ChunkPublisher::new(ChannelKey::from_seed(&seed), CodingParams::DEFAULT)
            .publish(0, 0, ChunkFlags::RANDOM_ACCESS, &Bytes::from(vec![1u8; len]))
            .unwrap();
        let mut verifier = HeaderVerifier::new(channel, 16);
        prop_assert!(verifier.verify((**forged.header()).clone()).is_err());
        prop_assert_eq!(verifier.stats().bad_signatures, 1);
    }

    /// MP3 frames with junk between some of them, fed in arbitrary pieces at arbitrary times:
    /// every byte comes out once and in order, and every chunk flagged random-access starts on a
    /// frame (but for the first after the format became known, which may start on junk, and
    /// those before).
    #[test]
    fn mp3_chunks_start_on_frames(
        units in prop::collection::vec((any::<bool>(), 0usize..40, 1u8..0xff), 20..150),
        cuts in prop::collection::vec((1usize..3_000, 0u64..300), 1..40),
        max_bytes in 376usize..20_000,
    ) {
        let mut input = Vec::new();
        for (i, (padding, junk, fill)) in units.iter().enumerate() {
            // Junk never holds 0xff, so it cannot pass for a frame; the stream starts with
            // three clean frames, which is what identifies it.
            if i >= 3 {
                input.extend(std::iter::repeat_n(0x10u8, *junk % 7 / 6 * junk));
            }
            let len = input.len();
            input.extend([0xff, 0xfb, 0x90 | (u8::from(*padding) << 1), 0x64]);
            // A frame body of MPEG-TS sync bytes (0x47) every 188 bytes is MPEG-TS to the
            // detector, rightly: real frames are compressed noise. Such bodies are not drawn.
            let fill = if *fill == 0x47 { 0x48 } else { *fill };
            input.resize(len + 417 + usize::from(*padding), fill);
        }
        let t0 = Instant::now();
        let mut chunker = Chunker::new(ChunkerConfig { max_bytes, ..Default::default() }).unwrap();
        let mut chunks = Vec::new();
        let mut undecided = 0;
        let mut rest = &input[..];
        let mut now = t0;
        for (size, gap_ms) in cuts.iter().cycle() {
            if rest.is_empty() { break; }
            now += Duration::from_millis(*gap_ms);
            chunker.handle_timeout(now);
            let take = (*size).min(rest.len());
            let known = chunker.format().is_some();
            chunker.handle_input(now, &rest[..take]);
            rest = &rest[take..];
            chunks.extend(std::iter::from_fn(|| chunker.poll_chunk()));
            if !known {
                // Chunks closed before the format is known are opaque, each flagged a start.
                undecided = chunks.len();
            }
        }
        chunker.finish(now);
        chunks.extend(std::iter::from_fn(|| chunker.poll_chunk()));
        prop_assert_eq!(chunker.format(), Some(InputFormat::MpegAudio));
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            prop_assert!(chunk.payload.len() <= max_bytes);
            if i > undecided && chunk.flags.contains(ChunkFlags::RANDOM_ACCESS) && !chunk.flags.contains(ChunkFlags::NO_DATA) {
                prop_assert_eq!(chunk.payload[0], 0xff, "chunk {} flagged", i);
            }
            if !chunk.flags.contains(ChunkFlags::NO_DATA) {
                out.extend_from_slice(&chunk.payload);
            }
        }
        prop_assert_eq!(out, input);
    }

    #[test]
    fn chunks_concatenate_to_the_input(
        input in prop::collection::vec(any::<u8>(), 0..60_000),
        cuts in prop::collection::vec((1usize..5_000, 0u64..400), 1..40),
        format in prop_oneof![
            Just(InputFormat::Auto),
            Just(InputFormat::MpegTs),
            Just(InputFormat::MpegAudio),
            Just(InputFormat::Adts),
            Just(InputFormat::Opaque),
        ],
        max_bytes in 376usize..20_000,
    ) {
        let t0 = Instant::now();
        let mut chunker = Chunker::new(ChunkerConfig { max_bytes, format, first_seq: 100, ..Default::default() }).unwrap();
        let mut out = Vec::new();
        let mut rest = &input[..];
        let mut now = t0;
        let mut seq = 100;
        for (size, gap_ms) in cuts.iter().cycle() {
            if rest.is_empty() { break; }
            now += Duration::from_millis(*gap_ms);
            chunker.handle_timeout(now);
            let take = (*size).min(rest.len());
            chunker.handle_input(now, &rest[..take]);
            rest = &rest[take..];
            while let Some(chunk) = chunker.poll_chunk() {
                prop_assert_eq!(chunk.seq, seq);
                prop_assert!(!chunk.payload.is_empty() && chunk.payload.len() <= max_bytes);
                seq += 1;
                out.extend_from_slice(&chunk.payload);
            }
        }
        chunker.finish(now);
        while let Some(chunk) = chunker.poll_chunk() {
            if chunk.flags.contains(ChunkFlags::NO_DATA) {
                // The end-of-stream marker after a timer had closed the last chunk with the
                // input's last byte: a chunk carries at least one byte, and players skip it.
                prop_assert!(chunk.flags.contains(ChunkFlags::END_OF_STREAM));
                prop_assert!(chunker.poll_chunk().is_none());
                break;
            }
            out.extend_from_slice(&chunk.payload);
        }
        prop_assert_eq!(out, input);
    }

    #[test]
    fn ts_chunks_are_packet_aligned(
        packets in prop::collection::vec((0u16..4, any::<bool>(), 1u64..60), 10..400),
        max_bytes in 376usize..30_000,
    ) {
        let t0 = Instant::now();
        let mut chunker = Chunker::new(ChunkerConfig { max_bytes, format: InputFormat::MpegTs, ..Default::default() }).unwrap();
        let mut now = t0;
        let mut chunks = Vec::new();
        for (pid, rap, gap_ms) in packets {
            let mut p = [0xffu8; 188];
            p[0] = 0x47;
            p[1] = ((0x100 + pid) >> 8) as u8;
            p[2] = (0x100 + pid) as u8;
            p[3] = if rap { 0x30 } else { 0x10 };
            if rap { p[4] = 1; p[5] = 0x40; }
            now += Duration::from_millis(gap_ms);
            chunker.handle_timeout(now);
            chunker.handle_input(now, &p);
            chunks.extend(std::iter::from_fn(|| chunker.poll_chunk()));
        }
        chunker.finish(now);
        chunks.extend(std::iter::from_fn(|| chunker.poll_chunk()));
        for chunk in &chunks {
            prop_assert_eq!(chunk.payload.len() % 188, 0);
            prop_assert_eq!(chunk.payload[0], 0x47);
            let first_is_rap = chunk.payload[3] & 0x20 != 0 && chunk.payload[5] & 0x40 != 0;
            prop_assert_eq!(chunk.flags.contains(ChunkFlags::RANDOM_ACCESS), first_is_rap);
        }
    }
}

#[test]
fn a_forged_header_cannot_ride_on_a_cached_good_one() {
    let key = ChannelKey::from_seed(&[8; 32]);
    let mut verifier = HeaderVerifier::new(key.channel_id(), 4);
    let good = ChunkPublisher::new(ChannelKey::from_seed(&[8; 32]), CodingParams::DEFAULT)
        .publish(
            50,
            1,
            ChunkFlags::empty(),
            &Bytes::from_static(b"the real chunk"),
        )
        .unwrap();
    let cached = verifier.verify((**good.header()).clone()).unwrap();
    assert_eq!(verifier.stats().signatures_checked, 1);
    // Same sequence, same signature, different hash for shard 0: not a cache hit, and invalid.
    let mut forged = (**good.header()).clone();
    forged.header.hashes[0] = gridcast::stream::shard_hash(b"evil");
    assert!(verifier.verify(forged).is_err());
    assert_eq!(verifier.stats().signatures_checked, 2);
    // The genuine header is still served from the cache.
    let again = verifier.verify((**good.header()).clone()).unwrap();
    assert!(Arc::ptr_eq(&cached, &again));
    assert_eq!(verifier.stats().cache_hits, 1);
    assert_eq!(verifier.stats().signatures_checked, 2);
}

#[test]
fn the_verifier_cache_is_bounded() {
    let key = ChannelKey::from_seed(&[8; 32]);
    let mut publisher = ChunkPublisher::new(ChannelKey::from_seed(&[8; 32]), CodingParams::DEFAULT);
    let mut verifier = HeaderVerifier::new(key.channel_id(), 3);
    for seq in 0..10 {
        let c = publisher
            .publish(seq, 0, ChunkFlags::empty(), &Bytes::from_static(b"x"))
            .unwrap();
        verifier.verify((**c.header()).clone()).unwrap();
    }
    assert!(verifier.cached(6).is_none());
    assert!(verifier.cached(7).is_some() && verifier.cached(9).is_some());
}

#[test]
fn shard_hashes_are_blake3_cut_to_128_bits_and_a_16_shard_header_is_343_bytes() {
    let coded = publisher(CodingParams::DEFAULT)
        .publish(7, 1, ChunkFlags::empty(), &Bytes::from(vec![0x5a; 4000]))
        .unwrap();
    let header = coded.header();
    assert_eq!(header.header.hashes.len(), 16);
    for (i, shard) in coded.shards().iter().enumerate() {
        // The first 16 bytes of BLAKE3's output stream, as any BLAKE3 implementation reads
        // them, so that other implementations of the protocol can check shards.
        let mut xof = blake3::Hasher::new().update(shard).finalize_xof();
        let mut want = [0u8; 16];
        xof.fill(&mut want);
        assert_eq!(header.header.hashes[i], want, "shard {i}");
        assert!(header.header.shard_matches(i, shard));
        let mut flipped = shard.to_vec();
        flipped[0] ^= 1;
        assert!(!header.header.shard_matches(i, &flipped));
    }
    // 23 fixed bytes, 16 hashes of 16 bytes, the 64-byte signature.
    assert_eq!(header.encoded_len(), 343);
    let mut buf = Vec::new();
    header.encode(&mut buf);
    assert_eq!(buf.len(), 343);
    let decoded = SignedChunkHeader::decode(&mut &buf[..]).unwrap();
    assert_eq!(&decoded, &**header);
}
