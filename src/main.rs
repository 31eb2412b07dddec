//! The `spanbuf` command line: parse, build, run, map errors to exit codes.
//!
//! Thin by design: every subcommand is a call into the library. Exit codes:
//! 0 success, 1 runtime failure, 2 bad configuration or usage.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use spanbuf::config::Config;

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
    }
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
