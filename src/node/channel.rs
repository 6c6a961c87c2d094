//! Per-channel state inside a node: the window of recent chunks, verification, regeneration and
//! (for players) in-order playout.
//!
//! ```text
//!  ShardFrame ─▶ HeaderVerifier ─▶ PartialChunk::insert ─▶ Stored { new shard(s) to fan out }
//!  publish(CodedChunk) ──────────────────────────────────▶ Stored { all N shards }
//!  window full ─▶ oldest chunk evicted (by count and by bytes)
//!  player: next_seq complete ─▶ Chunk out; stalled past playout_delay ─▶ skipped, counted
//! ```
//!
//! Pure: the engine passes `now`. Nothing unverified is ever stored.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::keys::ChannelId;
use crate::stream::{
    ChunkFlags, CodedChunk, CodingParams, HeaderVerifier, Inserted, PartialChunk, Payload,
    ShardCoder, ShardError, SignedChunkHeader,
};
use crate::wire::{SignedStreamHeader, StreamTitle};

/// What this node does with a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelMode {
    /// It publishes the channel (holds the channel key).
    Source,
    /// It relays: stores, regenerates and serves substreams.
    Relay,
    /// It plays: rebuilds chunks and emits them in order (and may serve others).
    Play,
}

/// Window and playout settings.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// Most chunks kept (default 40: 10 s of 250 ms chunks).
    pub window_chunks: usize,
    /// Most shard bytes kept.
    pub window_bytes: usize,
    /// How long a player waits for a missing chunk once a later one is complete.
    pub playout_delay: Duration,
    /// How far behind the live edge (by source timestamps) a player starts, so the chunks
    /// already buffered absorb jitter and parent changes (default 1.5 s: losing every parent
    /// at once takes about 1.3 s to notice and a round trip or two to mend, which 1 s did not
    /// cover; see `tests/sim_tiers.rs`).
    pub target_delay: Duration,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            window_chunks: 40,
            window_bytes: 64 * 1024 * 1024,
            playout_delay: Duration::from_millis(1500),
            target_delay: Duration::from_millis(1500),
        }
    }
}

/// Counters for one channel at one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Shards stored after verification.
    pub shards_in: u64,
    /// Shard bytes stored after verification.
    pub bytes_in: u64,
    /// Shards received again (already held).
    pub duplicates: u64,
    /// Bytes of those duplicate shards.
    pub duplicate_bytes: u64,
    /// Shards or headers rejected by verification.
    pub verify_failures: u64,
    /// Shards computed by regeneration.
    pub regenerated: u64,
    /// Chunks played out complete and in order.
    pub chunks_played: u64,
    /// Chunks given up on (never complete within the playout delay).
    pub chunks_skipped: u64,
    /// Chunks evicted from the window.
    pub evicted: u64,
    /// Player: time from the first subscription to the first chunk out.
    pub startup: Option<Duration>,
}

impl ChannelStats {
    /// Adds `other`'s counters to these (a start-up time is kept, not added).
    pub fn absorb(&mut self, other: &Self) {
        self.shards_in += other.shards_in;
        self.bytes_in += other.bytes_in;
        self.duplicates += other.duplicates;
        self.duplicate_bytes += other.duplicate_bytes;
        self.verify_failures += other.verify_failures;
        self.regenerated += other.regenerated;
        self.chunks_played += other.chunks_played;
        self.chunks_skipped += other.chunks_skipped;
        self.evicted += other.evicted;
        self.startup = self.startup.or(other.startup);
    }
}

/// A verified shard ready to be served.
#[derive(Debug, Clone)]
pub struct StoredShard {
    /// Its chunk's header.
    pub header: Arc<SignedChunkHeader>,
    /// Its index.
    pub index: usize,
    /// Its bytes.
    pub shard: Bytes,
}

