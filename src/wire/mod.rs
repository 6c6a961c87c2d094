//! The gridcast wire protocol: every message, its limits, and framing. Nothing else in the crate
//! encodes or parses protocol bytes (the chunk header's byte layout lives beside its signature in
//! [`crate::stream::header`] and is embedded here by [`ShardFrame`]).
//!
//! # Framing
//!
//! Every message on a QUIC stream is a frame:
//!
//! ```text
//!  type (QUIC varint) | body length (QUIC varint) | body
//! ```
//!
//! The control stream (one bidirectional stream per connection) carries [`Hello`] first in each
//! direction, then any control message. Shards travel on unidirectional streams as
//! [`ShardFrame`]s. [`Message::decode_frame`] checks completeness before parsing (a partial
//! frame returns `Ok(None)` and consumes nothing) and rejects a declared length above the type's
//! limit before a single body byte is buffered, so a peer cannot make us wait for or allocate an
//! unbounded frame.
//!
//! # Versioning
//!
//! The protocol version is negotiated by ALPN ([`ALPN`]) and repeated in [`Hello`]. A version-1
//! node rejects message types it does not know with [`DecodeError::UnknownMessage`].
//!
//! # Limits
//!
//! | what | limit |
//! | --- | --- |
//! | control frame body | [`MAX_CONTROL_BODY`] bytes |
//! | shard frame body | [`MAX_SHARD_BODY`] bytes |
//! | agent string | [`MAX_AGENT_LEN`] bytes of UTF-8 |
//! | stream header | [`MAX_STREAM_HEADER_LEN`] bytes |
//! | parents per answer | [`MAX_PARENTS`] |
//! | addresses per parent | [`MAX_ADDRS_PER_PARENT`] |
//! | substream index | below [`crate::stream::MAX_SHARDS`] |
//!
//! Decoding never panics and never allocates more than the frame it was given: every count is
//! checked against its limit *and* against the bytes actually present before anything is
//! reserved.

mod messages;
mod parents;
mod shard;
mod title;

pub use messages::*;
pub use parents::*;
pub use shard::*;
pub use title::*;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::stream::MAX_SHARD_LEN;
use crate::stream::header::{HeaderError, MAX_SIGNED_HEADER_LEN};

/// The protocol version this code speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The QUIC ALPN token of protocol version 1.
pub const ALPN: &[u8] = b"gridcast/1";

/// Longest agent string in [`Hello`].
pub const MAX_AGENT_LEN: usize = 64;
/// Longest stream header (Ogg headers, an fMP4 init segment) in [`ChannelInfo`].
pub const MAX_STREAM_HEADER_LEN: usize = 64 * 1024;
/// Most candidates in one [`ParentAnswer`] or [`GoAway`].
pub const MAX_PARENTS: usize = 32;
/// Most addresses for one candidate parent.
pub const MAX_ADDRS_PER_PARENT: usize = 4;
/// Longest control frame body: a [`ChannelInfo`] with the largest stream header, plus slack.
pub const MAX_CONTROL_BODY: usize = MAX_STREAM_HEADER_LEN + 1024;
/// Longest shard frame body: a full header and the largest shard.
pub const MAX_SHARD_BODY: usize = 32 + MAX_SIGNED_HEADER_LEN + MAX_SHARD_LEN;
/// Largest value a QUIC varint holds.
pub const MAX_VARINT: u64 = (1 << 62) - 1;

