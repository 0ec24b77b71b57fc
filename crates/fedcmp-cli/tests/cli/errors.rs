//! What a user sees when something is wrong: one `error:` line naming the
//! file and the problem, never a backtrace (even with RUST_BACKTRACE set),
//! and an exit code by class (65 bad input, 78 bad configuration); and
//! records a run skipped are shown with their file and line.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use anyhow::{ensure, Result};

/// `fedcmp <args>` with RUST_BACKTRACE=1, as in many developer shells.
fn fedcmp(cache: &Path, args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_fedcmp"))
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE")
        .args(["--cache-dir", &cache.display().to_string()])
        .args(args)
        .output()?)
}

/// A run of the tiny world with `llm` as its decoder, for one round.
fn run_args<'a>(scenario: &'a str, llm: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--scenario",
        scenario,
        "--llm",
        llm,
        "--vision",
        "patch-means",
        "--image-size",
        "8",
        "--rounds",
        "1",
        "--local-steps",
        "1",
        "--batch-size",
        "2",
        "--out",
        out,
    ]
}

/// One `error:` line, no backtrace frame, and the expected code.
fn check_user_error(output: &Output, code: i32, says: &str) -> Result<()> {
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.code() == Some(code),
        "exit {:?}, expected {code}:\n{stderr}",
        output.status.code()
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    ensure!(errors.len() == 1, "one error line expected:\n{stderr}");
    ensure!(errors[0].contains(says), "`{says}` not in:\n{stderr}");
    ensure!(
        !stderr.contains("stack backtrace") && !stderr.contains("   0: "),
        "a backtrace was printed:\n{stderr}"
    );
    Ok(())
}

#[test]
fn user_errors_are_one_line_with_an_exit_code_by_class() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let world = fedcmp_testkit::tiny_world(dir.path())?;
    let cache = dir.path().join("cache");
    let scenario = world.scenario.display().to_string();
    let out = dir.path().join("runs").display().to_string();

    // A GGUF header claiming 2^40 - 1 tensors: candle refuses it (and would
    // attach a backtrace to its error under RUST_BACKTRACE).
    let bad_gguf = dir.path().join("bad.gguf");
    let mut header = b"GGUF".to_vec();
    header.extend(3u32.to_le_bytes());
    header.extend(((1u64 << 40) - 1).to_le_bytes());
    header.extend(0u64.to_le_bytes());
    std::fs::write(&bad_gguf, &header)?;
    let bad = bad_gguf.display().to_string();
    let output = fedcmp(&cache, &run_args(&scenario, &bad, &out))?;
    check_user_error(&output, 65, "bad.gguf")?;

    // A scenario file with a field no scenario has: configuration.
    let bad_scenario = dir.path().join("typo.toml");
    let text = std::fs::read_to_string(&world.scenario)?.replace("clients = 2", "client = 2");
    std::fs::write(&bad_scenario, text)?;
    let gguf = world.gguf.display().to_string();
    let typo = bad_scenario.display().to_string();
    let output = fedcmp(&cache, &run_args(&typo, &gguf, &out))?;
    check_user_error(&output, 78, "typo.toml")?;

    // A flag value out of range, found after parsing: configuration.
    let output = fedcmp(&cache, &["compare", "--seeds", "0"])?;
    check_user_error(&output, 78, "--seeds must be at least 1")?;

    // A run folder that is not one: bad input.
    let output = fedcmp(
        &cache,
        &["eval", "--run", &dir.path().display().to_string()],
    )?;
    check_user_error(&output, 65, "neither a run folder")?;
    Ok(())
}

#[test]
fn a_run_shows_the_records_it_skipped() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let world = fedcmp_testkit::tiny_world(dir.path())?;
    let manifest = dir.path().join("tiny.jsonl");
    let mut file = std::fs::OpenOptions::new().append(true).open(&manifest)?;
    // Lines 49 and 50, after the world's 48.
    writeln!(file, r#"{{"image": "images/0.png", "caption": "cut"#)?;
    writeln!(
        file,
        r#"{{"image": "../../../../etc/passwd", "caption": "Out.", "source": "sky"}}"#
    )?;
    let out = dir.path().join("runs");
    let output = fedcmp(
        &dir.path().join("cache"),
        &run_args(
            &world.scenario.display().to_string(),
            &world.gguf.display().to_string(),
            &out.display().to_string(),
        ),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let shown = format!("{}:49: malformed record", manifest.display());
    for line in [
        "scenario tiny: skipped 2 records: 1 malformed record, 1 image outside its root",
        shown.as_str(),
        ":50: image outside its root: image \"../../../../etc/passwd\" resolves to",
    ] {
        ensure!(stdout.contains(line), "`{line}` not in:\n{stdout}");
    }
    Ok(())
}
