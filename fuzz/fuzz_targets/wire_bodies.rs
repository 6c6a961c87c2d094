//! Any frame body behind each message type, re-encoded when it decodes (see `fuzz/harness/decoders.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness/decoders.rs"]
mod decoders;

fuzz_target!(|data: &[u8]| {
    decoders::wire_bodies(data);
});
