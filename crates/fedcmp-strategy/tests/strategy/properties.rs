//! Properties every strategy must have, checked on random federations:
//! client order does not matter (bit for bit); a lone client, or clients
//! that all agree, get their own model back (FedAvg family, server lr 1,
//! fresh state); FedProx with mu = 0 is FedAvg; a state saved through JSON
//! and loaded into a fresh strategy continues bit for bit.

use fedcmp_core::{ClientId, ClientUpdate, LocalObjective, ParamSet};
use fedcmp_strategy::{StrategyConfig, StrategyState};
use proptest::prelude::*;

use crate::common::{
    aggregate_bits, all_configs, bits, build, config, identity_configs, shifted, wb, TestResult,
    NUM_CLIENTS,
};

#[derive(Debug, Clone)]
struct ClientSpec {
    id: u32,
    delta: Vec<f32>,
    control: Vec<f32>,
    samples: u64,
    steps: u64,
    loss: f64,
}

#[derive(Debug, Clone)]
struct Scenario {
    rows: usize,
    cols: usize,
    global: Vec<f32>,
    rounds: Vec<Vec<ClientSpec>>,
    /// A seed per round for permuting the updates.
    shuffles: Vec<u64>,
}

impl Scenario {
    fn global(&self) -> TestResult<ParamSet> {
        wb(self.rows, self.cols, &self.global)
    }

    /// The round's updates, relative to `global`, in generated order.
    fn updates(&self, round: usize, global: &ParamSet) -> TestResult<Vec<ClientUpdate>> {
        let mut out = Vec::new();
        for c in &self.rounds[round] {
            out.push(ClientUpdate {
                client: ClientId(c.id),
                params: shifted(global, &c.delta)?,
                num_samples: c.samples,
                num_steps: c.steps,
                lr_sum: 0.01 * c.steps as f64,
                mean_loss: c.loss,
                control_delta: Some(wb(self.rows, self.cols, &c.control)?),
            });
        }
        Ok(out)
    }
}

fn arb_round(n: usize, min_k: usize, max_k: usize) -> impl Strategy<Value = Vec<ClientSpec>> {
    let ids: Vec<u32> = (0..NUM_CLIENTS as u32).collect();
    prop::sample::subsequence(ids, min_k..=max_k).prop_flat_map(move |ids| {
        let k = ids.len();
        let client = (
            prop::collection::vec(-0.5f32..0.5, n),
            prop::collection::vec(-0.1f32..0.1, n),
            1u64..50,
            1u64..10,
            0.0f64..5.0,
        );
        prop::collection::vec(client, k).prop_map(move |specs| {
            ids.iter()
                .zip(specs)
                .map(|(&id, (delta, control, samples, steps, loss))| ClientSpec {
                    id,
                    delta,
                    control,
                    samples,
                    steps,
                    loss,
                })
                .collect()
        })
    })
}

fn arb_scenario(rounds: usize, min_k: usize, max_k: usize) -> impl Strategy<Value = Scenario> {
    (1usize..4, 1usize..5).prop_flat_map(move |(rows, cols)| {
        let n = rows * cols + rows;
        (
            prop::collection::vec(-1.0f32..1.0, n),
            prop::collection::vec(arb_round(n, min_k, max_k), rounds),
            prop::collection::vec(any::<u64>(), rounds),
        )
            .prop_map(move |(global, rounds, shuffles)| Scenario {
                rows,
                cols,
                global,
                rounds,
                shuffles,
            })
    })
}

