//! Shards on their way to one subscriber: the QUIC streams that carry them, the queue in front
//! of QUIC, and the backlog bound. Two layouts ([`ShardStreams`]):
//!
//! - per subscription: one uni stream per subscription carries every chunk. A frame carries
//!   the chunk's signed header unless the header is among the last [`STREAM_HEADERS`] sent on
//!   that stream. Shards wait whole in a queue until QUIC takes them, so a subscriber that
//!   falls behind loses its oldest queued chunks without any reset.
//! - per chunk: one uni stream per chunk per subscription, finished once its last wanted shard
//!   is written, reset when the backlog bound drops it.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use quinn_proto::{ConnectionHandle, Dir, SendStream, StreamId, VarInt, WriteError};

use crate::node::channel::{Channel, StoredShard};
use crate::stream::SignedChunkHeader;
use crate::wire::{
    SHARD_FRAME_PREFIX_MAX, STREAM_HEADERS, SUB_OF_STREAM, SubstreamSet, encode_shard_frame_prefix,
    encode_shared_shard_frame,
};

use super::conn::mark;
use super::fanout::encoded_header;
use super::{Engine, ShardStreams};

/// Size of one block that shard frame prefixes are cut from.
const PREFIX_BLOCK: usize = 16 * 1024;

/// A chunk stream we are sending on one connection ([`ShardStreams::PerChunk`]).
#[derive(Debug)]
pub(super) struct OutStream {
    pub(super) id: StreamId,
    pub(super) sent: usize,
    pub(super) want: usize,
    /// Bytes QUIC has not taken yet.
    pub(super) pending: VecDeque<Bytes>,
}

/// A shard's frames for streams that have named their subscription
/// ([`crate::wire::SUB_OF_STREAM`]): the same bytes for every subscriber, so built once per
/// node, with and without the chunk's header as subscribers need them, and handed to QUIC as
/// one shared buffer each.
#[derive(Debug, Default)]
pub(super) struct SharedFrames {
    with_header: OnceLock<Bytes>,
    without_header: OnceLock<Bytes>,
}

impl SharedFrames {
    fn frame(&self, header: Option<&Bytes>, seq: u64, index: u8, shard: &Bytes) -> Bytes {
        let cell = if header.is_some() {
            &self.with_header
        } else {
            &self.without_header
        };
        cell.get_or_init(|| encode_shared_shard_frame(seq, index, header, shard))
            .clone()
    }
}

/// A shard waiting to be framed and written on a subscription's stream.
#[derive(Debug)]
pub(super) struct Queued {
    header: Arc<SignedChunkHeader>,
    index: u8,
    shard: Bytes,
    /// Its frames shared with every subscriber (`None`: this subscriber's bytes differ, as
    /// a test's corrupting node's do).
    frames: Option<Arc<SharedFrames>>,
}

/// The stream one subscription's shards travel on ([`ShardStreams::PerSubscription`]).
#[derive(Debug)]
pub(super) struct SubStream {
    id: StreamId,
    /// What is left of a frame QUIC took only in part: it goes before anything else.
    partial: VecDeque<Bytes>,
    /// Whole shards not yet framed, oldest chunk first as they were stored.
    queue: VecDeque<Queued>,
    /// The chunks whose header the receiver holds for this stream, in the order first sent:
    /// the receiver keeps the same list, since it reads the stream in order.
    known: VecDeque<u64>,
    /// Whether a frame naming the subscription has gone: later frames are the shared ones.
    named: bool,
}

/// What became of handing a stream's queued buffers to QUIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// Everything went, or nothing was queued.
    All,
    /// QUIC took part or none: the rest is back at the front of the queue.
    Blocked,
    /// The stream is stopped or closed: the queue is emptied.
    Failed,
}

