//! PNG charts (plotters, bitmap backend). Text is drawn with DejaVu Sans,
//! fetched like any other asset, so a plot looks the same on every machine
//! and needs no system font library.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use fedcmp_assets::asset_path;
use fedcmp_data::scenario::{Federation, Scenario};
use plotters::prelude::*;
use plotters::style::FontStyle;

const FONT_ASSET: (&str, &str) = (
    "dejavu-fonts",
    "usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
);

static FONT: OnceLock<()> = OnceLock::new();

/// Registers DejaVu Sans as plotters' `sans-serif`, once per process.
fn register_font(root: &Path) -> Result<()> {
    if FONT.get().is_some() {
        return Ok(());
    }
    fedcmp_experiment::assets::ensure(
        root,
        &[FONT_ASSET.0],
        &crate::progress::Progress::default(),
    )?;
    let path = asset_path(root, FONT_ASSET.0, FONT_ASSET.1);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable TrueType font", path.display()))?;
    let _ = FONT.set(());
    Ok(())
}

/// How many distinct colours `series_colour` has before it repeats.
const PALETTE_LEN: usize = 12;

/// Distinct colours for up to a dozen series, then repeating.
pub fn series_colour(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; PALETTE_LEN] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
        RGBColor(174, 199, 232),
        RGBColor(255, 187, 120),
    ];
    PALETTE[i % PALETTE.len()]
}

/// One horizontal bar per client, its length the shard size, split into
/// sources (colour) and, within a source, its labels (lighter bands).
pub fn shard_chart(root: &Path, scenario: &Scenario, f: &Federation, path: &Path) -> Result<()> {
    register_font(root)?;
    let clients = f.summary.shards.len();
    let max = f
        .summary
        .shards
        .iter()
        .map(|s| s.size)
        .max()
        .unwrap_or(1)
        .max(1);
    let height = (120 + 22 * clients).min(4000) as u32;
    let area = BitMapBackend::new(path, (1000, height)).into_drawing_area();
    area.fill(&WHITE)?;
    let title = format!("{}: {}", scenario.name, scenario.partition);
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        // Room on the right for the legend.
        .build_cartesian_2d(0f64..max as f64 * 1.3, -0.5f64..clients as f64 - 0.5)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("training samples")
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .y_desc("client")
        .y_labels(clients.min(32))
        .y_label_formatter(&|y| format!("{}", y.round() as i64))
        .label_style(("sans-serif", 13))
        .draw()?;
    let bar = |x: usize, n: usize, client: usize| {
        let c = client as f64;
        [(x as f64, c - 0.4), ((x + n) as f64, c + 0.4)]
    };
    for (client, shard) in f.summary.shards.iter().enumerate() {
        let mut x = 0usize;
        for (band, ((source, _label), n)) in shard.labels.iter().enumerate() {
            let base = series_colour(*source as usize);
            // Alternate the shade per label so label mixes are visible.
            let shade = if band % 2 == 0 { 1.0 } else { 0.72 };
            let colour = RGBColor(
                (base.0 as f64 * shade) as u8,
                (base.1 as f64 * shade) as u8,
                (base.2 as f64 * shade) as u8,
            );
            chart.draw_series(std::iter::once(Rectangle::new(
                bar(x, *n, client),
                colour.filled(),
            )))?;
            x += n;
        }
        // Unlabelled records, by source, after the labelled ones.
        for (source, n) in &shard.sources {
            let labelled: usize = shard
                .labels
                .iter()
                .filter(|((s, _), _)| s == source)
                .map(|(_, n)| n)
                .sum();
            let rest = n.saturating_sub(labelled);
            if rest > 0 {
                chart.draw_series(std::iter::once(Rectangle::new(
                    bar(x, rest, client),
                    series_colour(*source as usize).mix(0.5).filled(),
                )))?;
                x += rest;
            }
        }
    }
    for (i, name) in f.items.sources.iter().enumerate() {
        let colour = series_colour(i);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, 0.0), (0.0, 0.0)],
                colour.filled(),
            )))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    area.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Lines, one per named series of `(x, y)` points, with a legend; an empty
/// chart says so instead of failing.
pub fn line_chart(
    root: &Path,
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    register_font(root)?;
    let points = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let (xpad, ypad) = (((x1 - x0) * 0.05).max(1e-9), ((y1 - y0) * 0.08).max(1e-6));
    let area = BitMapBackend::new(path, (1100, 650)).into_drawing_area();
    area.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(64)
        // Room on the right for the legend.
        .build_cartesian_2d(
            x0 - xpad..x1 + (x1 - x0) * 0.35 + xpad,
            y0 - ypad..y1 + ypad,
        )?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 13))
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = series_colour(i);
        let style = ShapeStyle::from(&colour).stroke_width(2);
        // Past the palette's length colours repeat: those series are drawn
        // dashed, so a comparison of 13+ methods stays unambiguous.
        let dashed = i >= PALETTE_LEN;
        let annotation = if dashed {
            chart.draw_series(DashedLineSeries::new(points.iter().copied(), 7, 5, style))?
        } else {
            chart.draw_series(LineSeries::new(points.iter().copied(), style))?
        };
        annotation.label(name.clone()).legend(move |(x, y)| {
            let gap = if dashed { 5 } else { 0 };
            EmptyElement::at((x, y))
                + PathElement::new(vec![(0, 0), (8 - gap / 2, 0)], style)
                + PathElement::new(vec![(8 + gap / 2, 0), (18, 0)], style)
        });
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    area.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
