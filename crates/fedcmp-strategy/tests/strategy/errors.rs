//! Error cases: every one names what is wrong (and the client where there
//! is one), and a failed round leaves the strategy's state unchanged.

use fedcmp_core::{ClientId, ParamSet};
use fedcmp_strategy::{StrategyError, StrategyState};

use crate::common::{all_configs, build, config, params, update, wb, TestResult};

fn global() -> TestResult<ParamSet> {
    wb(2, 3, &[0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.01, -0.02])
}

fn client(id: u32, shift: f32, samples: u64) -> TestResult<fedcmp_core::ClientUpdate> {
    let g = global()?;
    let values: Vec<f32> = g
        .flat()
        .enumerate()
        .map(|(i, v)| v + shift * (i as f32 - 3.0))
        .collect();
    let mut u = update(id, wb(2, 3, &values)?, samples, 3);
    u.control_delta = Some(wb(2, 3, &[0.01; 8])?);
    Ok(u)
}

#[test]
fn empty_updates_are_refused() -> TestResult {
    for c in all_configs()? {
        let err = build(&c)?.aggregate(4, &global()?, &[]);
        assert_eq!(err, Err(StrategyError::NoUpdates { round: 4 }), "{c:?}");
    }
    Ok(())
}

#[test]
fn a_mismatched_layout_names_the_client() -> TestResult {
    let bad = params(&[
        ("w", vec![3, 2], vec![0.0; 6]),
        ("b", vec![2], vec![0.0; 2]),
    ])?;
    let renamed = params(&[
        ("w", vec![2, 3], vec![0.0; 6]),
        ("bias", vec![2], vec![0.0; 2]),
    ])?;
    for c in all_configs()? {
        for wrong in [&bad, &renamed] {
            let updates = vec![client(1, 0.01, 5)?, update(7, wrong.clone(), 5, 3)];
            let err = build(&c)?.aggregate(0, &global()?, &updates);
            let Err(e @ StrategyError::LayoutMismatch { client, .. }) = err else {
                panic!("{c:?}: {err:?}");
            };
            assert_eq!(client, ClientId(7));
            let msg = e.to_string();
            assert!(msg.starts_with("client 7:"), "{msg}");
        }
    }
    let msg = build(&config(r#"{"name": "fedavg"}"#)?)?
        .aggregate(0, &global()?, &[update(7, bad, 5, 3)])
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        msg.as_deref(),
        Some("client 7: parameters do not match the global model: parameter `w`: shape [3, 2] does not match [2, 3]")
    );
    Ok(())
}

#[test]
fn nan_in_an_update_names_client_and_parameter() -> TestResult {
    for c in all_configs()? {
        let mut u = client(3, 0.02, 5)?;
        let mut values: Vec<f32> = u.params.flat().collect();
        values[7] = f32::NAN; // in `b`
        u.params = wb(2, 3, &values)?;
        let updates = vec![client(0, 0.01, 4)?, u];
        let err = build(&c)?.aggregate(0, &global()?, &updates);
        assert_eq!(
            err,
            Err(StrategyError::NonFinite {
                client: ClientId(3),
                parameter: "b".to_string()
            }),
            "{c:?}"
        );
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(msg, "client 3: non-finite value in `b`");

        let mut u = client(2, 0.02, 5)?;
        u.mean_loss = f64::INFINITY;
        let err = build(&c)?.aggregate(0, &global()?, &[u]);
        assert!(
            matches!(err, Err(StrategyError::NonFinite { client: ClientId(2), ref parameter }) if parameter == "mean_loss"),
            "{c:?}: {err:?}"
        );
    }
    Ok(())
}

#[test]
fn other_invalid_rounds() -> TestResult {
    let g = global()?;
    let fedavg = config(r#"{"name": "fedavg"}"#)?;
    // The same client twice.
    let err = build(&fedavg)?.aggregate(0, &g, &[client(4, 0.1, 3)?, client(4, 0.2, 3)?]);
    assert_eq!(
        err,
        Err(StrategyError::DuplicateClient {
            client: ClientId(4)
        })
    );
    // No samples at all.
    let err = build(&fedavg)?.aggregate(2, &g, &[client(0, 0.1, 0)?, client(1, 0.2, 0)?]);
    assert_eq!(err, Err(StrategyError::NoSamples { round: 2 }));
    // A non-finite global model.
    let bad = wb(2, 3, &[0.0, 0.0, f32::INFINITY, 0.0, 0.0, 0.0, 0.0, 0.0])?;
    let err = build(&fedavg)?.aggregate(0, &bad, &[client(0, 0.1, 3)?]);
    assert!(
        matches!(err, Err(StrategyError::NonFiniteGlobal { ref parameter }) if parameter == "w")
    );
    // FedNova divides by the effective step.
    let mut u = client(5, 0.1, 3)?;
    u.lr_sum = f64::NAN;
    let err = build(&config(r#"{"name": "fednova"}"#)?)?.aggregate(0, &g, &[u]);
    assert!(
        matches!(
            err,
            Err(StrategyError::InvalidUpdate {
                client: ClientId(5),
                ..
            })
        ),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn scaffold_needs_valid_control_deltas() -> TestResult {
    let g = global()?;
    let scaffold = config(r#"{"name": "scaffold"}"#)?;
    let mut u = client(6, 0.1, 3)?;
    u.control_delta = None;
    let err = build(&scaffold)?.aggregate(0, &g, &[client(1, 0.1, 3)?, u]);
    let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.starts_with("client 6: SCAFFOLD needs `control_delta`"),
        "{msg}"
    );

    let mut u = client(6, 0.1, 3)?;
    u.control_delta = Some(wb(2, 3, &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, f32::NAN])?);
    let err = build(&scaffold)?.aggregate(0, &g, &[u]);
    assert_eq!(
        err,
        Err(StrategyError::NonFinite {
            client: ClientId(6),
            parameter: "control_delta.b".to_string()
        })
    );

    let mut u = client(6, 0.1, 3)?;
    u.control_delta = Some(wb(3, 2, &[0.0; 9])?);
    let msg = build(&scaffold)?
        .aggregate(0, &g, &[u])
        .err()
        .map(|e| e.to_string());
    assert!(msg
        .unwrap_or_default()
        .contains("client 6: `control_delta` does not match"));

    // More participants than the federation has.
    let small = scaffold.build(2)?;
    let mut small = small;
    let updates = [client(0, 0.1, 3)?, client(1, 0.1, 3)?, client(2, 0.1, 3)?];
    assert_eq!(
        small.aggregate(0, &g, &updates),
        Err(StrategyError::TooManyClients {
            round: 0,
            participants: 3,
            total: 2
        })
    );
    Ok(())
}

#[test]
fn a_failed_round_leaves_the_state_unchanged() -> TestResult {
    let g = global()?;
    for c in all_configs()? {
        let mut s = build(&c)?;
        let ok = s.aggregate(0, &g, &[client(0, 0.05, 3)?, client(1, -0.02, 9)?])?;
        let before = s.state();
        let mut bad = client(2, 0.01, 3)?;
        bad.params = wb(2, 3, &[f32::NAN; 8])?;
        assert!(s
            .aggregate(1, &ok.params, &[client(0, 0.05, 3)?, bad])
            .is_err());
        assert_eq!(s.state(), before, "{c:?}");
    }
    // A server step that overflows f32 is refused, state untouched.
    let mut s = build(&config(r#"{"name": "fedavgm", "server-lr": 1e300}"#)?)?;
    let before = s.state();
    let err = s.aggregate(0, &g, &[client(0, 0.5, 3)?]);
    assert!(
        matches!(err, Err(StrategyError::NonFiniteResult { .. })),
        "{err:?}"
    );
    assert_eq!(s.state(), before);
    Ok(())
}

#[test]
fn load_state_checks_what_it_loads() -> TestResult {
    let g = global()?;
    let mut adam = build(&config(r#"{"name": "fedadam"}"#)?)?;
    adam.aggregate(0, &g, &[client(0, 0.05, 3)?])?;
    let state = adam.state();
    assert_eq!(state.algorithm, "fedadam");
    assert_eq!(state.step, 1);
    assert_eq!(
        state.tensors.keys().collect::<Vec<_>>(),
        ["first_moment", "second_moment"]
    );

    // Another algorithm's state.
    let mut yogi = build(&config(r#"{"name": "fedyogi"}"#)?)?;
    let err = yogi.load_state(state.clone());
    assert!(matches!(err, Err(StrategyError::State { .. })), "{err:?}");

    // Keys nobody knows.
    let mut extra = state.clone();
    extra.tensors.insert("velocity".to_string(), g.clone());
    let err = build(&config(r#"{"name": "fedadam"}"#)?)?.load_state(extra);
    let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("velocity"), "{msg}");

    // A state whose tensors do not fit the model fails at the next round.
    let mut wrong = state;
    wrong
        .tensors
        .insert("first_moment".to_string(), wb(3, 2, &[0.0; 9])?);
    let mut s = build(&config(r#"{"name": "fedadam"}"#)?)?;
    s.load_state(wrong)?;
    let err = s.aggregate(1, &g, &[client(0, 0.05, 3)?]);
    assert!(
        matches!(err, Err(StrategyError::StateLayout { ref key, .. }) if key == "first_moment"),
        "{err:?}"
    );

    // A fresh state resets a used strategy.
    let mut used = build(&config(r#"{"name": "fedavgm"}"#)?)?;
    used.aggregate(0, &g, &[client(0, 0.05, 3)?])?;
    used.load_state(StrategyState::new("fedavgm", 0))?;
    assert_eq!(used.state(), StrategyState::new("fedavgm", 0));
    Ok(())
}
