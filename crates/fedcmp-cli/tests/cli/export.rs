//! `fedcmp scenario export` on the tiny world: one folder per client with
//! its shard as a manifest and PNG images, the held-out splits beside
//! them; every record of the scenario lands in exactly one file.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{ensure, Result};

#[test]
fn export_writes_every_shard_and_split_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let world = fedcmp_testkit::tiny_world(dir.path())?;
    let out = dir.path().join("sites");
    let output = Command::new(env!("CARGO_BIN_EXE_fedcmp"))
        .args([
            "--cache-dir",
            &dir.path().join("cache").display().to_string(),
        ])
        .args(["scenario", "export", &world.scenario.display().to_string()])
        .args(["--out", &out.display().to_string()])
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "export failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut ids = BTreeSet::new();
    let mut lines = 0;
    for file in [
        "site-0000/data.jsonl",
        "site-0001/data.jsonl",
        "held-out/validation.jsonl",
        "held-out/test.jsonl",
    ] {
        let path = out.join(file);
        let text = std::fs::read_to_string(&path)?;
        for line in text.lines() {
            let record: serde_json::Value = serde_json::from_str(line)?;
            let image = record["image"].as_str().unwrap_or_default();
            let folder = path.parent().map(|p| p.join(image));
            ensure!(
                folder.is_some_and(|p| p.is_file()),
                "{file}: image {image} was not written"
            );
            ensure!(record["caption"].as_str().is_some_and(|c| !c.is_empty()));
            ids.insert(format!("{}/{}", record["source"], record["id"]));
            lines += 1;
        }
    }
    // The tiny world's 48 records, each exported once.
    ensure!(
        lines == 48 && ids.len() == 48,
        "{lines} lines, {} ids",
        ids.len()
    );
    for shown in ["site   0:", "site   1:", "validation:", "test:"] {
        ensure!(stdout.contains(shown), "{shown} missing from:\n{stdout}");
    }
    Ok(())
}
