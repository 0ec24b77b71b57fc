//! Run settings: which layer wins, errors that name the key, its value and
//! where it was set, unknown keys refused, and the resolved settings read
//! back from their own TOML unchanged.

use std::path::Path;

use anyhow::{Context, Result};
use fedcmp_experiment::settings::{env_var, parse_strategy, TrainingKind, KEYS};
use fedcmp_experiment::{Layers, RunOptions, RunSettings, Training};
use fedcmp_strategy::config::StrategyConfig;
use proptest::prelude::*;

fn write(dir: &Path, name: &str, text: &str) -> Result<std::path::PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn every_option_key_is_listed_and_maps_to_its_variable() -> Result<()> {
    let full = RunOptions {
        scenario: Some("iid".into()),
        limit: Some(1),
        captions: Some(Default::default()),
        caption_separator: Some("\n".into()),
        training: Some(TrainingKind::Federated),
        seed: Some(1),
        rounds: Some(1),
        local_steps: Some(1),
        batch_size: Some(1),
        lr: Some(1.0),
        warmup_ratio: Some(0.0),
        reset_optimizer: Some(true),
        projector: Some("linear".into()),
        eval_every: Some(1),
        checkpoint_every: Some(1),
        quorum: Some(1),
        round_deadline: Some(1.0),
        failure_limit: Some(1),
        clients_per_pass: Some(fedcmp_experiment::settings::ClientsPerPass::At(
            std::num::NonZeroUsize::MIN.saturating_add(1),
        )),
        llm: Some("x.gguf".into()),
        vision: Some(Default::default()),
        vision_feature_layer: Some(-2),
        image_size: Some(1),
        visual_tokens: Some(4),
        out: Some("o".into()),
        attack: Some(fedcmp_experiment::settings::parse_attack(
            "{ kind = \"sign-flip\", count = 1 }",
        )?),
        privacy: Some(fedcmp_experiment::settings::parse_privacy(
            "{ clip-norm = 1.0, noise-multiplier = 1.0 }",
        )?),
        strategy: Some(StrategyConfig::default()),
    };
    let table = toml::Table::try_from(&full)?;
    let keys: Vec<&str> = table.keys().map(String::as_str).collect();
    let mut listed = KEYS.to_vec();
    listed.sort_unstable();
    let mut found = keys.clone();
    found.sort_unstable();
    assert_eq!(found, listed, "KEYS must list every option");
    assert_eq!(env_var("local-steps"), "FEDCMP_LOCAL_STEPS");
    Ok(())
}

#[test]
fn flags_beat_the_environment_which_beats_the_file_which_beats_defaults() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write(
        dir.path(),
        "run.toml",
        "local-steps = 2\nbatch-size = 3\nlr = 0.01\nseed = 9\n[strategy]\nname = \"fed-cmp\"\nenergy = 0.8\n",
    )?;
    let layers = Layers::new()
        .defaults(
            "the test's defaults",
            &RunOptions {
                local_steps: Some(7),
                eval_every: Some(2),
                ..RunOptions::default()
            },
        )?
        .file(&file)?
        .environment(vars(&[
            ("FEDCMP_BATCH_SIZE", "5"),
            ("FEDCMP_LR", "2e-3"),
            ("FEDCMP_SCENARIO", "iid"),
            ("PATH", "/bin"),
        ]))?
        .flags(&RunOptions {
            lr: Some(0.5),
            ..RunOptions::default()
        })?;
    let s = RunSettings::resolve(&layers)?;
    assert_eq!(s.recipe.local_steps.get(), 2, "file over defaults");
    assert_eq!(s.recipe.batch_size.get(), 5, "environment over file");
    assert_eq!(s.recipe.lr, 0.5, "flags over environment");
    assert_eq!(
        s.protocol.eval_every.get(),
        2,
        "defaults where nothing else sets it"
    );
    assert_eq!(s.data.scenario, "iid", "a string from the environment");
    assert_eq!(s.seed, 9);
    assert_eq!(s.protocol.checkpoint_every.get(), 5, "the built-in default");
    match &s.training {
        Training::Federated(StrategyConfig::FedCmp(c)) => assert_eq!(c.cra.energy, 0.8),
        other => panic!("expected fed-cmp, got {other:?}"),
    }
    assert_eq!(layers.origin("lr"), "--lr");
    assert_eq!(layers.origin("batch-size"), "FEDCMP_BATCH_SIZE");
    assert_eq!(layers.origin("local-steps"), file.display().to_string());
    assert_eq!(layers.origin("eval-every"), "the test's defaults");
    assert_eq!(layers.origin("quorum"), "default");
    let origins = RunSettings::origins(&layers);
    assert!(origins
        .iter()
        .any(|(k, o)| *k == "strategy" && o.ends_with("run.toml")));
    Ok(())
}

