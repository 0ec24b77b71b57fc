//! The `fedcmp._native` module (see the crate header).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use fedcmp_core::wire::{self, WireMessage};
use fedcmp_core::{
    ClientFailure, ClientId, ClientStatus, FailureKind, ParamSet, ParamTensor, RoundTask,
};
use fedcmp_experiment::backbones::BackboneDigests;
use fedcmp_experiment::events::{round_line, Event, Observer};
use fedcmp_experiment::server::{serve as serve_sites, ServeOptions};
use fedcmp_experiment::settings::parse_strategy;
use fedcmp_experiment::sites::{export, Site as SiteNode, SiteConfig};
use fedcmp_experiment::{Layers, RunSettings, Silent};
use fedcmp_runtime::transport::{RoundOutcome, Transport};
use fedcmp_strategy::{StrategyConfig, StrategyState};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

/// An array as Python passes it: name, shape, little-endian f32 bytes.
type ArrayIn = (String, Vec<usize>, PyBackedBytes);
/// An array as Python receives it.
type ArrayOut<'py> = (String, Vec<usize>, Bound<'py, PyBytes>);

/// The error with its causes, one line.
fn value_error(e: impl std::error::Error) -> PyErr {
    PyValueError::new_err(fedcmp_core::error_chain(&e))
}

fn runtime_error(e: impl std::error::Error) -> PyErr {
    PyRuntimeError::new_err(fedcmp_core::error_chain(&e))
}

fn tensor_from_bytes(name: &str, shape: Vec<usize>, bytes: &[u8]) -> PyResult<ParamTensor> {
    fedcmp_core::wire::tensor_from_le_bytes(name, shape, bytes).map_err(value_error)
}

fn arrays_in(arrays: Vec<ArrayIn>) -> PyResult<Vec<(String, ParamTensor)>> {
    arrays
        .into_iter()
        .map(|(name, shape, bytes)| {
            let t = tensor_from_bytes(&name, shape, &bytes)?;
            Ok((name, t))
        })
        .collect()
}

fn arrays_out<'py>(py: Python<'py>, arrays: &[(String, ParamTensor)]) -> Vec<ArrayOut<'py>> {
    arrays
        .iter()
        .map(|(name, t)| {
            let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), t.shape.clone(), PyBytes::new(py, &bytes))
        })
        .collect()
}

fn params_in(arrays: Vec<ArrayIn>) -> PyResult<ParamSet> {
    ParamSet::new(arrays_in(arrays)?).map_err(value_error)
}

fn settings_from(text: &str, what: &str) -> PyResult<RunSettings> {
    let layers = Layers::new().text(what, text).map_err(value_error)?;
    RunSettings::resolve(&layers).map_err(value_error)
}

/// Resolves and validates run settings (TOML text, the keys of `fedcmp
/// show-config`); returns them complete, as the server sends them.
#[pyfunction]
fn resolve_settings(text: &str) -> PyResult<String> {
    settings_from(text, "the settings given")?
        .to_toml()
        .map_err(value_error)
}

/// Logs of the Rust side to stderr (`filter`: e.g. `info`, `debug`).
#[pyfunction]
fn init_logging(filter: &str) {
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// A fedcmp strategy, aggregating replies in wire form.
#[pyclass(module = "fedcmp._native")]
struct Strategy {
    inner: Mutex<Box<dyn fedcmp_strategy::Strategy>>,
}

impl Strategy {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Box<dyn fedcmp_strategy::Strategy>>> {
        self.inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("the strategy was poisoned by a panic"))
    }
}

#[pymethods]
impl Strategy {
    /// `config`: a strategy name (`fed-cmp`), an inline TOML table
    /// (`{ name = "fed-cmp", server-lr = 0.5 }`) or the same as JSON;
    /// `num_clients` in the federation.
    #[new]
    fn new(config: &str, num_clients: usize) -> PyResult<Self> {
        let config = match serde_json::from_str::<StrategyConfig>(config) {
            Ok(config) => config,
            Err(_) => parse_strategy(config).map_err(value_error)?,
        };
        let inner = config.build(num_clients).map_err(value_error)?;
        Ok(Self {
            inner: Mutex::new(inner),
        })
    }

