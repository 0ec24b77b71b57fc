//! `fedcmp compare` on a tiny model and tiny data: two domains (bright /
//! dark images captioned by class, and a striped unlabelled one), two
//! clients, every kind of method; then a second invocation that finds
//! every cell done.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Result};
use fedcmp_testkit::tiny_world as world;

/// The generated decoder and scenario under `dir`.
fn tiny_world(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let w = world(dir)?;
    Ok((w.gguf, w.scenario))
}

/// The matrix of the main test: every kind of method, 2 seeds, grid 2.
const MATRIX: [&str; 14] = [
    "--methods",
    "fedavg,fed-cmp,centralized,local-only,init",
    "--seeds",
    "2",
    "--grid",
    "2",
    "--local-steps",
    "2",
    "--batch-size",
    "4",
    "--lr",
    "1e-2",
    "--zero-shot-images",
    "6",
];

/// `compare` on the tiny world with `matrix` for the methods and sizes.
fn compare(
    bin: &str,
    gguf: &Path,
    scenario: &Path,
    out: &Path,
    cache: &Path,
    jobs: usize,
    matrix: &[&str],
) -> Result<String> {
    let output = Command::new(bin)
        .args(["--cache-dir", &cache.display().to_string(), "compare"])
        .args(["--scenarios", &scenario.display().to_string()])
        .args(matrix)
        .args(["--caption-checks", "2", "--caption-examples", "2"])
        .args(["--llm", &gguf.display().to_string()])
        .args(["--vision", "patch-means", "--image-size", "8", "--no-plots"])
        .args(["--out", &out.display().to_string()])
        .args(["--jobs", &jobs.to_string()])
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "compare failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

fn cell_files(out: &Path) -> Result<Vec<(PathBuf, std::time::SystemTime)>> {
    let mut files = Vec::new();
    let mut stack = vec![out.join("cells")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "json") {
                let modified = std::fs::metadata(&path)?.modified()?;
                files.push((path, modified));
            }
        }
    }
    files.sort();
    Ok(files)
}

