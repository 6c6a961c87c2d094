//! The chunker: a live byte stream in, numbered chunks out, closed by duration or size.
//!
//! Sans-IO like the rest of the stream model: feed bytes with [`Chunker::handle_input`], arm a
//! timer from [`Chunker::poll_timeout`] and call [`Chunker::handle_timeout`] when it fires, then
//! drain [`Chunker::poll_chunk`]. Every input byte appears in exactly one chunk, in order: the
//! concatenation of the chunks is the input, byte for byte.
//!
//! # MPEG-TS
//!
//! With [`InputFormat::MpegTs`] (or [`InputFormat::Auto`] when four sync bytes `0x47` appear 188
//! bytes apart near the start), chunks are cut only on 188-byte packet boundaries; a trailing
//! partial packet waits for the next chunk. If sync is lost, the bytes up to the next sync byte
//! are carried as they are (nothing is ever dropped) and counted in [`ChunkerStats::resyncs`].
//!
//! A chunk is flagged [`ChunkFlags::RANDOM_ACCESS`] when it starts at a random-access point: a
//! packet whose adaptation field sets `random_access_indicator`, optionally preceded directly by
//! the PAT and PMT packets that encoders emit in front of a keyframe (those move into the new
//! chunk with it, so a joining decoder sees the program tables first). Where to cut:
//!
//! - A PID whose random-access points are *sparse* (more than two chunk durations apart, or the
//!   first one seen) carries video keyframes: each one starts a new chunk, however young the
//!   current chunk is. One short chunk per group of pictures is cheap; a joiner waiting a whole
//!   extra GOP is not.
//! - A PID whose random-access points are *dense* (audio: every frame is one) only starts a new
//!   chunk once the current one is at least half its duration old and does not already start at a
//!   random-access point, so audio-only streams keep chunks near their configured duration.
//!
//! Once a PMT names a video stream (MPEG-1/2, MPEG-4, H.264, HEVC, VVC, ...), only that video's
//! random-access points count: a decoder joining at an audio frame in the middle of a group of
//! pictures would see pictures it cannot decode. Audio random-access points then neither cut
//! nor flag a chunk.
//!
//! # Ogg and fragmented MP4
//!
//! An input that starts with an Ogg page (`OggS`) or an `ftyp` box is walked page by page or box
//! by box (see `framing`). Its **stream header** (the Ogg beginning-of-stream pages and the
//! codec header pages after them, with granule position 0; or `ftyp`, `moov` and whatever else
//! precedes the first fragment) is closed as a chunk of its own, flagged
//! [`ChunkFlags::STREAM_HEADER`], and also handed out by [`Chunker::poll_stream_header`] so the
//! source can give it to late joiners with the channel information, the way Icecast replays
//! Ogg headers. A new beginning-of-stream page later on (a chained Ogg stream, an encoder
//! restart) captures a new header.
//!
//! Chunks may be cut anywhere by time or size, but a chunk is flagged random-access only when it
//! starts on a unit a decoder can start at: an Ogg page that does not continue a packet from the
//! page before, or a `moof` (with the `styp`/`sidx`/`prft`/`emsg` boxes leading up to it). Each
//! fragment starts a new chunk, like a video keyframe in MPEG-TS; Ogg pages, which are audio
//! and dense, start one once the current chunk is half its duration old. If an Ogg page is
//! damaged the bytes up to the next `OggS` are carried as they are; a malformed box turns the
//! rest of the input opaque. Either is counted in [`ChunkerStats::resyncs`].
//!
//! # MP3 and AAC
//!
//! An input that is not MPEG-TS and where three MPEG audio frames (MP3, MP2) or three ADTS frames
//! (AAC) follow each other, each starting where the last ends, within its first 4 KiB (after an
//! ID3v2 tag, if it starts with one), is walked frame by frame. Chunks are cut where a frame
//! starts, like Ogg pages, so a late joiner's first byte is a frame header: players that sniff
//! the format or a content type from the first bytes see audio, not the tail of a frame. A chunk
//! is flagged random-access when it starts on a frame (or on an ID3v2 tag, which travels with
//! the frame after it); one cut by time mid-frame (a frame that had only partly arrived) is not.
//! Bytes that are not a frame are carried as they are and the next frame, confirmed by the one
//! after it, is searched for ([`ChunkerStats::resyncs`]).
//!
//! # Opaque input
//!
//! Anything else is cut at the duration or size limit wherever it falls. Every opaque chunk is
//! flagged random-access: nothing in it is known to be a better start than anything else.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::MAX_CHUNK_PAYLOAD;
use super::framing::{self, Unit, UnitInfo};
use super::header::ChunkFlags;
use crate::wire::MAX_STREAM_HEADER_LEN;

