//! Differential privacy for the federation's clients: the accountant of
//! the sampled Gaussian mechanism ([`accountant`]) and DP-FedAvg around a
//! strategy, clipping before aggregation and noise after it
//! ([`central`]).

pub mod accountant;
pub mod central;