/// Hands QUIC as much of `queue` as it takes in one write, puts back at the front what it did
/// not take, and takes every byte that left the queue (written or dropped) off `backlog`.
fn write_queued(
    stream: &mut SendStream<'_>,
    queue: &mut VecDeque<Bytes>,
    backlog: &mut usize,
    taken: &mut u64,
) -> Written {
    if queue.is_empty() {
        return Written::All;
    }
    let mut batch: Vec<Bytes> = queue.drain(..).collect();
    match stream.write_chunks(&mut batch) {
        Ok(written) => {
            *backlog = backlog.saturating_sub(written.bytes);
            *taken += written.bytes as u64;
            for rest in batch.into_iter().rev().filter(|b| !b.is_empty()) {
                queue.push_front(rest);
            }
            if queue.is_empty() {
                Written::All
            } else {
                Written::Blocked
            }
        }
        Err(WriteError::Blocked) => {
            queue.extend(batch);
            Written::Blocked
        }
        Err(_) => {
            let dropped: usize = batch.iter().map(Bytes::len).sum();
            *backlog = backlog.saturating_sub(dropped);
            Written::Failed
        }
    }
}

/// Keeps `seq` in a stream's list of chunk headers the receiver holds, as the receiver does
/// (see [`STREAM_HEADERS`]).
pub(super) fn remember(known: &mut VecDeque<u64>, seq: u64) {
    known.retain(|&s| s != seq);
    known.push_back(seq);
    if known.len() > STREAM_HEADERS {
        known.pop_front();
    }
}

/// Most bytes of whole frames handed to QUIC in one write. A subscriber's share of a chunk
/// goes in one call at any rate a node serves (a 6 KB share at 1000 subscribers, a 62 KB one
/// at 100), and a subscriber far behind does not have its whole backlog framed on every flush
/// only for QUIC to take a window's worth.
const WRITE_BATCH: usize = 64 * 1024;

/// A frame handed to QUIC as part of a batch.
#[derive(Debug)]
struct Framed {
    queued: Queued,
    /// Where the frame starts in the batch's bytes.
    start: usize,
    /// One past its last buffer in the batch.
    pieces_end: usize,
    /// Whether it carries its chunk's header.
    header: bool,
}

/// Buffers reused by every batch of frames handed to QUIC ([`WriteScratch::write_frames`]).
#[derive(Debug, Default)]
pub(super) struct WriteScratch {
    batch: Vec<Bytes>,
    framed: Vec<Framed>,
    known: VecDeque<u64>,
}

impl WriteScratch {
    /// Frames the shards at the head of a subscription's queue (up to [`WRITE_BATCH`]
    /// bytes) and hands them to QUIC in one write: one call, and one pass of QUIC's stream
    /// bookkeeping, for a subscriber's whole share of a chunk instead of one per shard. The
    /// frames QUIC did not begin go back to the queue whole, as if never framed (the header
    /// list is kept as the receiver's will be: only frames that reach it count); the rest of
    /// one it began waits in `partial`. Returns [`Written::All`] when everything framed went.
    #[allow(clippy::too_many_arguments)]
    fn write_frames(
        &mut self,
        stream: &mut SendStream<'_>,
        sub: u32,
        out: &mut SubStream,
        encoded_headers: &mut VecDeque<(Arc<SignedChunkHeader>, Bytes)>,
        prefixes: &mut BytesMut,
        backlog: &mut usize,
        taken: &mut u64,
    ) -> Written {
        let Self {
            batch,
            framed,
            known,
        } = self;
        batch.clear();
        framed.clear();
        known.clear();
        known.extend(out.known.iter().copied());
        let mut len = 0;
        // Whether the stream will have named its subscription by the frame being framed: the
        // first frame of a batch on a new stream names it, and the others follow it.
        let mut named = out.named;
        while len < WRITE_BATCH {
            let Some(next) = out.queue.pop_front() else {
                break;
            };
            let seq = next.header.header.seq;
            let header =
                (!known.contains(&seq)).then(|| encoded_header(encoded_headers, &next.header));
            if header.is_some() {
                remember(known, seq);
            }
            let start = len;
            match &next.frames {
                Some(frames) if named => {
                    let frame = frames.frame(header.as_ref(), seq, next.index, &next.shard);
                    len += frame.len();
                    batch.push(frame);
                }
                _ => {
                    if prefixes.capacity() < SHARD_FRAME_PREFIX_MAX {
                        *prefixes = BytesMut::with_capacity(PREFIX_BLOCK);
                    }
                    // After the stream's first frame, the stream's subscription, as in a
                    // shared frame.
                    encode_shard_frame_prefix(
                        prefixes,
                        if named { SUB_OF_STREAM } else { sub },
                        seq,
                        next.index,
                        header.as_ref().map(Bytes::len),
                        next.shard.len(),
                    );
                    let prefix = prefixes.split().freeze();
                    len += prefix.len() + header.as_ref().map_or(0, Bytes::len) + next.shard.len();
                    batch.push(prefix);
                    batch.extend(header.clone());
                    batch.push(next.shard.clone());
                    named = true;
                }
            }
            framed.push(Framed {
                queued: next,
                start,
                pieces_end: batch.len(),
                header: header.is_some(),
            });
        }
        let (written, state) = match stream.write_chunks(batch) {
            Ok(w) => (
                w.bytes,
                if w.bytes == len {
                    Written::All
                } else {
                    Written::Blocked
                },
            ),
            Err(WriteError::Blocked) => (0, Written::Blocked),
            Err(_) => (0, Written::Failed),
        };
        *taken += written as u64;
        let begun = framed.iter().take_while(|f| f.start < written).count();
        if begun > 0 {
            // The first frame began: the receiver will know the stream's subscription.
            out.named = true;
        }
        let mut pieces_start = 0;
        for (i, f) in framed.drain(..).enumerate() {
            if i < begun {
                // The frame has begun: the receiver will see its header.
                *backlog = backlog.saturating_sub(f.queued.shard.len());
                if f.header {
                    remember(&mut out.known, f.queued.header.header.seq);
                }
                // What QUIC did not take of it waits in `partial`, before anything else.
                for rest in batch[pieces_start..f.pieces_end]
                    .iter_mut()
                    .filter(|b| !b.is_empty())
                {
                    *backlog += rest.len();
                    out.partial.push_back(std::mem::take(rest));
                }
                pieces_start = f.pieces_end;
            } else {
                // Not begun: back to the queue, in order, as it was.
                out.queue.insert(i - begun, f.queued);
            }
        }
        batch.clear();
        state
    }
}

