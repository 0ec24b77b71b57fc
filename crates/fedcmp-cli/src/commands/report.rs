//! Renderers for evaluation results: the per-domain suite table printed by
//! `run` and `align`, and `compare`'s Markdown tables (methods x
//! scenarios, mean ± std over seeds, best in bold).

use std::fmt::Write as _;

use fedcmp_experiment::compare::grid::CANDIDATES;
use fedcmp_experiment::compare::stats::{paired_difference, PairedDifference};
use fedcmp_experiment::compare::summary::{mean_std, Measure, Summary};
use fedcmp_experiment::compare::Method;
use fedcmp_runtime::suite::SuiteReport;

fn cell(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "-".to_string(),
    }
}

/// A per-domain metric getter: (row label, getter, decimals).
type DomainMetric = (&'static str, fn(&SuiteReport, usize) -> Option<f64>, usize);
/// A macro metric getter: (row label, getter, decimals).
type MacroMetric = (&'static str, fn(&SuiteReport) -> Option<f64>, usize);

/// One column per report: caption NLL, calibrated and raw zero-shot
/// accuracy and the captions that name their class, per domain, then the
/// macro averages (and zero-shot's chance level).
pub fn print_suite(columns: &[(&str, &SuiteReport)]) {
    print!("{}", suite_table(columns));
}

/// The text of [`print_suite`].
pub fn suite_table(columns: &[(&str, &SuiteReport)]) -> String {
    let Some((_, first)) = columns.first() else {
        return String::new();
    };
    let mut out = String::new();
    let _ = write!(out, "{:<16} {:<12}", "held-out (test)", "metric");
    for (name, _) in columns {
        let _ = write!(out, " {name:>12}");
    }
    out.push('\n');
    let metrics: [DomainMetric; 4] = [
        ("NLL", |r, d| r.domains.get(d).map(|x| x.nll), 4),
        (
            "zero-shot",
            |r, d| r.domains.get(d).and_then(|x| x.zero_shot_accuracy),
            3,
        ),
        (
            "  raw",
            |r, d| r.domains.get(d).and_then(|x| x.zero_shot_raw_accuracy),
            3,
        ),
        (
            "captions",
            |r, d| r.domains.get(d).and_then(|x| x.caption_accuracy),
            3,
        ),
    ];
    for (d, domain) in first.domains.iter().enumerate() {
        for (i, (metric, get, digits)) in metrics.iter().enumerate() {
            let label = if i == 0 { domain.domain.as_str() } else { "" };
            let _ = write!(out, "{label:<16} {metric:<12}");
            for (_, r) in columns {
                let _ = write!(out, " {:>12}", cell(get(r, d), *digits));
            }
            out.push('\n');
        }
    }
    let macros: [MacroMetric; 5] = [
        ("NLL", |r| Some(r.macro_nll), 4),
        ("zero-shot", |r| r.macro_zero_shot_accuracy, 3),
        ("  raw", |r| r.macro_zero_shot_raw_accuracy, 3),
        ("captions", |r| r.macro_caption_accuracy, 3),
        ("chance", |r| r.chance, 3),
    ];
    for (i, (metric, get, digits)) in macros.iter().enumerate() {
        let label = if i == 0 { "macro average" } else { "" };
        let _ = write!(out, "{label:<16} {metric:<12}");
        for (_, r) in columns {
            let _ = write!(out, " {:>12}", cell(get(r), *digits));
        }
        out.push('\n');
    }
    out
}

/// A Markdown table of `measure`: methods x scenarios, each cell the
/// values over seeds as "mean ± std", the best federated method per
/// scenario in bold (references never are).
pub fn markdown_table(summary: &Summary<'_>, measure: Measure, methods: &[Method]) -> String {
    let scenarios = summary.scenarios();
    let digits = measure.digits();
    let mut out = String::from("| method |");
    for s in &scenarios {
        let _ = write!(out, " {s} |");
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(scenarios.len()));
    out.push('\n');
    for m in methods {
        let _ = write!(out, "| {m} |");
        for s in &scenarios {
            match mean_std(&summary.values(measure, s, *m)) {
                None => out.push_str(" - |"),
                Some((mean, sd)) => {
                    let text = format!("{mean:.digits$} ± {sd:.digits$}");
                    let best = summary.best(measure, s, methods);
                    if !m.is_reference() && best == Some(mean) {
                        let _ = write!(out, " **{text}** |");
                    } else {
                        let _ = write!(out, " {text} |");
                    }
                }
            }
        }
        out.push('\n');
    }
    out
}

/// The methods a method is compared with, pairwise: FedAvg for every other
/// federated method, and FedAvgM too for Fed-CMP and the candidate rules
/// (which become defaults only by beating both, ALGORITHMS-NOTES.md).
pub fn baselines(method: Method) -> Vec<Method> {
    match method {
        Method::Strategy("fedavg") => Vec::new(),
        Method::Strategy(name) if name == "fed-cmp" || CANDIDATES.contains(&name) => {
            vec![Method::Strategy("fedavg"), Method::Strategy("fedavgm")]
        }
        Method::Strategy(_) => vec![Method::Strategy("fedavg")],
        _ => Vec::new(),
    }
}

/// "+0.123 [+0.050, +0.200]", or "no difference (+0.010 [-0.030, +0.050])"
/// when the interval holds 0.
pub fn difference_text(d: &PairedDifference, digits: usize) -> String {
    let core = format!(
        "{:+.digits$} [{:+.digits$}, {:+.digits$}]",
        d.mean, d.low, d.high
    );
    if d.holds_zero() {
        format!("no difference ({core})")
    } else {
        core
    }
}

/// For every measure with per-item results, a table per baseline of each
/// method's paired difference (method - baseline, mean over paired seeds)
/// with its 95% bootstrap interval over seeds x test items.
pub fn paired_section(summary: &Summary<'_>, methods: &[Method]) -> String {
    let scenarios = summary.scenarios();
    let mut out = String::from(
        "\n## Paired differences (method - baseline, 95% bootstrap interval over seeds x test items)\n\n\
         Negative is better for NLL, positive for accuracies; \"no difference\" where the \
         interval holds 0.\n",
    );
    for measure in [
        Measure::TestNll,
        Measure::ZeroShot,
        Measure::CaptionAccuracy,
    ] {
        for baseline in [Method::Strategy("fedavg"), Method::Strategy("fedavgm")] {
            let rows: Vec<Method> = methods
                .iter()
                .copied()
                .filter(|m| baselines(*m).contains(&baseline))
                .collect();
            if rows.is_empty() || !methods.contains(&baseline) {
                continue;
            }
            let _ = write!(out, "\n### {} vs {baseline}\n\n| method |", measure.label());
            for s in &scenarios {
                let _ = write!(out, " {s} |");
            }
            out.push_str("\n|---|");
            out.push_str(&"---|".repeat(scenarios.len()));
            out.push('\n');
            for m in rows {
                let _ = write!(out, "| {m} |");
                for s in &scenarios {
                    let text = paired_difference(summary.cells, s, measure, m, baseline, 0)
                        .map_or("-".to_string(), |d| difference_text(&d, measure.digits()));
                    let _ = write!(out, " {text} |");
                }
                out.push('\n');
            }
        }
    }
    out
}

/// Merges (aggregated rounds) and sequential optimiser steps (rounds x
/// `local_steps`; the centralized reference's rounds are only a logging
/// unit, so its merges are not counted) per run, mean over seeds: what a
/// federation had to close the gap to centralized training with
/// (ALGORITHMS.md §7.3).
pub fn merges_table(summary: &Summary<'_>, methods: &[Method], local_steps: usize) -> String {
    let scenarios = summary.scenarios();
    let mut out =
        String::from("\n## Merges and sequential steps per run (mean over seeds)\n\n| method |");
    for s in &scenarios {
        let _ = write!(out, " {s} |");
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(scenarios.len()));
    out.push('\n');
    for m in methods
        .iter()
        .filter(|m| !matches!(m, Method::Init | Method::LocalOnly))
    {
        let _ = write!(out, "| {m} |");
        for s in &scenarios {
            let rounds: Vec<f64> = summary
                .cells
                .iter()
                .filter(|c| &c.scenario == s && c.method == m.name() && c.error.is_none())
                .map(|c| c.rounds as f64)
                .collect();
            match mean_std(&rounds) {
                Some((r, _)) if *m == Method::Centralized => {
                    let _ = write!(out, " {:.0} steps |", r * local_steps as f64);
                }
                Some((r, _)) => {
                    let _ = write!(out, " {r:.1} merges, {:.0} steps |", r * local_steps as f64);
                }
                None => out.push_str(" - |"),
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fed_cmp_and_the_candidates_are_judged_against_fedavg_and_fedavgm() {
        let both = vec![Method::Strategy("fedavg"), Method::Strategy("fedavgm")];
        assert_eq!(baselines(Method::Strategy("fed-cmp")), both);
        for name in CANDIDATES {
            assert_eq!(baselines(Method::Strategy(name)), both, "{name}");
        }
        assert_eq!(
            baselines(Method::Strategy("fedprox")),
            vec![Method::Strategy("fedavg")]
        );
        assert!(baselines(Method::Strategy("fedavg")).is_empty());
        assert!(baselines(Method::Centralized).is_empty());
    }
}
