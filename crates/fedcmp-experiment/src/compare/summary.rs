//! The numbers a comparison reports, computed from its cells: per scenario
//! and method, the values over seeds of each [`Measure`], their mean and
//! spread, and which federated method is best. Renderers format them.

use fedcmp_core::metrics::names;
use fedcmp_runtime::suite::recovery;

use super::{
    Cell, Method, CRA_ALIGNMENT_MEAN, CRA_BASIS_DRIFT_MEAN, CRA_GAIN_MEDIAN, CRA_GAIN_P10,
    CRA_GAIN_P90,
};

/// A named series of (x, y) points for a line chart.
pub type Series = (String, Vec<(f64, f64)>);

/// A number reported per cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// Test caption NLL per token, macro over domains.
    TestNll,
    /// Recovery of the centralized gain in test NLL,
    /// `(init - method) / (init - centralized)` (init and centralized:
    /// their means over seeds).
    Recovery,
    /// Calibrated zero-shot classification accuracy, macro over labelled
    /// domains.
    ZeroShot,
    /// Share of greedy captions that name the image's class, macro over
    /// labelled domains.
    CaptionAccuracy,
}

impl Measure {
    /// Every measure, in report order.
    pub const ALL: [Measure; 4] = [
        Measure::TestNll,
        Measure::Recovery,
        Measure::ZeroShot,
        Measure::CaptionAccuracy,
    ];

    /// A heading.
    pub fn title(&self) -> &'static str {
        match self {
            Measure::TestNll => "Test caption NLL per token (macro over domains; lower is better)",
            Measure::Recovery => {
                "Recovery of the centralized gain, (init - method) / (init - centralized)"
            }
            Measure::ZeroShot => {
                "Calibrated zero-shot classification accuracy (macro over labelled domains)"
            }
            Measure::CaptionAccuracy => {
                "Greedy captions that name the image's class (macro over labelled domains)"
            }
        }
    }

    /// A column label.
    pub fn label(&self) -> &'static str {
        match self {
            Measure::TestNll => "test NLL",
            Measure::Recovery => "recovery",
            Measure::ZeroShot => "zero-shot",
            Measure::CaptionAccuracy => "captions",
        }
    }

    pub fn lower_is_better(&self) -> bool {
        matches!(self, Measure::TestNll)
    }

    /// Decimals worth printing.
    pub fn digits(&self) -> usize {
        if matches!(self, Measure::TestNll) {
            4
        } else {
            3
        }
    }
}

/// Mean and sample standard deviation of the finite values (0 for one
/// value); None when there is none.
pub fn mean_std(values: &[f64]) -> Option<(f64, f64)> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let n = finite.len();
    if n == 0 {
        return None;
    }
    let mean = finite.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Some((mean, var.sqrt()))
}

/// A comparison's reported cells, indexed for tables.
#[derive(Debug, Clone, Copy)]
pub struct Summary<'a> {
    pub cells: &'a [Cell],
}

