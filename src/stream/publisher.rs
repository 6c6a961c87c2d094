//! The source path: a chunk's bytes in, a signed header and N shards out.
//!
//! [`ChunkPublisher::publish`] encodes the payload into N shards ([`ShardCoder::encode`]),
//! hashes each shard with BLAKE3, and signs the header once. The shards are [`Bytes`] slices
//! (most originals of the chunk itself, the rest of two coder buffers), so handing them to any
//! number of subscribers copies nothing.

use std::sync::Arc;

use bytes::Bytes;

use super::coding::{CodingError, CodingParams, ShardCoder};
use super::header::{ChunkFlags, ChunkHeader, SignedChunkHeader, shard_hash};
use crate::keys::{ChannelId, ChannelKey};

/// A chunk ready to send: its signed header and all N shards in substream order.
///
/// Only [`ChunkPublisher::publish`] makes one, from the shards it hashed into the header, and
/// nothing can change it after: so every shard matches its hash by construction, and the
/// source's own node stores them without hashing them again (see `Channel::publish`).
#[derive(Debug, Clone)]
pub struct CodedChunk {
    header: Arc<SignedChunkHeader>,
    shards: Vec<Bytes>,
}

impl CodedChunk {
    /// The signed header.
    pub fn header(&self) -> &Arc<SignedChunkHeader> {
        &self.header
    }

    /// Shard *i* is substream *i*'s piece of this chunk.
    pub fn shards(&self) -> &[Bytes] {
        &self.shards
    }
}

/// Turns chunks into signed, coded chunks for one channel.
#[derive(Debug)]
pub struct ChunkPublisher {
    key: ChannelKey,
    channel: ChannelId,
    params: CodingParams,
    coder: ShardCoder,
}

impl ChunkPublisher {
    /// A publisher signing with `key` and coding with `params`.
    pub fn new(key: ChannelKey, params: CodingParams) -> Self {
        let channel = key.channel_id();
        Self {
            key,
            channel,
            params,
            coder: ShardCoder::new(),
        }
    }

    /// The signing key (for what else the source signs, such as stream headers).
    pub fn key(&self) -> &ChannelKey {
        &self.key
    }

    /// The channel published.
    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// The coding parameters.
    pub fn params(&self) -> CodingParams {
        self.params
    }

    /// The coder's counters.
    pub fn coder(&self) -> &ShardCoder {
        &self.coder
    }

    /// Codes, hashes and signs one chunk.
    pub fn publish(
        &mut self,
        seq: u64,
        timestamp_us: u64,
        flags: ChunkFlags,
        payload: &Bytes,
    ) -> Result<CodedChunk, CodingError> {
        let shards = self.coder.encode(self.params, payload)?;
        let hashes = shards.iter().map(|shard| shard_hash(shard)).collect();
        let header = ChunkHeader {
            seq,
            timestamp_us,
            // encode() refused anything above MAX_CHUNK_PAYLOAD, which fits in u32.
            payload_len: u32::try_from(payload.len())
                .map_err(|_| CodingError::PayloadLength(payload.len()))?,
            params: self.params,
            flags,
            hashes,
        }
        .sign(&self.key);
        Ok(CodedChunk {
            header: Arc::new(header),
            shards,
        })
    }
}