const TS_PACKET: usize = 188;
const TS_SYNC: u8 = 0x47;
/// Sync bytes in a row that identify MPEG-TS in [`InputFormat::Auto`].
const TS_DETECT_PACKETS: usize = 4;
/// PIDs whose random-access history is remembered.
const MAX_TRACKED_PIDS: usize = 16;
/// PMT PIDs remembered from the PAT.
const MAX_PMT_PIDS: usize = 8;
/// Where the first of the frames that identify bare audio may start.
const AUDIO_DETECT_SEARCH: usize = 4096;
/// Input held undecided at most this long waiting for the frames that identify bare audio
/// (past an ID3v2 tag the input starts with).
const AUDIO_DETECT_LIMIT: usize = 16 * 1024;
/// The largest leading ID3v2 tag looked past (cover art in a file's tag runs to hundreds of
/// KB); past a larger one the input is opaque.
const ID3_DETECT_LIMIT: usize = 1024 * 1024;

/// How to treat the input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InputFormat {
    /// MPEG-TS if the first bytes look like it, opaque otherwise.
    #[default]
    Auto,
    /// MPEG-TS: cut on packet boundaries and flag random-access points.
    MpegTs,
    /// Ogg: cut on page boundaries where possible, capture the stream header.
    Ogg,
    /// Fragmented MP4: a chunk per fragment, capture the initialisation segment.
    Mp4,
    /// MPEG audio (MP3, MP2): cut on frame boundaries.
    MpegAudio,
    /// AAC in ADTS: cut on frame boundaries.
    Adts,
    /// Opaque bytes: cut anywhere.
    Opaque,
}

/// Chunker settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkerConfig {
    /// A chunk closes this long after its first byte arrived (default 250 ms).
    pub duration: Duration,
    /// Once the input is recognised as audio alone (MP3 or AAC frames, or Ogg with no
    /// Theora, Daala or Dirac stream in its header), chunks close this long after their
    /// first byte instead (default: `None`, the same as the rest).
    /// Audio is where a longer chunk pays most: a radio's quarter second is a few KB, and
    /// what a relay pays per listener goes by packets and acknowledgements, not bytes.
    pub audio_duration: Option<Duration>,
    /// A chunk closes when it reaches this many bytes (default 1 MiB).
    pub max_bytes: usize,
    /// Input format.
    pub format: InputFormat,
    /// Sequence number of the first chunk.
    pub first_seq: u64,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        Self {
            duration: Duration::from_millis(250),
            audio_duration: None,
            max_bytes: 1024 * 1024,
            format: InputFormat::Auto,
            first_seq: 0,
        }
    }
}

/// A setting the chunker cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkerError {
    /// Duration outside 10 ms ..= 10 s.
    #[error("chunk duration {0:?} is outside 10ms..=10s")]
    Duration(Duration),
    /// Size limit outside two TS packets ..= the protocol's chunk limit.
    #[error("chunk size limit {0} is outside 376..={MAX_CHUNK_PAYLOAD} bytes")]
    MaxBytes(usize),
}

/// One closed chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Sequence number.
    pub seq: u64,
    /// Flags (random access, end of stream).
    pub flags: ChunkFlags,
    /// When the chunk's first byte was handed to the chunker.
    pub started: Instant,
    /// The bytes.
    pub payload: Bytes,
}