/// Why bytes could not be decoded. Each variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end inside a field.
    #[error("{0}: truncated")]
    Truncated(&'static str),
    /// A frame type this version does not define.
    #[error("unknown message type {0:#x}")]
    UnknownMessage(u64),
    /// A declared length or count is above its limit.
    #[error("{what}: {got} exceeds the limit of {max}")]
    TooLong {
        /// The field.
        what: &'static str,
        /// Declared value.
        got: u64,
        /// Limit.
        max: u64,
    },
    /// A field holds a value the protocol does not allow.
    #[error("{0}: invalid value")]
    Invalid(&'static str),
    /// A frame body has bytes left after its message.
    #[error("{what}: {extra} trailing bytes after the message")]
    Trailing {
        /// The message.
        what: &'static str,
        /// Bytes left over.
        extra: usize,
    },
    /// The embedded chunk header is malformed.
    #[error("shard frame: {0}")]
    ChunkHeader(#[from] HeaderError),
}

/// Encoding and decoding of one wire value.
pub trait Codec: Sized {
    /// Exactly how many bytes [`Codec::encode`] writes.
    fn encoded_len(&self) -> usize;
    /// Appends the value.
    fn encode(&self, buf: &mut impl BufMut);
    /// Reads the value from the front of `buf`, consuming its bytes. Byte strings are
    /// zero-copy slices of `buf`.
    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError>;

    /// The value as a fresh buffer.
    fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out.freeze()
    }
}

/// Bytes a QUIC varint of `v` takes. `v` must be at most [`MAX_VARINT`].
pub const fn varint_len(v: u64) -> usize {
    if v < 1 << 6 {
        1
    } else if v < 1 << 14 {
        2
    } else if v < 1 << 30 {
        4
    } else {
        8
    }
}

/// Writes a QUIC varint. Values above [`MAX_VARINT`] are a caller bug; they are clamped.
pub fn put_varint(buf: &mut impl BufMut, v: u64) {
    debug_assert!(v <= MAX_VARINT, "varint out of range");
    let v = v.min(MAX_VARINT);
    match varint_len(v) {
        1 => buf.put_u8(v as u8),
        2 => buf.put_u16(v as u16 | 0x4000),
        4 => buf.put_u32(v as u32 | 0x8000_0000),
        _ => buf.put_u64(v | 0xc000_0000_0000_0000),
    }
}

/// Reads a QUIC varint from the front of `buf`, or `None` if it is incomplete.
pub fn peek_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len)?;
    let mut v = u64::from(first & 0x3f);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

pub(crate) fn get_varint(buf: &mut Bytes, what: &'static str) -> Result<u64, DecodeError> {
    let (v, len) = peek_varint(buf).ok_or(DecodeError::Truncated(what))?;
    buf.advance(len);
    Ok(v)
}

pub(crate) fn need(buf: &Bytes, n: usize, what: &'static str) -> Result<(), DecodeError> {
    if buf.remaining() < n {
        Err(DecodeError::Truncated(what))
    } else {
        Ok(())
    }
}

pub(crate) fn get_u8(buf: &mut Bytes, what: &'static str) -> Result<u8, DecodeError> {
    need(buf, 1, what)?;
    Ok(buf.get_u8())
}

pub(crate) fn get_u16(buf: &mut Bytes, what: &'static str) -> Result<u16, DecodeError> {
    need(buf, 2, what)?;
    Ok(buf.get_u16())
}

pub(crate) fn get_u64(buf: &mut Bytes, what: &'static str) -> Result<u64, DecodeError> {
    need(buf, 8, what)?;
    Ok(buf.get_u64())
}

pub(crate) fn get_array<const N: usize>(
    buf: &mut Bytes,
    what: &'static str,
) -> Result<[u8; N], DecodeError> {
    need(buf, N, what)?;
    let mut out = [0u8; N];
    buf.copy_to_slice(&mut out);
    Ok(out)
}

/// Reads a varint length, checks it against `max` and the bytes present.
pub(crate) fn get_len(
    buf: &mut Bytes,
    max: usize,
    what: &'static str,
) -> Result<usize, DecodeError> {
    let len = get_varint(buf, what)?;
    if len > max as u64 {
        return Err(DecodeError::TooLong {
            what,
            got: len,
            max: max as u64,
        });
    }
    Ok(len as usize)
}

/// Reads a length-prefixed byte string of at most `max` bytes, zero-copy.
pub(crate) fn get_bytes(
    buf: &mut Bytes,
    max: usize,
    what: &'static str,
) -> Result<Bytes, DecodeError> {
    let len = get_len(buf, max, what)?;
    need(buf, len, what)?;
    Ok(buf.split_to(len))
}

pub(crate) fn put_bytes(buf: &mut impl BufMut, bytes: &[u8]) {
    put_varint(buf, bytes.len() as u64);
    buf.put_slice(bytes);
}

pub(crate) fn bytes_len(bytes: &[u8]) -> usize {
    varint_len(bytes.len() as u64) + bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries_round_trip() {
        for v in [0, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30, MAX_VARINT] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v));
            assert_eq!(peek_varint(&buf), Some((v, buf.len())));
            assert_eq!(peek_varint(&buf[..buf.len() - 1]), None);
        }
    }
}
