//! The sans-IO node engine: one quinn-proto endpoint, its connections, and the gridcast protocol
//! over them. Sources, supernodes and peers are the same engine with different channel modes.
//!
//! # Driving the engine
//!
//! The engine reads no clock, opens no socket and spawns nothing. A driver (the simulator, the
//! io_uring or portable backends) must, in each loop turn, with `now` read once:
//!
//! 1. feed every received datagram to [`Engine::handle_datagram`];
//! 2. call [`Engine::handle_timeout`] if the instant from [`Engine::poll_timeout`] has passed;
//! 3. issue commands ([`Engine::publish`], [`Engine::subscribe`], …);
//! 4. send everything [`Engine::poll_transmit`] returns until it returns `None`
//!    (`segment_size` set means the buffer holds several datagrams of that size: GSO);
//! 5. drain [`Engine::poll_event`];
//! 6. sleep until the next datagram or [`Engine::poll_timeout`].
//!
//! # Protocol
//!
//! The dialling side opens one bidirectional control stream; both sides send
//! [`Hello`](crate::wire::Hello) first. A subscriber sends
//! [`Subscribe`](crate::wire::Subscribe); the parent answers with
//! [`ChannelInfo`](crate::wire::ChannelInfo) and then sends, per chunk, one unidirectional
//! stream carrying the signed header with the first shard and the other requested shards of that
//! chunk after it. Every shard is verified before it is stored, served or played; a neighbour
//! that sends a bad header or shard is disconnected and its node id is refused from then on.
//!
//! A subscriber whose connection cannot take more data loses its oldest chunk streams (reset,
//! counted in [`EngineStats::backlog_drops`]); nothing queues without bound.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use rustc_hash::FxHashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    AckFrequencyConfig, ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir,
    EcnCodepoint, Endpoint, EndpointConfig, Event, IdleTimeout, ReadError, ServerConfig,
    StreamEvent, StreamId, Transmit, TransportConfig, VarInt, WriteError,
};

use super::channel::{Channel, ChannelConfig, ChannelMode, Rejected, StoredShard};
use super::cid::{WorkerCids, WorkerTag};
use super::tls::{self, SERVER_NAME, TlsError};
use super::upstream::{
    Candidate, HEALTHY_RATIO, SHORT_RATIO, Slot, Tally, Upstream, UpstreamConfig, assign,
};
use crate::keys::{ChannelId, NodeId, NodeKey};
use crate::stream::{ChunkFlags, CodedChunk, CodingParams, Payload, ShardCoder, SignedChunkHeader};
use crate::wire::{
    ChannelInfo, DecodeError, GoAway, GoAwayReason, Hello, MAX_PARENTS, Message, PROTOCOL_VERSION,
    ParentCandidate, Role, SHARD_FRAME_PREFIX_MAX, ShardFrame, SignedStreamHeader, StartAt,
    Subscribe, SubstreamSet, encode_shard_frame_prefix,
};

/// QUIC application close codes.
pub mod close_code {
    /// Normal close.
    pub const DONE: u32 = 0;
    /// The peer sent bytes that do not decode.
    pub const PROTOCOL: u32 = 1;
    /// The peer sent a forged or corrupted header or shard.
    pub const BAD_DATA: u32 = 2;
    /// The peer speaks another protocol version.
    pub const VERSION: u32 = 3;
}

/// The control stream's send priority; shard streams keep quinn-proto's default, 0.
const CONTROL_PRIORITY: i32 = 1;

/// Most bytes in one GSO batch: a UDP datagram's 16-bit length, less the IPv6 and UDP
/// headers.
const MAX_GSO_BYTES: usize = 65_535 - 40 - 8;

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Role announced in Hello.
    pub role: Role,
    /// Window and playout settings for every channel.
    pub channel: ChannelConfig,
    /// Accept incoming connections (sources and supernodes; peers that upload).
    pub serve: bool,
    /// Most datagrams per GSO batch returned by [`Engine::poll_transmit`].
    pub max_gso_segments: usize,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// QUIC keep-alive interval (keeps NAT bindings and detects dead neighbours early).
    pub keep_alive: Duration,
    /// Most unsent bytes queued on one connection before its oldest chunk streams are dropped.
    pub max_backlog_bytes: usize,
    /// QUIC receive window per stream (one chunk's shards for one subscriber).
    pub stream_window: u32,
    /// QUIC receive window per connection: what a neighbour that stops reading can pin here.
    pub connection_window: u32,
    /// QUIC send buffer per connection: what a subscriber that stops reading can pin at us.
    pub send_window: u64,
    /// Seed for quinn's connection-id and packet-number randomness (simulations).
    pub rng_seed: Option<[u8; 32]>,
    /// Agent string for Hello.
    pub agent: String,
    /// Most shard bytes per second sent to subscribers (`None`: no cap). A peer relaying to
    /// other peers sets its owner's cap here; a node that must upload nothing sets
    /// `serve: false` instead and accepts no subscribers at all.
    pub upload_cap: Option<u64>,
    /// Most connections at once; more are refused at the handshake (`None`: no limit).
    pub max_connections: Option<usize>,
    /// Most subscriptions served at once; more are answered with a go-away naming the
    /// alternatives (`None`: no limit).
    pub max_subscribers: Option<usize>,
    /// Parent selection and failover for channels given candidates with
    /// [`Engine::set_upstream`].
    pub upstream: UpstreamConfig,
    /// Fault injection for the simulator: flip a byte in every shard and stream header this
    /// node sends, to prove that its neighbours catch it. Never set outside tests.
    pub corrupt_outgoing_shards: bool,
    /// Set when this engine is one of several workers sharing a UDP port: the connection ids
    /// it issues then steer packets back to it (see [`crate::node::cid`]).
    pub worker: Option<WorkerTag>,
    /// Keep every newly stored shard for [`Engine::take_exports`], so a driver can hand it to
    /// sibling workers (multi-worker supernodes).
    pub export_shards: bool,
    /// Path MTU discovery (quinn-proto's DPLPMTUD, from 1200 up to 1452 bytes). Only valid
    /// where the socket sets the don't-fragment bit, as both drivers do; without it every
    /// stream byte goes in 1200-byte packets, about a quarter more packets per byte.
    pub mtu_discovery: bool,
    /// How many ack-eliciting packets a child may receive before it must acknowledge (the
    /// QUIC ACK-frequency extension; the child acknowledges anyway after its `max_ack_delay`,
    /// 25 ms). 0 leaves QUIC's default of an ACK for every second packet.
    pub ack_eliciting_threshold: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            role: Role::Peer,
            channel: ChannelConfig::default(),
            serve: false,
            max_gso_segments: 64,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(1),
            max_backlog_bytes: 4 * 1024 * 1024,
            stream_window: 2 * 1024 * 1024,
            connection_window: 8 * 1024 * 1024,
            send_window: 8 * 1024 * 1024,
            rng_seed: None,
            agent: concat!("gridcast/", env!("CARGO_PKG_VERSION")).to_owned(),
            corrupt_outgoing_shards: false,
            upstream: UpstreamConfig::default(),
            upload_cap: None,
            max_connections: None,
            max_subscribers: None,
            worker: None,
            export_shards: false,
            mtu_discovery: true,
            ack_eliciting_threshold: 9,
        }
    }
}

