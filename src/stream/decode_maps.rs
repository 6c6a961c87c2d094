//! Restoring missing original shards with a linear map kept per erasure pattern.
//!
//! reed-solomon-simd's decoder pays a fixed price on every call, whatever the shard size: it
//! evaluates the erasure locator with two Walsh–Hadamard transforms over all 65,536 elements
//! of GF(2^16). On this project's machines that is about 200 µs a chunk, against 3 µs to
//! encode a radio chunk of 2 KB shards, and every relay and every serving peer whose first K
//! shards of a chunk are not the K originals pays it on every chunk.
//!
//! The pattern repeats: a node draws the same substreams chunk after chunk, so the shards it
//! holds when it decodes are mostly the same few sets. And the code is linear over GF(2^16)
//! (addition is XOR of the 16-bit symbols, lane by lane), so for a given set of K fed shards
//! each missing original is a fixed combination `Σ c_p · shard_p`, the same for every symbol
//! position. The coefficients come from one library decode of unit vectors: fed shard `p`
//! carries the field's one in symbol lane `p` and zero elsewhere, so restored original `m`
//! holds `c_{m,p}` in lane `p`. Applying a map costs a multiply and an XOR per coefficient
//! over the shard, with the library's own SIMD multiply ([`Engine::mul`]), Horner-style so
//! that nothing is copied per term.
//!
//! Symbols live in the library's layout, as its decoder sees the bytes it is given: each whole
//! 64 bytes of a shard hold 32 symbols, low bytes first, then high bytes; a shorter tail of
//! `t` bytes puts its first `t / 2` bytes in the low half of a last block and the rest in the
//! high half (reed-solomon-simd's `algorithm.md`). Results are checked against the library's
//! own decode in this module's tests and in `tests/stream_props.rs`.

use reed_solomon_simd::ReedSolomonDecoder;
use reed_solomon_simd::engine::tables::get_exp_log;
use reed_solomon_simd::engine::{DefaultEngine, Engine, GF_MODULUS, GfElement};

/// Patterns kept; the least recently used goes first.
const MAPS: usize = 32;

/// When a map is cheaper than the library's decode, in units of one byte multiplied and added
/// by a map (about 0.1 ns on the machines measured). A map costs `missing × K × shard bytes`
/// of them. The library's decode costs a fixed ~200 µs (`FIXED`) plus transforms over every
/// shard, about 0.5 ns per byte of each of the `K + R` (`PER_SHARD_BYTE`; 0.45 at 8 + 8 up to
/// about 1 at 64 + 64, so the rule leans to the library where N is large). Measured in one
/// run, half the originals missing unless said: 8 + 8 with 256 KB shards, library 2,100 µs
/// against a map's 830; 16 + 16 with 64 KB, 1,370 against 810; 32 + 32 with 16 KB, 920
/// against 805; 32 + 32 with 8 KB and every original missing, 670 against 805 (the library);
/// 64 + 64 with 4 KB, 710 against 810 (the library).
const FIXED: usize = 2 << 20;
const PER_SHARD_BYTE: usize = 6;

fn map_pays(k: usize, r: usize, missing: usize, shard_len: usize) -> bool {
    let map = missing.saturating_mul(k).saturating_mul(shard_len);
    let library = shard_len
        .saturating_mul(k + r)
        .saturating_mul(PER_SHARD_BYTE)
        .saturating_add(FIXED);
    map <= library
}

/// One restored original: its index and, for each fed shard in order, the logarithm of its
/// coefficient (`None` for zero).
#[derive(Debug)]
struct Row {
    original: usize,
    logs: Vec<Option<GfElement>>,
}

#[derive(Debug)]
struct Map {
    k: usize,
    r: usize,
    /// The fed shards, as a bit per shard index (N ≤ 128).
    fed: u128,
    rows: Vec<Row>,
}

/// The maps a coder has built, and the working space to apply them.
pub(crate) struct DecodeMaps {
    engine: DefaultEngine,
    maps: Vec<Map>,
    /// The library decoder the maps are found with (64-byte unit shards).
    probe: Option<ReedSolomonDecoder>,
    acc: Vec<[u8; 64]>,
    built: u64,
}

