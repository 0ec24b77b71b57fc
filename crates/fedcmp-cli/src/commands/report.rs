//! Renderers for evaluation results: the per-domain suite table printed by
//! `run` and the main job, and `compare`'s Markdown tables (methods x
//! scenarios, mean +- std over seeds, best in bold).

use std::fmt::Write as _;

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

/// One column per report: caption NLL, zero-shot accuracy and R@1 per
/// domain, then the macro averages.
pub fn print_suite(columns: &[(&str, &SuiteReport)]) {
    print!("{}", suite_table(columns));
}

/// The text of [`print_suite`].
pub fn suite_table(columns: &[(&str, &SuiteReport)]) -> String {
    let Some((_, first)) = columns.first() else {
        return String::new();
    };
    let mut out = String::new();
    let _ = write!(out, "{:<16} {:<10}", "held-out (test)", "metric");
    for (name, _) in columns {
        let _ = write!(out, " {name:>12}");
    }
    out.push('\n');
    let metrics: [DomainMetric; 3] = [
        ("NLL", |r, d| r.domains.get(d).map(|x| x.nll), 4),
        (
            "zero-shot",
            |r, d| r.domains.get(d).and_then(|x| x.zero_shot_accuracy),
            3,
        ),
        (
            "R@1",
            |r, d| r.domains.get(d).and_then(|x| x.retrieval_r1),
            3,
        ),
    ];
    for (d, domain) in first.domains.iter().enumerate() {
        for (i, (metric, get, digits)) in metrics.iter().enumerate() {
            let label = if i == 0 { domain.domain.as_str() } else { "" };
            let _ = write!(out, "{label:<16} {metric:<10}");
            for (_, r) in columns {
                let _ = write!(out, " {:>12}", cell(get(r, d), *digits));
            }
            out.push('\n');
        }
    }
    let macros: [MacroMetric; 4] = [
        ("NLL", |r| Some(r.macro_nll), 4),
        ("zero-shot", |r| r.macro_zero_shot_accuracy, 3),
        ("R@1", |r| r.macro_retrieval_r1, 3),
        ("R@5", |r| r.macro_retrieval_r5, 3),
    ];
    for (i, (metric, get, digits)) in macros.iter().enumerate() {
        let label = if i == 0 { "macro average" } else { "" };
        let _ = write!(out, "{label:<16} {metric:<10}");
        for (_, r) in columns {
            let _ = write!(out, " {:>12}", cell(get(r), *digits));
        }
        out.push('\n');
    }
    out
}

/// Mean and sample standard deviation (0 for one value); None when empty.
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

/// A Markdown table: `rows` x `cols`, each cell the values over seeds as
/// "mean +- std"; per column the best row among `contenders` (lowest when
/// `lower_is_better`) in bold.
pub fn markdown_table(
    title: &str,
    cols: &[String],
    rows: &[String],
    values: &dyn Fn(&str, &str) -> Vec<f64>,
    contenders: &dyn Fn(&str) -> bool,
    lower_is_better: bool,
    digits: usize,
) -> String {
    let mut out = format!("| {title} |");
    for c in cols {
        let _ = write!(out, " {c} |");
    }
    out.push('\n');
    out.push_str("|---|");
    for _ in cols {
        out.push_str("---|");
    }
    out.push('\n');
    let best: Vec<Option<f64>> = cols
        .iter()
        .map(|c| {
            rows.iter()
                .filter(|r| contenders(r))
                .filter_map(|r| mean_std(&values(r, c)).map(|m| m.0))
                .fold(None, |acc: Option<f64>, v| match acc {
                    None => Some(v),
                    Some(a) if (lower_is_better && v < a) || (!lower_is_better && v > a) => Some(v),
                    keep => keep,
                })
        })
        .collect();
    for r in rows {
        let _ = write!(out, "| {r} |");
        for (c, best) in cols.iter().zip(&best) {
            match mean_std(&values(r, c)) {
                None => out.push_str(" - |"),
                Some((m, s)) => {
                    let text = format!("{m:.digits$} ± {s:.digits$}");
                    if contenders(r) && best.is_some_and(|b| b == m) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_std_and_bold_best() {
        assert_eq!(mean_std(&[]), None);
        assert_eq!(mean_std(&[2.0]), Some((2.0, 0.0)));
        let (m, s) = mean_std(&[1.0, 3.0]).unwrap_or((0.0, 0.0));
        assert!((m - 2.0).abs() < 1e-12 && (s - 2f64.sqrt()).abs() < 1e-12);
        let cols = vec!["s1".to_string()];
        let rows = vec!["a".to_string(), "b".to_string(), "ref".to_string()];
        let values = |r: &str, _c: &str| match r {
            "a" => vec![2.0, 2.2],
            "b" => vec![1.5],
            _ => vec![1.0],
        };
        let table = markdown_table("NLL", &cols, &rows, &values, &|r| r != "ref", true, 2);
        assert!(table.contains("| b | **1.50 ± 0.00** |"), "{table}");
        assert!(table.contains("| a | 2.10 ± 0.14 |"), "{table}");
        // The reference row is never bold, even when it is the lowest.
        assert!(table.contains("| ref | 1.00 ± 0.00 |"), "{table}");
    }
}
