//! One connection's state and the table that holds them all: the QUIC connection, its control
//! stream, the subscriptions it holds on us and we hold on it, and its chunk streams each way.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use quinn_proto::{Connection, ConnectionHandle, Dir, ReadError, StreamId, VarInt};

use super::outbound::{OutStream, SubStream};
use crate::keys::{ChannelId, NodeId};
use crate::stream::SignedChunkHeader;
use crate::wire::{DecodeError, Hello, Message, ShardFrame, SubstreamSet};

/// The control stream's send priority; shard streams keep quinn-proto's default, 0.
const CONTROL_PRIORITY: i32 = 1;

/// A subscription a neighbour holds on us.
#[derive(Debug, Clone, Copy)]
pub(super) struct Served {
    pub(super) channel: ChannelId,
    pub(super) substreams: SubstreamSet,
}

/// A shard stream we are receiving.
#[derive(Debug, Default)]
pub(super) struct InStream {
    pub(super) buf: BytesMut,
    /// The last [`crate::wire::STREAM_HEADERS`] chunk headers this stream carried, in the
    /// order they first came (the sender keeps the same list).
    pub(super) headers: VecDeque<Arc<SignedChunkHeader>>,
    /// The subscription its first shard frame named.
    pub(super) sub: Option<u32>,
}

impl InStream {
    /// The subscription a shard frame naming `sub` belongs to: the stream's first frame names
    /// it, later ones name it again or say [`crate::wire::SUB_OF_STREAM`]. A first frame that
    /// names none, or a stream that names two, is the sender's protocol error.
    pub(super) fn subscription(&mut self, sub: u32) -> Result<u32, &'static str> {
        match (sub, self.sub) {
            (crate::wire::SUB_OF_STREAM, Some(named)) => Ok(named),
            (crate::wire::SUB_OF_STREAM, None) => Err("shard stream names no subscription"),
            (sub, None) => {
                self.sub = Some(sub);
                Ok(sub)
            }
            (sub, Some(named)) if sub == named => Ok(sub),
            (_, Some(_)) => Err("shard stream names two subscriptions"),
        }
    }

    /// The held header of chunk `seq`.
    pub(super) fn header(&self, seq: u64) -> Option<&Arc<SignedChunkHeader>> {
        self.headers.iter().rev().find(|h| h.header.seq == seq)
    }

    /// Holds a header that came on this stream, as the sender's list does.
    pub(super) fn keep(&mut self, header: Arc<SignedChunkHeader>) {
        let seq = header.header.seq;
        self.headers.retain(|h| h.header.seq != seq);
        self.headers.push_back(header);
        if self.headers.len() > crate::wire::STREAM_HEADERS {
            self.headers.pop_front();
        }
    }
}

#[derive(Debug)]
pub(super) struct Conn {
    pub(super) quic: Connection,
    pub(super) remote: SocketAddr,
    pub(super) node: Option<NodeId>,
    pub(super) control: Option<StreamId>,
    pub(super) control_rx: BytesMut,
    pub(super) control_tx: VecDeque<Bytes>,
    pub(super) hello: Option<Hello>,
    pub(super) served: FxHashMap<u32, Served>,
    pub(super) taken: FxHashMap<u32, ChannelId>,
    pub(super) in_streams: FxHashMap<StreamId, InStream>,
    /// Chunk streams by subscription and chunk ([`super::ShardStreams::PerChunk`]).
    pub(super) out_streams: FxHashMap<(u32, u64), OutStream>,
    /// One stream per subscription ([`super::ShardStreams::PerSubscription`]).
    pub(super) sub_streams: FxHashMap<u32, SubStream>,
    pub(super) backlog: usize,
    /// A subscription ended since the last walk over `sub_streams`: that walk finishes its
    /// stream.
    pub(super) subs_ended: bool,
    /// Shard-stream bytes QUIC has taken from the backlog, ever.
    pub(super) taken_bytes: u64,
    /// When QUIC last took shard bytes, or the backlog was last empty: a subscriber that
    /// takes nothing for [`super::EngineConfig::stall_timeout`] while data waits is closed.
    pub(super) progress_at: Instant,
    pub(super) closed: bool,
    /// Queued in `Engine::dirty`.
    pub(super) dirty: bool,
    /// Queued in `Engine::tx_queue`.
    pub(super) queued_tx: bool,
    /// When a datagram of this connection last arrived (or it was created): a parent that
    /// sends nothing at all, not even the keep-alive's acknowledgements, is unreachable.
    pub(super) last_rx: Instant,
    /// When the parent policy last sent this connection a PING because it stalls while it
    /// has something to send (`Engine::upstream_check`).
    pub(super) probed: Option<Instant>,
    /// When a probed parent last answered with shards, and until when it may catch up before
    /// it can be judged behind.
    pub(super) caught_up: Option<(Instant, Instant)>,
    /// The handshake completed.
    pub(super) established: bool,
    /// Gossip packets waiting for the handshake to complete.
    pub(super) gossip_out: Vec<Bytes>,
    /// The node at the other end, proven in the TLS handshake: the one we dialled, or the
    /// dialler's certificate key on a connection we accepted.
    pub(super) peer: Option<NodeId>,
    /// The last parent query sent on this connection: its id, channel and when.
    pub(super) asked: Option<(u32, ChannelId, Instant)>,
    /// A later attempt of a race to a node known at several addresses (see `race`): nothing
    /// but the handshake runs on it, and no caller looking for a connection to the node
    /// takes it.
    pub(super) spare: bool,
}