    /// The strategy's config name.
    #[getter]
    fn name(&self) -> PyResult<String> {
        Ok(self.lock()?.name().to_string())
    }

    /// Aggregates the updates in `replies` (wire replies: header and
    /// arrays) into the next global model from `global_params`; returns
    /// its arrays and the round's metrics as JSON.
    fn aggregate<'py>(
        &self,
        py: Python<'py>,
        round: u64,
        global_params: Vec<ArrayIn>,
        replies: Vec<(String, Vec<ArrayIn>)>,
    ) -> PyResult<(Vec<ArrayOut<'py>>, String)> {
        let global = params_in(global_params)?;
        let mut updates = Vec::new();
        for (header, arrays) in replies {
            let message = WireMessage {
                header,
                arrays: arrays_in(arrays)?,
            };
            let (_, reply) = wire::decode_reply(&message).map_err(value_error)?;
            updates.extend(reply.update);
        }
        let mut guard = self.lock()?;
        let strategy = guard.as_mut();
        let aggregate = py
            .detach(|| strategy.aggregate(round, &global, &updates))
            .map_err(value_error)?;
        let metrics = serde_json::to_string(&aggregate.metrics).map_err(value_error)?;
        Ok((arrays_out(py, aggregate.params.entries()), metrics))
    }

    /// The strategy's state (JSON), for a checkpoint of its own.
    fn state(&self) -> PyResult<String> {
        serde_json::to_string(&self.lock()?.state()).map_err(value_error)
    }

    /// Restores what `state` returned.
    fn load_state(&self, state: &str) -> PyResult<()> {
        let state: StrategyState = serde_json::from_str(state).map_err(value_error)?;
        self.lock()?.load_state(state).map_err(value_error)
    }
}

/// One site: its data (a manifest), its state folder, its trainer over
/// frozen backbones loaded once.
#[pyclass(module = "fedcmp._native")]
struct Site {
    inner: Mutex<SiteNode>,
    settings: String,
}

impl Site {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, SiteNode>> {
        self.inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("the site was poisoned by a panic"))
    }
}

#[pymethods]
impl Site {
    /// Opens the site for the federation whose settings (TOML, as the
    /// server sends them) are `settings`, with its own decoder `llm` (None:
    /// the registry's in `cache_dir`) and, where the federation's encoder
    /// is a CLIP/SigLIP folder, its own copy `vision`; no path in the
    /// settings is opened. `expected`: the server's backbone digests.
    #[new]
    #[pyo3(signature = (settings, client, manifest, state_dir, cache_dir, llm=None, misbehave=None, expected=None, vision=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        settings: &str,
        client: u32,
        manifest: PathBuf,
        state_dir: PathBuf,
        cache_dir: PathBuf,
        llm: Option<PathBuf>,
        misbehave: Option<&str>,
        expected: Option<&str>,
        vision: Option<PathBuf>,
    ) -> PyResult<Self> {
        let resolved = settings_from(settings, "the settings the server sent")?;
        let expected: Option<BackboneDigests> = expected
            .filter(|text| !text.is_empty())
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| {
                PyValueError::new_err(format!("the backbones the server announced: {e}"))
            })?;
        let misbehave = misbehave
            .map(fedcmp_experiment::settings::parse_attack)
            .transpose()
            .map_err(|e| PyValueError::new_err(format!("the site's `misbehave`: {e}")))?;
        let config = SiteConfig {
            client: ClientId(client),
            manifest,
            state_dir,
            cache_dir,
            llm,
            vision,
            misbehave,
        };
        let site = py
            .detach(|| SiteNode::open(&resolved, &config, expected.as_ref(), &Silent))
            .map_err(value_error)?;
        Ok(Self {
            inner: Mutex::new(site),
            settings: settings.to_string(),
        })
    }

    /// The settings text the site was opened with.
    #[getter]
    fn settings(&self) -> String {
        self.settings.clone()
    }

    /// Pairs the site trains on.
    #[getter]
    fn num_samples(&self) -> PyResult<usize> {
        Ok(self.lock()?.num_samples())
    }

    /// Skipped records of its manifest (JSON: counts by kind).
    fn skipped(&self) -> PyResult<String> {
        let site = self.lock()?;
        let counts: std::collections::BTreeMap<String, usize> = site
            .skipped()
            .counts()
            .iter()
            .map(|(k, n)| (k.to_string(), *n))
            .collect();
        serde_json::to_string(&counts).map_err(value_error)
    }

    /// Its status as of the end of `round` (JSON).
    fn status(&self, py: Python<'_>, round: u64) -> PyResult<String> {
        let mut guard = self.lock()?;
        let site = &mut *guard;
        let status = py.detach(|| site.status(round)).map_err(runtime_error)?;
        serde_json::to_string(&status).map_err(value_error)
    }

    /// Trains for one task (wire form) and returns the reply (wire form).
    fn handle<'py>(
        &self,
        py: Python<'py>,
        header: String,
        arrays: Vec<ArrayIn>,
    ) -> PyResult<(String, Vec<ArrayOut<'py>>)> {
        let message = WireMessage {
            header,
            arrays: arrays_in(arrays)?,
        };
        let task = wire::decode_task(&message).map_err(value_error)?;
        let mut guard = self.lock()?;
        let site = &mut *guard;
        let reply = py.detach(|| site.handle(&task)).map_err(runtime_error)?;
        let out = wire::encode_reply(task.round(), &reply);
        Ok((out.header, arrays_out(py, &out.arrays)))
    }
}

