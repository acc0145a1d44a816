//! `framehost bench`: measurements behind BENCHMARKS.md (speed, job start, RSS over many jobs).

use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum BenchCommand {}

pub async fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {}
}
