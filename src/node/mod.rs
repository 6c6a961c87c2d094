//! The node: one sans-IO engine for sources, supernodes and peers, with its QUIC transport and
//! identity.
//!
//! - [`tls`]: self-signed certificates for node keys; the dialler accepts only the node it
//!   expected.
//! - [`channel`]: per-channel window, verification, regeneration and playout (pure).
//! - [`engine`]: quinn-proto endpoint and connections, the control protocol, chunk streams,
//!   fan-out. Read its module doc for the driver call order.

pub mod channel;
pub mod cid;
pub mod engine;
pub mod tls;
pub mod upstream;

pub use channel::{Channel, ChannelConfig, ChannelMode, ChannelStats, StoredShard};
pub use cid::WorkerTag;
pub use engine::{Engine, EngineConfig, EngineError, EngineStats, NodeEvent};
pub use upstream::{Candidate, UpstreamConfig, assign};