/// Counters kept by a [`Chunker`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkerStats {
    /// Chunks closed.
    pub chunks: u64,
    /// Input bytes taken.
    pub bytes: u64,
    /// Chunks flagged random-access.
    pub random_access_chunks: u64,
    /// Times MPEG-TS or Ogg sync was lost and searched for again, or MP4 framing given up.
    pub resyncs: u64,
    /// Stream headers captured (Ogg, fragmented MP4).
    pub stream_headers: u64,
    /// Stream headers longer than the protocol carries, sent as ordinary chunks only.
    pub headers_too_large: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Undecided,
    Ts,
    Ogg,
    Mp4,
    MpegAudio,
    Adts,
    Opaque,
}

/// Cuts a byte stream into chunks. See the module documentation.
#[derive(Debug)]
pub struct Chunker {
    config: ChunkerConfig,
    next_seq: u64,
    mode: Mode,
    /// The open chunk, possibly ending in a partial TS packet.
    buf: BytesMut,
    /// When the open chunk's first byte arrived.
    started: Option<Instant>,
    /// TS: bytes of `buf` before this offset are whole packets (or unsynced bytes).
    scan: usize,
    /// Ogg, MP4: the next unit starts at this offset of `buf` (possibly past its end).
    /// TS: start of the run of PAT/PMT packets that ends at `scan`, if any; MP4: of the boxes
    /// that lead up to a fragment.
    psi_run: Option<usize>,
    /// While the format is undecided: the input's first bytes (at most [`AUDIO_DETECT_LIMIT`]
    /// past a leading ID3v2 tag)
    /// and how many it has been in all.
    detect: Vec<u8>,
    undecided_bytes: usize,
    /// Audio: where the last unit found starts (a frame still arriving when `scan` is past the
    /// end of `buf`).
    unit_at: usize,
    /// Ogg, MP4: the open chunk is a stream header still being captured.
    capturing: bool,
    /// Captured stream headers not yet polled.
    headers: VecDeque<Bytes>,
    /// The open chunk starts at a random-access point.
    starts_at_rap: bool,
    /// The Ogg stream's header has a video stream's beginning page (then it is not audio
    /// alone, whatever else it carries).
    ogg_video: bool,
    /// Last random-access point seen per PID.
    rap_seen: Vec<(u16, Instant)>,
    /// PMT PIDs named by the last PAT.
    pmt_pids: Vec<u16>,
    /// Video PIDs named by the last PMT: when there are any, only their random-access points
    /// make a chunk random-access.
    video_pids: Vec<u16>,
    ready: VecDeque<Chunk>,
    stats: ChunkerStats,
}

