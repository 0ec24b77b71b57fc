//! The fuzz targets: every decoder fedcmp runs on bytes it did not write
//! (model files, manifests, configuration, what sites send), each called
//! through the same entry point a user's file or a site's message reaches.
//! A target returns the decoder's verdict; an `Err` is a correct refusal,
//! never a finding. Findings are panics, hangs and allocations past the
//! bound, which the engine watches for.
//!
//! Every input is written to the target's scratch file first (file-based
//! readers read it from there), so that file is always the input of the
//! current run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use fedcmp_core::task::{ClientReply, ClientStatus, RoundTask};
use fedcmp_core::update::{ClientId, ClientInstruction, ClientUpdate, LocalObjective};
use fedcmp_core::wire::{self, WireMessage};
use fedcmp_core::{ParamSet, ParamTensor};
use fedcmp_data::corpus::{load_source, SourceEnv, SourceSpec};
use fedcmp_data::scenario::Scenario;

/// What a decoder said about one input: accepted, or refused with a message.
pub type Verdict = Result<(), String>;

/// One decoder under test.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    /// What it decodes, for the report.
    pub about: &'static str,
    /// The scratch file's name (its extension picks the reader).
    pub file: &'static str,
    /// Text formats also get token-level mutations.
    pub text: bool,
    /// The decoder, given the input as a file (written here) and as bytes.
    run: fn(&Path, &[u8]) -> Verdict,
}

impl Target {
    /// Runs the decoder on `input`, written first to `scratch/<file>`: on
    /// disk before the run, so after an abort or a hang it is the input.
    pub fn run(&self, scratch: &Path, input: &[u8]) -> Verdict {
        let path = self.input_path(scratch);
        std::fs::write(&path, input).map_err(|e| format!("scratch write failed: {e}"))?;
        (self.run)(&path, input)
    }

    /// The path the input is written to before each run.
    pub fn input_path(&self, scratch: &Path) -> PathBuf {
        scratch.join(self.file)
    }
}

