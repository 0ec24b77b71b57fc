//! A scenario assembled on its data and backbones, ready to train and
//! evaluate on: its federation (shards and held-out splits), the frozen
//! backbones, every image's vision features in the cache, and the
//! evaluation suite over the test split. Assembled once; every run of a
//! comparison reuses it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use fedcmp_core::ClientId;
use fedcmp_data::cache::{FeatureCache, FeatureKey};
use fedcmp_data::record::{Corpus, SkipReport};
use fedcmp_data::scenario::Scenario;
use fedcmp_model::alignment::CaptionTemplate;
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::projector::{Projector, ProjectorConfig, ProjectorKind};
use fedcmp_model::tokenizer::TextTokenizer;
use fedcmp_runtime::client::{ClientData, Sample};
use fedcmp_runtime::eval::Evaluator;
use fedcmp_runtime::suite::{Domain, Item, Scorer, Suite, SuiteConfig};

use crate::backbones;
use crate::events::{Event, Observer};
use crate::settings::DataSettings;
use crate::Result;

/// A scenario ready to train and evaluate on.
#[derive(Debug)]
pub struct Experiment {
    pub scenario: Scenario,
    /// What it was assembled from.
    pub data: DataSettings,
    /// Where the untrained projector's suite is memoised
    /// ([`crate::init_suite`]); None: never.
    pub suite_memo: Option<PathBuf>,
    pub decoder: Arc<FrozenDecoder>,
    pub tokenizer: Arc<TextTokenizer>,
    pub encoder_identity: String,
    pub feature_dim: usize,
    pub cache: FeatureCache,
    /// Each client's shard, by client id.
    pub clients: Vec<ClientData>,
    pub validation: Vec<Sample>,
    pub test: Vec<Sample>,
    /// The test split with domains and labels, and its fixed subsets.
    pub suite: Suite,
    /// The training and validation splits with domains and labels (for
    /// the linear probe).
    pub train_items: Vec<Item>,
    pub validation_items: Vec<Item>,
    pub template: CaptionTemplate,
    /// Records the scenario's readers skipped, and images the encoder could
    /// not read.
    pub skipped: SkipReport,
}

impl Experiment {
    /// Loads the scenario of `data` (a built-in name or a TOML file) and
    /// assembles it: builds its federation (sources capped at the limit,
    /// captions in the chosen style), loads the backbones, caches every
    /// image's features (served with the chosen number of visual tokens)
    /// and lays pairs out with the chosen separator.
    pub fn assemble(
        root: &Path,
        data: &DataSettings,
        suite_config: SuiteConfig,
        observer: &dyn Observer,
    ) -> Result<Self> {
        let (scenario, federation) = crate::federation::build_data(root, data, observer)?;
        let loaded = backbones::load(root, &data.backbones, observer)?;
        let mut cache =
            backbones::served_cache(root, loaded.encoder.as_ref(), data.backbones.visual_tokens)?;
        let corpus = &federation.corpus;
        let (keys, skipped) =
            backbones::encode_corpus(&mut cache, loaded.encoder.as_ref(), corpus, observer)?;
        if skipped.total() > 0 {
            observer.observe(Event::Skipped {
                scenario: &scenario.name,
                report: &skipped,
            });
        }
        let sample = |i: usize| -> Option<Sample> {
            keys.get(i).cloned().flatten().map(|key| Sample {
                key,
                caption: corpus.records[i].caption.clone(),
            })
        };
        let clients = federation
            .plan
            .shards
            .iter()
            .enumerate()
            .map(|(c, shard)| ClientData {
                id: ClientId(c as u32),
                samples: shard.iter().filter_map(|&i| sample(i)).collect(),
            })
            .collect();
        let splits = &federation.plan.splits;
        let validation: Vec<Sample> = splits
            .validation
            .iter()
            .filter_map(|&i| sample(i))
            .collect();
        let test: Vec<Sample> = splits.test.iter().filter_map(|&i| sample(i)).collect();

        let domains = evaluation_domains(corpus);
        let item = |i: usize| evaluation_item(corpus, &keys, &domains, i);
        let items = splits.test.iter().filter_map(|&i| item(i)).collect();
        let train_items = splits.train.iter().filter_map(|&i| item(i)).collect();
        let validation_items = splits.validation.iter().filter_map(|&i| item(i)).collect();
        let calibration = validation.iter().map(|s: &Sample| s.key.clone()).collect();
        let suite = Suite::new(domains, items, calibration, suite_config)?;
        let backbones::Backbones {
            decoder,
            tokenizer,
            encoder,
        } = loaded;
        Ok(Self {
            scenario,
            data: data.clone(),
            suite_memo: Some(crate::init_suite::memo_dir(root)),
            decoder: Arc::new(decoder),
            tokenizer: Arc::new(tokenizer),
            encoder_identity: encoder.identity(),
            feature_dim: encoder.feature_dim(),
            cache,
            clients,
            validation,
            test,
            suite,
            train_items,
            validation_items,
            template: caption_template(data),
            skipped,
        })
    }

