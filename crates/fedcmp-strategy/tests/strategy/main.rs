//! The strategy crate's integration tests, in one binary: golden values
//! from the independent numpy reference (`tests/golden/`), properties every
//! strategy must have, error cases, configuration.

mod candidates;
mod common;
mod config;
mod cra_v2;
mod errors;
mod fedcmp;
mod golden;
mod local_dp;
mod privacy;
mod properties;
mod robust;