/// Every target, in report order.
pub const TARGETS: &[Target] = &[
    Target {
        name: "gguf",
        about: "GGUF decoder files (header, metadata, tensor table, tokenizer)",
        file: "model.gguf",
        text: false,
        run: gguf,
    },
    Target {
        name: "safetensors",
        about: "safetensors weights and parameter files (header and data)",
        file: "weights.safetensors",
        text: false,
        run: safetensors,
    },
    Target {
        name: "torch-pickle",
        about: "PyTorch state dicts (legacy pickle and zip)",
        file: "state_dict.pth",
        text: false,
        run: torch_pickle,
    },
    Target {
        name: "llava-json",
        about: "LLaVA pretraining JSON manifests",
        file: "chat.json",
        text: true,
        run: llava_json,
    },
    Target {
        name: "jsonl",
        about: "JSONL manifests",
        file: "manifest.jsonl",
        text: true,
        run: jsonl,
    },
    Target {
        name: "csv",
        about: "CSV manifests",
        file: "manifest.csv",
        text: true,
        run: csv,
    },
    Target {
        name: "scenario-toml",
        about: "scenario TOML files",
        file: "scenario.toml",
        text: true,
        run: scenario_toml,
    },
    Target {
        name: "settings-toml",
        about: "run settings TOML (--config, what a server sends its sites)",
        file: "settings.toml",
        text: true,
        run: settings_toml,
    },
    Target {
        name: "strategy",
        about: "strategy settings (a name or an inline TOML table), validated and built",
        file: "strategy.toml",
        text: true,
        run: strategy,
    },
    Target {
        name: "wire-reply",
        about: "a site's reply (JSON header + arrays), decoded and screened by the server",
        file: "reply.bin",
        text: false,
        run: wire_reply,
    },
    Target {
        name: "wire-task",
        about: "a server's task as a site decodes it",
        file: "task.bin",
        text: false,
        run: wire_task,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

fn verdict<T, E: std::fmt::Display>(result: Result<T, E>) -> Verdict {
    result.map(|_| ()).map_err(|e| e.to_string())
}

fn gguf(path: &Path, _input: &[u8]) -> Verdict {
    verdict(fedcmp_model::llm::gguf::load_gguf_decoder(
        path,
        &Device::Cpu,
    ))
}

fn safetensors(path: &Path, _input: &[u8]) -> Verdict {
    let weights = fedcmp_model::weights::WeightMap::from_safetensors(
        &[path.to_path_buf()],
        path,
        &Device::Cpu,
    );
    let params = fedcmp_runtime::convert::load_params_file(path);
    verdict(weights).and(verdict(params))
}

fn torch_pickle(path: &Path, _input: &[u8]) -> Verdict {
    verdict(fedcmp_model::vision::legacy_pth::load_legacy_pth(
        path,
        &Device::Cpu,
    ))
}

/// A manifest source read with every image decoded (`verify-images`), so
/// the image checks run too; the scratch folder holds the seeds' images.
fn manifest(path: &Path, kind: &str) -> Verdict {
    let scratch = path.parent().unwrap_or(Path::new("."));
    let file = path.file_name().unwrap_or_default().to_string_lossy();
    let spec: SourceSpec = toml::from_str(&format!(
        "kind = \"{kind}\"\npath = \"{file}\"\nverify-images = true"
    ))
    .map_err(|e| format!("spec: {e}"))?;
    let env = SourceEnv::new(scratch.join("cache")).with_base_dir(scratch);
    verdict(load_source(&spec, &env))
}

fn llava_json(path: &Path, _input: &[u8]) -> Verdict {
    manifest(path, "llava-json")
}

fn jsonl(path: &Path, _input: &[u8]) -> Verdict {
    manifest(path, "jsonl")
}

fn csv(path: &Path, _input: &[u8]) -> Verdict {
    manifest(path, "csv")
}

fn scenario_toml(path: &Path, _input: &[u8]) -> Verdict {
    verdict(Scenario::load(&path.display().to_string()))
}

fn settings_toml(path: &Path, _input: &[u8]) -> Verdict {
    let layers = fedcmp_experiment::Layers::new()
        .file(path)
        .map_err(|e| e.to_string())?;
    verdict(fedcmp_experiment::RunSettings::resolve(&layers))
}

fn strategy(_path: &Path, input: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(input);
    let config = fedcmp_experiment::settings::parse_strategy(&text).map_err(|e| e.to_string())?;
    config.validate(4).map_err(|e| e.to_string())?;
    verdict(config.build(4))
}

/// The global model a reply is screened against (the seeds' layout).
fn global() -> ParamSet {
    seed_params(0.25)
}

fn wire_reply(_path: &Path, input: &[u8]) -> Verdict {
    let message = message_from_bytes(input)?;
    let (_round, reply) = wire::decode_reply(&message).map_err(|e| e.to_string())?;
    let sampled = [ClientId(0), ClientId(1), ClientId(7)];
    match fedcmp_runtime::round_loop::update_refusal(
        &reply,
        &global(),
        &sampled,
        &Default::default(),
    ) {
        Some(reason) => Err(reason),
        None => Ok(()),
    }
}

fn wire_task(_path: &Path, input: &[u8]) -> Verdict {
    let message = message_from_bytes(input)?;
    verdict(wire::decode_task(&message))
}

// --- The byte form of a wire message ------------------------------------
//
// Flower carries a message as a JSON header and named arrays, each a shape
// and raw little-endian f32 bytes; the fuzzer needs one byte string for
// it: u32 header length, header, then per array: u8 name length, name,
// u8 rank, u32 per dimension, u32 byte count, bytes. A length past the end
// takes what is left, so mutated inputs still reach the decoder. Arrays
// become tensors the way the Python bridge makes them
// (`tensor_from_le_bytes`), so a shape the bytes do not fill is refused
// there, as on a real site.

struct Bytes<'a> {
    rest: &'a [u8],
}

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = rest;
        head
    }
    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let got = self.take(4);
        b[..got.len()].copy_from_slice(got);
        u32::from_le_bytes(b)
    }
}

/// Parses the byte form above.
pub fn message_from_bytes(input: &[u8]) -> Result<WireMessage, String> {
    let mut bytes = Bytes { rest: input };
    let header_len = bytes.u32() as usize;
    let header = String::from_utf8_lossy(bytes.take(header_len)).into_owned();
    let mut arrays = Vec::new();
    while !bytes.rest.is_empty() {
        let name_len = bytes.u8() as usize;
        let name = String::from_utf8_lossy(bytes.take(name_len)).into_owned();
        let rank = bytes.u8() as usize;
        let shape = (0..rank).map(|_| bytes.u32() as usize).collect();
        let len = bytes.u32() as usize;
        let data = bytes.take(len);
        let tensor = wire::tensor_from_le_bytes(&name, shape, data).map_err(|e| e.to_string())?;
        arrays.push((name, tensor));
    }
    Ok(WireMessage { header, arrays })
}

