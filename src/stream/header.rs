//! The signed chunk header: what a chunk is, and the hash of each of its shards, signed by the
//! channel key.
//!
//! Wire layout (all integers big-endian), fixed length `HEADER_FIXED_LEN + 16·N + 64`:
//!
//! ```text
//!  seq u64 | timestamp_us u64 | payload_len u32 | K u8 | R u8 | flags u8 | N × BLAKE3-128 | Ed25519 sig
//! ```
//!
//! A shard's hash is the first 16 bytes of its BLAKE3 output ([`shard_hash`]). What it guards
//! against is a relay or peer passing on a shard the source did not make, which takes a second
//! preimage: 2^128 work for one shard, and still beyond reach summed over every shard a channel
//! will ever carry. That is the security the Ed25519 signature over the header gives too, so
//! 32 bytes would buy nothing the signature does not already cap, and they cost: a parent sends
//! every child the header with each chunk, 4 times a second per parent, and at radio bitrates
//! the 256 bytes saved are about a twentieth of what a listener receives. Collisions (2^64)
//! help only the source, which could sign two different headers anyway.
//!
//! The signature covers a domain-separation label, the channel id and every byte before the
//! signature, so a header cannot be replayed on another channel or reinterpreted as any other
//! signed object. Verification lives in [`super::verifier`].

use bytes::{Buf, BufMut};

use super::coding::{CodingParams, ParamsError};
use super::{MAX_CHUNK_PAYLOAD, MAX_SHARDS};
use crate::keys::{ChannelId, ChannelKey, PUBLIC_KEY_LEN, SIGNATURE_LEN};

/// Bytes of a shard's hash in the header.
pub const SHARD_HASH_LEN: usize = 16;

/// The hash of one shard: BLAKE3, its output cut to [`SHARD_HASH_LEN`] bytes (see the module
/// documentation for why that is enough).
pub type ShardHash = [u8; SHARD_HASH_LEN];

/// The hash of `shard` as the header carries it.
pub fn shard_hash(shard: &[u8]) -> ShardHash {
    let full = blake3::hash(shard);
    let mut out = [0u8; SHARD_HASH_LEN];
    out.copy_from_slice(&full.as_bytes()[..SHARD_HASH_LEN]);
    out
}

/// Bytes of a header before the shard hashes.
pub const HEADER_FIXED_LEN: usize = 8 + 8 + 4 + 1 + 1 + 1;
/// Largest encoded signed header (N at its maximum).
pub const MAX_SIGNED_HEADER_LEN: usize =
    HEADER_FIXED_LEN + SHARD_HASH_LEN * MAX_SHARDS + SIGNATURE_LEN;

const SIGNING_LABEL: &[u8] = b"gridcast/1 chunk header\0";

/// Per-chunk flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChunkFlags(u8);

impl ChunkFlags {
    /// A player can start decoding at the first byte of this chunk.
    pub const RANDOM_ACCESS: Self = Self(1);
    /// The input restarted or lost bytes before this chunk; players should expect a jump.
    pub const DISCONTINUITY: Self = Self(2);
    /// The broadcast ends with this chunk.
    pub const END_OF_STREAM: Self = Self(4);
    /// The chunk is exactly the stream header (Ogg header pages, an fMP4 initialisation
    /// segment) that late joiners also get with the channel information.
    pub const STREAM_HEADER: Self = Self(8);
    /// The chunk carries no stream bytes: its one-byte payload only makes it codable. It
    /// ends a broadcast (with [`ChunkFlags::END_OF_STREAM`]) whose last bytes had already
    /// gone out in a chunk the timer closed; outputs write nothing of it.
    pub const NO_DATA: Self = Self(16);
    const KNOWN: u8 = 31;

    /// No flags.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Flags from raw bits, or `None` if an unknown bit is set.
    pub const fn from_bits(bits: u8) -> Option<Self> {
        if bits & !Self::KNOWN != 0 {
            None
        } else {
            Some(Self(bits))
        }
    }

    /// Whether every flag in `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Sets the flags in `other`.
    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }
}

impl std::ops::BitOr for ChunkFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// What the source says about one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Chunk number; consecutive chunks have consecutive numbers.
    pub seq: u64,
    /// Source wall-clock time when the chunk's first byte arrived, in µs since the Unix epoch.
    pub timestamp_us: u64,
    /// Payload bytes (the shards carry padding beyond this).
    pub payload_len: u32,
    /// K and R.
    pub params: CodingParams,
    /// Flags.
    pub flags: ChunkFlags,
    /// The hash of each of the N shards ([`shard_hash`]), in shard order.
    pub hashes: Vec<ShardHash>,
}

/// A header together with the channel key's signature over it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedChunkHeader {
    /// The header.
    pub header: ChunkHeader,
    /// Ed25519 signature over [`ChunkHeader::signing_message`].
    pub signature: [u8; SIGNATURE_LEN],
}