#[test]
fn bad_values_name_the_key_the_value_and_where_it_was_set() -> Result<()> {
    let message = |layers: Result<Layers, fedcmp_experiment::ExperimentError>| -> String {
        match layers.and_then(|l| RunSettings::resolve(&l)) {
            Ok(s) => format!("accepted: {s:?}"),
            Err(e) => e.to_string(),
        }
    };
    let from_env = message(Layers::new().environment(vars(&[("FEDCMP_LOCAL_STEPS", "0")])));
    assert!(
        from_env.contains("local-steps = 0")
            && from_env.contains("FEDCMP_LOCAL_STEPS")
            && from_env.contains("at least 1"),
        "{from_env}"
    );
    let from_flag = message(Layers::new().flags(&RunOptions {
        lr: Some(-1.0),
        ..RunOptions::default()
    }));
    assert!(
        from_flag.contains("lr = -1") && from_flag.contains("--lr"),
        "{from_flag}"
    );
    let typed = message(Layers::new().environment(vars(&[("FEDCMP_SEED", "many")])));
    assert!(
        typed.contains("seed") && typed.contains("FEDCMP_SEED"),
        "{typed}"
    );

    let dir = tempfile::tempdir()?;
    let unknown = write(dir.path(), "bad.toml", "local-step = 2\n")?;
    let refused = message(Layers::new().file(&unknown));
    assert!(
        refused.contains("bad.toml")
            && refused.contains("local-step")
            && refused.contains("line 1"),
        "{refused}"
    );
    let strategy_key = write(
        dir.path(),
        "bad2.toml",
        "[strategy]\nname = \"fed-cmp\"\nenrgy = 1\n",
    )?;
    let refused = message(Layers::new().file(&strategy_key));
    assert!(
        refused.contains("bad2.toml") && refused.contains("enrgy"),
        "{refused}"
    );
    let bad_strategy = message(Layers::new().flags(&RunOptions {
        strategy: Some(parse_strategy("{ name = \"fedavgm\", momentum = 1.5 }")?),
        ..RunOptions::default()
    }));
    assert!(
        bad_strategy.contains("strategy = fedavgm") && bad_strategy.contains("momentum"),
        "{bad_strategy}"
    );
    let centralized_with_strategy = message(Layers::new().flags(&RunOptions {
        training: Some(TrainingKind::Centralized),
        strategy: Some(parse_strategy("fed-cmp")?),
        ..RunOptions::default()
    }));
    assert!(
        centralized_with_strategy.contains("no server strategy"),
        "{centralized_with_strategy}"
    );
    assert!(parse_strategy("fedprocks").is_err());

    // A strategy from a lower layer gives way to centralized training.
    let federated = write(
        dir.path(),
        "federated.toml",
        "[strategy]\nname = \"fed-cmp\"\n",
    )?;
    let centralized =
        RunSettings::resolve(&Layers::new().file(&federated)?.flags(&RunOptions {
            training: Some(TrainingKind::Centralized),
            ..RunOptions::default()
        })?)?;
    assert_eq!(centralized.training, Training::Centralized);
    Ok(())
}

