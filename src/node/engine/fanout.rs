//! Chunks in and out: publishing and importing, verifying received shards, fan-out to every
//! subscriber that wants them, and the upload cap. The streams they leave on are `outbound`'s.

use std::collections::VecDeque;

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use quinn_proto::{ConnectionHandle, StreamId};

use crate::keys::ChannelId;
use crate::node::channel::{Channel, StoredShard};
use crate::node::upstream::Slot;
use crate::stream::{CodedChunk, CodingParams, SignedChunkHeader};
use crate::wire::{Have, Message, ShardFrame, SignedStreamHeader, StreamTitle, SubstreamSet};

use super::conn::mark;
use super::control::channel_info;
use super::outbound::SharedFrames;
use super::{Engine, EngineError};

/// Chunks whose encoded header is kept for fan-out.
const ENCODED_HEADERS: usize = 16;

/// `header`'s encoding, made once and shared by every subscriber's frame.
pub(super) fn encoded_header(
    cache: &mut VecDeque<(Arc<SignedChunkHeader>, Bytes)>,
    header: &Arc<SignedChunkHeader>,
) -> Bytes {
    if let Some((_, bytes)) = cache.iter().rev().find(|(h, _)| Arc::ptr_eq(h, header)) {
        return bytes.clone();
    }
    let mut buf = BytesMut::with_capacity(header.encoded_len());
    header.encode(&mut buf);
    let bytes = buf.freeze();
    if cache.len() == ENCODED_HEADERS {
        cache.pop_front();
    }
    cache.push_back((Arc::clone(header), bytes.clone()));
    bytes
}

impl Engine {
    /// Source: publishes a coded chunk on `channel`.
    pub fn publish(
        &mut self,
        now: Instant,
        channel: ChannelId,
        coded: &CodedChunk,
    ) -> Result<(), EngineError> {
        let ch = self
            .channels
            .get_mut(&channel)
            .ok_or(EngineError::UnknownChannel(channel))?;
        let shards = ch.publish(coded);
        self.fan_out(now, channel, &shards);
        self.export(channel, &shards);
        self.drive(now);
        Ok(())
    }

    /// Multi-worker nodes: stores shards a sibling worker verified and stored (shared buffers,
    /// nothing copied or hashed again) and sends them to this worker's subscribers.
    pub fn import(
        &mut self,
        now: Instant,
        channel: ChannelId,
        shards: &[StoredShard],
    ) -> Result<(), EngineError> {
        let ch = self
            .channels
            .get_mut(&channel)
            .ok_or(EngineError::UnknownChannel(channel))?;
        let fresh = ch.import(shards);
        self.stats.shards_imported += fresh.len() as u64;
        self.fan_out(now, channel, &fresh);
        self.drive(now);
        Ok(())
    }

    /// Multi-worker nodes: the shards stored since the last call (with `export_shards`), for
    /// the sibling workers' [`Engine::import`].
    pub fn take_exports(&mut self) -> Vec<(ChannelId, Vec<StoredShard>)> {
        std::mem::take(&mut self.exports)
    }

    pub(super) fn export(&mut self, channel: ChannelId, shards: &[StoredShard]) {
        if self.config.export_shards && !shards.is_empty() {
            match self.exports.last_mut() {
                Some((last, list)) if *last == channel => list.extend_from_slice(shards),
                _ => self.exports.push((channel, shards.to_vec())),
            }
        }
    }

    /// Sets `channel`'s stream header, if `header` is newer than the one held, and sends it to
    /// every subscriber of the channel. For the source (which signed it) and for a multi-worker
    /// relay passing on a [`NodeEvent::StreamHeader`] from a sibling worker (which checked it).
    /// Returns whether it was newer.
    pub fn set_stream_header(
        &mut self,
        now: Instant,
        channel: ChannelId,
        header: SignedStreamHeader,
    ) -> Result<bool, EngineError> {
        let params = self
            .channels
            .get(&channel)
            .ok_or(EngineError::UnknownChannel(channel))?
            .params();
        let Some(params) = params else {
            // Nobody can be told before the first chunk fixes the parameters; keep it for the
            // subscriptions to come.
            return Ok(self
                .channels
                .get_mut(&channel)
                .is_some_and(|ch| ch.set_stream_header(header)));
        };
        let newer = self.store_stream_header(channel, header, params);
        self.drive(now);
        Ok(newer)
    }

