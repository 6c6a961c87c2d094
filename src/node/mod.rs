//! The node: one sans-IO engine for sources, supernodes and peers, with its QUIC transport and
//! identity.
//!
//! - [`tls`]: self-signed certificates for node keys; the dialler accepts only the node it
//!   expected.
//! - [`channel`]: per-channel window, verification, regeneration and playout (pure).
//! - [`engine`]: quinn-proto endpoint and connections, the control protocol, chunk streams,
//!   fan-out, the upstream policy at work; one file per concern under `engine/`. Read its
//!   module doc for the driver call order.
//! - [`upstream`]: the parent policy's state and arithmetic (assignment, back-off, tallies).
//! - [`cid`]: connection ids that steer packets to the worker that owns the connection.
//! - [`ledbat`]: the scavenger congestion controller a player's uploads run on.

pub mod channel;
pub mod cid;
pub mod directory;
pub mod engine;
pub mod gated_cubic;
pub mod ledbat;
pub mod membership;
pub mod tls;
pub mod upstream;

pub use channel::{Channel, ChannelConfig, ChannelMode, ChannelStats, StoredShard};
pub use cid::WorkerTag;
pub use engine::{
    ChannelReport, CloseReasons, Congestion, ConnectionsByRole, Engine, EngineConfig, EngineError,
    EngineReport, EngineStats, FailoverWhy, NodeEvent, OpenChannels, QuicTotals, ShardStreams,
};
pub use upstream::{Candidate, UpstreamConfig, assign, assign_all_from_one};
