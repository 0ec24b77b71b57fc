//! The fuzzing loop for one target: take an input from the corpus, mutate
//! it, run the decoder, watch it. A finding is a panic (caught, the input
//! saved, the loop goes on), a run longer than the time limit (a watchdog
//! thread saves nothing itself: the input is already on disk, and it ends
//! the process with code 3 naming the file) or an allocation past the
//! bound (the capped allocator refuses it and the process aborts; the
//! input is on disk likewise).
//!
//! Feedback without instrumentation: an input whose verdict is new (a new
//! error message, digits and paths masked, or the first acceptance) joins
//! the corpus, so inputs that reach deeper checks are mutated further.
//! For coverage-guided runs, the same targets build under cargo-fuzz (see
//! fuzz/ and the README).

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::mutate::Mutator;
use crate::targets::{Target, Verdict};
use crate::ALLOCATOR;

/// How long and how hard to fuzz, and what counts as a finding.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Stop after this many runs ...
    pub runs: Option<u64>,
    /// ... or after this long, whichever comes first.
    pub time: Option<Duration>,
    /// Inputs never grow past this many bytes.
    pub max_len: usize,
    /// A run longer than this is a hang.
    pub timeout: Duration,
    /// A run may allocate at most this many bytes more than it started
    /// with; one more and the allocator refuses.
    pub alloc_bound: usize,
    /// The random seed of the mutations.
    pub seed: u64,
    /// Where inputs that panicked are kept.
    pub findings: PathBuf,
}

impl Limits {
    /// A run budget for CI: `runs` runs, 10 s per run (debug builds of the
    /// tensor loaders are slow), 256 MiB per run, inputs up to 1 MiB.
    pub fn smoke(runs: u64, findings: PathBuf) -> Self {
        Self {
            runs: Some(runs),
            time: None,
            max_len: 1 << 20,
            timeout: Duration::from_secs(10),
            alloc_bound: 256 << 20,
            seed: 0,
            findings,
        }
    }
}

/// A panic found, with the input kept for reproduction.
#[derive(Debug, Clone)]
pub struct Finding {
    pub message: String,
    pub input: PathBuf,
}

/// What a target's fuzzing did.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: &'static str,
    pub runs: u64,
    pub seconds: f64,
    /// Runs the decoder accepted (the rest it refused with an error).
    pub accepted: u64,
    /// Distinct verdicts seen (masked error messages, and acceptance).
    pub verdicts: usize,
    pub corpus: usize,
    /// Seeds the decoder accepted (each seed should be valid).
    pub seeds_accepted: usize,
    pub seeds: usize,
    pub slowest: Duration,
    pub findings: Vec<Finding>,
}

impl Report {
    /// The header of [`Report::row`]'s table.
    pub const HEADER: &'static str = "target               runs  seconds    runs/s  accepted  \
         verdicts  corpus  slowest ms  findings";

    /// One line of the report table.
    pub fn row(&self) -> String {
        format!(
            "{:<14} {:>10} {:>8.1} {:>9.0} {:>9} {:>9} {:>7} {:>11.1} {:>9}",
            self.target,
            self.runs,
            self.seconds,
            self.runs as f64 / self.seconds.max(1e-9),
            self.accepted,
            self.verdicts,
            self.corpus,
            self.slowest.as_secs_f64() * 1e3,
            self.findings.len()
        )
    }

    /// Why the run failed, one line each: seeds the decoder refused (a
    /// seed must be valid, or mutations start from an error path) and
    /// findings.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.seeds_accepted != self.seeds {
            out.push(format!(
                "{}: {} of {} seeds refused",
                self.target,
                self.seeds - self.seeds_accepted,
                self.seeds
            ));
        }
        for f in &self.findings {
            out.push(format!(
                "{}: {} (input: {})",
                self.target,
                f.message,
                f.input.display()
            ));
        }
        out
    }
}

