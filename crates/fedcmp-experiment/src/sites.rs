//! Federation across sites, the site's side: a [`Site`] is one real
//! client, its private data a manifest on its own disk, answering the
//! server's round tasks with the same client node, local trainer and
//! frozen backbones as a simulated client. It is opened once per process
//! (backbones loaded, every image encoded into the feature cache) and then
//! answers any number of tasks; its state between rounds lives in its own
//! state folder, so a retried or repeated round trains from the same state
//! and consumes no sample twice, and a restarted site resumes. A run's
//! state lives in a folder keyed by the run ([`run_key`]: its name and a
//! hash of its settings), so a site never resumes another run's state;
//! [`site_runs`] lists the runs kept and [`remove_site_run`] removes one.
//!
//! [`export`] deals a scenario's data into one folder per site (images and
//! a manifest in shard order) plus the held-out splits, so that a
//! federation across sites can be tried on one machine with the built-in
//! scenarios, and so that it trains exactly what the simulation trains.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedcmp_core::{ClientId, ClientReply, ClientStatus, RoundTask};
use fedcmp_data::cache::FeatureCache;
use fedcmp_data::corpus::{self, ManifestSpec, SourceEnv, SourceSpec};
use fedcmp_data::record::{Record, SkipReport};
use fedcmp_model::alignment::CaptionTemplate;
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::projector::{Projector, ProjectorKind};
use fedcmp_model::tokenizer::TextTokenizer;
use fedcmp_model::vision::VisionEncoder;
use fedcmp_runtime::client::{ClientData, LocalTrainer, Sample};
use fedcmp_runtime::eval::Evaluator;
use fedcmp_runtime::hostile::{Attack, AttackConfig};
use fedcmp_runtime::node::ClientNode;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::assembly::fresh_projector;
use crate::backbones::{self, BackboneDigests, BackboneSettings, VisionChoice};
use crate::events::Observer;
use crate::files::write_atomic;
use crate::settings::RunSettings;
use crate::training::local_config;
use crate::{io_error, ExperimentError, Result};

/// The frozen side of one process: decoder, tokenizer, the encoder's
/// feature cache (images encoded once), and the caption layout.
#[derive(Debug)]
pub struct Frozen {
    pub decoder: Arc<FrozenDecoder>,
    pub tokenizer: Arc<TextTokenizer>,
    pub encoder: Box<dyn VisionEncoder>,
    pub cache: FeatureCache,
    pub template: CaptionTemplate,
    /// Where assets and features are cached.
    pub cache_dir: PathBuf,
    /// What the backbones are, by content.
    pub digests: BackboneDigests,
}

impl Frozen {
    /// Loads the backbones `wanted` (for the run of `settings`) with
    /// assets and features cached under `cache_dir`.
    pub fn load(
        cache_dir: &Path,
        settings: &RunSettings,
        wanted: &BackboneSettings,
        observer: &dyn Observer,
    ) -> Result<Self> {
        let digests = backbones::digests(cache_dir, wanted, observer)?;
        let loaded = backbones::load(cache_dir, wanted, observer)?;
        let cache =
            backbones::served_cache(cache_dir, loaded.encoder.as_ref(), wanted.visual_tokens)?;
        Ok(Self {
            decoder: Arc::new(loaded.decoder),
            tokenizer: Arc::new(loaded.tokenizer),
            encoder: loaded.encoder,
            cache,
            template: CaptionTemplate {
                separator: settings.data.caption_separator.clone(),
                ..CaptionTemplate::plain()
            },
            cache_dir: cache_dir.to_path_buf(),
            digests,
        })
    }

    /// The records of a JSONL or CSV manifest (by its extension) as
    /// samples, their images encoded; skipped records counted.
    pub fn read_manifest(
        &mut self,
        manifest: &Path,
        observer: &dyn Observer,
    ) -> Result<(Vec<Sample>, SkipReport)> {
        let spec = ManifestSpec {
            path: manifest.to_path_buf(),
            image_root: None,
            columns: Default::default(),
            verify_images: false,
            allow_images_outside_root: false,
            common: Default::default(),
        };
        let is_jsonl = manifest
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
        let spec = if is_jsonl {
            SourceSpec::Jsonl(spec)
        } else {
            SourceSpec::Csv(spec)
        };
        let env = SourceEnv::new(&self.cache_dir);
        let corpus = corpus::load_source(&spec, &env)?;
        let (keys, skipped) =
            backbones::encode_corpus(&mut self.cache, self.encoder.as_ref(), &corpus, observer)?;
        let samples = corpus
            .records
            .iter()
            .zip(keys)
            .filter_map(|(record, key)| {
                key.map(|key| Sample {
                    key,
                    caption: record.caption.clone(),
                })
            })
            .collect();
        Ok((samples, skipped))
    }

