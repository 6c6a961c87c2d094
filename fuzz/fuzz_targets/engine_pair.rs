//! A player engine connected to a hostile parent that follows the fuzz input as a script
//! (see `fuzz/harness/engine_pair.rs`): the player never panics, never plays a byte that is
//! not the genuine chunk's, and keeps its window and backlog bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness/engine_pair.rs"]
mod engine_pair;

fuzz_target!(|data: &[u8]| {
    engine_pair::run(data);
});