impl std::fmt::Debug for DecodeMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeMaps")
            .field("maps", &self.maps.len())
            .field("built", &self.built)
            .finish_non_exhaustive()
    }
}

impl Default for DecodeMaps {
    fn default() -> Self {
        Self {
            engine: DefaultEngine::new(),
            maps: Vec::new(),
            probe: None,
            acc: Vec::new(),
            built: 0,
        }
    }
}

/// Why a map could not be used; the caller decodes with the library instead.
#[derive(Debug)]
pub(crate) struct NoMap;

impl DecodeMaps {
    /// Maps built so far (each cost one library decode).
    pub(crate) fn built(&self) -> u64 {
        self.built
    }

    /// Restores the missing originals of a (`k`, `r`) chunk from the `fed` shards (exactly
    /// `k` of them: `(index, bytes)`, indices ascending, originals `< k`), calling `restored`
    /// with each missing original's index and bytes, ascending. Returns [`NoMap`] (having
    /// called nothing) when a map would cost more than the library's decode.
    pub(crate) fn restore(
        &mut self,
        k: usize,
        r: usize,
        shard_len: usize,
        fed: &[(usize, &[u8])],
        mut restored: impl FnMut(usize, &[u8]),
    ) -> Result<(), NoMap> {
        let missing = k - fed.iter().filter(|&&(i, _)| i < k).count().min(k);
        if fed.len() != k
            || k + r > 128
            || !shard_len.is_multiple_of(2)
            || !map_pays(k, r, missing, shard_len)
        {
            return Err(NoMap);
        }
        let mask = fed.iter().fold(0u128, |m, &(i, _)| m | 1u128 << i);
        let map = match self
            .maps
            .iter()
            .position(|m| m.k == k && m.r == r && m.fed == mask)
        {
            Some(at) => self.maps.remove(at),
            None => {
                let map = self.build(k, r, mask, fed)?;
                if self.maps.len() == MAPS {
                    self.maps.remove(0);
                }
                map
            }
        };
        let whole = shard_len / 64;
        let tail = shard_len % 64;
        let blocks = whole + usize::from(tail > 0);
        let mut out = vec![0u8; shard_len];
        for row in &map.rows {
            self.acc.clear();
            self.acc.resize(blocks, [0; 64]);
            let mut last: Option<GfElement> = None;
            for (&(_, bytes), log) in fed.iter().zip(&row.logs) {
                let Some(log) = *log else { continue };
                if let Some(prev) = last {
                    // acc = acc · c_prev / c_this, then + shard: at the end acc · c_last
                    // is the whole sum.
                    self.engine.mul(&mut self.acc, sub_mod(prev, log));
                }
                xor_in(&mut self.acc, bytes, whole, tail);
                last = Some(log);
            }
            if let Some(last) = last {
                self.engine.mul(&mut self.acc, last);
            }
            read_out(&self.acc, &mut out, whole, tail);
            restored(row.original, &out);
        }
        // Most recently used last.
        self.maps.push(map);
        Ok(())
    }

    /// Finds the map for one pattern with a library decode of unit vectors.
    fn build(
        &mut self,
        k: usize,
        r: usize,
        fed_mask: u128,
        fed: &[(usize, &[u8])],
    ) -> Result<Map, NoMap> {
        let one = get_exp_log().exp[0];
        // One symbol lane per fed shard: 32 lanes per 64-byte block.
        let probe_len = 64 * k.div_ceil(32);
        let decoder = match &mut self.probe {
            Some(d) => {
                d.reset(k, r, probe_len).map_err(|_| NoMap)?;
                d
            }
            slot @ None => {
                slot.insert(ReedSolomonDecoder::new(k, r, probe_len).map_err(|_| NoMap)?)
            }
        };
        let mut unit = vec![0u8; probe_len];
        for (lane, &(index, _)) in fed.iter().enumerate() {
            unit.fill(0);
            let (block, at) = (lane / 32, lane % 32);
            unit[block * 64 + at] = one as u8;
            unit[block * 64 + 32 + at] = (one >> 8) as u8;
            let added = if index < k {
                decoder.add_original_shard(index, &unit)
            } else {
                decoder.add_recovery_shard(index - k, &unit)
            };
            added.map_err(|_| NoMap)?;
        }
        let result = decoder.decode().map_err(|_| NoMap)?;
        let log = &get_exp_log().log;
        let mut rows: Vec<Row> = result
            .restored_original_iter()
            .map(|(original, bytes)| Row {
                original,
                logs: (0..fed.len())
                    .map(|lane| {
                        let (block, at) = (lane / 32, lane % 32);
                        let c = GfElement::from(bytes[block * 64 + at])
                            | GfElement::from(bytes[block * 64 + 32 + at]) << 8;
                        (c != 0).then(|| log[usize::from(c)] % GF_MODULUS)
                    })
                    .collect(),
            })
            .collect();
        rows.sort_by_key(|r| r.original);
        self.built += 1;
        Ok(Map {
            k,
            r,
            fed: fed_mask,
            rows,
        })
    }
}

