//! Erasure coding of chunks into shards with reed-solomon-simd, and back.
//!
//! Geometry: a chunk of `L` payload bytes with parameters (K, R) becomes N = K + R shards of
//! `S = even(ceil(L / K))` bytes each (reed-solomon-simd needs an even, non-zero size). Original
//! shard *i* is bytes `[i·S, (i+1)·S)` of the payload followed by zero padding up to `K·S`; the
//! padding is never sent as payload because the signed header records `L`. Recovery shards are
//! the reed-solomon-simd recovery shards of those K originals, so any node that holds any K
//! shards computes the same N shards bit for bit ([`ShardCoder::regenerate`]).
//!
//! One [`ShardCoder`] per thread keeps a reed-solomon-simd encoder and decoder and `reset`s them
//! for each chunk, so coder working space is allocated once, not per chunk. Encoding writes all
//! N shards into one buffer and hands out [`Bytes`] slices of it: fan-out shares those slices.

use bytes::{Bytes, BytesMut};
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

use super::decode_maps::DecodeMaps;
use super::{MAX_CHUNK_PAYLOAD, MAX_ORIGINAL_SHARDS, MAX_RECOVERY_SHARDS};

/// Validated erasure-coding parameters: K original and R recovery shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CodingParams {
    k: u8,
    r: u8,
}

/// Why a (K, R) pair was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    /// K is zero or above the limit.
    #[error("original shard count K={0} is outside 1..={MAX_ORIGINAL_SHARDS}")]
    OriginalCount(u8),
    /// R is zero or above the limit.
    #[error("recovery shard count R={0} is outside 1..={MAX_RECOVERY_SHARDS}")]
    RecoveryCount(u8),
}

impl CodingParams {
    /// The defaults: K = 8, R = 8 (N = 16; any 8 of 16 substreams rebuild the stream).
    pub const DEFAULT: Self = Self { k: 8, r: 8 };

    /// Checks `k` and `r` against the protocol limits.
    pub const fn new(k: u8, r: u8) -> Result<Self, ParamsError> {
        if k == 0 || k > MAX_ORIGINAL_SHARDS {
            return Err(ParamsError::OriginalCount(k));
        }
        if r == 0 || r > MAX_RECOVERY_SHARDS {
            return Err(ParamsError::RecoveryCount(r));
        }
        Ok(Self { k, r })
    }

    /// K: how many shards rebuild a chunk.
    pub const fn original(self) -> usize {
        self.k as usize
    }

    /// R: how many shards beyond K exist.
    pub const fn recovery(self) -> usize {
        self.r as usize
    }

    /// N = K + R: shards per chunk, and substreams per channel.
    pub const fn total(self) -> usize {
        self.k as usize + self.r as usize
    }

    /// Size of every shard of a chunk of `payload_len` bytes.
    pub const fn shard_len(self, payload_len: usize) -> usize {
        let per = payload_len.div_ceil(self.k as usize);
        let even = per + (per & 1);
        if even == 0 { 2 } else { even }
    }
}

impl Default for CodingParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why coding a chunk failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodingError {
    /// The payload is empty or larger than [`MAX_CHUNK_PAYLOAD`].
    #[error("chunk payload of {0} bytes is outside 1..={MAX_CHUNK_PAYLOAD}")]
    PayloadLength(usize),
    /// Fewer than K shards are present.
    #[error("{have} shards present, {need} needed to rebuild")]
    NotEnoughShards {
        /// Shards present.
        have: usize,
        /// K.
        need: usize,
    },
    /// The shard slice does not have N entries.
    #[error("{got} shard slots given, the chunk has {expected}")]
    ShardCount {
        /// N.
        expected: usize,
        /// Slots given.
        got: usize,
    },
    /// A shard has the wrong size for this chunk.
    #[error("shard {index} is {got} bytes, the chunk's shards are {expected}")]
    ShardLength {
        /// The shard.
        index: usize,
        /// The chunk's shard size.
        expected: usize,
        /// Its size.
        got: usize,
    },
    /// reed-solomon-simd refused the operation (a bug here, never the network's doing).
    #[error("reed-solomon: {0}")]
    ReedSolomon(String),
}

