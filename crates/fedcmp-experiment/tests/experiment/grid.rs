//! The tuning grids follow the protocol (ALGORITHMS.md §7.4): every method
//! the same number of settings; every plain-step method the same server
//! learning rates, its other knobs at their defaults; the adaptive server
//! optimisers eta and tau over several decades.

use anyhow::Result;
use fedcmp_experiment::compare::grid::{
    grid, ADAPTIVE, CANDIDATES, FEDPROX_MU, MAX_GRID, SERVER_LRS,
};
use fedcmp_experiment::compare::Method;
use fedcmp_strategy::config::{StrategyConfig, NAMES};

/// (server lr, the config with its server lr set back to the default's).
fn server_lr_of(config: &StrategyConfig) -> Result<f64> {
    let value = serde_json::to_value(config)?;
    let lr = value["server-lr"].as_f64();
    lr.ok_or_else(|| anyhow::anyhow!("{config:?} has no server-lr"))
}

#[test]
fn plain_methods_share_the_server_lr_grid_adaptive_ones_span_decades() -> Result<()> {
    let adaptive = ["fedadagrad", "fedadam", "fedyogi"];
    for name in NAMES {
        let settings = grid(name);
        assert_eq!(settings.len(), MAX_GRID, "{name}");
        for config in &settings {
            assert_eq!(config.name(), *name);
            config.validate(4)?;
        }
        let lrs: Vec<f64> = settings.iter().map(server_lr_of).collect::<Result<_>>()?;
        if adaptive.contains(name) {
            let taus: Vec<f64> = settings
                .iter()
                .map(|c| serde_json::to_value(c).map(|v| v["tau"].as_f64().unwrap_or(f64::NAN)))
                .collect::<Result<_, _>>()?;
            let pairs: Vec<(f64, f64)> = lrs.into_iter().zip(taus).collect();
            assert_eq!(pairs, ADAPTIVE.to_vec(), "{name}");
        } else {
            assert_eq!(lrs, SERVER_LRS.to_vec(), "{name}");
            // Apart from the server lr, the method's defaults.
            let default: StrategyConfig =
                serde_json::from_value(serde_json::json!({ "name": name }))?;
            let mut expected = serde_json::to_value(&default)?;
            if *name == "fedprox" {
                expected["mu"] = serde_json::json!(FEDPROX_MU);
            }
            for config in &settings {
                let mut v = serde_json::to_value(config)?;
                v["server-lr"] = expected["server-lr"].clone();
                assert_eq!(v, expected, "{name}");
            }
        }
    }
    // The shared server lrs: 1 first (a grid of one is untuned), a decade
    // below 1 and a step above it (ALGORITHMS.md §7.4).
    assert_eq!(SERVER_LRS[0], 1.0);
    let (lo, hi) = SERVER_LRS
        .iter()
        .fold((f64::MAX, 0.0f64), |(l, h), e| (l.min(*e), h.max(*e)));
    assert!(lo <= 0.1 && hi > 1.0, "{SERVER_LRS:?}");
    // eta spans three decades.
    let etas: Vec<f64> = ADAPTIVE.iter().map(|(e, _)| *e).collect();
    let (lo, hi) = etas
        .iter()
        .fold((f64::MAX, 0.0f64), |(l, h), e| (l.min(*e), h.max(*e)));
    assert!(hi / lo >= 100.0, "{etas:?}");
    Ok(())
}

#[test]
fn methods_come_from_the_strategy_registry() -> Result<()> {
    let all = Method::all();
    assert_eq!(all.len(), NAMES.len() + 3);
    for name in NAMES {
        assert_eq!(Method::parse(name)?.name(), *name);
    }
    for reference in ["centralized", "local-only", "init"] {
        assert!(Method::parse(reference)?.is_reference());
    }
    // The candidates run when named, each on the shared server-lr grid.
    assert_eq!(Method::known().len(), all.len() + CANDIDATES.len());
    for name in CANDIDATES {
        let m = Method::parse(name)?;
        assert!(!all.contains(&m) && !m.is_reference());
        let settings = grid(name);
        for config in &settings {
            config.validate(4)?;
        }
        let lrs: Vec<f64> = settings.iter().map(server_lr_of).collect::<Result<_>>()?;
        assert_eq!(lrs, SERVER_LRS.to_vec(), "{name}");
    }
    let unknown = Method::parse("fedsgd")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        unknown.contains("fedsgd") && unknown.contains("fed-cmp"),
        "{unknown}"
    );
    Ok(())
}
