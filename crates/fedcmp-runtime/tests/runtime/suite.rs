//! The evaluation suite on fixtures with known answers: a projector trained
//! to tell two classes apart classifies and retrieves them perfectly,
//! untrained projectors sit at chance on average, per-domain and macro
//! numbers follow their definitions, and the subsets are fixed by the seed.

use crate::common::{grey_record, tiny_backbones};
use anyhow::Result;
use candle_core::{DType, Device};
use fedcmp_data::cache::FeatureCache;
use fedcmp_data::preprocess::Preprocess;
use fedcmp_model::alignment::{train_step, AlignmentBatch, CaptionTemplate, TokenizedCaptions};
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::optim::{AdamW, AdamWConfig};
use fedcmp_model::projector::{Projector, ProjectorConfig, ProjectorKind};
use fedcmp_model::tokenizer::TextTokenizer;
use fedcmp_model::vision::patch_means::PatchMeans;
use fedcmp_runtime::client::Sample;
use fedcmp_runtime::suite::{
    evaluate, named_class, recovery, Domain, Item, Scorer, Suite, SuiteConfig,
};

const PROMPTS: [&str; 2] = ["night.", "day."];

struct Fixture {
    decoder: FrozenDecoder,
    tokenizer: TextTokenizer,
    cache: FeatureCache,
    train: Vec<Item>,
    held_out: Vec<Item>,
    _dir: tempfile::TempDir,
}

/// Domain 0 ("sky", labelled): bright images are "day" (label 1), dark
/// ones "night" (label 0), captioned with the class prompt. Domain 1
/// ("noise", unlabelled): mid-grey images with a fixed caption.
fn fixture() -> Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let (decoder, tokenizer) = tiny_backbones()?;
    let mut records = Vec::new();
    let mut meta = Vec::new();
    for i in 0..56u8 {
        let (domain, label, base, caption) = if i < 48 {
            let bright = i % 2 == 0;
            let label = u32::from(bright);
            (
                0,
                Some(label),
                if bright { 210u8 } else { 25 },
                PROMPTS[label as usize],
            )
        } else {
            (1, None, 120u8, "Static.")
        };
        let source = if domain == 0 { "sky" } else { "noise" };
        records.push(grey_record(i, base, caption, label, source));
        meta.push((domain, label));
    }
    let encoder = PatchMeans::new(8)?;
    let mut cache = FeatureCache::open(
        dir.path(),
        &encoder,
        Preprocess::square(8, [0.5; 3], [0.25; 3]),
    )?;
    let report = cache.ensure(&records, &encoder, 16, &mut |_| {})?;
    let mut items = Vec::new();
    for ((key, record), (domain, label)) in report.keys.into_iter().zip(&records).zip(meta) {
        let key = key.ok_or_else(|| anyhow::anyhow!("{} not cached", record.id))?;
        items.push(Item {
            id: record.id.clone(),
            sample: Sample {
                key,
                caption: record.caption.clone(),
            },
            domain,
            label,
        });
    }
    // Items 0..32 train; 32..48 (sky) and 48..56 (noise) are held out.
    let held_out = items.split_off(32);
    Ok(Fixture {
        decoder,
        tokenizer,
        cache,
        train: items,
        held_out,
        _dir: dir,
    })
}

fn domains() -> Vec<Domain> {
    vec![
        Domain {
            name: "sky".into(),
            class_names: vec!["night".into(), "day".into()],
            class_prompts: PROMPTS.iter().map(|s| s.to_string()).collect(),
        },
        Domain {
            name: "noise".into(),
            class_names: Vec::new(),
            class_prompts: Vec::new(),
        },
    ]
}

fn projector(f: &Fixture, seed: u64) -> Result<Projector> {
    Ok(Projector::new(
        ProjectorConfig {
            kind: ProjectorKind::Mlp2xGelu,
            input_dim: 3,
            output_dim: f.decoder.config().hidden_size,
        },
        seed,
        DType::F32,
        &Device::Cpu,
    )?)
}

fn config() -> SuiteConfig {
    SuiteConfig {
        zero_shot_per_domain: 16,
        caption_checks: 6,
        caption_examples: 3,
        calibration_images: 8,
        max_caption_tokens: 6,
        batch_size: 8,
        seed: 4,
    }
}