fn rs(e: reed_solomon_simd::Error) -> CodingError {
    CodingError::ReedSolomon(e.to_string())
}

/// Counters kept by a [`ShardCoder`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodingStats {
    /// Chunks encoded into shards.
    pub encoded: u64,
    /// Chunks rebuilt by reed-solomon decoding (some original shard was missing).
    pub decoded: u64,
    /// Decode maps built: the first chunk decoded with a given set of shards pays one
    /// library decode to find its map, later ones reuse it (`decode_maps`).
    pub maps_built: u64,
    /// Chunks rebuilt by concatenation because every original holding payload bytes was
    /// present (the originals after them are pure padding).
    pub decode_skipped: u64,
    /// Shards computed by regeneration.
    pub regenerated_shards: u64,
}

/// A rebuilt chunk: its bytes as an ordered list of shared parts (the original shards, trimmed
/// to the payload length). Write the parts in order, e.g. with vectored I/O, to output the chunk
/// without copying it; [`Payload::to_bytes`] makes one contiguous buffer when one is needed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload {
    parts: Vec<Bytes>,
    len: usize,
}

impl Payload {
    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The parts, in order.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// The bytes in one buffer; free when there is a single part, one copy otherwise.
    pub fn to_bytes(&self) -> Bytes {
        match self.parts.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            parts => {
                let mut out = BytesMut::with_capacity(self.len);
                for part in parts {
                    out.extend_from_slice(part);
                }
                out.freeze()
            }
        }
    }
}

/// Reusable erasure coder: one per thread, reused for every chunk.
#[derive(Default)]
pub struct ShardCoder {
    encoder: Option<ReedSolomonEncoder>,
    decoder: Option<ReedSolomonDecoder>,
    maps: DecodeMaps,
    stats: CodingStats,
}