/// Control messages (go-away, have, subscribe) go before any shard data waiting on the same
/// connection: with fair queueing off, a stream of equal priority would wait behind every
/// chunk written before it.
pub(super) fn control_first(quic: &mut Connection, id: StreamId) {
    let _ = quic.send_stream(id).set_priority(CONTROL_PRIORITY);
}

/// Queues a connection for driving, once.
pub(super) fn mark(
    dirty: &mut VecDeque<ConnectionHandle>,
    conn: &mut Conn,
    handle: ConnectionHandle,
) {
    if !conn.dirty {
        conn.dirty = true;
        dirty.push_back(handle);
    }
}

impl Conn {
    pub(super) fn new(
        now: Instant,
        quic: Connection,
        remote: SocketAddr,
        node: Option<NodeId>,
    ) -> Self {
        Self {
            quic,
            remote,
            node,
            control: None,
            control_rx: BytesMut::new(),
            control_tx: VecDeque::new(),
            hello: None,
            served: FxHashMap::default(),
            taken: FxHashMap::default(),
            in_streams: FxHashMap::default(),
            out_streams: FxHashMap::default(),
            sub_streams: FxHashMap::default(),
            backlog: 0,
            subs_ended: false,
            taken_bytes: 0,
            progress_at: now,
            closed: false,
            dirty: false,
            queued_tx: false,
            last_rx: now,
            probed: None,
            caught_up: None,
            established: false,
            asked: None,
            peer: node,
            gossip_out: Vec::new(),
            spare: false,
        }
    }

    pub(super) fn send_control(&mut self, msg: &Message) {
        self.control_tx.push_back(msg.to_bytes());
        self.flush_control();
    }

    pub(super) fn flush_control(&mut self) {
        if self.control.is_none() && self.node.is_some() {
            // The dialler opens the control stream; QUIC allows it once the handshake has told
            // us the peer's stream limits, so this is retried until it succeeds.
            self.control = self.quic.streams().open(Dir::Bi);
            if let Some(id) = self.control {
                control_first(&mut self.quic, id);
            }
        }
        let Some(id) = self.control else { return };
        while let Some(front) = self.control_tx.front_mut() {
            match self.quic.send_stream(id).write(front) {
                Ok(n) if n == front.len() => {
                    self.control_tx.pop_front();
                }
                Ok(n) => {
                    let _ = front.split_to(n);
                    break;
                }
                Err(_) => break,
            }
        }
    }

    /// Exchanges the QUIC connection and what belongs to it (its address, its last datagram)
    /// with `other`: how a dial race moves a connection into the entry that holds the node's
    /// state, and the one it displaces into the other's.
    pub(super) fn exchange_quic(&mut self, other: &mut Self) {
        std::mem::swap(&mut self.quic, &mut other.quic);
        std::mem::swap(&mut self.remote, &mut other.remote);
        std::mem::swap(&mut self.last_rx, &mut other.last_rx);
    }

    pub(super) fn close(&mut self, now: Instant, code: u32, reason: &str) {
        if !self.closed {
            self.closed = true;
            self.quic.close(
                now,
                VarInt::from_u32(code),
                Bytes::copy_from_slice(reason.as_bytes()),
            );
        }
    }
}

/// Work found while reading a connection, applied afterwards with the whole engine in hand.
pub(super) enum Input {
    Control(Message),
    /// A QUIC datagram: membership gossip.
    Gossip(Bytes),
    Shard(StreamId, ShardFrame),
    /// The stream ended; its state goes once the frames read before are applied.
    StreamDone(StreamId),
    Undecodable(DecodeError),
}

/// The connections, indexed by quinn-proto's handle (a slab index it reuses after a
/// connection is drained): a lookup per datagram, per send and per timer costs an index,
/// not a hash.
#[derive(Debug, Default)]
pub(super) struct ConnTable {
    pub(super) slots: Vec<Option<Conn>>,
    pub(super) len: usize,
}

