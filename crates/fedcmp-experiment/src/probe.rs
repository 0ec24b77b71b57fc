//! The linear probe: how well the frozen vision features, as the projector
//! sees them (pooled to the configured visual tokens, then flattened), tell
//! a domain's classes apart with a linear classifier. It bounds what any
//! projector can make the decoder say about the class, so the research
//! recipe reports how close it gets (ALGORITHMS.md §7.1).
//!
//! Per labelled domain: multinomial logistic regression on standardised
//! features (mean and spread of the training split), trained full-batch
//! with AdamW for a fixed number of steps, its L2 weight chosen from a
//! small grid by validation accuracy (ties: the stronger weight), scored
//! on the test split.

use candle_core::{DType, Device, Tensor, Var, D};
use fedcmp_data::cache::FeatureKey;
use fedcmp_model::optim::{AdamW, AdamWConfig};
use fedcmp_runtime::suite::Item;
use serde::Serialize;

use crate::assembly::Experiment;
use crate::Result;

/// L2 weights tried.
const L2: [f64; 4] = [1e-4, 1e-3, 1e-2, 1e-1];
/// Full-batch AdamW steps per fit.
const STEPS: usize = 300;
const LR: f64 = 1e-2;

/// One domain's probe.
#[derive(Debug, Clone, Serialize)]
pub struct DomainProbe {
    pub domain: String,
    pub classes: usize,
    pub train: usize,
    pub test: usize,
    /// The chosen L2 weight and its validation accuracy.
    pub l2: f64,
    pub validation_accuracy: f64,
    pub test_accuracy: f64,
}

/// The probe of every labelled domain.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub domains: Vec<DomainProbe>,
    /// Mean test accuracy over the domains.
    pub macro_accuracy: f64,
}

/// Features (n, D) f32 and labels of `items` of one domain.
fn design(experiment: &Experiment, items: &[&Item]) -> Result<(Tensor, Vec<u32>)> {
    let keys: Vec<&FeatureKey> = items.iter().map(|i| &i.sample.key).collect();
    let x = experiment.cache.batch(&keys)?.flatten_from(1)?;
    let y = items.iter().filter_map(|i| i.label).collect();
    Ok((x, y))
}

/// A fitted linear classifier.
struct Linear {
    w: Tensor,
    b: Tensor,
}

impl Linear {
    fn predict(&self, x: &Tensor) -> Result<Vec<u32>> {
        let logits = x.matmul(&self.w)?.broadcast_add(&self.b)?;
        Ok(logits.argmax(D::Minus1)?.to_vec1()?)
    }
}

/// Softmax regression of `y` on `x` with L2 weight `l2`.
fn fit(x: &Tensor, y: &[u32], classes: usize, l2: f64) -> Result<Linear> {
    let (n, dim) = x.dims2()?;
    let w = Var::zeros((dim, classes), DType::F32, &Device::Cpu)?;
    let b = Var::zeros(classes, DType::F32, &Device::Cpu)?;
    let mut optimizer = AdamW::new(vec![w.clone(), b.clone()], AdamWConfig::default())?;
    let targets = Tensor::from_vec(y.to_vec(), n, &Device::Cpu)?;
    for _ in 0..STEPS {
        let logits = x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let nll = log_probs
            .gather(&targets.unsqueeze(1)?, 1)?
            .mean_all()?
            .neg()?;
        let loss = (nll + (w.as_tensor().sqr()?.sum_all()? * l2)?)?;
        let grads = loss.backward()?;
        let g = [w.as_tensor(), b.as_tensor()].map(|v| grads.get(v).cloned());
        optimizer.step(&g, LR)?;
    }
    Ok(Linear {
        w: w.as_tensor().clone(),
        b: b.as_tensor().clone(),
    })
}

fn accuracy(predicted: &[u32], y: &[u32]) -> f64 {
    if y.is_empty() {
        return f64::NAN;
    }
    predicted.iter().zip(y).filter(|(p, t)| p == t).count() as f64 / y.len() as f64
}

/// Probes every labelled domain of `experiment`.
pub fn linear_probe(experiment: &Experiment) -> Result<ProbeReport> {
    let mut domains = Vec::new();
    for (d, domain) in experiment.suite.domains.iter().enumerate() {
        let classes = domain.class_names.len();
        if classes < 2 {
            continue;
        }
        fn pick(items: &[Item], d: usize) -> Vec<&Item> {
            items
                .iter()
                .filter(|i| i.domain == d && i.label.is_some())
                .collect()
        }
        let (train, validation, test) = (
            pick(&experiment.train_items, d),
            pick(&experiment.validation_items, d),
            pick(&experiment.suite.items, d),
        );
        if train.is_empty() || test.is_empty() {
            continue;
        }
        let (xt, yt) = design(experiment, &train)?;
        let mean = xt.mean_keepdim(0)?;
        let std = (xt.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)? + 1e-6)?.sqrt()?;
        let standardise =
            |x: Tensor| -> Result<Tensor> { Ok(x.broadcast_sub(&mean)?.broadcast_div(&std)?) };
        let xt = standardise(xt)?;
        let (xv, yv) = design(experiment, &validation)?;
        let xv = standardise(xv)?;
        let (xs, ys) = design(experiment, &test)?;
        let xs = standardise(xs)?;
        let mut best: Option<(f64, f64, Linear)> = None;
        for l2 in L2 {
            let model = fit(&xt, &yt, classes, l2)?;
            let acc = if yv.is_empty() {
                accuracy(&model.predict(&xt)?, &yt)
            } else {
                accuracy(&model.predict(&xv)?, &yv)
            };
            if best.as_ref().is_none_or(|(_, b, _)| acc >= *b) {
                best = Some((l2, acc, model));
            }
        }
        let Some((l2, validation_accuracy, model)) = best else {
            continue;
        };
        domains.push(DomainProbe {
            domain: domain.name.clone(),
            classes,
            train: yt.len(),
            test: ys.len(),
            l2,
            validation_accuracy,
            test_accuracy: accuracy(&model.predict(&xs)?, &ys),
        });
    }
    let macro_accuracy =
        domains.iter().map(|d| d.test_accuracy).sum::<f64>() / domains.len().max(1) as f64;
    Ok(ProbeReport {
        domains,
        macro_accuracy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two Gaussian blobs far apart: the probe separates them.
    #[test]
    fn separable_classes_are_separated() -> Result<()> {
        let n = 40;
        let data: Vec<f32> = (0..n)
            .flat_map(|i| {
                let c = (i % 2) as f32 * 2.0 - 1.0;
                let jitter = ((i * 37 % 11) as f32 - 5.0) * 0.05;
                [c + jitter, -c + jitter * 0.5, jitter]
            })
            .collect();
        let x = Tensor::from_vec(data, (n, 3), &Device::Cpu)?;
        let y: Vec<u32> = (0..n as u32).map(|i| i % 2).collect();
        let model = fit(&x, &y, 2, 1e-3)?;
        assert_eq!(accuracy(&model.predict(&x)?, &y), 1.0);
        Ok(())
    }
}
