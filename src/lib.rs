//! gridcast: a peer-to-peer live streaming grid.
//!
//! A broadcaster's live byte stream is cut into chunks; each chunk is erasure-coded into N
//! shards (any K rebuild it) and signed; shard *i* of every chunk forms substream *i*. Relays
//! ("supernodes") and viewers ("peers") pass substreams on over QUIC, and a viewer draws its
//! substreams from several parents at once, so losing one parent loses nothing.
//!
//! # Layers
//!
//! ```text
//!   main.rs (CLI) ──▶ keys         channel and node identity, key files
//!          │
//!          └────────▶ stream       chunker ─▶ coder ─▶ signed header ─▶ shards   (pure)
//!                       ▲          verifier ─▶ partial chunk ─▶ rebuild / regenerate
//!                       │
//!                     wire         every protocol message, framing and limits   (pure)
//! ```
//!
//! Everything in this crate so far is pure: no sockets, no threads, no clock. Callers pass `now`.
//! The node engine, the simulator and the I/O drivers build on these layers (see
//! `ARCHITECTURE.md` for what exists today).
//!
//! # Layout
//!
//! - [`keys`]: Ed25519 channel keys, the textual channel id, key files with safe permissions.
//! - [`stream`]: the stream model — chunker, erasure coding, signed chunk headers, verification,
//!   chunk assembly and shard regeneration.
//! - [`wire`]: the protocol's messages, their encoding, decoding, length limits and framing.

pub mod app;
pub mod driver;
pub mod keys;
pub mod node;
pub mod sim;
pub mod stream;
pub mod wire;
