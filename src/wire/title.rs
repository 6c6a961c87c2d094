//! [`StreamTitle`] (type 0x0b): what is playing now (a radio's song title), signed by the
//! channel key as a stream header is, so no relay can change what listeners are told.

use bytes::{Buf, BufMut, Bytes};

use super::{Codec, DecodeError, bytes_len, get_array, get_bytes, get_u64, need, put_bytes};
use crate::keys::{ChannelId, ChannelKey, PUBLIC_KEY_LEN, SIGNATURE_LEN};

/// Longest title, in bytes of UTF-8. Icecast's own limit for a song title is 1024 bytes too.
pub const MAX_TITLE_LEN: usize = 1024;

const TITLE_LABEL: &[u8] = b"gridcast/1 stream title\0";

/// The title of what a channel plays from chunk `from_seq` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamTitle {
    /// The channel.
    pub channel: ChannelId,
    /// Increases with every title the source sets; a node keeps and passes on the newest.
    pub serial: u32,
    /// The first chunk it belongs to: players show it when they play that chunk.
    pub from_seq: u64,
    /// The title (UTF-8, at most [`MAX_TITLE_LEN`] bytes; empty: no title).
    pub text: String,
    /// Ed25519 signature over the label, channel, serial, first chunk and text.
    pub signature: [u8; SIGNATURE_LEN],
}

impl StreamTitle {
    fn signing_message(channel: &ChannelId, serial: u32, from_seq: u64, text: &str) -> Vec<u8> {
        let mut msg = Vec::with_capacity(TITLE_LABEL.len() + 32 + 16 + text.len());
        msg.extend_from_slice(TITLE_LABEL);
        msg.extend_from_slice(channel.as_bytes());
        msg.put_u32(serial);
        msg.put_u64(from_seq);
        msg.put_u32(text.len() as u32);
        msg.extend_from_slice(text.as_bytes());
        msg
    }

    /// Signs `text` as title number `serial` of the key's channel, shown from chunk
    /// `from_seq` on. A longer text is cut to [`MAX_TITLE_LEN`] bytes at a character boundary.
    pub fn sign(key: &ChannelKey, serial: u32, from_seq: u64, text: &str) -> Self {
        let mut end = text.len().min(MAX_TITLE_LEN);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let text = text[..end].to_owned();
        let channel = key.channel_id();
        let signature = key.sign(&Self::signing_message(&channel, serial, from_seq, &text));
        Self {
            channel,
            serial,
            from_seq,
            text,
            signature,
        }
    }

    /// Whether the channel's key signed this title.
    pub fn signature_valid(&self) -> bool {
        self.channel.verify(
            &Self::signing_message(&self.channel, self.serial, self.from_seq, &self.text),
            &self.signature,
        )
    }
}

impl Codec for StreamTitle {
    fn encoded_len(&self) -> usize {
        PUBLIC_KEY_LEN + 4 + 8 + bytes_len(self.text.as_bytes()) + SIGNATURE_LEN
    }

    fn encode(&self, buf: &mut impl BufMut) {
        self.channel.encode(buf);
        buf.put_u32(self.serial);
        buf.put_u64(self.from_seq);
        put_bytes(buf, self.text.as_bytes());
        buf.put_slice(&self.signature);
    }

    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let channel = ChannelId::decode(buf)?;
        need(buf, 4, "stream_title.serial")?;
        let serial = buf.get_u32();
        let from_seq = get_u64(buf, "stream_title.from_seq")?;
        let text = get_bytes(buf, MAX_TITLE_LEN, "stream_title.text")?;
        let text = String::from_utf8(text.to_vec())
            .map_err(|_| DecodeError::Invalid("stream_title.text"))?;
        let signature = get_array(buf, "stream_title.signature")?;
        Ok(Self {
            channel,
            serial,
            from_seq,
            text,
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Message;

    #[test]
    fn a_title_round_trips_and_only_its_own_signature_holds() {
        let key = ChannelKey::from_seed(&[5; 32]);
        let title = StreamTitle::sign(&key, 3, 1_000, "Nina Simone - Sinnerman");
        assert!(title.signature_valid());
        let msg = Message::StreamTitle(title.clone());
        let mut wire = bytes::BytesMut::from(&msg.to_bytes()[..]);
        let back = Message::decode_frame(&mut wire).unwrap().unwrap();
        assert_eq!(back, msg);
        // Any field changed by a relay breaks the signature.
        for forged in [
            StreamTitle {
                text: "Buy pills".into(),
                ..title.clone()
            },
            StreamTitle {
                serial: 4,
                ..title.clone()
            },
            StreamTitle {
                from_seq: 999,
                ..title.clone()
            },
            StreamTitle {
                channel: ChannelKey::from_seed(&[6; 32]).channel_id(),
                ..title
            },
        ] {
            assert!(!forged.signature_valid(), "{forged:?}");
        }
    }

    #[test]
    fn long_titles_are_cut_at_a_character_and_bad_utf8_is_refused() {
        let key = ChannelKey::from_seed(&[5; 32]);
        let long = "é".repeat(MAX_TITLE_LEN);
        let title = StreamTitle::sign(&key, 1, 0, &long);
        assert_eq!(title.text.len(), MAX_TITLE_LEN);
        assert!(title.signature_valid());
        let mut body = bytes::BytesMut::new();
        title.encode(&mut body);
        // The text's first byte (after channel, serial, first chunk and its length varint).
        let at = PUBLIC_KEY_LEN + 4 + 8 + 2;
        body[at] = 0xff;
        assert_eq!(
            StreamTitle::decode(&mut body.freeze()),
            Err(DecodeError::Invalid("stream_title.text"))
        );
    }
}
