//! The `myriad` binary: parses arguments, starts logging, hands off to one
//! subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod cluster;
mod coordinator;
mod ctl;
mod generate;
mod kvcache;
mod membership;
mod metrics_http;
mod plan;
mod serve;
mod shutdown;
mod telemetry;
mod tls;
mod up;
mod worker;

/// Myriad: a distributed, expert-parallel inference runtime for DeepSeek-V4.
/// One binary for every role of a cluster, its admin CLI and a load
/// generator; `myriad up` runs a whole cluster in one process.
#[derive(Parser)]
#[command(name = "myriad", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from a prompt or token ids: in this process, over N in-process workers, or through running ones.
    Generate(generate::Args),
    /// Serve routed experts to routers over gRPC.
    Worker(worker::Args),
    /// Lead a cluster on etcd: membership, versioned expert placement and the admin API for `myriad ctl`.
    Coordinator(coordinator::Args),
    /// Run a whole cluster in one process: coordinator (admin API), expert workers, KV-cache and the OpenAI API.
    Up(up::UpArgs),
    /// Serve the OpenAI API over expert workers: fixed addresses, or a cluster's placement from etcd.
    Router(serve::RouterArgs),
    /// Serve conversation state (the compressed KV-cache) by token prefix.
    Kvcache(kvcache::Args),
    /// Administer a cluster through its coordinator: status, nodes, placement, rebalance, drain, KV-cache stats.
    Ctl(ctl::Args),
    /// Print the memory plan of a model config over N workers (no weights needed).
    Plan(plan::Args),
    /// Load-test an OpenAI-compatible endpoint: throughput, TTFT, inter-token latency.
    Bench(bench::Args),
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Generate(_) => "generate",
            Command::Worker(_) => "worker",
            Command::Coordinator(_) => "coordinator",
            Command::Up(_) => "up",
            Command::Router(_) => "router",
            Command::Bench(_) => "bench",
            Command::Plan(_) => "plan",
            Command::Ctl(_) => "ctl",
            Command::Kvcache(_) => "kvcache",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr; stdout stays for output.
    let telemetry = match telemetry::init(cli.command.name()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Up(args) => up::up(args),
        Command::Router(args) => serve::router(args),
        Command::Bench(args) => bench::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Ctl(args) => ctl::run(args),
        Command::Kvcache(args) => kvcache::run(args),
    };
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