/// Options drawn over every key, valid or not.
fn any_options() -> impl Strategy<Value = RunOptions> {
    let strategies = prop_oneof![
        Just(None),
        Just(Some("fedavg")),
        Just(Some("{ name = \"fed-cmp\", energy = 0.9, tau = \"inf\" }")),
        Just(Some("{ name = \"fedprox\", mu = 0.1 }")),
        Just(Some("{ name = \"scaffold\", weighting = \"samples\" }")),
    ];
    let training = prop_oneof![
        Just(None),
        Just(Some(TrainingKind::Federated)),
        Just(Some(TrainingKind::Centralized)),
        Just(Some(TrainingKind::LocalOnly)),
    ];
    (
        (
            proptest::option::of("[a-z][a-z-]{0,12}"),
            proptest::option::of(0usize..500),
            training,
            proptest::option::of(any::<u64>()),
            proptest::option::of(0u64..50),
            proptest::option::of(0usize..9),
            proptest::option::of(0usize..64),
            proptest::option::of(-1e-2f64..1.0),
        ),
        (
            proptest::option::of(0.0f64..1.2),
            proptest::option::of(any::<bool>()),
            proptest::option::of(prop_oneof![
                Just("linear"),
                Just("mlp2x_gelu"),
                Just("mlp3")
            ]),
            proptest::option::of(0u64..10),
            proptest::option::of(0usize..4),
            proptest::option::of(0.0f64..100.0),
            proptest::option::of(0u32..5),
            strategies,
        ),
        (
            proptest::option::of(prop_oneof![
                Just(fedcmp_data::templates::CaptionStyle::Varied),
                Just(fedcmp_data::templates::CaptionStyle::Content)
            ]),
            proptest::option::of(prop_oneof![Just(""), Just("\n"), Just(" \"quoted\" ")]),
            proptest::option::of(0usize..20),
            proptest::option::of(prop_oneof![
                Just(fedcmp_experiment::settings::ClientsPerPass::All),
                (1usize..9).prop_map(|n| fedcmp_experiment::settings::ClientsPerPass::At(
                    std::num::NonZeroUsize::MIN.saturating_add(n - 1)
                )),
            ]),
        ),
    )
        .prop_map(
            |(
                (scenario, limit, training, seed, rounds, local_steps, batch_size, lr),
                (
                    warmup_ratio,
                    reset_optimizer,
                    projector,
                    eval_every,
                    quorum,
                    round_deadline,
                    failure_limit,
                    strategy,
                ),
                (captions, caption_separator, visual_tokens, clients_per_pass),
            )| RunOptions {
                clients_per_pass,
                captions,
                caption_separator: caption_separator.map(String::from),
                visual_tokens,
                scenario,
                limit,
                training,
                seed,
                rounds,
                local_steps,
                batch_size,
                lr,
                warmup_ratio,
                reset_optimizer,
                projector: projector.map(String::from),
                eval_every,
                quorum,
                round_deadline,
                failure_limit,
                strategy: strategy.and_then(|s| parse_strategy(s).ok()),
                ..RunOptions::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Whatever resolves, resolves again to the same settings from its own
    /// TOML file (what run folders hold and `--config` reads).
    #[test]
    fn resolved_settings_read_back_from_their_toml_unchanged(options in any_options()) {
        let layers = match Layers::new().flags(&options) {
            Ok(layers) => layers,
            Err(e) => {
                // Only integers past TOML's range are refused this early.
                prop_assert!(e.to_string().contains("TOML integer"), "{}", e);
                return Ok(());
            }
        };
        let Ok(settings) = RunSettings::resolve(&layers) else {
            return Ok(());
        };
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let path = dir.path().join("settings.toml");
        let text = settings.to_toml().map_err(|e| TestCaseError::fail(e.to_string()))?;
        std::fs::write(&path, &text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let again = Layers::new()
            .file(&path)
            .and_then(|l| RunSettings::resolve(&l))
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&again, &settings, "{}", text);
        prop_assert_eq!(again.to_toml().map_err(|e| TestCaseError::fail(e.to_string()))?, text);
    }
}

#[test]
fn a_settings_file_names_every_resolved_value() -> Result<()> {
    let s = RunSettings::resolve(&Layers::new())?;
    let text = s.to_toml()?;
    let table: toml::Table = toml::from_str(&text)?;
    for key in KEYS {
        let optional = [
            "limit",
            "rounds",
            "round-deadline",
            "llm",
            "captions",
            "visual-tokens",
            "vision-feature-layer",
            "attack",
            "privacy",
        ]
        .contains(&key);
        assert_eq!(table.contains_key(key), !optional, "{key} in\n{text}");
    }
    let strategy = table.get("strategy").context("strategy")?;
    assert_eq!(
        strategy.get("name").and_then(|n| n.as_str()),
        Some("fedavg")
    );
    Ok(())
}

/// `clients-per-pass` is a number or "all" (the default): every client of
/// a round while their batches hold at most SAMPLES_PER_PASS pairs, as
/// many as fit otherwise; it reads the same from a file, a variable and
/// back from the resolved settings, and anything else is refused with the
/// key named.
#[test]
fn clients_per_pass_is_a_number_or_all() -> Result<()> {
    use fedcmp_experiment::settings::{ClientsPerPass, SAMPLES_PER_PASS};
    use std::num::NonZeroUsize;
    let default = RunSettings::resolve(&Layers::new())?;
    assert_eq!(default.protocol.clients_per_pass, ClientsPerPass::All);
    assert_eq!(ClientsPerPass::All.resolve(8, 2), 8);
    assert_eq!(ClientsPerPass::All.resolve(8, SAMPLES_PER_PASS / 4), 4);
    assert_eq!(ClientsPerPass::All.resolve(1_000, 1), SAMPLES_PER_PASS);
    assert_eq!(ClientsPerPass::All.resolve(3, 10 * SAMPLES_PER_PASS), 1);
    let three = ClientsPerPass::At(NonZeroUsize::new(3).context("3")?);
    assert_eq!(three.resolve(8, 2), 3);
    assert_eq!("all".parse::<ClientsPerPass>(), Ok(ClientsPerPass::All));
    assert_eq!("3".parse::<ClientsPerPass>(), Ok(three));
    for bad in ["0", "some", "-1", ""] {
        assert!(bad.parse::<ClientsPerPass>().is_err(), "{bad:?}");
    }
    let dir = tempfile::tempdir()?;
    for (text, want) in [("\"all\"", ClientsPerPass::All), ("3", three)] {
        let file = write(
            dir.path(),
            "s.toml",
            &format!("clients-per-pass = {text}\n"),
        )?;
        let from_file = RunSettings::resolve(&Layers::new().file(&file)?)?;
        assert_eq!(from_file.protocol.clients_per_pass, want);
        let raw = text.trim_matches('"');
        let from_env = RunSettings::resolve(
            &Layers::new().environment(vars(&[("FEDCMP_CLIENTS_PER_PASS", raw)]))?,
        )?;
        assert_eq!(from_env.protocol.clients_per_pass, want);
        let written = from_file.to_toml()?;
        assert!(
            written.contains(&format!("clients-per-pass = {text}")),
            "{written}"
        );
    }
    for bad in ["0", "\"half\""] {
        let file = write(
            dir.path(),
            "bad.toml",
            &format!("clients-per-pass = {bad}\n"),
        )?;
        let message = Layers::new()
            .file(&file)
            .err()
            .map(|e| e.to_string())
            .context("a bad clients-per-pass was accepted")?;
        assert!(
            message.contains("clients-per-pass") && message.contains("bad.toml"),
            "{message}"
        );
    }
    Ok(())
}
