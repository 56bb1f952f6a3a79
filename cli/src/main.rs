//! The `myriad` binary: parses arguments, starts logging, hands off to one
//! subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod cluster;
mod generate;
mod serve;
mod worker;

/// Myriad: a distributed, expert-parallel inference runtime for DeepSeek-V4.
#[derive(Parser)]
#[command(name = "myriad", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from a prompt: in this process, or through expert workers.
    Generate(generate::Args),
    /// Serve routed experts to routers over gRPC.
    Worker(worker::Args),
    /// Run a whole local cluster (expert workers + router with the OpenAI API) in one process.
    Up(serve::UpArgs),
    /// Serve the OpenAI API over running expert workers.
    Router(serve::RouterArgs),
    /// Load-test an OpenAI-compatible endpoint: throughput, TTFT, inter-token latency.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr (RUST_LOG overrides the level); stdout stays for output.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Up(args) => serve::up(args),
        Command::Router(args) => serve::router(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