#[test]
fn compare_runs_the_matrix_reports_and_resumes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (gguf, scenario) = tiny_world(dir.path())?;
    let out = dir.path().join("out");
    let cache = dir.path().join("cache");
    let bin = env!("CARGO_BIN_EXE_fedcmp");
    let first = compare(bin, &gguf, &scenario, &out, &cache, 1, &MATRIX)?;

    // 2 federated methods x (2 tuning settings at the tuning seed + 2
    // reported seeds) + 3 references x 2.
    let cells = cell_files(&out)?;
    assert_eq!(cells.len(), 2 * 4 + 3 * 2, "{cells:#?}");
    assert!(cells
        .iter()
        .any(|(p, _)| p.to_string_lossy().ends_with("fedavg/g1-s1000.json")));
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json"))?)?;
    let reported = results["cells"].as_array().map_or(0, Vec::len);
    assert_eq!(
        reported,
        2 * 2 + 3 * 2,
        "2 seeds of the best setting + references"
    );
    // Every tuning run is in results.json; each method's reported setting
    // is the one with the lowest validation NLL at the tuning seed.
    let tuning = results["tuning"].as_array().cloned().unwrap_or_default();
    assert_eq!(tuning.len(), 2 * 2, "{tuning:#?}");
    for method in ["fedavg", "fed-cmp"] {
        let runs: Vec<&serde_json::Value> =
            tuning.iter().filter(|c| c["method"] == method).collect();
        assert!(runs.iter().all(|c| c["seed"] == 1000));
        let best = runs
            .iter()
            .min_by(|a, b| {
                let v = |c: &serde_json::Value| c["val_nll"].as_f64().unwrap_or(f64::INFINITY);
                v(a).total_cmp(&v(b))
            })
            .map(|c| c["setting"].clone());
        for cell in results["cells"].as_array().into_iter().flatten() {
            if cell["method"] == method {
                assert_eq!(Some(cell["setting"].clone()), best, "{method}");
            }
        }
    }
    let report = std::fs::read_to_string(out.join("report.md"))?;
    assert!(report.contains("## Tuning (validation NLL at the tuning seed"));
    for cell in results["cells"].as_array().into_iter().flatten() {
        let suite = &cell["suite"];
        assert!(
            suite.is_object(),
            "every reported cell has test scores: {cell}"
        );
        assert!(suite["macro_nll"].as_f64().is_some_and(f64::is_finite));
        let method = cell["method"].as_str().unwrap_or("");
        let zero_shot = suite["macro_zero_shot_accuracy"].as_f64();
        if method == "local-only" {
            assert!(zero_shot.is_none(), "local-only is scored on NLL only");
        } else {
            // Only the "sky" domain has labels: 6 images, 2 classes.
            assert!(
                zero_shot.is_some_and(|a| (0.0..=1.0).contains(&a)),
                "{cell}"
            );
        }
    }
    // Trained methods beat the untrained projector on test NLL.
    let nll = |m: &str| -> f64 {
        let v: Vec<f64> = results["cells"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["method"] == m)
            .filter_map(|c| c["suite"]["macro_nll"].as_f64())
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    assert!(nll("centralized") < nll("init"));
    assert!(nll("fedavg") < nll("init"));
    let report = std::fs::read_to_string(out.join("report.md"))?;
    for heading in [
        "Test caption NLL",
        "Recovery",
        "zero-shot",
        "name the image's class",
        "Chosen settings",
    ] {
        assert!(
            report.contains(heading),
            "report lacks {heading}:\n{report}"
        );
    }
    assert!(report.contains("| fed-cmp |") && report.contains("**"));
    assert!(
        report.contains("Paired differences") && report.contains("vs fedavg"),
        "{report}"
    );
    assert!(
        report.contains("Merges and sequential steps per run")
            && report.contains(" merges, ")
            && report.contains(" steps |"),
        "{report}"
    );
    assert!(first.contains("fed-cmp") && first.contains("recovery"));
    let printed = |method: &str, baseline: &str| {
        first.lines().any(|l| {
            l.contains(&format!(" {method} "))
                && l.contains(&format!("vs {baseline} "))
                && l.contains('[')
        })
    };
    assert!(
        printed("fedavg", "init") && printed("fed-cmp", "fedavg") && printed("centralized", "init"),
        "paired differences with intervals are printed:\n{first}"
    );
    assert!(
        first.contains("greedy captions") && first.contains("(reference: "),
        "{first}"
    );

    // Second invocation: every cell is found, none is rerun.
    let second = compare(bin, &gguf, &scenario, &out, &cache, 1, &MATRIX)?;
    assert_eq!(cell_files(&out)?, cells, "finished cells were rerun");
    let rows = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("tiny"))
            .map(String::from)
            .collect()
    };
    assert_eq!(rows(&first), rows(&second));

    // Other settings in the same folder are refused (cells would mix).
    let mut other = MATRIX;
    let lr = 1 + other.iter().position(|a| *a == "--lr").unwrap_or(0);
    other[lr] = "2e-2";
    let refused = compare(bin, &gguf, &scenario, &out, &cache, 1, &other);
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("other settings"), "{message}");

    // Methods in parallel: the same cells and the same chosen settings.
    let parallel = dir.path().join("parallel");
    compare(bin, &gguf, &scenario, &parallel, &cache, 3, &MATRIX)?;
    let names = |out: &Path| -> Result<Vec<PathBuf>> {
        Ok(cell_files(out)?
            .into_iter()
            .filter_map(|(p, _)| p.strip_prefix(out).ok().map(Path::to_path_buf))
            .collect())
    };
    assert_eq!(names(&parallel)?, names(&out)?);
    Ok(())
}

/// A diverging setting is recorded as a failed cell, not fatal: the matrix
/// finishes and the report lists it.
#[test]
fn diverging_runs_are_recorded_not_fatal() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (gguf, scenario) = tiny_world(dir.path())?;
    let out = dir.path().join("out");
    let bin = env!("CARGO_BIN_EXE_fedcmp");
    let extra = [
        "--lr",
        "1e30",
        "--methods",
        "fedavg,init",
        "--seeds",
        "1",
        "--grid",
        "1",
    ];
    compare(
        bin,
        &gguf,
        &scenario,
        &out,
        &dir.path().join("cache"),
        1,
        &extra,
    )?;
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json"))?)?;
    let fedavg: Vec<&serde_json::Value> = results["cells"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["method"] == "fedavg")
        .collect();
    assert_eq!(fedavg.len(), 1);
    assert!(fedavg[0]["error"].is_string(), "{}", fedavg[0]);
    assert!(fedavg[0]["val_nll"].is_null());
    let report = std::fs::read_to_string(out.join("report.md"))?;
    assert!(report.contains("Failed runs"), "{report}");
    Ok(())
}
