//! Unit framing: Ogg pages and ISO-BMFF (fragmented MP4) boxes, whose late joiners need a stream
//! header, and the frames of bare audio streams (MPEG audio, that is MP3 and MP2, and AAC in
//! ADTS), whose late joiners need only to start on a frame.
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

/// Whether a captured Ogg stream header (whole pages) begins a video stream (Theora, Daala,
/// Dirac), by the first packet of each beginning-of-stream page; Vorbis, Opus, FLAC, Speex
/// and Skeleton are not video.
pub(super) fn ogg_header_has_video(mut header: &[u8]) -> bool {
    while let Unit::Found(info) = ogg_page(header) {
        let Some(page) = header.get(..info.len) else {
            return false;
        };
        let body = &page[OGG_FIXED_HEADER + usize::from(page[26])..];
        if info.starts_header
            && [&b"\x80theora"[..], b"\x80daala", b"BBCD\0"]
                .iter()
                .any(|magic| body.starts_with(magic))
        {
            return true;
        }
        header = &header[info.len..];
    }
    false
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

/// An ID3v2 tag (at the head of an MP3 file or stream, or between frames): its length, footer
/// included, once its 10-byte header has arrived. It travels with the frame after it.
fn id3v2_tag(buf: &[u8]) -> Unit {
    const HEAD: usize = 10;
    if buf.len() < HEAD {
        return if b"ID3".starts_with(&buf[..buf.len().min(3)]) {
            Unit::Incomplete
        } else {
            Unit::Invalid
        };
    }
    let size = &buf[6..10];
    if &buf[..3] != b"ID3" || buf[3] == 0xff || buf[4] == 0xff || size.iter().any(|&b| b >= 0x80) {
        return Unit::Invalid;
    }
    // Four 7-bit bytes ("syncsafe"), so the size never contains a frame sync.
    let body = size.iter().fold(0usize, |n, &b| (n << 7) | usize::from(b));
    let footer = if buf[5] & 0x10 != 0 { HEAD } else { 0 };
    Unit::Found(UnitInfo {
        len: HEAD + body + footer,
        starts_header: false,
        header_part: false,
        random_access: false,
        sparse: false,
        prefix: true,
    })
}

/// A bare audio frame: every one is a place a decoder can start (a layer III frame may borrow
/// the bit reservoir of the frames before it; decoders mute what they cannot decode of the first
/// and go on).
fn audio_frame(len: usize) -> Unit {
    Unit::Found(UnitInfo {
        len,
        starts_header: false,
        header_part: false,
        random_access: true,
        sparse: false,
        prefix: false,
    })
}

/// Bitrates in kbit/s by bitrate index (1..=14) for MPEG-1 layers I, II, III and MPEG-2/2.5
/// layer I, then layers II and III (ISO/IEC 11172-3 and 13818-3).
const MPEG_KBPS: [[u16; 14]; 5] = [
    [
        32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448,
    ],
    [
        32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
    ],
    [
        32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
    ],
    [
        32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256,
    ],
    [8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
];

/// The MPEG audio frame (MPEG-1, 2 or 2.5; layer I, II or III) or ID3v2 tag at the start of
/// `buf`. Free-format frames (bitrate index 0) carry no length and are not framed.
pub(super) fn mpeg_audio(buf: &[u8]) -> Unit {
    if buf.first() == Some(&b'I') {
        return id3v2_tag(buf);
    }
    if buf.len() < 4 {
        return if buf.first().is_none_or(|&b| b == 0xff)
            && buf.get(1).is_none_or(|&b| b & 0xe0 == 0xe0)
        {
            Unit::Incomplete
        } else {
            Unit::Invalid
        };
    }
    if buf[0] != 0xff || buf[1] & 0xe0 != 0xe0 {
        return Unit::Invalid;
    }
    let version = (buf[1] >> 3) & 3; // 0: MPEG-2.5, 1: reserved, 2: MPEG-2, 3: MPEG-1
    let layer = (buf[1] >> 1) & 3; // 0: reserved, 1: III, 2: II, 3: I
    let bitrate = usize::from(buf[2] >> 4);
    let rate = usize::from((buf[2] >> 2) & 3);
    let padding = usize::from((buf[2] >> 1) & 1);
    if version == 1 || layer == 0 || bitrate == 0 || bitrate == 15 || rate == 3 || buf[3] & 3 == 2 {
        return Unit::Invalid;
    }
    let mpeg1 = version == 3;
    let table = match (mpeg1, layer) {
        (true, 3) => 0,
        (true, 2) => 1,
        (true, _) => 2,
        (false, 3) => 3,
        (false, _) => 4,
    };
    let bps = usize::from(MPEG_KBPS[table][bitrate - 1]) * 1000;
    let hz = [44_100, 48_000, 32_000][rate] >> (3 - usize::from(version.max(1)));
    let len = match layer {
        3 => (12 * bps / hz + padding) * 4,
        1 if !mpeg1 => 72 * bps / hz + padding,
        _ => 144 * bps / hz + padding,
    };
    audio_frame(len)
}

/// The ADTS frame (AAC) or ID3v2 tag at the start of `buf`.
pub(super) fn adts(buf: &[u8]) -> Unit {
    if buf.first() == Some(&b'I') {
        return id3v2_tag(buf);
    }
    if buf.len() < 7 {
        return if buf.first().is_none_or(|&b| b == 0xff)
            && buf.get(1).is_none_or(|&b| b & 0xf6 == 0xf0)
        {
            Unit::Incomplete
        } else {
            Unit::Invalid
        };
    }
    // 12 sync bits, then the MPEG version bit and a layer of 0; sampling-frequency indices
    // 13..=15 are reserved or an escape ADTS cannot use.
    if buf[0] != 0xff || buf[1] & 0xf6 != 0xf0 || (buf[2] >> 2) & 0x0f >= 13 {
        return Unit::Invalid;
    }
    let header = if buf[1] & 1 == 0 { 9 } else { 7 };
    let len =
        (usize::from(buf[3] & 3) << 11) | (usize::from(buf[4]) << 3) | usize::from(buf[5] >> 5);
    if len < header {
        return Unit::Invalid;
    }
    audio_frame(len)
}

/// Frames in a row, each where the last one ends, that identify bare audio.
const AUDIO_DETECT_FRAMES: usize = 3;

/// What a search for bare audio found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Detected {
    /// Audio framing that starts at this offset (an ID3v2 tag or the first frame).
    At(usize),
    /// Not enough bytes to say.
    NeedMore,
    /// No frames in a row start within the searched bytes.
    No,
}

/// Looks for [`AUDIO_DETECT_FRAMES`] units of `parse` in a row (an ID3v2 tag and the frames after
/// it, or frames alone) starting within the first `search` bytes of `buf`.
pub(super) fn detect_audio(buf: &[u8], parse: fn(&[u8]) -> Unit, search: usize) -> Detected {
    let mut need_more = false;
    for start in 0..search.min(buf.len()) {
        let mut at = start;
        let mut frames = 0;
        let found = loop {
            if frames == AUDIO_DETECT_FRAMES {
                break true;
            }
            match parse(buf.get(at..).unwrap_or(&[])) {
                Unit::Found(info) => {
                    if !info.prefix {
                        frames += 1;
                    } else if at != start {
                        // A tag between the first frames: not what an audio stream starts with.
                        break false;
                    }
                    at = at.saturating_add(info.len);
                    // The last frame need not have arrived whole: its header says enough.
                    if at > buf.len() && frames < AUDIO_DETECT_FRAMES {
                        need_more = true;
                        break false;
                    }
                }
                Unit::Incomplete => {
                    need_more = true;
                    break false;
                }
                Unit::Invalid => break false,
            }
        };
        if found {
            return Detected::At(start);
        }
    }
    if need_more || buf.len() < search {
        Detected::NeedMore
    } else {
        Detected::No
    }
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

    /// An MPEG-1 layer III frame, 128 kbit/s at 44.1 kHz (417 bytes, 418 with padding).
    pub(crate) fn mp3(padding: bool, fill: u8) -> Vec<u8> {
        let mut f = vec![0xff, 0xfb, 0x90 | (u8::from(padding) << 1), 0x64];
        f.resize(417 + usize::from(padding), fill);
        f
    }

    /// An ADTS frame (AAC LC, 44.1 kHz, stereo, no CRC) of `len` bytes in all.
    pub(crate) fn aac(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![
            0xff,
            0xf1,
            0x50,
            0x80 | (len >> 11) as u8,
            (len >> 3) as u8,
            ((len & 7) << 5) as u8 | 0x1f,
            0xfc,
        ];
        f.resize(len, fill);
        f
    }

    /// An ID3v2.4 tag with a body of `body` bytes.
    pub(crate) fn id3(body: usize) -> Vec<u8> {
        let mut t = b"ID3\x04\x00\x00".to_vec();
        t.extend((0..4).rev().map(|i| ((body >> (7 * i)) & 0x7f) as u8));
        t.resize(10 + body, 0);
        t
    }

    fn len_of(unit: Unit) -> Option<usize> {
        match unit {
            Unit::Found(info) => Some(info.len),
            _ => None,
        }
    }

    #[test]
    fn mpeg_audio_frames_parse() {
        assert_eq!(len_of(mpeg_audio(&mp3(false, 0))), Some(417));
        assert_eq!(len_of(mpeg_audio(&mp3(true, 0))), Some(418));
        assert!(
            matches!(mpeg_audio(&mp3(false, 0)), Unit::Found(i) if i.random_access && !i.prefix)
        );
        // MPEG-1 layer II, 192 kbit/s at 48 kHz; MPEG-2 layer III, 64 kbit/s at 24 kHz; MPEG-1
        // layer I, 32 kbit/s at 32 kHz; MPEG-2.5 layer III, 8 kbit/s at 8 kHz.
        assert_eq!(len_of(mpeg_audio(&[0xff, 0xfd, 0xa4, 0])), Some(576));
        assert_eq!(len_of(mpeg_audio(&[0xff, 0xf3, 0x84, 0])), Some(192));
        assert_eq!(len_of(mpeg_audio(&[0xff, 0xff, 0x18, 0])), Some(48));
        assert_eq!(len_of(mpeg_audio(&[0xff, 0xe3, 0x18, 0])), Some(72));
        // Free format, a bad bitrate, a reserved rate, version, layer or emphasis.
        for bad in [
            [0xff, 0xfb, 0x04, 0],
            [0xff, 0xfb, 0xf0, 0],
            [0xff, 0xfb, 0x9c, 0],
            [0xff, 0xeb, 0x90, 0],
            [0xff, 0xf9, 0x90, 0],
            [0xff, 0xfb, 0x90, 0x66],
            [0xff, 0x7b, 0x90, 0],
            [0x47, 0xfb, 0x90, 0],
        ] {
            assert_eq!(mpeg_audio(&bad), Unit::Invalid, "{bad:02x?}");
        }
        assert_eq!(mpeg_audio(&[]), Unit::Incomplete);
        assert_eq!(mpeg_audio(&[0xff, 0xfb]), Unit::Incomplete);
        assert_eq!(mpeg_audio(&[0xff, 0x1b]), Unit::Invalid);
        // An ADTS header is no MPEG audio frame (layer 0), nor the other way round.
        assert_eq!(mpeg_audio(&aac(300, 0)), Unit::Invalid);
        assert_eq!(adts(&mp3(false, 0)), Unit::Invalid);
    }

    #[test]
    fn adts_frames_and_id3_tags_parse() {
        assert_eq!(len_of(adts(&aac(371, 0))), Some(371));
        assert_eq!(len_of(adts(&aac(5000, 0))), Some(5000));
        let mut crc = aac(300, 0);
        crc[1] = 0xf0;
        assert_eq!(len_of(adts(&crc)), Some(300));
        crc[4] = 0;
        crc[5] = 8 << 5;
        assert_eq!(adts(&crc), Unit::Invalid, "shorter than its header");
        let mut rate = aac(300, 0);
        rate[2] = 0x40 | (13 << 2);
        assert_eq!(adts(&rate), Unit::Invalid);
        assert_eq!(adts(&aac(300, 0)[..6]), Unit::Incomplete);
        let tag = id3(300);
        for parse in [mpeg_audio, adts] {
            assert!(
                matches!(parse(&tag), Unit::Found(i) if i.len == 310 && i.prefix && !i.random_access)
            );
            assert_eq!(parse(&tag[..9]), Unit::Incomplete);
            assert_eq!(parse(b"ID"), Unit::Incomplete);
            assert_eq!(parse(b"IDx"), Unit::Invalid);
        }
        let mut footer = id3(1000);
        footer[5] = 0x10;
        assert_eq!(len_of(mpeg_audio(&footer)), Some(1020));
        let mut unsafe_size = id3(10);
        unsafe_size[8] = 0x80;
        assert_eq!(mpeg_audio(&unsafe_size), Unit::Invalid);
    }

    #[test]
    fn audio_is_detected_by_frames_in_a_row() {
        let mut stream = id3(100);
        for i in 0..4 {
            stream.extend(mp3(i % 2 == 1, 0x55));
        }
        assert_eq!(detect_audio(&stream, mpeg_audio, 4096), Detected::At(0));
        // Fewer bytes than the search covers may still become a stream.
        assert_eq!(detect_audio(&stream, adts, 4096), Detected::NeedMore);
        assert_eq!(detect_audio(&stream, adts, 1000), Detected::No);
        // Joined mid-frame: the first whole frame is found.
        assert_eq!(
            detect_audio(&stream[200..], mpeg_audio, 4096),
            Detected::At(110 + 417 - 200)
        );
        // Two frames and part of a third's header: not enough to say.
        assert_eq!(
            detect_audio(&stream[..110 + 835 + 2], mpeg_audio, 4096),
            Detected::NeedMore
        );
        // The third frame's header alone is enough.
        assert_eq!(
            detect_audio(&stream[..110 + 835 + 4], mpeg_audio, 4096),
            Detected::At(0)
        );
        // A lone frame sync in other bytes is not a stream.
        let mut noise = vec![0x11u8; 5000];
        noise[10..14].copy_from_slice(&mp3(false, 0)[..4]);
        assert_eq!(detect_audio(&noise, mpeg_audio, 4096), Detected::No);
        let mut aacs = Vec::new();
        for len in [300, 310, 290, 305] {
            aacs.extend(aac(len, 0x66));
        }
        assert_eq!(detect_audio(&aacs, adts, 4096), Detected::At(0));
        assert_eq!(detect_audio(&aacs, mpeg_audio, 1000), Detected::No);
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
