//! Unit framing for the container formats whose late joiners need a stream header: Ogg pages and
//! ISO-BMFF (fragmented MP4) boxes.
//!
//! The chunker walks the input one unit at a time. Each parser looks only at a unit's own header
//! bytes and says how long the unit is and what it means for cutting: whether it starts a new
//! stream header (an Ogg beginning-of-stream page, an `ftyp` box), whether it belongs to one
//! (Ogg header pages carry granule position 0; `moov` and friends come before the first
//! fragment), and whether a decoder can start at it.

/// What the bytes at a unit boundary hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Unit {
    /// Not enough bytes yet to read the unit's header.
    Incomplete,
    /// The bytes are not a unit of this format.
    Invalid,
    /// A unit.
    Found(UnitInfo),
}

/// One parsed unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct UnitInfo {
    /// Bytes in the unit, header included.
    pub len: usize,
    /// Begins a new stream header (Ogg BOS page, `ftyp`).
    pub starts_header: bool,
    /// May belong to a stream header that is being captured.
    pub header_part: bool,
    /// A decoder that has the stream header can start here.
    pub random_access: bool,
    /// Random-access points of this kind are far apart (fragments, not audio pages): always cut.
    pub sparse: bool,
    /// Travels with the random-access unit that follows it (`styp`, `sidx`, `prft`, `emsg`).
    pub prefix: bool,
}

const OGG_MAGIC: &[u8; 4] = b"OggS";
const OGG_FIXED_HEADER: usize = 27;
const OGG_CONTINUED: u8 = 0x01;
const OGG_BOS: u8 = 0x02;

/// Whether `buf` starts like an Ogg stream.
pub(super) fn looks_like_ogg(buf: &[u8]) -> bool {
    buf.starts_with(OGG_MAGIC) && buf.get(4) == Some(&0)
}

/// Whether `buf` starts like an ISO-BMFF file (an `ftyp` box first).
pub(super) fn looks_like_mp4(buf: &[u8]) -> bool {
    buf.get(4..8) == Some(b"ftyp") && u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) >= 8
}

/// The Ogg page at the start of `buf`.
pub(super) fn ogg_page(buf: &[u8]) -> Unit {
    if buf.len() < OGG_FIXED_HEADER {
        return if OGG_MAGIC.starts_with(&buf[..buf.len().min(4)]) {
            Unit::Incomplete
        } else {
            Unit::Invalid
        };
    }
    if !looks_like_ogg(buf) {
        return Unit::Invalid;
    }
    let flags = buf[5];
    if flags & !0x07 != 0 {
        return Unit::Invalid;
    }
    let granule = u64::from_le_bytes(buf[6..14].try_into().unwrap_or([0; 8]));
    let segments = usize::from(buf[26]);
    let Some(table) = buf.get(OGG_FIXED_HEADER..OGG_FIXED_HEADER + segments) else {
        return Unit::Incomplete;
    };
    let body: usize = table.iter().map(|&s| usize::from(s)).sum();
    Unit::Found(UnitInfo {
        len: OGG_FIXED_HEADER + segments + body,
        starts_header: flags & OGG_BOS != 0,
        // Codec header packets (Vorbis, Opus, FLAC, Theora) end on pages with granule position
        // 0; a page on which no packet ends carries -1.
        header_part: granule == 0 || granule == u64::MAX,
        random_access: flags & OGG_CONTINUED == 0,
        sparse: false,
        prefix: false,
    })
}

