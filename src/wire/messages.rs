//! The messages of protocol version 1, and [`Message`], the frame that carries any of them.
//! The messages that name other parents live in [`super::parents`], the shard frame in
//! [`super::shard`].
//!
//! | type | message | stream |
//! | --- | --- | --- |
//! | 0x01 | [`Hello`] | control, first in each direction |
//! | 0x02 | [`Subscribe`] | control |
//! | 0x03 | [`Unsubscribe`] | control |
//! | 0x04 | [`ChannelInfo`] | control |
//! | 0x05 | [`Have`] | control |
//! | 0x06 | [`ParentQuery`] | control |
//! | 0x07 | [`ParentAnswer`] | control |
//! | 0x08 | [`GoAway`] | control |
//! | 0x09 | [`Refused`] | control |
//! | 0x0a | [`Punch`] | control |
//! | 0x0b | [`StreamTitle`] | control |
//! | 0x10 | [`ShardFrame`] | unidirectional shard streams |

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{
    Codec, DecodeError, MAX_AGENT_LEN, MAX_CONTROL_BODY, MAX_SHARD_BODY, MAX_STREAM_HEADER_LEN,
    bytes_len, get_array, get_bytes, get_u8, get_u16, get_u64, get_varint, need, peek_varint,
    put_bytes, put_varint, varint_len,
};
use crate::keys::{ChannelId, ChannelKey, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use crate::stream::{CodingParams, MAX_SHARDS};

/// What a node is, announced in [`Hello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Holds a channel key and publishes.
    Source,
    /// A relay.
    Supernode,
    /// A viewer or listener.
    Peer,
}

impl Role {
    fn to_u8(self) -> u8 {
        match self {
            Role::Source => 0,
            Role::Supernode => 1,
            Role::Peer => 2,
        }
    }

    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(Role::Source),
            1 => Ok(Role::Supernode),
            2 => Ok(Role::Peer),
            _ => Err(DecodeError::Invalid("hello.role")),
        }
    }
}

/// First message on the control stream, in each direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`super::PROTOCOL_VERSION`] of the sender.
    pub version: u16,
    /// The sender's role.
    pub role: Role,
    /// Software name and version, for logs (at most [`MAX_AGENT_LEN`] bytes).
    pub agent: String,
    /// The sender accepts connections (serves subscribers), so its parent may name it to
    /// other nodes; its node id is what it proved in the TLS handshake.
    pub serves: bool,
}

impl Codec for Hello {
    fn encoded_len(&self) -> usize {
        2 + 1 + bytes_len(self.agent.as_bytes()) + 1
    }

    fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u16(self.version);
        buf.put_u8(self.role.to_u8());
        put_bytes(buf, self.agent.as_bytes());
        buf.put_u8(u8::from(self.serves));
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let version = get_u16(buf, "hello.version")?;
        let role = Role::from_u8(get_u8(buf, "hello.role")?)?;
        let agent = get_bytes(buf, MAX_AGENT_LEN, "hello.agent")?;
        let agent =
            String::from_utf8(agent.to_vec()).map_err(|_| DecodeError::Invalid("hello.agent"))?;
        let serves = match get_u8(buf, "hello.serves")? {
            0 => false,
            1 => true,
            _ => return Err(DecodeError::Invalid("hello.serves")),
        };
        Ok(Self {
            version,
            role,
            agent,
            serves,
        })
    }
}

/// A set of substream indices (each below [`MAX_SHARDS`] = 128), as a bitmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SubstreamSet(u128);

const _: () = assert!(MAX_SHARDS == 128, "SubstreamSet is a 128-bit bitmap");

impl SubstreamSet {
    /// No substreams.
    pub const EMPTY: Self = Self(0);

    /// The set from a raw bitmap (bit *i* = substream *i*).
    pub const fn from_bits(bits: u128) -> Self {
        Self(bits)
    }

    /// The raw bitmap.
    pub const fn bits(self) -> u128 {
        self.0
    }

    /// Substreams `0..n`.
    pub fn first(n: usize) -> Self {
        if n >= 128 {
            Self(u128::MAX)
        } else {
            Self((1u128 << n) - 1)
        }
    }

    /// Adds substream `index` (ignored if not below 128).
    pub fn insert(&mut self, index: usize) {
        if index < MAX_SHARDS {
            self.0 |= 1 << index;
        }
    }

