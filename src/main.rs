//! The `spanbuf` command line: parse, build, run, map errors to exit codes.
//!
//! Thin by design: every subcommand is a call into the library. Exit codes:
//! 0 success, 1 runtime failure, 2 bad configuration or usage.

use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use spanbuf::config::Config;
use spanbuf::replay::{ReplayOptions, ReplaySummary};

/// Assembles tracing spans into segments in Redis and flushes them to Kafka.
///
/// All settings come from SPANBUF_* environment variables; `spanbuf config`
/// prints the effective configuration.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the effective configuration (passwords redacted) and exit.
    Config,
    /// Run the worker: consume spans from Kafka, buffer them in Redis, flush
    /// segments to the output topic. SIGTERM/SIGINT drain gracefully; a second
    /// signal exits at once.
    Run,
    /// Check that Redis is reachable and the Lua scripts load, then exit.
    Check,
    /// Replay recorded spans (NDJSON) through ingest and flush against Redis,
    /// without Kafka; FlushedSegment records go out as NDJSON.
    Replay(ReplayArgs),
    /// Write a deterministic synthetic workload of spans as NDJSON, or produce
    /// it to a Kafka topic (key = trace id).
    Gen(GenArgs),
    /// Show what the buffer in Redis holds, for an operator when paged: per
    /// shard queue depth, oldest deadline, flush lag and due segments; totals
    /// of payload sets, spans, redirect maps and flush locks; memory and keys
    /// per primary. Writes no keys; keys are found with SCAN, bounded by
    /// --max-keys.
    Inspect(InspectArgs),
    /// Compare input spans with delivered records: spans missing, delivered
    /// twice with different flush ids, or under the wrong segment. Prints a
    /// JSON report; exits 1 when it is not clean.
    Audit(AuditArgs),
    /// Measure ingest and flush end to end through Redis (and, with --kafka,
    /// the producer): spans/s, segments/s, CPU and Redis cost per 1k spans,
    /// peak RSS, flush lateness. `--sweep VAR=v1,v2` runs a grid of settings
    /// and writes bench.csv, bench.json and bench.png to --out-dir.
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Workload file (NDJSON spans); without it one is generated (--traces …)
    /// into --out-dir.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Sweep a SPANBUF_* variable over values, e.g.
    /// `--sweep SPANBUF_COMPRESSION_LEVEL=-1,0,3`; repeatable (the grid).
    #[arg(long, value_name = "VAR=V1,V2,…")]
    sweep: Vec<spanbuf::bench::sweep::SweepVar>,
    /// Where bench.json, bench.csv, bench.png (and a generated workload) go.
    #[arg(long, default_value = "bench-out")]
    out_dir: PathBuf,
    /// Flush queues (shards); a span's shard is its trace id modulo this.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    shards: u32,
    /// Deliver through the Kafka producer to SPANBUF_OUTPUT_TOPIC (acknowledged)
    /// instead of encoding and discarding the records.
    #[arg(long)]
    kafka: bool,
    /// Longest wait for the queues to empty after the input ended
    /// [default: SPANBUF_TIMEOUT_SECS + 60].
    #[arg(long)]
    max_wait_secs: Option<u64>,
    /// TrueType font for the plot's text [default: DejaVu Sans].
    #[arg(long)]
    plot_font: Option<PathBuf>,
    /// Generated workload: traces.
    #[arg(long, default_value_t = 5000)]
    traces: usize,
    /// Generated workload: spans per segment.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    spans_per_segment: u64,
    /// Generated workload: segments per trace.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    segments_per_trace: u64,
    /// Generated workload: approximate bytes of one span.
    #[arg(long, default_value_t = 900)]
    payload_bytes: usize,
    /// Generated workload: seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Internal: run one point in this process and print its JSON result.
    #[arg(long, hide = true, requires = "input")]
    point: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Stop counting keys after this many (the report is then marked
    /// truncated; shard queues are still all shown).
    #[arg(long, default_value_t = spanbuf::inspect::DEFAULT_MAX_KEYS, value_parser = clap::value_parser!(u64).range(1..))]
    max_keys: u64,
}

#[derive(Args)]
struct AuditArgs {
    /// The input spans, NDJSON (invalid lines are skipped).
    #[arg(long)]
    spans: PathBuf,
    /// Delivered records, NDJSON (JSON codec), e.g. from `spanbuf replay`.
    #[arg(
        long,
        conflicts_with = "records_topic",
        required_unless_present = "records_topic"
    )]
    records: Option<PathBuf>,
    /// Read the records from this Kafka topic instead (from the beginning;
    /// brokers from SPANBUF_KAFKA_BROKERS; codec from SPANBUF_OUTPUT_CODEC).
    #[arg(long)]
    records_topic: Option<String>,
    /// With --records-topic: stop after this many seconds without a new record.
    #[arg(long, default_value_t = 5)]
    idle_secs: u64,
    /// A worker's /metrics text (e.g. `curl -s host:9102/metrics > m1.txt`);
    /// repeatable, one per worker. Adds the conservation check: consumed =
    /// flushed + duplicate + dropped + buffered (read from Redis).
    #[arg(long, value_name = "FILE")]
    metrics: Vec<PathBuf>,
}

