//! The shard frame, the one message on shard streams, and the prefix encoder fan-out uses to
//! frame a shared shard without copying it.

use bytes::{BufMut, Bytes};

use super::{Codec, DecodeError, get_u8, get_u64, put_varint, varint_len};
use crate::stream::{MAX_SHARDS, SignedChunkHeader};

use super::messages::{TYPE_SHARD, get_sub};

/// How many chunk headers both ends of a shard stream remember: a frame without a header names
/// one of the last this many chunks whose header came on the same stream.
pub const STREAM_HEADERS: usize = 4;

/// The subscription id of a shard frame that belongs to the subscription its stream's first
/// frame named. A sender names the subscription once per stream; every later frame of a shard
/// is then the same bytes for every subscriber, so a node frames each shard once (two ways at
/// most: with and without its chunk's header) and hands every subscriber the same buffer.
/// Subscription ids are never 0 (a node numbers its subscriptions from 1).
pub const SUB_OF_STREAM: u32 = 0;

/// One shard of one chunk on a subscription.
///
/// Body: `sub (varint) | seq u64 | index u8 | has_header u8 | [signed chunk header] | shard`.
/// `sub` is [`SUB_OF_STREAM`] on every frame of a stream but the first, which names the
/// subscription (a first frame that names none is a protocol error, as is a stream whose
/// frames name two).
/// The shard runs to the end of the frame. A sender attaches the signed header to the first
/// shard of each chunk it sends on a stream; a later shard of that chunk on the same stream may
/// omit it as long as the chunk is among the last [`STREAM_HEADERS`] distinct chunks whose
/// header that stream carried (both ends keep that list, in the order each header first
/// came: the stream is read in order, so they agree).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardFrame {
    /// The subscription this shard belongs to.
    pub sub: u32,
    /// The chunk.
    pub seq: u64,
    /// The substream (shard index), below [`MAX_SHARDS`].
    pub index: u8,
    /// The chunk's signed header, if attached; its `seq` must equal [`ShardFrame::seq`].
    pub header: Option<SignedChunkHeader>,
    /// The shard bytes.
    pub shard: Bytes,
}

impl Codec for ShardFrame {
    fn encoded_len(&self) -> usize {
        varint_len(u64::from(self.sub))
            + 8
            + 1
            + 1
            + self
                .header
                .as_ref()
                .map_or(0, SignedChunkHeader::encoded_len)
            + self.shard.len()
    }

    fn encode(&self, buf: &mut impl BufMut) {
        put_varint(buf, u64::from(self.sub));
        buf.put_u64(self.seq);
        buf.put_u8(self.index);
        match &self.header {
            Some(h) => {
                buf.put_u8(1);
                h.encode(buf);
            }
            None => buf.put_u8(0),
        }
        buf.put_slice(&self.shard);
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let sub = get_sub(buf, "shard.sub")?;
        let seq = get_u64(buf, "shard.seq")?;
        let index = get_u8(buf, "shard.index")?;
        if usize::from(index) >= MAX_SHARDS {
            return Err(DecodeError::Invalid("shard.index"));
        }
        let header = match get_u8(buf, "shard.has_header")? {
            0 => None,
            1 => {
                let h = SignedChunkHeader::decode(buf)?;
                if h.header.seq != seq {
                    return Err(DecodeError::Invalid("shard.header.seq"));
                }
                if usize::from(index) >= h.header.params.total() {
                    return Err(DecodeError::Invalid("shard.index"));
                }
                Some(h)
            }
            _ => return Err(DecodeError::Invalid("shard.has_header")),
        };
        let shard = buf.split_to(buf.len());
        if shard.is_empty() {
            return Err(DecodeError::Truncated("shard.data"));
        }
        Ok(Self {
            sub,
            seq,
            index,
            header,
            shard,
        })
    }
}

/// Writes the front of a [`ShardFrame`] frame: frame type, length and the body up to the chunk
/// header (if `header_len` says one follows) or the shard. The sender then hands QUIC the signed
/// header, encoded once per chunk, and the shard as shared buffers: neither is copied into a
/// frame, and the per-subscriber part is at most 24 bytes.
pub fn encode_shard_frame_prefix(
    buf: &mut impl BufMut,
    sub: u32,
    seq: u64,
    index: u8,
    header_len: Option<usize>,
    shard_len: usize,
) {
    let body = varint_len(u64::from(sub)) + 8 + 1 + 1 + header_len.unwrap_or(0) + shard_len;
    put_varint(buf, TYPE_SHARD);
    put_varint(buf, body as u64);
    put_varint(buf, u64::from(sub));
    buf.put_u64(seq);
    buf.put_u8(index);
    buf.put_u8(u8::from(header_len.is_some()));
}

