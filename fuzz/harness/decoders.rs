//! What the decoder fuzz targets check, one function per target, shared with
//! `tests/fuzz_corpora.rs`, which replays each target's committed corpus through the same
//! function: any input may be rejected, none may panic, and whatever is accepted must hold
//! up (print back, re-encode, verify) as the function says.

// Each fuzz target uses one function of this file; the replay test uses them all.
#![allow(dead_code)]

use std::path::Path;

use bytes::{Bytes, BytesMut};
use gridcast::keys::{ChannelId, ChannelKey};
use gridcast::stream::HeaderVerifier;
use gridcast::stream::header::SignedChunkHeader;
use gridcast::wire::Message;

/// The targets of this harness, by name.
pub const TARGETS: [&str; 5] = [
    "wire_frames",
    "wire_bodies",
    "chunk_header",
    "channel_id_text",
    "key_file",
];

/// Runs the named target's check on `data`.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "wire_frames" => wire_frames(data),
        "wire_bodies" => wire_bodies(data),
        "chunk_header" => chunk_header(data),
        "channel_id_text" => channel_id_text(data),
        "key_file" => key_file(data),
        other => panic!("no decoder target {other}"),
    }
}

/// Any bytes on a QUIC stream: frames are decoded until the input runs out or is rejected.
pub fn wire_frames(data: &[u8]) {
    let _ = gridcast::wire::decode_all_frames(data);
}

/// Message types whose bodies [`wire_bodies`] feeds.
const KINDS: [u64; 12] = [
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x10,
];

/// Any frame body behind each valid message type (the first byte picks it), so every field
/// decoder is reached even before the fuzzer has learnt the framing. A decoded message must
/// re-encode to exactly its `encoded_len` and decode back to itself.
pub fn wire_bodies(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let kind = KINDS[usize::from(selector) % KINDS.len()];
    if let Ok(msg) = Message::decode_body(kind, Bytes::copy_from_slice(body)) {
        let encoded = msg.to_bytes();
        assert_eq!(encoded.len(), msg.encoded_len());
        let again = Message::decode_frame(&mut BytesMut::from(&encoded[..]))
            .expect("re-encoded message decodes")
            .expect("re-encoded message is complete");
        assert_eq!(again, msg);
    }
}

/// Any bytes as a signed chunk header, then (if it parses) a shard check and a signature
/// check: neither may panic, and nothing random may verify.
pub fn chunk_header(data: &[u8]) {
    let mut buf = Bytes::copy_from_slice(data);
    if let Ok(header) = SignedChunkHeader::decode(&mut buf) {
        let _ = header.header.shard_matches(0, &buf);
        let channel = ChannelKey::from_seed(&[1; 32]).channel_id();
        let mut verifier = HeaderVerifier::new(channel, 4);
        assert!(verifier.verify(header).is_err(), "a random header verified");
    }
}

/// Any text as a channel id: parse errors only, and whatever parses prints back the same.
pub fn channel_id_text(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(id) = text.parse::<ChannelId>()
    {
        assert_eq!(id.to_string(), text.trim().to_ascii_lowercase());
    }
}

/// Any text as a key file's contents: a clear error or a usable key, never a panic.
pub fn key_file(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(key) = ChannelKey::from_pem(text, Path::new("fuzz.key"))
    {
        let sig = key.sign(b"x");
        assert!(key.channel_id().verify(b"x", &sig));
    }
}