/// Calibration images: the first training items (the fixture has no
/// validation split).
fn calibration(f: &Fixture) -> Vec<fedcmp_data::cache::FeatureKey> {
    f.train.iter().map(|i| i.sample.key.clone()).collect()
}

#[test]
fn trained_projector_separates_the_classes_untrained_ones_are_at_chance() -> Result<()> {
    let f = fixture()?;
    let template = CaptionTemplate::plain();
    let scorer = Scorer {
        decoder: &f.decoder,
        tokenizer: &f.tokenizer,
        template: &template,
        cache: &f.cache,
    };
    let suite = Suite::new(domains(), f.held_out.clone(), calibration(&f), config())?;
    assert_eq!(suite.zero_shot[0].len(), 16);
    assert!(suite.zero_shot[1].is_empty(), "no labels, no zero-shot");
    assert_eq!((suite.checks[0].len(), suite.checks[1].len()), (6, 6));
    assert_eq!(suite.examples.len(), 3);
    assert_eq!(suite.calibration.len(), 8);

    // Chance: the mean accuracy of untrained projectors over seeds.
    let mut accuracies = Vec::new();
    for seed in 0..6 {
        let report = evaluate(&scorer, &projector(&f, seed)?, &suite, &mut |_| {})?;
        accuracies.push(report.domains[0].zero_shot_accuracy.unwrap_or(f64::NAN));
    }
    let chance = accuracies.iter().sum::<f64>() / accuracies.len() as f64;
    assert!(
        (0.2..=0.8).contains(&chance),
        "untrained accuracies {accuracies:?}"
    );

    // Trained on the 32 training items.
    let trained = projector(&f, 0)?;
    let init = evaluate(&scorer, &trained, &suite, &mut |_| {})?;
    let mut optimizer = AdamW::new(trained.vars(), AdamWConfig::default())?;
    for step in 0..400 {
        let chunk: Vec<&Item> = (0..8).map(|j| &f.train[(step * 8 + j) % 32]).collect();
        let keys: Vec<_> = chunk.iter().map(|i| &i.sample.key).collect();
        let captions: Vec<&str> = chunk.iter().map(|i| i.sample.caption.as_str()).collect();
        let tokens = TokenizedCaptions::new(&f.tokenizer, &template, &captions)?;
        let batch = AlignmentBatch::new(&f.decoder, f.cache.batch(&keys)?, &tokens)?;
        train_step(&f.decoder, &trained, &mut optimizer, &batch, 2e-2)?;
    }
    let mut scored = 0;
    let report = evaluate(&scorer, &trained, &suite, &mut |n| scored += n)?;
    assert_eq!(scored, suite.num_pairs());
    let sky = &report.domains[0];
    assert_eq!(sky.zero_shot_accuracy, Some(1.0), "{report:#?}");
    assert_eq!(sky.zero_shot_raw_accuracy, Some(1.0), "{report:#?}");
    // The tiny random decoder cannot be steered through a whole greedy
    // caption (named_class has its own test); the share is what it is.
    let named = sky.items.caption.iter().filter(|c| **c).count() as f64 / 6.0;
    assert_eq!(sky.caption_accuracy, Some(named));
    assert_eq!(sky.items.zero_shot.len(), 16);
    assert_eq!(sky.items.caption.len(), 6);
    assert_eq!(sky.items.log_likelihood.len(), 16);
    let tokens: u32 = sky.items.tokens.iter().sum();
    let nll = -sky.items.log_likelihood.iter().sum::<f64>() / f64::from(tokens);
    assert!(
        (nll - sky.nll).abs() < 1e-12,
        "the items add up to the domain's NLL"
    );
    assert!(sky.nll < init.domains[0].nll);
    assert_eq!(report.chance, Some(0.5));
    // The calibration, recomputed by hand for an untrained projector (its
    // predictions are not all right): score(c) = log p(prompt_c | image) -
    // log p(prompt_c | mean visual token of the calibration images).
    let untrained = projector(&f, 3)?;
    let report_untrained = evaluate(&scorer, &untrained, &suite, &mut |_| {})?;
    let null = scorer.mean_visual(&untrained, &suite.calibration)?;
    let prompts: Vec<&str> = PROMPTS.to_vec();
    let first = &suite.items[suite.zero_shot[0][0]].sample.key;
    let prior = scorer.score_given_visual(&null, first, &prompts)?;
    for (row, &i) in suite.zero_shot[0].iter().enumerate() {
        let item = &suite.items[i];
        let pairs: Vec<_> = prompts.iter().map(|p| (&item.sample.key, *p)).collect();
        let scores = scorer.score_pairs(&untrained, &pairs, 8, &mut |_| {})?;
        let calibrated: Vec<f64> = scores
            .iter()
            .zip(&prior)
            .map(|(s, p)| s.log_likelihood - p.log_likelihood)
            .collect();
        let predicted = if calibrated[1] > calibrated[0] { 1 } else { 0 };
        assert_eq!(
            report_untrained.domains[0].items.zero_shot[row],
            item.label == Some(predicted),
            "image {row}"
        );
    }
    let noise = &report.domains[1];
    assert_eq!(noise.zero_shot_accuracy, None);
    assert_eq!(noise.caption_accuracy, None, "no classes to name");
    assert_eq!((sky.samples, noise.samples), (16, 8));
    // Macro numbers follow their definitions.
    assert!((report.macro_nll - (sky.nll + noise.nll) / 2.0).abs() < 1e-12);
    assert!((report.macro_perplexity - report.macro_nll.exp()).abs() < 1e-9);
    assert_eq!(report.macro_zero_shot_accuracy, sky.zero_shot_accuracy);
    assert!((sky.perplexity - sky.nll.exp()).abs() < 1e-9);
    // Greedy captions name held-out images, taken round-robin by domain.
    let domains: Vec<&str> = report.captions.iter().map(|c| c.domain.as_str()).collect();
    assert_eq!(domains, ["sky", "noise", "sky"]);
    for c in &report.captions {
        assert!(c.id.starts_with(&format!("{}/", c.domain)), "{c:?}");
    }
    Ok(())
}

