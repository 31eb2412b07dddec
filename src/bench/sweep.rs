//! The bench orchestrator: the `--sweep VAR=v1,v2,…` grid, one child process
//! per point, and the reports (table, CSV, JSON).
//!
//! Every point of the grid is validated as a whole configuration before the
//! first one runs, so a typo fails in a second, not after an hour. Points run
//! one after another (they share the Redis whose CPU they measure); the first
//! failing point stops the sweep and the points before it are still reported.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use super::{BenchError, PointResult};
use crate::config::Config;

/// One swept variable and its values, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepVar {
    pub name: String,
    pub values: Vec<String>,
}

impl std::str::FromStr for SweepVar {
    type Err = String;

    /// `SPANBUF_NAME=v1,v2,…` (the `SPANBUF_` prefix may be left out).
    fn from_str(arg: &str) -> Result<Self, String> {
        let (name, values) = arg
            .split_once('=')
            .ok_or_else(|| format!("--sweep {arg:?}: expected VAR=v1,v2,…"))?;
        let name = name.trim();
        let name = if name.starts_with("SPANBUF_") {
            name.to_owned()
        } else {
            format!("SPANBUF_{name}")
        };
        let values: Vec<String> = values.split(',').map(|v| v.trim().to_owned()).collect();
        if values.iter().any(String::is_empty) {
            return Err(format!("--sweep {arg:?}: empty value"));
        }
        Ok(SweepVar { name, values })
    }
}

/// The settings of one point: `(variable, value)` in sweep order.
pub type Settings = Vec<(String, String)>;

/// Every combination of the swept values; the first variable changes slowest.
/// No variables: one point with no settings.
pub fn grid(vars: &[SweepVar]) -> Vec<Settings> {
    let mut points: Vec<Settings> = vec![Vec::new()];
    for var in vars {
        points = points
            .into_iter()
            .flat_map(|point| {
                var.values.iter().map(move |value| {
                    let mut p = point.clone();
                    p.push((var.name.clone(), value.clone()));
                    p
                })
            })
            .collect();
    }
    points
}

