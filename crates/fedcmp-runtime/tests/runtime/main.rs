//! The runtime's integration tests, in one binary: a small federation on a
//! tiny generated decoder runs every strategy, deterministically, one pass.

mod common;
mod federation;
mod local;
mod privacy;
mod suite;