impl Engine {
    /// The largest queue of unsent shard bytes on any one connection.
    pub fn max_connection_backlog(&self) -> usize {
        self.conns.values().map(|c| c.backlog).max().unwrap_or(0)
    }

    /// Queues one shard for one subscription, then bounds the connection's backlog.
    pub(super) fn queue_shard(
        &mut self,
        handle: ConnectionHandle,
        sub: u32,
        substreams: SubstreamSet,
        shard: &StoredShard,
        payload: Bytes,
        frames: Option<&Arc<SharedFrames>>,
    ) {
        match self.config.shard_streams {
            ShardStreams::PerSubscription => {
                self.queue_on_subscription(handle, sub, shard, payload, frames)
            }
            ShardStreams::PerChunk => {
                self.queue_on_chunk_stream(handle, sub, substreams, shard, payload);
            }
        }
    }

    fn queue_on_subscription(
        &mut self,
        handle: ConnectionHandle,
        sub: u32,
        shard: &StoredShard,
        payload: Bytes,
        frames: Option<&Arc<SharedFrames>>,
    ) {
        let max_backlog = self.config.max_backlog_bytes;
        let Some(conn) = self.conns.get_mut(&handle) else {
            return;
        };
        if !conn.sub_streams.contains_key(&sub) {
            let Some(id) = conn.quic.streams().open(Dir::Uni) else {
                self.stats.backlog_drops += 1;
                return;
            };
            conn.sub_streams.insert(
                sub,
                SubStream {
                    id,
                    partial: VecDeque::new(),
                    queue: VecDeque::new(),
                    known: VecDeque::new(),
                    named: false,
                },
            );
        }
        let Some(out) = conn.sub_streams.get_mut(&sub) else {
            return;
        };
        conn.backlog += payload.len();
        out.queue.push_back(Queued {
            header: Arc::clone(&shard.header),
            index: shard.index as u8,
            shard: payload,
            frames: frames.cloned(),
        });
        mark(&mut self.dirty, conn, handle);
        self.stats.shards_out += 1;
        self.stats.shard_bytes_out += shard.shard.len() as u64;
        // Over the backlog bound: the oldest chunk still waiting whole goes, from whichever
        // subscription holds it. Nothing of it has reached QUIC, so nothing is reset.
        while conn.backlog > max_backlog {
            let Some((oldest_sub, oldest)) = conn
                .sub_streams
                .iter()
                .filter_map(|(s, o)| Some((*s, o.queue.front()?.header.header.seq)))
                .min_by_key(|(_, seq)| *seq)
            else {
                break;
            };
            let Some(o) = conn.sub_streams.get_mut(&oldest_sub) else {
                break;
            };
            let before = o.queue.len();
            let mut dropped = 0;
            o.queue.retain(|q| {
                let keep = q.header.header.seq != oldest;
                if !keep {
                    dropped += q.shard.len();
                }
                keep
            });
            debug_assert!(o.queue.len() < before);
            conn.backlog = conn.backlog.saturating_sub(dropped);
            self.stats.backlog_drops += 1;
        }
    }

