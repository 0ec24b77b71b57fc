//! Using a saved projector: the evaluation suite run again on a saved
//! projector (a run folder's, a comparison cell's) reproduces the numbers
//! its run reported, and captions for image files skip unreadable ones
//! with their reason.

use std::path::PathBuf;

use anyhow::{Context, Result};
use fedcmp_experiment::compare;
use fedcmp_experiment::run_folder::{run_on, Measured};
use fedcmp_experiment::saved::{CellChoice, SavedProjector};
use fedcmp_experiment::use_saved::{caption_images, evaluate_saved, CaptionOptions, Decoding};
use fedcmp_experiment::{RunOptions, Silent};
use fedcmp_runtime::suite::SuiteConfig;

use crate::runs::{small_suite, world};

#[test]
fn eval_of_a_saved_projector_reproduces_what_its_run_reported() -> Result<()> {
    let w = world()?;
    // A run folder (its suite: the defaults).
    let settings = w.settings(RunOptions::default())?;
    let experiment = fedcmp_experiment::Experiment::assemble(
        &w.cache(),
        &settings.data,
        SuiteConfig::default(),
        &Silent,
    )?;
    let report = run_on(&experiment, &settings, false, &Silent)?;
    let Measured::Trained(trained) = &report.measured else {
        anyhow::bail!("no training");
    };
    let saved = SavedProjector::locate(&report.folder.dir, &CellChoice::default())?;
    let (scenario, again) = evaluate_saved(&w.cache(), &saved, None, &Silent)?;
    assert_eq!(scenario, experiment.scenario.name);
    assert!(
        again == trained.suite.r#final,
        "the run folder's final suite, again"
    );
    assert!(again != trained.suite.init);

    // A comparison cell (its suite: the comparison's pinned sizes).
    let out = w.dir.path().join("compare");
    let plan = w.plan(&settings, &["fedavg"], out.clone())?;
    let comparison = compare::run(&w.cache(), &settings, &plan, &Silent)?;
    let cell_suite = comparison.reported[0]
        .suite
        .clone()
        .context("a reported cell has a suite")?;
    let saved = SavedProjector::locate(
        &out,
        &CellChoice {
            method: Some("fedavg".into()),
            ..CellChoice::default()
        },
    )?;
    assert_eq!(saved.suite, small_suite());
    let (_, again) = evaluate_saved(&w.cache(), &saved, None, &Silent)?;
    assert!(again == cell_suite, "the cell's suite, again");
    Ok(())
}

#[test]
fn captions_for_image_files_skip_the_unreadable_ones() -> Result<()> {
    let w = world()?;
    let saved = w.saved_run()?;

    let images = w.dir.path().join("images");
    let corrupt = w.dir.path().join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\n but no more")?;
    let given = vec![
        images.join("0.png"),
        corrupt.clone(),
        images.join("40.png"),
        w.dir.path().join("missing.png"),
    ];
    for decoding in [Decoding::Greedy, Decoding::Beam { width: 3 }] {
        let options = CaptionOptions {
            decoding,
            max_tokens: 5,
        };
        let captions = caption_images(&w.cache(), &saved, &given, options, &Silent)?;
        let order: Vec<_> = captions.iter().map(|c| c.image.clone()).collect();
        assert_eq!(order, given, "in the order given");
        assert!(captions[0].caption.is_ok() && captions[2].caption.is_ok());
        let why = |i: usize| captions[i].caption.clone().err().unwrap_or_default();
        assert!(why(1).contains("undecodable image"), "{}", why(1));
        assert!(why(3).contains("missing image"), "{}", why(3));
        // The same image, the same caption (deterministic decoding).
        let again = caption_images(&w.cache(), &saved, &given[..1], options, &Silent)?;
        assert_eq!(again[0].caption, captions[0].caption);
        // Greedy captions are decoded in one batch of the readable images:
        // each still lands on its own image, past the skipped ones.
        let third = caption_images(&w.cache(), &saved, &given[2..3], options, &Silent)?;
        assert_eq!(third[0].caption, captions[2].caption);
    }
    Ok(())
}

/// A site's own manifest: every usable pair is scored (per source, with
/// zero-shot where it has labels); malformed lines and missing images are
/// skipped and reported with file and line.
#[test]
fn eval_on_a_manifest_scores_every_usable_pair_and_reports_the_rest() -> Result<()> {
    use fedcmp_experiment::use_saved::{evaluate_manifest, ManifestFile};
    let w = world()?;
    let saved = w.saved_run()?;

    let site = w.dir.path().join("site");
    std::fs::create_dir_all(&site)?;
    let mut lines = Vec::new();
    for i in 0..6 {
        let label = if i % 2 == 0 { "day" } else { "night" };
        let image = w.dir.path().join(format!("images/{i}.png"));
        lines.push(
            serde_json::json!({"image": image, "caption": format!("{label}."),
                                      "label": label, "source": "my-site"})
            .to_string(),
        );
    }
    lines.push("{\"image\": \"x.png\", \"caption\": ".to_string());
    lines.push(serde_json::json!({"image": "missing.png", "caption": "day."}).to_string());
    let manifest = site.join("held-out.jsonl");
    std::fs::write(&manifest, lines.join("\n") + "\n")?;

    // The images are outside the manifest's folder: by default none is
    // read, and the error says why.
    let file = |path: PathBuf, image_root: Option<PathBuf>| ManifestFile {
        path,
        image_root,
        allow_images_outside_root: false,
    };
    let refused = evaluate_manifest(&w.cache(), &saved, &file(manifest.clone(), None), &Silent)
        .err()
        .map(|e| e.to_string())
        .context("images outside the manifest's folder were read")?;
    assert!(
        refused.contains("no usable pair") && refused.contains("6 image outside its root"),
        "{refused}"
    );
    let manifest = file(manifest, Some(w.dir.path().to_path_buf()));
    let outcome = evaluate_manifest(&w.cache(), &saved, &manifest, &Silent)?;
    assert_eq!(outcome.pairs, 6);
    assert_eq!(outcome.skipped.total(), 2);
    let lines_named: Vec<Option<usize>> =
        outcome.skipped.examples().iter().map(|e| e.line).collect();
    assert!(
        lines_named.contains(&Some(7)) && lines_named.contains(&Some(8)),
        "{lines_named:?}"
    );
    let report = &outcome.report;
    assert_eq!(report.domains.len(), 1);
    assert!(report.macro_nll.is_finite());
    assert!(
        report.macro_zero_shot_accuracy.is_some(),
        "labels give zero-shot"
    );
    let again = evaluate_manifest(&w.cache(), &saved, &manifest, &Silent)?;
    assert!(again.report == outcome.report, "deterministic");

    let msg = evaluate_manifest(
        &w.cache(),
        &saved,
        &file(site.join("pairs.txt"), None),
        &Silent,
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(msg.contains("expected a .jsonl or .csv manifest"), "{msg}");
    Ok(())
}
