//! The learning-rate schedule every federated run follows, LLaVA's: a
//! linear warm-up over the first `warmup_ratio` of the planned sample
//! budget, then a cosine to zero at its end. It is plain data: the server
//! sends it, with the number of samples consumed so far, in every round
//! task, so a remote client reads the same rate a simulated one does.

use serde::{Deserialize, Serialize};

/// LLaVA's schedule: linear warm-up over the first `warmup_ratio` of the
/// sample budget, then cosine decay to zero at the end of the budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WarmupCosine {
    pub peak_lr: f64,
    pub total_samples: u64,
    pub warmup_ratio: f64,
}

impl WarmupCosine {
    /// The learning rate for a batch of `batch_len` samples taken after
    /// `samples_before` samples of the budget were consumed. The schedule
    /// is read at the batch's midpoint: reading it after the batch gives the
    /// last batch of a budget a rate of exactly 0 (a one-batch budget never
    /// trains), reading it before gives the first batch 0 during warm-up.
    pub fn lr_for_batch(&self, samples_before: u64, batch_len: u64) -> f64 {
        self.lr_at(samples_before as f64 + batch_len as f64 / 2.0)
    }

    /// The learning rate at the point of the budget where `samples` samples
    /// have been consumed (fractions allowed: a batch's midpoint).
    pub fn lr_at(&self, samples: f64) -> f64 {
        if self.total_samples == 0 {
            return self.peak_lr;
        }
        let progress = (samples / self.total_samples as f64).clamp(0.0, 1.0);
        let warmup = self.warmup_ratio.clamp(0.0, 1.0);
        if progress < warmup {
            return self.peak_lr * progress / warmup;
        }
        let decay = if warmup >= 1.0 {
            0.0
        } else {
            (progress - warmup) / (1.0 - warmup)
        };
        self.peak_lr * 0.5 * (1.0 + (std::f64::consts::PI * decay).cos())
    }
}
