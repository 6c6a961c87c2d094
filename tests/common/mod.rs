//! Helpers shared by integration tests and benches.

#![allow(unreachable_pub)]

pub mod grid;