/// The message and place of the last panic, set by the hook installed while
/// fuzzing (the default hook would print every caught panic).
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Fuzzes `target` from `seeds` (valid inputs) after running its
/// `regressions` (inputs of past findings), its inputs written to
/// `scratch` (which must already hold the files the seeds refer to).
pub fn fuzz(
    target: &Target,
    seeds: &[Vec<u8>],
    regressions: &[Vec<u8>],
    scratch: &Path,
    limits: &Limits,
) -> anyhow::Result<Report> {
    anyhow::ensure!(!seeds.is_empty(), "target {} has no seed", target.name);
    std::fs::create_dir_all(&limits.findings)?;
    let input_path = target.input_path(scratch);
    let watchdog = Watchdog::start(target.name, input_path.clone(), limits.timeout);
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(format!("{message}{place}"));
        }
    }));

    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut verdicts = BTreeSet::new();
    let mut report = Report {
        target: target.name,
        runs: 0,
        seconds: 0.0,
        accepted: 0,
        verdicts: 0,
        corpus: 0,
        seeds_accepted: 0,
        seeds: seeds.len(),
        slowest: Duration::ZERO,
        findings: Vec::new(),
    };
    let mut places = BTreeSet::new();
    let started = Instant::now();
    let mut run_one = |input: &[u8], report: &mut Report, corpus: &mut Vec<Vec<u8>>| {
        let outcome = execute(target, scratch, input, limits, &watchdog);
        report.runs += 1;
        report.slowest = report.slowest.max(outcome.took);
        match outcome.result {
            Ok(verdict) => {
                if verdict.is_ok() {
                    report.accepted += 1;
                }
                if verdicts.insert(signature(&verdict, scratch)) && corpus.len() < 512 {
                    corpus.push(input.to_vec());
                }
                Ok::<bool, anyhow::Error>(verdict.is_ok())
            }
            Err(message) => {
                let place = message
                    .rsplit(" at ")
                    .next()
                    .unwrap_or_default()
                    .to_string();
                if places.insert(place) {
                    let digest = hex(&Sha256::digest(input)[..6]);
                    let saved = limits
                        .findings
                        .join(format!("{}-{digest}.bin", target.name));
                    std::fs::write(&saved, input)?;
                    report.findings.push(Finding {
                        message,
                        input: saved,
                    });
                }
                Ok(false)
            }
        }
    };
    for input in regressions {
        run_one(input, &mut report, &mut corpus)?;
    }
    for seed in seeds {
        if run_one(seed, &mut report, &mut corpus)? {
            report.seeds_accepted += 1;
        }
        if !corpus.iter().any(|c| c == seed) {
            corpus.push(seed.clone());
        }
    }
    let mut mutator = Mutator::new(limits.seed, target.text, seeds, limits.max_len);
    loop {
        let over_runs = limits.runs.is_some_and(|n| report.runs >= n);
        let over_time = limits.time.is_some_and(|t| started.elapsed() >= t);
        if over_runs || over_time {
            break;
        }
        let base = &corpus[mutator.index(corpus.len())];
        let other = &corpus[mutator.index(corpus.len())];
        let input = mutator.mutate(base, other);
        run_one(&input, &mut report, &mut corpus)?;
    }
    std::panic::set_hook(previous_hook);
    watchdog.stop();
    report.seconds = started.elapsed().as_secs_f64();
    report.verdicts = verdicts.len();
    report.corpus = corpus.len();
    Ok(report)
}

struct Outcome {
    /// The verdict, or the panic's message.
    result: Result<Verdict, String>,
    took: Duration,
}

fn execute(
    target: &Target,
    scratch: &Path,
    input: &[u8],
    limits: &Limits,
    watchdog: &Watchdog,
) -> Outcome {
    let started = Instant::now();
    let _ = ALLOCATOR.set_limit(ALLOCATOR.allocated().saturating_add(limits.alloc_bound));
    watchdog.arm();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| target.run(scratch, input)));
    watchdog.disarm();
    let _ = ALLOCATOR.set_limit(usize::MAX);
    let took = started.elapsed();
    let result = result.map_err(|_| {
        LAST_PANIC
            .lock()
            .ok()
            .and_then(|mut p| p.take())
            .unwrap_or_else(|| "a panic".to_string())
    });
    Outcome { result, took }
}

/// A verdict with what varies between equivalent inputs masked: digits,
/// quoted text (decoders quote the offending input), the scratch folder,
/// and everything past 120 characters.
fn signature(verdict: &Verdict, scratch: &Path) -> String {
    let Err(message) = verdict else {
        return "accepted".to_string();
    };
    let message = message.replace(&scratch.display().to_string(), "<scratch>");
    // TOML and CSV errors quote the offending source line after a `|`
    // gutter; words with a `/` are paths or ids taken from the input.
    let message: String = message
        .lines()
        .filter(|line| !line.contains('|'))
        .flat_map(|line| line.split(' ').filter(|word| !word.contains('/')))
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = String::new();
    let mut quote = None;
    for c in message.chars() {
        match quote {
            Some(q) if c == q => {
                quote = None;
                out.push(c);
            }
            Some(_) => {}
            None if matches!(c, '"' | '`' | '\'') => {
                quote = Some(c);
                out.push(c);
            }
            None if c.is_ascii_digit() => out.push('#'),
            None => out.push(c),
        }
        if out.len() >= 120 {
            break;
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Ends the process when one run takes longer than the limit.
struct Watchdog {
    /// Milliseconds since `epoch` when the current run started; 0: idle.
    armed_at: Arc<AtomicU64>,
    epoch: Instant,
    stop: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(target: &'static str, input: PathBuf, timeout: Duration) -> Self {
        let armed_at = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let thread = {
            let armed_at = Arc::clone(&armed_at);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while stop.load(Ordering::SeqCst) == 0 {
                    std::thread::sleep(Duration::from_millis(50));
                    let at = armed_at.load(Ordering::SeqCst);
                    let now = epoch.elapsed().as_millis() as u64;
                    if at != 0 && now.saturating_sub(at) > timeout.as_millis() as u64 {
                        eprintln!(
                            "fuzz: target {target} ran past {:.1} s on the input in {} (a hang)",
                            timeout.as_secs_f64(),
                            input.display()
                        );
                        std::process::exit(3);
                    }
                }
            })
        };
        Self {
            armed_at,
            epoch,
            stop,
            thread: Some(thread),
        }
    }

    fn arm(&self) {
        let now = (self.epoch.elapsed().as_millis() as u64).max(1);
        self.armed_at.store(now, Ordering::SeqCst);
    }

    fn disarm(&self) {
        self.armed_at.store(0, Ordering::SeqCst);
    }

    fn stop(mut self) {
        self.stop.store(1, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