impl Chunker {
    /// A chunker with validated settings.
    pub fn new(config: ChunkerConfig) -> Result<Self, ChunkerError> {
        for d in std::iter::once(config.duration).chain(config.audio_duration) {
            if d < Duration::from_millis(10) || d > Duration::from_secs(10) {
                return Err(ChunkerError::Duration(d));
            }
        }
        if config.max_bytes < 2 * TS_PACKET || config.max_bytes > MAX_CHUNK_PAYLOAD {
            return Err(ChunkerError::MaxBytes(config.max_bytes));
        }
        let mode = match config.format {
            InputFormat::Auto => Mode::Undecided,
            InputFormat::MpegTs => Mode::Ts,
            InputFormat::Ogg => Mode::Ogg,
            InputFormat::Mp4 => Mode::Mp4,
            InputFormat::MpegAudio => Mode::MpegAudio,
            InputFormat::Adts => Mode::Adts,
            InputFormat::Opaque => Mode::Opaque,
        };
        Ok(Self {
            next_seq: config.first_seq,
            buf: BytesMut::with_capacity(config.max_bytes.min(256 * 1024)),
            config,
            mode,
            started: None,
            scan: 0,
            psi_run: None,
            unit_at: 0,
            detect: Vec::new(),
            undecided_bytes: 0,
            capturing: false,
            headers: VecDeque::new(),
            starts_at_rap: false,
            rap_seen: Vec::new(),
            ogg_video: false,
            pmt_pids: Vec::new(),
            video_pids: Vec::new(),
            ready: VecDeque::new(),
            stats: ChunkerStats::default(),
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> ChunkerStats {
        self.stats
    }

    /// The format the input has been recognised as (`None` while still undecided).
    pub fn format(&self) -> Option<InputFormat> {
        match self.mode {
            Mode::Undecided => None,
            Mode::Ts => Some(InputFormat::MpegTs),
            Mode::Ogg => Some(InputFormat::Ogg),
            Mode::Mp4 => Some(InputFormat::Mp4),
            Mode::MpegAudio => Some(InputFormat::MpegAudio),
            Mode::Adts => Some(InputFormat::Adts),
            Mode::Opaque => Some(InputFormat::Opaque),
        }
    }

    /// How long a chunk lasts: [`ChunkerConfig::audio_duration`] once the input is known to
    /// be audio alone, [`ChunkerConfig::duration`] otherwise.
    pub fn duration(&self) -> Duration {
        match (self.mode, self.config.audio_duration) {
            (Mode::Ogg, Some(audio)) if !self.ogg_video => audio,
            (Mode::MpegAudio | Mode::Adts, Some(audio)) => audio,
            _ => self.config.duration,
        }
    }

    /// The next stream header captured (Ogg, fragmented MP4), oldest first. Its bytes are also
    /// the payload of a chunk flagged [`ChunkFlags::STREAM_HEADER`].
    pub fn poll_stream_header(&mut self) -> Option<Bytes> {
        self.headers.pop_front()
    }

    /// The sequence number the next chunk will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Takes input bytes that arrived at `now`.
    pub fn handle_input(&mut self, now: Instant, mut data: &[u8]) {
        self.handle_timeout(now);
        self.stats.bytes += data.len() as u64;
        while !data.is_empty() {
            if self.buf.is_empty() {
                self.started = Some(now);
            }
            // Never hold much more than a chunk: feed in slices so size cuts happen on time.
            let room = (self.config.max_bytes + TS_PACKET).saturating_sub(self.buf.len());
            let take = data.len().min(room.max(TS_PACKET));
            self.buf.extend_from_slice(&data[..take]);
            if self.mode == Mode::Undecided {
                self.undecided_bytes += take;
                let keep = take.min(self.detect_limit().saturating_sub(self.detect.len()));
                self.detect.extend_from_slice(&data[..keep]);
            }
            data = &data[take..];
            self.process(now);
        }
    }

    /// Closes the open chunk if its duration has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.poll_timeout()
            && now >= deadline
        {
            let at = self.closable_len();
            self.emit(at, now);
        }
    }

    /// When [`Chunker::handle_timeout`] must next be called, if anything is waiting to close.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closable_len() == 0 {
            return None;
        }
        self.started.map(|s| s + self.duration())
    }

    /// Ends the input: closes the open chunk with everything left, including a partial TS
    /// packet, flagged end-of-stream. With nothing left open, the last chunk not yet taken
    /// is flagged; if every chunk has been taken, a one-byte chunk flagged
    /// [`ChunkFlags::NO_DATA`] carries the flag, so that every stream that had a chunk ends
    /// with one flagged end-of-stream.
    pub fn finish(&mut self, now: Instant) {
        let len = self.buf.len();
        if len > 0 {
            self.emit(len, now);
        } else if self.ready.is_empty() && self.next_seq > self.config.first_seq {
            let mut flags = ChunkFlags::NO_DATA;
            flags.insert(ChunkFlags::END_OF_STREAM);
            self.ready.push_back(Chunk {
                seq: self.next_seq,
                flags,
                started: now,
                payload: Bytes::from_static(&[0]),
            });
            self.next_seq += 1;
            self.stats.chunks += 1;
        }
        if let Some(last) = self.ready.back_mut() {
            last.flags.insert(ChunkFlags::END_OF_STREAM);
        }
    }

    /// The next closed chunk, oldest first.
    pub fn poll_chunk(&mut self) -> Option<Chunk> {
        self.ready.pop_front()
    }

    /// Bytes of the open chunk that may be closed now.
    fn closable_len(&self) -> usize {
        match self.mode {
            // The first packet may start past what the open chunk holds yet (detection that
            // settled after chunks had closed undecided): everything held is before it.
            Mode::Ts => self.scan.min(self.buf.len()),
            Mode::Ogg | Mode::Mp4 if self.capturing => 0,
            Mode::Ogg | Mode::Mp4 | Mode::MpegAudio | Mode::Adts => self.unit_closable_len(),
            Mode::Undecided | Mode::Opaque => self.buf.len(),
        }
    }

