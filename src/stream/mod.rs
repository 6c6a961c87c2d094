//! The stream model: how a live byte stream becomes verifiable, erasure-coded substreams, and
//! back.
//!
//! ```text
//!  source:  bytes ─▶ Chunker ─▶ Chunk ─▶ ChunkPublisher ─▶ SignedChunkHeader + N shards
//!                                         (ShardCoder::encode, BLAKE3 per shard, Ed25519 sign)
//!
//!  any hop: SignedChunkHeader ─▶ HeaderVerifier (signature once per chunk, cached by content)
//!           shard i ─▶ PartialChunk::insert (length + BLAKE3 against the header) ─▶ stored
//!           K shards ─▶ PartialChunk::regenerate ─▶ any missing shard, byte-identical
//!
//!  peer:    K shards ─▶ PartialChunk::rebuild ─▶ the chunk's exact bytes, in order
//! ```
//!
//! Shard *i* of every chunk forms substream *i*. Everything here is pure: no clock, no I/O;
//! callers pass `now` where time matters (only the [`Chunker`] cares).
//!
//! Invariants a caller can rely on:
//! - a [`PartialChunk`] only ever holds shards whose BLAKE3 hash matches a header whose
//!   signature was checked, so nothing forged or corrupted reaches [`PartialChunk::rebuild`];
//! - [`ShardCoder`] keeps its reed-solomon-simd encoder and decoder between chunks; coding a
//!   chunk allocates only the output buffers.

pub mod assembler;
pub mod chunker;
pub mod coding;
mod decode_maps;
mod framing;
pub mod header;
pub mod publisher;
pub mod verifier;

pub use assembler::{Inserted, PartialChunk, ShardError};
pub use chunker::{Chunk, Chunker, ChunkerConfig, ChunkerError, ChunkerStats, InputFormat};
pub use coding::{CodingError, CodingParams, CodingStats, ParamsError, Payload, ShardCoder};
pub use header::{
    ChunkFlags, ChunkHeader, HeaderError, SHARD_HASH_LEN, ShardHash, SignedChunkHeader, shard_hash,
};
pub use publisher::{ChunkPublisher, CodedChunk};
pub use verifier::{HeaderVerifier, VerifyError, VerifyStats};

/// Largest number of original shards (K) a chunk may have.
pub const MAX_ORIGINAL_SHARDS: u8 = 64;
/// Largest number of recovery shards (R) a chunk may have.
pub const MAX_RECOVERY_SHARDS: u8 = 64;
/// Largest N = K + R, and so the largest substream index plus one.
pub const MAX_SHARDS: usize = MAX_ORIGINAL_SHARDS as usize + MAX_RECOVERY_SHARDS as usize;
/// Largest chunk payload, in bytes (4 MiB: a 250 ms chunk of a 128 Mbit/s stream).
pub const MAX_CHUNK_PAYLOAD: usize = 4 * 1024 * 1024;
/// Largest shard: a chunk of [`MAX_CHUNK_PAYLOAD`] with K = 1.
pub const MAX_SHARD_LEN: usize = MAX_CHUNK_PAYLOAD;
