//! One chunk being collected at a node: verified shards in, the chunk or missing shards out.
//!
//! A [`PartialChunk`] is created from a header that already passed [`super::HeaderVerifier`].
//! [`PartialChunk::insert`] checks each shard's size and BLAKE3 hash against that header before
//! storing it, so the slots only ever hold authentic shards. With K shards present the node can
//! [`rebuild`](PartialChunk::rebuild) the payload (peers) or
//! [`regenerate`](PartialChunk::regenerate) every missing shard (supernodes serving substreams
//! they did not receive).

use std::sync::Arc;

use bytes::Bytes;

use super::coding::{CodingError, Payload, ShardCoder};
use super::header::SignedChunkHeader;

/// What happened to an inserted shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Stored; the chunk now holds this many shards.
    New(usize),
    /// This shard was already held (from another neighbour, or regenerated); nothing changed.
    Duplicate,
}

/// Why a shard was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// The index is not below N.
    #[error("chunk {seq}: shard index {index} out of range (N = {total})")]
    Index {
        /// Chunk.
        seq: u64,
        /// Offending index.
        index: usize,
        /// N.
        total: usize,
    },
    /// The shard's size is not the chunk's shard size.
    #[error("chunk {seq}: shard {index} is {got} bytes, expected {expected}")]
    Length {
        /// Chunk.
        seq: u64,
        /// Shard.
        index: usize,
        /// Expected size.
        expected: usize,
        /// Size received.
        got: usize,
    },
    /// The shard's BLAKE3 hash is not the signed one: corrupted or forged.
    #[error("chunk {seq}: shard {index} does not match its signed hash")]
    Hash {
        /// Chunk.
        seq: u64,
        /// Shard.
        index: usize,
    },
}

/// The shards of one chunk collected so far, all verified.
#[derive(Debug, Clone)]
pub struct PartialChunk {
    header: Arc<SignedChunkHeader>,
    shards: Vec<Option<Bytes>>,
    held: usize,
}

impl PartialChunk {
    /// An empty chunk for a verified header.
    pub fn new(header: Arc<SignedChunkHeader>) -> Self {
        let total = header.header.params.total();
        Self {
            header,
            shards: vec![None; total],
            held: 0,
        }
    }

    /// The verified header.
    pub fn header(&self) -> &Arc<SignedChunkHeader> {
        &self.header
    }

    /// The chunk's sequence number.
    pub fn seq(&self) -> u64 {
        self.header.header.seq
    }

    /// Shards held.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Whether K shards are held, so the chunk can be rebuilt or regenerated.
    pub fn is_complete_enough(&self) -> bool {
        self.held >= self.header.header.params.original()
    }

    /// Shard `index`, if held.
    pub fn shard(&self, index: usize) -> Option<&Bytes> {
        self.shards.get(index).and_then(Option::as_ref)
    }

    /// Verifies `shard` as shard `index` and stores it. A duplicate is reported without hashing.
    pub fn insert(&mut self, index: usize, shard: Bytes) -> Result<Inserted, ShardError> {
        self.store(index, shard, true)
    }

    /// Stores shard `index` that another part of this node already verified against this same
    /// header (a worker handing shards to its siblings). Checks the index and size, not the hash:
    /// hashing every shard again on every core would double the relay's cost for nothing, since
    /// the bytes never left the process.
    pub fn insert_verified(&mut self, index: usize, shard: Bytes) -> Result<Inserted, ShardError> {
        self.store(index, shard, false)
    }

    fn store(&mut self, index: usize, shard: Bytes, hash: bool) -> Result<Inserted, ShardError> {
        let h = &self.header.header;
        let seq = h.seq;
        let total = self.shards.len();
        let Some(slot) = self.shards.get_mut(index) else {
            return Err(ShardError::Index { seq, index, total });
        };
        if slot.is_some() {
            return Ok(Inserted::Duplicate);
        }
        let expected = h.shard_len();
        if shard.len() != expected {
            return Err(ShardError::Length {
                seq,
                index,
                expected,
                got: shard.len(),
            });
        }
        if hash && !h.shard_matches(index, &shard) {
            return Err(ShardError::Hash { seq, index });
        }
        *slot = Some(shard);
        self.held += 1;
        Ok(Inserted::New(self.held))
    }

    /// Rebuilds the chunk's exact payload. Needs K shards.
    pub fn rebuild(&self, coder: &mut ShardCoder) -> Result<Payload, CodingError> {
        let h = &self.header.header;
        coder.rebuild(h.params, h.payload_len as usize, &self.shards)
    }

    /// Computes every missing shard from the K or more held ones. Each computed shard is checked
    /// against its signed hash before it is kept; a mismatch (which would mean the source's coder
    /// differs from ours) leaves that slot empty and is reported as an error.
    pub fn regenerate(&mut self, coder: &mut ShardCoder) -> Result<usize, CodingError> {
        let h = &self.header.header;
        let mut slots = self.shards.clone();
        let made = coder.regenerate(h.params, h.payload_len as usize, &mut slots)?;
        let mut mismatched = None;
        for (index, (mine, fresh)) in self.shards.iter_mut().zip(slots).enumerate() {
            if mine.is_none() {
                match fresh {
                    Some(fresh) if h.shard_matches(index, &fresh) => {
                        *mine = Some(fresh);
                        self.held += 1;
                    }
                    _ => mismatched = Some(index),
                }
            }
        }
        match mismatched {
            Some(index) => Err(CodingError::ReedSolomon(format!(
                "regenerated shard {index} of chunk {} does not match the signed hash",
                h.seq
            ))),
            None => Ok(made),
        }
    }
}
