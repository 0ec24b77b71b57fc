//! Runs in their folders on the generated tiny world: the folder's files,
//! `--config` on its settings, resume after a kill (bit-identical), a
//! client that fails every round (recorded per round in metrics.jsonl),
//! a federation with a hostile client, and the references.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fedcmp_experiment::backbones::VisionChoice;
use fedcmp_experiment::run_folder::{run_on, Measured};
use fedcmp_experiment::settings::{parse_attack, parse_privacy, parse_strategy};
use fedcmp_experiment::{Experiment, Layers, RunOptions, RunSettings, Silent};
use fedcmp_runtime::suite::SuiteConfig;

pub(crate) struct World {
    pub(crate) dir: tempfile::TempDir,
    gguf: PathBuf,
    scenario: PathBuf,
}

pub(crate) fn world() -> Result<World> {
    let dir = tempfile::tempdir()?;
    let w = fedcmp_testkit::tiny_world(dir.path())?;
    Ok(World {
        gguf: w.gguf,
        scenario: w.scenario,
        dir,
    })
}

pub(crate) fn small_suite() -> SuiteConfig {
    SuiteConfig {
        zero_shot_per_domain: 4,
        caption_checks: 2,
        caption_examples: 1,
        max_caption_tokens: 4,
        ..SuiteConfig::default()
    }
}

impl World {
    pub(crate) fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Settings for a run on this world with `extra` options on top.
    pub(crate) fn settings(&self, extra: RunOptions) -> Result<RunSettings> {
        let layers = Layers::new()
            .defaults("the test world", &self.options()?)?
            .flags(&extra)?;
        Ok(RunSettings::resolve(&layers)?)
    }

    /// The options every run on this world starts from.
    pub(crate) fn options(&self) -> Result<RunOptions> {
        Ok(RunOptions {
            scenario: Some(self.scenario.display().to_string()),
            llm: Some(self.gguf.clone()),
            vision: Some(VisionChoice::PatchMeans),
            image_size: Some(8),
            local_steps: Some(1),
            batch_size: Some(2),
            lr: Some(1e-2),
            eval_every: Some(2),
            checkpoint_every: Some(1),
            out: Some(self.dir.path().join("runs")),
            ..RunOptions::default()
        })
    }

    /// A comparison of `methods` on this world's scenario with a grid of
    /// one, one seed and the small suite, into `out`.
    pub(crate) fn plan(
        &self,
        template: &RunSettings,
        methods: &[&str],
        out: PathBuf,
    ) -> Result<fedcmp_experiment::compare::Plan> {
        use fedcmp_experiment::compare::{Method, Plan};
        Ok(Plan {
            scenarios: vec![template.data.scenario.clone()],
            methods: methods
                .iter()
                .map(|m| Method::parse(m))
                .collect::<Result<_, _>>()?,
            seeds: std::num::NonZeroU64::MIN,
            grid: 1,
            jobs: std::num::NonZeroUsize::MIN,
            suite: small_suite(),
            out,
        })
    }

    /// A FedAvg run trained in its folder on this world: its saved
    /// projector.
    pub(crate) fn saved_run(&self) -> Result<fedcmp_experiment::saved::SavedProjector> {
        use fedcmp_experiment::saved::{CellChoice, SavedProjector};
        let settings = self.settings(RunOptions::default())?;
        let report = run_on(&self.experiment(&settings)?, &settings, false, &Silent)?;
        Ok(SavedProjector::locate(
            &report.folder.dir,
            &CellChoice::default(),
        )?)
    }

    pub(crate) fn experiment(&self, settings: &RunSettings) -> Result<Experiment> {
        Ok(Experiment::assemble(
            &self.cache(),
            &settings.data,
            small_suite(),
            &Silent,
        )?)
    }
}

fn metrics_lines(dir: &Path) -> Result<Vec<serde_json::Value>> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

/// Everything in a metrics line but the wall-clock seconds.
fn without_seconds(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("seconds");
    }
    v
}