/// One whole shard frame for [`SUB_OF_STREAM`] in one buffer: what every subscriber is sent
/// once its stream has named its subscription. `header` is the chunk's signed header, encoded.
pub fn encode_shared_shard_frame(
    seq: u64,
    index: u8,
    header: Option<&Bytes>,
    shard: &[u8],
) -> Bytes {
    let header_len = header.map(Bytes::len);
    let mut buf = bytes::BytesMut::with_capacity(
        SHARD_FRAME_PREFIX_MAX + header_len.unwrap_or(0) + shard.len(),
    );
    encode_shard_frame_prefix(&mut buf, SUB_OF_STREAM, seq, index, header_len, shard.len());
    if let Some(h) = header {
        buf.extend_from_slice(h);
    }
    buf.extend_from_slice(shard);
    buf.freeze()
}

/// The most bytes [`encode_shard_frame_prefix`] writes.
pub const SHARD_FRAME_PREFIX_MAX: usize = 8 + 8 + 8 + 8 + 1 + 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Message;
    use bytes::BytesMut;

    #[test]
    fn shard_frame_prefix_plus_shard_is_the_frame() {
        let frame = ShardFrame {
            sub: 300,
            seq: 9,
            index: 3,
            header: None,
            shard: Bytes::from_static(b"shard bytes"),
        };
        let mut split = BytesMut::new();
        encode_shard_frame_prefix(&mut split, 300, 9, 3, None, frame.shard.len());
        split.extend_from_slice(&frame.shard);
        assert_eq!(split.freeze(), Message::Shard(frame).to_bytes());
    }

    #[test]
    fn a_shared_frame_is_the_frame_for_the_streams_subscription() {
        let shard = Bytes::from_static(b"the same bytes for every subscriber");
        let header = Bytes::from_static(b"not parsed here");
        let frame = ShardFrame {
            sub: SUB_OF_STREAM,
            seq: 1 << 40,
            index: 15,
            header: None,
            shard: shard.clone(),
        };
        assert_eq!(
            encode_shared_shard_frame(1 << 40, 15, None, &shard),
            Message::Shard(frame).to_bytes()
        );
        // With a header: the prefix says one follows, and it comes before the shard.
        let with = encode_shared_shard_frame(1 << 40, 15, Some(&header), &shard);
        let mut prefix = BytesMut::new();
        encode_shard_frame_prefix(
            &mut prefix,
            SUB_OF_STREAM,
            1 << 40,
            15,
            Some(header.len()),
            shard.len(),
        );
        assert_eq!(&with[..prefix.len()], &prefix[..]);
        assert_eq!(
            &with[prefix.len()..prefix.len() + header.len()],
            &header[..]
        );
        assert_eq!(&with[prefix.len() + header.len()..], &shard[..]);
    }

    #[test]
    fn shard_frame_prefix_plus_header_plus_shard_is_the_frame() {
        let key = crate::keys::ChannelKey::from_seed(&[5; 32]);
        let mut publisher =
            crate::stream::ChunkPublisher::new(key, crate::stream::CodingParams::DEFAULT);
        let coded = publisher
            .publish(
                7,
                0,
                crate::stream::ChunkFlags::empty(),
                &Bytes::from(vec![9u8; 3000]),
            )
            .unwrap();
        let header = (**coded.header()).clone();
        let shard = coded.shards()[2].clone();
        let mut encoded_header = BytesMut::new();
        header.encode(&mut encoded_header);
        let mut split = BytesMut::new();
        encode_shard_frame_prefix(
            &mut split,
            u32::MAX,
            7,
            2,
            Some(encoded_header.len()),
            shard.len(),
        );
        assert!(split.len() <= SHARD_FRAME_PREFIX_MAX);
        split.extend_from_slice(&encoded_header);
        split.extend_from_slice(&shard);
        let frame = ShardFrame {
            sub: u32::MAX,
            seq: 7,
            index: 2,
            header: Some(header),
            shard,
        };
        assert_eq!(split.freeze(), Message::Shard(frame).to_bytes());
    }
}