/// Why bytes could not be read as a signed chunk header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer bytes than the header needs.
    #[error("chunk header truncated: {need} bytes needed, {have} present")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// K or R is outside the protocol limits.
    #[error("chunk header: {0}")]
    Params(#[from] ParamsError),
    /// The payload length is zero or too large.
    #[error("chunk header: payload length {0} is outside 1..={MAX_CHUNK_PAYLOAD}")]
    PayloadLength(u32),
    /// A flag bit this version does not define is set.
    #[error("chunk header: unknown flag bits {0:#04x}")]
    Flags(u8),
}

impl ChunkHeader {
    /// Encoded length without the signature.
    pub fn unsigned_len(&self) -> usize {
        HEADER_FIXED_LEN + SHARD_HASH_LEN * self.hashes.len()
    }

    fn encode_unsigned(&self, buf: &mut impl BufMut) {
        buf.put_u64(self.seq);
        buf.put_u64(self.timestamp_us);
        buf.put_u32(self.payload_len);
        buf.put_u8(self.params.original() as u8);
        buf.put_u8(self.params.recovery() as u8);
        buf.put_u8(self.flags.bits());
        for hash in &self.hashes {
            buf.put_slice(hash);
        }
    }

    /// The exact bytes the channel key signs for this header.
    pub fn signing_message(&self, channel: &ChannelId) -> Vec<u8> {
        let mut msg =
            Vec::with_capacity(SIGNING_LABEL.len() + PUBLIC_KEY_LEN + self.unsigned_len());
        msg.extend_from_slice(SIGNING_LABEL);
        msg.extend_from_slice(channel.as_bytes());
        self.encode_unsigned(&mut msg);
        msg
    }

    /// Signs the header with the channel key.
    pub fn sign(self, key: &ChannelKey) -> SignedChunkHeader {
        let signature = key.sign(&self.signing_message(&key.channel_id()));
        SignedChunkHeader {
            header: self,
            signature,
        }
    }

    /// Shard size of this chunk.
    pub fn shard_len(&self) -> usize {
        self.params.shard_len(self.payload_len as usize)
    }

    /// Whether `shard` is shard `index` of this chunk: the right size and the signed hash.
    pub fn shard_matches(&self, index: usize, shard: &[u8]) -> bool {
        shard.len() == self.shard_len()
            && self
                .hashes
                .get(index)
                .is_some_and(|h| shard_hash(shard) == *h)
    }
}

impl SignedChunkHeader {
    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        self.header.unsigned_len() + SIGNATURE_LEN
    }

    /// Appends the wire form to `buf`.
    pub fn encode(&self, buf: &mut impl BufMut) {
        self.header.encode_unsigned(buf);
        buf.put_slice(&self.signature);
    }

    /// Reads a signed header from the front of `buf`, consuming exactly its bytes. Checks the
    /// structure only; the signature is checked by [`super::HeaderVerifier`].
    pub fn decode(buf: &mut impl Buf) -> Result<Self, HeaderError> {
        if buf.remaining() < HEADER_FIXED_LEN {
            return Err(HeaderError::Truncated {
                need: HEADER_FIXED_LEN,
                have: buf.remaining(),
            });
        }
        let seq = buf.get_u64();
        let timestamp_us = buf.get_u64();
        let payload_len = buf.get_u32();
        let k = buf.get_u8();
        let r = buf.get_u8();
        let flags = buf.get_u8();
        let params = CodingParams::new(k, r)?;
        if payload_len == 0 || payload_len as usize > MAX_CHUNK_PAYLOAD {
            return Err(HeaderError::PayloadLength(payload_len));
        }
        let flags = ChunkFlags::from_bits(flags).ok_or(HeaderError::Flags(flags))?;
        let rest = SHARD_HASH_LEN * params.total() + SIGNATURE_LEN;
        if buf.remaining() < rest {
            return Err(HeaderError::Truncated {
                need: HEADER_FIXED_LEN + rest,
                have: HEADER_FIXED_LEN + buf.remaining(),
            });
        }
        let mut hashes = vec![[0u8; SHARD_HASH_LEN]; params.total()];
        for hash in &mut hashes {
            buf.copy_to_slice(hash);
        }
        let mut signature = [0u8; SIGNATURE_LEN];
        buf.copy_to_slice(&mut signature);
        Ok(Self {
            header: ChunkHeader {
                seq,
                timestamp_us,
                payload_len,
                params,
                flags,
                hashes,
            },
            signature,
        })
    }

    /// Checks the signature against `channel`. Prefer [`super::HeaderVerifier`], which caches.
    pub fn signature_valid(&self, channel: &ChannelId) -> bool {
        channel.verify(&self.header.signing_message(channel), &self.signature)
    }
}
