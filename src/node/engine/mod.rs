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
//! [`ChannelInfo`](crate::wire::ChannelInfo) and then sends the shards of that subscription on
//! one unidirectional stream that carries every chunk (the default,
//! [`ShardStreams::PerSubscription`]); a frame carries the chunk's signed header unless the
//! receiver already holds it for that stream. Every shard is verified before it is stored,
//! served or played; a neighbour that sends a bad header or shard is disconnected and its node
//! id is refused from then on.
//!
//! A subscriber whose connection cannot take more data loses its oldest queued chunks (counted
//! in [`EngineStats::backlog_drops`]); nothing queues without bound.
//!
//! # Layout
//!
//! One `Engine` struct (here, with its settings, events and counters), its methods grouped by
//! concern, each file one job:
//!
//! - `conn`: one connection's state (control stream, subscriptions each way, chunk streams)
//!   and the slab-indexed table of all of them; reading a stream into protocol inputs.
//! - `io`: the QUIC side: datagrams in, transmits out, timers, dialling, and the
//!   per-connection event loop that turns quinn-proto events into inputs.
//! - `control`: the control protocol: subscriptions made and served, channel information,
//!   refusals, go-aways and drain, misbehaving neighbours.
//! - `fanout`: chunks in and out: publish and import, shard verification, fan-out, the upload
//!   cap.
//! - `outbound`: the streams shards leave on ([`ShardStreams`]), the queue in front of QUIC
//!   and the backlog bound.
//! - `timers`: every connection's next QUIC deadline, in a heap that moves one in place.
//! - `discovery`: parent queries and answers, and the first-tier limit that sends peers to
//!   relays.
//! - `report`: the snapshot an operator's metrics and health checks read.
//! - `gossip`: membership among supernodes (a [`crate::node::directory::Directory`]: foca over
//!   QUIC datagrams, or the simulator's board) and this node's info.
//! - `parents`: the upstream policy ([`crate::node::upstream`]) put to work: candidates,
//!   standbys, assignment and failover.
//! - `race`: dialling a node known at several addresses (RFC 8305's connection attempts).
//! - `punch`: hole punching through a parent, for children behind NATs and firewalls.

mod conn;
mod control;
mod discovery;
mod fanout;
mod gossip;
mod io;
mod nearer;
mod outbound;
mod parents;
mod punch;
mod race;
mod report;
mod timers;
pub(crate) use nearer::EXPLORE_EVERY;
pub use race::ATTEMPT_DELAY;
pub use report::{ChannelReport, ConnectionsByRole, EngineReport, ParentReport};

use conn::ConnTable;

use std::collections::{HashMap, VecDeque};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    AckFrequencyConfig, ConnectionHandle, Endpoint, EndpointConfig, IdleTimeout, ServerConfig,
    Transmit, TransportConfig, VarInt,
};

use super::channel::{Channel, ChannelConfig, ChannelMode, StoredShard};
use super::cid::{WorkerCids, WorkerTag};
use super::tls::{self, TlsError};
use super::upstream::{Candidate, Upstream, UpstreamConfig};
use crate::keys::{ChannelId, NodeId, NodeKey};
use crate::stream::{ChunkFlags, Payload, ShardCoder, SignedChunkHeader};
use crate::wire::{Hello, Message, PROTOCOL_VERSION, RefuseReason, Role, SignedStreamHeader};

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
    /// The subscriber took no data for [`super::EngineConfig::stall_timeout`].
    pub const STALLED: u32 = 4;
}

/// Most bytes in one GSO batch: a UDP datagram's 16-bit length, less the IPv6 and UDP
/// headers.
const MAX_GSO_BYTES: usize = 65_535 - 40 - 8;

/// How shards travel to a subscriber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardStreams {
    /// One QUIC stream per subscription carries every chunk: no stream to open, finish and
    /// acknowledge per chunk. A lost packet holds back the chunks behind it on that stream
    /// until it is resent.
    PerSubscription,
    /// One QUIC stream per chunk per subscription: a lost packet delays only its own chunk,
    /// at the cost of a stream's life per chunk per subscriber.
    PerChunk,
}