/// Why an engine command failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// quinn refused to start a connection.
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, String),
    /// The channel is not carried by this node.
    #[error("channel {0} is not carried by this node")]
    UnknownChannel(ChannelId),
    /// The node refuses this neighbour (it sent bad data before).
    #[error("node {0} sent bad data before and is refused")]
    Refused(NodeId),
}

/// Something the driver or the application should know.
#[derive(Debug, Clone)]
pub enum NodeEvent {
    /// A player channel's next chunk, complete and in order.
    Chunk {
        /// Channel.
        channel: ChannelId,
        /// Sequence number.
        seq: u64,
        /// The chunk's flags (random access, stream header, end of stream).
        flags: ChunkFlags,
        /// The chunk's bytes.
        payload: Payload,
    },
    /// A channel's stream header (Ogg, fragmented MP4) arrived or changed, signature checked.
    /// A player writes it before the first chunk it plays; a multi-worker relay hands it to its
    /// other workers with [`Engine::set_stream_header`].
    StreamHeader {
        /// Channel.
        channel: ChannelId,
        /// The header.
        header: SignedStreamHeader,
    },
    /// A connection completed its handshake.
    Connected {
        /// Connection.
        conn: ConnectionHandle,
        /// Remote address.
        remote: SocketAddr,
    },
    /// A connection ended.
    ConnectionLost {
        /// Connection.
        conn: ConnectionHandle,
        /// Remote address.
        remote: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A parent was lost or lagged, and its substreams moved.
    Failover {
        /// Channel.
        channel: ChannelId,
        /// The parent given up on.
        lost: SocketAddr,
        /// The parent that took over its substreams, if one was ready.
        replacement: Option<SocketAddr>,
        /// The chunk the replacement resumes at.
        resume: u64,
    },
    /// A neighbour sent bad data and was disconnected.
    Misbehaved {
        /// Remote address.
        remote: SocketAddr,
        /// Its node id, if we dialled it.
        node: Option<NodeId>,
        /// What it did.
        reason: String,
    },
}

/// The channel information a parent sends its subscribers (`corrupt`: fault injection, see
/// [`EngineConfig::corrupt_outgoing_shards`]).
fn channel_info(ch: &Channel, params: CodingParams, corrupt: bool) -> Message {
    let mut stream_header = ch.stream_header().cloned();
    if corrupt && let Some(header) = &mut stream_header {
        let mut bad = header.data.to_vec();
        if let Some(b) = bad.first_mut() {
            *b ^= 0x5a;
        }
        header.data = bad.into();
    }
    Message::ChannelInfo(ChannelInfo {
        channel: ch.id(),
        params,
        chunk_ms: ch.chunk_ms_estimate(),
        latest: ch.range().map(|(_, newest)| newest),
        stream_header,
    })
}

/// A go-away naming the alternatives for `channels` (each node once, at most the message's
/// limit).
fn go_away(
    reason: GoAwayReason,
    alternatives: &HashMap<ChannelId, Vec<Candidate>>,
    channels: impl IntoIterator<Item = ChannelId>,
) -> Message {
    let mut list: Vec<ParentCandidate> = Vec::new();
    for channel in channels {
        for c in alternatives.get(&channel).into_iter().flatten() {
            if list.len() < MAX_PARENTS && !list.iter().any(|p| p.node == c.node) {
                list.push(ParentCandidate {
                    node: c.node,
                    addrs: vec![c.addr],
                    load_permille: 0,
                });
            }
        }
    }
    Message::GoAway(GoAway {
        reason,
        alternatives: list,
    })
}

/// Counters for the whole node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Shards handed to QUIC for subscribers.
    pub shards_out: u64,
    /// Shard bytes handed to QUIC for subscribers.
    pub shard_bytes_out: u64,
    /// Chunk streams reset because a subscriber could not keep up.
    pub backlog_drops: u64,
    /// Connections closed for bad data.
    pub misbehaving_closed: u64,
    /// Connections closed for undecodable bytes.
    pub protocol_errors: u64,
    /// Incoming connections accepted.
    pub accepted: u64,
    /// UDP payload bytes received.
    pub udp_bytes_in: u64,
    /// Parents replaced after loss or lag.
    pub failovers: u64,
    /// Shards not sent to a subscriber because the upload cap was spent.
    pub upload_cap_drops: u64,
    /// Chunk-stream bytes copied out of received packets while reassembling shards. Each
    /// received stream byte is copied exactly once, here; fan-out, cross-worker hand-off and
    /// storage share that copy.
    pub stream_bytes_copied: u64,
    /// Shards taken from sibling workers with [`Engine::import`].
    pub shards_imported: u64,
    /// Incoming connections refused (connection limit, draining).
    pub connections_refused: u64,
    /// Subscriptions turned away with a go-away (subscriber limit, draining).
    pub subscriptions_turned_away: u64,
    /// Go-aways sent to subscribers by [`Engine::drain`].
    pub go_aways_sent: u64,
    /// Go-aways received from parents.
    pub go_aways_received: u64,
}

/// A subscription a neighbour holds on us.
#[derive(Debug, Clone, Copy)]
struct Served {
    channel: ChannelId,
    substreams: SubstreamSet,
}

/// A chunk stream we are sending on one connection.
#[derive(Debug)]
struct OutStream {
    id: StreamId,
    sent: usize,
    want: usize,
    /// Bytes QUIC has not taken yet.
    pending: VecDeque<Bytes>,
}

/// A chunk stream we are receiving.
#[derive(Debug, Default)]
struct InStream {
    buf: BytesMut,
    header: Option<Arc<SignedChunkHeader>>,
}

#[derive(Debug)]
struct Conn {
    quic: Connection,
    remote: SocketAddr,
    node: Option<NodeId>,
    control: Option<StreamId>,
    control_rx: BytesMut,
    control_tx: VecDeque<Bytes>,
    hello: Option<Hello>,
    served: FxHashMap<u32, Served>,
    taken: FxHashMap<u32, ChannelId>,
    in_streams: FxHashMap<StreamId, InStream>,
    out_streams: FxHashMap<(u32, u64), OutStream>,
    backlog: usize,
    closed: bool,
    /// Queued in `Engine::dirty`.
    dirty: bool,
    /// Queued in `Engine::tx_queue`.
    queued_tx: bool,
    /// The deadline this connection holds in `Engine::timers`.
    timer: Option<Instant>,
}

