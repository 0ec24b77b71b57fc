//! Exporting a trained projector: found in a comparison folder (by method
//! and seed) or a run folder, written in the Hugging Face LLaVA and LLaVA
//! layouts, and read back bit for bit.

use std::collections::BTreeSet;

use anyhow::Result;
use fedcmp_experiment::compare;
use fedcmp_experiment::export::{export, read_export, ExportFormat};
use fedcmp_experiment::saved::{CellChoice, SavedProjector};
use fedcmp_experiment::{RunOptions, Silent};
use fedcmp_model::projector::ProjectorKind;
use fedcmp_runtime::convert::{load_params_file, projector_params, save_params_file};

use crate::runs::world;

/// Tensors by name (files list them by name, projectors in layer order).
fn by_name(params: &fedcmp_core::ParamSet) -> Vec<(String, fedcmp_core::ParamTensor)> {
    let mut entries = params.entries().to_vec();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries
}

fn json(path: &std::path::Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

#[test]
fn a_comparison_cell_exports_in_both_layouts_and_reads_back() -> Result<()> {
    let w = world()?;
    let template = w.settings(RunOptions::default())?;
    let out = w.dir.path().join("compare");
    let plan = w.plan(&template, &["fedavg", "init"], out.clone())?;
    compare::run(&w.cache(), &template, &plan, &Silent)?;

    let choice = |method: Option<&str>, seed: u64| CellChoice {
        scenario: None,
        method: method.map(str::to_string),
        seed,
    };
    let msg = SavedProjector::locate(&out, &choice(None, 0))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        msg.contains("--method") && msg.contains("fedavg, init"),
        "{msg}"
    );
    let msg = SavedProjector::locate(&out, &choice(Some("fedavg"), 3))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("no reported cell of seed 3"), "{msg}");

    let saved = SavedProjector::locate(&out, &choice(Some("fedavg"), 0))?;
    assert!(saved.label.ends_with("-fedavg-s0"), "{}", saved.label);
    assert_eq!(saved.settings.data.scenario, template.data.scenario);
    assert_eq!(saved.settings.data.backbones, template.data.backbones);
    let (config, params) = saved.load()?;
    let (_, init) = SavedProjector::locate(&out, &choice(Some("init"), 0))?.load()?;
    assert!(
        params != init,
        "the trained cell differs from the untrained one"
    );

    let dir = w.dir.path().join("export");
    let written = export(&saved, &dir, &ExportFormat::ALL)?;
    assert_eq!(written.len(), 6);

    let hf = load_params_file(&dir.join("hf-llava/model.safetensors"))?;
    let names: BTreeSet<&str> = hf.entries().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "multi_modal_projector.linear_1.bias",
            "multi_modal_projector.linear_1.weight",
            "multi_modal_projector.linear_2.bias",
            "multi_modal_projector.linear_2.weight",
        ])
    );
    let first = hf
        .get("multi_modal_projector.linear_1.weight")
        .map(|t| t.shape.clone());
    assert_eq!(first, Some(vec![config.output_dim, config.input_dim]));
    let llava = load_params_file(&dir.join("llava/mm_projector.safetensors"))?;
    assert!(llava.get("model.mm_projector.0.weight").is_some());
    assert!(llava.get("model.mm_projector.2.bias").is_some());

    for layout in ["hf-llava", "llava"] {
        let (back, kind) = read_export(&dir.join(layout))?;
        assert_eq!(kind, ProjectorKind::Mlp2xGelu);
        assert!(
            by_name(&back) == by_name(&params),
            "{layout} reads back bit for bit"
        );
        let sidecar = json(&dir.join(layout).join("fedcmp_export.json"))?;
        assert_eq!(sidecar["projector"]["input_dim"], config.input_dim);
        assert_eq!(sidecar["vision"]["encoder"], "patch-means");
        assert_eq!(sidecar["vision"]["image_size"], 8);
        assert!(sidecar["llm"]["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("tiny.gguf")));
    }
    let hf_config = json(&dir.join("hf-llava/projector_config.json"))?;
    assert_eq!(hf_config["projector_hidden_act"], "gelu");
    assert_eq!(hf_config["vision_config"]["hidden_size"], config.input_dim);
    assert_eq!(hf_config["text_config"]["hidden_size"], config.output_dim);
    let llava_config = json(&dir.join("llava/projector_config.json"))?;
    assert_eq!(llava_config["mm_projector_type"], "mlp2x_gelu");
    assert_eq!(llava_config["mm_hidden_size"], config.input_dim);
    Ok(())
}

/// A linear projector has no place in transformers' LLaVA (a two-layer
/// MLP): refused with the reason; LLaVA's own layout takes it.
#[test]
fn a_linear_projector_exports_to_llava_only() -> Result<()> {
    let w = world()?;
    let settings = w.settings(RunOptions {
        projector: Some("linear".into()),
        ..RunOptions::default()
    })?;
    let experiment = w.experiment(&settings)?;
    let run = w.dir.path().join("linear-run");
    std::fs::create_dir_all(&run)?;
    std::fs::write(run.join("settings.toml"), settings.to_toml()?)?;
    let params = projector_params(&experiment.projector(ProjectorKind::Linear, 4)?)?;
    save_params_file(&params, &run.join("projector.safetensors"))?;

    let saved = SavedProjector::locate(&run, &CellChoice::default())?;
    assert_eq!(saved.label, "linear-run");
    assert!(!ExportFormat::HfLlava.fits(ProjectorKind::Linear));
    let out = w.dir.path().join("linear-export");
    let msg = export(&saved, &out, &[ExportFormat::HfLlava])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("two-layer GELU MLP"), "{msg}");
    export(&saved, &out, &[ExportFormat::Llava])?;
    let names: Vec<String> = load_params_file(&out.join("llava/mm_projector.safetensors"))?
        .entries()
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(
        names,
        ["model.mm_projector.bias", "model.mm_projector.weight"]
    );
    let (back, kind) = read_export(&out.join("llava"))?;
    assert_eq!(kind, ProjectorKind::Linear);
    assert!(
        by_name(&back) == by_name(&params),
        "llava reads back bit for bit"
    );
    Ok(())
}

