//! The applications over the engine and drivers: channel links, the demo grid and its
//! built-in test stream. These read the clock and spawn threads; the layers below do not.

mod accept;
pub mod config;
pub mod demo;
pub mod http;
pub mod icecast;
pub mod icy;
pub mod lan;
pub mod link;
mod names;
pub mod ops;
pub mod output;
pub mod play;
pub mod relay;
pub mod roles;
pub mod source;
pub mod teststream;
