//! The chunker's unit tests.

#![allow(clippy::disallowed_methods)] // a test needs one base instant; time then moves by hand

use super::*;

fn ts_packet(pid: u16, rap: bool, fill: u8) -> Vec<u8> {
    let mut p = vec![fill; TS_PACKET];
    p[0] = TS_SYNC;
    p[1] = ((pid >> 8) as u8) & 0x1f;
    p[2] = pid as u8;
    if rap {
        p[1] |= 0x40;
        p[3] = 0x30; // adaptation field + payload
        p[4] = 1;
        p[5] = 0x40;
    } else {
        p[3] = 0x10;
    }
    p
}

fn pat(pmt: u16) -> Vec<u8> {
    let mut p = vec![0xff; TS_PACKET];
    p[..4].copy_from_slice(&[TS_SYNC, 0x40, 0x00, 0x10]);
    p[4] = 0; // pointer field
    let section = [
        0x00,
        0xb0,
        13,
        0x00,
        0x01,
        0xc1,
        0x00,
        0x00,
        0x00,
        0x01,
        0xe0 | (pmt >> 8) as u8,
        pmt as u8,
        0,
        0,
        0,
        0,
    ];
    p[5..5 + section.len()].copy_from_slice(&section);
    p
}

fn drain(c: &mut Chunker) -> Vec<Chunk> {
    std::iter::from_fn(|| c.poll_chunk()).collect()
}

#[test]
fn opaque_input_closes_by_time_and_size() {
    let t0 = Instant::now();
    let mut c = Chunker::new(ChunkerConfig {
        max_bytes: 1000,
        format: InputFormat::Opaque,
        ..Default::default()
    })
    .unwrap();
    c.handle_input(t0, &[1u8; 2500]);
    let chunks = drain(&mut c);
    assert_eq!(
        chunks.iter().map(|c| c.payload.len()).collect::<Vec<_>>(),
        [1000, 1000]
    );
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_millis(250)));
    c.handle_timeout(t0 + Duration::from_millis(249));
    assert!(c.poll_chunk().is_none());
    c.handle_timeout(t0 + Duration::from_millis(250));
    let last = drain(&mut c);
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].payload.len(), 500);
    assert_eq!(last[0].seq, 2);
    assert!(last[0].flags.contains(ChunkFlags::RANDOM_ACCESS));
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn ts_cuts_on_packet_boundaries_and_flags_keyframes() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut c = Chunker::new(ChunkerConfig::default()).unwrap();
    let mut input = Vec::new();
    // PAT, then a keyframe on PID 0x100, then ordinary packets.
    input.extend(pat(0x1000));
    input.extend(ts_packet(0x100, true, 1));
    for _ in 0..10 {
        input.extend(ts_packet(0x100, false, 2));
    }
    c.handle_input(t0, &input);
    assert_eq!(c.format(), Some(InputFormat::MpegTs));
    // Half a packet, then the timer: only whole packets close.
    c.handle_input(t0 + ms(10), &ts_packet(0x100, false, 3)[..100]);
    c.handle_timeout(t0 + ms(250));
    let first = drain(&mut c);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].payload.len(), 12 * TS_PACKET);
    assert!(first[0].flags.contains(ChunkFlags::RANDOM_ACCESS));
    // Finish the packet, then a PAT + keyframe 2 s later starts a new chunk (PAT included).
    let t1 = t0 + ms(2000);
    let mut more = ts_packet(0x100, false, 3)[100..].to_vec();
    more.extend(ts_packet(0x100, false, 4));
    more.extend(pat(0x1000));
    more.extend(ts_packet(0x100, true, 5));
    c.handle_input(t1, &more);
    let second = drain(&mut c);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].payload.len(), 2 * TS_PACKET);
    assert!(!second[0].flags.contains(ChunkFlags::RANDOM_ACCESS));
    c.finish(t1);
    let third = drain(&mut c);
    assert_eq!(third[0].payload[..4], pat(0x1000)[..4]);
    assert!(third[0].flags.contains(ChunkFlags::RANDOM_ACCESS));
    assert!(third[0].flags.contains(ChunkFlags::END_OF_STREAM));
}

