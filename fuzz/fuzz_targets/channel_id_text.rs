//! Any text as a channel id; what parses prints back the same (see `fuzz/harness/decoders.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness/decoders.rs"]
mod decoders;

fuzz_target!(|data: &[u8]| {
    decoders::channel_id_text(data);
});