#[test]
fn a_run_resumes_from_its_folder_bit_identically_after_a_kill() -> Result<()> {
    let w = world()?;
    let settings = w.settings(RunOptions {
        strategy: Some(parse_strategy("fed-cmp")?),
        ..RunOptions::default()
    })?;
    let experiment = w.experiment(&settings)?;
    let first = run_on(&experiment, &settings, false, &Silent)?;
    let dir = first.folder.dir.clone();
    for file in [
        "settings.toml",
        "metrics.jsonl",
        "summary.json",
        "projector.safetensors",
    ] {
        assert!(dir.join(file).exists(), "{file}");
    }
    let Measured::Trained(report) = &first.measured else {
        anyhow::bail!("a federated run measured no training");
    };
    assert!(report.rounds >= 4 && report.one_pass_complete, "{report:?}");
    let straight_projector = std::fs::read(dir.join("projector.safetensors"))?;
    let straight_metrics = metrics_lines(&dir)?;
    assert_eq!(straight_metrics.len() as u64, report.rounds);

    // The folder's settings, read back with --config, are the same settings.
    let again = RunSettings::resolve(&Layers::new().file(&dir.join("settings.toml"))?)?;
    assert_eq!(again, settings);

    // A kill before the last round's server checkpoint was durable: the
    // folder keeps the two newest checkpoints; drop the newest and point
    // LATEST at the one before. The clients' states and the metrics line
    // of the last round are still there.
    let checkpoints = dir.join("checkpoints");
    let last = report.rounds;
    std::fs::remove_dir_all(checkpoints.join(format!("round-{last:06}")))?;
    std::fs::write(checkpoints.join("LATEST"), format!("round-{:06}", last - 1))?;
    std::fs::remove_file(dir.join("projector.safetensors"))?;
    let resumed = run_on(&experiment, &settings, false, &Silent)?;
    let Measured::Trained(r) = &resumed.measured else {
        anyhow::bail!("no training");
    };
    assert_eq!(r.resumed_after, Some(last - 1));
    assert_eq!(
        std::fs::read(dir.join("projector.safetensors"))?,
        straight_projector
    );
    let resumed_metrics: Vec<_> = metrics_lines(&dir)?
        .into_iter()
        .map(without_seconds)
        .collect();
    let straight: Vec<_> = straight_metrics.into_iter().map(without_seconds).collect();
    assert_eq!(resumed_metrics, straight, "metrics.jsonl after the resume");

    // Other settings in a folder with a checkpoint are refused, naming it;
    // --fresh (`fresh = true`) starts over.
    let other = w.settings(RunOptions {
        strategy: Some(parse_strategy("fed-cmp")?),
        lr: Some(2e-2),
        ..RunOptions::default()
    })?;
    let refused = run_on(&experiment, &other, false, &Silent)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        refused.contains("settings.toml") && refused.contains("other settings"),
        "{refused}"
    );
    run_on(&experiment, &other, true, &Silent)?;
    Ok(())
}

#[test]
fn a_client_failing_every_round_is_counted_per_round_in_metrics_jsonl() -> Result<()> {
    let w = world()?;
    let settings = w.settings(RunOptions::default())?;
    let mut experiment = w.experiment(&settings)?;
    let missing = fedcmp_testkit::missing_feature_key()?;
    for sample in &mut experiment.clients[1].samples {
        sample.key = missing.clone();
    }
    let report = run_on(&experiment, &settings, false, &Silent)?;
    let lines = metrics_lines(&report.folder.dir)?;
    let failed_clients = |line: &serde_json::Value| -> Vec<u64> {
        line["failures"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["kind"] == "error")
            .filter_map(|f| f["client"].as_u64())
            .collect()
    };
    for line in &lines[..3] {
        assert_eq!(failed_clients(line), vec![1], "{line}");
        assert_eq!(line["aggregated"], true);
    }
    assert_eq!(lines[2]["retired"], serde_json::json!([1]));
    assert!(lines[3..].iter().all(|l| failed_clients(l).is_empty()));
    let Measured::Trained(r) = &report.measured else {
        anyhow::bail!("no training");
    };
    assert_eq!((r.failures.errors, r.retired.clone()), (3, vec![1]));
    assert!(!r.one_pass_complete, "client 1 never trained");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.folder.dir.join("summary.json"))?)?;
    assert_eq!(summary["failures"]["errors"], 3);
    Ok(())
}