#[test]
fn dense_random_access_points_do_not_shred_chunks() {
    // Audio-like: a random-access packet every 20 ms on one PID.
    let t0 = Instant::now();
    let mut c = Chunker::new(ChunkerConfig {
        format: InputFormat::MpegTs,
        ..Default::default()
    })
    .unwrap();
    for i in 0..100u64 {
        let now = t0 + Duration::from_millis(20 * i);
        c.handle_timeout(now);
        c.handle_input(now, &ts_packet(0x101, true, 9));
    }
    let chunks = drain(&mut c);
    assert!(
        chunks.len() >= 6 && chunks.len() <= 9,
        "{} chunks",
        chunks.len()
    );
    assert!(
        chunks
            .iter()
            .all(|c| c.flags.contains(ChunkFlags::RANDOM_ACCESS))
    );
}

/// A PMT on PID `pid` naming each `(stream_type, pid)`.
fn pmt(pid: u16, streams: &[(u8, u16)]) -> Vec<u8> {
    let mut section = vec![
        0x02, 0xb0, 0, 0x00, 0x01, 0xc1, 0x00, 0x00, 0xe1, 0x00, 0xf0, 0,
    ];
    for &(stream_type, es) in streams {
        section.extend([stream_type, 0xe0 | (es >> 8) as u8, es as u8, 0xf0, 0]);
    }
    section.extend([0; 4]); // CRC, not checked
    section[2] = (section.len() - 3) as u8;
    let mut p = vec![0xff; TS_PACKET];
    p[..4].copy_from_slice(&[TS_SYNC, 0x40 | (pid >> 8) as u8, pid as u8, 0x10]);
    p[4] = 0;
    p[5..5 + section.len()].copy_from_slice(&section);
    p
}

#[test]
fn with_video_in_the_programme_only_video_keyframes_are_random_access() {
    // MPEG-2 video on 0x100 with a keyframe each second, MP2 audio on 0x101 with a
    // random-access packet every 20 ms: 4 s of it.
    let t0 = Instant::now();
    let mut c = Chunker::new(ChunkerConfig::default()).unwrap();
    let mut keyframes = 0;
    for i in 0..200u64 {
        let now = t0 + Duration::from_millis(20 * i);
        c.handle_timeout(now);
        let mut input = Vec::new();
        if i % 50 == 0 {
            input.extend(pat(0x1000));
            input.extend(pmt(0x1000, &[(0x02, 0x100), (0x03, 0x101)]));
            input.extend(ts_packet(0x100, true, 1));
            keyframes += 1;
        } else {
            input.extend(ts_packet(0x100, false, 2));
        }
        input.extend(ts_packet(0x101, true, 3));
        c.handle_input(now, &input);
    }
    c.finish(t0 + Duration::from_secs(4));
    let chunks = drain(&mut c);
    // Still cut by time between keyframes.
    assert!(chunks.len() >= 16, "{} chunks", chunks.len());
    let random_access: Vec<_> = chunks
        .iter()
        .filter(|c| c.flags.contains(ChunkFlags::RANDOM_ACCESS))
        .collect();
    assert_eq!(random_access.len(), keyframes);
    for chunk in random_access {
        // PAT, PMT, then the video keyframe.
        assert_eq!(chunk.payload[..4], pat(0x1000)[..4]);
        let third = &chunk.payload[2 * TS_PACKET..3 * TS_PACKET];
        assert_eq!(third, &ts_packet(0x100, true, 1)[..]);
    }
}