    /// A fresh projector (its initialisation depends on `seed` only).
    pub fn projector(&self, kind: ProjectorKind, seed: u64) -> Result<Projector> {
        fresh_projector(
            kind,
            self.feature_dim,
            self.decoder.config().hidden_size,
            seed,
        )
    }

    fn evaluator<'a>(&'a self, samples: &'a [Sample]) -> Evaluator<'a> {
        evaluator(
            &self.decoder,
            &self.tokenizer,
            &self.template,
            &self.cache,
            samples,
        )
    }

    /// Caption NLL on the validation split.
    pub fn validator(&self) -> Evaluator<'_> {
        self.evaluator(&self.validation)
    }

    /// Caption NLL on the test split.
    pub fn tester(&self) -> Evaluator<'_> {
        self.evaluator(&self.test)
    }

    /// The full suite's scorer.
    pub fn scorer(&self) -> Scorer<'_> {
        Scorer {
            decoder: &self.decoder,
            tokenizer: &self.tokenizer,
            template: &self.template,
            cache: &self.cache,
        }
    }
}

/// The evaluation domains of `corpus`: its sources in order of first
/// appearance, with their class names and zero-shot prompts.
pub(crate) fn evaluation_domains(corpus: &Corpus) -> Vec<Domain> {
    let mut names: Vec<&String> = Vec::new();
    for r in &corpus.records {
        if !names.contains(&&r.source) {
            names.push(&r.source);
        }
    }
    names
        .into_iter()
        .map(|n| Domain {
            name: n.clone(),
            class_names: corpus.label_names.get(n).cloned().unwrap_or_default(),
            class_prompts: corpus.class_prompts(n).unwrap_or_default(),
        })
        .collect()
}

/// Record `i` of `corpus` as an evaluation item (None when its image was
/// skipped: no key).
pub(crate) fn evaluation_item(
    corpus: &Corpus,
    keys: &[Option<FeatureKey>],
    domains: &[Domain],
    i: usize,
) -> Option<Item> {
    let record = corpus.records.get(i)?;
    Some(Item {
        id: record.id.clone(),
        sample: Sample {
            key: keys.get(i).cloned().flatten()?,
            caption: record.caption.clone(),
        },
        domain: domains.iter().position(|d| d.name == record.source)?,
        label: record.label,
    })
}

/// How `data` lays a pair out: LLaVA's plain template with its separator.
pub fn caption_template(data: &DataSettings) -> CaptionTemplate {
    CaptionTemplate {
        separator: data.caption_separator.clone(),
        ..CaptionTemplate::plain()
    }
}

/// A fresh projector from `input_dim` features to the decoder's
/// `output_dim`; its values depend on `seed` only, so a server and its
/// sites, or two runs, start from the same one.
pub fn fresh_projector(
    kind: ProjectorKind,
    input_dim: usize,
    output_dim: usize,
    seed: u64,
) -> Result<Projector> {
    Ok(Projector::new(
        ProjectorConfig {
            kind,
            input_dim,
            output_dim,
        },
        seed,
        DType::F32,
        &Device::Cpu,
    )?)
}

/// Caption NLL on `samples` over these frozen parts, at the one
/// evaluation batch size every split uses.
pub(crate) fn evaluator<'a>(
    decoder: &'a FrozenDecoder,
    tokenizer: &'a TextTokenizer,
    template: &'a CaptionTemplate,
    cache: &'a FeatureCache,
    samples: &'a [Sample],
) -> Evaluator<'a> {
    Evaluator {
        decoder,
        tokenizer,
        template,
        cache,
        samples,
        batch_size: 16,
    }
}