#[test]
fn the_references_run_in_their_own_folders() -> Result<()> {
    let w = world()?;
    let centralized = w.settings(RunOptions {
        training: Some(fedcmp_experiment::settings::TrainingKind::Centralized),
        ..RunOptions::default()
    })?;
    let experiment = w.experiment(&centralized)?;
    let report = run_on(&experiment, &centralized, false, &Silent)?;
    assert!(
        report.folder.name.ends_with("-centralized-s0"),
        "{}",
        report.folder.name
    );
    let Measured::Trained(r) = &report.measured else {
        anyhow::bail!("no training");
    };
    assert_eq!(r.federation.clients, 2);
    assert_eq!(r.consumed_per_client.len(), 1, "one pooled client");
    assert!(r.one_pass_complete && r.test_nll.r#final < r.test_nll.init);
    // Steps parity: a centralized step takes a whole federated round's
    // pairs (batch 2 x the 2 clients of a round), so it takes as many
    // sequential steps as the federation on the same pairs.
    let rounds = metrics_lines(&report.folder.dir)?;
    assert_eq!(rounds[0]["samples"], 4, "{}", rounds[0]);
    let pooled: u64 = experiment
        .clients
        .iter()
        .map(|c| c.samples.len() as u64)
        .sum();
    assert_eq!(r.rounds, pooled.div_ceil(4));

    let local_only = w.settings(RunOptions {
        training: Some(fedcmp_experiment::settings::TrainingKind::LocalOnly),
        ..RunOptions::default()
    })?;
    let report = run_on(&experiment, &local_only, false, &Silent)?;
    let Measured::LocalOnly(r) = &report.measured else {
        anyhow::bail!("local-only measured training");
    };
    assert_eq!(r.clients.len(), 2);
    let sizes: Vec<u64> = experiment
        .clients
        .iter()
        .map(|c| c.samples.len() as u64)
        .collect();
    assert_eq!(
        r.clients.iter().map(|c| c.samples).collect::<Vec<_>>(),
        sizes
    );
    let text = std::fs::read_to_string(report.folder.dir.join("settings.toml"))?;
    assert!(
        text.contains("training = \"local-only\"") && !text.contains("[strategy]"),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_missing_scenario_file_is_named() -> Result<()> {
    let w = world()?;
    let settings = w.settings(RunOptions {
        scenario: Some("no/such/scenario.toml".into()),
        ..RunOptions::default()
    })?;
    let message = w
        .experiment(&settings)
        .err()
        .map(|e| e.to_string())
        .context("a missing scenario was accepted")?;
    assert!(message.contains("no/such/scenario.toml"), "{message}");
    Ok(())
}

/// The recipe's data knobs reach the experiment: pooled visual tokens in
/// every batch, the separator in the caption layout; a token count the
/// encoder's grid cannot give is refused, naming the key.
#[test]
fn visual_tokens_and_the_separator_take_effect() -> Result<()> {
    let w = world()?;
    let settings = w.settings(RunOptions {
        visual_tokens: Some(1),
        caption_separator: Some("\n".into()),
        ..RunOptions::default()
    })?;
    let experiment = w.experiment(&settings)?;
    assert_eq!(experiment.cache.num_patches(), 4, "patch-means at 8 px");
    assert_eq!(experiment.cache.visual_tokens(), 1);
    let key = &experiment.clients[0].samples[0].key;
    assert_eq!(experiment.cache.batch(&[key])?.dims()[1], 1);
    assert_eq!(experiment.template.separator, "\n");
    let report = run_on(&experiment, &settings, false, &Silent)?;
    let Measured::Trained(r) = &report.measured else {
        anyhow::bail!("no training");
    };
    assert!(r.test_nll.r#final < r.test_nll.init);

    let bad = w.settings(RunOptions {
        visual_tokens: Some(3),
        ..RunOptions::default()
    })?;
    let message = w
        .experiment(&bad)
        .err()
        .map(|e| e.to_string())
        .context("3 visual tokens from a 2x2 grid were accepted")?;
    assert!(message.contains("visual-tokens = 3"), "{message}");
    Ok(())
}

#[test]
fn a_grid_of_one_setting_trains_no_tuning_run() -> Result<()> {
    use fedcmp_experiment::compare;
    let w = world()?;
    let template = w.settings(RunOptions::default())?;
    let out = w.dir.path().join("compare");
    let plan = w.plan(&template, &["fedavg"], out.clone())?;
    assert_eq!(plan.cells_per_scenario(), 1);
    let comparison = compare::run(&w.cache(), &template, &plan, &Silent)?;
    assert_eq!(comparison.reported.len(), 1);
    let method_dir = std::fs::read_dir(out.join("cells"))?
        .next()
        .context("a scenario folder")??
        .path()
        .join("fedavg");
    let mut files: Vec<String> = std::fs::read_dir(&method_dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    files.sort();
    assert_eq!(
        files,
        ["g0-s0.json", "g0-s0.safetensors", "g0-s0.settings.toml"],
        "no run at the tuning seed; the cell's projector and settings kept"
    );

    // A cell made when the grid held another setting at its index is
    // refused by name, not reported as this setting.
    let cell_path = method_dir.join("g0-s0.json");
    let mut cell: serde_json::Value = serde_json::from_slice(&std::fs::read(&cell_path)?)?;
    cell["config"]["server-lr"] = serde_json::json!(0.5);
    std::fs::write(&cell_path, serde_json::to_vec(&cell)?)?;
    let message = compare::run(&w.cache(), &template, &plan, &Silent)
        .err()
        .map(|e| e.to_string())
        .context("a cell of another setting was reused")?;
    assert!(
        message.contains("g0-s0.json") && message.contains("where the grid now has"),
        "{message}"
    );
    Ok(())
}

/// Appends to the world's manifest one record of each kind a run must skip
/// and show: a malformed line, a missing image, an image outside the
/// manifest's folder, and a file that is not an image (found by the
/// encoder, not the reader). Returns the manifest's path.
fn add_bad_records(w: &World) -> Result<PathBuf> {
    use std::io::Write;
    let manifest = w.dir.path().join("tiny.jsonl");
    std::fs::write(w.dir.path().join("images/not-an-image.png"), b"plain text")?;
    let mut file = std::fs::OpenOptions::new().append(true).open(&manifest)?;
    // The world's 48 lines come first: these are lines 49 to 52.
    writeln!(file, r#"{{"image": "images/0.png", "caption": "cut"#)?;
    writeln!(
        file,
        r#"{{"image": "images/gone.png", "caption": "Gone.", "source": "stripes"}}"#
    )?;
    writeln!(
        file,
        r#"{{"image": "../../etc/passwd", "caption": "Out.", "source": "stripes"}}"#
    )?;
    writeln!(
        file,
        r#"{{"image": "images/not-an-image.png", "caption": "Text.", "source": "stripes"}}"#
    )?;
    Ok(manifest)
}

/// The skips `add_bad_records` makes, as summary.json and results.json
/// hold them.
fn check_skips(skipped: &serde_json::Value, manifest: &Path) -> Result<()> {
    assert_eq!(skipped["total"], 4, "{skipped:#}");
    assert_eq!(
        skipped["counts"],
        serde_json::json!({"missing-image": 1, "undecodable-image": 1,
            "malformed-record": 1, "outside-root": 1}),
    );
    let examples = skipped["examples"].as_array().context("examples")?;
    let mut at: Vec<(&str, String, u64)> = examples
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or_default(),
                e["file"].as_str().unwrap_or_default().to_string(),
                e["line"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    at.sort();
    let manifest = manifest.display().to_string();
    let image = manifest.replace("tiny.jsonl", "images/not-an-image.png");
    // The reader's skips name the manifest and line; the encoder's, the
    // image (no line).
    assert_eq!(
        at,
        [
            ("malformed-record", manifest.clone(), 49),
            ("missing-image", manifest.clone(), 50),
            ("outside-root", manifest, 51),
            ("undecodable-image", image, 0),
        ]
    );
    Ok(())
}

#[test]
fn runs_and_comparisons_report_every_skipped_record() -> Result<()> {
    use fedcmp_experiment::compare;
    let w = world()?;
    let manifest = add_bad_records(&w)?;
    let settings = w.settings(RunOptions::default())?;
    let experiment = w.experiment(&settings)?;
    assert_eq!(experiment.skipped.total(), 4);
    let report = run_on(&experiment, &settings, false, &Silent)?;
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.folder.summary())?)?;
    check_skips(&summary["federation"]["skipped"], &manifest).context("summary.json")?;

    let plan = w.plan(&settings, &["init"], w.dir.path().join("compare"))?;
    let comparison = compare::run(&w.cache(), &settings, &plan, &Silent)?;
    let by_scenario = serde_json::to_value(&comparison.skipped)?;
    check_skips(&by_scenario["tiny"], &manifest).context("the comparison")?;
    Ok(())
}

/// The untrained projector's suite is computed once and then read back:
/// a second request (another method's run of the same seed) returns the
/// stored report, whatever it holds; another seed, or an unreadable entry,
/// is computed afresh.
#[test]
fn the_untrained_suite_is_computed_once_per_seed() -> Result<()> {
    use fedcmp_experiment::init_suite::untrained_suite;
    use fedcmp_runtime::convert::projector_params;
    let w = world()?;
    let settings = w.settings(RunOptions::default())?;
    let experiment = w.experiment(&settings)?;
    let memo = experiment
        .suite_memo
        .clone()
        .context("an assembled experiment memoises")?;
    let kind = settings.recipe.projector;
    let work = experiment.projector(kind, 0)?;
    let params = projector_params(&work)?;
    let entries = |dir: &Path| -> Result<Vec<PathBuf>> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
            .map(|e| Ok(e?.path()))
            .collect::<Result<_>>()?;
        found.sort();
        Ok(found)
    };
    let mut scored = 0;
    let first = untrained_suite(Some(&memo), &experiment, &work, &params, &mut |n| {
        scored += n
    })?;
    assert_eq!(scored, experiment.suite.num_pairs());
    let stored = entries(&memo)?;
    assert_eq!(stored.len(), 1);
    // Read back, not recomputed: a marked entry comes back as marked.
    let mut marked: serde_json::Value = serde_json::from_slice(&std::fs::read(&stored[0])?)?;
    marked["macro_nll"] = serde_json::json!(123.5);
    std::fs::write(&stored[0], serde_json::to_vec(&marked)?)?;
    let again = untrained_suite(Some(&memo), &experiment, &work, &params, &mut |_| {})?;
    assert_eq!(again.macro_nll, 123.5);
    assert_eq!(again.domains, first.domains);
    // Another seed is another projector.
    let other = projector_params(&experiment.projector(kind, 1)?)?;
    let second = untrained_suite(Some(&memo), &experiment, &work, &other, &mut |_| {})?;
    assert_eq!(entries(&memo)?.len(), 2);
    assert_ne!(second.macro_nll, first.macro_nll);
    // An unreadable entry is computed again (and replaced).
    std::fs::write(&stored[0], b"{ not json")?;
    let fresh = untrained_suite(Some(&memo), &experiment, &work, &params, &mut |_| {})?;
    assert_eq!(fresh, first);
    // Without a memo folder: computed, nothing stored.
    let none = untrained_suite(None, &experiment, &work, &params, &mut |_| {})?;
    assert_eq!(none, first);
    assert_eq!(entries(&memo)?.len(), 2);
    Ok(())
}

/// A hostile client (simulated): the run goes to its own folder, its
/// settings say so and read back, the federation samples the same clients
/// and batches as without it (paired), only the hostile client's update
/// differs, and the references refuse an attack.
#[test]
fn a_federation_with_a_hostile_client_is_paired_with_the_same_without() -> Result<()> {
    let w = world()?;
    let honest = w.settings(RunOptions::default())?;
    let attacked = w.settings(RunOptions {
        attack: Some(parse_attack(
            "{ kind = \"scaled\", factor = -10.0, clients = [1] }",
        )?),
        ..RunOptions::default()
    })?;
    let experiment = w.experiment(&honest)?;
    let a = run_on(&experiment, &honest, false, &Silent)?;
    let b = run_on(&experiment, &attacked, false, &Silent)?;
    assert!(
        b.folder.name.ends_with("-fedavg-scaled-clients-1-s0"),
        "{}",
        b.folder.name
    );
    let text = std::fs::read_to_string(b.folder.dir.join("settings.toml"))?;
    assert!(
        text.contains("[attack]") && text.contains("kind = \"scaled\""),
        "{text}"
    );
    let again = RunSettings::resolve(&Layers::new().file(&b.folder.dir.join("settings.toml"))?)?;
    assert_eq!(again, attacked);

    let (ma, mb) = (metrics_lines(&a.folder.dir)?, metrics_lines(&b.folder.dir)?);
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x["sampled"], y["sampled"], "the same clients sampled");
        assert_eq!(x["samples"], y["samples"]);
    }
    // Round 1 starts from the same model: client 0's update is the same,
    // client 1's is its honest one times -10.
    let norms = |m: &serde_json::Value| -> Vec<f64> {
        m["metrics"]["series"]["client_delta_norms"]
            .as_array()
            .map(|v| v.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default()
    };
    let (na, nb) = (norms(&ma[0]), norms(&mb[0]));
    assert_eq!(na.len(), 2, "{}", ma[0]);
    assert!((na[0] - nb[0]).abs() <= 1e-6 * na[0], "{na:?} {nb:?}");
    assert!((nb[1] / na[1] - 10.0).abs() < 1e-3, "{na:?} {nb:?}");

    let centralized = w.settings(RunOptions {
        training: Some(fedcmp_experiment::settings::TrainingKind::Centralized),
        attack: Some(parse_attack("{ kind = \"sign-flip\", count = 1 }")?),
        ..RunOptions::default()
    });
    let err = centralized.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("attack") && err.contains("federated"), "{err}");
    Ok(())
}

/// A private run (DP-FedAvg around FedAvgM): every round reports its
/// epsilon, summary.json the epsilon spent (the accountant's, at the
/// run's sampling rate), the settings read back; the settings refuse
/// privacy for the references, for strategies it does not compose with,
/// and a target epsilon without the rounds.
#[test]
fn a_private_run_reports_the_epsilon_it_spent() -> Result<()> {
    let w = world()?;
    let settings = w.settings(RunOptions {
        strategy: Some(parse_strategy("fedavgm")?),
        privacy: Some(parse_privacy(
            "{ clip-norm = 0.5, noise-multiplier = 1.1 }",
        )?),
        ..RunOptions::default()
    })?;
    let experiment = w.experiment(&settings)?;
    let report = run_on(&experiment, &settings, false, &Silent)?;
    let Measured::Trained(r) = &report.measured else {
        anyhow::bail!("no training");
    };
    let lines = metrics_lines(&report.folder.dir)?;
    let eps: Vec<f64> = lines
        .iter()
        .filter_map(|l| l["metrics"]["scalars"]["dp_epsilon"].as_f64())
        .collect();
    assert_eq!(eps.len(), lines.len(), "every round reports epsilon");
    assert!(eps.windows(2).all(|w| w[0] < w[1]), "{eps:?}");
    let privacy = r.privacy.as_ref().context("no privacy in the summary")?;
    let q = r.federation.clients_per_round as f64 / r.federation.clients as f64;
    let mut acc = fedcmp_strategy::privacy::accountant::RdpAccountant::default();
    acc.compose(q, 1.1, r.rounds)?;
    assert_eq!(privacy.epsilon, acc.epsilon(1e-5).0);
    assert_eq!(privacy.epsilon, *eps.last().unwrap_or(&f64::NAN));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.folder.summary())?)?;
    assert_eq!(summary["privacy"]["epsilon"], privacy.epsilon);
    let again = RunSettings::resolve(&Layers::new().file(&report.folder.settings())?)?;
    assert_eq!(again, settings);
    // The harness compares rules on the same updates: no privacy there.
    let plan = fedcmp_experiment::harness::HarnessPlan {
        scenarios: vec!["unused".into()],
        seeds: std::num::NonZeroU64::MIN,
        rounds: std::num::NonZeroU64::MIN,
        score_every: std::num::NonZeroU64::MIN,
        server_lrs: vec![1.0],
        rules: fedcmp_experiment::harness::default_rules()?,
        replay: false,
        out: w.dir.path().join("harness-private"),
    };
    let err = fedcmp_experiment::harness::run_scenario(&experiment, &settings, &plan, &Silent)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("privacy") && err.contains("harness"), "{err}");

    for (options, why) in [
        (
            RunOptions {
                training: Some(fedcmp_experiment::settings::TrainingKind::Centralized),
                privacy: Some(parse_privacy(
                    "{ clip-norm = 1.0, noise-multiplier = 1.0 }",
                )?),
                ..RunOptions::default()
            },
            "federated",
        ),
        (
            RunOptions {
                strategy: Some(parse_strategy("fed-cmp")?),
                privacy: Some(parse_privacy(
                    "{ clip-norm = 1.0, noise-multiplier = 1.0 }",
                )?),
                ..RunOptions::default()
            },
            "CRA",
        ),
        (
            RunOptions {
                privacy: Some(parse_privacy("{ clip-norm = 1.0, target-epsilon = 8.0 }")?),
                ..RunOptions::default()
            },
            "rounds",
        ),
    ] {
        let err = w
            .settings(options)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("privacy") && err.contains(why), "{err}");
    }
    Ok(())
}