/// A transport implemented in Python: an object with
/// `status(round) -> list[str]` (JSON statuses) and
/// `run_round(tasks, timeout) -> (replies, failures, joined)` where tasks
/// are `(client, header, arrays)`, replies `(client, header, arrays)`,
/// failures `(client, kind, message)` with kind `error` or `timeout`, and
/// joined the JSON statuses of sites found since the last call.
struct PyTransport {
    object: Py<PyAny>,
}

impl PyTransport {
    fn broken(e: PyErr) -> fedcmp_runtime::RuntimeError {
        fedcmp_runtime::RuntimeError::Config(format!("the Python transport failed: {e}"))
    }
}

impl Transport for PyTransport {
    fn status(&mut self, round: u64) -> fedcmp_runtime::Result<Vec<ClientStatus>> {
        let texts: Vec<String> = Python::attach(|py| {
            self.object
                .bind(py)
                .call_method1("status", (round,))?
                .extract()
        })
        .map_err(Self::broken)?;
        texts
            .iter()
            .map(|t| {
                serde_json::from_str(t).map_err(|e| {
                    fedcmp_runtime::RuntimeError::Config(format!("a site's status {t:?}: {e}"))
                })
            })
            .collect()
    }

    fn run_round(
        &mut self,
        tasks: Vec<RoundTask>,
        deadline: Option<Instant>,
    ) -> fedcmp_runtime::Result<RoundOutcome> {
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64());
        let round = tasks.first().map_or(0, RoundTask::round);
        type Returned = (
            Vec<(u32, String, Vec<ArrayIn>)>,
            Vec<(u32, String, String)>,
            Vec<String>,
        );
        let (replies, failures, joined): Returned = Python::attach(|py| -> PyResult<Returned> {
            let messages: Vec<(u32, String, Vec<ArrayOut<'_>>)> = tasks
                .iter()
                .map(|t| {
                    let w = wire::encode_task(t);
                    (t.client().0, w.header, arrays_out(py, &w.arrays))
                })
                .collect();
            self.object
                .bind(py)
                .call_method1("run_round", (messages, timeout))?
                .extract()
        })
        .map_err(Self::broken)?;
        let mut outcome = RoundOutcome::default();
        for text in joined {
            match serde_json::from_str(&text) {
                Ok(status) => outcome.joined.push(status),
                Err(e) => tracing::warn!(status = %text, error = %e, "unreadable status of a site"),
            }
        }
        for (client, kind, message) in failures {
            let kind = match kind.as_str() {
                "timeout" => FailureKind::Timeout,
                _ => FailureKind::Error,
            };
            outcome.failures.push(ClientFailure {
                client: ClientId(client),
                kind,
                message,
            });
        }
        for (client, header, arrays) in replies {
            let refuse = |message: String| ClientFailure {
                client: ClientId(client),
                kind: FailureKind::Refused,
                message,
            };
            let decoded = arrays_in(arrays)
                .map_err(|e| e.to_string())
                .and_then(|arrays| {
                    wire::decode_reply(&WireMessage { header, arrays }).map_err(|e| e.to_string())
                });
            match decoded {
                Err(e) => outcome
                    .failures
                    .push(refuse(format!("unreadable reply: {e}"))),
                Ok((answered, _)) if answered != round => outcome.failures.push(refuse(format!(
                    "the reply answers round {answered}, not round {round}"
                ))),
                Ok((_, reply)) if reply.status.client.0 != client => {
                    outcome.failures.push(refuse(format!(
                        "the site asked as client {client} answered as client {}",
                        reply.status.client.0
                    )))
                }
                Ok((_, reply)) => outcome.replies.push(reply),
            }
        }
        Ok(outcome)
    }
}