#[test]
fn subsets_are_fixed_by_the_seed_and_bad_items_are_refused() -> Result<()> {
    let f = fixture()?;
    let a = Suite::new(domains(), f.held_out.clone(), calibration(&f), config())?;
    let b = Suite::new(domains(), f.held_out.clone(), calibration(&f), config())?;
    assert_eq!(a.zero_shot, b.zero_shot);
    assert_eq!(a.checks, b.checks);
    let other = Suite::new(
        domains(),
        f.held_out.clone(),
        calibration(&f),
        SuiteConfig {
            seed: 5,
            ..config()
        },
    )?;
    assert_ne!(a.checks, other.checks);

    let mut bad = f.held_out.clone();
    bad[0].label = Some(7);
    let err = Suite::new(domains(), bad, Vec::new(), config())
        .err()
        .map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.contains("label 7") && e.contains("sky")));
    let mut bad = f.held_out.clone();
    bad[0].domain = 5;
    assert!(Suite::new(domains(), bad, Vec::new(), config()).is_err());
    Ok(())
}

/// A caption names the class whose name it contains, the longest when
/// several do; case does not matter.
#[test]
fn captions_name_the_longest_matching_class() {
    let names: Vec<String> = ["a shirt", "a t-shirt", "a bag"].map(String::from).to_vec();
    assert_eq!(
        named_class("A T-shirt on a plain background.", &names),
        Some(1)
    );
    assert_eq!(named_class("This item is a shirt.", &names), Some(0));
    assert_eq!(named_class("A product photo of a bag.", &names), Some(2));
    assert_eq!(named_class("A sneaker.", &names), None);
    assert_eq!(named_class("", &names), None);
}

#[test]
fn recovery_is_the_share_of_the_centralized_gain() {
    assert_eq!(recovery(6.0, 5.0, 4.0), Some(0.5));
    assert_eq!(recovery(6.0, 4.0, 4.0), Some(1.0));
    assert_eq!(recovery(6.0, 6.5, 4.0), Some(-0.25));
    assert_eq!(recovery(6.0, 5.0, 6.0), None);
    assert_eq!(recovery(6.0, f64::NAN, 4.0), None);
}

