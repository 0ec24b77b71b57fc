//! What the library tells its caller while it works: a stream of events
//! that a renderer turns into progress bars, live lines or logs (the
//! library itself never prints). Observers are shared by the threads of a
//! parallel comparison, hence `Sync`.

use fedcmp_assets::FetchEvent;
use fedcmp_data::record::SkipReport;
use fedcmp_runtime::round_loop::RoundRecord;

/// A long piece of work with a known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Images through the frozen vision encoder (once; then cached).
    Encode,
    /// Images encoded for the concept clustering of unlabelled sources.
    Cluster,
    /// Held-out pairs scored by the evaluation suite.
    Evaluate,
    /// Clients trained alone (the local-only reference).
    LocalClients,
    /// Cells of a comparison.
    Cells,
    /// Proposals of aggregation rules scored by the harness.
    Score,
}

/// How a training run starts (for a header line and a progress bar).
#[derive(Debug, Clone, PartialEq)]
pub struct RunStart {
    pub name: String,
    pub clients: usize,
    pub clients_per_round: usize,
    pub budget: u64,
    pub validation: usize,
    pub test: usize,
    pub initial_val_nll: f64,
    /// Every client's local steps per round, and the pairs of each.
    pub local_steps: usize,
    pub step_batch: usize,
    /// Clients trained through the decoder together.
    pub clients_per_pass: usize,
    /// Rounds the run will take, estimated (the bar's length).
    pub estimated_rounds: u64,
    /// The round a resumed run continues after.
    pub resumed_after: Option<u64>,
}

/// One thing that happened.
#[derive(Debug)]
pub enum Event<'a> {
    /// Progress of fetching a registry asset.
    Asset(&'a FetchEvent),
    /// `done` of `total` units of a stage (`total` may change once).
    Progress { stage: Stage, done: u64, total: u64 },
    /// A stage finished.
    StageDone(Stage),
    /// A training run starts.
    RunStarted(&'a RunStart),
    /// A round of the current run finished.
    Round(&'a RoundRecord),
    /// A short status line (which cell is training, ...).
    Status(String),
    /// A line that belongs with the results (which kernels ran the matrix
    /// products), sent once.
    Notice(String),
    /// Records of a scenario that its readers or the image encoder skipped
    /// (sent once per assembled scenario, only when some were).
    Skipped {
        scenario: &'a str,
        report: &'a SkipReport,
    },
}

/// Receives events.
pub trait Observer: Sync {
    fn observe(&self, event: Event<'_>);
}

/// Ignores every event (tests, batch use).
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Observer for Silent {
    fn observe(&self, _event: Event<'_>) {}
}

/// One line about a finished round, for an operator watching a log:
/// who answered and who failed (and why), whether it was aggregated, the
/// training loss (unless the clients withheld it), the validation NLL when
/// computed, and its seconds.
pub fn round_line(record: &RoundRecord) -> String {
    let mut parts = vec![format!(
        "round {}: {} of {} answered",
        record.round,
        record.answered.len(),
        record.sampled.len()
    )];
    if !record.failures.is_empty() {
        let failed: Vec<String> = record
            .failures
            .iter()
            .map(|f| {
                let kind = serde_json::to_value(f.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let message: String = f.message.chars().take(120).collect();
                format!("client {} {kind} ({message})", f.client.0)
            })
            .collect();
        parts.push(format!("failed: {}", failed.join(", ")));
    }
    if !record.aggregated {
        parts.push(match &record.refused {
            Some(why) => format!("not aggregated: {why}"),
            None => "not aggregated (too few updates)".to_string(),
        });
    }
    if record.train_loss.is_finite() {
        parts.push(format!("train loss {:.4}", record.train_loss));
    }
    if let Some(v) = record.val_loss {
        parts.push(format!("validation NLL {v:.4}"));
    }
    if let Some(eps) = record
        .metrics
        .scalars
        .get(fedcmp_core::metrics::names::DP_EPSILON)
    {
        parts.push(format!("epsilon {eps:.3}"));
    }
    if !record.retired.is_empty() {
        let ids: Vec<String> = record.retired.iter().map(u32::to_string).collect();
        parts.push(format!("retired: client {}", ids.join(", ")));
    }
    parts.push(format!("{:.1} s", record.seconds));
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use fedcmp_core::{ClientFailure, ClientId, FailureKind, RoundMetrics};

    use super::*;

    fn record() -> RoundRecord {
        RoundRecord {
            round: 4,
            sampled: vec![0, 1, 2],
            failures: vec![ClientFailure {
                client: ClientId(2),
                kind: FailureKind::Timeout,
                message: "no answer in 30 s".into(),
            }],
            stragglers: Vec::new(),
            answered: vec![0, 1],
            retired: Vec::new(),
            aggregated: true,
            refused: None,
            skipped: Default::default(),
            samples: 8,
            samples_total: 32,
            lr_end: 0.01,
            train_loss: 2.5,
            val_loss: Some(1.25),
            seconds: 3.04,
            metrics: RoundMetrics::default(),
        }
    }

    #[test]
    fn a_round_line_says_who_answered_who_failed_and_why() {
        assert_eq!(
            round_line(&record()),
            "round 4: 2 of 3 answered; failed: client 2 timeout (no answer in 30 s); \
             train loss 2.5000; validation NLL 1.2500; 3.0 s"
        );
        let refused = RoundRecord {
            aggregated: false,
            refused: Some("krum keeps 3 deltas but only 2 clients answered".into()),
            train_loss: f64::NAN,
            val_loss: None,
            failures: Vec::new(),
            retired: vec![2],
            ..record()
        };
        assert_eq!(
            round_line(&refused),
            "round 4: 2 of 3 answered; not aggregated: krum keeps 3 deltas but only 2 clients \
             answered; retired: client 2; 3.0 s"
        );
    }
}