    /// A fresh projector for these backbones (its values depend on `seed`
    /// only).
    pub fn projector(&self, kind: ProjectorKind, seed: u64) -> Result<Projector> {
        fresh_projector(
            kind,
            self.encoder.feature_dim(),
            self.decoder.config().hidden_size,
            seed,
        )
    }

    /// Caption NLL on `samples`.
    pub fn evaluator<'a>(&'a self, samples: &'a [Sample]) -> Evaluator<'a> {
        crate::assembly::evaluator(
            &self.decoder,
            &self.tokenizer,
            &self.template,
            &self.cache,
            samples,
        )
    }
}

/// Where one site finds its data and keeps its state.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteConfig {
    /// The site's stable client id (not the transport's node id, which
    /// changes when a site restarts).
    pub client: ClientId,
    /// The site's own pairs: a JSONL or CSV manifest (`image`, `caption`).
    pub manifest: PathBuf,
    /// The site's state between rounds (`client-<id>/`).
    pub state_dir: PathBuf,
    /// Assets and the feature cache.
    pub cache_dir: PathBuf,
    /// The site's decoder (a .gguf file or a Hugging Face folder); None:
    /// the registry's SmolLM2 in its cache. Never a path the server names.
    pub llm: Option<PathBuf>,
    /// The site's copy of the CLIP or SigLIP folder, for a federation
    /// whose vision encoder is one (the built-in encoders come from its
    /// cache).
    pub vision: Option<PathBuf>,
    /// A site configured to misbehave (testing robust aggregation on a
    /// real deployment): what it sends in place of its update, as in a
    /// simulated attack, without `count` or `clients`.
    pub misbehave: Option<AttackConfig>,
}

/// One site: its data, its node and its trainer over frozen backbones
/// loaded once.
#[derive(Debug)]
pub struct Site {
    frozen: Frozen,
    trainer: LocalTrainer,
    node: ClientNode,
    skipped: SkipReport,
    samples: usize,
    misbehave: Option<Attack>,
}

impl Site {
    /// Opens the site for the federation of `settings`: loads the
    /// backbones (refusing, before any training, when they are not the
    /// `expected` ones the server announced), reads and encodes its
    /// manifest, and finds its saved state (if any) in its state folder.
    pub fn open(
        settings: &RunSettings,
        config: &SiteConfig,
        expected: Option<&BackboneDigests>,
        observer: &dyn Observer,
    ) -> Result<Self> {
        let wanted = site_backbones(settings, config)?;
        let mut frozen = Frozen::load(&config.cache_dir, settings, &wanted, observer)?;
        if let Some(expected) = expected {
            let ours = &frozen.digests;
            let mut differ = Vec::new();
            if ours.llm != expected.llm {
                differ.push(format!(
                    "its decoder {} has sha256 {}, the server's {}",
                    backbones::llm_path(&config.cache_dir, &wanted).display(),
                    ours.llm,
                    expected.llm
                ));
            }
            if ours.vision != expected.vision {
                differ.push(format!(
                    "its vision encoder {} has sha256 {}, the server's {}",
                    wanted.vision, ours.vision, expected.vision
                ));
            }
            if !differ.is_empty() {
                return Err(ExperimentError::Invalid(format!(
                    "site {} refuses the task: {} (a projector trained against other backbones \
                     is of no use to the federation; give the site a copy of the server's files \
                     with node config `llm` / `vision`)",
                    config.client.0,
                    differ.join("; ")
                )));
            }
        }
        let (samples, skipped) = frozen.read_manifest(&config.manifest, observer)?;
        if skipped.total() > 0 {
            // The counts are complete; file and line are kept for the first
            // few of each kind.
            tracing::warn!(
                manifest = %config.manifest.display(),
                "{skipped}"
            );
        }
        if samples.is_empty() {
            return Err(ExperimentError::File {
                path: config.manifest.clone(),
                message: format!(
                    "holds no usable pair ({} skipped); a site needs data to train on",
                    skipped.total()
                ),
            });
        }
        let local = local_config(settings);
        let trainer = LocalTrainer::new(
            Arc::clone(&frozen.decoder),
            Arc::clone(&frozen.tokenizer),
            frozen.template.clone(),
            frozen.projector(settings.recipe.projector, settings.seed)?,
            local,
        )?;
        let run_dir = open_run_state(&config.state_dir, settings)?;
        let store = crate::training::client_store(&run_dir, config.client)?;
        let count = samples.len();
        let node = crate::training::client_node(
            settings,
            ClientData {
                id: config.client,
                samples,
            },
            &local,
            Some(store),
        )?;
        let misbehave = config
            .misbehave
            .as_ref()
            .map(|a| a.for_site(config.client, settings.seed))
            .transpose()?;
        if let Some(attack) = &misbehave {
            tracing::warn!(
                client = config.client.0,
                kind = ?attack.kind,
                factor = attack.factor,
                "this site is configured to misbehave: its updates are replaced"
            );
        }
        Ok(Self {
            frozen,
            trainer,
            node,
            skipped,
            samples: count,
            misbehave,
        })
    }