    fn queue_on_chunk_stream(
        &mut self,
        handle: ConnectionHandle,
        sub: u32,
        substreams: SubstreamSet,
        shard: &StoredShard,
        payload: Bytes,
    ) {
        let max_backlog = self.config.max_backlog_bytes;
        let Some(conn) = self.conns.get_mut(&handle) else {
            return;
        };
        let seq = shard.header.header.seq;
        let key = (sub, seq);
        let first = !conn.out_streams.contains_key(&key);
        if first {
            let Some(id) = conn.quic.streams().open(Dir::Uni) else {
                self.stats.backlog_drops += 1;
                return;
            };
            let want = substreams
                .iter()
                .filter(|&i| i < shard.header.header.params.total())
                .count();
            conn.out_streams.insert(
                key,
                OutStream {
                    id,
                    sent: 0,
                    want,
                    pending: VecDeque::new(),
                },
            );
        }
        let header = first.then(|| encoded_header(&mut self.encoded_headers, &shard.header));
        if self.prefixes.capacity() < SHARD_FRAME_PREFIX_MAX {
            self.prefixes = BytesMut::with_capacity(PREFIX_BLOCK);
        }
        encode_shard_frame_prefix(
            &mut self.prefixes,
            sub,
            seq,
            shard.index as u8,
            header.as_ref().map(Bytes::len),
            payload.len(),
        );
        let prefix = self.prefixes.split().freeze();
        let Some(out) = conn.out_streams.get_mut(&key) else {
            return;
        };
        let added = prefix.len() + header.as_ref().map_or(0, Bytes::len) + payload.len();
        out.pending.push_back(prefix);
        out.pending.extend(header);
        out.pending.push_back(payload);
        out.sent += 1;
        conn.backlog += added;
        mark(&mut self.dirty, conn, handle);
        self.stats.shards_out += 1;
        self.stats.shard_bytes_out += shard.shard.len() as u64;
        // Over the backlog bound: drop this subscriber's oldest chunk streams.
        while conn.backlog > max_backlog {
            let Some(oldest) = conn
                .out_streams
                .iter()
                .filter(|(_, o)| !o.pending.is_empty())
                .map(|(k, _)| *k)
                .min_by_key(|(_, seq)| *seq)
            else {
                break;
            };
            if let Some(o) = conn.out_streams.remove(&oldest) {
                let dropped: usize = o.pending.iter().map(Bytes::len).sum();
                conn.backlog = conn.backlog.saturating_sub(dropped);
                let _ = conn.quic.send_stream(o.id).reset(VarInt::from_u32(0));
                self.stats.backlog_drops += 1;
            }
        }
    }

    /// Hands QUIC whatever it takes of one connection's queued control messages and shards.
    pub(super) fn flush_out_streams(&mut self, handle: ConnectionHandle) {
        let Some(conn) = self.conns.get_mut(&handle) else {
            return;
        };
        conn.flush_control();
        // With nothing queued, the usual case when an ACK comes in, the walk over the
        // subscription streams has nothing to write and only a stream whose subscription
        // ended to finish. Skipping it saves a cold hash-map walk per datagram received: at
        // 1000 subscribers that walk was 1.7% of the worker.
        let ended = std::mem::take(&mut conn.subs_ended);
        if !conn.sub_streams.is_empty() && (conn.backlog > 0 || ended) {
            self.flush_sub_streams(handle);
        }
        self.flush_chunk_streams(handle);
    }

