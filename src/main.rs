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
    /// Check that Redis is reachable and the Lua scripts load, then exit.
    Check,
    /// Replay recorded spans (NDJSON) through ingest and flush against Redis,
    /// without Kafka; FlushedSegment records go out as NDJSON.
    Replay(ReplayArgs),
    /// Write a deterministic synthetic workload of spans as NDJSON.
    Gen(GenArgs),
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
}

#[derive(Args)]
struct ReplayArgs {
    /// Input file of spans, one JSON object per line; `-` for stdin.
    #[arg(long, default_value = "-")]
    input: PathBuf,
    /// Output file of FlushedSegment records (JSON, one per line); `-` for stdout.
    #[arg(long, default_value = "-")]
    output: PathBuf,
    /// Lines per ingest batch.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    batch_size: u64,
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
            print!("{}", config.render());
            ExitCode::SUCCESS
        }
        Command::Check => run_async(check(config)),
        Command::Replay(args) => run_async(replay(config, args)),
        Command::Gen(args) => match gen(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("spanbuf: {err:#}");
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
        .with_writer(std::io::stderr);
    match config.log.format {
        spanbuf::config::LogFormat::Json => builder.json().init(),
        spanbuf::config::LogFormat::Text => builder.init(),
    }
    Ok(())
}

async fn replay(config: Config, args: ReplayArgs) -> anyhow::Result<()> {
    init_logging(&config)?;
    let options = ReplayOptions {
        input: args.input,
        output: args.output,
        batch_size: usize::try_from(args.batch_size)?,
        shards: args.shards,
        drain: !args.no_drain,
    };
    let summary: ReplaySummary = spanbuf::replay::replay(&config, &options).await?;
    eprintln!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

fn gen(args: GenArgs) -> anyhow::Result<()> {
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
        late_fraction: args.late_fraction,
        late_after_secs: args.late_after_secs,
        invalid_fraction: args.invalid_fraction,
        projects: args.projects,
        start: args.start,
        rate: args.rate,
    };
    let mut out: Box<dyn Write> = if args.output.as_os_str() == "-" {
        Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
    } else {
        let file = std::fs::File::create(&args.output)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", args.output.display()))?;
        Box::new(std::io::BufWriter::new(file))
    };
    let mut written: std::io::Result<()> = Ok(());
    let summary = spanbuf::gen::generate(&spec, |line| {
        if written.is_ok() {
            written = out.write_all(line).and_then(|()| out.write_all(b"\n"));
        }
    });
    written.and_then(|()| out.flush())?;
    eprintln!(
        "{{\"lines\":{},\"spans\":{},\"segments\":{},\"invalid\":{},\"late\":{}}}",
        summary.lines, summary.spans, summary.segments, summary.invalid, summary.late
    );
    Ok(())
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
            eprintln!("spanbuf: {err:#}");
            ExitCode::from(1)
        }
    }
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