    /// Ogg, MP4, audio: everything but a unit header that has not fully arrived; for audio,
    /// also not a frame that has only partly arrived (it opens the next chunk, which then starts
    /// on a frame). Ogg pages and MP4 fragments may be far larger than a chunk.
    fn unit_closable_len(&self) -> usize {
        match self.mode {
            Mode::MpegAudio | Mode::Adts if self.scan > self.buf.len() && self.unit_at > 0 => {
                self.unit_at
            }
            _ => self.scan.min(self.buf.len()),
        }
    }

    fn process(&mut self, now: Instant) {
        if self.mode == Mode::Undecided {
            self.detect();
        }
        match self.mode {
            Mode::Undecided => {
                if self.buf.len() >= self.config.max_bytes {
                    self.emit(self.config.max_bytes, now);
                }
            }
            Mode::Opaque => {
                while self.buf.len() >= self.config.max_bytes {
                    self.emit(self.config.max_bytes, now);
                }
            }
            Mode::Ts => self.scan_packets(now),
            Mode::Ogg | Mode::Mp4 | Mode::MpegAudio | Mode::Adts => self.scan_units(now),
        }
    }

    /// Decides the format from the input's first bytes (`self.detect`, kept apart from the
    /// open chunk: with short chunks, or a slow trickle of input, chunks may close before enough
    /// has arrived to tell).
    fn detect(&mut self) {
        let seen = &self.detect;
        // Input taken so far, of which the open chunk is the tail.
        let emitted = self.undecided_bytes - self.buf.len();
        if emitted == 0 && framing::looks_like_ogg(seen) {
            self.decided(Mode::Ogg, 0);
            return;
        }
        if emitted == 0 && framing::looks_like_mp4(seen) {
            self.decided(Mode::Mp4, 0);
            return;
        }
        let need = TS_PACKET * TS_DETECT_PACKETS;
        if seen.len() < need + TS_PACKET {
            return;
        }
        let found = (0..TS_PACKET)
            .find(|&off| (0..TS_DETECT_PACKETS).all(|i| seen[off + i * TS_PACKET] == TS_SYNC));
        if let Some(off) = found {
            // Bytes before the first packet travel as they are, at the chunk's start.
            let first = off + emitted.saturating_sub(off).div_ceil(TS_PACKET) * TS_PACKET;
            self.decided(Mode::Ts, first - emitted);
            return;
        }
        // Not MPEG-TS (whose audio packets could hold MPEG audio frame headers): bare audio?
        let mut wait = false;
        for (mode, parse) in [
            (Mode::MpegAudio, framing::mpeg_audio as fn(&[u8]) -> Unit),
            (Mode::Adts, framing::adts),
        ] {
            match framing::detect_audio(seen, parse, AUDIO_DETECT_SEARCH) {
                framing::Detected::At(off) => {
                    // Walk the frames to the first one in the open chunk.
                    let mut at = off;
                    while at < emitted {
                        match parse(&seen[at..]) {
                            Unit::Found(info) => at += info.len,
                            _ => break,
                        }
                    }
                    if at >= emitted {
                        self.decided(mode, at - emitted);
                        return;
                    }
                }
                framing::Detected::NeedMore => wait = true,
                framing::Detected::No => {}
            }
        }
        if !wait || seen.len() >= self.detect_limit() {
            self.decided(Mode::Opaque, 0);
        }
    }

    /// How many of the input's first bytes detection may hold: [`AUDIO_DETECT_LIMIT`] past the
    /// ID3v2 tag the input starts with, if it does and the tag is not too large.
    fn detect_limit(&self) -> usize {
        let tag = match framing::mpeg_audio(&self.detect) {
            Unit::Found(info) if info.prefix && info.len <= ID3_DETECT_LIMIT => info.len,
            _ => 0,
        };
        tag + AUDIO_DETECT_LIMIT
    }

