//! The round protocol's messages survive serialisation exactly (what a
//! network transport relies on): every f32 of the global parameters, the
//! schedule's f64s, the typed objective, failures.

use std::sync::Arc;

use fedcmp_core::{
    ClientFailure, ClientId, ClientInstruction, ClientReply, ClientStatus, ClientUpdate,
    FailureKind, LocalObjective, ParamSet, ParamTensor, RoundTask, WarmupCosine,
};

fn params(seed: u32) -> ParamSet {
    // Awkward values: subnormals, tiny and huge magnitudes, negative zero.
    let data: Vec<f32> = (0..12u32)
        .map(|i| {
            let bits = (i.wrapping_mul(2_654_435_761).wrapping_add(seed)) & 0x7f7f_ffff;
            let v = f32::from_bits(bits);
            if i % 2 == 0 {
                -v
            } else {
                v
            }
        })
        .chain([-0.0, f32::MIN_POSITIVE / 3.0, 1e-38, 3.4e38])
        .collect();
    let w = ParamTensor::new("w", vec![4, 4], data).unwrap_or_else(|e| panic!("{e}"));
    ParamSet::new(vec![("w".to_string(), w)]).unwrap_or_else(|e| panic!("{e}"))
}

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
    let text = serde_json::to_string(value).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn round_tasks_and_replies_round_trip_exactly() {
    let task = RoundTask {
        instruction: ClientInstruction {
            round: 7,
            client: ClientId(3),
            objective: LocalObjective::Scaffold {
                server_control: params(1),
            },
            max_local_steps: Some(2),
        },
        global: Arc::new(params(2)),
        schedule: WarmupCosine {
            peak_lr: 3e-4,
            total_samples: 2040,
            warmup_ratio: 0.03,
        },
        samples_before: 1234,
        checkpointed_round: Some(5),
    };
    let back = round_trip(&task);
    assert_eq!(back, task);
    let bits = |p: &ParamSet| -> Vec<u32> { p.flat().map(f32::to_bits).collect() };
    assert_eq!(bits(&back.global), bits(&task.global), "every f32 bit");

    let reply = ClientReply {
        status: ClientStatus {
            client: ClientId(3),
            samples_left: 17,
            consumed: 40,
            skipped: 0,
        },
        update: Some(ClientUpdate {
            client: ClientId(3),
            params: params(3),
            num_samples: 8,
            num_steps: 2,
            lr_sum: 0.1 + 0.2,
            mean_loss: 4.123_456_789_012_345,
            control_delta: Some(params(4)),
        }),
    };
    assert_eq!(round_trip(&reply), reply);
    let failure = ClientFailure {
        client: ClientId(9),
        kind: FailureKind::Timeout,
        message: "no answer".into(),
    };
    assert_eq!(round_trip(&failure), failure);
    assert!(failure.counts_against_client());
    assert!(!ClientFailure {
        kind: FailureKind::Dropped,
        ..failure
    }
    .counts_against_client());
}
