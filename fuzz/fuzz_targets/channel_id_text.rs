//! Any text as a channel id: parse errors only, and whatever parses prints back the same.
#![no_main]

use gridcast::keys::ChannelId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(id) = text.parse::<ChannelId>() {
            assert_eq!(id.to_string(), text.trim().to_ascii_lowercase());
        }
    }
});