#[test]
fn lost_sync_keeps_every_byte() {
    let t0 = Instant::now();
    let mut c = Chunker::new(ChunkerConfig {
        format: InputFormat::MpegTs,
        ..Default::default()
    })
    .unwrap();
    let mut input = Vec::new();
    input.extend(ts_packet(0x100, false, 1));
    input.extend([0u8; 77]);
    for _ in 0..3 {
        input.extend(ts_packet(0x100, false, 1));
    }
    c.handle_input(t0, &input);
    c.finish(t0);
    let out: Vec<u8> = drain(&mut c)
        .iter()
        .flat_map(|c| c.payload.to_vec())
        .collect();
    assert_eq!(out, input);
    assert!(c.stats().resyncs >= 1);
}

#[test]
fn ogg_header_is_captured_and_pages_start_random_access_chunks() {
    use crate::stream::framing::tests::ogg;
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut c = Chunker::new(ChunkerConfig::default()).unwrap();
    let mut header = ogg(0x02, 0, &[1; 30]);
    header.extend(ogg(0, 0, &[2; 700]));
    let audio1 = ogg(0, 1024, &[3; 400]);
    let audio2 = ogg(0x01, u64::MAX, &[4; 400]);
    let audio3 = ogg(0, 4096, &[5; 400]);
    // The header arrives in pieces; nothing closes while it is being captured.
    c.handle_input(t0, &header[..10]);
    assert_eq!(c.format(), Some(InputFormat::Ogg));
    c.handle_input(t0 + ms(1), &header[10..]);
    c.handle_timeout(t0 + ms(400));
    assert!(c.poll_chunk().is_none());
    assert_eq!(c.poll_timeout(), None);
    // The first audio page ends the header: it becomes a chunk of its own.
    c.handle_input(t0 + ms(400), &audio1[..100]);
    assert_eq!(c.poll_stream_header().as_deref(), Some(&header[..]));
    let first = drain(&mut c);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].flags, ChunkFlags::STREAM_HEADER);
    assert_eq!(first[0].payload, header);
    // Time may cut a page in the middle; that chunk is not a random-access start.
    c.handle_timeout(t0 + ms(650));
    let cut = drain(&mut c);
    assert_eq!(cut[0].payload.len(), 100);
    assert!(cut[0].flags.contains(ChunkFlags::RANDOM_ACCESS));
    c.handle_input(t0 + ms(700), &audio1[100..]);
    // A continued page is no start; a fresh page after half the duration is.
    c.handle_input(t0 + ms(720), &audio2);
    c.handle_input(t0 + ms(900), &audio3);
    c.finish(t0 + ms(901));
    let rest = drain(&mut c);
    assert_eq!(rest.len(), 2);
    assert!(!rest[0].flags.contains(ChunkFlags::RANDOM_ACCESS));
    assert_eq!(rest[0].payload.len(), audio1.len() - 100 + audio2.len());
    assert!(rest[1].flags.contains(ChunkFlags::RANDOM_ACCESS));
    assert_eq!(rest[1].payload, audio3);
    // A chained stream (new beginning-of-stream page) captures a new header.
    let mut again = Chunker::new(ChunkerConfig::default()).unwrap();
    let mut input = header.clone();
    input.extend(&audio1);
    let mut header2 = ogg(0x02, 0, &[9; 20]);
    header2.extend(ogg(0, 0, &[8; 50]));
    input.extend(&header2);
    input.extend(&audio3);
    again.handle_input(t0, &input);
    assert_eq!(again.poll_stream_header().as_deref(), Some(&header[..]));
    assert_eq!(again.poll_stream_header().as_deref(), Some(&header2[..]));
    again.finish(t0);
    let all = drain(&mut again);
    let flags: Vec<_> = all.iter().map(|c| c.flags).collect();
    assert_eq!(
        flags,
        [
            ChunkFlags::STREAM_HEADER,
            ChunkFlags::RANDOM_ACCESS,
            ChunkFlags::STREAM_HEADER,
            ChunkFlags::RANDOM_ACCESS | ChunkFlags::END_OF_STREAM
        ]
    );
    assert_eq!(
        all.iter().map(|c| c.payload.len()).sum::<usize>(),
        input.len()
    );
    assert_eq!(again.stats().stream_headers, 2);
}