/// A deterministic Fisher-Yates shuffle driven by a 64-bit LCG.
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let j = ((seed >> 33) % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

fn to_case_error(e: Box<dyn std::error::Error>) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

fn order_does_not_matter(s: &Scenario, config: &StrategyConfig) -> TestResult {
    let mut a = build(config)?;
    let mut b = build(config)?;
    let (mut ga, mut gb) = (s.global()?, s.global()?);
    for (r, &seed) in s.shuffles.iter().enumerate() {
        let ua = s.updates(r, &ga)?;
        let mut ub = s.updates(r, &gb)?;
        shuffle(&mut ub, seed);
        let oa = a.aggregate(r as u64, &ga, &ua)?;
        let ob = b.aggregate(r as u64, &gb, &ub)?;
        assert_eq!(
            aggregate_bits(&oa),
            aggregate_bits(&ob),
            "{config:?} round {r}"
        );
        (ga, gb) = (oa.params, ob.params);
    }
    assert_eq!(a.state(), b.state());
    Ok(())
}

/// Every client sends the same model: all get it back. The check allows
/// a few f32 ulps: the data weights `n_k / n` need not sum to exactly 1.
fn agreement_returns_the_model(s: &Scenario, config: &StrategyConfig) -> TestResult {
    let global = s.global()?;
    let mut updates = s.updates(0, &global)?;
    let common = updates[0].params.clone();
    let (steps, lr_sum) = (updates[0].num_steps, updates[0].lr_sum);
    for u in &mut updates {
        u.params = common.clone();
        u.num_steps = steps;
        u.lr_sum = lr_sum;
    }
    let out = build(config)?.aggregate(0, &global, &updates)?;
    if updates.len() == 1 {
        assert_eq!(bits(&out.params), bits(&common), "{config:?}: lone client");
    } else {
        for (x, y) in out.params.flat().zip(common.flat()) {
            assert!((x - y).abs() <= 1e-6, "{config:?}: {x} vs {y}");
        }
    }
    Ok(())
}

fn fedprox_mu0_is_fedavg(s: &Scenario, server_lr: f64) -> TestResult {
    let mut prox = build(&config(&format!(
        r#"{{"name": "fedprox", "mu": 0.0, "server-lr": {server_lr}}}"#
    ))?)?;
    let mut avg = build(&config(&format!(
        r#"{{"name": "fedavg", "server-lr": {server_lr}}}"#
    ))?)?;
    let mut g = s.global()?;
    for r in 0..s.rounds.len() {
        let ids: Vec<ClientId> = s.rounds[r].iter().map(|c| ClientId(c.id)).collect();
        for i in prox.configure_round(r as u64, &ids) {
            assert_eq!(i.objective, LocalObjective::Proximal { mu: 0.0 });
        }
        let u = s.updates(r, &g)?;
        let (op, oa) = (
            prox.aggregate(r as u64, &g, &u)?,
            avg.aggregate(r as u64, &g, &u)?,
        );
        assert_eq!(aggregate_bits(&op), aggregate_bits(&oa));
        g = op.params;
    }
    Ok(())
}

fn save_load_continues_bit_for_bit(s: &Scenario, config: &StrategyConfig) -> TestResult {
    let mut straight = build(config)?;
    let mut first = build(config)?;
    let mut g = s.global()?;
    let u0 = s.updates(0, &g)?;
    let o0 = straight.aggregate(0, &g, &u0)?;
    assert_eq!(
        aggregate_bits(&o0),
        aggregate_bits(&first.aggregate(0, &g, &u0)?)
    );
    g = o0.params;

    let saved = first.state();
    let json = serde_json::to_string(&saved)?;
    let restored_state: StrategyState = serde_json::from_str(&json)?;
    assert_eq!(restored_state, saved, "the state survives JSON");
    let mut resumed = build(config)?;
    resumed.load_state(restored_state)?;
    assert_eq!(resumed.state(), saved);

    for r in 1..s.rounds.len() {
        let ids: Vec<ClientId> = s.rounds[r].iter().map(|c| ClientId(c.id)).collect();
        assert_eq!(
            straight.configure_round(r as u64, &ids),
            resumed.configure_round(r as u64, &ids)
        );
        let u = s.updates(r, &g)?;
        let a = straight.aggregate(r as u64, &g, &u)?;
        let b = resumed.aggregate(r as u64, &g, &u)?;
        assert_eq!(
            aggregate_bits(&a),
            aggregate_bits(&b),
            "{config:?} round {r}"
        );
        g = a.params;
    }
    assert_eq!(straight.state(), resumed.state());
    Ok(())
}

/// Adaptive optimisers do not return the client model, but their first
/// step moves every coordinate in the direction of the mean delta.
fn adaptive_first_step_follows_the_delta(s: &Scenario, config: &StrategyConfig) -> TestResult {
    let global = s.global()?;
    let updates = s.updates(0, &global)?;
    let out = build(config)?.aggregate(0, &global, &updates)?;
    let weights = &out.metrics.series["client_weights"];
    let mut sorted: Vec<&ClientUpdate> = updates.iter().collect();
    sorted.sort_by_key(|u| u.client);
    let x: Vec<f64> = global.flat().map(f64::from).collect();
    let mut mean = vec![0.0; x.len()];
    for (u, w) in sorted.iter().zip(weights) {
        for ((m, p), g) in mean.iter_mut().zip(u.params.flat()).zip(&x) {
            *m += w * (f64::from(p) - g);
        }
    }
    for ((new, old), d) in out.params.flat().zip(&x).zip(&mean) {
        let step = f64::from(new) - old;
        assert!(
            step == 0.0 || step.signum() == d.signum(),
            "{config:?}: step {step} against delta {d}"
        );
    }
    Ok(())
}

/// FedNova normalises by each client's effective step (its `lr_sum`):
/// with equal effective steps it is FedAvg whatever the step counts, and a
/// client that moved at rate 0 takes no part in the normalisation.
fn fednova_with_equal_steps_is_fedavg(s: &Scenario, lr_sum: f64) -> TestResult {
    let mut nova = build(&config(r#"{"name": "fednova"}"#)?)?;
    let mut avg = build(&config(r#"{"name": "fedavg"}"#)?)?;
    let g = s.global()?;
    let mut u = s.updates(0, &g)?;
    for (i, x) in u.iter_mut().enumerate() {
        x.lr_sum = lr_sum;
        x.num_steps = 1 + i as u64;
    }
    let (on, oa) = (nova.aggregate(0, &g, &u)?, avg.aggregate(0, &g, &u)?);
    for (x, y) in on.params.flat().zip(oa.params.flat()) {
        assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
    }
    // A client at rate 0 is left out: adding one (its model equals the
    // global one) changes nothing.
    let mut with_idle = u.clone();
    let mut idle = u[0].clone();
    idle.client = ClientId(99);
    idle.params = g.clone();
    idle.lr_sum = 0.0;
    with_idle.push(idle);
    let with = build(&config(r#"{"name": "fednova"}"#)?)?.aggregate(0, &g, &with_idle)?;
    for (x, y) in with.params.flat().zip(on.params.flat()) {
        assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn fednova_with_equal_effective_steps_is_fedavg(s in arb_scenario(1, 1, 5), lr_sum in 1e-4f64..1.0) {
        fednova_with_equal_steps_is_fedavg(&s, lr_sum).map_err(to_case_error)?;
    }

    #[test]
    fn client_order_does_not_matter(s in arb_scenario(2, 1, 5)) {
        for c in all_configs().map_err(to_case_error)? {
            order_does_not_matter(&s, &c).map_err(to_case_error)?;
        }
    }

    #[test]
    fn a_lone_client_gets_its_model_back(s in arb_scenario(1, 1, 1)) {
        for c in identity_configs().map_err(to_case_error)? {
            agreement_returns_the_model(&s, &c).map_err(to_case_error)?;
        }
    }

    #[test]
    fn identical_updates_return_that_update(s in arb_scenario(1, 2, 5)) {
        for c in identity_configs().map_err(to_case_error)? {
            agreement_returns_the_model(&s, &c).map_err(to_case_error)?;
        }
    }

    #[test]
    fn fedprox_with_mu_zero_is_fedavg(s in arb_scenario(2, 1, 4), lr in 0.1f64..2.0) {
        fedprox_mu0_is_fedavg(&s, lr).map_err(to_case_error)?;
    }

    #[test]
    fn state_survives_save_and_load_bit_for_bit(s in arb_scenario(3, 1, 4)) {
        for c in all_configs().map_err(to_case_error)? {
            save_load_continues_bit_for_bit(&s, &c).map_err(to_case_error)?;
        }
    }

    #[test]
    fn adaptive_first_step_has_the_sign_of_the_mean_delta(s in arb_scenario(1, 1, 4)) {
        for name in ["fedadagrad", "fedadam", "fedyogi"] {
            let c = config(&format!(r#"{{"name": "{name}"}}"#)).map_err(to_case_error)?;
            adaptive_first_step_follows_the_delta(&s, &c).map_err(to_case_error)?;
        }
    }
}
