//! Any frame body behind each valid message type, so every field decoder is reached even when
//! the fuzzer has not yet learnt the framing. A decoded message must re-encode to exactly its
//! `encoded_len` and decode back to itself.
#![no_main]

use bytes::{Bytes, BytesMut};
use gridcast::wire::Message;
use libfuzzer_sys::fuzz_target;

const KINDS: [u64; 9] = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x10];

fuzz_target!(|data: &[u8]| {
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
});
