//! Any text as a key file's contents: a clear error or a usable key, never a panic.
#![no_main]

use std::path::Path;

use gridcast::keys::ChannelKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(key) = ChannelKey::from_pem(text, Path::new("fuzz.key")) {
            let sig = key.sign(b"x");
            assert!(key.channel_id().verify(b"x", &sig));
        }
    }
});
