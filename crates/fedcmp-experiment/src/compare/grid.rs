//! The tuning grid of every federated method (ALGORITHMS.md §5, §7.4):
//! typed strategy configs, most plausible first; `--grid N` takes the
//! first N of each, the same number for every method.
//!
//! Every method with a plain server step (FedAvg, FedProx, FedAvgM,
//! SCAFFOLD, FedNova, TIES, Fed-CMP and its ablations, the robust rules)
//! searches the same
//! server learning rates, [`SERVER_LRS`] (the harness's grid too), with
//! its other hyper-parameters at their defaults (momentum 0.9 for the
//! momentum methods: the grid's low server lrs are what offers them a
//! FedAvg-sized step); the adaptive server optimisers (FedAdagrad, FedAdam,
//! FedYogi), whose step has another scale, search their step size eta and
//! their adaptivity tau together over several decades, [`ADAPTIVE`].
//!
//! FedProx's mu is fixed a priori at [`FEDPROX_MU`]: its pull acts after
//! each AdamW step with strength `lr * mu` (decoupled, §7.6), and at the
//! learning rates of the research recipe (~1e-3) the paper's mu of
//! 0.001-1 would pull by at most 0.1% per step, leaving FedAvg; 10 pulls
//! by about 1% per step, a real but not dominant force over a round.
//!
//! The candidate rules of ALGORITHMS-NOTES.md ([`CANDIDATES`]) are
//! preset configurations of registry strategies, compared under their own
//! names on the same server-lr grid: `fedavgm-ema` (FedAvgM with the
//! bias-corrected EMA momentum, beta 0.9), `cra-temporal` (CRA at energy
//! 1, tau infinite, with the temporal gain, plain server step) and
//! `fed-cmp-ema-temporal` (both: the temporal gain under OPM's EMA form).

use fedcmp_strategy::config::StrategyConfig;
use fedcmp_strategy::cra::CraConfig;
use fedcmp_strategy::fedavg::FedAvgConfig;
use fedcmp_strategy::fedavgm::FedAvgMConfig;
use fedcmp_strategy::fednova::FedNovaConfig;
use fedcmp_strategy::fedopt::{FedAdagradConfig, FedAdaptiveConfig};
use fedcmp_strategy::fedprox::FedProxConfig;
use fedcmp_strategy::opm::{FedCmpConfig, OpmOnlyConfig};
use fedcmp_strategy::robust::krum::{self, KrumConfig};
use fedcmp_strategy::robust::median::{self, MedianConfig};
use fedcmp_strategy::robust::norm_bound::{self, NormBoundConfig};
use fedcmp_strategy::robust::trimmed_mean::{self, TrimmedMeanConfig};
use fedcmp_strategy::robust::ServerStep;
use fedcmp_strategy::scaffold::ScaffoldConfig;
use fedcmp_strategy::server_opt::MomentumForm;
use fedcmp_strategy::ties::TiesConfig;
use fedcmp_strategy::{cra, fedavg, fedavgm, fednova, fedopt, fedprox, opm, scaffold, ties};

/// Settings per method in the largest grid.
pub const MAX_GRID: usize = 4;

/// The server learning rates every plain-step method searches (§7.4:
/// a decade below 1 and above it), 1 first (a grid of one is untuned
/// FedAvg), then 0.1: with few merges a heavy-ball momentum of 0.9 at
/// server lr 0.1 takes about FedAvg's step, so momentum methods are
/// offered FedAvg's step as early as FedAvg is offered its own.
pub const SERVER_LRS: [f64; MAX_GRID] = [1.0, 0.1, 0.3, 2.0];

/// The (eta, tau) pairs the adaptive server optimisers search: eta over
/// three decades at tau = 1e-3 (adaptive), and one nearly plain step (tau
/// = 0.1, where eta / tau scales the mean update by about one).
pub const ADAPTIVE: [(f64, f64); MAX_GRID] =
    [(1e-2, 1e-3), (1e-1, 1e-1), (1e-3, 1e-3), (1e-1, 1e-3)];

/// FedProx's mu in the grid (see the module header).
pub const FEDPROX_MU: f64 = 10.0;

/// The candidate rules (see the module header), in report order.
pub const CANDIDATES: &[&str] = &[FEDAVGM_EMA, CRA_TEMPORAL, FED_CMP_EMA_TEMPORAL];
pub const FEDAVGM_EMA: &str = "fedavgm-ema";
pub const CRA_TEMPORAL: &str = "cra-temporal";
pub const FED_CMP_EMA_TEMPORAL: &str = "fed-cmp-ema-temporal";

/// A robust rule's plain server step at `server_lr`.
fn plain_step(server_lr: f64) -> ServerStep {
    ServerStep {
        server_lr,
        ..ServerStep::default()
    }
}

