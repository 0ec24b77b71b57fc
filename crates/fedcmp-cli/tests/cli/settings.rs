//! `fedcmp show-config`: the resolved settings of `run` with the same
//! flags, file and FEDCMP_* variables, as a settings file that `--config`
//! reads back to the same settings; bad values are refused with the key,
//! the value and where it was set.

use std::process::Command;

use anyhow::{ensure, Result};

fn fedcmp(args: &[&str], env: &[(&str, &str)]) -> Result<(bool, String, String)> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fedcmp"));
    command.args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FEDCMP_")) {
        command.env_remove(k);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output()?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[test]
fn show_config_prints_a_settings_file_that_config_reads_back() -> Result<()> {
    let (ok, shown, stderr) = fedcmp(
        &[
            "show-config",
            "--scenario",
            "iid",
            "--strategy",
            "{ name = \"fed-cmp\", energy = 0.9 }",
            "--local-steps",
            "2",
        ],
        &[("FEDCMP_LR", "1e-3")],
    )?;
    ensure!(ok, "show-config failed: {stderr}");
    insta::assert_snapshot!("show_config", shown);

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("settings.toml");
    std::fs::write(&file, &shown)?;
    let config = file.display().to_string();
    let (ok, again, stderr) = fedcmp(&["show-config", "--config", &config], &[])?;
    ensure!(ok, "--config failed: {stderr}");
    let body = |text: &str| -> String {
        text.lines()
            .take_while(|l| !l.starts_with("# set by"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(body(&again).trim_end(), body(&shown).trim_end());
    assert!(
        again.contains(&format!("strategy          {config}")),
        "{again}"
    );

    // A flag over the file, and a bad value named with its origin.
    let (ok, seeded, _) = fedcmp(&["show-config", "--config", &config, "--seed", "7"], &[])?;
    assert!(ok && seeded.contains("seed = 7"), "{seeded}");
    let (ok, _, stderr) = fedcmp(
        &["show-config", "--config", &config],
        &[("FEDCMP_BATCH_SIZE", "0")],
    )?;
    assert!(!ok, "batch size 0 accepted");
    assert!(
        stderr.contains("batch-size = 0") && stderr.contains("FEDCMP_BATCH_SIZE"),
        "{stderr}"
    );
    std::fs::write(&file, "scenario = \"iid\"\nlocal-step = 2\n")?;
    let (ok, _, stderr) = fedcmp(&["show-config", "--config", &config], &[])?;
    assert!(
        !ok && stderr.contains("local-step") && stderr.contains("settings.toml"),
        "{stderr}"
    );
    Ok(())
}