    /// Whether substream `index` is in the set.
    pub fn contains(self, index: usize) -> bool {
        index < MAX_SHARDS && self.0 & (1 << index) != 0
    }

    /// How many substreams are in the set.
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The indices in the set, ascending.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..MAX_SHARDS).filter(move |&i| self.contains(i))
    }
}

impl Codec for SubstreamSet {
    fn encoded_len(&self) -> usize {
        16
    }

    fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u128(self.0);
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        need(buf, 16, "substreams")?;
        Ok(Self(buf.get_u128()))
    }
}

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StartAt {
    /// At the newest random-access chunk the parent holds (a viewer joining).
    Live,
    /// At this sequence number (a peer replacing a parent resumes exactly where it was).
    Seq(u64),
}

impl Codec for StartAt {
    fn encoded_len(&self) -> usize {
        match self {
            StartAt::Live => 1,
            StartAt::Seq(_) => 9,
        }
    }

    fn encode(&self, buf: &mut impl BufMut) {
        match self {
            StartAt::Live => buf.put_u8(0),
            StartAt::Seq(seq) => {
                buf.put_u8(1);
                buf.put_u64(*seq);
            }
        }
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        match get_u8(buf, "subscribe.start")? {
            0 => Ok(StartAt::Live),
            1 => Ok(StartAt::Seq(get_u64(buf, "subscribe.start")?)),
            _ => Err(DecodeError::Invalid("subscribe.start")),
        }
    }
}

impl Codec for ChannelId {
    fn encoded_len(&self) -> usize {
        PUBLIC_KEY_LEN
    }

    fn encode(&self, buf: &mut impl BufMut) {
        buf.put_slice(self.as_bytes());
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        Ok(ChannelId::from_bytes(get_array(buf, "channel")?))
    }
}

/// Ask a parent for substreams of a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    /// Subscription id chosen by the subscriber, unique per connection; shard frames name it.
    pub sub: u32,
    /// The channel.
    pub channel: ChannelId,
    /// The substreams wanted.
    pub substreams: SubstreamSet,
    /// Where to start.
    pub start: StartAt,
}

impl Codec for Subscribe {
    fn encoded_len(&self) -> usize {
        varint_len(u64::from(self.sub))
            + PUBLIC_KEY_LEN
            + self.substreams.encoded_len()
            + self.start.encoded_len()
    }

    fn encode(&self, buf: &mut impl BufMut) {
        put_varint(buf, u64::from(self.sub));
        self.channel.encode(buf);
        self.substreams.encode(buf);
        self.start.encode(buf);
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        Ok(Self {
            sub: get_sub(buf, "subscribe.sub")?,
            channel: ChannelId::decode(buf)?,
            substreams: SubstreamSet::decode(buf)?,
            start: StartAt::decode(buf)?,
        })
    }
}

pub(super) fn get_sub(buf: &mut Bytes, what: &'static str) -> Result<u32, DecodeError> {
    let v = get_varint(buf, what)?;
    u32::try_from(v).map_err(|_| DecodeError::TooLong {
        what,
        got: v,
        max: u64::from(u32::MAX),
    })
}

/// Drop substreams from a subscription; an empty set ends the whole subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    /// The subscription.
    pub sub: u32,
    /// Substreams to drop; empty means all.
    pub substreams: SubstreamSet,
}

impl Codec for Unsubscribe {
    fn encoded_len(&self) -> usize {
        varint_len(u64::from(self.sub)) + self.substreams.encoded_len()
    }

    fn encode(&self, buf: &mut impl BufMut) {
        put_varint(buf, u64::from(self.sub));
        self.substreams.encode(buf);
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        Ok(Self {
            sub: get_sub(buf, "unsubscribe.sub")?,
            substreams: SubstreamSet::decode(buf)?,
        })
    }
}

/// A stream header (Ogg identification/comment/setup pages, an fMP4 init segment) that a late
/// joiner's player must see before any chunk, signed by the channel key so no relay can alter it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedStreamHeader {
    /// Increases whenever the source captures a new header (e.g. the encoder restarted).
    pub serial: u32,
    /// The header bytes (at most [`MAX_STREAM_HEADER_LEN`]).
    pub data: Bytes,
    /// Ed25519 signature over the label, channel, serial and data.
    pub signature: [u8; SIGNATURE_LEN],
}

