//! A client node under local DP: what leaves it is the privatized update
//! (its loss withheld), drawn from the secret in its own store, so a
//! retried task releases the same values and a restarted node keeps its
//! secret and its count; a task past its target epsilon is refused before
//! training.

use std::sync::Arc;

use anyhow::{Context, Result};
use fedcmp_core::{
    ClientId, ClientInstruction, ClientUpdate, LocalObjective, ParamSet, ParamTensor, RoundTask,
    WarmupCosine,
};
use fedcmp_model::optim::AdamWConfig;
use fedcmp_runtime::client::{ClientData, LocalConfig};
use fedcmp_runtime::client_store::ClientStore;
use fedcmp_runtime::node::ClientNode;
use fedcmp_strategy::privacy::local::LocalDp;

fn set(values: &[f32]) -> Result<ParamSet> {
    Ok(ParamSet::new(vec![(
        "x".to_string(),
        ParamTensor::new("x", vec![values.len()], values.to_vec())?,
    )])?)
}

fn task(round: u64, global: &ParamSet) -> RoundTask {
    RoundTask {
        instruction: ClientInstruction {
            round,
            client: ClientId(3),
            objective: LocalObjective::Plain,
            max_local_steps: None,
        },
        global: Arc::new(global.clone()),
        schedule: WarmupCosine {
            peak_lr: 1e-2,
            total_samples: 100,
            warmup_ratio: 0.0,
        },
        samples_before: 0,
        checkpointed_round: None,
    }
}

fn node(store: &ClientStore, dp: LocalDp) -> ClientNode {
    let local = LocalConfig {
        local_steps: 1,
        batch_size: 1,
        epochs: 1,
        reset_optimizer: false,
        adamw: AdamWConfig::default(),
        seed: 1,
    };
    let data = ClientData {
        id: ClientId(3),
        samples: Vec::new(),
    };
    ClientNode::new(data, &local, Some(store.clone())).with_local_dp(dp)
}

/// What "training" produced: the global moved by `shift`.
fn trained(global: &ParamSet, shift: f32) -> Result<ClientUpdate> {
    let moved: Vec<f32> = global.flat().map(|x| x + shift).collect();
    Ok(ClientUpdate {
        client: ClientId(3),
        params: set(&moved)?,
        num_samples: 2,
        num_steps: 1,
        lr_sum: 0.01,
        mean_loss: 2.5,
        control_delta: None,
    })
}

#[test]
fn a_node_releases_only_privatized_updates_the_same_on_retry() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = ClientStore::open(dir.path().join("client-0003"), ClientId(3))?;
    let mut dp = LocalDp {
        clip_norm: 0.5,
        noise_multiplier: 2.0,
        delta: 1e-5,
        budget: None,
    };
    dp.budget = Some(dp.epsilon(2)?);
    let global = set(&[0.0; 64])?;
    let mut site = node(&store, dp);

    let t1 = task(1, &global);
    let state = site.begin(&t1)?;
    let first = site
        .commit(&t1, state, Some(trained(&global, 1.0)?))?
        .update
        .context("no update")?;
    let secret_text = std::fs::read_to_string(store.dir().join("dp-secret"))?;
    let secret = u64::from_str_radix(secret_text.trim(), 16)?;
    let want = dp.privatize(&global, &trained(&global, 1.0)?.params, secret, 1)?;
    assert!(want.clipped);
    assert_eq!(first.params, want.params);
    assert_eq!(first.mean_loss, 0.0);
    assert_ne!(first.params, trained(&global, 1.0)?.params);

    // The task delivered again trains from the state before it: the same
    // release, not a second draw.
    let state = site.begin(&t1)?;
    assert_eq!(state.dp_releases, 0);
    let again = site
        .commit(&t1, state, Some(trained(&global, 1.0)?))?
        .update
        .context("no update")?;
    assert_eq!(again.params, first.params);

    // A restarted node reads its secret and count from the store.
    let mut restarted = node(&store, dp);
    let t2 = task(2, &first.params);
    let state = restarted.begin(&t2)?;
    assert_eq!(state.dp_releases, 1);
    let second = restarted
        .commit(&t2, state, Some(trained(&first.params, 0.1)?))?
        .update
        .context("no update")?;
    let want = dp.privatize(
        &first.params,
        &trained(&first.params, 0.1)?.params,
        secret,
        2,
    )?;
    assert_eq!(second.params, want.params);
    assert_eq!(store.load(2)?.dp_releases, 2);

    // A third release would pass the target: refused before training.
    let err = restarted
        .begin(&task(3, &second.params))
        .err()
        .context("a release past the budget was allowed")?;
    assert!(err.to_string().contains("budget"), "{err}");
    Ok(())
}
