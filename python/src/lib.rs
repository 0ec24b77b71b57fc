//! The native part of the `fedcmp` Python package (`fedcmp._native`):
//! fedcmp's own strategies, a site's client node and the server's round
//! loop, for a Python transport (Flower). The Python side moves messages;
//! every decision (sampling, deadline, quorum, validation of updates,
//! aggregation, checkpoints, local training) is the Rust code that the
//! simulation runs.
//!
//! Messages cross the boundary in the wire form of `fedcmp_core::wire`: a
//! JSON header and a list of `(name, shape, bytes)` arrays, the bytes
//! little-endian f32, so parameters arrive bit for bit. Parameter sets
//! outside a message (a strategy's global model) use the same array list
//! with plain parameter names.
//!
//! Without the `extension` feature (as in `cargo test --workspace`) this
//! crate is empty and needs no Python.

#[cfg(feature = "extension")]
mod native;