/// A run under local DP (each client clips and noises its update): it
/// composes with Fed-CMP (the noise is added before the server reads
/// anything), every round reports the epsilon of the client that released
/// most (sampling rate 1, multiplier z / 2), the clients' losses are
/// withheld (`train_loss` null), summary.json says `local`; a resumed run
/// continues bit for bit (each client's secret is in its store); SCAFFOLD
/// is refused.
#[test]
fn a_locally_private_run_reports_each_sites_epsilon_and_resumes() -> Result<()> {
    let w = world()?;
    let privacy = parse_privacy(r#"{ mode = "local", clip-norm = 0.5, noise-multiplier = 0.02 }"#)?;
    let options = |checkpoint_every| -> Result<RunOptions> {
        Ok(RunOptions {
            strategy: Some(parse_strategy("fed-cmp")?),
            privacy: Some(privacy.clone()),
            checkpoint_every,
            ..RunOptions::default()
        })
    };
    let settings = w.settings(options(Some(1))?)?;
    let experiment = w.experiment(&settings)?;
    let report = run_on(&experiment, &settings, false, &Silent)?;
    let Measured::Trained(r) = &report.measured else {
        anyhow::bail!("no training");
    };
    let lines = metrics_lines(&report.folder.dir)?;
    for l in &lines {
        assert!(l["train_loss"].is_null(), "a loss left a client: {l}");
    }
    let eps: Vec<f64> = lines
        .iter()
        .filter_map(|l| l["metrics"]["scalars"]["dp_epsilon"].as_f64())
        .collect();
    assert_eq!(eps.len(), lines.len(), "every round reports epsilon");
    let privacy = r.privacy.as_ref().context("no privacy in the summary")?;
    let dp = settings
        .privacy
        .as_ref()
        .context("no privacy")?
        .resolve_local(None)?;
    // Full participation here: every client released in every round.
    assert_eq!(privacy.epsilon, dp.epsilon(r.rounds)?);
    assert_eq!(privacy.sampling_rate, 1.0);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.folder.summary())?)?;
    assert_eq!(summary["privacy"]["mode"], "local");
    assert!(r.test_nll.r#final.is_finite());

    // A kill before the last round's checkpoint was durable: the resumed
    // run (each client's secret read back from its store) ends with the
    // same projector, bit for bit.
    let dir = report.folder.dir.clone();
    assert!(r.rounds >= 2, "{} rounds", r.rounds);
    assert!(std::fs::read_dir(dir.join("clients"))?
        .filter_map(|e| e.ok())
        .all(|e| e.path().join("dp-secret").exists()));
    let straight = std::fs::read(dir.join("projector.safetensors"))?;
    let checkpoints = dir.join("checkpoints");
    let last = r.rounds;
    std::fs::remove_dir_all(checkpoints.join(format!("round-{last:06}")))?;
    std::fs::write(checkpoints.join("LATEST"), format!("round-{:06}", last - 1))?;
    std::fs::remove_file(dir.join("projector.safetensors"))?;
    let resumed = run_on(&experiment, &settings, false, &Silent)?;
    let Measured::Trained(rr) = &resumed.measured else {
        anyhow::bail!("no training");
    };
    assert_eq!(rr.resumed_after, Some(last - 1));
    assert_eq!(std::fs::read(dir.join("projector.safetensors"))?, straight);

    // SCAFFOLD's control variate would leave a client unnoised.
    let err = w
        .settings(RunOptions {
            strategy: Some(parse_strategy("scaffold")?),
            ..options(None)?
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("privacy") && err.contains("control variate"),
        "{err}"
    );
    Ok(())
}
