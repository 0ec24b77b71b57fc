//! Differential privacy for the federation's clients: the accountant of
//! the sampled Gaussian mechanism ([`accountant`]), the settings shared by
//! both modes ([`config`]), DP-FedAvg around a strategy, clipping before
//! aggregation and noise after it ([`central`]), and local DP, each site
//! clipping and noising its own update before it leaves ([`local`]).

pub mod accountant;
pub mod central;
pub mod config;
pub mod local;
