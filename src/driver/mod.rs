//! Drivers: the only code that touches sockets, threads and the clock. Each runs one
//! [`Engine`](crate::node::Engine) on real UDP sockets, following the engine's call order.
//!
//! - [`portable`]: one thread, one UDP socket through quinn-udp (GSO, GRO, ECN and local-address
//!   control messages where the platform has them). Runs everywhere; it is the fallback where
//!   io_uring is refused.

pub mod portable;

use std::time::Instant;

use crate::node::Engine;

/// Work for the engine, run on the driver's thread with the instant of its loop turn.
pub type Command = Box<dyn FnOnce(&mut Engine, Instant) + Send>;