const STREAM_HEADER_LABEL: &[u8] = b"gridcast/1 stream header\0";

impl SignedStreamHeader {
    fn signing_message(channel: &ChannelId, serial: u32, data: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(STREAM_HEADER_LABEL.len() + 32 + 8 + data.len());
        msg.extend_from_slice(STREAM_HEADER_LABEL);
        msg.extend_from_slice(channel.as_bytes());
        msg.put_u32(serial);
        msg.put_u32(data.len() as u32);
        msg.extend_from_slice(data);
        msg
    }

    /// Signs `data` as header number `serial` of the key's channel.
    pub fn sign(key: &ChannelKey, serial: u32, data: Bytes) -> Self {
        let signature = key.sign(&Self::signing_message(&key.channel_id(), serial, &data));
        Self {
            serial,
            data,
            signature,
        }
    }

    /// Whether the channel key signed this header.
    pub fn signature_valid(&self, channel: &ChannelId) -> bool {
        channel.verify(
            &Self::signing_message(channel, self.serial, &self.data),
            &self.signature,
        )
    }
}

impl Codec for SignedStreamHeader {
    fn encoded_len(&self) -> usize {
        4 + bytes_len(&self.data) + SIGNATURE_LEN
    }

    fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(self.serial);
        put_bytes(buf, &self.data);
        buf.put_slice(&self.signature);
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        need(buf, 4, "stream_header.serial")?;
        let serial = buf.get_u32();
        let data = get_bytes(buf, MAX_STREAM_HEADER_LEN, "stream_header.data")?;
        let signature = get_array(buf, "stream_header.signature")?;
        Ok(Self {
            serial,
            data,
            signature,
        })
    }
}

/// What a parent tells a subscriber about a channel: coding parameters, timing, the live edge
/// and, for formats that need one, the stream header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    /// The channel.
    pub channel: ChannelId,
    /// K and R.
    pub params: CodingParams,
    /// Nominal chunk duration in milliseconds.
    pub chunk_ms: u32,
    /// Newest chunk the sender holds, if any.
    pub latest: Option<u64>,
    /// The stream header, if the format has one.
    pub stream_header: Option<SignedStreamHeader>,
}

impl Codec for ChannelInfo {
    fn encoded_len(&self) -> usize {
        PUBLIC_KEY_LEN
            + 2
            + 4
            + 1
            + self.latest.map_or(0, |_| 8)
            + 1
            + self.stream_header.as_ref().map_or(0, Codec::encoded_len)
    }

    fn encode(&self, buf: &mut impl BufMut) {
        self.channel.encode(buf);
        buf.put_u8(self.params.original() as u8);
        buf.put_u8(self.params.recovery() as u8);
        buf.put_u32(self.chunk_ms);
        match self.latest {
            Some(seq) => {
                buf.put_u8(1);
                buf.put_u64(seq);
            }
            None => buf.put_u8(0),
        }
        match &self.stream_header {
            Some(h) => {
                buf.put_u8(1);
                h.encode(buf);
            }
            None => buf.put_u8(0),
        }
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let channel = ChannelId::decode(buf)?;
        let k = get_u8(buf, "channel_info.k")?;
        let r = get_u8(buf, "channel_info.r")?;
        let params =
            CodingParams::new(k, r).map_err(|_| DecodeError::Invalid("channel_info.params"))?;
        need(buf, 4, "channel_info.chunk_ms")?;
        let chunk_ms = buf.get_u32();
        let latest = match get_u8(buf, "channel_info.latest")? {
            0 => None,
            1 => Some(get_u64(buf, "channel_info.latest")?),
            _ => return Err(DecodeError::Invalid("channel_info.latest")),
        };
        let stream_header = match get_u8(buf, "channel_info.stream_header")? {
            0 => None,
            1 => Some(SignedStreamHeader::decode(buf)?),
            _ => return Err(DecodeError::Invalid("channel_info.stream_header")),
        };
        Ok(Self {
            channel,
            params,
            chunk_ms,
            latest,
            stream_header,
        })
    }
}

/// The range of chunks a node holds for a channel (sent on subscribe and as the edge moves).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Have {
    /// The channel.
    pub channel: ChannelId,
    /// Oldest chunk held.
    pub oldest: u64,
    /// Newest chunk held.
    pub latest: u64,
}