#[derive(Args)]
struct GenArgs {
    /// Output file; `-` for stdout.
    #[arg(long, default_value = "-")]
    output: PathBuf,
    /// Seed: the same seed and options give the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 1000)]
    traces: usize,
    /// Segments per trace (the first is the trace root, the others inner roots marked is_segment).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    segments_per_trace: u64,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    spans_per_segment: u64,
    /// Levels of a segment's tree (root = 1).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1000))]
    depth: u64,
    /// Approximate bytes of one span's JSON.
    #[arg(long, default_value_t = 900)]
    payload_bytes: usize,
    /// Arrival is shuffled within windows of this many lines.
    #[arg(long, default_value_t = 1000)]
    shuffle_window: usize,
    /// How the shuffle window moves: sliding (realistic: a segment spreads over
    /// about a window, children often before parents) or fixed blocks.
    #[arg(long, value_enum, default_value_t = spanbuf::gen::Shuffle::Sliding)]
    shuffle: spanbuf::gen::Shuffle,
    /// Fraction (0..1) of spans that arrive --late-after-secs after the rest.
    #[arg(long, default_value_t = 0.0)]
    late_fraction: f64,
    #[arg(long, default_value_t = 120.0)]
    late_after_secs: f64,
    /// Fraction (0..1) of extra invalid lines.
    #[arg(long, default_value_t = 0.0)]
    invalid_fraction: f64,
    #[arg(long, default_value_t = 10)]
    projects: u64,
    /// `received` of the first line, epoch seconds.
    #[arg(long, default_value_t = 1_700_000_000.0)]
    start: f64,
    /// Lines per second of `received` time.
    #[arg(long, default_value_t = 50_000.0)]
    rate: f64,
    /// Produce to this Kafka topic (SPANBUF_KAFKA_BROKERS) instead of writing
    /// a file; with --output too, both.
    #[arg(long)]
    kafka_topic: Option<String>,
}

#[derive(Args)]
struct ReplayArgs {
    /// Input file of spans, one JSON object per line; `-` for stdin.
    #[arg(long, default_value = "-")]
    input: PathBuf,
    /// Output file of FlushedSegment records (JSON, one per line); `-` for stdout.
    #[arg(long, default_value = "-")]
    output: PathBuf,
    /// Lines per ingest batch (each batch is one coalescing window); default
    /// SPANBUF_WINDOW_MAX_SPANS, the worker's window, so a replay writes to
    /// Redis the way the worker does.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    batch_size: Option<u64>,
    /// Number of shards; a span's shard is its trace id modulo this.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    shards: u32,
    /// Do not flush what is still buffered at the end of input.
    #[arg(long)]
    no_drain: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("spanbuf: invalid configuration:\n{err}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Config => {
            for warning in config.warnings() {
                eprintln!("spanbuf: warning: {warning}");
            }
            print!("{}", config.render());
            ExitCode::SUCCESS
        }
        Command::Run => run_async(run_worker(config)),
        Command::Check => run_async(check(config)),
        Command::Replay(args) => run_async(replay(config, args)),
        Command::Inspect(args) => run_async(inspect(config, args)),
        Command::Audit(args) => match audit(&config, args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(err) => {
                eprintln!("spanbuf: {}", report(&err));
                ExitCode::from(1)
            }
        },
        Command::Bench(args) if args.point => run_async(bench_point(config, args)),
        Command::Bench(args) => match bench(&config, args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("spanbuf: {}", report(&err));
                ExitCode::from(1)
            }
        },
        Command::Gen(args) => match gen(&config, args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("spanbuf: {}", report(&err));
                ExitCode::from(1)
            }
        },
    }
}

/// Logs go to stderr; the summary line is the last line of stderr.
fn init_logging(config: &Config) -> anyhow::Result<()> {
    // Config::validate already parsed this directive; a failure here is a bug.
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_logs())
        .with_writer(std::io::stderr);
    match config.log.format {
        spanbuf::config::LogFormat::Json => builder.json().init(),
        spanbuf::config::LogFormat::Text => builder.init(),
    }
    for warning in config.warnings() {
        tracing::warn!("configuration: {warning}");
    }
    Ok(())
}

/// Colour codes only on a terminal, and never when `NO_COLOR` is set to
/// anything non-empty (<https://no-color.org>): a log piped to a file or a
/// collector must be plain text.
fn colour_logs() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

