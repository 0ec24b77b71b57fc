//! Configuration: names, defaults, unknown fields, validation messages.

use fedcmp_core::{ClientId, LocalObjective};
use fedcmp_strategy::config::NAMES;
use fedcmp_strategy::StrategyConfig;

use crate::common::{config, TestResult};

#[test]
fn every_name_builds_with_defaults() -> TestResult {
    for name in NAMES {
        let c = config(&format!(r#"{{"name": "{name}"}}"#))?;
        assert_eq!(c.name(), *name);
        let s = c.build(10)?;
        assert_eq!(s.name(), *name);
        // Serialising and parsing again gives the same config.
        let again: StrategyConfig = serde_json::from_str(&serde_json::to_string(&c)?)?;
        assert_eq!(again, c);
    }
    assert_eq!(StrategyConfig::default().name(), "fedavg");
    Ok(())
}

#[test]
fn instructions_are_typed() -> TestResult {
    let ids = [ClientId(3), ClientId(1)];
    let plain = config(r#"{"name": "fedadam"}"#)?.build(4)?;
    let i = plain.configure_round(7, &ids);
    assert_eq!(i.len(), 2);
    assert_eq!(
        (i[0].round, i[0].client, &i[0].objective),
        (7, ClientId(3), &LocalObjective::Plain)
    );
    assert_eq!(i[1].client, ClientId(1));
    let prox = config(r#"{"name": "fedprox", "mu": 0.5}"#)?.build(4)?;
    assert_eq!(
        prox.configure_round(0, &ids)[0].objective,
        LocalObjective::Proximal { mu: 0.5 }
    );
    let scaffold = config(r#"{"name": "scaffold"}"#)?.build(4)?;
    assert!(matches!(
        &scaffold.configure_round(0, &ids)[0].objective,
        LocalObjective::Scaffold { server_control } if server_control.is_empty()
    ));
    Ok(())
}

#[test]
fn unknown_names_and_fields_are_rejected() {
    for bad in [
        r#"{"name": "fedsgd"}"#,
        r#"{"name": "fedavg", "server_lr": 1.0}"#,
        r#"{"name": "fedavg", "momentum": 0.9}"#,
        r#"{"name": "fedadagrad", "beta2": 0.99}"#,
        r#"{"name": "scaffold", "weighting": "by-loss"}"#,
        r#"{"server-lr": 1.0}"#,
    ] {
        let err = serde_json::from_str::<StrategyConfig>(bad);
        assert!(err.is_err(), "{bad} was accepted: {err:?}");
    }
    let msg = serde_json::from_str::<StrategyConfig>(r#"{"name": "fedavg", "server_lr": 1.0}"#)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("unknown field `server_lr`"), "{msg}");
}

#[test]
fn validation_names_the_field() -> TestResult {
    let cases = [
        (
            r#"{"name": "fedavg", "server-lr": 0}"#,
            "`server-lr` must be > 0, got 0",
        ),
        (
            r#"{"name": "fedprox", "mu": -1}"#,
            "`mu` must be >= 0, got -1",
        ),
        (
            r#"{"name": "fedavgm", "momentum": 1.0}"#,
            "`momentum` must be in [0, 1), got 1",
        ),
        (
            r#"{"name": "fedadam", "beta2": 1.5}"#,
            "`beta2` must be in [0, 1), got 1.5",
        ),
        (
            r#"{"name": "fedyogi", "beta1": -0.1}"#,
            "`beta1` must be in [0, 1), got -0.1",
        ),
        (
            r#"{"name": "fedadagrad", "tau": 0}"#,
            "`tau` must be > 0, got 0",
        ),
        (
            r#"{"name": "ties", "top-k-percent": 0}"#,
            "`top-k-percent` must be in (0, 100], got 0",
        ),
        (
            r#"{"name": "ties", "top-k-percent": 150}"#,
            "`top-k-percent` must be in (0, 100], got 150",
        ),
        (
            r#"{"name": "fednova", "server-lr": -2}"#,
            "`server-lr` must be > 0, got -2",
        ),
    ];
    for (json, want) in cases {
        let c = config(json)?;
        let msg = c
            .validate(5)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            msg,
            format!("invalid strategy configuration: {want}"),
            "{json}"
        );
        assert!(c.build(5).is_err());
    }
    let msg = config(r#"{"name": "scaffold"}"#)?
        .build(0)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("`num_clients` must be at least 1"), "{msg}");
    Ok(())
}
