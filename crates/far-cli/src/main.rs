//! `far`: FAR's command-line tool.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "far", version, about = "Run autonomous agents in microVMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the FarAgent and FlintlockHost CRDs as YAML.
    Crd,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", far_api::crds_yaml()?),
    }
    Ok(())
}