/// Checks each point's whole configuration (the base environment with the
/// point's settings on top); one error lists every bad point.
pub fn validate(base: &[(String, String)], points: &[Settings]) -> Result<(), BenchError> {
    let mut problems = Vec::new();
    for point in points {
        let mut vars: BTreeMap<&str, &str> =
            base.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        for (k, v) in point {
            vars.insert(k, v);
        }
        if let Err(err) = Config::from_vars(vars) {
            problems.push(format!("point {}:\n{err}", label(point)));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(BenchError::Other(format!(
            "invalid sweep:\n{}",
            problems.join("\n")
        )))
    }
}

/// A short label: `LEVEL=-1 SEGMENTS=100` without the `SPANBUF_` prefixes.
pub fn label(point: &Settings) -> String {
    if point.is_empty() {
        return "(configured)".into();
    }
    point
        .iter()
        .map(|(k, v)| format!("{}={v}", short(k)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn short(name: &str) -> &str {
    name.strip_prefix("SPANBUF_").unwrap_or(name)
}

/// One finished point.
#[derive(Debug, Clone, Serialize)]
pub struct PointRun {
    pub settings: BTreeMap<String, String>,
    #[serde(skip)]
    pub ordered: Settings,
    pub result: PointResult,
}

/// How the orchestrator starts a point.
#[derive(Debug, Clone)]
pub struct ChildCommand {
    /// The `spanbuf` executable.
    pub exe: PathBuf,
    /// Arguments after the executable (`bench --point …`).
    pub args: Vec<String>,
}

/// Runs one point as a child process with `settings` added to its
/// environment; its stdout's last line is the [`PointResult`] JSON.
pub fn run_child(child: &ChildCommand, settings: &Settings) -> Result<PointResult, BenchError> {
    let output = Command::new(&child.exe)
        .args(&child.args)
        .envs(settings.iter().map(|(k, v)| (k, v)))
        .output()
        .map_err(|e| BenchError::Other(format!("cannot start {}: {e}", child.exe.display())))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(BenchError::Other(format!(
            "point {} failed ({}): {}",
            label(settings),
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| {
        BenchError::Other(format!(
            "point {}: unreadable result {last:?}: {e}",
            label(settings)
        ))
    })
}

/// Runs every point in order with a progress bar on stderr (hidden when
/// stderr is not a terminal). Returns the finished points and the first
/// failure, if any.
pub fn run_all(child: &ChildCommand, points: &[Settings]) -> (Vec<PointRun>, Option<BenchError>) {
    let bar = indicatif::ProgressBar::new(points.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    let mut runs = Vec::with_capacity(points.len());
    for point in points {
        bar.set_message(label(point));
        match run_child(child, point) {
            Ok(result) => runs.push(PointRun {
                settings: point.iter().cloned().collect(),
                ordered: point.clone(),
                result,
            }),
            Err(err) => {
                bar.abandon();
                return (runs, Some(err));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    (runs, None)
}

/// The columns of the table and the CSV: `(header, unit note, value)`.
fn columns(r: &PointResult) -> [(&'static str, String); 11] {
    [
        ("spans/s", format!("{:.0}", r.spans_per_sec)),
        ("segments/s", format!("{:.0}", r.segments_per_sec)),
        ("cpu ms/1k", format!("{:.1}", r.worker_cpu_ms_per_1k_spans)),
        (
            "redis cpu ms/1k",
            format!("{:.1}", r.redis_cpu_ms_per_1k_spans),
        ),
        (
            "redis cmds/1k",
            format!("{:.0}", r.redis_commands_per_1k_spans),
        ),
        (
            "round trips/1k",
            format!("{:.1}", r.redis_round_trips_per_1k_spans),
        ),
        (
            "peak rss MiB",
            format!("{:.0}", r.peak_rss_bytes as f64 / 1048576.0),
        ),
        ("late p50 s", format!("{:.2}", r.lateness_p50_secs)),
        ("late p99 s", format!("{:.2}", r.lateness_p99_secs)),
        ("spans out", r.spans_flushed.to_string()),
        ("dropped", r.spans_dropped.to_string()),
    ]
}

/// An aligned text table, one row per point.
pub fn render_table(runs: &[PointRun]) -> String {
    let vars: Vec<String> = runs
        .first()
        .map(|r| r.ordered.iter().map(|(k, _)| short(k).to_owned()).collect())
        .unwrap_or_default();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header: Vec<String> = vars.clone();
    if header.is_empty() {
        header.push("setting".into());
    }
    header.extend(
        columns(&PointResult::default())
            .iter()
            .map(|(h, _)| (*h).to_owned()),
    );
    rows.push(header);
    for run in runs {
        let mut row: Vec<String> = run.ordered.iter().map(|(_, v)| v.clone()).collect();
        if row.is_empty() {
            row.push("(configured)".into());
        }
        row.extend(columns(&run.result).into_iter().map(|(_, v)| v));
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// CSV: one column per swept variable, then every [`PointResult`] field.
pub fn write_csv(path: &Path, runs: &[PointRun]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let vars: Vec<String> = runs
        .first()
        .map(|r| r.ordered.iter().map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    let fields: Vec<String> = result_fields(&PointResult::default())
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let header: Vec<&str> = vars.iter().chain(&fields).map(String::as_str).collect();
    writeln!(out, "{}", header.join(","))?;
    for run in runs {
        let mut cells: Vec<String> = run.ordered.iter().map(|(_, v)| csv_cell(v)).collect();
        cells.extend(result_fields(&run.result).into_iter().map(|(_, v)| v));
        writeln!(out, "{}", cells.join(","))?;
    }
    out.flush()
}

/// `(field, value)` of a result in field-name order, via its JSON form.
fn result_fields(result: &PointResult) -> Vec<(String, String)> {
    match serde_json::to_value(result) {
        Ok(serde_json::Value::Object(map)) => {
            map.into_iter().map(|(k, v)| (k, v.to_string())).collect()
        }
        _ => Vec::new(),
    }
}

fn csv_cell(value: &str) -> String {
    if value.contains([',', '"', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

/// JSON: an array of `{settings, result}`.
pub fn write_json(path: &Path, runs: &[PointRun]) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(runs).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}

/// Everything `spanbuf bench` (without `--point`) needs.
#[derive(Debug, Clone)]
pub struct SweepPlan {
    /// The workload; `None` = generate `generate` into `out_dir/workload.ndjson`.
    pub input: Option<PathBuf>,
    pub generate: crate::gen::GenSpec,
    pub sweep: Vec<SweepVar>,
    /// Where bench.json, bench.csv and bench.png go.
    pub out_dir: PathBuf,
    /// The point command; `--input <workload>` is appended.
    pub child: ChildCommand,
    /// `SPANBUF_*` variables of this process, the base of every point.
    pub base_env: Vec<(String, String)>,
    pub plot_font: Option<PathBuf>,
}

/// What a finished sweep wrote.
#[derive(Debug)]
pub struct SweepOutput {
    pub runs: Vec<PointRun>,
    pub table: String,
    pub files: Vec<PathBuf>,
}

/// Validates the grid, prepares the workload, runs every point, writes the
/// reports. A failed point is returned as the error after the reports of the
/// points before it were written.
pub fn run_sweep(plan: &SweepPlan) -> Result<SweepOutput, BenchError> {
    let points = grid(&plan.sweep);
    validate(&plan.base_env, &points)?;
    let io_err = |what: &str, path: &Path, e: std::io::Error| {
        BenchError::Other(format!("cannot {what} {}: {e}", path.display()))
    };
    std::fs::create_dir_all(&plan.out_dir).map_err(|e| io_err("create", &plan.out_dir, e))?;
    let workload = match &plan.input {
        Some(path) => path.clone(),
        None => {
            let path = plan.out_dir.join("workload.ndjson");
            write_workload(&plan.generate, &path).map_err(|e| io_err("write", &path, e))?;
            path
        }
    };
    let mut child = plan.child.clone();
    child.args.push("--input".into());
    child.args.push(workload.display().to_string());

    let (runs, failure) = run_all(&child, &points);
    let mut files = Vec::new();
    if !runs.is_empty() {
        let json = plan.out_dir.join("bench.json");
        write_json(&json, &runs).map_err(|e| io_err("write", &json, e))?;
        let csv = plan.out_dir.join("bench.csv");
        write_csv(&csv, &runs).map_err(|e| io_err("write", &csv, e))?;
        files.extend([json, csv]);
        if !plan.sweep.is_empty() {
            let png = plan.out_dir.join("bench.png");
            super::plot::draw(&png, &runs, plan.plot_font.as_deref())
                .map_err(|e| BenchError::Other(e.to_string()))?;
            files.push(png);
        }
    }
    let table = render_table(&runs);
    match failure {
        Some(err) => Err(BenchError::Other(format!(
            "{err}\n(points finished before the failure:\n{table})"
        ))),
        None => Ok(SweepOutput { runs, table, files }),
    }
}

/// Generates the workload to a file, with a progress bar on a terminal.
fn write_workload(spec: &crate::gen::GenSpec, path: &Path) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let bar = indicatif::ProgressBar::new(
        (spec.traces * spec.segments_per_trace.max(1) * spec.spans_per_segment.max(1)) as u64,
    );
    bar.set_message("generating the workload");
    let mut result = Ok(());
    crate::gen::generate(spec, |line| {
        if result.is_ok() {
            result = out.write_all(line).and_then(|()| out.write_all(b"\n"));
        }
        bar.inc(1);
    });
    bar.finish_and_clear();
    result?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(s: &str) -> SweepVar {
        s.parse().unwrap()
    }

    #[test]
    fn sweep_args_parse_with_or_without_prefix() {
        assert_eq!(
            var("COMPRESSION_LEVEL=-1, 0,3"),
            SweepVar {
                name: "SPANBUF_COMPRESSION_LEVEL".into(),
                values: vec!["-1".into(), "0".into(), "3".into()]
            }
        );
        assert_eq!(var("SPANBUF_X=1").name, "SPANBUF_X");
        assert!("NOEQUALS".parse::<SweepVar>().is_err());
        assert!("A=1,,2".parse::<SweepVar>().is_err());
    }

    #[test]
    fn grid_is_the_cartesian_product_first_var_slowest() {
        let points = grid(&[var("A=1,2"), var("B=x,y,z")]);
        assert_eq!(points.len(), 6);
        assert_eq!(label(&points[0]), "A=1 B=x");
        assert_eq!(label(&points[2]), "A=1 B=z");
        assert_eq!(label(&points[3]), "A=2 B=x");
        assert_eq!(grid(&[]), vec![Vec::new()]);
    }

    #[test]
    fn validation_names_every_bad_point_and_variable() {
        let points = grid(&[var("COMPRESSION_LEVEL=3,99"), var("NO_SUCH_THING=1")]);
        let err = validate(&[], &points).unwrap_err().to_string();
        assert!(err.contains("COMPRESSION_LEVEL=99"), "{err}");
        assert!(err.contains("SPANBUF_NO_SUCH_THING"), "{err}");
        assert!(validate(&[], &grid(&[var("COMPRESSION_LEVEL=-1,0,3")])).is_ok());
    }

    #[test]
    fn table_and_csv_have_a_row_per_point() {
        let runs: Vec<PointRun> = grid(&[var("A=1,22")])
            .into_iter()
            .map(|p| PointRun {
                settings: p.iter().cloned().collect(),
                ordered: p,
                result: PointResult {
                    spans_per_sec: 1234.4,
                    ..PointResult::default()
                },
            })
            .collect();
        let table = render_table(&runs);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[0].contains("spans/s") && lines[0].starts_with(" A"),
            "{table}"
        );
        assert!(
            lines[2].contains("22") && lines[2].contains("1234"),
            "{table}"
        );

        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("b.csv");
        write_csv(&csv, &runs).unwrap();
        let text = std::fs::read_to_string(&csv).unwrap();
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows.len(), 3);
        assert!(
            rows[0].starts_with("SPANBUF_A,") && rows[0].contains(",spans_per_sec,"),
            "{text}"
        );
        assert!(
            rows[2].starts_with("22,") && rows[2].contains(",1234.4"),
            "{text}"
        );
        assert_eq!(rows[0].split(',').count(), rows[1].split(',').count());
    }
}