impl ConnTable {
    pub(super) fn get(&self, handle: &ConnectionHandle) -> Option<&Conn> {
        self.slots.get(handle.0).and_then(Option::as_ref)
    }

    pub(super) fn get_mut(&mut self, handle: &ConnectionHandle) -> Option<&mut Conn> {
        self.slots.get_mut(handle.0).and_then(Option::as_mut)
    }

    pub(super) fn insert(&mut self, handle: ConnectionHandle, conn: Conn) {
        if self.slots.len() <= handle.0 {
            self.slots.resize_with(handle.0 + 1, || None);
        }
        if self.slots[handle.0].replace(conn).is_none() {
            self.len += 1;
        }
    }

    pub(super) fn remove(&mut self, handle: &ConnectionHandle) -> Option<Conn> {
        let conn = self.slots.get_mut(handle.0).and_then(Option::take);
        if conn.is_some() {
            self.len -= 1;
        }
        conn
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Two different entries at once.
    pub(super) fn pair_mut(
        &mut self,
        a: ConnectionHandle,
        b: ConnectionHandle,
    ) -> Option<(&mut Conn, &mut Conn)> {
        if a == b || a.0 >= self.slots.len() || b.0 >= self.slots.len() {
            return None;
        }
        let (lo, hi) = (a.0.min(b.0), a.0.max(b.0));
        let (head, tail) = self.slots.split_at_mut(hi);
        let (x, y) = (head[lo].as_mut()?, tail[0].as_mut()?);
        Some(if a.0 < b.0 { (x, y) } else { (y, x) })
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Conn> {
        self.slots.iter().flatten()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (ConnectionHandle, &Conn)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((ConnectionHandle(i), c.as_ref()?)))
    }
}

/// Reads what arrived on stream `id` and decodes every complete frame.
pub(super) fn read_stream(
    conn: &mut Conn,
    id: StreamId,
    inputs: &mut Vec<Input>,
    copied: &mut u64,
) {
    let is_control = conn.control == Some(id);
    if !is_control && !conn.in_streams.contains_key(&id) {
        return;
    }
    let Conn {
        quic,
        control_rx,
        in_streams,
        ..
    } = conn;
    let buf = if is_control {
        control_rx
    } else {
        match in_streams.get_mut(&id) {
            Some(s) => &mut s.buf,
            None => return,
        }
    };
    let mut finished = false;
    {
        let mut stream = quic.recv_stream(id);
        let Ok(mut chunks) = stream.read(true) else {
            return;
        };
        loop {
            match chunks.next(usize::MAX) {
                // The one copy of received stream bytes: out of the packet buffer quinn
                // decrypted in place, into this stream's reassembly buffer. Frames decoded
                // from it are shared slices, never copied again.
                Ok(Some(chunk)) => {
                    if !is_control {
                        *copied += chunk.bytes.len() as u64;
                    }
                    buf.extend_from_slice(&chunk.bytes);
                }
                Ok(None) => {
                    finished = true;
                    break;
                }
                Err(ReadError::Blocked) => break,
                Err(ReadError::Reset(_)) => {
                    finished = true;
                    break;
                }
            }
        }
        let _ = chunks.finalize();
    }
    loop {
        match Message::decode_frame(buf) {
            Ok(Some(Message::Shard(frame))) if !is_control => inputs.push(Input::Shard(id, frame)),
            Ok(Some(Message::Shard(_))) => {
                inputs.push(Input::Undecodable(DecodeError::Invalid(
                    "shard on control stream",
                )));
                break;
            }
            Ok(Some(msg)) if is_control => inputs.push(Input::Control(msg)),
            Ok(Some(_)) => {
                inputs.push(Input::Undecodable(DecodeError::Invalid(
                    "control message on a shard stream",
                )));
                break;
            }
            Ok(None) => break,
            Err(e) => {
                inputs.push(Input::Undecodable(e));
                break;
            }
        }
    }
    if finished && !is_control {
        inputs.push(Input::StreamDone(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::SUB_OF_STREAM;

    #[test]
    fn a_shard_stream_names_its_subscription_once_and_only_one() {
        let mut stream = InStream::default();
        assert!(
            stream.subscription(SUB_OF_STREAM).is_err(),
            "named by nothing yet"
        );
        assert_eq!(stream.subscription(7), Ok(7));
        assert_eq!(stream.subscription(SUB_OF_STREAM), Ok(7));
        assert_eq!(stream.subscription(7), Ok(7));
        assert!(stream.subscription(8).is_err(), "a second subscription");
        assert_eq!(
            stream.subscription(SUB_OF_STREAM),
            Ok(7),
            "the first still holds"
        );
    }
}
