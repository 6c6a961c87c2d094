//! Helpers shared by integration tests and benches.

#![allow(unreachable_pub, dead_code)]

pub mod bed;
pub mod catalog;
pub mod clients;
pub mod flood;
pub mod floor;
pub mod grid;
pub mod http;
pub mod procs;
pub mod quic;
pub mod relay;
pub mod sys;
pub mod wire;