    /// The site's client id.
    pub fn id(&self) -> ClientId {
        self.node.id()
    }

    /// Pairs the site trains on.
    pub fn num_samples(&self) -> usize {
        self.samples
    }

    /// Records of its manifest that were skipped, by kind.
    pub fn skipped(&self) -> &SkipReport {
        &self.skipped
    }

    /// What the site has as of the end of `round` (with its count of
    /// skipped records, for the server's summary).
    pub fn status(&mut self, round: u64) -> Result<ClientStatus> {
        Ok(ClientStatus {
            skipped: self.skipped.total() as u64,
            ..self.node.status(round)?
        })
    }

    /// Trains for one task and answers it (with its update replaced when
    /// the site is configured to misbehave).
    pub fn handle(&mut self, task: &RoundTask) -> Result<ClientReply> {
        let started = std::time::Instant::now();
        let answered = self
            .node
            .handle(&mut self.trainer, &self.frozen.cache, task);
        let mut reply = match answered {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(round = task.round(), error = %e, "round failed at this site");
                return Err(e.into());
            }
        };
        reply.status.skipped = self.skipped.total() as u64;
        if let (Some(attack), Some(update)) = (&self.misbehave, reply.update.as_mut()) {
            update.params =
                attack.corrupt(task.round(), update.client, &task.global, &update.params)?;
        }
        match &reply.update {
            Some(u) => tracing::info!(
                round = task.round(),
                pairs = u.num_samples,
                steps = u.num_steps,
                loss = u.mean_loss,
                left = reply.status.samples_left,
                secs = format!("{:.1}", started.elapsed().as_secs_f64()),
                "round trained"
            ),
            None => tracing::info!(round = task.round(), "no pair left to train on this round"),
        }
        Ok(reply)
    }
}

/// The backbones a site loads for the run of `settings`: what they are
/// (encoder kind, image size, feature layer, visual tokens) comes from the
/// settings, where they are on disk only from the site's own `config` or
/// cache. A path in the settings is never opened: a server does not decide
/// which files on a site's disk are read.
fn site_backbones(settings: &RunSettings, config: &SiteConfig) -> Result<BackboneSettings> {
    let vision = match (&settings.data.backbones.vision, &config.vision) {
        (VisionChoice::Folder(_), Some(own)) => VisionChoice::Folder(own.clone()),
        (VisionChoice::Folder(name), None) => {
            return Err(ExperimentError::Invalid(format!(
                "site {}: the federation's vision encoder is a CLIP/SigLIP folder ({}); give the \
                 site its own copy with node config `vision` (a folder on the site's disk)",
                config.client.0,
                name.display()
            )))
        }
        (built_in, own) => {
            if let Some(own) = own {
                tracing::warn!(
                    vision = %built_in,
                    unused = %own.display(),
                    "the federation uses a built-in vision encoder; node config `vision` is not used"
                );
            }
            built_in.clone()
        }
    };
    Ok(BackboneSettings {
        llm: config.llm.clone(),
        vision,
        ..settings.data.backbones.clone()
    })
}

