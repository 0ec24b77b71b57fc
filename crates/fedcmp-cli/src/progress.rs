//! Rendering the library's events: indicatif bars and spinners that stay
//! quiet when stderr is not a terminal (CI logs get the tracing lines
//! instead), and a header line when a run starts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use fedcmp_assets::FetchEvent;
use fedcmp_experiment::events::{Event, Observer, RunStart, Stage};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` steps with a `{msg}` slot for live numbers.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let template =
        format!("{what:>10} [{{bar:30}}] {{pos}}/{{len}} {{per_sec}} eta {{eta}} {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// A spinner for work of unknown length.
pub fn spinner(what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(&format!("{{spinner}} {what}: {{msg}}")) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Encode => "encode",
        Stage::Cluster => "cluster",
        Stage::Evaluate => "evaluate",
        Stage::LocalClients => "client",
        Stage::Cells => "cells",
        Stage::Score => "score",
    }
}

/// The rounds of the current run.
#[derive(Debug)]
struct RoundBar {
    bar: ProgressBar,
    started: Instant,
    last_val: f64,
    /// Samples consumed before this invocation (a resumed run).
    samples_before: Option<u64>,
}

/// Renders events on stderr; one bar per stage, one spinner per asset.
#[derive(Debug, Default)]
pub struct Progress {
    stages: Mutex<HashMap<&'static str, ProgressBar>>,
    assets: Mutex<HashMap<String, ProgressBar>>,
    rounds: Mutex<Option<RoundBar>>,
}

impl Progress {
    fn asset(&self, event: &FetchEvent) {
        let Ok(mut assets) = self.assets.lock() else {
            return;
        };
        let name = match event {
            FetchEvent::Present { asset }
            | FetchEvent::Downloading { asset, .. }
            | FetchEvent::Verified { asset, .. }
            | FetchEvent::Ready { asset } => asset.clone(),
        };
        let spin = assets.entry(name.clone()).or_insert_with(|| spinner(&name));
        match event {
            FetchEvent::Present { .. } => {
                spin.finish_and_clear();
                assets.remove(&name);
            }
            FetchEvent::Downloading { command, .. } => {
                tracing::info!(asset = %name, %command, "fetching");
                spin.set_message(format!("running `{command}`"));
            }
            FetchEvent::Verified { file, .. } => spin.set_message(format!("verified {file}")),
            FetchEvent::Ready { .. } => {
                tracing::info!(asset = %name, "fetched and verified");
                spin.finish_and_clear();
                assets.remove(&name);
            }
        }
    }

    fn run_started(&self, start: &RunStart) {
        let resumed = start
            .resumed_after
            .map(|r| format!("resuming after round {r}; "))
            .unwrap_or_default();
        println!(
            "run {}: {resumed}{} client{} ({} per round, {} per decoder pass), {} local steps of \
             {} pairs per round, {} training samples, {} validation, {} test; initial \
             validation NLL {:.4}",
            start.name,
            start.clients,
            if start.clients == 1 { "" } else { "s" },
            start.clients_per_round,
            start.clients_per_pass.min(start.clients_per_round),
            start.local_steps,
            start.step_batch,
            start.budget,
            start.validation,
            start.test,
            start.initial_val_nll
        );
        let b = bar(start.estimated_rounds, "round");
        b.set_position(start.resumed_after.unwrap_or(0));
        if let Ok(mut rounds) = self.rounds.lock() {
            *rounds = Some(RoundBar {
                bar: b,
                started: Instant::now(),
                last_val: start.initial_val_nll,
                samples_before: None,
            });
        }
    }

    fn round(&self, r: &fedcmp_runtime::round_loop::RoundRecord) {
        let Ok(mut rounds) = self.rounds.lock() else {
            return;
        };
        let Some(state) = rounds.as_mut() else {
            return;
        };
        if let Some(v) = r.val_loss {
            state.last_val = v;
        }
        let before = *state
            .samples_before
            .get_or_insert(r.samples_total - r.samples);
        if r.round > state.bar.length().unwrap_or(0) {
            state.bar.set_length(r.round);
        }
        state.bar.set_position(r.round);
        let rate =
            (r.samples_total - before) as f64 / state.started.elapsed().as_secs_f64().max(1e-9);
        let failed = if r.failures.is_empty() {
            String::new()
        } else {
            format!("  {} failed", r.failures.len())
        };
        state.bar.set_message(format!(
            "clients {}/{}{failed}  loss {:.3}  val {:.3}  {rate:.1} samples/s",
            r.answered.len(),
            r.sampled.len(),
            r.train_loss,
            state.last_val,
        ));
    }

    /// Clears every bar (before printing results).
    pub fn finish(&self) {
        if let Ok(mut rounds) = self.rounds.lock() {
            if let Some(state) = rounds.take() {
                state.bar.finish_and_clear();
            }
        }
        if let Ok(mut stages) = self.stages.lock() {
            for (_, b) in stages.drain() {
                b.finish_and_clear();
            }
        }
    }
}

impl Observer for Progress {
    fn observe(&self, event: Event<'_>) {
        match event {
            Event::Asset(e) => self.asset(e),
            Event::Progress { stage, done, total } => {
                if let Ok(mut stages) = self.stages.lock() {
                    let name = stage_name(stage);
                    let b = stages.entry(name).or_insert_with(|| bar(total, name));
                    b.set_length(total);
                    b.set_position(done);
                }
            }
            Event::StageDone(stage) => {
                if let Ok(mut stages) = self.stages.lock() {
                    if let Some(b) = stages.remove(stage_name(stage)) {
                        b.finish_and_clear();
                    }
                }
            }
            Event::Skipped { scenario, report } => {
                // Bars live on stderr; the report is part of the result.
                println!("scenario {scenario}: {report}");
            }
            Event::Notice(text) => println!("{text}"),
            Event::RunStarted(start) => self.run_started(start),
            Event::Round(r) => self.round(r),
            Event::Status(text) => {
                if let Ok(stages) = self.stages.lock() {
                    let open = [Stage::Cells, Stage::Score, Stage::LocalClients]
                        .iter()
                        .find_map(|s| stages.get(stage_name(*s)));
                    match open {
                        Some(b) => b.set_message(text),
                        None => tracing::debug!("{text}"),
                    }
                }
            }
        }
    }
}
