//! The stream path against raw reed-solomon-simd, measured in the same run.
//!
//! - source: chunk bytes → N shards, BLAKE3 per shard, signed header (`ChunkPublisher::publish`)
//!   versus raw: reed-solomon-simd encode of the same padded chunk + BLAKE3 of the N shards.
//! - peer: signed header verified + K shards hash-checked + chunk rebuilt (`HeaderVerifier`,
//!   `PartialChunk`) versus raw: reed-solomon-simd decode of the same K shards + BLAKE3 of them.
//!   Two cases: `intact` (all K originals arrived, no decoding) and `lossy` (half the originals
//!   replaced by recovery shards, as after a parent is lost).
//!
//! Every chunk the peer path sees carries a new sequence number, so each one pays a real Ed25519
//! verification, as in steady state. The raw baselines do no signing or verifying at all; the
//! summary also prints the ratio against raw + one Ed25519 sign/verify per chunk, the floor any
//! implementation of the design pays.
//!
//! After criterion's own report, a summary pass times each gridcast path and its baseline in
//! alternating rounds and prints one line per case with MiB/s and the median of per-round ratios
//! (robust on a shared, noisy machine).

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::disallowed_methods)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

use gridcast::keys::ChannelKey;
use gridcast::stream::header::SignedChunkHeader;
use gridcast::stream::{
    ChunkFlags, ChunkPublisher, CodedChunk, CodingParams, HeaderVerifier, PartialChunk, ShardCoder,
};

const SIZES: [usize; 4] = [16 * 1024, 32 * 1024, 256 * 1024, 1024 * 1024];
const PARAMS: [(u8, u8); 2] = [(8, 8), (16, 16)];

fn payload(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
        .collect()
}

fn key() -> ChannelKey {
    ChannelKey::from_seed(&[0x5a; 32])
}

/// Raw encode: the padded chunk already laid out, a reused encoder, BLAKE3 of all N shards.
struct RawSource {
    encoder: ReedSolomonEncoder,
    padded: Vec<u8>,
    s: usize,
}

impl RawSource {
    fn new(p: CodingParams, data: &[u8]) -> Self {
        let s = p.shard_len(data.len());
        let mut padded = data.to_vec();
        padded.resize(p.original() * s, 0);
        Self {
            encoder: ReedSolomonEncoder::new(p.original(), p.recovery(), s).unwrap(),
            padded,
            s,
        }
    }

    fn run(&mut self) -> u8 {
        let mut acc = 0u8;
        for shard in self.padded.chunks_exact(self.s) {
            self.encoder.add_original_shard(shard).unwrap();
            acc ^= blake3::hash(shard).as_bytes()[0];
        }
        let result = self.encoder.encode().unwrap();
        for rec in result.recovery_iter() {
            acc ^= blake3::hash(rec).as_bytes()[0];
        }
        acc
    }
}

/// Which K shards a peer holds.
fn held(p: CodingParams, lossy: bool) -> Vec<usize> {
    let k = p.original();
    if !lossy {
        return (0..k).collect();
    }
    // Lose the first half of the originals; take that many recovery shards instead.
    let lost = k / 2;
    (lost..k).chain(k..k + lost).collect()
}

/// Raw decode: a reused decoder fed the same K shards, BLAKE3 of each.
struct RawPeer {
    decoder: ReedSolomonDecoder,
    p: CodingParams,
    s: usize,
    shards: Vec<(usize, Bytes)>,
}

impl RawPeer {
    fn new(p: CodingParams, coded: &CodedChunk, lossy: bool) -> Self {
        let s = coded.header().header.shard_len();
        Self {
            decoder: ReedSolomonDecoder::new(p.original(), p.recovery(), s).unwrap(),
            p,
            s,
            shards: held(p, lossy)
                .into_iter()
                .map(|i| (i, coded.shards()[i].clone()))
                .collect(),
        }
    }