/// The settings a site receives: the run's, less every path on the
/// server's disk. The run folder and the server's decoder path are
/// dropped (a site loads its own decoder: node config `llm`, or the
/// registry's in its cache); a CLIP/SigLIP folder and a scenario file are
/// named by their file names only (a site loads its copy of the folder from
/// node config `vision` and never reads the scenario). What the backbones
/// are travels beside them, as digests ([`backbones::digests`]).
pub fn settings_for_sites(settings: &RunSettings) -> RunSettings {
    fn file_name(path: &Path, otherwise: &str) -> PathBuf {
        path.file_name()
            .map_or_else(|| PathBuf::from(otherwise), PathBuf::from)
    }
    let mut sent = settings.clone();
    sent.out = PathBuf::from(crate::settings::DEFAULT_OUT);
    sent.data.backbones.llm = None;
    if let VisionChoice::Folder(folder) = &settings.data.backbones.vision {
        sent.data.backbones.vision = VisionChoice::Folder(file_name(folder, "vision-folder"));
    }
    let scenario = Path::new(&settings.data.scenario);
    if scenario.components().count() > 1 {
        sent.data.scenario = file_name(scenario, "scenario")
            .to_string_lossy()
            .into_owned();
    }
    sent
}

/// Where a site keeps one run's state: `<state-dir>/runs/<key>/`.
const RUNS: &str = "runs";
/// The settings of the run a state folder belongs to.
const RUN_SETTINGS: &str = "settings.toml";

/// The key of the run of `settings` at a site: the server's run folder
/// name (`sites-<method>-s<seed>`) and the first 12 hex digits of the
/// sha256 of the resolved settings, so that a state of another run (other
/// settings, even under the same name) is never resumed.
pub fn run_key(settings: &RunSettings) -> Result<String> {
    let text = settings.to_toml()?;
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "sites-{}-s{}-{hex}",
        settings.training.method(),
        settings.seed
    ))
}

/// The state folder of the run of `settings` under `state_dir`, created
/// with the run's settings beside its client states.
fn open_run_state(state_dir: &Path, settings: &RunSettings) -> Result<PathBuf> {
    let dir = state_dir.join(RUNS).join(run_key(settings)?);
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    let pinned = dir.join(RUN_SETTINGS);
    if !pinned.exists() {
        write_atomic(&pinned, settings.to_toml()?.as_bytes())?;
    }
    let legacy: Vec<String> = std::fs::read_dir(state_dir)
        .map_err(io_error(state_dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("client-"))
        .collect();
    if !legacy.is_empty() {
        tracing::warn!(
            state_dir = %state_dir.display(),
            folders = ?legacy,
            "state of an earlier layout (not bound to a run) is not resumed; remove it once no \
             run needs it"
        );
    }
    Ok(dir)
}

/// One run's state kept at a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteRun {
    /// Its key (the folder under `<state-dir>/runs/`).
    pub key: String,
    /// The newest round it saved a state after (None: none yet).
    pub newest_round: Option<u64>,
    /// Bytes on disk.
    pub bytes: u64,
}