/// The congestion controller of every connection (quinn-proto's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn-proto's default: loss-based.
    Cubic,
    /// NewReno (RFC 9002's reference controller): loss-based.
    NewReno,
    /// BBR (quinn-proto's, marked experimental there): paces at the measured bottleneck
    /// rate and does not take random loss as a sign of congestion.
    Bbr,
    /// CUBIC that cuts its window for a loss only when the path shows a queue
    /// ([`crate::node::gated_cubic`]): random loss is not taken for congestion.
    GatedCubic,
    /// LEDBAT, a scavenger ([`crate::node::ledbat`]): keeps the queue it adds near 60 ms and
    /// yields to loss-based flows sharing it. What a player's uploads run on, so that
    /// relaying never crowds out its user's own traffic.
    Ledbat,
}

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
    /// How long a connection may take none of the shard data waiting for it before it is
    /// closed (a subscriber that stopped reading, or one too far away to keep up): what it
    /// pinned here, its queue and QUIC's send buffer, is freed, and it counts in
    /// [`EngineStats::stalled_closed`].
    pub stall_timeout: Duration,
    /// QUIC receive window per stream (one chunk's shards for one subscriber).
    pub stream_window: u32,
    /// QUIC receive window per connection: what a neighbour that stops reading can pin here.
    pub connection_window: u32,
    /// QUIC send buffer per connection: what a subscriber that stops reading can pin at us.
    pub send_window: u64,
    /// Seed for quinn's connection-id and packet-number randomness (simulations).
    pub rng_seed: Option<[u8; 32]>,
    /// The wall clock when the node started, in microseconds since the Unix epoch (0 in the
    /// simulator). Its membership info's versions count up from it, so that the members
    /// believe a node restarted with its key over what its last run told them (a drain, which
    /// names it to nobody).
    pub started_unix_us: u64,
    /// Agent string for Hello.
    pub agent: String,
    /// Most shard bytes per second sent to subscribers (`None`: no cap). A peer relaying to
    /// other peers sets its owner's cap here; a node that must upload nothing sets
    /// `serve: false` instead and accepts no subscribers at all.
    pub upload_cap: Option<u64>,
    /// Most connections at once; more are refused at the handshake (`None`: no limit).
    pub max_connections: Option<usize>,
    /// Most incoming handshakes under way before a new connection from an address not yet
    /// validated is answered with a QUIC Retry (the client must prove it receives at its
    /// address before any handshake state is kept for it). 0 validates every address.
    pub validate_above: usize,
    /// Most subscriptions served at once; more are answered with a go-away naming the
    /// alternatives (`None`: no limit).
    pub max_subscribers: Option<usize>,
    /// Carry any channel a subscriber asks for (an open relay), finding its upstream through
    /// the grid (`None`: only the channels added).
    pub open: Option<OpenChannels>,
    /// The address other nodes dial this node at. With it, a serving supernode or source
    /// joins the membership among supernodes ([`crate::node::membership`]).
    pub advertise: Option<SocketAddr>,
    /// Other addresses this node is reached at, announced with `advertise` (its other address
    /// family, say, so that IPv4-only and IPv6-only nodes both reach it); at most
    /// [`crate::node::directory::MAX_ALSO`] are announced.
    pub advertise_also: Vec<SocketAddr>,
    /// The in-memory directory shared by the nodes of one simulation, used instead of gossip
    /// when set ([`crate::node::directory::Board`]).
    pub directory: Option<crate::node::directory::Board>,
    /// The first tier a source serves: at most this many child connections, and no peer
    /// once a relay child carries the channel; others are refused with candidates (the relays
    /// among its children) so that tiers form by themselves (`None`: serve everyone).
    pub max_children: Option<usize>,
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
    /// The streams shards are sent on.
    pub shard_streams: ShardStreams,
    /// The congestion controller.
    pub congestion: Congestion,
    /// LEDBAT's settings, when `congestion` is [`Congestion::Ledbat`]. The connections of
    /// every engine built from clones of one `EngineConfig` share their view of the uplink's
    /// queue ([`crate::node::ledbat`]): the workers of one node. Give unrelated nodes in one
    /// process configs of their own.
    pub ledbat: crate::node::ledbat::LedbatConfig,
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
            stall_timeout: Duration::from_secs(10),
            stream_window: 2 * 1024 * 1024,
            connection_window: 8 * 1024 * 1024,
            send_window: 8 * 1024 * 1024,
            rng_seed: None,
            started_unix_us: 0,
            agent: concat!("gridcast/", env!("CARGO_PKG_VERSION")).to_owned(),
            corrupt_outgoing_shards: false,
            upstream: UpstreamConfig::default(),
            upload_cap: None,
            max_connections: None,
            validate_above: 128,
            max_subscribers: None,
            max_children: None,
            advertise: None,
            advertise_also: Vec::new(),
            directory: None,
            open: None,
            worker: None,
            export_shards: false,
            mtu_discovery: true,
            ack_eliciting_threshold: 9,
            shard_streams: ShardStreams::PerSubscription,
            congestion: Congestion::GatedCubic,
            ledbat: crate::node::ledbat::LedbatConfig::default(),
        }
    }
}

