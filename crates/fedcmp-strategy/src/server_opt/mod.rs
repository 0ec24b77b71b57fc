//! Server optimisers: the step from an aggregated update (a
//! pseudo-gradient, `Delta = sum_k w_k (theta_k - theta_t)`, pointing
//! downhill) to the next global model, each with explicit, serialisable
//! state.
//!
//! - [`Sgd`]: `theta += eta_s Delta` (FedAvg's server step);
//! - [`HeavyBall`]: server momentum (FedAvgM), heavy-ball or a
//!   bias-corrected EMA ([`MomentumForm`]);
//! - [`Adaptive`]: Adagrad / Adam / Yogi as in Reddi et al. 2021.
//!
//! State tensors are f32 [`fedcmp_core::ParamSet`]s, exactly what
//! [`crate::StrategyState`] stores; each step reads them in f64, computes in
//! f64 and rounds the new state to f32, so a saved and reloaded optimiser
//! continues bit for bit.

mod adaptive;
mod momentum;
mod sgd;

pub use adaptive::{Adaptive, AdaptiveRule};
pub use momentum::{HeavyBall, MomentumForm};
pub use sgd::Sgd;