impl std::fmt::Debug for ShardCoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardCoder")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl ShardCoder {
    /// A coder with no working space yet; the first chunk allocates it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counters so far.
    pub fn stats(&self) -> CodingStats {
        CodingStats {
            maps_built: self.maps.built(),
            ..self.stats
        }
    }

    fn encoder(
        &mut self,
        params: CodingParams,
        shard_len: usize,
    ) -> Result<&mut ReedSolomonEncoder, CodingError> {
        let (k, r) = (params.original(), params.recovery());
        match &mut self.encoder {
            Some(enc) => enc.reset(k, r, shard_len).map_err(rs)?,
            slot @ None => *slot = Some(ReedSolomonEncoder::new(k, r, shard_len).map_err(rs)?),
        }
        self.encoder
            .as_mut()
            .ok_or_else(|| CodingError::ReedSolomon("encoder missing".into()))
    }

    fn decoder(
        &mut self,
        params: CodingParams,
        shard_len: usize,
    ) -> Result<&mut ReedSolomonDecoder, CodingError> {
        let (k, r) = (params.original(), params.recovery());
        match &mut self.decoder {
            Some(dec) => dec.reset(k, r, shard_len).map_err(rs)?,
            slot @ None => *slot = Some(ReedSolomonDecoder::new(k, r, shard_len).map_err(rs)?),
        }
        self.decoder
            .as_mut()
            .ok_or_else(|| CodingError::ReedSolomon("decoder missing".into()))
    }

    /// Encodes `payload` into its N shards, in substream order.
    ///
    /// Original shards that lie wholly inside the payload are zero-copy slices of it; the
    /// padded tail originals share one small buffer and the recovery shards another. The only
    /// bytes copied are the tail and what reed-solomon-simd computes.
    pub fn encode(
        &mut self,
        params: CodingParams,
        payload: &Bytes,
    ) -> Result<Vec<Bytes>, CodingError> {
        let len = payload.len();
        if len == 0 || len > MAX_CHUNK_PAYLOAD {
            return Err(CodingError::PayloadLength(len));
        }
        let k = params.original();
        let s = params.shard_len(len);
        let whole = len / s;
        let mut shards = Vec::with_capacity(params.total());
        for i in 0..whole {
            shards.push(payload.slice(i * s..(i + 1) * s));
        }
        if whole < k {
            let mut tail = BytesMut::with_capacity((k - whole) * s);
            tail.extend_from_slice(&payload[whole * s..]);
            tail.resize((k - whole) * s, 0);
            let tail = tail.freeze();
            for i in 0..k - whole {
                shards.push(tail.slice(i * s..(i + 1) * s));
            }
        }
        let encoder = self.encoder(params, s)?;
        for shard in &shards {
            encoder.add_original_shard(shard).map_err(rs)?;
        }
        let result = encoder.encode().map_err(rs)?;
        let mut recovery = BytesMut::with_capacity(params.recovery() * s);
        for shard in result.recovery_iter() {
            recovery.extend_from_slice(shard);
        }
        drop(result);
        let recovery = recovery.freeze();
        for j in 0..params.recovery() {
            shards.push(recovery.slice(j * s..(j + 1) * s));
        }
        self.stats.encoded += 1;
        Ok(shards)
    }

    /// Checks the shard slots against the chunk geometry and counts the shards present.
    fn check_shards(
        params: CodingParams,
        payload_len: usize,
        shards: &[Option<Bytes>],
    ) -> Result<usize, CodingError> {
        if payload_len == 0 || payload_len > MAX_CHUNK_PAYLOAD {
            return Err(CodingError::PayloadLength(payload_len));
        }
        if shards.len() != params.total() {
            return Err(CodingError::ShardCount {
                expected: params.total(),
                got: shards.len(),
            });
        }
        let s = params.shard_len(payload_len);
        let mut have = 0;
        for (index, shard) in shards.iter().enumerate() {
            if let Some(shard) = shard {
                if shard.len() != s {
                    return Err(CodingError::ShardLength {
                        index,
                        expected: s,
                        got: shard.len(),
                    });
                }
                have += 1;
            }
        }
        if have < params.original() {
            return Err(CodingError::NotEnoughShards {
                have,
                need: params.original(),
            });
        }
        Ok(have)
    }

    /// Restores the missing originals from the first K present shards; calls `use_restored`
    /// with each restored original shard, ascending. Only called when some original is
    /// missing. A map kept for the set of shards fed does it when it is the cheaper way (see
    /// `decode_maps`), else reed-solomon-simd's decoder.
    fn decode_missing(
        &mut self,
        params: CodingParams,
        s: usize,
        shards: &[Option<Bytes>],
        mut use_restored: impl FnMut(usize, &[u8]),
    ) -> Result<(), CodingError> {
        let k = params.original();
        let fed: Vec<(usize, &[u8])> = shards
            .iter()
            .enumerate()
            .filter_map(|(i, shard)| shard.as_deref().map(|b| (i, b)))
            .take(k)
            .collect();
        if self
            .maps
            .restore(k, params.recovery(), s, &fed, &mut use_restored)
            .is_ok()
        {
            self.stats.decoded += 1;
            return Ok(());
        }
        let decoder = self.decoder(params, s)?;
        for &(index, shard) in &fed {
            if index < k {
                decoder.add_original_shard(index, shard).map_err(rs)?;
            } else {
                decoder.add_recovery_shard(index - k, shard).map_err(rs)?;
            }
        }
        let result = decoder.decode().map_err(rs)?;
        for (index, restored) in result.restored_original_iter() {
            use_restored(index, restored);
        }
        drop(result);
        self.stats.decoded += 1;
        Ok(())
    }

    /// Rebuilds the chunk's exact payload from any K of its shards (`shards[i]` is shard *i* or
    /// `None`). Shards must already be verified; this only checks their sizes.
    ///
    /// The result is the K original shards trimmed to the payload length, as [`Payload`] parts:
    /// originals that arrived are shared, not copied, so with all K originals present nothing is
    /// decoded or copied at all. Restored originals are copied once out of the decoder.
    pub fn rebuild(
        &mut self,
        params: CodingParams,
        payload_len: usize,
        shards: &[Option<Bytes>],
    ) -> Result<Payload, CodingError> {
        Self::check_shards(params, payload_len, shards)?;
        let k = params.original();
        let s = params.shard_len(payload_len);
        let originals = &shards[..k];
        // Originals past this index are pure padding.
        let used = payload_len.div_ceil(s);
        let mut restored = Bytes::new();
        let mut restored_at = Vec::new();
        if originals[..used].iter().all(Option::is_some) {
            self.stats.decode_skipped += 1;
        } else {
            let mut buf = BytesMut::new();
            self.decode_missing(params, s, shards, |index, shard| {
                if index < used {
                    restored_at.push(index);
                    buf.extend_from_slice(shard);
                }
            })?;
            restored = buf.freeze();
        }
        let mut parts = Vec::with_capacity(used);
        for (index, shard) in originals[..used].iter().enumerate() {
            let part_len = s.min(payload_len - index * s);
            let part = match shard {
                Some(shard) => shard.slice(..part_len),
                None => {
                    let at = restored_at
                        .iter()
                        .position(|&i| i == index)
                        .ok_or_else(|| {
                            CodingError::ReedSolomon(format!("original {index} not restored"))
                        })?;
                    restored.slice(at * s..at * s + part_len)
                }
            };
            parts.push(part);
        }
        Ok(Payload {
            parts,
            len: payload_len,
        })
    }

    /// Fills every empty slot of `shards` from the K or more present ones. The new shards are
    /// byte-identical to the source's, so they verify against the signed hashes. Returns how many
    /// shards were computed.
    pub fn regenerate(
        &mut self,
        params: CodingParams,
        payload_len: usize,
        shards: &mut [Option<Bytes>],
    ) -> Result<usize, CodingError> {
        let have = Self::check_shards(params, payload_len, shards)?;
        let missing = params.total() - have;
        if missing == 0 {
            return Ok(0);
        }
        let k = params.original();
        let s = params.shard_len(payload_len);
        // One buffer holds every shard we compute; each slot gets a slice of it.
        let mut fresh = BytesMut::with_capacity(missing * s);
        let mut fresh_index = Vec::with_capacity(missing);

        // Step 1: every original shard, restored ones computed by decoding.
        let originals_missing = shards[..k].iter().any(Option::is_none);
        let mut restored_originals = BytesMut::new();
        if originals_missing {
            restored_originals = BytesMut::zeroed(k * s);
            self.decode_missing(params, s, shards, |index, restored| {
                copy_full_shard(&mut restored_originals, index, s, restored);
            })?;
            for (index, shard) in shards[..k].iter().enumerate() {
                if shard.is_none() {
                    fresh.extend_from_slice(&restored_originals[index * s..(index + 1) * s]);
                    fresh_index.push(index);
                }
            }
        }

        // Step 2: recovery shards, by encoding the complete originals.
        if shards[k..].iter().any(Option::is_none) {
            let encoder = self.encoder(params, s)?;
            for (index, shard) in shards[..k].iter().enumerate() {
                match shard {
                    Some(shard) => encoder.add_original_shard(shard).map_err(rs)?,
                    None => encoder
                        .add_original_shard(&restored_originals[index * s..(index + 1) * s])
                        .map_err(rs)?,
                }
            }
            let result = encoder.encode().map_err(rs)?;
            for (j, recovery) in result.recovery_iter().enumerate() {
                if shards[k + j].is_none() {
                    fresh.extend_from_slice(recovery);
                    fresh_index.push(k + j);
                }
            }
        }

        let fresh = fresh.freeze();
        for (n, index) in fresh_index.iter().enumerate() {
            shards[*index] = Some(fresh.slice(n * s..(n + 1) * s));
        }
        self.stats.regenerated_shards += missing as u64;
        Ok(missing)
    }
}