async fn run_worker(config: Config) -> anyhow::Result<()> {
    init_logging(&config)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    spanbuf::worker::run(config, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// First SIGTERM/SIGINT: graceful drain. Second: exit at once.
async fn watch_signals(shutdown: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        tracing::error!("cannot install the SIGTERM handler; stop with SIGINT");
        return;
    };
    for round in 0..2 {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        if round == 0 {
            tracing::info!("signal received: draining (a second signal exits at once)");
            shutdown.cancel();
        } else {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
    }
}

async fn replay(config: Config, args: ReplayArgs) -> anyhow::Result<()> {
    init_logging(&config)?;
    let options = ReplayOptions {
        input: args.input,
        output: args.output,
        batch_size: match args.batch_size {
            Some(lines) => usize::try_from(lines)?,
            None => config.worker.window_max_spans,
        },
        shards: args.shards,
        drain: !args.no_drain,
    };
    let summary: ReplaySummary = spanbuf::replay::replay(&config, &options).await?;
    tracing::info!(
        peak_rss_bytes = spanbuf::process::peak_rss_bytes(),
        "replay finished"
    );
    eprintln!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

fn audit(config: &Config, args: AuditArgs) -> anyhow::Result<bool> {
    use std::io::BufRead;
    let max = usize::try_from(config.buffer.max_span_bytes)?;
    let file = std::fs::File::open(&args.spans)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.spans.display()))?;
    let mut spans = Vec::new();
    for line in std::io::BufReader::new(file).split(b'\n') {
        if let Ok(span) = spanbuf::span::decode_span(&line?, max) {
            spans.push(span);
        }
    }
    let decode = |bytes: &[u8]| match config.buffer.output_codec {
        spanbuf::config::OutputCodec::Json => spanbuf::span::record::from_json(bytes),
        spanbuf::config::OutputCodec::Msgpack => spanbuf::span::record::from_msgpack(bytes),
    };
    let mut records = Vec::new();
    if let Some(path) = &args.records {
        let text = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            records.push(spanbuf::span::record::from_json(line)?);
        }
    } else if let Some(topic) = &args.records_topic {
        // Stop once every input span was seen, counting distinct spans: a
        // record delivered twice (same flush_id, which the contract allows)
        // must not end the read before the records still to come.
        let want: std::collections::HashSet<spanbuf::audit::SpanKey> = spans
            .iter()
            .map(|s| (s.project_id, s.trace_id.clone(), s.span_id.clone()))
            .collect();
        let mut seen = std::collections::HashSet::new();
        let payloads = spanbuf::kafka::tools::read_topic(
            config,
            topic,
            std::time::Duration::from_secs(args.idle_secs),
            |payload| {
                if let Ok(record) = decode(payload) {
                    seen.extend(
                        spanbuf::audit::span_keys(&record)
                            .into_iter()
                            .filter(|k| want.contains(k)),
                    );
                }
                seen.len() >= want.len()
            },
        )?;
        for payload in payloads {
            records.push(decode(&payload)?);
        }
    }
    let mut report = spanbuf::audit::audit(&spans, &records);
    if !args.metrics.is_empty() {
        let mut texts = Vec::new();
        for path in &args.metrics {
            texts.push(
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
            );
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        let buffered = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(spanbuf::inspect::inspect(
                config,
                now,
                spanbuf::inspect::DEFAULT_MAX_KEYS,
            ))?
            .totals
            .spans_buffered;
        report.conservation = Some(spanbuf::audit::Conservation::from_metrics(&texts, buffered));
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(report.is_clean())
}

fn gen(config: &Config, args: GenArgs) -> anyhow::Result<()> {
    use std::io::Write;
    for (name, value) in [
        ("--late-fraction", args.late_fraction),
        ("--invalid-fraction", args.invalid_fraction),
    ] {
        anyhow::ensure!(
            (0.0..=1.0).contains(&value),
            "{name} must be between 0 and 1, got {value}"
        );
    }
    anyhow::ensure!(
        args.rate > 0.0,
        "--rate must be positive, got {}",
        args.rate
    );
    let spec = spanbuf::gen::GenSpec {
        seed: args.seed,
        traces: args.traces,
        segments_per_trace: usize::try_from(args.segments_per_trace)?,
        spans_per_segment: usize::try_from(args.spans_per_segment)?,
        depth: usize::try_from(args.depth)?,
        payload_bytes: args.payload_bytes,
        shuffle_window: args.shuffle_window,
        shuffle: args.shuffle,
        late_fraction: args.late_fraction,
        late_after_secs: args.late_after_secs,
        invalid_fraction: args.invalid_fraction,
        projects: args.projects,
        start: args.start,
        rate: args.rate,
    };
    let mut kafka = match &args.kafka_topic {
        Some(topic) => Some(spanbuf::kafka::tools::LineProducer::new(config, topic)?),
        None => None,
    };
    let to_file = kafka.is_none() || args.output.as_os_str() != "-";
    let mut out: Box<dyn Write> = if !to_file {
        Box::new(std::io::sink())
    } else if args.output.as_os_str() == "-" {
        Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
    } else {
        let file = std::fs::File::create(&args.output)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", args.output.display()))?;
        Box::new(std::io::BufWriter::new(file))
    };
    let mut written: anyhow::Result<()> = Ok(());
    let max = usize::try_from(config.buffer.max_span_bytes)?;
    // Drawn on stderr only when it is a terminal; the summary line stays last.
    let progress = indicatif::ProgressBar::new(
        (spec.traces * spec.segments_per_trace * spec.spans_per_segment) as u64,
    );
    let summary = spanbuf::gen::generate(&spec, |line| {
        progress.inc(1);
        if written.is_err() {
            return;
        }
        if to_file {
            written = out
                .write_all(line)
                .and_then(|()| out.write_all(b"\n"))
                .map_err(Into::into);
        }
        if let (Some(producer), Ok(())) = (kafka.as_mut(), &written) {
            // Keyed by trace id, as Relay partitions ingest-spans.
            let key = spanbuf::span::decode_span(line, max)
                .ok()
                .map(|s| s.trace_id);
            written = producer
                .send(key.as_ref().map(String::as_bytes), line)
                .map_err(Into::into);
        }
    });
    progress.finish_and_clear();
    written?;
    out.flush()?;
    if let Some(producer) = kafka {
        producer.finish(std::time::Duration::from_secs(120))?;
    }
    eprintln!(
        "{{\"lines\":{},\"spans\":{},\"segments\":{},\"invalid\":{},\"late\":{}}}",
        summary.lines, summary.spans, summary.segments, summary.invalid, summary.late
    );
    Ok(())
}

fn max_wait(config: &Config, args: &BenchArgs) -> std::time::Duration {
    std::time::Duration::from_secs(
        args.max_wait_secs.unwrap_or(
            config
                .buffer
                .timeout_secs
                .max(config.buffer.root_timeout_secs)
                + 60,
        ),
    )
}

/// One bench point in this process (the orchestrator's child).
async fn bench_point(config: Config, args: BenchArgs) -> anyhow::Result<()> {
    let options = spanbuf::bench::PointOptions {
        input: args.input.clone().unwrap_or_default(),
        shards: args.shards,
        kafka: args.kafka,
        max_wait: max_wait(&config, &args),
    };
    let result = spanbuf::bench::run_point(&config, &options).await?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

fn bench(config: &Config, args: BenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut point_args: Vec<String> = vec![
        "bench".into(),
        "--point".into(),
        "--shards".into(),
        args.shards.to_string(),
        "--max-wait-secs".into(),
        max_wait(config, &args).as_secs().to_string(),
    ];
    if args.kafka {
        point_args.push("--kafka".into());
    }
    let plan = spanbuf::bench::sweep::SweepPlan {
        input: args.input,
        generate: spanbuf::gen::GenSpec {
            seed: args.seed,
            traces: args.traces,
            segments_per_trace: usize::try_from(args.segments_per_trace)?,
            spans_per_segment: usize::try_from(args.spans_per_segment)?,
            payload_bytes: args.payload_bytes,
            ..spanbuf::gen::GenSpec::default()
        },
        sweep: args.sweep,
        out_dir: args.out_dir,
        child: spanbuf::bench::sweep::ChildCommand {
            exe,
            args: point_args,
        },
        base_env: std::env::vars()
            .filter(|(k, _)| k.starts_with("SPANBUF_"))
            .collect(),
        plot_font: args.plot_font,
    };
    let output = spanbuf::bench::sweep::run_sweep(&plan)?;
    print!("{}", output.table);
    for file in &output.files {
        eprintln!("wrote {}", file.display());
    }
    Ok(())
}

/// The error and its causes, `a: b: c`, skipping a cause whose text the
/// message before it already shows (many errors here print their source in
/// their own message, so `{:#}` would repeat it).
fn report(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("spanbuf: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("spanbuf: {}", report(&err));
            ExitCode::from(1)
        }
    }
}

async fn inspect(config: Config, args: InspectArgs) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let report = spanbuf::inspect::inspect(&config, now, args.max_keys).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", spanbuf::inspect::render_table(&report));
    }
    Ok(())
}

async fn check(config: Config) -> anyhow::Result<()> {
    let store = spanbuf::store::Store::connect(&config.redis, config.buffer.slice_id).await?;
    store.ping().await?;
    println!(
        "redis ok ({}), lua scripts loaded",
        if store.is_cluster() {
            "cluster"
        } else {
            "standalone"
        }
    );
    Ok(())
}