    fn run(&mut self) -> u8 {
        let k = self.p.original();
        let mut acc = 0u8;
        let mut missing_original = false;
        for (i, shard) in &self.shards {
            acc ^= blake3::hash(shard).as_bytes()[0];
            if *i < k {
                self.decoder.add_original_shard(*i, shard).unwrap();
            } else {
                missing_original = true;
                self.decoder.add_recovery_shard(*i - k, shard).unwrap();
            }
        }
        if missing_original {
            let result = self.decoder.decode().unwrap();
            for (_, restored) in result.restored_original_iter() {
                acc ^= restored[0];
            }
        } else {
            // Nothing to decode; a raw user would read the originals where they are.
            self.decoder.reset(k, self.p.recovery(), self.s).unwrap();
        }
        acc
    }
}

/// The gridcast peer path over a ring of pre-published chunks with distinct sequence numbers.
struct GridPeer {
    verifier: HeaderVerifier,
    coder: ShardCoder,
    chunks: Vec<(SignedChunkHeader, Vec<(usize, Bytes)>)>,
    next: usize,
}

impl GridPeer {
    fn new(p: CodingParams, data: &Bytes, lossy: bool) -> Self {
        let mut publisher = ChunkPublisher::new(key(), p);
        let chunks = (0..64u64)
            .map(|seq| {
                let coded = publisher
                    .publish(seq, seq, ChunkFlags::empty(), data)
                    .unwrap();
                let shards = held(p, lossy)
                    .into_iter()
                    .map(|i| (i, coded.shards()[i].clone()))
                    .collect();
                ((**coded.header()).clone(), shards)
            })
            .collect();
        Self {
            // Capacity 1: every chunk's header is verified afresh, as in steady state.
            verifier: HeaderVerifier::new(key().channel_id(), 1),
            coder: ShardCoder::new(),
            chunks,
            next: 0,
        }
    }

    fn run(&mut self) -> usize {
        let (header, shards) = &self.chunks[self.next % self.chunks.len()];
        self.next += 1;
        let header: Arc<SignedChunkHeader> = self.verifier.verify(header.clone()).unwrap();
        let mut partial = PartialChunk::new(header);
        for (i, shard) in shards {
            partial.insert(*i, shard.clone()).unwrap();
        }
        partial.rebuild(&mut self.coder).unwrap().len()
    }
}

fn criterion_benches(c: &mut Criterion) {
    for (k, r) in PARAMS {
        let p = CodingParams::new(k, r).unwrap();
        let mut group = c.benchmark_group(format!("stream/k{k}r{r}"));
        group
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sample_size(20);
        for len in SIZES {
            let data = payload(len);
            group.throughput(Throughput::Bytes(len as u64));
            let mut publisher = ChunkPublisher::new(key(), p);
            let mut seq = 0u64;
            group.bench_function(BenchmarkId::new("source/gridcast", len), |b| {
                b.iter(|| {
                    seq += 1;
                    black_box(
                        publisher
                            .publish(seq, 0, ChunkFlags::empty(), &data)
                            .unwrap(),
                    )
                });
            });
            let mut raw = RawSource::new(p, &data);
            group.bench_function(BenchmarkId::new("source/raw", len), |b| {
                b.iter(|| black_box(raw.run()));
            });
            for lossy in [false, true] {
                let case = if lossy { "lossy" } else { "intact" };
                let mut grid = GridPeer::new(p, &data, lossy);
                group.bench_function(
                    BenchmarkId::new(format!("peer-{case}/gridcast"), len),
                    |b| {
                        b.iter(|| black_box(grid.run()));
                    },
                );
                let coded = ChunkPublisher::new(key(), p)
                    .publish(0, 0, ChunkFlags::empty(), &data)
                    .unwrap();
                let mut raw = RawPeer::new(p, &coded, lossy);
                group.bench_function(BenchmarkId::new(format!("peer-{case}/raw"), len), |b| {
                    b.iter(|| black_box(raw.run()));
                });
            }
        }
        group.finish();
    }
}