#[test]
fn damaged_ogg_resyncs_and_keeps_every_byte() {
    use crate::stream::framing::tests::ogg;
    let t0 = Instant::now();
    let mut c = Chunker::new(ChunkerConfig::default()).unwrap();
    let mut input = ogg(0x02, 0, &[1; 30]);
    input.extend(ogg(0, 100, &[2; 300]));
    input.extend(b"garbage!");
    let clean = ogg(0, 200, &[3; 300]);
    input.extend(&clean);
    c.handle_input(t0, &input);
    c.finish(t0);
    let all = drain(&mut c);
    assert_eq!(c.stats().resyncs, 1);
    let joined: Vec<u8> = all.iter().flat_map(|c| c.payload.to_vec()).collect();
    assert_eq!(joined, input);
}

#[test]
fn fragmented_mp4_gets_an_init_segment_and_a_chunk_per_fragment() {
    use crate::stream::framing::tests::mp4;
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut c = Chunker::new(ChunkerConfig::default()).unwrap();
    let mut init = mp4(b"ftyp", b"iso5\0\0\0\0");
    init.extend(mp4(b"moov", &[0; 300]));
    let mut frag1 = mp4(b"moof", &[1; 100]);
    frag1.extend(mp4(b"mdat", &[2; 5000]));
    let mut frag2 = mp4(b"styp", b"msdh");
    frag2.extend(mp4(b"moof", &[3; 100]));
    frag2.extend(mp4(b"mdat", &[4; 5000]));
    let mut input = init.clone();
    input.extend(&frag1);
    input.extend(&frag2);
    c.handle_input(t0, &input[..1000]);
    assert_eq!(c.format(), Some(InputFormat::Mp4));
    // The mdat is cut by time wherever it is.
    c.handle_timeout(t0 + ms(250));
    c.handle_input(t0 + ms(260), &input[1000..]);
    c.finish(t0 + ms(270));
    assert_eq!(c.poll_stream_header().as_deref(), Some(&init[..]));
    let all = drain(&mut c);
    let lens: Vec<_> = all.iter().map(|c| c.payload.len()).collect();
    assert_eq!(
        lens,
        [
            init.len(),
            1000 - init.len(),
            frag1.len() - (1000 - init.len()),
            frag2.len()
        ]
    );
    assert_eq!(all[0].flags, ChunkFlags::STREAM_HEADER);
    assert!(all[1].flags.contains(ChunkFlags::RANDOM_ACCESS));
    assert!(!all[2].flags.contains(ChunkFlags::RANDOM_ACCESS));
    assert!(all[3].flags.contains(ChunkFlags::RANDOM_ACCESS));
    // A malformed box makes the rest opaque, losing nothing.
    let mut bad = Chunker::new(ChunkerConfig::default()).unwrap();
    let mut input = init.clone();
    input.extend([0, 0, 0, 3, b'x', b'x', b'x', b'x', 7, 7, 7]);
    bad.handle_input(t0, &input);
    bad.finish(t0);
    assert_eq!(bad.format(), Some(InputFormat::Opaque));
    assert_eq!(bad.stats().resyncs, 1);
    let joined: Vec<u8> = drain(&mut bad)
        .iter()
        .flat_map(|c| c.payload.to_vec())
        .collect();
    assert_eq!(joined, input);
}