    /// The format is known; the first packet or unit starts at `scan` in the open chunk.
    fn decided(&mut self, mode: Mode, scan: usize) {
        self.mode = mode;
        self.scan = scan;
        self.detect = Vec::new();
    }

    fn scan_packets(&mut self, now: Instant) {
        while self.scan + TS_PACKET <= self.buf.len() {
            if self.buf[self.scan] != TS_SYNC {
                self.resync(now);
                continue;
            }
            if self.scan + TS_PACKET > self.config.max_bytes {
                self.emit(self.scan, now);
            }
            let packet = &self.buf[self.scan..self.scan + TS_PACKET];
            let pid = u16::from_be_bytes([packet[1], packet[2]]) & 0x1fff;
            let payload_start = packet[1] & 0x40 != 0;
            // With video in the programme, a decoder can start only at a video keyframe: an
            // audio random-access point in the middle of a group of pictures is not one.
            let counts = self.video_pids.is_empty() || self.video_pids.contains(&pid);
            if is_random_access(packet) && counts {
                self.at_random_access(now, pid);
            } else if pid == 0 || self.pmt_pids.contains(&pid) {
                if payload_start {
                    if pid == 0 {
                        self.pmt_pids = pat_pmt_pids(packet);
                    } else if let Some(video) = pmt_video_pids(packet) {
                        self.video_pids = video;
                    }
                }
                if self.psi_run.is_none() {
                    self.psi_run = Some(self.scan);
                }
            } else {
                self.psi_run = None;
            }
            self.scan += TS_PACKET;
        }
    }

    /// Handles a random-access packet at `self.scan`: maybe cut before it (and before the PAT/PMT
    /// run leading up to it).
    fn at_random_access(&mut self, now: Instant, pid: u16) {
        let cut_at = self.psi_run.take().unwrap_or(self.scan);
        let sparse = match self.rap_seen.iter().find(|(p, _)| *p == pid) {
            Some((_, last)) => now.saturating_duration_since(*last) > 2 * self.duration(),
            None => true,
        };
        let age = self
            .started
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        let half_full = age >= self.duration() / 2 && !self.starts_at_rap;
        if cut_at == 0 {
            self.starts_at_rap = true;
        } else if sparse || half_full {
            self.emit(cut_at, now);
            self.starts_at_rap = true;
        }
        match self.rap_seen.iter_mut().find(|(p, _)| *p == pid) {
            Some(entry) => entry.1 = now,
            None => {
                if self.rap_seen.len() == MAX_TRACKED_PIDS {
                    self.rap_seen.remove(0);
                }
                self.rap_seen.push((pid, now));
            }
        }
    }

    fn scan_units(&mut self, now: Instant) {
        while self.scan < self.buf.len() {
            // A unit past the size limit (after bytes skipped to find it): size cuts first, at
            // the unit before it where that fits.
            while self.scan > self.config.max_bytes {
                let max = self.config.max_bytes;
                let at = if (1..=max).contains(&self.unit_at) {
                    self.unit_at
                } else {
                    max
                };
                self.emit(at, now);
            }
            let at = &self.buf[self.scan..];
            let unit = self.parse_unit(at);
            match unit {
                Unit::Incomplete => break,
                Unit::Invalid => self.unit_resync(),
                Unit::Found(info) => {
                    self.at_unit(now, info);
                    self.unit_at = self.scan;
                    self.scan = self.scan.saturating_add(info.len);
                }
            }
            if self.mode == Mode::Opaque {
                break;
            }
        }
        while self.buf.len() >= self.config.max_bytes {
            if self.capturing {
                // Far beyond any real header: give up capturing it.
                self.capturing = false;
                self.stats.headers_too_large += 1;
            }
            let at = match self.mode {
                Mode::Opaque => self.config.max_bytes,
                _ => self.unit_closable_len().min(self.config.max_bytes),
            };
            if at == 0 {
                break;
            }
            self.emit(at, now);
        }
    }

    fn parse_unit(&self, at: &[u8]) -> Unit {
        match self.mode {
            Mode::Ogg => framing::ogg_page(at),
            Mode::MpegAudio => framing::mpeg_audio(at),
            Mode::Adts => framing::adts(at),
            _ => framing::mp4_box(at),
        }
    }

