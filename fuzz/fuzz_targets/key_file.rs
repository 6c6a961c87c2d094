//! Any text as a key file; a clear error or a usable key (see `fuzz/harness/decoders.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness/decoders.rs"]
mod decoders;

fuzz_target!(|data: &[u8]| {
    decoders::key_file(data);
});