#[test]
fn a_stream_whose_last_chunk_closed_on_the_timer_still_ends_flagged() {
    let ms = Duration::from_millis;
    let t0 = Instant::now();
    let mut c = Chunker::new(ChunkerConfig::default()).unwrap();
    // Nothing ever chunked: nothing to end.
    c.finish(t0);
    assert!(c.poll_chunk().is_none());
    c.handle_input(t0, &[7u8; 1000]);
    c.handle_timeout(t0 + ms(2000));
    let closed = drain(&mut c);
    assert_eq!(closed.len(), 1);
    assert!(!closed[0].flags.contains(ChunkFlags::END_OF_STREAM));
    c.finish(t0 + ms(2500));
    let end = drain(&mut c);
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].seq, closed[0].seq + 1);
    assert!(end[0].flags.contains(ChunkFlags::END_OF_STREAM));
    assert!(end[0].flags.contains(ChunkFlags::NO_DATA));
    assert_eq!(end[0].payload.len(), 1);
}

#[test]
fn mp3_is_cut_on_frames_so_every_random_access_chunk_starts_with_one() {
    use crate::stream::framing::tests::{id3, mp3};
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut c = Chunker::new(ChunkerConfig::default()).unwrap();
    // An ID3 tag, then frames arriving as an encoder writes them, 26 ms apart, in pieces that
    // do not follow frame boundaries.
    let mut input = id3(60);
    for i in 0..120 {
        input.extend(mp3(i % 3 == 0, i as u8));
    }
    for (i, piece) in input.chunks(300).enumerate() {
        c.handle_input(t0 + ms(19 * i as u64), piece);
    }
    assert_eq!(c.format(), Some(InputFormat::MpegAudio));
    c.finish(t0 + ms(3000));
    let all = drain(&mut c);
    assert!(all.len() >= 8, "{} chunks", all.len());
    let joined: Vec<u8> = all.iter().flat_map(|c| c.payload.to_vec()).collect();
    assert_eq!(joined, input);
    assert!(all[0].payload.starts_with(b"ID3"));
    let mut random_access = 0;
    for chunk in &all {
        let on_frame =
            chunk.payload.starts_with(&[0xff, 0xfb]) || chunk.payload.starts_with(b"ID3");
        if chunk.flags.contains(ChunkFlags::RANDOM_ACCESS) {
            random_access += 1;
            assert!(
                on_frame,
                "chunk {} flagged but starts {:02x?}",
                chunk.seq,
                &chunk.payload[..4]
            );
        }
    }
    // A frame still arriving when the time is up opens the next chunk: every chunk starts on
    // one.
    assert_eq!(random_access, all.len());
    let durations: Vec<_> = all
        .windows(2)
        .map(|w| w[1].started - w[0].started)
        .collect();
    assert!(durations.iter().all(|d| *d >= ms(200)), "{durations:?}");
    assert_eq!(c.stats().resyncs, 0);
}

#[test]
fn mp3_joined_mid_frame_or_damaged_keeps_every_byte_and_finds_the_frames() {
    use crate::stream::framing::tests::mp3;
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut frames = Vec::new();
    for i in 0..40 {
        frames.extend(mp3(false, 0x20 + i as u8));
    }
    // The input starts 100 bytes into a frame and has junk between two frames.
    let mut input = frames[100..417 * 20].to_vec();
    input.extend(b"\xff\xfb junk \xff");
    input.extend(&frames[417 * 20..]);
    let mut c = Chunker::new(ChunkerConfig::default()).unwrap();
    for (i, piece) in input.chunks(1000).enumerate() {
        c.handle_input(t0 + ms(60 * i as u64), piece);
    }
    c.finish(t0 + ms(2000));
    assert_eq!(c.format(), Some(InputFormat::MpegAudio));
    assert_eq!(c.stats().resyncs, 1);
    let all = drain(&mut c);
    let joined: Vec<u8> = all.iter().flat_map(|c| c.payload.to_vec()).collect();
    assert_eq!(joined, input);
    assert!(
        !all[0].flags.contains(ChunkFlags::RANDOM_ACCESS),
        "starts mid-frame"
    );
    for chunk in all
        .iter()
        .filter(|c| c.flags.contains(ChunkFlags::RANDOM_ACCESS))
    {
        assert!(
            chunk.payload.starts_with(&[0xff, 0xfb, 0x90]),
            "chunk {}",
            chunk.seq
        );
    }
    assert!(
        all[1..]
            .iter()
            .all(|c| c.flags.contains(ChunkFlags::RANDOM_ACCESS))
    );
}