    /// Ogg, MP4, audio: a whole unit header is at `self.scan`.
    fn at_unit(&mut self, now: Instant, info: UnitInfo) {
        if info.starts_header && !self.capturing {
            // A header starts a chunk of its own.
            self.emit(self.scan, now);
            self.capturing = true;
            self.psi_run = None;
            return;
        }
        if self.capturing {
            if info.header_part {
                return;
            }
            self.capturing = false;
            let len = self.scan;
            if self.mode == Mode::Ogg {
                // Each header (a chained stream's too) is judged afresh, over its streams.
                self.ogg_video = framing::ogg_header_has_video(&self.buf[..len]);
            }
            if len <= MAX_STREAM_HEADER_LEN {
                let header = Bytes::copy_from_slice(&self.buf[..len]);
                self.emit(len, now);
                if let Some(last) = self.ready.back_mut() {
                    last.flags = ChunkFlags::STREAM_HEADER;
                }
                self.headers.push_back(header);
                self.stats.stream_headers += 1;
            } else {
                self.stats.headers_too_large += 1;
                self.emit(len, now);
            }
        }
        if info.prefix {
            self.psi_run.get_or_insert(self.scan);
            return;
        }
        if !info.random_access {
            self.psi_run = None;
            return;
        }
        let cut_at = self.psi_run.take().unwrap_or(self.scan);
        let age = self
            .started
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        if cut_at == 0 {
            self.starts_at_rap = true;
        } else if info.sparse || (age >= self.duration() / 2 && !self.starts_at_rap) {
            self.emit(cut_at, now);
            self.starts_at_rap = true;
        }
    }

    /// Ogg, MP4, audio: the bytes at `self.scan` are not a unit.
    fn unit_resync(&mut self) {
        self.stats.resyncs += 1;
        self.psi_run = None;
        self.capturing = false;
        let from = self.scan + 1;
        self.scan = match self.mode {
            Mode::Mp4 => {
                self.mode = Mode::Opaque;
                return;
            }
            Mode::MpegAudio | Mode::Adts => self.next_audio_frame(from),
            _ => self.buf[from..]
                .windows(4)
                .position(|w| w == b"OggS")
                .map_or(self.buf.len().saturating_sub(3).max(from), |i| from + i),
        };
    }

    /// Audio: the first offset from `from` where a frame starts whose successor (if it has
    /// arrived) is a frame too; or where the bytes left could still become one.
    fn next_audio_frame(&self, from: usize) -> usize {
        (from..self.buf.len())
            .find(|&p| match self.parse_unit(&self.buf[p..]) {
                Unit::Incomplete => true,
                Unit::Invalid => false,
                Unit::Found(info) => {
                    let next = p.saturating_add(info.len);
                    next >= self.buf.len()
                        || !matches!(self.parse_unit(&self.buf[next..]), Unit::Invalid)
                }
            })
            .unwrap_or(self.buf.len())
    }

    /// Sync lost at `self.scan`: skip to the next plausible sync byte, keeping every byte.
    fn resync(&mut self, now: Instant) {
        self.stats.resyncs += 1;
        self.psi_run = None;
        let from = self.scan + 1;
        let next = self.buf[from..]
            .iter()
            .enumerate()
            .position(|(i, &b)| {
                let p = from + i;
                b == TS_SYNC && self.buf.get(p + TS_PACKET).is_none_or(|&n| n == TS_SYNC)
            })
            .map_or(self.buf.len(), |i| from + i);
        self.scan = next;
        while self.scan > self.config.max_bytes {
            self.emit(self.config.max_bytes, now);
        }
    }