impl Summary<'_> {
    /// Scenarios in order of first appearance.
    pub fn scenarios(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for c in self.cells {
            if !v.contains(&c.scenario) {
                v.push(c.scenario.clone());
            }
        }
        v
    }

    /// `methods` that have cells, in that order.
    pub fn methods(&self, methods: &[Method]) -> Vec<Method> {
        methods
            .iter()
            .copied()
            .filter(|m| self.cells.iter().any(|c| c.method == m.name()))
            .collect()
    }

    fn suite_values(&self, measure: Measure, scenario: &str, method: Method) -> Vec<f64> {
        self.cells
            .iter()
            .filter(|c| c.method == method.name() && c.scenario == scenario)
            .filter_map(|c| {
                let s = c.suite.as_ref()?;
                match measure {
                    Measure::TestNll | Measure::Recovery => Some(s.macro_nll),
                    Measure::ZeroShot => s.macro_zero_shot_accuracy,
                    Measure::CaptionAccuracy => s.macro_caption_accuracy,
                }
            })
            .collect()
    }

    /// The values over seeds of `measure` for `method` in `scenario`.
    pub fn values(&self, measure: Measure, scenario: &str, method: Method) -> Vec<f64> {
        let nll = self.suite_values(measure, scenario, method);
        if measure != Measure::Recovery {
            return nll;
        }
        let mean_nll = |m| mean_std(&self.suite_values(Measure::TestNll, scenario, m)).map(|x| x.0);
        let (Some(init), Some(central)) = (mean_nll(Method::Init), mean_nll(Method::Centralized))
        else {
            return Vec::new();
        };
        nll.into_iter()
            .filter_map(|v| recovery(init, v, central))
            .collect()
    }

    /// The mean over seeds.
    pub fn mean(&self, measure: Measure, scenario: &str, method: Method) -> Option<f64> {
        mean_std(&self.values(measure, scenario, method)).map(|m| m.0)
    }

    /// The best mean of a federated method among `methods` in `scenario`
    /// (references never count).
    pub fn best(&self, measure: Measure, scenario: &str, methods: &[Method]) -> Option<f64> {
        methods
            .iter()
            .filter(|m| !m.is_reference())
            .filter_map(|m| self.mean(measure, scenario, *m))
            .fold(None, |acc: Option<f64>, v| match acc {
                Some(a)
                    if (measure.lower_is_better() && v >= a)
                        || (!measure.lower_is_better() && v <= a) =>
                {
                    Some(a)
                }
                _ => Some(v),
            })
    }

    fn seed_zero(&self, scenario: &str, method: Method) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.scenario == scenario && c.method == method.name() && c.seed == 0)
    }

    /// Validation NLL against samples consumed, seed 0, per method of
    /// `methods` in `scenario`; every curve starts at the untrained
    /// projector (same seed, same initialisation) when init was run.
    pub fn curves(&self, scenario: &str, methods: &[Method]) -> Vec<Series> {
        let start = self
            .seed_zero(scenario, Method::Init)
            .map(|c| (0.0, c.val_nll));
        self.methods(methods)
            .iter()
            .filter_map(|m| {
                let c = self.seed_zero(scenario, *m)?;
                (!c.curve.is_empty()).then(|| {
                    let points = start
                        .into_iter()
                        .chain(c.curve.iter().map(|(x, y)| (*x as f64, *y)))
                        .collect();
                    (m.name().to_string(), points)
                })
            })
            .collect()
    }

    /// Interference per round, seed 0: every federated method's mean
    /// pairwise client cosine, and Fed-CMP's mean rho and e_k.
    pub fn interference(&self, scenario: &str, methods: &[Method]) -> Vec<Series> {
        let mut series = Vec::new();
        for m in self.methods(methods).iter().filter(|m| !m.is_reference()) {
            let Some(c) = self.seed_zero(scenario, *m) else {
                continue;
            };
            for (key, label) in [
                (names::COSINE_MEAN, "client cosine"),
                (names::CRA_RHO_MEAN, "rho"),
                (CRA_ALIGNMENT_MEAN, "e_k"),
                (names::CRA_SHARED_SHARE, "shared share"),
                (CRA_GAIN_P10, "gain 10%"),
                (CRA_GAIN_MEDIAN, "gain median"),
                (CRA_GAIN_P90, "gain 90%"),
                (CRA_BASIS_DRIFT_MEAN, "basis drift"),
            ] {
                let points: Vec<(f64, f64)> = c
                    .diagnostics
                    .iter()
                    .filter_map(|d| Some((*d.get("round")?, *d.get(key)?)))
                    .collect();
                if !points.is_empty() && (key == names::COSINE_MEAN || m.name() == "fed-cmp") {
                    series.push((format!("{m} {label}"), points));
                }
            }
        }
        series
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedcmp_runtime::suite::SuiteReport;

    fn cell(method: &str, seed: u64, nll: f64) -> Cell {
        super::super::test_cell(
            method,
            seed,
            SuiteReport {
                domains: Vec::new(),
                macro_nll: nll,
                macro_perplexity: nll.exp(),
                macro_zero_shot_accuracy: None,
                macro_zero_shot_raw_accuracy: None,
                macro_caption_accuracy: None,
                chance: None,
                captions: Vec::new(),
            },
        )
    }

    #[test]
    fn means_spreads_recovery_and_the_best_federated_method() {
        assert_eq!(mean_std(&[]), None);
        assert_eq!(mean_std(&[2.0, f64::NAN]), Some((2.0, 0.0)));
        let (m, s) = mean_std(&[1.0, 3.0]).unwrap_or_default();
        assert!((m - 2.0).abs() < 1e-12 && (s - 2f64.sqrt()).abs() < 1e-12);
        let cells = [
            cell("init", 0, 6.0),
            cell("centralized", 0, 2.0),
            cell("fedavg", 0, 4.0),
            cell("fedavg", 1, 5.0),
            cell("fed-cmp", 0, 3.0),
        ];
        let summary = Summary { cells: &cells };
        let methods = summary.methods(&Method::all());
        assert_eq!(
            summary.values(Measure::TestNll, "s", Method::Strategy("fedavg")),
            vec![4.0, 5.0]
        );
        // (6 - 4) / (6 - 2) and (6 - 5) / (6 - 2).
        assert_eq!(
            summary.values(Measure::Recovery, "s", Method::Strategy("fedavg")),
            vec![0.5, 0.25]
        );
        // Fed-CMP is the best federated method; centralized, lower still,
        // is a reference and never counts.
        assert_eq!(summary.best(Measure::TestNll, "s", &methods), Some(3.0));
        assert_eq!(summary.best(Measure::Recovery, "s", &methods), Some(0.75));
        assert_eq!(summary.mean(Measure::ZeroShot, "s", Method::Init), None);
    }
}
