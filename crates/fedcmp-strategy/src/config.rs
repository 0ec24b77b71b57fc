//! Which strategy to run, with its hyper-parameters: a serde enum tagged by
//! `name` (kebab-case fields, unknown fields rejected, every field
//! defaulted), validated with messages that name the field, and built into
//! a boxed [`Strategy`].
//!
//! ```toml
//! [strategy]
//! name = "fedadam"
//! server-lr = 0.01
//! beta1 = 0.9
//! ```
//!
//! Names: `fedavg`, `fedprox`, `fedavgm`, `fedadagrad`, `fedadam`,
//! `fedyogi`, `scaffold`, `fednova`, `ties`, `cra-only` (Fed-CMP's CRA
//! with a plain server step; `tau` may be `"inf"`), `fed-cmp` (CRA +
//! orthogonality-preserved momentum), `opm-only` (Fed-CMP at energy 1, tau
//! infinite), and the byzantine-robust rules `median`, `trimmed-mean`,
//! `krum`, `norm-bound`.

use serde::{Deserialize, Serialize};

use crate::cra::CraConfig;
use crate::fedavg::FedAvgConfig;
use crate::fedavgm::FedAvgMConfig;
use crate::fednova::FedNovaConfig;
use crate::fedopt::{FedAdagradConfig, FedAdaptiveConfig};
use crate::fedprox::FedProxConfig;
use crate::opm::{FedCmpConfig, OpmOnlyConfig};
use crate::robust::krum::{self, KrumConfig};
use crate::robust::median::{self, MedianConfig};
use crate::robust::norm_bound::{self, NormBoundConfig};
use crate::robust::trimmed_mean::{self, TrimmedMeanConfig};
use crate::scaffold::ScaffoldConfig;
use crate::ties::TiesConfig;
use crate::{cra, fedavg, fedavgm, fednova, fedopt, fedprox, opm, scaffold, ties};
use crate::{Result, Strategy};

/// Every config name, in a stable order (for help texts).
pub const NAMES: &[&str] = &[
    fedavg::NAME,
    fedprox::NAME,
    fedavgm::NAME,
    fedopt::FEDADAGRAD,
    fedopt::FEDADAM,
    fedopt::FEDYOGI,
    scaffold::NAME,
    fednova::NAME,
    ties::NAME,
    cra::CRA_ONLY,
    opm::FED_CMP,
    opm::OPM_ONLY,
    median::NAME,
    trimmed_mean::NAME,
    krum::NAME,
    norm_bound::NAME,
];

/// A strategy and its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", deny_unknown_fields)]
pub enum StrategyConfig {
    #[serde(rename = "fedavg")]
    FedAvg(FedAvgConfig),
    #[serde(rename = "fedprox")]
    FedProx(FedProxConfig),
    #[serde(rename = "fedavgm")]
    FedAvgM(FedAvgMConfig),
    #[serde(rename = "fedadagrad")]
    FedAdagrad(FedAdagradConfig),
    #[serde(rename = "fedadam")]
    FedAdam(FedAdaptiveConfig),
    #[serde(rename = "fedyogi")]
    FedYogi(FedAdaptiveConfig),
    #[serde(rename = "scaffold")]
    Scaffold(ScaffoldConfig),
    #[serde(rename = "fednova")]
    FedNova(FedNovaConfig),
    #[serde(rename = "ties")]
    Ties(TiesConfig),
    #[serde(rename = "cra-only")]
    CraOnly(CraConfig),
    #[serde(rename = "fed-cmp")]
    FedCmp(FedCmpConfig),
    #[serde(rename = "opm-only")]
    OpmOnly(OpmOnlyConfig),
    #[serde(rename = "median")]
    Median(MedianConfig),
    #[serde(rename = "trimmed-mean")]
    TrimmedMean(TrimmedMeanConfig),
    #[serde(rename = "krum")]
    Krum(KrumConfig),
    #[serde(rename = "norm-bound")]
    NormBound(NormBoundConfig),
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig::FedAvg(FedAvgConfig::default())
    }
}

impl StrategyConfig {
    /// The config name (`fedavg`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            StrategyConfig::FedAvg(_) => fedavg::NAME,
            StrategyConfig::FedProx(_) => fedprox::NAME,
            StrategyConfig::FedAvgM(_) => fedavgm::NAME,
            StrategyConfig::FedAdagrad(_) => fedopt::FEDADAGRAD,
            StrategyConfig::FedAdam(_) => fedopt::FEDADAM,
            StrategyConfig::FedYogi(_) => fedopt::FEDYOGI,
            StrategyConfig::Scaffold(_) => scaffold::NAME,
            StrategyConfig::FedNova(_) => fednova::NAME,
            StrategyConfig::Ties(_) => ties::NAME,
            StrategyConfig::CraOnly(_) => cra::CRA_ONLY,
            StrategyConfig::FedCmp(_) => opm::FED_CMP,
            StrategyConfig::OpmOnly(_) => opm::OPM_ONLY,
            StrategyConfig::Median(_) => median::NAME,
            StrategyConfig::TrimmedMean(_) => trimmed_mean::NAME,
            StrategyConfig::Krum(_) => krum::NAME,
            StrategyConfig::NormBound(_) => norm_bound::NAME,
        }
    }

    /// Checks every hyper-parameter (and the federation size).
    pub fn validate(&self, num_clients: usize) -> Result<()> {
        self.build(num_clients).map(|_| ())
    }

    /// Builds the strategy for a federation of `num_clients` clients (N,
    /// which SCAFFOLD needs), after validation.
    pub fn build(&self, num_clients: usize) -> Result<Box<dyn Strategy>> {
        Ok(match self {
            StrategyConfig::FedAvg(c) => Box::new(fedavg::fedavg(c)?),
            StrategyConfig::FedProx(c) => Box::new(fedprox::fedprox(c)?),
            StrategyConfig::FedAvgM(c) => Box::new(fedavgm::fedavgm(c)?),
            StrategyConfig::FedAdagrad(c) => Box::new(fedopt::fedadagrad(c)?),
            StrategyConfig::FedAdam(c) => Box::new(fedopt::fedadam(c)?),
            StrategyConfig::FedYogi(c) => Box::new(fedopt::fedyogi(c)?),
            StrategyConfig::Scaffold(c) => Box::new(scaffold::scaffold(c, num_clients)?),
            StrategyConfig::FedNova(c) => Box::new(fednova::fednova(c)?),
            StrategyConfig::Ties(c) => Box::new(ties::ties(c)?),
            StrategyConfig::CraOnly(c) => Box::new(cra::cra_only(c)?),
            StrategyConfig::FedCmp(c) => Box::new(opm::fed_cmp(c)?),
            StrategyConfig::OpmOnly(c) => Box::new(opm::opm_only(c)?),
            StrategyConfig::Median(c) => Box::new(median::median(c)?),
            StrategyConfig::TrimmedMean(c) => Box::new(trimmed_mean::trimmed_mean(c)?),
            StrategyConfig::Krum(c) => Box::new(krum::krum(c)?),
            StrategyConfig::NormBound(c) => Box::new(norm_bound::norm_bound(c)?),
        })
    }
}
