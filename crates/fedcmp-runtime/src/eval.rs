//! Held-out evaluation of a projector: caption negative log-likelihood per
//! token (token-weighted over the whole split, so long captions count by
//! their length, as in training).

use fedcmp_core::ParamSet;
use fedcmp_data::cache::{FeatureCache, FeatureKey};
use fedcmp_model::alignment::{caption_loss, AlignmentBatch, CaptionTemplate, TokenizedCaptions};
use fedcmp_model::llm::decoder::FrozenDecoder;
use fedcmp_model::projector::Projector;
use fedcmp_model::tokenizer::TextTokenizer;

use crate::client::Sample;
use crate::convert::load_projector;
use crate::{Result, RuntimeError};

/// Everything needed to score projectors on one held-out split.
#[derive(Debug)]
pub struct Evaluator<'a> {
    pub decoder: &'a FrozenDecoder,
    pub tokenizer: &'a TextTokenizer,
    pub template: &'a CaptionTemplate,
    pub cache: &'a FeatureCache,
    pub samples: &'a [Sample],
    pub batch_size: usize,
}

impl Evaluator<'_> {
    /// Caption NLL per token of `projector` as it is.
    pub fn nll(&self, projector: &Projector) -> Result<f64> {
        if self.samples.is_empty() {
            return Err(RuntimeError::Config("the evaluation split is empty".into()));
        }
        let mut total = 0.0;
        let mut tokens = 0usize;
        for chunk in self.samples.chunks(self.batch_size.max(1)) {
            let keys: Vec<&FeatureKey> = chunk.iter().map(|s| &s.key).collect();
            let captions: Vec<&str> = chunk.iter().map(|s| s.caption.as_str()).collect();
            let toks = TokenizedCaptions::new(self.tokenizer, self.template, &captions)?;
            let batch = AlignmentBatch::new(self.decoder, self.cache.batch(&keys)?, &toks)?;
            total +=
                caption_loss(self.decoder, projector, &batch)? * batch.num_target_tokens() as f64;
            tokens += batch.num_target_tokens();
        }
        Ok(total / tokens.max(1) as f64)
    }

    /// Caption NLL per token with `params` loaded into `work` first.
    pub fn nll_of(&self, work: &Projector, params: &ParamSet) -> Result<f64> {
        load_projector(work, params)?;
        self.nll(work)
    }
}