    /// Keeps a newer stream header and tells the channel's subscribers, with `params` when the
    /// channel has none of its own yet.
    pub(super) fn store_stream_header(
        &mut self,
        channel: ChannelId,
        header: SignedStreamHeader,
        params: CodingParams,
    ) -> bool {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return false;
        };
        if !ch.set_stream_header(header) {
            return false;
        }
        let info = channel_info(
            ch,
            ch.params().unwrap_or(params),
            self.config.corrupt_outgoing_shards,
        );
        self.tell_subscribers(channel, &info);
        true
    }

    /// Sends `msg` once on every connection that subscribes to `channel` (standbys too).
    fn tell_subscribers(&mut self, channel: ChannelId, msg: &Message) {
        let mut told = rustc_hash::FxHashSet::default();
        for &(handle, _) in self.subscribers.get(&channel).into_iter().flatten() {
            if told.insert(handle)
                && let Some(conn) = self.conns.get_mut(&handle)
            {
                conn.send_control(msg);
                mark(&mut self.dirty, conn, handle);
            }
        }
    }

    /// Sets its channel's title if `title` is newer than the one held, and sends it to every
    /// subscriber of the channel. For the source (which signed it) and for a multi-worker relay
    /// passing on a [`NodeEvent::StreamTitle`] from a sibling worker (which checked it).
    /// Returns whether it was newer.
    pub fn set_title(&mut self, now: Instant, title: StreamTitle) -> Result<bool, EngineError> {
        if !self.channels.contains_key(&title.channel) {
            return Err(EngineError::UnknownChannel(title.channel));
        }
        let newer = self.store_title(title);
        self.drive(now);
        Ok(newer)
    }

    /// Keeps a newer title and tells the channel's subscribers (standbys too: one that takes
    /// over a parent's substreams must not have missed the title).
    pub(super) fn store_title(&mut self, title: StreamTitle) -> bool {
        let channel = title.channel;
        let Some(ch) = self.channels.get_mut(&channel) else {
            return false;
        };
        if !ch.set_title(title.clone()) {
            return false;
        }
        self.tell_subscribers(channel, &Message::StreamTitle(title));
        true
    }

    /// A shard frame on a connection this node subscribed on: its header checked (or matched
    /// to one held for the stream), the shard checked and stored, its parent's slot credited,
    /// and what is new sent on to subscribers.
    pub(super) fn apply_shard(
        &mut self,
        now: Instant,
        handle: ConnectionHandle,
        stream: StreamId,
        frame: ShardFrame,
    ) {
        let Some(conn) = self.conns.get_mut(&handle) else {
            return;
        };
        let sub = match conn
            .in_streams
            .entry(stream)
            .or_default()
            .subscription(frame.sub)
        {
            Ok(sub) => sub,
            Err(why) => return self.protocol_error(now, handle, why),
        };
        let Some(channel_id) = conn.taken.get(&sub).copied() else {
            // A subscription we did not make (or already dropped): ignore.
            return;
        };
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return;
        };
        let state = conn.in_streams.entry(stream).or_default();
        let header = match frame.header {
            Some(h) => match channel.verify_header(h) {
                Ok(h) => {
                    state.keep(Arc::clone(&h));
                    h
                }
                Err(e) => return self.misbehaved(now, handle, &e),
            },
            None if let Some(h) = state.header(frame.seq) => Arc::clone(h),
            None => {
                return self.protocol_error(now, handle, "shard without its chunk header");
            }
        };
        let seq = header.header.seq;
        match channel.insert_shard(
            &header,
            usize::from(frame.index),
            frame.shard,
            &mut self.coder,
        ) {
            Ok(stored) => {
                if let Some(up) = self.upstreams.get_mut(&channel_id)
                    && let Some(i) = up.slot_of(handle)
                {
                    let (cand, slot) = &mut up.candidates[i];
                    if let Slot::Active {
                        newest,
                        last_shard,
                        tally,
                        ..
                    } = slot
                    {
                        if newest.is_none() && !up.lagged.contains(&cand.node) {
                            // It delivers: its back-off starts over (for one replaced for
                            // lagging, only once it has served well for a while).
                            up.strikes.remove(&cand.node);
                        }
                        *newest = Some(newest.map_or(seq, |n| n.max(seq)));
                        *last_shard = now;
                        tally.count(seq, now);
                    }
                }
                self.fan_out(now, channel_id, &stored);
                self.export(channel_id, &stored);
            }
            Err(e) => self.misbehaved(now, handle, &e),
        }
    }

    /// Sends newly stored shards to every subscriber that wants them.
    pub(super) fn fan_out(&mut self, now: Instant, channel: ChannelId, shards: &[StoredShard]) {
        if shards.is_empty() {
            return;
        }
        if let Some(waiting) = self.awaiting_info.remove(&channel)
            && let Some(ch) = self.channels.get(&channel)
            && let Some(params) = ch.params()
        {
            let info = channel_info(ch, params, self.config.corrupt_outgoing_shards);
            let title = ch.title().cloned().map(Message::StreamTitle);
            for handle in waiting {
                if let Some(conn) = self.conns.get_mut(&handle) {
                    conn.send_control(&info);
                    if let Some(title) = &title {
                        conn.send_control(title);
                    }
                    mark(&mut self.dirty, conn, handle);
                }
            }
        }
        let listed = self.subscribers.remove(&channel).unwrap_or_default();
        // Standbys (subscriptions to nothing) hear of each new chunk once, so a child can
        // tell starved parents from a quiet source.
        let newest = shards.iter().map(|s| s.header.header.seq).max();
        let announce = match (newest, self.announced.get(&channel)) {
            (Some(n), Some(&a)) => n > a,
            (Some(_), None) => true,
            _ => false,
        };
        if announce && let Some(n) = newest {
            self.announced.insert(channel, n);
            let oldest = self
                .channels
                .get(&channel)
                .and_then(Channel::range)
                .map_or(n, |(o, _)| o);
            let have = Message::Have(Have {
                channel,
                oldest,
                latest: n,
            });
            for &(handle, sub) in &listed {
                if let Some(conn) = self.conns.get_mut(&handle)
                    && !conn.closed
                    && conn
                        .served
                        .get(&sub)
                        .is_some_and(|s| s.substreams.is_empty())
                {
                    conn.send_control(&have);
                    mark(&mut self.dirty, conn, handle);
                }
            }
        }
        // Each shard is framed once for every subscriber whose stream has named its
        // subscription (a leaf with no subscribers frames nothing).
        let frames: Vec<Arc<SharedFrames>> = if listed.is_empty() {
            Vec::new()
        } else {
            shards.iter().map(|_| Arc::default()).collect()
        };
        for &(handle, sub) in &listed {
            let substreams = match self.conns.get(&handle) {
                Some(conn) if !conn.closed => match conn.served.get(&sub) {
                    Some(served) => served.substreams,
                    None => continue,
                },
                _ => continue,
            };
            for (shard, frames) in shards.iter().zip(&frames) {
                if substreams.contains(shard.index) {
                    self.send_shard(now, handle, sub, substreams, shard, Some(frames));
                }
            }
        }
        // Sending never subscribes anyone, so putting the list back loses nothing.
        self.subscribers.entry(channel).or_default().extend(listed);
    }

    /// Takes `bytes` from the upload budget; false if the cap does not allow them now.
    pub(super) fn upload_allowed(&mut self, now: Instant, bytes: usize) -> bool {
        let Some(cap) = self.config.upload_cap else {
            return true;
        };
        let cap = cap as f64;
        let elapsed = self
            .upload_refilled
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        // One second of burst.
        self.upload_tokens = (self.upload_tokens + cap * elapsed).min(cap);
        self.upload_refilled = Some(now);
        if self.upload_tokens >= bytes as f64 {
            self.upload_tokens -= bytes as f64;
            true
        } else {
            false
        }
    }

    /// Queues `shard` for one subscription, within the upload cap. `frames`: the shard's
    /// frames shared by every subscriber of this fan-out; `None` frames it for this
    /// subscriber alone (a catch-up, or a corrupting test node's altered bytes).
    pub(super) fn send_shard(
        &mut self,
        now: Instant,
        handle: ConnectionHandle,
        sub: u32,
        substreams: SubstreamSet,
        shard: &StoredShard,
        frames: Option<&Arc<SharedFrames>>,
    ) {
        if !self.upload_allowed(now, shard.shard.len()) {
            self.stats.upload_cap_drops += 1;
            return;
        }
        let (payload, frames) = if self.config.corrupt_outgoing_shards {
            let mut bad = shard.shard.to_vec();
            if let Some(b) = bad.last_mut() {
                *b ^= 0x5a;
            }
            (Bytes::from(bad), None)
        } else {
            (shard.shard.clone(), frames)
        };
        self.queue_shard(handle, sub, substreams, shard, payload, frames);
    }
}