/// Seconds per call of `f`, timed over a batch.
fn time_batch(iters: u32, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed().as_secs_f64() / f64::from(iters)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `grid` and `raw` in alternating rounds; returns (grid s/op, raw s/op, median ratio of
/// raw time to grid time, i.e. grid throughput as a fraction of raw).
fn compare(len: usize, mut grid: impl FnMut(), mut raw: impl FnMut()) -> (f64, f64, f64) {
    let iters = (8 * 1024 * 1024 / len).clamp(4, 256) as u32;
    // Warm up both.
    time_batch(iters, &mut grid);
    time_batch(iters, &mut raw);
    let (mut gs, mut rs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..15 {
        let g = time_batch(iters, &mut grid);
        let r = time_batch(iters, &mut raw);
        gs.push(g);
        rs.push(r);
        ratios.push(r / g);
    }
    (median(gs), median(rs), median(ratios))
}

fn mibs(len: usize, secs: f64) -> f64 {
    len as f64 / secs / (1024.0 * 1024.0)
}

fn summary() {
    let k = key();
    let channel = k.channel_id();
    let msg = [7u8; 600];
    let sig = k.sign(&msg);
    let sign_s = time_batch(2000, || {
        black_box(k.sign(black_box(&msg)));
    });
    let verify_s = time_batch(2000, || {
        black_box(channel.verify(black_box(&msg), &sig));
    });
    println!();
    println!(
        "ed25519 sign_us={:.1} verify_us={:.1} (ring, per chunk)",
        sign_s * 1e6,
        verify_s * 1e6
    );
    for (kk, rr) in PARAMS {
        let p = CodingParams::new(kk, rr).unwrap();
        for len in SIZES {
            let data = payload(len);
            let mut publisher = ChunkPublisher::new(key(), p);
            let mut seq = 0u64;
            let mut raw = RawSource::new(p, &data);
            let (g, r, ratio) = compare(
                len,
                || {
                    seq += 1;
                    black_box(
                        publisher
                            .publish(seq, 0, ChunkFlags::empty(), &data)
                            .unwrap(),
                    );
                },
                || {
                    black_box(raw.run());
                },
            );
            println!(
                "stream path=source k={kk} r={rr} chunk_bytes={len} gridcast_mibs={:.0} raw_rs_blake3_mibs={:.0} ratio={ratio:.2} ratio_vs_raw_plus_sign={:.2}",
                mibs(len, g),
                mibs(len, r),
                (r + sign_s) / g,
            );
            for lossy in [false, true] {
                let case = if lossy { "lossy" } else { "intact" };
                let mut grid = GridPeer::new(p, &data, lossy);
                let coded = ChunkPublisher::new(key(), p)
                    .publish(0, 0, ChunkFlags::empty(), &data)
                    .unwrap();
                let mut raw = RawPeer::new(p, &coded, lossy);
                let (g, r, ratio) = compare(
                    len,
                    || {
                        black_box(grid.run());
                    },
                    || {
                        black_box(raw.run());
                    },
                );
                println!(
                    "stream path=peer-{case} k={kk} r={rr} chunk_bytes={len} gridcast_mibs={:.0} raw_rs_blake3_mibs={:.0} ratio={ratio:.2} ratio_vs_raw_plus_verify={:.2}",
                    mibs(len, g),
                    mibs(len, r),
                    (r + verify_s) / g,
                );
            }
        }
    }
}

fn main() {
    // `cargo bench -- --summary-only` skips criterion's per-bench report.
    let summary_only = std::env::args().any(|a| a == "--summary-only");
    if !summary_only {
        let mut c = Criterion::default().configure_from_args();
        criterion_benches(&mut c);
        c.final_summary();
    }
    summary();
}