fn copy_full_shard(out: &mut [u8], index: usize, s: usize, shard: &[u8]) {
    out[index * s..(index + 1) * s].copy_from_slice(shard);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(all: &[Bytes]) -> Vec<Option<Bytes>> {
        all.iter().cloned().map(Some).collect()
    }

    #[test]
    fn geometry_is_even_and_covers_payload() {
        let p = CodingParams::DEFAULT;
        assert_eq!(p.shard_len(1), 2);
        assert_eq!(p.shard_len(16), 2);
        assert_eq!(p.shard_len(17), 4);
        assert_eq!(p.shard_len(8000), 1000);
        assert_eq!(p.shard_len(8001), 1002);
        assert!(CodingParams::new(0, 1).is_err());
        assert!(CodingParams::new(1, 0).is_err());
        assert!(CodingParams::new(65, 1).is_err());
    }

    #[test]
    fn missing_padding_originals_skip_decoding() {
        // A 1-byte chunk lives in original 0; originals 1..5 are padding, so losing one of
        // them costs no decode (the case proptest found).
        let p = CodingParams::new(5, 1).unwrap();
        let mut coder = ShardCoder::new();
        let payload = Bytes::from_static(&[0x5a]);
        let all = coder.encode(p, &payload).unwrap();
        let mut shards = split(&all);
        shards[1] = None;
        let rebuilt = coder.rebuild(p, payload.len(), &shards).unwrap();
        assert_eq!(rebuilt.to_bytes(), payload);
        assert_eq!(coder.stats().decode_skipped, 1);
        assert_eq!(coder.stats().decoded, 0);
    }

    #[test]
    fn all_originals_skip_decoding() {
        let p = CodingParams::DEFAULT;
        let payload: Vec<u8> = (0..10_001u32).map(|i| (i * 7) as u8).collect();
        let mut coder = ShardCoder::new();
        let payload = Bytes::from(payload);
        let all = coder.encode(p, &payload).unwrap();
        // Whole originals are slices of the payload itself: no copy.
        assert_eq!(all[0].as_ptr(), payload.as_ptr());
        let mut shards = split(&all);
        for slot in &mut shards[8..] {
            *slot = None;
        }
        let rebuilt = coder.rebuild(p, payload.len(), &shards).unwrap();
        assert_eq!(rebuilt.to_bytes(), payload);
        assert_eq!(rebuilt.parts()[0].as_ptr(), payload.as_ptr());
        assert_eq!(coder.stats().decode_skipped, 1);
        assert_eq!(coder.stats().decoded, 0);
    }

    #[test]
    fn too_few_or_wrong_size_shards_are_errors() {
        let p = CodingParams::new(4, 2).unwrap();
        let payload = Bytes::from(vec![1u8; 1000]);
        let mut coder = ShardCoder::new();
        let all = coder.encode(p, &payload).unwrap();
        let mut shards = split(&all);
        shards[0] = None;
        shards[1] = None;
        shards[2] = None;
        assert_eq!(
            coder.rebuild(p, 1000, &shards),
            Err(CodingError::NotEnoughShards { have: 3, need: 4 })
        );
        let mut shards = split(&all);
        shards[5] = Some(Bytes::from_static(b"xx"));
        assert!(matches!(
            coder.rebuild(p, 1000, &shards),
            Err(CodingError::ShardLength { index: 5, .. })
        ));
        assert_eq!(
            coder.encode(p, &Bytes::new()),
            Err(CodingError::PayloadLength(0))
        );
    }
}