#[test]
fn aac_in_adts_is_cut_on_frames_and_other_bytes_stay_opaque() {
    use crate::stream::framing::tests::aac;
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut input = Vec::new();
    for i in 0..100 {
        input.extend(aac(300 + (i * 7) % 90, i as u8));
    }
    let mut c = Chunker::new(ChunkerConfig::default()).unwrap();
    for (i, piece) in input.chunks(700).enumerate() {
        c.handle_input(t0 + ms(40 * i as u64), piece);
    }
    c.finish(t0 + ms(3000));
    assert_eq!(c.format(), Some(InputFormat::Adts));
    let all = drain(&mut c);
    let joined: Vec<u8> = all.iter().flat_map(|c| c.payload.to_vec()).collect();
    assert_eq!(joined, input);
    for chunk in all
        .iter()
        .filter(|c| c.flags.contains(ChunkFlags::RANDOM_ACCESS))
    {
        assert!(
            chunk.payload.starts_with(&[0xff, 0xf1]),
            "chunk {}",
            chunk.seq
        );
    }
    // Bytes with no frames in a row are opaque once the first 4 KiB have shown none.
    let mut other = Chunker::new(ChunkerConfig::default()).unwrap();
    let text: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    other.handle_input(t0, &text[..3000]);
    assert_eq!(other.format(), None);
    other.handle_input(t0, &text[3000..]);
    assert_eq!(other.format(), Some(InputFormat::Opaque));
}

#[test]
fn mp3_behind_a_large_id3_tag_is_still_found() {
    use crate::stream::framing::tests::{id3, mp3};
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    // A file's tag with cover art: 200 KB before the first frame.
    let mut input = id3(200_000);
    for i in 0..40 {
        input.extend(mp3(false, i as u8));
    }
    let mut c = Chunker::new(ChunkerConfig::default()).unwrap();
    for (i, piece) in input.chunks(4096).enumerate() {
        c.handle_input(t0 + ms(10 * i as u64), piece);
    }
    c.finish(t0 + ms(1000));
    assert_eq!(c.format(), Some(InputFormat::MpegAudio));
    let all = drain(&mut c);
    let joined: Vec<u8> = all.iter().flat_map(|c| c.payload.to_vec()).collect();
    assert_eq!(joined, input);
    // Past a tag larger than the detector looks past, the input is opaque.
    let mut huge = id3(2_000_000);
    huge.extend(mp3(false, 1).repeat(40));
    let mut c = Chunker::new(ChunkerConfig::default()).unwrap();
    for piece in huge.chunks(65_536) {
        c.handle_input(t0, piece);
    }
    assert_eq!(c.format(), Some(InputFormat::Opaque));
}

