//! The tuning grid of every federated method (ALGORITHMS.md §5): typed
//! strategy configs, most plausible first; `--grid N` takes the first N of
//! each, the same number for every method.

use fedcmp_strategy::config::StrategyConfig;
use fedcmp_strategy::cra::CraConfig;
use fedcmp_strategy::fedavg::FedAvgConfig;
use fedcmp_strategy::fedavgm::FedAvgMConfig;
use fedcmp_strategy::fednova::FedNovaConfig;
use fedcmp_strategy::fedopt::{FedAdagradConfig, FedAdaptiveConfig};
use fedcmp_strategy::fedprox::FedProxConfig;
use fedcmp_strategy::opm::{FedCmpConfig, OpmOnlyConfig};
use fedcmp_strategy::scaffold::ScaffoldConfig;
use fedcmp_strategy::ties::TiesConfig;
use fedcmp_strategy::{cra, fedavg, fedavgm, fednova, fedopt, fedprox, opm, scaffold, ties};

/// Settings per method in the largest grid.
pub const MAX_GRID: usize = 4;

/// The grid of the strategy called `name` (empty for unknown names).
pub fn grid(name: &str) -> Vec<StrategyConfig> {
    // Plain server steps, around 1.
    const PLAIN_LRS: [f64; 4] = [1.0, 1.5, 0.7, 2.0];
    // Adaptive server optimisers take small steps.
    const ADAPTIVE_LRS: [f64; 4] = [1e-3, 3e-3, 1e-2, 3e-4];
    match name {
        fedavg::NAME => PLAIN_LRS
            .map(|server_lr| StrategyConfig::FedAvg(FedAvgConfig { server_lr }))
            .to_vec(),
        scaffold::NAME => PLAIN_LRS
            .map(|server_lr| {
                StrategyConfig::Scaffold(ScaffoldConfig {
                    server_lr,
                    ..ScaffoldConfig::default()
                })
            })
            .to_vec(),
        fednova::NAME => PLAIN_LRS
            .map(|server_lr| StrategyConfig::FedNova(FedNovaConfig { server_lr }))
            .to_vec(),
        fedopt::FEDADAGRAD => ADAPTIVE_LRS
            .map(|server_lr| {
                StrategyConfig::FedAdagrad(FedAdagradConfig {
                    server_lr,
                    ..FedAdagradConfig::default()
                })
            })
            .to_vec(),
        fedopt::FEDADAM | fedopt::FEDYOGI => ADAPTIVE_LRS
            .map(|server_lr| {
                let c = FedAdaptiveConfig {
                    server_lr,
                    ..FedAdaptiveConfig::default()
                };
                if name == fedopt::FEDADAM {
                    StrategyConfig::FedAdam(c)
                } else {
                    StrategyConfig::FedYogi(c)
                }
            })
            .to_vec(),
        fedprox::NAME => [0.01, 0.1, 0.001, 1.0]
            .map(|mu| {
                StrategyConfig::FedProx(FedProxConfig {
                    mu,
                    ..FedProxConfig::default()
                })
            })
            .to_vec(),
        fedavgm::NAME => [(0.9, 1.0), (0.5, 1.0), (0.9, 0.5), (0.7, 1.0)]
            .map(|(momentum, server_lr)| {
                StrategyConfig::FedAvgM(FedAvgMConfig {
                    momentum,
                    server_lr,
                    ..FedAvgMConfig::default()
                })
            })
            .to_vec(),
        ties::NAME => [20.0, 50.0, 10.0, 80.0]
            .map(|top_k_percent| {
                StrategyConfig::Ties(TiesConfig {
                    top_k_percent,
                    ..TiesConfig::default()
                })
            })
            .to_vec(),
        opm::FED_CMP => {
            let d = FedCmpConfig::default();
            let with = |energy: Option<f64>, tau: Option<f64>, beta: Option<f64>| {
                StrategyConfig::FedCmp(FedCmpConfig {
                    cra: CraConfig {
                        energy: energy.unwrap_or(d.cra.energy),
                        tau: tau.unwrap_or(d.cra.tau),
                        ..d.cra.clone()
                    },
                    beta: beta.unwrap_or(d.beta),
                    ..d.clone()
                })
            };
            vec![
                with(None, None, None),
                with(Some(0.9), None, Some(0.5)),
                with(None, Some(0.5), None),
                with(Some(0.99), None, Some(0.7)),
            ]
        }
        cra::CRA_ONLY => {
            let d = CraConfig::default();
            let with = |energy: Option<f64>, tau: Option<f64>, residual: Option<f64>| {
                StrategyConfig::CraOnly(CraConfig {
                    energy: energy.unwrap_or(d.energy),
                    tau: tau.unwrap_or(d.tau),
                    residual_weight: residual.unwrap_or(d.residual_weight),
                    ..d.clone()
                })
            };
            vec![
                with(None, None, None),
                with(Some(0.9), None, None),
                with(None, Some(0.5), None),
                with(Some(0.99), None, Some(0.5)),
            ]
        }
        opm::OPM_ONLY => [0.9, 0.5, 0.7, 0.95]
            .map(|beta| {
                StrategyConfig::OpmOnly(OpmOnlyConfig {
                    beta,
                    ..OpmOnlyConfig::default()
                })
            })
            .to_vec(),
        _ => Vec::new(),
    }
}