/// The suite batches everything (NLL pairs, every zero-shot image x prompt
/// over one cached context per image, all greedy captions through one
/// KV cache); scored one item at a time instead, by the plain paths (each
/// pair a full forward pass on its own, each caption decoded alone), every
/// per-item result is the same: log-likelihoods to float tolerance,
/// zero-shot verdicts (calibrated and raw, from the full prompt
/// likelihoods) and captions exactly.
#[test]
fn the_batched_suite_matches_scoring_one_item_at_a_time() -> Result<()> {
    let f = fixture()?;
    // A separator, so the caption context is prefix, image, separator.
    let template = CaptionTemplate {
        separator: "\n".into(),
        ..CaptionTemplate::plain()
    };
    let scorer = Scorer {
        decoder: &f.decoder,
        tokenizer: &f.tokenizer,
        template: &template,
        cache: &f.cache,
    };
    let config = SuiteConfig {
        caption_checks: 8,
        caption_examples: 16,
        max_caption_tokens: 8,
        ..config()
    };
    let suite = Suite::new(domains(), f.held_out.clone(), calibration(&f), config)?;
    let mut lengths = std::collections::BTreeSet::new();
    for seed in [3, 5, 6] {
        let projector = projector(&f, seed)?;
        let report = evaluate(&scorer, &projector, &suite, &mut |_| {})?;
        let null = scorer.mean_visual(&projector, &suite.calibration)?;
        for (d, domain) in suite.domains.iter().enumerate() {
            let got = &report.domains[d].items;
            // NLL: each pair alone.
            let mine: Vec<&Item> = suite.items.iter().filter(|i| i.domain == d).collect();
            assert_eq!(got.log_likelihood.len(), mine.len());
            for (item, &ll) in mine.iter().zip(&got.log_likelihood) {
                let alone = scorer.score_pairs(
                    &projector,
                    &[(&item.sample.key, item.sample.caption.as_str())],
                    1,
                    &mut |_| {},
                )?;
                let want = alone[0].log_likelihood;
                assert!(
                    (ll - want).abs() < 1e-4 * want.abs().max(1.0),
                    "seed {seed}, {}: {ll} vs {want}",
                    item.id
                );
            }
            // Zero-shot: every prompt's full likelihood, image by image.
            let prompts: Vec<&str> = domain.class_prompts.iter().map(String::as_str).collect();
            let mut want_calibrated = Vec::new();
            if !prompts.is_empty() {
                let first = &suite.items[suite.zero_shot[d][0]].sample.key;
                let prior = scorer.score_given_visual(&null, first, &prompts)?;
                for &i in &suite.zero_shot[d] {
                    let item = &suite.items[i];
                    let mut scores = Vec::new();
                    for p in &prompts {
                        let s = scorer.score_pairs(
                            &projector,
                            &[(&item.sample.key, *p)],
                            1,
                            &mut |_| {},
                        )?;
                        scores.push(s[0].log_likelihood);
                    }
                    let best =
                        |v: Vec<f64>| (0..v.len()).fold(0, |b, c| if v[c] > v[b] { c } else { b });
                    let calibrated = best(
                        scores
                            .iter()
                            .zip(&prior)
                            .map(|(s, p)| s - p.log_likelihood)
                            .collect(),
                    );
                    want_calibrated.push(item.label == Some(calibrated as u32));
                }
            }
            assert_eq!(got.zero_shot, want_calibrated, "seed {seed}, domain {d}");
            // Captions: each decoded alone.
            let mut want_hits = Vec::new();
            for &i in &suite.checks[d] {
                let item = &suite.items[i];
                let alone = scorer.caption(
                    &projector,
                    &item.sample.key,
                    config.max_caption_tokens,
                    fedcmp_model::alignment::Decoding::Greedy,
                )?;
                lengths.insert(f.tokenizer.encode(&alone)?.len());
                if let (Some(label), false) = (item.label, domain.class_names.is_empty()) {
                    want_hits
                        .push(named_class(&alone, &domain.class_names) == Some(label as usize));
                }
                let shown = report.captions.iter().find(|c| c.id == item.id);
                assert_eq!(
                    shown.map(|c| c.generated.as_str()),
                    Some(alone.as_str()),
                    "seed {seed}, {}",
                    item.id
                );
            }
            assert_eq!(got.caption, want_hits, "seed {seed}, domain {d}");
        }
    }
    // Captions of several lengths: the batch lost rows as captions ended.
    assert!(lengths.len() > 1, "caption lengths {lengths:?}");
    Ok(())
}