/// CRA with the temporal gain alone: every direction kept (energy 1),
/// data weights (tau infinite).
fn temporal_cra(server_lr: f64) -> CraConfig {
    CraConfig {
        energy: 1.0,
        tau: f64::INFINITY,
        gain: cra::Gain::Temporal,
        server_lr,
        ..CraConfig::default()
    }
}

/// The grid of the strategy or candidate called `name` (empty for unknown
/// names).
pub fn grid(name: &str) -> Vec<StrategyConfig> {
    let plain = |make: &dyn Fn(f64) -> StrategyConfig| SERVER_LRS.map(make).to_vec();
    let adaptive = |make: &dyn Fn(f64, f64) -> StrategyConfig| {
        ADAPTIVE.map(|(eta, tau)| make(eta, tau)).to_vec()
    };
    match name {
        fedavg::NAME => plain(&|server_lr| StrategyConfig::FedAvg(FedAvgConfig { server_lr })),
        fedprox::NAME => plain(&|server_lr| {
            StrategyConfig::FedProx(FedProxConfig {
                mu: FEDPROX_MU,
                server_lr,
            })
        }),
        fedavgm::NAME => plain(&|server_lr| {
            StrategyConfig::FedAvgM(FedAvgMConfig {
                server_lr,
                ..FedAvgMConfig::default()
            })
        }),
        scaffold::NAME => plain(&|server_lr| {
            StrategyConfig::Scaffold(ScaffoldConfig {
                server_lr,
                ..ScaffoldConfig::default()
            })
        }),
        fednova::NAME => plain(&|server_lr| StrategyConfig::FedNova(FedNovaConfig { server_lr })),
        ties::NAME => plain(&|server_lr| {
            StrategyConfig::Ties(TiesConfig {
                server_lr,
                ..TiesConfig::default()
            })
        }),
        opm::FED_CMP => plain(&|server_lr| {
            let d = FedCmpConfig::default();
            StrategyConfig::FedCmp(FedCmpConfig {
                cra: CraConfig {
                    server_lr,
                    ..d.cra.clone()
                },
                ..d
            })
        }),
        cra::CRA_ONLY => plain(&|server_lr| {
            StrategyConfig::CraOnly(CraConfig {
                server_lr,
                ..CraConfig::default()
            })
        }),
        opm::OPM_ONLY => plain(&|server_lr| {
            StrategyConfig::OpmOnly(OpmOnlyConfig {
                server_lr,
                ..OpmOnlyConfig::default()
            })
        }),
        fedopt::FEDADAGRAD => adaptive(&|server_lr, tau| {
            StrategyConfig::FedAdagrad(FedAdagradConfig {
                server_lr,
                tau,
                ..FedAdagradConfig::default()
            })
        }),
        fedopt::FEDADAM => adaptive(&|server_lr, tau| {
            StrategyConfig::FedAdam(FedAdaptiveConfig {
                server_lr,
                tau,
                ..FedAdaptiveConfig::default()
            })
        }),
        fedopt::FEDYOGI => adaptive(&|server_lr, tau| {
            StrategyConfig::FedYogi(FedAdaptiveConfig {
                server_lr,
                tau,
                ..FedAdaptiveConfig::default()
            })
        }),
        median::NAME => plain(&|server_lr| {
            StrategyConfig::Median(MedianConfig {
                step: plain_step(server_lr),
            })
        }),
        trimmed_mean::NAME => plain(&|server_lr| {
            StrategyConfig::TrimmedMean(TrimmedMeanConfig {
                step: plain_step(server_lr),
                ..TrimmedMeanConfig::default()
            })
        }),
        krum::NAME => plain(&|server_lr| {
            StrategyConfig::Krum(KrumConfig {
                step: plain_step(server_lr),
                ..KrumConfig::default()
            })
        }),
        norm_bound::NAME => plain(&|server_lr| {
            StrategyConfig::NormBound(NormBoundConfig {
                step: plain_step(server_lr),
                ..NormBoundConfig::default()
            })
        }),
        FEDAVGM_EMA => plain(&|server_lr| {
            StrategyConfig::FedAvgM(FedAvgMConfig {
                server_lr,
                momentum_form: MomentumForm::Ema,
                ..FedAvgMConfig::default()
            })
        }),
        CRA_TEMPORAL => plain(&|server_lr| StrategyConfig::CraOnly(temporal_cra(server_lr))),
        FED_CMP_EMA_TEMPORAL => plain(&|server_lr| {
            StrategyConfig::FedCmp(FedCmpConfig {
                cra: temporal_cra(server_lr),
                momentum_form: MomentumForm::Ema,
                ..FedCmpConfig::default()
            })
        }),
        _ => Vec::new(),
    }
}
