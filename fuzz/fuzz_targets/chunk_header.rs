//! Any bytes as a signed chunk header, then (if it parses) as a signature check and a shard
//! check: none may panic, and nothing random may verify.
#![no_main]

use bytes::Bytes;
use gridcast::keys::ChannelKey;
use gridcast::stream::HeaderVerifier;
use gridcast::stream::header::SignedChunkHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = Bytes::copy_from_slice(data);
    if let Ok(header) = SignedChunkHeader::decode(&mut buf) {
        let _ = header.header.shard_matches(0, &buf);
        let channel = ChannelKey::from_seed(&[1; 32]).channel_id();
        let mut verifier = HeaderVerifier::new(channel, 4);
        assert!(verifier.verify(header).is_err(), "a random header verified");
    }
});