/// Why a shard frame was refused; the sender is at fault.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Rejected {
    /// Bad signature.
    #[error("{0}")]
    Header(#[from] crate::stream::VerifyError),
    /// Bad shard.
    #[error("{0}")]
    Shard(#[from] ShardError),
    /// A header whose coding parameters differ from the channel's.
    #[error("chunk {0} uses coding parameters other than the channel's")]
    Params(u64),
    /// A stream header the channel key did not sign.
    #[error("stream header {0} has a bad signature")]
    StreamHeader(u32),
    /// A title the channel key did not sign.
    #[error("title {0} has a bad signature")]
    Title(u32),
}

/// Puts `new` in `held` unless what is held has a serial at least `serial`; whether it did.
fn keep_newer<T>(held: &mut Option<T>, new: T, serial: u32, serial_of: impl Fn(&T) -> u32) -> bool {
    if held.as_ref().is_some_and(|h| serial_of(h) >= serial) {
        return false;
    }
    *held = Some(new);
    true
}

/// One channel's state at one node.
#[derive(Debug)]
pub struct Channel {
    id: ChannelId,
    mode: ChannelMode,
    /// Regenerate missing shards at K (relays; players that serve others).
    regenerate: bool,
    config: ChannelConfig,
    params: Option<CodingParams>,
    verifier: HeaderVerifier,
    window: BTreeMap<u64, PartialChunk>,
    window_bytes: usize,
    /// Player: the next chunk to emit.
    next_play: Option<u64>,
    /// Player: since when a later chunk is complete while `next_play` is not.
    stalled_since: Option<Instant>,
    /// Player: runs of chunks given up on (first and last sequence number), not yet taken.
    skipped: Vec<(u64, u64)>,
    /// When the node first subscribed to this channel.
    joined: Option<Instant>,
    /// The newest stream header (Ogg, fragmented MP4), verified.
    stream_header: Option<SignedStreamHeader>,
    /// The newest title (a radio's song title).
    title: Option<StreamTitle>,
    stats: ChannelStats,
}

impl Channel {
    /// A channel in `mode`.
    pub fn new(id: ChannelId, mode: ChannelMode, config: ChannelConfig) -> Self {
        Self {
            id,
            mode,
            regenerate: mode == ChannelMode::Relay,
            verifier: HeaderVerifier::new(id, config.window_chunks.max(16) * 2),
            config,
            params: None,
            stream_header: None,
            title: None,
            window: BTreeMap::new(),
            window_bytes: 0,
            next_play: None,
            stalled_since: None,
            skipped: Vec::new(),
            joined: None,
            stats: ChannelStats::default(),
        }
    }

    /// The channel id.
    pub fn id(&self) -> ChannelId {
        self.id
    }

    /// The mode.
    pub fn mode(&self) -> ChannelMode {
        self.mode
    }

    /// Records when the node first asked for this channel (start-up time is measured from it).
    pub fn mark_joined(&mut self, now: Instant) {
        self.joined.get_or_insert(now);
    }

    /// Whether missing shards are regenerated once K are held, so that this node can serve any
    /// substream. Relays always do; a player does when it relays to other peers.
    pub fn set_regenerate(&mut self, on: bool) {
        self.regenerate = on || self.mode == ChannelMode::Relay;
    }

    /// Coding parameters, once known.
    pub fn params(&self) -> Option<CodingParams> {
        self.params
    }

    /// The newest stream header, if the format has one.
    pub fn stream_header(&self) -> Option<&SignedStreamHeader> {
        self.stream_header.as_ref()
    }

    /// Keeps `header` if it is newer than the one held (a higher serial). The caller has checked
    /// its signature (or signed it). Returns whether it was kept.
    pub fn set_stream_header(&mut self, header: SignedStreamHeader) -> bool {
        let serial = header.serial;
        keep_newer(&mut self.stream_header, header, serial, |h| h.serial)
    }

    /// The newest title, if the source set one.
    pub fn title(&self) -> Option<&StreamTitle> {
        self.title.as_ref()
    }

    /// Keeps `title` if it is newer than the one held (a higher serial). The caller has checked
    /// its signature (or signed it). Returns whether it was kept.
    pub fn set_title(&mut self, title: StreamTitle) -> bool {
        let serial = title.serial;
        keep_newer(&mut self.title, title, serial, |t| t.serial)
    }

    /// Counters.
    pub fn stats(&self) -> ChannelStats {
        self.stats
    }

    /// Shard bytes held in the window.
    pub fn window_bytes(&self) -> usize {
        self.window_bytes
    }

    /// Oldest and newest chunk held.
    pub fn range(&self) -> Option<(u64, u64)> {
        Some((
            *self.window.keys().next()?,
            *self.window.keys().next_back()?,
        ))
    }

    /// The chunk `seq`, if held.
    pub fn chunk(&self, seq: u64) -> Option<&PartialChunk> {
        self.window.get(&seq)
    }

    /// Sequence numbers held from `from` on.
    pub fn seqs_from(&self, from: u64) -> Vec<u64> {
        self.window.range(from..).map(|(s, _)| *s).collect()
    }

    /// The newest held chunk a player can start on.
    pub fn newest_random_access(&self) -> Option<u64> {
        self.window
            .iter()
            .rev()
            .find(|(_, c)| c.header().header.flags.contains(ChunkFlags::RANDOM_ACCESS))
            .map(|(s, _)| *s)
    }

    /// Source: stores a freshly published chunk; returns its shards for fan-out.
    pub fn publish(&mut self, coded: &CodedChunk) -> Vec<StoredShard> {
        let header = coded.header();
        self.params = Some(header.header.params);
        let seq = header.header.seq;
        let mut partial = PartialChunk::new(Arc::clone(header));
        let mut out = Vec::with_capacity(coded.shards().len());
        for (index, shard) in coded.shards().iter().enumerate() {
            // The source's own shards match their hashes by construction (a `CodedChunk` is
            // made only by the publisher that hashed them, and cannot be changed after), so
            // they are not hashed again: that was 2% of a fan-out worker's time at 10
            // subscribers. Index and length are still checked.
            if partial.insert_verified(index, shard.clone()).is_ok() {
                self.window_bytes += shard.len();
                out.push(StoredShard {
                    header: Arc::clone(header),
                    index,
                    shard: shard.clone(),
                });
            }
        }
        self.window.insert(seq, partial);
        self.evict();
        out
    }

    /// Verifies a header from the network (signature once per chunk).
    pub fn verify_header(
        &mut self,
        header: SignedChunkHeader,
    ) -> Result<Arc<SignedChunkHeader>, Rejected> {
        let seq = header.header.seq;
        if let Some(p) = self.params
            && p != header.header.params
        {
            self.stats.verify_failures += 1;
            return Err(Rejected::Params(seq));
        }
        let header = self.verifier.verify(header).map_err(|e| {
            self.stats.verify_failures += 1;
            Rejected::from(e)
        })?;
        self.params.get_or_insert(header.header.params);
        Ok(header)
    }

    /// Stores a shard of a verified chunk. Returns the shards now newly available to serve: this
    /// one, plus every regenerated one if this shard completed K (relays only).
    pub fn insert_shard(
        &mut self,
        header: &Arc<SignedChunkHeader>,
        index: usize,
        shard: Bytes,
        coder: &mut ShardCoder,
    ) -> Result<Vec<StoredShard>, Rejected> {
        let seq = header.header.seq;
        if self.outdated(seq) {
            return Ok(Vec::new());
        }
        let partial = self
            .window
            .entry(seq)
            .or_insert_with(|| PartialChunk::new(Arc::clone(header)));
        if !Arc::ptr_eq(partial.header(), header) && **partial.header() != **header {
            // A second, differently signed header for this sequence: keep the first.
            return Ok(Vec::new());
        }
        let len = shard.len();
        match partial.insert(index, shard.clone()) {
            Ok(Inserted::Duplicate) => {
                self.stats.duplicates += 1;
                self.stats.duplicate_bytes += len as u64;
                return Ok(Vec::new());
            }
            Ok(Inserted::New(_)) => {}
            Err(e) => {
                self.stats.verify_failures += 1;
                return Err(e.into());
            }
        }
        self.stats.shards_in += 1;
        self.stats.bytes_in += len as u64;
        self.window_bytes += len;
        let mut out = vec![StoredShard {
            header: Arc::clone(partial.header()),
            index,
            shard,
        }];
        if self.regenerate && partial.held() == partial.header().header.params.original() {
            let before: Vec<bool> = (0..partial.header().header.params.total())
                .map(|i| partial.shard(i).is_some())
                .collect();
            if let Ok(made) = partial.regenerate(coder) {
                self.stats.regenerated += made as u64;
                for (i, had) in before.iter().enumerate() {
                    if !had && let Some(s) = partial.shard(i) {
                        self.window_bytes += s.len();
                        out.push(StoredShard {
                            header: Arc::clone(partial.header()),
                            index: i,
                            shard: s.clone(),
                        });
                    }
                }
            }
        }
        self.evict();
        Ok(out)
    }

    /// Stores shards that a sibling worker of this node verified and stored (same headers, same
    /// buffers: nothing is copied or hashed again). Returns the ones new here, for fan-out.
    /// Imported chunks are not regenerated: the sibling that received them does that and
    /// exports the result.
    pub fn import(&mut self, shards: &[StoredShard]) -> Vec<StoredShard> {
        let mut out = Vec::new();
        for stored in shards {
            let seq = stored.header.header.seq;
            if self.outdated(seq) {
                continue;
            }
            self.params.get_or_insert(stored.header.header.params);
            let partial = self
                .window
                .entry(seq)
                .or_insert_with(|| PartialChunk::new(Arc::clone(&stored.header)));
            if !Arc::ptr_eq(partial.header(), &stored.header)
                && **partial.header() != *stored.header
            {
                continue;
            }
            let len = stored.shard.len();
            match partial.insert_verified(stored.index, stored.shard.clone()) {
                Ok(Inserted::New(_)) => {
                    self.stats.shards_in += 1;
                    self.stats.bytes_in += len as u64;
                    self.window_bytes += len;
                    out.push(stored.clone());
                }
                Ok(Inserted::Duplicate) => {
                    self.stats.duplicates += 1;
                    self.stats.duplicate_bytes += len as u64;
                }
                Err(_) => self.stats.verify_failures += 1,
            }
        }
        self.evict();
        out
    }

    /// Whether chunk `seq` is of no use any more: older than everything a full window keeps,
    /// or already played past.
    fn outdated(&self, seq: u64) -> bool {
        let before_window = self.range().is_some_and(|(oldest, _)| {
            seq < oldest && self.window.len() >= self.config.window_chunks
        });
        before_window || self.next_play.is_some_and(|next| seq < next)
    }

    fn evict(&mut self) {
        while self.window.len() > self.config.window_chunks
            || (self.window_bytes > self.config.window_bytes && self.window.len() > 1)
        {
            let Some((seq, chunk)) = self.window.pop_first() else {
                break;
            };
            let bytes: usize = (0..chunk.header().header.params.total())
                .filter_map(|i| chunk.shard(i).map(Bytes::len))
                .sum();
            self.window_bytes = self.window_bytes.saturating_sub(bytes);
            self.stats.evicted += 1;
            if self.next_play.is_some_and(|next| next <= seq) {
                // The player fell so far behind that its next chunk left the window.
                let next = self.next_play.unwrap_or(seq);
                self.stats.chunks_skipped += seq + 1 - next;
                self.skipped.push((next, seq));
                self.next_play = Some(seq + 1);
            }
        }
    }

    /// Player: the chunks ready to output, in order. Skips a chunk that stays incomplete for
    /// `playout_delay` after a later chunk became complete.
    pub fn poll_playout(
        &mut self,
        now: Instant,
        coder: &mut ShardCoder,
    ) -> Vec<(u64, ChunkFlags, Payload)> {
        let mut out = Vec::new();
        if self.mode != ChannelMode::Play {
            return out;
        }
        if self.next_play.is_none() {
            // Start on the newest complete random-access chunk that is at least the target delay
            // behind the live edge; failing that (a young channel, or a delay longer than the
            // window holds), on the oldest one: as much of the asked-for buffer as there is.
            // (The newest, as it was, gave a player that asked for a delay its parents' windows
            // could not hold no buffer at all.)
            let edge = self
                .window
                .values()
                .next_back()
                .map(|c| c.header().header.timestamp_us);
            let target = self.config.target_delay.as_micros() as u64;
            let mut startable = self.window.iter().rev().filter(|(_, c)| {
                c.is_complete_enough()
                    && c.header().header.flags.contains(ChunkFlags::RANDOM_ACCESS)
            });
            let oldest = startable.clone().next_back().map(|(s, _)| *s);
            self.next_play = startable
                .find(|(_, c)| {
                    edge.is_some_and(|e| e.saturating_sub(c.header().header.timestamp_us) >= target)
                })
                .map(|(s, _)| *s)
                .or(oldest);
        }
        while let Some(next) = self.next_play {
            match self.window.get(&next) {
                Some(c) if c.is_complete_enough() => {
                    match c.rebuild(coder) {
                        Ok(payload) => {
                            out.push((next, c.header().header.flags, payload));
                            self.stats.chunks_played += 1;
                            if self.stats.startup.is_none() {
                                self.stats.startup =
                                    self.joined.map(|j| now.saturating_duration_since(j));
                            }
                        }
                        Err(_) => {
                            self.stats.chunks_skipped += 1;
                            self.skipped.push((next, next));
                        }
                    }
                    self.next_play = Some(next + 1);
                    self.stalled_since = None;
                }
                _ => {
                    let later_complete = self
                        .window
                        .range(next + 1..)
                        .any(|(_, c)| c.is_complete_enough());
                    if !later_complete {
                        self.stalled_since = None;
                        break;
                    }
                    let since = *self.stalled_since.get_or_insert(now);
                    if now.saturating_duration_since(since) >= self.config.playout_delay {
                        // Give up on every chunk up to the next one held (a run of chunks
                        // none of whose shards came costs one wait, not one each; a restarted
                        // source's jump in numbering costs one wait and is counted as at most
                        // a window's worth of chunks).
                        let held = self
                            .window
                            .range(next + 1..)
                            .next()
                            .map_or(next + 1, |(s, _)| *s);
                        self.stats.chunks_skipped +=
                            (held - next).min(self.config.window_chunks as u64);
                        self.skipped.push((next, held - 1));
                        self.next_play = Some(held);
                        self.stalled_since = None;
                    } else {
                        break;
                    }
                }
            }
        }
        out
    }

    /// Player: the runs of chunks [`Channel::poll_playout`] gave up on since last asked
    /// (first and last sequence number of each).
    pub fn take_skipped(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.skipped)
    }

    /// Player: when [`Channel::poll_playout`] must run again to skip a stalled chunk.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.stalled_since.map(|s| s + self.config.playout_delay)
    }

    /// Nominal chunk duration in milliseconds, estimated from the source timestamps held
    /// (250 until two chunks are known).
    pub fn chunk_ms_estimate(&self) -> u32 {
        let (Some(first), Some(last)) = (
            self.window.values().next(),
            self.window.values().next_back(),
        ) else {
            return 250;
        };
        let span = last.seq() - first.seq();
        let micros = last
            .header()
            .header
            .timestamp_us
            .saturating_sub(first.header().header.timestamp_us);
        if span == 0 || micros == 0 {
            return 250;
        }
        u32::try_from(micros / span / 1000)
            .unwrap_or(250)
            .clamp(10, 10_000)
    }

    /// Player: the next chunk it will emit.
    pub fn next_play(&self) -> Option<u64> {
        self.next_play
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // one base instant; time moves by hand
    use super::*;
    use crate::keys::ChannelKey;
    use crate::stream::ChunkPublisher;

    #[test]
    fn a_player_starts_the_target_delay_back_or_as_far_back_as_it_holds() {
        let id = ChannelKey::from_seed(&[4; 32]).channel_id();
        let data = Bytes::from(vec![7u8; 3000]);
        let start = |target_ms: u64| {
            let key = ChannelKey::from_seed(&[4; 32]);
            let mut publisher = ChunkPublisher::new(key, CodingParams::DEFAULT);
            let config = ChannelConfig {
                target_delay: Duration::from_millis(target_ms),
                ..ChannelConfig::default()
            };
            let mut ch = Channel::new(id, ChannelMode::Play, config);
            // 3 s of 250-ms chunks, each a start.
            for seq in 0..12u64 {
                let coded = publisher
                    .publish(seq, seq * 250_000, ChunkFlags::RANDOM_ACCESS, &data)
                    .unwrap();
                ch.publish(&coded);
            }
            let played = ch.poll_playout(Instant::now(), &mut ShardCoder::new());
            played.first().map(|c| c.0)
        };
        // The newest chunk starts at 2.75 s: 1.5 s back is chunk 5 (1.25 s).
        assert_eq!(start(1500), Some(5));
        assert_eq!(start(0), Some(11));
        // More than the 3 s held: the oldest, not the newest.
        assert_eq!(start(5000), Some(0));
    }

    #[test]
    fn a_jump_in_numbering_costs_one_wait_not_one_per_missing_chunk() {
        // A restarted source numbers its chunks from its new start (the wall clock in ms):
        // the player must carry on at the new numbers after one playout delay.
        let key = ChannelKey::from_seed(&[3; 32]);
        let id = key.channel_id();
        let mut publisher = ChunkPublisher::new(key, CodingParams::DEFAULT);
        let config = ChannelConfig::default();
        let delay = config.playout_delay;
        let mut ch = Channel::new(id, ChannelMode::Play, config);
        let mut coder = ShardCoder::new();
        let t0 = Instant::now();
        let data = Bytes::from(vec![7u8; 4000]);
        let ra = ChunkFlags::RANDOM_ACCESS;
        let none = ChunkFlags::empty();
        for (seq, ts, flags) in [
            (100, 0, ra),
            (101, 250_000, none),
            (5_000_000, 3_000_000, ra),
        ] {
            let coded = publisher.publish(seq, ts, flags, &data).unwrap();
            ch.publish(&coded);
            if seq == 101 {
                let played: Vec<u64> = ch
                    .poll_playout(t0, &mut coder)
                    .iter()
                    .map(|c| c.0)
                    .collect();
                assert_eq!(played, [100, 101]);
            }
        }
        assert!(ch.poll_playout(t0, &mut coder).is_empty(), "waits first");
        let later = t0 + delay;
        let played: Vec<u64> = ch
            .poll_playout(later, &mut coder)
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(played, [5_000_000]);
        let skipped = ch.stats().chunks_skipped;
        assert!((1..=40).contains(&skipped), "{skipped}");
        // The application hears of the run given up on, once.
        assert_eq!(ch.take_skipped(), [(102, 4_999_999)]);
        assert!(ch.take_skipped().is_empty());
    }
}