/// `(a - b) mod 65535`, as a logarithm.
fn sub_mod(a: GfElement, b: GfElement) -> GfElement {
    let (a, b) = (u32::from(a), u32::from(b));
    ((a + u32::from(GF_MODULUS) - b) % u32::from(GF_MODULUS)) as GfElement
}

/// `acc += shard`, the shard's bytes taken into the library's layout.
fn xor_in(acc: &mut [[u8; 64]], shard: &[u8], whole: usize, tail: usize) {
    for (a, s) in acc[..whole].iter_mut().zip(shard.chunks_exact(64)) {
        for (x, y) in a.iter_mut().zip(s) {
            *x ^= *y;
        }
    }
    if tail > 0 {
        let rest = &shard[whole * 64..];
        let (lo, hi) = rest.split_at(tail / 2);
        let last = &mut acc[whole];
        for (x, y) in last[..lo.len()].iter_mut().zip(lo) {
            *x ^= *y;
        }
        for (x, y) in last[32..32 + hi.len()].iter_mut().zip(hi) {
            *x ^= *y;
        }
    }
}

/// The shard's bytes back out of the library's layout.
fn read_out(acc: &[[u8; 64]], out: &mut [u8], whole: usize, tail: usize) {
    for (o, a) in out.chunks_exact_mut(64).zip(&acc[..whole]) {
        o.copy_from_slice(a);
    }
    if tail > 0 {
        let half = tail / 2;
        let last = &acc[whole];
        let rest = &mut out[whole * 64..];
        rest[..half].copy_from_slice(&last[..half]);
        rest[half..].copy_from_slice(&last[32..32 + half]);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use reed_solomon_simd::ReedSolomonEncoder;

    /// The library's own decode of the same shards.
    fn library(k: usize, r: usize, fed: &[(usize, Vec<u8>)]) -> Vec<(usize, Vec<u8>)> {
        let len = fed[0].1.len();
        let mut d = ReedSolomonDecoder::new(k, r, len).unwrap();
        for (i, s) in fed {
            if *i < k {
                d.add_original_shard(*i, s).unwrap();
            } else {
                d.add_recovery_shard(*i - k, s).unwrap();
            }
        }
        let res = d.decode().unwrap();
        let mut out: Vec<_> = res
            .restored_original_iter()
            .map(|(i, s)| (i, s.to_vec()))
            .collect();
        out.sort();
        out
    }

    fn shards(k: usize, r: usize, len: usize, seed: u32) -> Vec<Vec<u8>> {
        let originals: Vec<Vec<u8>> = (0..k)
            .map(|i| {
                (0..len)
                    .map(|j| (seed.wrapping_mul(2_654_435_761) ^ (i * 131 + j * 7) as u32) as u8)
                    .collect()
            })
            .collect();
        let mut e = ReedSolomonEncoder::new(k, r, len).unwrap();
        for o in &originals {
            e.add_original_shard(o).unwrap();
        }
        let rec: Vec<Vec<u8>> = e
            .encode()
            .unwrap()
            .recovery_iter()
            .map(<[u8]>::to_vec)
            .collect();
        originals.into_iter().chain(rec).collect()
    }

    /// K shard indices out of N, chosen by `pick`'s bits (filled from the front if short).
    fn choose(k: usize, n: usize, pick: u128) -> Vec<usize> {
        let mut out: Vec<usize> = (0..n).filter(|i| pick >> i & 1 == 1).take(k).collect();
        for i in 0..n {
            if out.len() == k {
                break;
            }
            if !out.contains(&i) {
                out.push(i);
            }
        }
        out.sort_unstable();
        out
    }

    #[test]
    fn maps_restore_what_the_library_restores() {
        let mut maps = DecodeMaps::default();
        let cases = [
            (8, 8, 2),
            (8, 8, 62),
            (8, 8, 64),
            (8, 8, 66),
            (8, 8, 2050),
            (4, 2, 130),
            (1, 1, 6),
            (16, 16, 512),
            (40, 20, 96),
            (64, 64, 128),
        ];
        for (n, &(k, r, len)) in cases.iter().enumerate() {
            let all = shards(k, r, len, n as u32);
            for pick in [
                0u128,
                0xAAAA_AAAA_AAAA_AAAA,
                0x5555_5555_0000_FFFF,
                u128::MAX << 3,
            ] {
                let idx = choose(k, k + r, pick);
                let missing = (0..k).filter(|i| !idx.contains(i)).count();
                if missing == 0 {
                    continue;
                }
                let fed_owned: Vec<(usize, Vec<u8>)> =
                    idx.iter().map(|&i| (i, all[i].clone())).collect();
                let fed: Vec<(usize, &[u8])> =
                    fed_owned.iter().map(|(i, s)| (*i, s.as_slice())).collect();
                let mut got = Vec::new();
                // Twice: the second time the map is the cached one.
                for _ in 0..2 {
                    got.clear();
                    maps.restore(k, r, len, &fed, |i, s| got.push((i, s.to_vec())))
                        .unwrap();
                    assert_eq!(got, library(k, r, &fed_owned), "k={k} r={r} len={len}");
                    for (i, s) in &got {
                        assert_eq!(s, &all[*i], "k={k} r={r} len={len} original {i}");
                    }
                }
            }
        }
        assert!(maps.built() > 0);
        assert!(maps.maps.len() <= MAPS);
    }

    #[test]
    fn a_pattern_seen_again_builds_no_new_map_and_the_cache_is_bounded() {
        let mut maps = DecodeMaps::default();
        let (k, r, len) = (8, 8, 256);
        let all = shards(k, r, len, 9);
        let run = |maps: &mut DecodeMaps, idx: &[usize]| {
            let fed: Vec<(usize, &[u8])> = idx.iter().map(|&i| (i, all[i].as_slice())).collect();
            maps.restore(k, r, len, &fed, |_, _| {}).unwrap();
        };
        run(&mut maps, &[1, 2, 3, 4, 5, 6, 7, 8]);
        run(&mut maps, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(maps.built(), 1);
        // More patterns than the cache holds: the oldest go.
        for first in 0..40usize {
            let idx: Vec<usize> = (0..k).map(|j| (first + j) % 16).collect::<Vec<_>>();
            let mut idx = idx;
            idx.sort_unstable();
            if (0..k).all(|i| idx.contains(&i)) {
                continue;
            }
            run(&mut maps, &idx);
        }
        assert!(maps.maps.len() <= MAPS);
    }

    #[test]
    fn costlier_than_the_library_or_wrong_count_is_refused() {
        // 64 + 64 with every original lost and 4 KB shards: 16 Mi units against the
        // library's 5 Mi.
        assert!(!map_pays(64, 64, 64, 4096));
        assert!(map_pays(8, 8, 8, 1 << 20));
        assert!(map_pays(16, 16, 8, 64 << 10));
        let mut maps = DecodeMaps::default();
        let big = vec![0u8; 4096];
        let fed: Vec<(usize, &[u8])> = (64..128).map(|i| (i, big.as_slice())).collect();
        let mut called = false;
        assert!(
            maps.restore(64, 64, big.len(), &fed, |_, _| called = true)
                .is_err()
        );
        let small = [0u8; 4];
        let fed: Vec<(usize, &[u8])> = (1..8).map(|i| (i, small.as_slice())).collect();
        assert!(maps.restore(8, 8, 4, &fed, |_, _| called = true).is_err());
        assert!(!called);
        assert_eq!(maps.built(), 0);
    }
}
