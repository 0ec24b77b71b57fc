//! The schedule against its closed form, and the midpoint rule's promise
//! for every batch of any budget.

use fedcmp_core::schedule::WarmupCosine;

#[test]
fn warmup_cosine_schedule_has_llava_shape() {
    let s = WarmupCosine {
        peak_lr: 1e-3,
        total_samples: 1000,
        warmup_ratio: 0.03,
    };
    assert!((s.lr_at(15.0) - 0.5e-3).abs() < 1e-12);
    assert!((s.lr_at(30.0) - 1e-3).abs() < 1e-12);
    let mid = 30.0 + (1000.0 - 30.0) / 2.0;
    assert!((s.lr_at(mid) - 0.5e-3).abs() < 1e-9);
    assert!(s.lr_at(1000.0).abs() < 1e-15);
    assert!(s.lr_at(400.0) > s.lr_at(600.0));
}

#[test]
fn a_one_batch_budget_trains_at_the_schedules_midpoint() {
    // The cross-device local-only defect: a client whose whole budget is
    // one batch got the rate at the end of the cosine, exactly 0.
    let s = WarmupCosine {
        peak_lr: 1e-3,
        total_samples: 8,
        warmup_ratio: 0.03,
    };
    let lr = s.lr_for_batch(0, 8);
    // Closed form at progress 1/2: decay = (0.5 - 0.03) / 0.97.
    let decay: f64 = (0.5 - 0.03) / 0.97;
    let expected = 1e-3 * 0.5 * (1.0 + (std::f64::consts::PI * decay).cos());
    assert!((lr - expected).abs() < 1e-15, "{lr} vs {expected}");
    assert!(lr > 0.4e-3);
}

proptest::proptest! {
    /// Every batch of a budget, the first and the last included, gets a
    /// positive rate no larger than the peak, and the rates sum to the
    /// midpoint rule of the schedule's integral, peak * total / 2 (warm-up
    /// triangle and cosine half-wave each average half the peak). The
    /// rule's error is largest when the warm-up kink falls inside a batch:
    /// a scan over 50..400 batches and warm-up ratios 0..0.5 peaks at
    /// 0.25 * peak / batches, so the bound below leaves a factor of two.
    #[test]
    fn every_batch_of_a_budget_gets_a_positive_rate(
        batches in 1u64..400,
        batch_len in 1u64..64,
        warmup_ratio in 0.0f64..0.5,
    ) {
        let total = batches * batch_len;
        let s = WarmupCosine { peak_lr: 2e-3, total_samples: total, warmup_ratio };
        let rates: Vec<f64> = (0..batches).map(|b| s.lr_for_batch(b * batch_len, batch_len)).collect();
        for (b, &lr) in rates.iter().enumerate() {
            proptest::prop_assert!(lr > 0.0 && lr <= 2e-3, "batch {b} of {batches}: {lr}");
        }
        if batches >= 50 {
            let mean = rates.iter().sum::<f64>() / batches as f64;
            proptest::prop_assert!((mean - 1e-3).abs() < 1e-3 / batches as f64, "mean rate {mean}");
        }
    }
}