/// `header`'s encoding, made once and shared by every subscriber's frame.
fn encoded_header(
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

/// Control messages (go-away, have, subscribe) go before any shard data waiting on the same
/// connection: with fair queueing off, a stream of equal priority would wait behind every
/// chunk written before it.
fn control_first(quic: &mut Connection, id: StreamId) {
    let _ = quic.send_stream(id).set_priority(CONTROL_PRIORITY);
}

/// Queues a connection for driving, once.
fn mark(dirty: &mut VecDeque<ConnectionHandle>, conn: &mut Conn, handle: ConnectionHandle) {
    if !conn.dirty {
        conn.dirty = true;
        dirty.push_back(handle);
    }
}

impl Conn {
    fn new(quic: Connection, remote: SocketAddr, node: Option<NodeId>) -> Self {
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
            backlog: 0,
            closed: false,
            dirty: false,
            queued_tx: false,
            timer: None,
        }
    }

    fn send_control(&mut self, msg: &Message) {
        self.control_tx.push_back(msg.to_bytes());
        self.flush_control();
    }

    fn flush_control(&mut self) {
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

    fn close(&mut self, now: Instant, code: u32, reason: &str) {
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
enum Input {
    Control(Message),
    Shard(StreamId, ShardFrame),
    /// The stream ended; its state goes once the frames read before are applied.
    StreamDone(StreamId),
    Undecodable(DecodeError),
}

/// The connections, indexed by quinn-proto's handle (a slab index it reuses after a
/// connection is drained): a lookup per datagram, per send and per timer costs an index,
/// not a hash.
#[derive(Debug, Default)]
struct ConnTable {
    slots: Vec<Option<Conn>>,
    len: usize,
}

impl ConnTable {
    fn get(&self, handle: &ConnectionHandle) -> Option<&Conn> {
        self.slots.get(handle.0).and_then(Option::as_ref)
    }

    fn get_mut(&mut self, handle: &ConnectionHandle) -> Option<&mut Conn> {
        self.slots.get_mut(handle.0).and_then(Option::as_mut)
    }

    fn insert(&mut self, handle: ConnectionHandle, conn: Conn) {
        if self.slots.len() <= handle.0 {
            self.slots.resize_with(handle.0 + 1, || None);
        }
        if self.slots[handle.0].replace(conn).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, handle: &ConnectionHandle) -> Option<Conn> {
        let conn = self.slots.get_mut(handle.0).and_then(Option::take);
        if conn.is_some() {
            self.len -= 1;
        }
        conn
    }

    fn len(&self) -> usize {
        self.len
    }

    fn values(&self) -> impl Iterator<Item = &Conn> {
        self.slots.iter().flatten()
    }

    fn iter(&self) -> impl Iterator<Item = (ConnectionHandle, &Conn)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((ConnectionHandle(i), c.as_ref()?)))
    }
}

/// The engine. See the module documentation for the call order.
pub struct Engine {
    config: EngineConfig,
    node: NodeId,
    endpoint: Endpoint,
    transport: Arc<TransportConfig>,
    conns: ConnTable,
    /// Every connection, in creation order (fan-out and policy walk it).
    order: Vec<ConnectionHandle>,
    /// Connections with work to do: only these are driven, so a datagram costs O(1)
    /// connections, not O(all).
    dirty: VecDeque<ConnectionHandle>,
    /// Connections that may have datagrams to send.
    tx_queue: VecDeque<ConnectionHandle>,
    /// Every connection's next QUIC deadline.
    timers: BTreeSet<(Instant, ConnectionHandle)>,
    /// Per channel, the (connection, subscription) pairs that receive its shards: fan-out
    /// touches only these, never every connection.
    subscribers: HashMap<ChannelId, Vec<(ConnectionHandle, u32)>>,
    channels: HashMap<ChannelId, Channel>,
    coder: ShardCoder,
    events: VecDeque<NodeEvent>,
    responses: VecDeque<(Transmit, Vec<u8>)>,
    next_sub: u32,
    refused: HashSet<NodeId>,
    upstreams: HashMap<ChannelId, Upstream>,
    lost_conns: Vec<ConnectionHandle>,
    /// Set by [`Engine::drain`]: subscribers are sent away and no new ones are taken.
    draining: bool,
    /// Per channel, other nodes that carry it, named in go-aways.
    alternatives: HashMap<ChannelId, Vec<Candidate>>,
    reading: bool,
    upload_tokens: f64,
    upload_refilled: Option<Instant>,
    /// Newly stored shards for sibling workers (`export_shards`).
    exports: Vec<(ChannelId, Vec<StoredShard>)>,
    /// Signed chunk headers encoded once for every subscriber (the newest few chunks).
    encoded_headers: VecDeque<(Arc<SignedChunkHeader>, Bytes)>,
    /// Shard frame prefixes are cut from this block: one allocation per many frames.
    prefixes: BytesMut,
    stats: EngineStats,
}

/// Chunks whose encoded header is kept for fan-out.
const ENCODED_HEADERS: usize = 16;
/// Size of one block that shard frame prefixes are cut from.
const PREFIX_BLOCK: usize = 16 * 1024;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("node", &self.node)
            .field("connections", &self.conns.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine for the node holding `key`.
    pub fn new(key: &NodeKey, config: EngineConfig) -> Result<Self, EngineError> {
        let base = || {
            let mut transport = TransportConfig::default();
            transport
                .max_concurrent_uni_streams(VarInt::from_u32(4096))
                .max_concurrent_bidi_streams(VarInt::from_u32(4))
                .keep_alive_interval(Some(config.keep_alive))
                .max_idle_timeout(Some(
                    IdleTimeout::try_from(config.idle_timeout)
                        .unwrap_or_else(|_| IdleTimeout::from(VarInt::from_u32(10_000))),
                ))
                .stream_receive_window(VarInt::from_u32(config.stream_window))
                .receive_window(VarInt::from_u32(config.connection_window))
                .send_window(config.send_window)
                // Streams go out in the order they were written (oldest chunk first, which is
                // also the one due first), each filling whole packets, instead of round-robin
                // slices of every open stream in each packet.
                .send_fairness(false);
            transport
        };
        let transport = Arc::new(base());
        // Connections this node accepts come from children: shards flow only towards them, on
        // streams this node opens. Allowing them no streams of their own saves the per-stream
        // state quinn-proto sets up front for every stream a peer may open (with 4096 of them,
        // the fan-out benchmark's process was 170 MB larger at 1000 children), and asking them
        // to acknowledge less often (the QUIC ACK-frequency extension) saves the serving node
        // most of the ACKs it would process.
        let mut serving = base();
        serving.max_concurrent_uni_streams(VarInt::from_u32(0));
        if config.ack_eliciting_threshold > 0 {
            let mut ack = AckFrequencyConfig::default();
            ack.ack_eliciting_threshold(VarInt::from_u32(config.ack_eliciting_threshold));
            serving.ack_frequency_config(Some(ack));
        }
        let server = if config.serve {
            let mut server = ServerConfig::with_crypto(tls::server_crypto(key)?);
            server.transport_config(Arc::new(serving));
            Some(Arc::new(server))
        } else {
            None
        };
        let mut endpoint_config = EndpointConfig::default();
        if let Some(tag) = config.worker {
            endpoint_config.cid_generator(move || Box::new(WorkerCids::new(tag)));
        }
        let endpoint = Endpoint::new(
            Arc::new(endpoint_config),
            server,
            config.mtu_discovery,
            config.rng_seed,
        );
        let upload_tokens = config_upload_burst(&config);
        Ok(Self {
            node: key.node_id(),
            config,
            endpoint,
            transport,
            conns: ConnTable::default(),
            order: Vec::new(),
            dirty: VecDeque::new(),
            tx_queue: VecDeque::new(),
            timers: BTreeSet::new(),
            subscribers: HashMap::new(),
            channels: HashMap::new(),
            coder: ShardCoder::new(),
            events: VecDeque::new(),
            responses: VecDeque::new(),
            next_sub: 1,
            refused: HashSet::new(),
            upstreams: HashMap::new(),
            lost_conns: Vec::new(),
            draining: false,
            alternatives: HashMap::new(),
            reading: true,
            upload_tokens,
            upload_refilled: None,
            exports: Vec::new(),
            encoded_headers: VecDeque::new(),
            prefixes: BytesMut::new(),
            stats: EngineStats::default(),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// Node-wide counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// A carried channel's state.
    pub fn channel(&self, id: &ChannelId) -> Option<&Channel> {
        self.channels.get(id)
    }

    /// quinn-proto's counters of every open connection (frames and datagrams each way).
    pub fn quic_stats(&self) -> impl Iterator<Item = quinn_proto::ConnectionStats> + '_ {
        self.conns.values().map(|c| c.quic.stats())
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Stops (or resumes) consuming shard streams, as a paused or stuck player does. QUIC flow
    /// control then pushes back on the parents, whose bounded backlogs drop the oldest chunks.
    pub fn set_reading(&mut self, now: Instant, reading: bool) {
        self.reading = reading;
        if reading {
            let mut inputs = Vec::new();
            let handles: Vec<ConnectionHandle> = self.order.clone();
            for handle in handles {
                if let Some(conn) = self.conns.get_mut(&handle) {
                    let ids: Vec<StreamId> = conn.in_streams.keys().copied().collect();
                    for id in ids {
                        read_stream(conn, id, &mut inputs, &mut self.stats.stream_bytes_copied);
                    }
                    for input in inputs.drain(..) {
                        self.apply(now, handle, input);
                    }
                }
                self.touch(handle);
            }
        }
        self.drive(now);
    }

    /// Queues a connection for driving.
    fn touch(&mut self, handle: ConnectionHandle) {
        if let Some(conn) = self.conns.get_mut(&handle) {
            mark(&mut self.dirty, conn, handle);
        }
    }

    /// The largest queue of unsent shard bytes on any one connection.
    pub fn max_connection_backlog(&self) -> usize {
        self.conns.values().map(|c| c.backlog).max().unwrap_or(0)
    }

    /// Starts carrying a channel in `mode`.
    pub fn add_channel(&mut self, id: ChannelId, mode: ChannelMode) {
        let config = self.config.channel.clone();
        let serve = self.config.serve;
        self.channels
            .entry(id)
            .or_insert_with(|| Channel::new(id, mode, config))
            .set_regenerate(serve);
    }

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

    fn export(&mut self, channel: ChannelId, shards: &[StoredShard]) {
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
    fn store_stream_header(
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
        let mut told = Vec::new();
        for &(handle, _) in self.subscribers.get(&channel).into_iter().flatten() {
            if !told.contains(&handle) {
                told.push(handle);
                if let Some(conn) = self.conns.get_mut(&handle) {
                    conn.send_control(&info);
                }
            }
        }
        true
    }

    /// Other nodes that carry `channel`, named as alternatives in go-aways.
    pub fn set_alternatives(&mut self, channel: ChannelId, nodes: Vec<Candidate>) {
        self.alternatives.insert(channel, nodes);
    }

    /// Starts a graceful drain: every subscriber gets a go-away naming the alternatives, new
    /// connections and subscriptions are refused, and serving goes on until the subscribers
    /// have moved (watch [`Engine::served_subscriptions`]).
    pub fn drain(&mut self, now: Instant) {
        self.draining = true;
        let mut per_conn: HashMap<ConnectionHandle, Vec<ChannelId>> = HashMap::new();
        for (channel, listed) in &self.subscribers {
            for &(handle, _) in listed {
                let channels = per_conn.entry(handle).or_default();
                if !channels.contains(channel) {
                    channels.push(*channel);
                }
            }
        }
        for (handle, channels) in per_conn {
            let go = go_away(GoAwayReason::Shutdown, &self.alternatives, channels);
            if let Some(conn) = self.conns.get_mut(&handle) {
                conn.send_control(&go);
                self.stats.go_aways_sent += 1;
            }
        }
        self.drive(now);
    }

    /// Subscriptions served now (a draining node is done when this reaches 0).
    pub fn served_subscriptions(&self) -> usize {
        self.subscribers.values().map(Vec::len).sum()
    }

    /// The settings this engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Caps GSO batches (1 turns GSO off; a driver whose kernel refuses GSO does that).
    pub fn set_max_gso_segments(&mut self, segments: usize) {
        self.config.max_gso_segments = segments.max(1);
    }

    /// Subscribes to `substreams` of `channel` at the node `parent_id` reachable at `parent`,
    /// reusing an open connection to it. Returns the connection.
    pub fn subscribe(
        &mut self,
        now: Instant,
        parent: SocketAddr,
        parent_id: NodeId,
        channel: ChannelId,
        substreams: SubstreamSet,
        start: StartAt,
    ) -> Result<ConnectionHandle, EngineError> {
        let (handle, _) =
            self.subscribe_inner(now, parent, parent_id, channel, substreams, start, None)?;
        self.drive(now);
        Ok(handle)
    }

    /// Subscribes (or, with `sub`, changes an existing subscription). Does not drive.
    #[allow(clippy::too_many_arguments)]
    fn subscribe_inner(
        &mut self,
        now: Instant,
        parent: SocketAddr,
        parent_id: NodeId,
        channel: ChannelId,
        substreams: SubstreamSet,
        start: StartAt,
        sub: Option<u32>,
    ) -> Result<(ConnectionHandle, u32), EngineError> {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return Err(EngineError::UnknownChannel(channel));
        };
        ch.mark_joined(now);
        if self.refused.contains(&parent_id) {
            return Err(EngineError::Refused(parent_id));
        }
        let existing = self
            .conns
            .iter()
            .find(|(_, c)| !c.closed && c.node == Some(parent_id) && c.remote == parent)
            .map(|(h, _)| h);
        let handle = match existing {
            Some(h) => h,
            None => self.connect(now, parent, parent_id)?,
        };
        let sub = sub.unwrap_or_else(|| {
            self.next_sub += 1;
            self.next_sub - 1
        });
        if let Some(conn) = self.conns.get_mut(&handle) {
            conn.taken.insert(sub, channel);
            conn.send_control(&Message::Subscribe(Subscribe {
                sub,
                channel,
                substreams,
                start,
            }));
            mark(&mut self.dirty, conn, handle);
        }
        Ok((handle, sub))
    }

    /// Lets the engine choose parents for `channel` among `candidates` and keep them: draws
    /// substreams so that losing any [`UpstreamConfig::tolerate`] parents still leaves K, keeps
    /// warm standbys, and replaces a lost or lagging parent without waiting for a QUIC timeout.
    pub fn set_upstream(
        &mut self,
        now: Instant,
        channel: ChannelId,
        candidates: Vec<Candidate>,
    ) -> Result<(), EngineError> {
        if !self.channels.contains_key(&channel) {
            return Err(EngineError::UnknownChannel(channel));
        }
        let rotation = usize::from(self.node.as_bytes()[0]);
        let candidates = candidates
            .into_iter()
            .filter(|c| c.node != self.node)
            .collect();
        self.upstreams.insert(
            channel,
            Upstream::new(self.config.upstream.clone(), candidates, rotation),
        );
        self.upstream_fill(now, channel);
        self.drive(now);
        Ok(())
    }

    /// Substreams drawn for `channel` by the upstream policy, and from how many parents.
    pub fn upstream_status(&self, channel: &ChannelId) -> Option<(usize, usize)> {
        self.upstreams
            .get(channel)
            .map(|u| (u.substreams_held(), u.active()))
    }

    /// Connects standbys and hands unassigned substream sets to them.
    fn upstream_fill(&mut self, now: Instant, channel: ChannelId) {
        let Some(mut up) = self.upstreams.remove(&channel) else {
            return;
        };
        // Failed candidates become eligible again after their back-off.
        for (_, slot) in &mut up.candidates {
            if let Slot::Failed { until } = slot
                && *until <= now
            {
                *slot = Slot::Idle;
            }
        }
        // Keep parents + standby connections.
        let want = up.config.parents + up.config.standby;
        let mut connected = up
            .candidates
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Active { .. } | Slot::Standby { .. }))
            .count();
        for i in 0..up.candidates.len() {
            if connected >= want {
                break;
            }
            let (cand, slot) = up.candidates[i].clone();
            if slot != Slot::Idle || self.refused.contains(&cand.node) {
                continue;
            }
            // Probe: an empty subscription makes the parent answer with ChannelInfo.
            match self.subscribe_inner(
                now,
                cand.addr,
                cand.node,
                channel,
                SubstreamSet::EMPTY,
                StartAt::Live,
                None,
            ) {
                Ok((conn, sub)) => {
                    up.candidates[i].1 = Slot::Standby { conn, sub };
                    connected += 1;
                }
                Err(_) => {
                    up.candidates[i].1 = Slot::Failed {
                        until: now + up.config.retry_after,
                    }
                }
            }
        }
        // First assignment once K and N are known.
        if let Some(params) = up.params
            && up.active() == 0
            && up.unassigned.is_empty()
        {
            let parents = up.config.parents.min(connected).max(1);
            let start = up.first_start;
            up.unassigned = assign(params, parents, up.config.tolerate, up.rotation)
                .into_iter()
                .map(|set| (set, start))
                .collect();
        }
        // Hand sets to standbys.
        while let Some(&(set, start)) = up.unassigned.first() {
            let Some(i) = up
                .candidates
                .iter()
                .position(|(_, s)| matches!(s, Slot::Standby { .. }))
            else {
                break;
            };
            let (cand, slot) = up.candidates[i].clone();
            let Slot::Standby { conn, sub } = slot else {
                break;
            };
            match self.subscribe_inner(now, cand.addr, cand.node, channel, set, start, Some(sub)) {
                Ok(_) => {
                    up.unassigned.remove(0);
                    up.candidates[i].1 = Slot::Active {
                        conn,
                        sub,
                        set,
                        newest: None,
                        last_shard: now,
                        tally: Tally::default(),
                    };
                }
                Err(_) => {
                    up.candidates[i].1 = Slot::Failed {
                        until: now + up.config.retry_after,
                    }
                }
            }
        }
        // No parent left to take them: the surviving parents share the orphaned substreams, so
        // the node keeps K while any path to the source remains (with less redundancy).
        let spare = up.candidates.iter().any(|(c, s)| {
            matches!(s, Slot::Standby { .. })
                || (*s == Slot::Idle && !self.refused.contains(&c.node))
        });
        let actives: Vec<usize> = (0..up.candidates.len())
            .filter(|&i| matches!(up.candidates[i].1, Slot::Active { .. }))
            .collect();
        if !spare && !actives.is_empty() && !up.unassigned.is_empty() {
            let mut extra = vec![SubstreamSet::EMPTY; actives.len()];
            let mut resume: Option<u64> = None;
            let mut n = 0;
            for (set, start) in up.unassigned.drain(..) {
                if let StartAt::Seq(s) = start {
                    resume = Some(resume.map_or(s, |r| r.min(s)));
                }
                for index in set.iter() {
                    extra[n % actives.len()].insert(index);
                    n += 1;
                }
            }
            for (slot_ix, add) in actives.into_iter().zip(extra) {
                if add.is_empty() {
                    continue;
                }
                let (cand, slot) = up.candidates[slot_ix].clone();
                let Slot::Active {
                    conn,
                    sub,
                    set,
                    newest,
                    last_shard,
                    ..
                } = slot
                else {
                    continue;
                };
                let union = SubstreamSet::from_bits(set.bits() | add.bits());
                let start = resume.map_or(StartAt::Live, StartAt::Seq);
                if self
                    .subscribe_inner(now, cand.addr, cand.node, channel, union, start, Some(sub))
                    .is_ok()
                {
                    up.candidates[slot_ix].1 = Slot::Active {
                        conn,
                        sub,
                        set: union,
                        newest,
                        last_shard,
                        // A larger set: count afresh.
                        tally: Tally::default(),
                    };
                }
            }
        }
        if up.next_check.is_none() {
            up.next_check = Some(now + up.config.check_every);
        }
        self.upstreams.insert(channel, up);
    }

    /// Finds lost and lagging parents and moves their substreams.
    fn upstream_check(&mut self, now: Instant) {
        let channels: Vec<ChannelId> = self.upstreams.keys().copied().collect();
        for channel in channels {
            let Some(up) = self.upstreams.get_mut(&channel) else {
                continue;
            };
            let lost_conns = &self.lost_conns;
            let best = up
                .candidates
                .iter()
                .filter_map(|(_, s)| match s {
                    Slot::Active { newest, .. } => *newest,
                    _ => None,
                })
                .max();
            let someone_fresh = up.candidates.iter().any(|(_, s)| match s {
                Slot::Active { last_shard, .. } => {
                    now.saturating_duration_since(*last_shard) < up.config.stall_timeout
                }
                _ => false,
            });
            // Delivery ratios: a parent is short only if another one is healthy (otherwise the
            // bottleneck is our own link), and only the worst short parent moves per check.
            let ratios: Vec<Option<f64>> = up
                .candidates
                .iter()
                .map(|(_, s)| match s {
                    Slot::Active { set, tally, .. } => tally.ratio(set.len(), best, now),
                    _ => None,
                })
                .collect();
            let healthy = ratios.iter().flatten().any(|&r| r >= HEALTHY_RATIO);
            let shortest = ratios
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.map(|r| (i, r)))
                .filter(|&(_, r)| healthy && r < SHORT_RATIO)
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(i, _)| i);
            let mut failed = Vec::new();
            for (i, (_, slot)) in up.candidates.iter().enumerate() {
                match slot {
                    Slot::Active {
                        conn,
                        newest,
                        last_shard,
                        set,
                        ..
                    } => {
                        let gone = lost_conns.contains(conn)
                            || self.conns.get(conn).is_none_or(|c| c.closed);
                        let behind = match (best, newest) {
                            (Some(b), Some(n)) => b.saturating_sub(*n) >= up.config.lag_chunks,
                            _ => false,
                        };
                        let silent = now.saturating_duration_since(*last_shard)
                            >= up.config.stall_timeout
                            && someone_fresh;
                        let short = shortest == Some(i);
                        if gone || behind || silent || short {
                            // Resume where the lost parent stopped, or earlier: a player resumes
                            // at its next chunk to play, so nothing not yet output is missed.
                            let mut resume = newest.or(best).unwrap_or(0).saturating_sub(1);
                            if let Some(next) =
                                self.channels.get(&channel).and_then(Channel::next_play)
                            {
                                resume = resume.min(next);
                            }
                            failed.push((i, *conn, *set, resume));
                        }
                    }
                    Slot::Standby { conn, .. }
                        if lost_conns.contains(conn)
                            || self.conns.get(conn).is_none_or(|c| c.closed) =>
                    {
                        failed.push((i, *conn, SubstreamSet::EMPTY, 0));
                    }
                    _ => {}
                }
            }
            for (_, slot) in &mut up.candidates {
                if let Slot::Active { tally, .. } = slot {
                    tally.roll(best);
                }
            }
            let retry = up.config.retry_after;
            let mut moved = Vec::new();
            for (i, conn, set, resume) in failed {
                up.candidates[i].1 = Slot::Failed { until: now + retry };
                if !set.is_empty() {
                    up.unassigned.push((set, StartAt::Seq(resume)));
                    up.failovers += 1;
                    moved.push((up.candidates[i].0.addr, resume));
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.close(now, close_code::DONE, "parent replaced");
                    mark(&mut self.dirty, c, conn);
                }
            }
            self.upstream_fill(now, channel);
            for (lost, resume) in moved {
                self.stats.failovers += 1;
                let replacement = self.upstreams.get(&channel).and_then(|u| {
                    u.candidates.iter().find_map(|(c, s)| match s {
                        Slot::Active {
                            set, newest: None, ..
                        } if !set.is_empty() => Some(c.addr),
                        _ => None,
                    })
                });
                self.events.push_back(NodeEvent::Failover {
                    channel,
                    lost,
                    replacement,
                    resume,
                });
            }
            if let Some(up) = self.upstreams.get_mut(&channel) {
                up.next_check = Some(now + up.config.check_every);
            }
        }
        self.lost_conns.clear();
    }

    fn connect(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        node: NodeId,
    ) -> Result<ConnectionHandle, EngineError> {
        let mut client = ClientConfig::new(tls::client_crypto(node)?);
        client.transport_config(Arc::clone(&self.transport));
        let (handle, quic) = self
            .endpoint
            .connect(now, client, remote, SERVER_NAME)
            .map_err(|e| EngineError::Connect(remote, e.to_string()))?;
        let mut conn = Conn::new(quic, remote, Some(node));
        conn.send_control(&self.hello());
        self.conns.insert(handle, conn);
        self.order.push(handle);
        self.touch(handle);
        Ok(handle)
    }

    /// Closes the connection to `handle` (a parent the application gave up on).
    pub fn disconnect(&mut self, now: Instant, handle: ConnectionHandle) {
        if let Some(conn) = self.conns.get_mut(&handle) {
            conn.close(now, close_code::DONE, "unsubscribed");
        }
        self.touch(handle);
        self.drive(now);
    }

    fn hello(&self) -> Message {
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: self.config.role,
            agent: self.config.agent.clone(),
        })
    }

    /// Feeds one received UDP datagram (or GRO batch: one call per datagram).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        ecn: Option<EcnCodepoint>,
        data: BytesMut,
    ) {
        self.stats.udp_bytes_in += data.len() as u64;
        let mut buf = Vec::new();
        match self
            .endpoint
            .handle(now, remote, local_ip, ecn, data, &mut buf)
        {
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                if let Some(conn) = self.conns.get_mut(&handle) {
                    conn.quic.handle_event(event);
                    mark(&mut self.dirty, conn, handle);
                }
            }
            Some(DatagramEvent::NewConnection(incoming))
                if self.draining
                    || self
                        .config
                        .max_connections
                        .is_some_and(|max| self.conns.len() >= max) =>
            {
                self.stats.connections_refused += 1;
                let t = self.endpoint.refuse(incoming, &mut buf);
                self.responses.push_back((t, buf));
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                match self.endpoint.accept(incoming, now, &mut buf, None) {
                    Ok((handle, quic)) => {
                        self.stats.accepted += 1;
                        self.conns.insert(handle, Conn::new(quic, remote, None));
                        self.order.push(handle);
                        self.touch(handle);
                    }
                    Err(e) => {
                        if let Some(t) = e.response {
                            self.responses.push_back((t, std::mem::take(&mut buf)));
                        }
                    }
                }
            }
            Some(DatagramEvent::Response(t)) => self.responses.push_back((t, buf)),
            None => {}
        }
        self.drive(now);
    }

    /// Handles expired timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, handle)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if let Some(conn) = self.conns.get_mut(&handle) {
                conn.timer = None;
                conn.quic.handle_timeout(now);
                mark(&mut self.dirty, conn, handle);
            }
        }
        self.drive(now);
        if self
            .upstreams
            .values()
            .any(|u| u.next_check.is_some_and(|t| t <= now))
        {
            self.upstream_check(now);
            self.drive(now);
        }
    }

    /// The next instant [`Engine::handle_timeout`] must run.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let conns = self.timers.first().map(|(t, _)| *t);
        let channels = self.channels.values().filter_map(Channel::poll_timeout);
        let upstream = self.upstreams.values().filter_map(|u| u.next_check);
        conns.into_iter().chain(channels).chain(upstream).min()
    }

    /// The next datagram(s) to send. The bytes are written to `buf`; with `segment_size` set,
    /// `buf` holds several datagrams of that size (the last may be shorter).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        if let Some((t, data)) = self.responses.pop_front() {
            buf.clear();
            buf.extend_from_slice(&data);
            return Some(t);
        }
        while let Some(handle) = self.tx_queue.pop_front() {
            let Some(conn) = self.conns.get_mut(&handle) else {
                continue;
            };
            buf.clear();
            // A GSO send carries at most 64 KiB (the UDP length field): fewer, full-size
            // segments rather than a batch the kernel refuses.
            let segments = self
                .config
                .max_gso_segments
                .min(MAX_GSO_BYTES / usize::from(conn.quic.current_mtu()))
                .max(1);
            let sent = conn.quic.poll_transmit(now, segments, buf);
            if sent.is_some() {
                // It may have more; round-robin behind the others.
                self.tx_queue.push_back(handle);
            } else {
                conn.queued_tx = false;
            }
            // Sending arms loss-detection timers. (It produces no endpoint or application
            // events in quinn-proto 0.11, so the connection is not marked for driving: doing
            // that kept every connection that ever sent dirty on every loop turn.)
            self.rearm(handle);
            if sent.is_some() {
                return sent;
            }
        }
        None
    }

    /// Re-files a connection's QUIC deadline in the timer set.
    fn rearm(&mut self, handle: ConnectionHandle) {
        let Some(conn) = self.conns.get_mut(&handle) else {
            return;
        };
        let next = conn.quic.poll_timeout();
        if next != conn.timer {
            if let Some(old) = conn.timer {
                self.timers.remove(&(old, handle));
            }
            if let Some(new) = next {
                self.timers.insert((new, handle));
            }
            conn.timer = next;
        }
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// Runs everything that follows from new input: QUIC events, protocol messages, fan-out,
    /// playout.
    fn drive(&mut self, now: Instant) {
        while let Some(handle) = self.dirty.pop_front() {
            let Some(conn) = self.conns.get_mut(&handle) else {
                continue;
            };
            conn.dirty = false;
            self.drive_conn(now, handle);
            self.retire_streams_of(handle);
            if let Some(conn) = self.conns.get_mut(&handle)
                && !conn.queued_tx
            {
                conn.queued_tx = true;
                self.tx_queue.push_back(handle);
            }
            self.rearm(handle);
        }
        // Playout.
        let mut out = Vec::new();
        for (id, channel) in &mut self.channels {
            for (seq, flags, payload) in channel.poll_playout(now, &mut self.coder) {
                out.push(NodeEvent::Chunk {
                    channel: *id,
                    seq,
                    flags,
                    payload,
                });
            }
        }
        self.events.extend(out);
    }

    fn drive_conn(&mut self, now: Instant, handle: ConnectionHandle) {
        let mut inputs = Vec::new();
        let mut drained = false;
        {
            let Some(conn) = self.conns.get_mut(&handle) else {
                return;
            };
            loop {
                let mut progressed = false;
                while let Some(ev) = conn.quic.poll_endpoint_events() {
                    progressed = true;
                    drained |= ev.is_drained();
                    if let Some(back) = self.endpoint.handle_event(handle, ev) {
                        conn.quic.handle_event(back);
                    }
                }
                while let Some(ev) = conn.quic.poll() {
                    progressed = true;
                    match ev {
                        Event::Connected => {
                            conn.flush_control();
                            self.events.push_back(NodeEvent::Connected {
                                conn: handle,
                                remote: conn.remote,
                            });
                        }
                        Event::Stream(StreamEvent::Available { dir: Dir::Bi }) => {
                            conn.flush_control();
                        }
                        Event::ConnectionLost { reason } => {
                            self.lost_conns.push(handle);
                            self.events.push_back(NodeEvent::ConnectionLost {
                                conn: handle,
                                remote: conn.remote,
                                reason: reason.to_string(),
                            });
                        }
                        Event::Stream(StreamEvent::Opened { dir }) => {
                            while let Some(id) = conn.quic.streams().accept(dir) {
                                match dir {
                                    Dir::Bi => {
                                        if conn.control.is_none() {
                                            conn.control = Some(id);
                                            control_first(&mut conn.quic, id);
                                            conn.send_control(&Message::Hello(Hello {
                                                version: PROTOCOL_VERSION,
                                                role: self.config.role,
                                                agent: self.config.agent.clone(),
                                            }));
                                        }
                                    }
                                    Dir::Uni => {
                                        conn.in_streams.insert(id, InStream::default());
                                    }
                                }
                                if self.reading || conn.control == Some(id) {
                                    read_stream(
                                        conn,
                                        id,
                                        &mut inputs,
                                        &mut self.stats.stream_bytes_copied,
                                    );
                                }
                            }
                        }
                        Event::Stream(StreamEvent::Readable { id }) => {
                            if self.reading || conn.control == Some(id) {
                                read_stream(
                                    conn,
                                    id,
                                    &mut inputs,
                                    &mut self.stats.stream_bytes_copied,
                                );
                            }
                        }
                        Event::Stream(StreamEvent::Writable { .. }) => {
                            conn.flush_control();
                        }
                        Event::Stream(_) | Event::HandshakeDataReady => {}
                        Event::DatagramReceived | Event::DatagramsUnblocked => {}
                    }
                }
                if !progressed {
                    break;
                }
            }
        }
        if drained {
            if let Some(conn) = self.conns.remove(&handle)
                && let Some(t) = conn.timer
            {
                self.timers.remove(&(t, handle));
            }
            self.order.retain(|h| *h != handle);
            for listed in self.subscribers.values_mut() {
                listed.retain(|(h, _)| *h != handle);
            }
            return;
        }
        for input in inputs {
            self.apply(now, handle, input);
        }
        self.flush_out_streams(handle);
    }

    fn apply(&mut self, now: Instant, handle: ConnectionHandle, input: Input) {
        match input {
            Input::Undecodable(e) => {
                self.stats.protocol_errors += 1;
                if let Some(conn) = self.conns.get_mut(&handle) {
                    conn.close(now, close_code::PROTOCOL, &e.to_string());
                }
            }
            Input::Control(msg) => self.apply_control(now, handle, msg),
            Input::Shard(stream, frame) => self.apply_shard(now, handle, stream, frame),
            Input::StreamDone(stream) => {
                if let Some(conn) = self.conns.get_mut(&handle) {
                    conn.in_streams.remove(&stream);
                }
            }
        }
    }

    fn apply_control(&mut self, now: Instant, handle: ConnectionHandle, msg: Message) {
        let Some(conn) = self.conns.get_mut(&handle) else {
            return;
        };
        match msg {
            Message::Hello(hello) => {
                if hello.version != PROTOCOL_VERSION {
                    conn.close(now, close_code::VERSION, "unsupported protocol version");
                } else {
                    conn.hello = Some(hello);
                }
            }
            Message::Subscribe(sub) => {
                let Some(channel) = self.channels.get(&sub.channel) else {
                    return;
                };
                let known = self
                    .subscribers
                    .get(&sub.channel)
                    .is_some_and(|l| l.contains(&(handle, sub.sub)));
                let full = self.config.max_subscribers.is_some_and(|max| {
                    self.subscribers.values().map(Vec::len).sum::<usize>() >= max
                });
                if !known && (self.draining || full) {
                    self.stats.subscriptions_turned_away += 1;
                    let reason = if self.draining {
                        GoAwayReason::Shutdown
                    } else {
                        GoAwayReason::Overloaded
                    };
                    let go = go_away(reason, &self.alternatives, [sub.channel]);
                    conn.send_control(&go);
                    return;
                }
                let listed = self.subscribers.entry(sub.channel).or_default();
                if !listed.contains(&(handle, sub.sub)) {
                    listed.push((handle, sub.sub));
                }
                let Some(params) = channel.params() else {
                    // Nothing received yet; serve what arrives from now on.
                    conn.served.insert(
                        sub.sub,
                        Served {
                            channel: sub.channel,
                            substreams: sub.substreams,
                        },
                    );
                    return;
                };
                conn.served.insert(
                    sub.sub,
                    Served {
                        channel: sub.channel,
                        substreams: sub.substreams,
                    },
                );
                let info = channel_info(channel, params, self.config.corrupt_outgoing_shards);
                conn.send_control(&info);
                // Backlog: from the requested point, everything still held.
                let from = match sub.start {
                    StartAt::Live => channel.newest_random_access(),
                    StartAt::Seq(seq) => Some(seq),
                };
                let mut backlog = Vec::new();
                if let Some(from) = from {
                    for seq in channel.seqs_from(from) {
                        if let Some(chunk) = channel.chunk(seq) {
                            for index in sub.substreams.iter() {
                                if let Some(shard) = chunk.shard(index) {
                                    backlog.push(StoredShard {
                                        header: Arc::clone(chunk.header()),
                                        index,
                                        shard: shard.clone(),
                                    });
                                }
                            }
                        }
                    }
                }
                for shard in &backlog {
                    self.send_shard(now, handle, sub.sub, sub.substreams, shard);
                }
            }
            Message::Unsubscribe(unsub) => {
                if unsub.substreams.is_empty() {
                    if let Some(served) = conn.served.remove(&unsub.sub)
                        && let Some(listed) = self.subscribers.get_mut(&served.channel)
                    {
                        listed.retain(|entry| *entry != (handle, unsub.sub));
                    }
                } else if let Some(served) = conn.served.get_mut(&unsub.sub) {
                    served.substreams = SubstreamSet::from_bits(
                        served.substreams.bits() & !unsub.substreams.bits(),
                    );
                }
            }
            Message::ChannelInfo(info) => {
                if let Some(header) = &info.stream_header
                    && self.channels.contains_key(&info.channel)
                {
                    if !header.signature_valid(&info.channel) {
                        self.misbehaved(now, handle, &Rejected::StreamHeader(header.serial));
                        return;
                    }
                    if self.store_stream_header(info.channel, header.clone(), info.params) {
                        self.events.push_back(NodeEvent::StreamHeader {
                            channel: info.channel,
                            header: header.clone(),
                        });
                    }
                }
                if let Some(up) = self.upstreams.get_mut(&info.channel)
                    && up.params.is_none()
                {
                    // Hints for assignment and the starting point only: every header is still
                    // verified.
                    up.params = Some(info.params);
                    let behind = u64::from(self.config.channel.target_delay.as_millis() as u32)
                        .div_ceil(u64::from(info.chunk_ms.max(1)));
                    up.first_start = info.latest.map_or(StartAt::Live, |latest| {
                        StartAt::Seq(latest.saturating_sub(behind))
                    });
                    self.upstream_fill(now, info.channel);
                }
            }
            Message::GoAway(go) => {
                // A parent leaving (or full): move off it now, while it still serves, rather
                // than after it has gone; its alternatives become candidates.
                self.stats.go_aways_received += 1;
                let from = conn.node;
                let channels: Vec<ChannelId> = conn.taken.values().copied().collect();
                for channel in channels {
                    if let Some(up) = self.upstreams.get_mut(&channel) {
                        for alt in &go.alternatives {
                            if Some(alt.node) != from
                                && let Some(&addr) = alt.addrs.first()
                                && !up.candidates.iter().any(|(c, _)| c.node == alt.node)
                            {
                                up.candidates.push((
                                    Candidate {
                                        addr,
                                        node: alt.node,
                                    },
                                    Slot::Idle,
                                ));
                            }
                        }
                        up.next_check = Some(now);
                    }
                }
                self.lost_conns.push(handle);
            }
            Message::Have(_) | Message::ParentQuery(_) | Message::ParentAnswer(_) => {}
            Message::Shard(_) => {
                self.stats.protocol_errors += 1;
                conn.close(now, close_code::PROTOCOL, "shard on the control stream");
            }
        }
    }

    fn apply_shard(
        &mut self,
        now: Instant,
        handle: ConnectionHandle,
        stream: StreamId,
        frame: ShardFrame,
    ) {
        let Some(conn) = self.conns.get_mut(&handle) else {
            return;
        };
        let Some(channel_id) = conn.taken.get(&frame.sub).copied() else {
            // A subscription we did not make (or already dropped): ignore.
            return;
        };
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return;
        };
        let state = conn.in_streams.entry(stream).or_default();
        let header = match (frame.header, &state.header) {
            (Some(h), _) => match channel.verify_header(h) {
                Ok(h) => {
                    state.header = Some(Arc::clone(&h));
                    h
                }
                Err(e) => return self.misbehaved(now, handle, &e),
            },
            (None, Some(h)) if h.header.seq == frame.seq => Arc::clone(h),
            (None, _) => {
                self.stats.protocol_errors += 1;
                conn.close(now, close_code::PROTOCOL, "shard without its chunk header");
                return;
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
                    && let Slot::Active {
                        newest,
                        last_shard,
                        tally,
                        ..
                    } = &mut up.candidates[i].1
                {
                    *newest = Some(newest.map_or(seq, |n| n.max(seq)));
                    *last_shard = now;
                    tally.count(seq, now);
                }
                self.fan_out(now, channel_id, &stored);
                self.export(channel_id, &stored);
            }
            Err(e) => self.misbehaved(now, handle, &e),
        }
    }

    fn misbehaved(&mut self, now: Instant, handle: ConnectionHandle, why: &Rejected) {
        self.stats.misbehaving_closed += 1;
        if let Some(conn) = self.conns.get_mut(&handle) {
            if let Some(node) = conn.node {
                self.refused.insert(node);
            }
            self.events.push_back(NodeEvent::Misbehaved {
                remote: conn.remote,
                node: conn.node,
                reason: why.to_string(),
            });
            conn.close(now, close_code::BAD_DATA, "bad shard or header");
        }
    }

    /// Sends newly stored shards to every subscriber that wants them.
    fn fan_out(&mut self, now: Instant, channel: ChannelId, shards: &[StoredShard]) {
        if shards.is_empty() {
            return;
        }
        let listed = self.subscribers.remove(&channel).unwrap_or_default();
        for &(handle, sub) in &listed {
            let substreams = match self.conns.get(&handle) {
                Some(conn) if !conn.closed => match conn.served.get(&sub) {
                    Some(served) => served.substreams,
                    None => continue,
                },
                _ => continue,
            };
            for shard in shards {
                if substreams.contains(shard.index) {
                    self.send_shard(now, handle, sub, substreams, shard);
                }
            }
        }
        // Sending never subscribes anyone, so putting the list back loses nothing.
        self.subscribers.entry(channel).or_default().extend(listed);
    }

    /// Takes `bytes` from the upload budget; false if the cap does not allow them now.
    fn upload_allowed(&mut self, now: Instant, bytes: usize) -> bool {
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

    fn send_shard(
        &mut self,
        now: Instant,
        handle: ConnectionHandle,
        sub: u32,
        substreams: SubstreamSet,
        shard: &StoredShard,
    ) {
        if !self.upload_allowed(now, shard.shard.len()) {
            self.stats.upload_cap_drops += 1;
            return;
        }
        let max_backlog = self.config.max_backlog_bytes;
        let payload = if self.config.corrupt_outgoing_shards {
            let mut bad = shard.shard.to_vec();
            if let Some(b) = bad.last_mut() {
                *b ^= 0x5a;
            }
            Bytes::from(bad)
        } else {
            shard.shard.clone()
        };
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
            shard.shard.len(),
        );
        let prefix = self.prefixes.split().freeze();
        let Some(out) = conn.out_streams.get_mut(&key) else {
            return;
        };
        let added = prefix.len() + header.as_ref().map_or(0, Bytes::len) + shard.shard.len();
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

    fn flush_out_streams(&mut self, handle: ConnectionHandle) {
        let Some(conn) = self.conns.get_mut(&handle) else {
            return;
        };
        conn.flush_control();
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
            let mut blocked = false;
            while !out.pending.is_empty() {
                let mut batch: Vec<Bytes> = out.pending.drain(..).collect();
                match stream.write_chunks(&mut batch) {
                    Ok(written) => {
                        conn.backlog = conn.backlog.saturating_sub(written.bytes);
                        // Whatever QUIC did not take goes back to the front.
                        for rest in batch.into_iter().rev().filter(|b| !b.is_empty()) {
                            out.pending.push_front(rest);
                        }
                        if !out.pending.is_empty() {
                            blocked = true;
                            break;
                        }
                    }
                    Err(WriteError::Blocked) => {
                        for rest in batch.into_iter().rev() {
                            out.pending.push_front(rest);
                        }
                        blocked = true;
                        break;
                    }
                    Err(_) => {
                        out.pending.clear();
                        break;
                    }
                }
            }
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

    /// Finishes one connection's chunk streams whose chunk has left the window.
    fn retire_streams_of(&mut self, handle: ConnectionHandle) {
        if let Some(conn) = self.conns.get_mut(&handle) {
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

/// The upload budget a node starts with: one second at its cap.
fn config_upload_burst(config: &EngineConfig) -> f64 {
    config.upload_cap.map_or(0.0, |cap| cap as f64)
}

/// Reads what arrived on stream `id` and decodes every complete frame.
fn read_stream(conn: &mut Conn, id: StreamId, inputs: &mut Vec<Input>, copied: &mut u64) {
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