/// The server's progress as lines (one per round, and its status lines)
/// handed to a Python callable: written from Python, they reach Python's
/// stderr, which Flower mirrors into the run's log stream (`flwr run
/// --stream`, `flwr log`); Rust's own logs go to the process's stderr
/// directly and are not mirrored.
struct PyLines {
    callback: Py<PyAny>,
}

impl Observer for PyLines {
    fn observe(&self, event: Event<'_>) {
        let line = match event {
            Event::Round(record) => round_line(record),
            Event::Status(line) | Event::Notice(line) => line,
            _ => return,
        };
        Python::attach(|py| {
            if let Err(e) = self.callback.call1(py, (line,)) {
                tracing::warn!(error = %e, "the progress callback failed");
            }
        });
    }
}

/// Runs (or resumes) the federation of `settings` over `transport` (see
/// [`PyTransport`]), in the run folder under the settings' `out`; returns
/// the folder and summary.json's text. `on_line` receives a line per
/// round and the server's status lines.
#[pyfunction]
#[pyo3(signature = (settings, transport, cache_dir, validation=None, llm=None, fresh=false, on_line=None))]
#[allow(clippy::too_many_arguments)]
fn serve(
    py: Python<'_>,
    settings: &str,
    transport: Py<PyAny>,
    cache_dir: PathBuf,
    validation: Option<PathBuf>,
    llm: Option<PathBuf>,
    fresh: bool,
    on_line: Option<Py<PyAny>>,
) -> PyResult<(String, String)> {
    let resolved = settings_from(settings, "the server's settings")?;
    let mut transport = PyTransport { object: transport };
    let options = ServeOptions {
        cache_dir: &cache_dir,
        validation: validation.as_deref(),
        llm: llm.as_deref(),
        fresh,
    };
    let lines = on_line.map(|callback| PyLines { callback });
    let observer: &dyn Observer = match &lines {
        Some(lines) => lines,
        None => &Silent,
    };
    let (folder, summary) = py
        .detach(|| serve_sites(&resolved, &mut transport, options, observer))
        .map_err(runtime_error)?;
    let text = serde_json::to_string_pretty(&summary).map_err(value_error)?;
    Ok((folder.dir.display().to_string(), text))
}

/// The digests of the backbones `settings` name (`llm`: the server's copy
/// of the decoder instead), as JSON, for the server to announce to its
/// sites.
#[pyfunction]
#[pyo3(signature = (settings, cache_dir, llm=None))]
fn backbone_digests(
    py: Python<'_>,
    settings: &str,
    cache_dir: PathBuf,
    llm: Option<PathBuf>,
) -> PyResult<String> {
    let resolved = settings_from(settings, "the server's settings")?;
    let wanted = resolved.data.backbones.with_llm(llm.as_deref());
    let digests = py
        .detach(|| fedcmp_experiment::backbones::digests(&cache_dir, &wanted, &Silent))
        .map_err(runtime_error)?;
    serde_json::to_string(&digests).map_err(value_error)
}