impl Codec for Have {
    fn encoded_len(&self) -> usize {
        PUBLIC_KEY_LEN + 16
    }

    fn encode(&self, buf: &mut impl BufMut) {
        self.channel.encode(buf);
        buf.put_u64(self.oldest);
        buf.put_u64(self.latest);
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let channel = ChannelId::decode(buf)?;
        let oldest = get_u64(buf, "have.oldest")?;
        let latest = get_u64(buf, "have.latest")?;
        if oldest > latest {
            return Err(DecodeError::Invalid("have.oldest"));
        }
        Ok(Self {
            channel,
            oldest,
            latest,
        })
    }
}

use super::parents::{GoAway, ParentAnswer, ParentQuery, Punch, Refused};
use super::shard::ShardFrame;
use super::title::StreamTitle;

/// Any message, as carried in a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// 0x01
    Hello(Hello),
    /// 0x02
    Subscribe(Subscribe),
    /// 0x03
    Unsubscribe(Unsubscribe),
    /// 0x04
    ChannelInfo(ChannelInfo),
    /// 0x05
    Have(Have),
    /// 0x06
    ParentQuery(ParentQuery),
    /// 0x07
    ParentAnswer(ParentAnswer),
    /// 0x08
    GoAway(GoAway),
    /// 0x09
    Refused(Refused),
    /// 0x0a
    Punch(Punch),
    /// 0x0b
    StreamTitle(StreamTitle),
    /// 0x10
    Shard(ShardFrame),
}

const TYPE_HELLO: u64 = 0x01;
const TYPE_SUBSCRIBE: u64 = 0x02;
const TYPE_UNSUBSCRIBE: u64 = 0x03;
const TYPE_CHANNEL_INFO: u64 = 0x04;
const TYPE_HAVE: u64 = 0x05;
const TYPE_PARENT_QUERY: u64 = 0x06;
const TYPE_PARENT_ANSWER: u64 = 0x07;
const TYPE_GO_AWAY: u64 = 0x08;
const TYPE_REFUSED: u64 = 0x09;
const TYPE_PUNCH: u64 = 0x0a;
const TYPE_STREAM_TITLE: u64 = 0x0b;
pub(super) const TYPE_SHARD: u64 = 0x10;

impl Message {
    fn type_id(&self) -> u64 {
        match self {
            Message::Hello(_) => TYPE_HELLO,
            Message::Subscribe(_) => TYPE_SUBSCRIBE,
            Message::Unsubscribe(_) => TYPE_UNSUBSCRIBE,
            Message::ChannelInfo(_) => TYPE_CHANNEL_INFO,
            Message::Have(_) => TYPE_HAVE,
            Message::ParentQuery(_) => TYPE_PARENT_QUERY,
            Message::ParentAnswer(_) => TYPE_PARENT_ANSWER,
            Message::GoAway(_) => TYPE_GO_AWAY,
            Message::Refused(_) => TYPE_REFUSED,
            Message::Punch(_) => TYPE_PUNCH,
            Message::StreamTitle(_) => TYPE_STREAM_TITLE,
            Message::Shard(_) => TYPE_SHARD,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Message::Hello(m) => m.encoded_len(),
            Message::Subscribe(m) => m.encoded_len(),
            Message::Unsubscribe(m) => m.encoded_len(),
            Message::ChannelInfo(m) => m.encoded_len(),
            Message::Have(m) => m.encoded_len(),
            Message::ParentQuery(m) => m.encoded_len(),
            Message::ParentAnswer(m) => m.encoded_len(),
            Message::GoAway(m) => m.encoded_len(),
            Message::Refused(m) => m.encoded_len(),
            Message::Punch(m) => m.encoded_len(),
            Message::StreamTitle(m) => m.encoded_len(),
            Message::Shard(m) => m.encoded_len(),
        }
    }

    /// Bytes of the whole frame: type, length and body.
    pub fn encoded_len(&self) -> usize {
        let body = self.body_len();
        varint_len(self.type_id()) + varint_len(body as u64) + body
    }

