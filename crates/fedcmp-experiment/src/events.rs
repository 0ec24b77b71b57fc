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