/// The byte form of `message` (for seeds).
pub fn message_to_bytes(message: &WireMessage) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend((message.header.len() as u32).to_le_bytes());
    out.extend(message.header.as_bytes());
    for (name, tensor) in &message.arrays {
        out.push(name.len() as u8);
        out.extend(name.as_bytes());
        out.push(tensor.shape.len() as u8);
        for d in &tensor.shape {
            out.extend((*d as u32).to_le_bytes());
        }
        out.extend((tensor.data.len() as u32 * 4).to_le_bytes());
        for v in &tensor.data {
            out.extend(v.to_le_bytes());
        }
    }
    out
}

fn seed_params(scale: f32) -> ParamSet {
    let tensor = |shape: Vec<usize>| {
        let n = shape.iter().product::<usize>();
        ParamTensor {
            shape,
            data: (0..n).map(|i| i as f32 * scale).collect(),
        }
    };
    ParamSet::new(vec![
        ("linear_1.weight".into(), tensor(vec![3, 2])),
        ("linear_1.bias".into(), tensor(vec![3])),
    ])
    .unwrap_or_default()
}

// --- Seeds ----------------------------------------------------------------

/// Valid inputs of every target, and the files their records point to.
#[derive(Debug)]
pub struct Seeds {
    by_target: Vec<(&'static str, Vec<Vec<u8>>)>,
    regressions: Vec<(String, Vec<Vec<u8>>)>,
}

impl Seeds {
    /// Writes the seeds' own files (a tiny generated GGUF decoder, images)
    /// under `scratch` and collects a few valid inputs per target.
    pub fn generate(scratch: &Path) -> anyhow::Result<Self> {
        let world = fedcmp_testkit::tiny_world(scratch)?;
        let gguf = std::fs::read(&world.gguf)?;
        let jsonl = std::fs::read_to_string(scratch.join("tiny.jsonl"))?;
        let first_lines: String = jsonl.lines().take(6).map(|l| format!("{l}\n")).collect();
        let scenario = std::fs::read_to_string(&world.scenario)?;

        let params = scratch.join("seed-params.safetensors");
        fedcmp_runtime::convert::save_params_file(&seed_params(0.5), &params)?;
        let safetensors = vec![
            std::fs::read(&params)?,
            std::fs::read(fixture("vit_clip/model.safetensors"))?,
        ];
        let pickles = vec![
            std::fs::read(fixture("legacy_state_dict.pth"))?,
            std::fs::read(fixture("modern_state_dict.pth"))?,
        ];
        let csv = "image,caption,label,source\nimages/0.png,day.,day,sky\n\
                   images/1.png,\"night, dark.\",night,sky\nimages/40.png,stripes.,,stripes\n"
            .to_string();
        let llava = "[\n{\"id\": \"a\", \"image\": \"images/0.png\", \"conversations\": \
                     [{\"from\": \"human\", \"value\": \"<image>\\nDescribe.\"}, \
                     {\"from\": \"gpt\", \"value\": \"A bright sky.\"}]},\n\
                     {\"id\": 2, \"image\": \"images/1.png\", \"model\": \"x\", \"conversations\": \
                     [{\"from\": \"user\", \"value\": \"<image>\"}, \
                     {\"from\": \"assistant\", \"value\": \"Night.\"}]}\n]\n"
            .to_string();
        // Resolved settings of a Fed-CMP run and of a centralized one, as
        // run folders hold them.
        let settings: Vec<String> = ["{ name = \"fed-cmp\", beta = 0.8 }", "fedavg"]
            .iter()
            .map(|strategy| {
                let options = fedcmp_experiment::RunOptions {
                    scenario: Some(world.scenario.display().to_string()),
                    llm: Some(world.gguf.clone()),
                    strategy: Some(fedcmp_experiment::settings::parse_strategy(strategy)?),
                    ..Default::default()
                };
                let layers = fedcmp_experiment::Layers::new().defaults("seed", &options)?;
                Ok(fedcmp_experiment::RunSettings::resolve(&layers)?.to_toml()?)
            })
            .collect::<anyhow::Result<_>>()?;
        let strategies = [
            "fedavg",
            "{ name = \"fed-cmp\" }",
            "{ name = \"fedprox\", mu = 0.01 }",
            "{ name = \"fedavgm\", server-lr = 1.0, momentum = 0.9 }",
            "{ name = \"fedadam\", server-lr = 0.01, beta1 = 0.9 }",
            "scaffold",
            "ties",
            "fednova",
        ];
        let task = RoundTask {
            instruction: ClientInstruction {
                round: 3,
                client: ClientId(7),
                objective: LocalObjective::Scaffold {
                    server_control: seed_params(-1.0),
                },
                max_local_steps: Some(2),
            },
            global: Arc::new(seed_params(0.1)),
            schedule: fedcmp_core::schedule::WarmupCosine {
                peak_lr: 1e-3,
                total_samples: 100,
                warmup_ratio: 0.03,
            },
            samples_before: 40,
            checkpointed_round: Some(2),
        };
        let status = ClientStatus {
            client: ClientId(7),
            samples_left: 5,
            consumed: 11,
            skipped: 0,
        };
        let reply = ClientReply {
            status,
            update: Some(ClientUpdate {
                client: ClientId(7),
                params: seed_params(0.5),
                num_samples: 4,
                num_steps: 2,
                lr_sum: 1.5e-3,
                mean_loss: 2.25,
                control_delta: Some(seed_params(1e-3)),
            }),
        };
        let plain = ClientReply {
            status,
            update: None,
        };
        let text = |v: &[String]| v.iter().map(|s| s.as_bytes().to_vec()).collect();
        let mut regressions = Vec::new();
        for target in TARGETS {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("regressions")
                .join(target.name);
            let mut inputs = Vec::new();
            if dir.is_dir() {
                let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
                    .map(|e| e.map(|e| e.path()))
                    .collect::<std::io::Result<_>>()?;
                files.sort();
                for file in files {
                    inputs.push(std::fs::read(file)?);
                }
            }
            regressions.push((target.name.to_string(), inputs));
        }
        Ok(Self {
            regressions,
            by_target: vec![
                ("gguf", vec![gguf]),
                ("safetensors", safetensors),
                ("torch-pickle", pickles),
                ("llava-json", text(&[llava])),
                ("jsonl", text(&[first_lines])),
                ("csv", text(&[csv])),
                ("scenario-toml", {
                    let mut all = builtin_scenarios();
                    all.push(scenario);
                    text(&all)
                }),
                ("settings-toml", text(&settings)),
                (
                    "strategy",
                    strategies.iter().map(|s| s.as_bytes().to_vec()).collect(),
                ),
                (
                    "wire-reply",
                    vec![
                        message_to_bytes(&wire::encode_reply(3, &reply)),
                        message_to_bytes(&wire::encode_reply(3, &plain)),
                    ],
                ),
                (
                    "wire-task",
                    vec![message_to_bytes(&wire::encode_task(&task))],
                ),
            ],
        })
    }

    /// Inputs that once made `target` panic, hang or over-allocate
    /// (`regressions/<target>/`): each is run before any mutation.
    pub fn regressions(&self, target: &str) -> &[Vec<u8>] {
        self.regressions
            .iter()
            .find(|(name, _)| name == target)
            .map_or(&[], |(_, inputs)| inputs.as_slice())
    }

    /// The seeds of `target` (at least one for every target).
    pub fn of(&self, target: &str) -> &[Vec<u8>] {
        self.by_target
            .iter()
            .find(|(name, _)| *name == target)
            .map_or(&[], |(_, seeds)| seeds.as_slice())
    }
}

/// The built-in scenarios (every partition kind and section in use).
fn builtin_scenarios() -> Vec<String> {
    [
        include_str!("../../../scenarios/iid.toml"),
        include_str!("../../../scenarios/concept-skew.toml"),
        include_str!("../../../scenarios/cross-device.toml"),
        include_str!("../../../scenarios/domain-silos.toml"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A file of fedcmp-model's test fixtures (checked in).
fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fedcmp-model/tests/fixtures")
        .join(rel)
}