/// The runs whose state a site keeps under `state_dir`, by key.
pub fn site_runs(state_dir: &Path) -> Result<Vec<SiteRun>> {
    let root = state_dir.join(RUNS);
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut runs = Vec::new();
    for entry in std::fs::read_dir(&root).map_err(io_error(&root))? {
        let entry = entry.map_err(io_error(&root))?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let (mut newest, mut bytes) = (None::<u64>, 0u64);
        for client in std::fs::read_dir(&path).map_err(io_error(&path))?.flatten() {
            let client_path = client.path();
            if client_path.is_dir() {
                for file in std::fs::read_dir(&client_path)
                    .map_err(io_error(&client_path))?
                    .flatten()
                {
                    bytes += file.metadata().map(|m| m.len()).unwrap_or(0);
                    let name = file.file_name().to_string_lossy().into_owned();
                    if let Some(r) = name
                        .strip_prefix("round-")
                        .and_then(|n| n.strip_suffix(".safetensors"))
                        .and_then(|n| n.parse::<u64>().ok())
                    {
                        newest = Some(newest.map_or(r, |n| n.max(r)));
                    }
                }
            } else {
                bytes += client.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        runs.push(SiteRun {
            key: entry.file_name().to_string_lossy().into_owned(),
            newest_round: newest,
            bytes,
        });
    }
    runs.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(runs)
}

/// Removes the state of run `key` under `state_dir` (refusing a key that
/// is not one of its runs).
pub fn remove_site_run(state_dir: &Path, key: &str) -> Result<()> {
    let known = site_runs(state_dir)?;
    if !known.iter().any(|r| r.key == key) {
        let keys: Vec<&str> = known.iter().map(|r| r.key.as_str()).collect();
        return Err(ExperimentError::Invalid(format!(
            "{} holds no run {key:?} (its runs: {keys:?})",
            state_dir.join(RUNS).display()
        )));
    }
    let dir = state_dir.join(RUNS).join(key);
    std::fs::remove_dir_all(&dir).map_err(io_error(&dir))
}

/// One exported site folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportedSite {
    pub client: u32,
    pub manifest: PathBuf,
    pub pairs: usize,
}

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exported {
    pub sites: Vec<ExportedSite>,
    /// The held-out splits as manifests (`validation.jsonl`, `test.jsonl`).
    pub validation: PathBuf,
    pub test: PathBuf,
}

/// Writes `records` (with their images, as PNG) as a JSONL manifest at
/// `dir/name`, in order; images under `dir/images/`.
fn write_manifest(
    dir: &Path,
    name: &str,
    records: &[&Record],
    label_name: &dyn Fn(&Record) -> Option<String>,
) -> Result<PathBuf> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(io_error(&images))?;
    let mut lines = String::new();
    for (i, record) in records.iter().enumerate() {
        let image = corpus::load_image(&record.image).map_err(|e| {
            ExperimentError::Invalid(format!(
                "record {}: cannot export its image: {e}",
                record.id
            ))
        })?;
        let file = format!("{name}-{i:06}.png");
        let path = images.join(&file);
        let mut png = Vec::new();
        image
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| ExperimentError::Invalid(format!("record {}: {e}", record.id)))?;
        write_atomic(&path, &png)?;
        let id = record
            .id
            .split_once('/')
            .map_or(record.id.as_str(), |(_, rest)| rest);
        let mut line = serde_json::json!({
            "image": format!("images/{file}"),
            "caption": record.caption,
            "source": record.source,
            "id": id,
        });
        if let Some(label) = label_name(record) {
            line["label"] = serde_json::Value::String(label);
        }
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    let manifest = dir.join(format!("{name}.jsonl"));
    write_atomic(&manifest, lines.as_bytes())?;
    Ok(manifest)
}

