//! The fuzz targets' committed corpora and crash reproducers, replayed: every input under
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` runs through the same harness the
//! fuzz target does (`fuzz/harness/`), so a fixed crash stays fixed and CI covers what the
//! campaigns found. Also, a script of only genuine data must get the player playing, or the
//! engine-pair harness would prove nothing.

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)]

#[allow(unreachable_pub)]
#[path = "../fuzz/harness/engine_pair.rs"]
mod engine_pair;

#[allow(unreachable_pub)]
#[path = "../fuzz/harness/decoders.rs"]
mod decoders;

use std::path::Path;

/// Every file of `fuzz/corpus/<target>` and `fuzz/regressions/<target>`.
fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            if path.is_file() {
                out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn genuine_shards_from_the_pair_harness_are_played() {
    // Channel information, then every shard of chunks 0 to 5, time passing between.
    let mut script = vec![1];
    for c in 0..6u8 {
        script.extend([7, c, 9, 5]);
    }
    let played = engine_pair::run(&script);
    println!("engine_pair genuine script: {played} chunks played");
    assert!(played >= 3, "only {played} chunks played from genuine data");
}

#[test]
fn the_engine_pair_corpus_replays_clean() {
    let inputs = inputs("engine_pair");
    for (name, data) in &inputs {
        let played = engine_pair::run(data);
        if played > 0 {
            println!("{name}: {played} played");
        }
    }
    assert!(!inputs.is_empty(), "no committed corpus for engine_pair");
    println!("engine_pair: {} inputs replayed", inputs.len());
}

#[test]
fn the_decoder_corpora_replay_clean() {
    for target in decoders::TARGETS {
        let inputs = inputs(target);
        // Each target's 10-minute campaign left a merged corpus here.
        assert!(!inputs.is_empty(), "no committed corpus for {target}");
        for (_, data) in &inputs {
            decoders::run(target, data);
        }
        println!("{target}: {} inputs replayed", inputs.len());
    }
}