/// The settings (TOML) the server sends its sites: `settings` less every
/// path on the server's disk (see `sites::settings_for_sites`).
#[pyfunction]
fn settings_for_sites(settings: &str) -> PyResult<String> {
    let resolved = settings_from(settings, "the server's settings")?;
    fedcmp_experiment::sites::settings_for_sites(&resolved)
        .to_toml()
        .map_err(value_error)
}

/// The runs whose state a site keeps in `state_dir` (JSON: key, newest
/// round, bytes).
#[pyfunction]
fn site_runs(state_dir: PathBuf) -> PyResult<String> {
    let runs = fedcmp_experiment::sites::site_runs(&state_dir).map_err(value_error)?;
    serde_json::to_string(&runs).map_err(value_error)
}

/// Removes the state of run `key` from a site's `state_dir`.
#[pyfunction]
fn remove_site_run(state_dir: PathBuf, key: &str) -> PyResult<()> {
    fedcmp_experiment::sites::remove_site_run(&state_dir, key).map_err(value_error)
}

/// `fedcmp run` in process (the simulation): returns the run folder.
#[pyfunction]
#[pyo3(signature = (settings, cache_dir, fresh=false))]
fn simulate(py: Python<'_>, settings: &str, cache_dir: PathBuf, fresh: bool) -> PyResult<String> {
    let resolved = settings_from(settings, "the settings given")?;
    let report = py
        .detach(|| fedcmp_experiment::run_folder::run(&cache_dir, &resolved, fresh, &Silent))
        .map_err(runtime_error)?;
    Ok(report.folder.dir.display().to_string())
}

/// Deals the scenario of `settings` into site folders under `out`
/// (returns what was written, JSON).
#[pyfunction]
fn export_sites(
    py: Python<'_>,
    settings: &str,
    out: PathBuf,
    cache_dir: PathBuf,
) -> PyResult<String> {
    let resolved = settings_from(settings, "the settings given")?;
    let exported = py
        .detach(|| export(&cache_dir, &resolved, &out, &Silent))
        .map_err(runtime_error)?;
    serde_json::to_string(&exported).map_err(value_error)
}

/// A parameter set from a safetensors file of fedcmp's (a run's
/// projector.safetensors), as arrays.
#[pyfunction]
fn load_params<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Vec<ArrayOut<'py>>> {
    let params = fedcmp_runtime::convert::load_params_file(&path).map_err(value_error)?;
    Ok(arrays_out(py, params.entries()))
}

/// The generated tiny world of the tests (a tiny GGUF decoder, 48 small
/// images, a two-client scenario) under `dir`: (gguf path, scenario path).
#[pyfunction]
fn tiny_world(dir: PathBuf) -> PyResult<(String, String)> {
    let world = fedcmp_testkit::tiny_world(Path::new(&dir))
        .map_err(|e| PyRuntimeError::new_err(format!("{e:#}")))?;
    Ok((
        world.gguf.display().to_string(),
        world.scenario.display().to_string(),
    ))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Strategy>()?;
    m.add_class::<Site>()?;
    m.add_function(wrap_pyfunction!(serve, m)?)?;
    m.add_function(wrap_pyfunction!(simulate, m)?)?;
    m.add_function(wrap_pyfunction!(export_sites, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_settings, m)?)?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(load_params, m)?)?;
    m.add_function(wrap_pyfunction!(tiny_world, m)?)?;
    m.add_function(wrap_pyfunction!(site_runs, m)?)?;
    m.add_function(wrap_pyfunction!(backbone_digests, m)?)?;
    m.add_function(wrap_pyfunction!(remove_site_run, m)?)?;
    m.add_function(wrap_pyfunction!(settings_for_sites, m)?)?;
    Ok(())
}