    /// Closes the open chunk at byte `at`; the rest of `buf` opens the next chunk at `now`.
    fn emit(&mut self, at: usize, now: Instant) {
        if at == 0 {
            return;
        }
        // Audio cut before a frame still arriving: the next chunk starts on that frame.
        let next_on_frame = matches!(self.mode, Mode::MpegAudio | Mode::Adts)
            && at == self.unit_at
            && at < self.buf.len();
        let payload = self.buf.split_to(at).freeze();
        let mut flags = ChunkFlags::empty();
        let random_access = match self.mode {
            Mode::Ts | Mode::Ogg | Mode::Mp4 | Mode::MpegAudio | Mode::Adts => self.starts_at_rap,
            Mode::Undecided | Mode::Opaque => true,
        };
        if random_access {
            flags.insert(ChunkFlags::RANDOM_ACCESS);
            self.stats.random_access_chunks += 1;
        }
        let started = self.started.unwrap_or(now);
        self.ready.push_back(Chunk {
            seq: self.next_seq,
            flags,
            started,
            payload,
        });
        self.next_seq += 1;
        self.stats.chunks += 1;
        self.scan = self.scan.saturating_sub(at);
        self.psi_run = self.psi_run.and_then(|p| p.checked_sub(at));
        self.unit_at = self.unit_at.saturating_sub(at);
        self.starts_at_rap = next_on_frame;
        self.started = if self.buf.is_empty() { None } else { Some(now) };
    }
}

/// Whether a TS packet's adaptation field sets `random_access_indicator`.
fn is_random_access(packet: &[u8]) -> bool {
    let adaptation = packet[3] & 0x20 != 0;
    adaptation && packet[4] > 0 && packet[5] & 0x40 != 0
}

/// The PMT PIDs listed in a PAT section that starts in this packet.
/// The PSI section that starts in a packet with `payload_unit_start_indicator` set, if its table
/// id is `table_id`: the bytes after its 8-byte header up to its CRC (or the packet's end, for a
/// section longer than one packet).
fn psi_section(packet: &[u8], table_id: u8) -> Option<&[u8]> {
    let mut at = 4;
    if packet[3] & 0x20 != 0 {
        at += 1 + packet[4] as usize;
    }
    let section = at + 1 + *packet.get(at)? as usize;
    let head = packet.get(section..section + 8)?;
    if head[0] != table_id {
        return None;
    }
    let section_len = (u16::from_be_bytes([head[1], head[2]]) & 0x0fff) as usize;
    let end = (section + 3 + section_len)
        .saturating_sub(4)
        .min(packet.len());
    packet.get(section + 8..end.max(section + 8))
}

/// The PMT PIDs a PAT names (program 0, the network PID, left out).
fn pat_pmt_pids(packet: &[u8]) -> Vec<u16> {
    let Some(programs) = psi_section(packet, 0x00) else {
        return Vec::new();
    };
    programs
        .chunks_exact(4)
        .filter(|p| p[0] != 0 || p[1] != 0)
        .map(|p| u16::from_be_bytes([p[2], p[3]]) & 0x1fff)
        .take(MAX_PMT_PIDS)
        .collect()
}

/// The elementary PIDs a PMT names with a video stream type, or `None` if the packet does not
/// start a PMT.
fn pmt_video_pids(packet: &[u8]) -> Option<Vec<u16>> {
    let body = psi_section(packet, 0x02)?;
    // PCR PID (2 bytes), then the programme descriptors, then the stream loop.
    let info_len = (u16::from_be_bytes([*body.get(2)?, *body.get(3)?]) & 0x0fff) as usize;
    let mut streams = body.get(4 + info_len..)?;
    let mut video = Vec::new();
    while streams.len() >= 5 && video.len() < MAX_TRACKED_PIDS {
        let pid = u16::from_be_bytes([streams[1], streams[2]]) & 0x1fff;
        if is_video_stream_type(streams[0]) {
            video.push(pid);
        }
        let es_info = (u16::from_be_bytes([streams[3], streams[4]]) & 0x0fff) as usize;
        streams = streams.get(5 + es_info..).unwrap_or(&[]);
    }
    Some(video)
}

/// ISO/IEC 13818-1 stream types that carry video: MPEG-1/2, MPEG-4 part 2, H.264 (with SVC and
/// MVC), HEVC, VVC, and the registered VC-1, Dirac and AVS types.
fn is_video_stream_type(stream_type: u8) -> bool {
    matches!(
        stream_type,
        0x01 | 0x02 | 0x10 | 0x1b | 0x1f | 0x20 | 0x24 | 0x33 | 0x42 | 0xd1 | 0xea
    )
}

#[cfg(test)]
mod tests;