/// An open relay's settings ([`EngineConfig::open`]).
#[derive(Clone, Debug)]
pub struct OpenChannels {
    /// Nodes of the grid to ask for a channel's upstream (any kind of node).
    pub bootstrap: Vec<Candidate>,
    /// Most channels carried at once; a subscription to one more is refused.
    pub max_channels: usize,
    /// A channel nobody has subscribed to for this long is dropped.
    pub idle_after: Duration,
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

/// Why a parent was given up on ([`NodeEvent::Failover`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverWhy {
    /// Its connection is gone.
    Lost,
    /// Its newest chunk is `lag_chunks` behind the best parent's.
    Behind,
    /// No shard from it for the stall timeout while others deliver (or no datagram at all for
    /// `unreachable_after`, or a standby holds chunks well past it).
    Silent,
    /// It delivers too small a share of its substreams while another parent is healthy.
    Short,
}

impl std::fmt::Display for FailoverWhy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Lost => "lost",
            Self::Behind => "behind",
            Self::Silent => "silent",
            Self::Short => "short",
        })
    }
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
    /// A channel's title (a radio's song title) arrived or changed, signature checked. A player
    /// shows it from chunk `title.from_seq` on; a multi-worker relay hands it to its other
    /// workers with [`Engine::set_title`].
    StreamTitle {
        /// The title, with its channel.
        title: crate::wire::StreamTitle,
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
    /// A player channel gave up on chunks `first..=last`: no parent delivered enough of
    /// their shards within the playout delay while a later chunk was complete. The viewer
    /// sees a skip.
    Skipped {
        /// Channel.
        channel: ChannelId,
        /// The first chunk given up on.
        first: u64,
        /// The last.
        last: u64,
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
        /// Which rule gave up on it.
        why: FailoverWhy,
    },
    /// A parent's substreams moved to a standby at most half as far (measured round trips),
    /// the parent kept as a standby ([`UpstreamConfig::locality`]).
    ParentMoved {
        /// Channel.
        channel: ChannelId,
        /// The farther parent.
        from: SocketAddr,
        /// The nearer node that took its substreams.
        to: SocketAddr,
        /// The least round trip measured to the farther parent.
        from_rtt: Duration,
        /// The least round trip measured to the nearer node.
        to_rtt: Duration,
        /// The chunk the nearer node resumes at.
        resume: u64,
    },
    /// No parent has delivered `channel` for the stall timeout: every one is lost,
    /// unreachable or silent. The policy keeps redialling its candidates with back-off.
    UpstreamLost {
        /// Channel.
        channel: ChannelId,
        /// Candidates the policy knows.
        candidates: usize,
        /// Of them, connected or being dialled.
        connected: usize,
        /// The newest chunk held ends the stream: its source finished, nothing is lost.
        ended: bool,
    },
    /// A parent delivers `channel` again after an [`NodeEvent::UpstreamLost`].
    UpstreamRestored {
        /// Channel.
        channel: ChannelId,
        /// How long nothing arrived.
        after: Duration,
    },
    /// A parent refused a subscription (it does not carry the channel, or is full or
    /// draining); the policy tries its other candidates and the alternatives named.
    SubscriptionRefused {
        /// Channel.
        channel: ChannelId,
        /// The refusing node's address.
        remote: SocketAddr,
        /// Why.
        reason: RefuseReason,
    },
    /// A node we dialled did not prove the node id its link or answer named (TLS).
    ProofFailed {
        /// Where we dialled.
        remote: SocketAddr,
        /// The id it should have proved.
        node: NodeId,
        /// The handshake's error.
        reason: String,
    },
    /// An open relay started carrying a channel a subscriber asked for (a multi-worker
    /// relay adds it on its other workers, which get it by import).
    ChannelOpened {
        /// Channel.
        channel: ChannelId,
    },
    /// An open relay dropped a channel nobody watched.
    ChannelClosed {
        /// Channel.
        channel: ChannelId,
    },
    /// A supernode joined (`up`) or left the membership.
    Membership {
        /// Its node id.
        node: NodeId,
        /// Where it is dialled.
        addr: SocketAddr,
        /// Joined, or left.
        up: bool,
    },
    /// Membership gossip that a worker which is not the member received; the application
    /// hands it to the worker that is ([`Engine::handle_gossip`]).
    Gossip {
        /// The proven sender.
        from: NodeId,
        /// The packet.
        data: Bytes,
    },
    /// A neighbour sent bad data and was disconnected.
    Misbehaved {
        /// Remote address.
        remote: SocketAddr,
        /// Its node id, as its handshake proved it.
        node: Option<NodeId>,
        /// What it did.
        reason: String,
    },
    /// A node is refused from now on (it sent bad data or undecodable bytes). A node of
    /// several engines tells the others with [`Engine::refuse_node`].
    NodeRefused {
        /// The node.
        node: NodeId,
    },
}

