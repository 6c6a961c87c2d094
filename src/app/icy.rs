//! ICY metadata: how an Icecast or SHOUTcast server tells a player what is playing, and how
//! `play --output http://…` tells its own players. A player that sends `Icy-MetaData: 1` gets
//! an `icy-metaint: N` response header and, after every N bytes of audio, one metadata block:
//! a length byte L, then L × 16 bytes (`StreamTitle='…';`, padded with zeros). L is 0 when
//! nothing changed, so the title costs one byte per block between changes.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

/// Audio bytes between two metadata blocks: Icecast's default, which players expect.
pub const METAINT: usize = 16_000;

/// Longest block a length byte can announce: 255 × 16 bytes.
const MAX_BLOCK: usize = 255 * 16;

/// One player's stream with metadata blocks put in.
#[derive(Debug)]
pub struct Icy {
    /// Audio bytes until the next block.
    left: usize,
    /// A title the next block carries.
    pending: Option<Bytes>,
}

impl Default for Icy {
    fn default() -> Self {
        Self {
            left: METAINT,
            pending: None,
        }
    }
}

impl Icy {
    /// A stream with no title yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next block announces `title` (a later title before that block replaces it).
    pub fn set_title(&mut self, title: &str) {
        self.pending = Some(block(title));
    }

    /// Appends `data` to `out`, with a block wherever one is due.
    pub fn interleave(&mut self, mut data: Bytes, out: &mut VecDeque<Bytes>) {
        while !data.is_empty() {
            let n = self.left.min(data.len());
            out.push_back(data.split_to(n));
            self.left -= n;
            if self.left == 0 {
                self.left = METAINT;
                out.push_back(
                    self.pending
                        .take()
                        .unwrap_or_else(|| Bytes::from_static(&[0])),
                );
            }
        }
    }
}

/// The block that announces `title`. Zero bytes (which would end the text early for a
/// player) are left out, and a title too long for one block is cut at a character.
fn block(title: &str) -> Bytes {
    let clean: String = title.chars().filter(|&c| c != '\0').collect();
    let (head, tail) = ("StreamTitle='", "';");
    let mut end = clean.len().min(MAX_BLOCK - head.len() - tail.len());
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    let text_len = head.len() + end + tail.len();
    let units = text_len.div_ceil(16);
    let mut out = BytesMut::with_capacity(1 + units * 16);
    out.put_u8(units as u8);
    out.put_slice(head.as_bytes());
    out.put_slice(&clean.as_bytes()[..end]);
    out.put_slice(tail.as_bytes());
    out.resize(1 + units * 16, 0);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads an ICY stream back as a player does: the audio, and each block's title.
    fn read(stream: &[u8]) -> (Vec<u8>, Vec<Option<String>>) {
        let (mut audio, mut titles) = (Vec::new(), Vec::new());
        let mut rest = stream;
        loop {
            let n = METAINT.min(rest.len());
            audio.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            let Some((&units, after)) = rest.split_first() else {
                break;
            };
            let len = usize::from(units) * 16;
            let text = String::from_utf8(after[..len].to_vec()).unwrap();
            let text = text.trim_end_matches('\0');
            titles.push((len > 0).then(|| {
                text.strip_prefix("StreamTitle='")
                    .and_then(|t| t.strip_suffix("';"))
                    .unwrap()
                    .to_owned()
            }));
            rest = &after[len..];
        }
        (audio, titles)
    }

    #[test]
    fn blocks_fall_every_metaint_bytes_whatever_the_writes() {
        let audio: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let mut icy = Icy::new();
        let mut out = VecDeque::new();
        icy.set_title("First");
        // Writes of awkward sizes, one ending exactly on a block.
        let mut at = 0;
        for size in [999, 15_001, 7, 20_000, 13_993] {
            icy.interleave(Bytes::copy_from_slice(&audio[at..at + size]), &mut out);
            at += size;
            if at == 16_000 {
                icy.set_title("Second – ünïcode");
            }
        }
        assert_eq!(at, audio.len());
        let stream: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
        let (got, titles) = read(&stream);
        assert_eq!(got, audio);
        assert_eq!(
            titles,
            [
                Some("First".to_owned()),
                Some("Second – ünïcode".to_owned()),
                None
            ]
        );
    }

    #[test]
    fn a_block_is_whole_units_and_never_too_long() {
        let b = block("ab\0c");
        assert_eq!(b[0], 2);
        assert_eq!(&b[1..19], b"StreamTitle='abc';");
        assert_eq!(b.len(), 1 + 32);
        let long = block(&"é".repeat(5000));
        assert_eq!(long[0], 255);
        assert_eq!(long.len(), 1 + MAX_BLOCK);
        let text = String::from_utf8(long[1..].to_vec()).unwrap();
        assert!(text.trim_end_matches('\0').ends_with("é';"));
    }
}