/// Deals the scenario of `settings` into `out`: `site-<id>/data.jsonl`
/// (with `images/`) per client, in shard order, and `held-out/validation.jsonl`
/// and `held-out/test.jsonl`. Captions are written as drawn, so every site
/// trains on exactly the pairs its simulated client would.
pub fn export(
    root: &Path,
    settings: &RunSettings,
    out: &Path,
    observer: &dyn Observer,
) -> Result<Exported> {
    let (_, federation) = crate::federation::build_data(root, &settings.data, observer)?;
    let corpus = &federation.corpus;
    let label_name = |r: &Record| -> Option<String> {
        let label = r.label?;
        corpus
            .label_names
            .get(&r.source)
            .and_then(|names| names.get(label as usize).cloned())
            .or(Some(label.to_string()))
    };
    let pick = |indices: &[usize]| -> Vec<&Record> {
        indices
            .iter()
            .filter_map(|&i| corpus.records.get(i))
            .collect()
    };
    let mut sites = Vec::new();
    for (c, shard) in federation.plan.shards.iter().enumerate() {
        let dir = out.join(format!("site-{c:04}"));
        let records = pick(shard);
        let manifest = write_manifest(&dir, "data", &records, &label_name)?;
        sites.push(ExportedSite {
            client: c as u32,
            manifest,
            pairs: records.len(),
        });
    }
    let held_out = out.join("held-out");
    let splits = &federation.plan.splits;
    let validation = write_manifest(
        &held_out,
        "validation",
        &pick(&splits.validation),
        &label_name,
    )?;
    let test = write_manifest(&held_out, "test", &pick(&splits.test), &label_name)?;
    Ok(Exported {
        sites,
        validation,
        test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Layers;

    fn settings(text: &str) -> Result<RunSettings> {
        RunSettings::resolve(&Layers::new().text("test", text)?)
    }

    fn site(llm: Option<&str>, vision: Option<&str>) -> SiteConfig {
        SiteConfig {
            client: ClientId(3),
            manifest: PathBuf::from("/site/data.jsonl"),
            state_dir: PathBuf::from("/site/state"),
            cache_dir: PathBuf::from("/site/cache"),
            llm: llm.map(PathBuf::from),
            vision: vision.map(PathBuf::from),
            misbehave: None,
        }
    }

    const SERVER: &str = r#"
        scenario = "/srv/fedcmp/scenarios/hospitals.toml"
        llm = "/srv/fedcmp/models/decoder.gguf"
        vision = "/srv/fedcmp/models/clip-vit-base-patch16"
        out = "/srv/fedcmp/runs"
        seed = 7
    "#;

    #[test]
    fn the_settings_sent_to_sites_hold_no_server_path() -> Result<()> {
        let server = settings(SERVER)?;
        let sent = settings_for_sites(&server);
        let text = sent.to_toml()?;
        assert!(!text.contains("/srv"), "{text}");
        assert_eq!(sent.data.backbones.llm, None);
        assert_eq!(
            sent.data.backbones.vision,
            VisionChoice::Folder(PathBuf::from("clip-vit-base-patch16"))
        );
        assert_eq!(sent.data.scenario, "hospitals.toml");
        // What the sites train by is unchanged, and it reads back as itself.
        assert_eq!(sent.recipe, server.recipe);
        assert_eq!(sent.seed, 7);
        assert_eq!(
            sent.data.backbones.feature_layer,
            server.data.backbones.feature_layer
        );
        assert_eq!(settings(&text)?, sent);
        // Built-in names pass as they are.
        let plain = settings("scenario = \"iid\"\nvision = \"mobilenet-v2\"")?;
        let sent = settings_for_sites(&plain);
        assert_eq!(sent.data.scenario, "iid");
        assert_eq!(sent.data.backbones.vision, VisionChoice::MobilenetV2);
        Ok(())
    }

    #[test]
    fn a_site_opens_only_its_own_backbone_paths() -> Result<()> {
        // Even settings that still name the server's paths (an older server)
        // open nothing of them.
        let server = settings(SERVER)?;
        let wanted = site_backbones(
            &server,
            &site(Some("/site/decoder.gguf"), Some("/site/clip")),
        )?;
        assert_eq!(wanted.llm, Some(PathBuf::from("/site/decoder.gguf")));
        assert_eq!(
            wanted.vision,
            VisionChoice::Folder(PathBuf::from("/site/clip"))
        );
        assert_eq!(wanted.feature_layer, server.data.backbones.feature_layer);
        // No decoder of its own: the registry's, in its cache.
        let wanted = site_backbones(&server, &site(None, Some("/site/clip")))?;
        assert_eq!(wanted.llm, None);
        assert!(backbones::llm_path(Path::new("/site/cache"), &wanted).starts_with("/site/cache"));
        // A folder encoder and no folder of its own: refused, naming the key.
        let refused = match site_backbones(&server, &site(None, None)) {
            Err(e) => e.to_string(),
            Ok(wanted) => panic!("a site without its own vision folder opened {wanted:?}"),
        };
        assert!(
            refused.contains("site 3") && refused.contains("`vision`"),
            "{refused}"
        );
        assert!(refused.contains("clip-vit-base-patch16"), "{refused}");
        // A built-in encoder: the site's folder is not used.
        let built_in = settings("vision = \"patch-means\"")?;
        let wanted = site_backbones(&built_in, &site(None, Some("/site/clip")))?;
        assert_eq!(wanted.vision, VisionChoice::PatchMeans);
        Ok(())
    }
}