/// Counters for the whole node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Shards handed to QUIC for subscribers.
    pub shards_out: u64,
    /// Shard bytes handed to QUIC for subscribers.
    pub shard_bytes_out: u64,
    /// Chunks dropped from a subscriber's queue (or chunk streams reset) because it could not
    /// keep up.
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
    /// Parents whose substreams moved to a standby at most half as far.
    pub parent_moves: u64,
    /// Connections closed because they took no shard data for the stall timeout.
    pub stalled_closed: u64,
    /// Shards not sent to a subscriber because the upload cap was spent.
    pub upload_cap_drops: u64,
    /// Chunk-stream bytes copied out of received packets while reassembling shards. Each
    /// received stream byte is copied exactly once on the way in, here; cross-worker hand-off
    /// and storage share that copy, and fan-out copies a shard once more, into the frame every
    /// subscriber of it shares.
    pub stream_bytes_copied: u64,
    /// Shards taken from sibling workers with [`Engine::import`].
    pub shards_imported: u64,
    /// Incoming connections refused (connection limit, draining).
    pub connections_refused: u64,
    /// Of those, refused because the node drains.
    pub connections_refused_draining: u64,
    /// Of those, closed once their handshake proved a node refused for bad data.
    pub connections_refused_misbehaved: u64,
    /// QUIC Retry packets sent (more than [`EngineConfig::validate_above`] handshakes were
    /// under way).
    pub retries_sent: u64,
    /// Datagrams that reached no connection and were dropped: malformed, for no connection
    /// known, or of an unknown version and too short to answer.
    pub datagrams_dropped: u64,
    /// Datagrams that reached no connection and were answered without any state kept
    /// (version negotiation, stateless reset; never larger than what incited them).
    pub datagrams_answered: u64,
    /// Subscriptions turned away with a go-away (subscriber limit, draining).
    pub subscriptions_turned_away: u64,
    /// Go-aways sent to subscribers by [`Engine::drain`].
    pub go_aways_sent: u64,
    /// Go-aways received from parents.
    pub go_aways_received: u64,
    /// Times no parent of a channel delivered (every one lost, unreachable or silent).
    pub upstream_outages: u64,
    /// Subscriptions refused because this node does not carry the channel.
    pub unknown_channel_refusals: u64,
    /// Subscriptions a parent refused us.
    pub refusals_received: u64,
    /// Gossip datagrams dropped (from a peer or an unproven sender, or not sendable).
    pub gossip_dropped: u64,
    /// QUIC handshakes completed.
    pub handshakes_ok: u64,
    /// QUIC connections lost before their handshake completed (timed out, refused), the
    /// failed proofs among them.
    pub handshakes_failed: u64,
    /// Of those, dialled nodes that did not prove the node id expected.
    pub handshakes_proof_failed: u64,
    /// Dials of a node known at several addresses that tried another address too, because
    /// the first had not answered within [`ATTEMPT_DELAY`].
    pub dial_attempts_extra: u64,
    /// Dials completed at another of the node's addresses than the first tried.
    pub dial_fallbacks: u64,
    /// Serving children told to open a path to a node they were named to (see `punch`).
    pub punches_asked: u64,
    /// Datagrams sent to open a path to a node a parent named this node to.
    pub punches_sent: u64,
    /// Connections that ended, by why (see [`CloseReasons`]).
    pub closed: CloseReasons,
    /// QUIC counters of connections that are gone (live ones are added by
    /// [`Engine::report`]).
    pub retired_quic: QuicTotals,
}

