//! The sweep plot: a PNG with two bar charts over the points of a sweep,
//! throughput (spans/s) on top and Redis CPU per 1000 spans below.
//!
//! Text is drawn with a TrueType font read at run time (plotters' pure-Rust
//! `ab_glyph` renderer, so no fontconfig or freetype is linked): DejaVu Sans
//! from Debian's `fonts-dejavu-core` unless `--plot-font` names another.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use super::sweep::PointRun;

/// Where the font is looked for when none is given.
pub const DEFAULT_FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("plot: no font found (tried {tried}); install fonts-dejavu-core or pass --plot-font")]
    NoFont { tried: String },
    #[error("plot: {path} is not a usable TrueType font")]
    BadFont { path: String },
    #[error("plot: drawing {path} failed: {message}")]
    Draw { path: String, message: String },
    #[error("plot: nothing to plot")]
    Empty,
}

/// Draws `runs` to `path` (PNG, 1200×900).
pub fn draw(path: &Path, runs: &[PointRun], font: Option<&Path>) -> Result<(), PlotError> {
    if runs.is_empty() {
        return Err(PlotError::Empty);
    }
    register_font(font)?;
    let draw_err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let labels: Vec<String> = runs
        .iter()
        .map(|r| {
            if r.ordered.is_empty() {
                "(configured)".to_owned()
            } else {
                r.ordered
                    .iter()
                    .map(|(_, v)| v.as_str())
                    .collect::<Vec<_>>()
                    .join(" / ")
            }
        })
        .collect();
    let axis: String = runs[0]
        .ordered
        .iter()
        .map(|(k, _)| k.strip_prefix("SPANBUF_").unwrap_or(k))
        .collect::<Vec<_>>()
        .join(" / ");
    let panels: [(&str, &str, Vec<f64>, RGBColor); 2] = [
        (
            "Ingest throughput",
            "spans/s",
            runs.iter().map(|r| r.result.spans_per_sec).collect(),
            RGBColor(31, 119, 180),
        ),
        (
            "Redis CPU per 1000 spans",
            "ms",
            runs.iter()
                .map(|r| r.result.redis_cpu_ms_per_1k_spans)
                .collect(),
            RGBColor(214, 39, 40),
        ),
    ];

    let root = BitMapBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let areas = root.split_evenly((2, 1));
    for (area, (title, unit, values, color)) in areas.iter().zip(panels) {
        let top = values.iter().copied().fold(0.0_f64, f64::max).max(1e-9) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 24))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(90)
            // An integer range covers both ends: n bars need 0..n-1.
            .build_cartesian_2d(
                (0..values.len().saturating_sub(1)).into_segmented(),
                0.0..top,
            )
            .map_err(|e| draw_err(&e))?;
        let formatter = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                labels.get(*i).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(values.len())
            .x_label_formatter(&formatter)
            .x_desc(axis.as_str())
            .y_desc(unit)
            .y_label_formatter(&|v: &f64| {
                if top >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            })
            .light_line_style(WHITE)
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|e| draw_err(&e))?;
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *v),
                    ],
                    color.filled(),
                );
                bar.set_margin(0, 0, 12, 12);
                bar
            }))
            .map_err(|e| draw_err(&e))?;
    }
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}

/// Registers the font as plotters' "sans-serif" (once per process is enough;
/// a later call replaces it).
fn register_font(font: Option<&Path>) -> Result<(), PlotError> {
    let candidates: Vec<PathBuf> = match font {
        Some(p) => vec![p.to_path_buf()],
        None => DEFAULT_FONTS.iter().map(PathBuf::from).collect(),
    };
    let Some((path, bytes)) = candidates
        .iter()
        .find_map(|p| std::fs::read(p).ok().map(|b| (p, b)))
    else {
        return Err(PlotError::NoFont {
            tried: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| {
        PlotError::BadFont {
            path: path.display().to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::PointResult;

    #[test]
    fn draws_a_png_of_every_point() {
        let runs: Vec<PointRun> = [("-1", 1000.0, 5.0), ("3", 800.0, 7.5)]
            .into_iter()
            .map(|(level, rate, cpu)| {
                let ordered = vec![("SPANBUF_COMPRESSION_LEVEL".to_owned(), level.to_owned())];
                PointRun {
                    settings: ordered.iter().cloned().collect(),
                    ordered,
                    result: PointResult {
                        spans_per_sec: rate,
                        redis_cpu_ms_per_1k_spans: cpu,
                        ..PointResult::default()
                    },
                }
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sweep.png");
        draw(&path, &runs, None).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 5_000, "{} bytes", bytes.len());

        let missing = draw(&path, &runs, Some(Path::new("/no/such/font.ttf")));
        assert!(
            matches!(missing, Err(PlotError::NoFont { .. })),
            "{missing:?}"
        );
        assert!(matches!(draw(&path, &[], None), Err(PlotError::Empty)));
    }
}