/// The ISO-BMFF box at the start of `buf`.
pub(super) fn mp4_box(buf: &[u8]) -> Unit {
    let Some(head) = buf.get(..8) else {
        return Unit::Incomplete;
    };
    let kind: [u8; 4] = [head[4], head[5], head[6], head[7]];
    if !kind.iter().all(|b| b.is_ascii_alphanumeric() || *b == b' ') {
        return Unit::Invalid;
    }
    let len = match u32::from_be_bytes([head[0], head[1], head[2], head[3]]) {
        // "To the end of the file": a live stream has no end to frame against.
        0 => return Unit::Invalid,
        1 => {
            let Some(large) = buf.get(8..16) else {
                return Unit::Incomplete;
            };
            let large = u64::from_be_bytes(large.try_into().unwrap_or([0; 8]));
            if large < 16 {
                return Unit::Invalid;
            }
            usize::try_from(large).unwrap_or(usize::MAX)
        }
        small if small < 8 => return Unit::Invalid,
        small => small as usize,
    };
    let fragment = &kind == b"moof";
    let prefix = matches!(&kind, b"styp" | b"sidx" | b"prft" | b"emsg");
    Unit::Found(UnitInfo {
        len,
        starts_header: &kind == b"ftyp",
        header_part: !fragment && !prefix && &kind != b"mdat",
        random_access: fragment,
        sparse: true,
        prefix,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// An Ogg page with one segment table entry per 255 bytes of `body`.
    pub(crate) fn ogg(flags: u8, granule: u64, body: &[u8]) -> Vec<u8> {
        let mut table = vec![255u8; body.len() / 255];
        table.push((body.len() % 255) as u8);
        let mut page = Vec::new();
        page.extend_from_slice(OGG_MAGIC);
        page.push(0);
        page.push(flags);
        page.extend_from_slice(&granule.to_le_bytes());
        page.extend_from_slice(&7u32.to_le_bytes());
        page.extend_from_slice(&0u32.to_le_bytes());
        page.extend_from_slice(&0u32.to_le_bytes());
        page.push(table.len() as u8);
        page.extend_from_slice(&table);
        page.extend_from_slice(body);
        page
    }

    /// An ISO-BMFF box of `kind` around `body`.
    pub(crate) fn mp4(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut b = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        b.extend_from_slice(kind);
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn ogg_pages_parse_and_classify() {
        let bos = ogg(OGG_BOS, 0, &[1; 30]);
        assert!(looks_like_ogg(&bos));
        let Unit::Found(info) = ogg_page(&bos) else {
            panic!("not parsed")
        };
        assert_eq!(info.len, bos.len());
        assert!(info.starts_header && info.header_part && info.random_access);
        let audio = ogg(0, 4096, &[2; 600]);
        let Unit::Found(info) = ogg_page(&audio) else {
            panic!("not parsed")
        };
        assert_eq!(info.len, audio.len());
        assert!(!info.starts_header && !info.header_part && info.random_access);
        let continued = ogg(OGG_CONTINUED, 8192, &[3; 10]);
        assert!(matches!(ogg_page(&continued), Unit::Found(i) if !i.random_access));
        // Truncated headers wait; other bytes are not a page.
        assert_eq!(ogg_page(&audio[..20]), Unit::Incomplete);
        assert_eq!(ogg_page(&audio[..OGG_FIXED_HEADER + 1]), Unit::Incomplete);
        assert_eq!(ogg_page(b"Og"), Unit::Incomplete);
        assert_eq!(ogg_page(b"Oxx"), Unit::Invalid);
        let mut bad = audio;
        bad[5] = 0x80;
        assert_eq!(ogg_page(&bad), Unit::Invalid);
    }

    #[test]
    fn mp4_boxes_parse_and_classify() {
        let ftyp = mp4(b"ftyp", b"isom\0\0\0\0");
        assert!(looks_like_mp4(&ftyp));
        assert!(matches!(mp4_box(&ftyp), Unit::Found(i) if i.starts_header && i.len == 16));
        assert!(matches!(mp4_box(&mp4(b"moov", &[0; 40])), Unit::Found(i) if i.header_part));
        assert!(
            matches!(mp4_box(&mp4(b"moof", &[0; 40])), Unit::Found(i) if i.random_access && !i.header_part)
        );
        assert!(matches!(mp4_box(&mp4(b"styp", &[0; 4])), Unit::Found(i) if i.prefix));
        assert!(
            matches!(mp4_box(&mp4(b"mdat", &[0; 4])), Unit::Found(i) if !i.header_part && !i.random_access)
        );
        let mut large = 1u32.to_be_bytes().to_vec();
        large.extend_from_slice(b"mdat");
        assert_eq!(mp4_box(&large), Unit::Incomplete);
        large.extend_from_slice(&(1u64 << 33).to_be_bytes());
        assert!(matches!(mp4_box(&large), Unit::Found(i) if i.len == 1 << 33));
        assert_eq!(
            mp4_box(&[0, 0, 0, 0, b'm', b'd', b'a', b't']),
            Unit::Invalid
        );
        assert_eq!(
            mp4_box(&[0, 0, 0, 4, b'm', b'd', b'a', b't']),
            Unit::Invalid
        );
        assert_eq!(mp4_box(&[0, 0, 0, 9, 0xff, 0, 1, 2]), Unit::Invalid);
        assert_eq!(mp4_box(&[0, 0, 0]), Unit::Incomplete);
    }
}
