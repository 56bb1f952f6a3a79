//! The `myriad` binary: parses arguments and hands off to one subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod generate;

/// Myriad: a distributed, expert-parallel inference runtime for DeepSeek-V4.
#[derive(Parser)]
#[command(name = "myriad", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from a prompt in this process (the single-process reference run).
    Generate(generate::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