    fn flush_sub_streams(&mut self, handle: ConnectionHandle) {
        let Engine {
            conns,
            encoded_headers,
            prefixes,
            write_scratch,
            ..
        } = self;
        let Some(conn) = conns.get_mut(&handle) else {
            return;
        };
        let mut ended = Vec::new();
        for (&sub, out) in &mut conn.sub_streams {
            let served = conn.served.contains_key(&sub);
            if !served {
                // Unsubscribed: what is still whole is not sent.
                let dropped: usize = out.queue.drain(..).map(|q| q.shard.len()).sum();
                conn.backlog = conn.backlog.saturating_sub(dropped);
            }
            let mut stream = conn.quic.send_stream(out.id);
            // The rest of a frame already begun.
            let mut state = write_queued(
                &mut stream,
                &mut out.partial,
                &mut conn.backlog,
                &mut conn.taken_bytes,
            );
            while state == Written::All && !out.queue.is_empty() {
                state = write_scratch.write_frames(
                    &mut stream,
                    sub,
                    out,
                    encoded_headers,
                    prefixes,
                    &mut conn.backlog,
                    &mut conn.taken_bytes,
                );
            }
            if state == Written::Failed {
                // Stopped by the receiver or closed: a later shard opens a new stream.
                let dropped: usize = out.queue.iter().map(|q| q.shard.len()).sum::<usize>()
                    + out.partial.iter().map(Bytes::len).sum::<usize>();
                conn.backlog = conn.backlog.saturating_sub(dropped);
                ended.push(sub);
            } else if !served && out.partial.is_empty() {
                let _ = stream.finish();
                ended.push(sub);
            }
        }
        for sub in ended {
            conn.sub_streams.remove(&sub);
        }
    }

    fn flush_chunk_streams(&mut self, handle: ConnectionHandle) {
        let Some(conn) = self.conns.get_mut(&handle) else {
            return;
        };
        if conn.out_streams.is_empty() {
            return;
        }
        let mut keys: Vec<(u32, u64)> = conn
            .out_streams
            .iter()
            .filter(|(_, o)| !o.pending.is_empty() || o.sent >= o.want)
            .map(|(k, _)| *k)
            .collect();
        keys.sort_by_key(|(_, seq)| *seq);
        let mut finished = Vec::new();
        for key in keys {
            let Some(out) = conn.out_streams.get_mut(&key) else {
                continue;
            };
            let mut stream = conn.quic.send_stream(out.id);
            let blocked = write_queued(
                &mut stream,
                &mut out.pending,
                &mut conn.backlog,
                &mut conn.taken_bytes,
            ) == Written::Blocked;
            if blocked {
                break;
            }
            if out.sent >= out.want && out.pending.is_empty() {
                let _ = stream.finish();
                finished.push(key);
            }
        }
        for key in finished {
            conn.out_streams.remove(&key);
        }
    }

    /// Finishes one connection's chunk streams whose chunk has left the window
    /// ([`ShardStreams::PerChunk`]).
    pub(super) fn retire_streams_of(&mut self, handle: ConnectionHandle) {
        if let Some(conn) = self.conns.get_mut(&handle) {
            if conn.out_streams.is_empty() {
                return;
            }
            let mut stale = Vec::new();
            for (key, out) in &conn.out_streams {
                let oldest = conn
                    .served
                    .get(&key.0)
                    .and_then(|s| self.channels.get(&s.channel))
                    .and_then(Channel::range)
                    .map(|(oldest, _)| oldest);
                if oldest.is_none_or(|o| key.1 < o) && out.pending.is_empty() {
                    stale.push(*key);
                }
            }
            for key in stale {
                if let Some(out) = conn.out_streams.remove(&key) {
                    let _ = conn.quic.send_stream(out.id).finish();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_list_keeps_the_newest_few_in_first_sent_order() {
        let mut known = VecDeque::new();
        for seq in [5, 6, 5, 7, 8, 9] {
            remember(&mut known, seq);
        }
        // 6 went first: 5 was sent again after it (a receiver's view of a sender that
        // restarted a chunk), so 5 counts as newer.
        assert_eq!(known, [5, 7, 8, 9]);
    }
}