/// Opt-in: Hugging Face transformers loads the `hf-llava` export (with
/// `from_pretrained`, into a LLaVA model whose vision tower is the tiny
/// CLIP fixture) and its image features equal fedcmp's visual tokens for
/// the same pixels (scripts/reference/check_hf_llava_export.py). Needs the
/// PyTorch venv (`bash bench/setup_torch_venv.sh`, or FEDCMP_TORCH_PYTHON):
/// `cargo test -p fedcmp-experiment --test experiment -- --ignored transformers`.
#[test]
#[ignore = "needs PyTorch and transformers: bash bench/setup_torch_venv.sh"]
fn transformers_loads_the_hf_export() -> Result<()> {
    use candle_core::{DType, Device, Tensor};
    use fedcmp_experiment::export::{write_layout, LayoutShape};
    use fedcmp_model::projector::{Projector, ProjectorConfig};
    use fedcmp_model::vision::vit::{load_vit, VitOptions};
    use fedcmp_model::vision::VisionEncoder;

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = std::env::var_os("FEDCMP_TORCH_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join(".venv-torch/bin/python"));
    anyhow::ensure!(python.exists(), "{} is missing", python.display());
    let vision_dir = root.join("crates/fedcmp-model/tests/fixtures/vit_clip");
    let encoder = load_vit(&vision_dir, VitOptions::default(), &Device::Cpu)?;
    let config = ProjectorConfig {
        kind: ProjectorKind::Mlp2xGelu,
        input_dim: encoder.feature_dim(),
        output_dim: 24,
    };
    let projector = Projector::new(config, 11, DType::F32, &Device::Cpu)?;
    let size = encoder.input_spec().image_size;
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, size, size), &Device::Cpu)?;
    let visual = projector.forward(&encoder.encode(&pixels)?)?;

    let dir = tempfile::tempdir()?;
    let export_dir = dir.path().join("hf-llava");
    write_layout(
        ExportFormat::HfLlava,
        &projector_params(&projector)?,
        &config,
        LayoutShape {
            visual_tokens: Some(encoder.num_patches()),
            feature_layer: Some(-2),
        },
        &serde_json::json!({}),
        &export_dir,
    )?;
    let check = dir.path().join("check.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            ("pixels".to_string(), pixels),
            ("visual".to_string(), visual),
        ]),
        &check,
    )?;
    let output = std::process::Command::new(&python)
        .arg(root.join("scripts/reference/check_hf_llava_export.py"))
        .args([&export_dir, &vision_dir, &check])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{text}");
    anyhow::ensure!(
        output.status.success(),
        "the transformers check failed:\n{text}"
    );
    Ok(())
}