#[test]
fn audio_alone_gets_the_audio_duration_and_video_or_unknown_input_the_other() {
    use crate::stream::framing::tests::{mp3, ogg};
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let config = || ChunkerConfig {
        audio_duration: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    // MP3: undecided at first, then a second a chunk; frames written every 26 ms close one
    // chunk in a second of them, not four.
    let mut c = Chunker::new(config()).unwrap();
    assert_eq!(c.duration(), ms(250));
    for i in 0..40u64 {
        c.handle_input(t0 + ms(26 * i), &mp3(false, i as u8));
    }
    assert_eq!(c.format(), Some(InputFormat::MpegAudio));
    assert_eq!(c.duration(), Duration::from_secs(1));
    let closed = drain(&mut c);
    assert_eq!(closed.len(), 1, "one chunk in 1.04 s of frames");
    assert_eq!(closed[0].payload.len(), 39 * 417);
    assert_eq!(
        c.poll_timeout(),
        Some(t0 + ms(26 * 39) + Duration::from_secs(1))
    );
    // Ogg whose header begins Vorbis and Opus streams: audio.
    let vorbis = |c: &mut Chunker, first: &[u8]| {
        let mut header = ogg(0x02, 0, first);
        header.extend(ogg(0, 0, &[2; 300]));
        c.handle_input(t0, &header);
        c.handle_input(t0, &ogg(0, 1024, &[3; 400]));
        assert!(c.poll_stream_header().is_some());
        c.duration()
    };
    let mut c = Chunker::new(config()).unwrap();
    assert_eq!(vorbis(&mut c, b"\x01vorbis-----"), Duration::from_secs(1));
    let mut c = Chunker::new(config()).unwrap();
    assert_eq!(vorbis(&mut c, b"OpusHead----"), Duration::from_secs(1));
    // Theora beside Vorbis: video, the ordinary duration; a chained audio-only stream after
    // it is audio again.
    let mut c = Chunker::new(config()).unwrap();
    let mut header = ogg(0x02, 0, b"\x80theora-----");
    header.extend(ogg(0x02, 0, b"\x01vorbis-----"));
    header.extend(ogg(0, 0, &[2; 300]));
    c.handle_input(t0, &header);
    c.handle_input(t0, &ogg(0, 1024, &[3; 400]));
    assert_eq!(c.duration(), ms(250));
    assert_eq!(vorbis(&mut c, b"\x01vorbis-----"), Duration::from_secs(1));
    // MPEG-TS and opaque input keep the ordinary duration.
    let mut c = Chunker::new(config()).unwrap();
    for _ in 0..8 {
        c.handle_input(t0, &ts_packet(0x100, false, 0));
    }
    assert_eq!(c.format(), Some(InputFormat::MpegTs));
    assert_eq!(c.duration(), ms(250));
    let mut c = Chunker::new(config()).unwrap();
    c.handle_input(t0, &[7; 5000]);
    assert_eq!(c.format(), Some(InputFormat::Opaque));
    assert_eq!(c.duration(), ms(250));
    // An audio duration out of range is refused like the other.
    let err = Chunker::new(ChunkerConfig {
        audio_duration: Some(ms(5)),
        ..Default::default()
    });
    assert_eq!(err.err(), Some(ChunkerError::Duration(ms(5))));
}

#[test]
fn ts_found_after_chunks_closed_undecided_closes_on_the_timer_without_panicking() {
    // Two bytes of junk, then MPEG-TS packets. Chunks close on the timer before the detector
    // has seen enough (N + 1 packets), so when it decides, the first whole packet starts past
    // the few bytes the open chunk holds; the timer then closed the chunk at that packet and
    // cut past the end of what it held (a panic, found by `tests/stream_props.rs`).
    let ms = Duration::from_millis;
    let t0 = Instant::now();
    let mut input = vec![0x10u8, 0x11];
    for i in 0..12u8 {
        let mut packet = vec![i; TS_PACKET];
        packet[0] = TS_SYNC;
        input.extend(packet);
    }
    let mut c = Chunker::new(ChunkerConfig::default()).unwrap();
    let early = TS_PACKET * (TS_DETECT_PACKETS + 1) - 10;
    c.handle_input(t0, &input[..early]);
    c.handle_timeout(t0 + ms(2000));
    c.handle_input(t0 + ms(2000), &input[early..early + 10]);
    assert_eq!(c.format(), Some(InputFormat::MpegTs));
    c.handle_timeout(t0 + ms(4000));
    c.handle_input(t0 + ms(4000), &input[early + 10..]);
    c.finish(t0 + ms(4000));
    let out: Vec<u8> = drain(&mut c)
        .iter()
        .flat_map(|ch| ch.payload.to_vec())
        .collect();
    assert_eq!(out, input, "every byte once, in order");
}
