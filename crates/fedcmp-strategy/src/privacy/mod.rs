//! Differential privacy for the federation's clients (issue 30): the
//! accountant of the sampled Gaussian mechanism ([`accountant`]). The
//! privacy wrapper around a strategy (clipping before aggregation, noise
//! after it) builds on it.

pub mod accountant;
