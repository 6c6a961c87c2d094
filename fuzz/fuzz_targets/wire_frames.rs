//! Any bytes on a QUIC stream: frames are decoded until the input runs out or is rejected.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gridcast::wire::decode_all_frames(data);
});
