//! `far-host`: serve Flintlock's MicroVM API for this machine (also `far host`).

use clap::Parser;

/// Serve Flintlock's MicroVM gRPC API on this machine.
#[derive(Parser, Debug)]
#[command(name = "far-host", version)]
struct Cli {
    #[command(flatten)]
    args: far_host::cli::ServeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    far_host::cli::init_logging();
    far_tls::install();
    far_host::cli::serve(Cli::parse().args).await
}
