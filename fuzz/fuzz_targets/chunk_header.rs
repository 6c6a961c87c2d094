//! Any bytes as a signed chunk header; nothing random verifies (see `fuzz/harness/decoders.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness/decoders.rs"]
mod decoders;

fuzz_target!(|data: &[u8]| {
    decoders::chunk_header(data);
});
