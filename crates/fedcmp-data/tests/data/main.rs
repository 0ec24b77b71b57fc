//! The data crate's integration tests, in one binary: corpus readers,
//! the feature cache, partitioners and splits, scenarios.

mod cache;
mod corpus;
mod partition;
mod scenario;