/// Why connections ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloseReasons {
    /// Nothing heard within the idle timeout.
    pub idle_timeout: u64,
    /// Closed by the application, either side (drain, channel dropped, misbehaviour).
    pub application: u64,
    /// Closed by a QUIC transport error, either side (a failed TLS proof among them).
    pub transport_error: u64,
    /// Reset by the far end (stateless reset).
    pub reset: u64,
    /// Closed here, or otherwise.
    pub other: u64,
}

/// QUIC path counters summed over connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuicTotals {
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Bytes declared lost.
    pub lost_bytes: u64,
    /// Congestion events (the window cut).
    pub congestion_events: u64,
}

impl QuicTotals {
    /// Adds one connection's path counters.
    pub fn add(&mut self, path: &quinn_proto::PathStats) {
        self.sent_packets += path.sent_packets;
        self.lost_packets += path.lost_packets;
        self.lost_bytes += path.lost_bytes;
        self.congestion_events += path.congestion_events;
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
    timers: timers::Timers,
    /// Per channel, the (connection, subscription) pairs that receive its shards: fan-out
    /// touches only these, never every connection.
    subscribers: HashMap<ChannelId, Vec<(ConnectionHandle, u32)>>,
    channels: HashMap<ChannelId, Channel>,
    coder: ShardCoder,
    events: VecDeque<NodeEvent>,
    responses: VecDeque<(Transmit, Vec<u8>)>,
    /// When the punch datagrams of the last second went (see `punch`).
    punched: VecDeque<Instant>,
    next_sub: u32,
    refused: control::RefusedNodes,
    /// Accepted connections still in their handshake.
    handshaking: usize,
    upstreams: HashMap<ChannelId, Upstream>,
    lost_conns: Vec<ConnectionHandle>,
    /// Set by [`Engine::drain`]: subscribers are sent away and no new ones are taken.
    draining: bool,
    /// Whether [`Engine::close_all`] closes anything (off only to play a crash).
    farewell: bool,
    /// Per channel, subscribers that asked before the channel had a chunk: they get the
    /// channel information with the first one.
    awaiting_info: HashMap<ChannelId, Vec<ConnectionHandle>>,
    /// Membership among supernodes, if this node is one (see `gossip`).
    membership: Option<Box<dyn crate::node::directory::Directory>>,
    /// The port to announce, while this node's address is still to be learnt from the
    /// first neighbour that reaches it (see [`Engine::learn_advertise`]).
    learn_advertise: Option<u16>,
    /// While learning: the local address the first datagram of a connection arrived at.
    learnt_ip: Option<std::net::IpAddr>,
    /// This node's key, for what it signs about itself in gossip.
    key: NodeKey,
    /// Counters of channels no longer carried (their totals stay monotonic).
    retired_channels: crate::node::channel::ChannelStats,
    /// This node's info changed (a channel was added) and goes out at the next timer.
    info_stale: bool,
    /// Hand received gossip to the application (`set_forward_gossip`).
    forward_gossip: bool,
    /// When this node's load was last measured, and its shard bytes out then.
    load_mark: Option<(Instant, u64)>,
    /// When the load is measured and announced next.
    info_due: Option<Instant>,
    /// This node's certificate and key, presented in every handshake.
    identity: tls::Identity,
    /// This node's Hello, made once.
    hello: Message,
    /// Channels an open relay opened on demand, and since when nobody watches them.
    opened: HashMap<ChannelId, Option<Instant>>,
    /// Per channel, the newest chunk announced to standbys with a Have.
    announced: HashMap<ChannelId, u64>,
    /// Per channel, other nodes that carry it, named in go-aways.
    alternatives: HashMap<ChannelId, Vec<crate::wire::ParentCandidate>>,
    reading: bool,
    upload_tokens: f64,
    upload_refilled: Option<Instant>,
    /// Newly stored shards for sibling workers (`export_shards`).
    exports: Vec<(ChannelId, Vec<StoredShard>)>,
    /// Signed chunk headers encoded once for every subscriber (the newest few chunks).
    encoded_headers: VecDeque<(Arc<SignedChunkHeader>, Bytes)>,
    /// Shard frame prefixes are cut from this block: one allocation per many frames.
    prefixes: BytesMut,
    /// Buffers reused by every batch of frames handed to QUIC.
    write_scratch: outbound::WriteScratch,
    /// Nodes known at several addresses, and the races that dial them (see `race`).
    dialling: race::Dialling,
    stats: EngineStats,
}

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
        // One factory for the connections this node dials and those it accepts (and, through
        // the config's clones, its other workers'): LEDBAT's connections share what they see
        // of the node's uplink queue.
        let ledbat = Arc::new(config.ledbat.clone());
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
            match config.congestion {
                Congestion::Cubic => {}
                Congestion::NewReno => {
                    transport.congestion_controller_factory(Arc::new(
                        quinn_proto::congestion::NewRenoConfig::default(),
                    ));
                }
                Congestion::Bbr => {
                    transport.congestion_controller_factory(Arc::new(
                        quinn_proto::congestion::BbrConfig::default(),
                    ));
                }
                Congestion::GatedCubic => {
                    transport.congestion_controller_factory(Arc::new(
                        crate::node::gated_cubic::GatedCubicConfig::default(),
                    ));
                }
                Congestion::Ledbat => {
                    transport.congestion_controller_factory(ledbat.clone());
                }
            }
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
        let identity = tls::Identity::new(key)?;
        let server = if config.serve {
            let mut server = ServerConfig::with_crypto(tls::server_crypto(&identity)?);
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
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: config.role,
            agent: config.agent.clone(),
            serves: config.serve,
        });
        let mut engine = Self {
            membership: None,
            learn_advertise: None,
            learnt_ip: None,
            info_stale: true,
            forward_gossip: false,
            load_mark: None,
            info_due: None,
            identity,
            hello,
            node: key.node_id(),
            key: key.clone(),
            retired_channels: crate::node::channel::ChannelStats::default(),
            config,
            endpoint,
            transport,
            conns: ConnTable::default(),
            order: Vec::new(),
            dirty: VecDeque::new(),
            tx_queue: VecDeque::new(),
            timers: timers::Timers::default(),
            subscribers: HashMap::new(),
            channels: HashMap::new(),
            coder: ShardCoder::new(),
            events: VecDeque::new(),
            responses: VecDeque::new(),
            punched: VecDeque::new(),
            next_sub: 1,
            refused: control::RefusedNodes::default(),
            handshaking: 0,
            upstreams: HashMap::new(),
            lost_conns: Vec::new(),
            draining: false,
            farewell: true,
            alternatives: HashMap::new(),
            awaiting_info: HashMap::new(),
            announced: HashMap::new(),
            opened: HashMap::new(),
            reading: true,
            upload_tokens,
            upload_refilled: None,
            exports: Vec::new(),
            encoded_headers: VecDeque::new(),
            prefixes: BytesMut::new(),
            write_scratch: outbound::WriteScratch::default(),
            dialling: race::Dialling::default(),
            stats: EngineStats::default(),
        };
        engine.membership = engine.new_membership();
        Ok(engine)
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

    /// Starts carrying a channel in `mode`.
    pub fn add_channel(&mut self, id: ChannelId, mode: ChannelMode) {
        self.info_stale = true;
        let config = self.config.channel.clone();
        let serve = self.config.serve;
        self.channels
            .entry(id)
            .or_insert_with(|| Channel::new(id, mode, config))
            .set_regenerate(serve);
    }

    /// The settings this engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Caps GSO batches (1 turns GSO off; a driver whose kernel refuses GSO does that).
    pub fn set_max_gso_segments(&mut self, segments: usize) {
        self.config.max_gso_segments = segments.max(1);
    }
}

/// The upload budget a node starts with: one second at its cap.
fn config_upload_burst(config: &EngineConfig) -> f64 {
    config.upload_cap.map_or(0.0, |cap| cap as f64)
}