    /// Appends the frame to `buf`.
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_varint(buf, self.type_id());
        put_varint(buf, self.body_len() as u64);
        match self {
            Message::Hello(m) => m.encode(buf),
            Message::Subscribe(m) => m.encode(buf),
            Message::Unsubscribe(m) => m.encode(buf),
            Message::ChannelInfo(m) => m.encode(buf),
            Message::Have(m) => m.encode(buf),
            Message::ParentQuery(m) => m.encode(buf),
            Message::ParentAnswer(m) => m.encode(buf),
            Message::GoAway(m) => m.encode(buf),
            Message::Refused(m) => m.encode(buf),
            Message::Punch(m) => m.encode(buf),
            Message::StreamTitle(m) => m.encode(buf),
            Message::Shard(m) => m.encode(buf),
        }
    }

    /// The frame as a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out.freeze()
    }

    /// Takes one frame from the front of `buf`. Returns `Ok(None)` and leaves `buf` untouched if
    /// the frame is not complete yet. A declared length above the type's limit is an error as
    /// soon as the length is readable.
    pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Self>, DecodeError> {
        let Some((kind, type_len)) = peek_varint(buf) else {
            return Ok(None);
        };
        let max = match kind {
            TYPE_SHARD => MAX_SHARD_BODY,
            TYPE_HELLO..=TYPE_STREAM_TITLE => MAX_CONTROL_BODY,
            other => return Err(DecodeError::UnknownMessage(other)),
        };
        let Some((len, len_len)) = peek_varint(&buf[type_len..]) else {
            return Ok(None);
        };
        if len > max as u64 {
            return Err(DecodeError::TooLong {
                what: "frame length",
                got: len,
                max: max as u64,
            });
        }
        let head = type_len + len_len;
        let total = head + len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        let mut frame = buf.split_to(total);
        frame.advance(head);
        Self::decode_body(kind, frame.freeze()).map(Some)
    }

    /// Decodes a frame body of type `kind`; the body must hold exactly one message.
    pub fn decode_body(kind: u64, mut body: Bytes) -> Result<Self, DecodeError> {
        let (msg, what) = match kind {
            TYPE_HELLO => (Message::Hello(Hello::decode(&mut body)?), "hello"),
            TYPE_SUBSCRIBE => (
                Message::Subscribe(Subscribe::decode(&mut body)?),
                "subscribe",
            ),
            TYPE_UNSUBSCRIBE => (
                Message::Unsubscribe(Unsubscribe::decode(&mut body)?),
                "unsubscribe",
            ),
            TYPE_CHANNEL_INFO => (
                Message::ChannelInfo(ChannelInfo::decode(&mut body)?),
                "channel_info",
            ),
            TYPE_HAVE => (Message::Have(Have::decode(&mut body)?), "have"),
            TYPE_PARENT_QUERY => (
                Message::ParentQuery(ParentQuery::decode(&mut body)?),
                "parent_query",
            ),
            TYPE_PARENT_ANSWER => (
                Message::ParentAnswer(ParentAnswer::decode(&mut body)?),
                "parent_answer",
            ),
            TYPE_GO_AWAY => (Message::GoAway(GoAway::decode(&mut body)?), "go_away"),
            TYPE_REFUSED => (Message::Refused(Refused::decode(&mut body)?), "refused"),
            TYPE_PUNCH => (Message::Punch(Punch::decode(&mut body)?), "punch"),
            TYPE_STREAM_TITLE => (
                Message::StreamTitle(StreamTitle::decode(&mut body)?),
                "stream_title",
            ),
            TYPE_SHARD => (Message::Shard(ShardFrame::decode(&mut body)?), "shard"),
            other => return Err(DecodeError::UnknownMessage(other)),
        };
        if !body.is_empty() {
            return Err(DecodeError::Trailing {
                what,
                extra: body.len(),
            });
        }
        Ok(msg)
    }
}

/// Decodes every frame in `data` until it runs out or fails: the single entry point of the fuzz
/// targets and of the "arbitrary bytes never panic" property. Returns the number of frames read.
pub fn decode_all_frames(data: &[u8]) -> Result<usize, DecodeError> {
    let mut buf = BytesMut::from(data);
    let mut frames = 0;
    while let Some(msg) = Message::decode_frame(&mut buf)? {
        // Re-encoding what was decoded must reproduce a frame of the same length.
        debug_assert_eq!(msg.to_bytes().len(), msg.encoded_len());
        frames += 1;
    }
    Ok(frames)
}
