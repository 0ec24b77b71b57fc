//! The typed tuning grids are the grids the earlier comparison ran, written
//! then as JSON strings: the same configs, value for value.

use anyhow::Result;
use fedcmp_experiment::compare::grid::{grid, MAX_GRID};
use fedcmp_experiment::compare::Method;
use fedcmp_strategy::config::{StrategyConfig, NAMES};

#[test]
fn typed_grids_equal_the_earlier_json_grids() -> Result<()> {
    let lrs = |name: &str, values: [&str; 4]| -> Vec<String> {
        values
            .iter()
            .map(|v| format!(r#"{{"name": "{name}", "server-lr": {v}}}"#))
            .collect()
    };
    let earlier = |method: &str| -> Vec<String> {
        match method {
            "fedavg" | "scaffold" | "fednova" => lrs(method, ["1.0", "1.5", "0.7", "2.0"]),
            "fedadagrad" | "fedadam" | "fedyogi" => lrs(method, ["1e-3", "3e-3", "1e-2", "3e-4"]),
            "fedprox" => ["0.01", "0.1", "0.001", "1.0"]
                .iter()
                .map(|mu| format!(r#"{{"name": "fedprox", "mu": {mu}}}"#))
                .collect(),
            "fedavgm" => [
                r#"{"name": "fedavgm", "momentum": 0.9}"#,
                r#"{"name": "fedavgm", "momentum": 0.5}"#,
                r#"{"name": "fedavgm", "momentum": 0.9, "server-lr": 0.5}"#,
                r#"{"name": "fedavgm", "momentum": 0.7}"#,
            ]
            .map(String::from)
            .to_vec(),
            "ties" => ["20", "50", "10", "80"]
                .iter()
                .map(|k| format!(r#"{{"name": "ties", "top-k-percent": {k}}}"#))
                .collect(),
            "fed-cmp" => [
                r#"{"name": "fed-cmp"}"#,
                r#"{"name": "fed-cmp", "energy": 0.9, "beta": 0.5}"#,
                r#"{"name": "fed-cmp", "tau": 0.5}"#,
                r#"{"name": "fed-cmp", "energy": 0.99, "beta": 0.7}"#,
            ]
            .map(String::from)
            .to_vec(),
            "cra-only" => [
                r#"{"name": "cra-only"}"#,
                r#"{"name": "cra-only", "energy": 0.9}"#,
                r#"{"name": "cra-only", "tau": 0.5}"#,
                r#"{"name": "cra-only", "energy": 0.99, "residual-weight": 0.5}"#,
            ]
            .map(String::from)
            .to_vec(),
            "opm-only" => ["0.9", "0.5", "0.7", "0.95"]
                .iter()
                .map(|b| format!(r#"{{"name": "opm-only", "beta": {b}}}"#))
                .collect(),
            _ => Vec::new(),
        }
    };
    for name in NAMES {
        let typed = grid(name);
        assert_eq!(typed.len(), MAX_GRID, "{name}");
        let parsed: Vec<StrategyConfig> = earlier(name)
            .iter()
            .map(|t| serde_json::from_str(t))
            .collect::<Result<_, _>>()?;
        assert_eq!(typed, parsed, "{name}");
        for config in &typed {
            assert_eq!(config.name(), *name);
            config.validate(4)?;
        }
    }
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
