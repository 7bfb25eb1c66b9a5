//! `far-host`: serve Flintlock's MicroVM API for this machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use far_host::provider::sim::{Sim, SimConfig};
use far_host::validate::Limits;
use far_host::{Host, HostConfig, Service};
use tonic::transport::Server;

/// Serve Flintlock's MicroVM gRPC API on this machine.
#[derive(Parser, Debug)]
#[command(name = "far-host", version)]
struct Args {
    /// Address to serve gRPC on. Plaintext is served only on loopback addresses.
    #[arg(long, env = "FAR_HOST_LISTEN", default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Directory for VM records.
    #[arg(long, env = "FAR_HOST_STATE_DIR", default_value = "/var/lib/far-host")]
    state_dir: PathBuf,
    /// File holding the shared token clients must send (`authorization: basic ...`).
    #[arg(long, env = "FAR_HOST_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Provider that runs VMs.
    #[arg(long, env = "FAR_HOST_PROVIDER", value_parser = ["sim"], default_value = "sim")]
    provider: String,
    /// Most vCPUs in one VM.
    #[arg(long, default_value_t = Limits::default().max_vcpu)]
    max_vcpu: i32,
    /// Smallest VM memory in MiB.
    #[arg(long, default_value_t = Limits::default().min_memory_mib)]
    min_memory_mib: i32,
    /// Largest VM memory in MiB.
    #[arg(long, default_value_t = Limits::default().max_memory_mib)]
    max_memory_mib: i32,
    /// sim: milliseconds from start to the simulated guest's first heartbeat.
    #[arg(long, default_value_t = 50)]
    sim_boot_delay_ms: u64,
    /// sim: starting any VM whose id contains this text fails (failure injection).
    #[arg(long)]
    sim_fail_starts_containing: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        bail!(
            "--listen {}: plaintext gRPC is only served on loopback; use 127.0.0.1 or [::1]",
            args.listen
        );
    }
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading --token-file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let config = HostConfig {
        limits: Limits {
            max_vcpu: args.max_vcpu,
            min_memory_mib: args.min_memory_mib,
            max_memory_mib: args.max_memory_mib,
        },
        ..HostConfig::default()
    };
    let provider = Sim::new(SimConfig {
        boot_delay: Duration::from_millis(args.sim_boot_delay_ms),
        fail_starts_containing: args.sim_fail_starts_containing,
    });
    let host = Host::open(config, &args.state_dir, provider)
        .await
        .with_context(|| format!("opening state dir {}", args.state_dir.display()))?;
    tracing::info!(listen = %args.listen, provider = %args.provider, "far-host serving");
    Server::builder()
        .add_service(Service::new(host, token))
        .serve_with_shutdown(args.listen, shutdown())
        .await
        .context("serving gRPC")?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM. VMs keep running: they are adopted at the next start.
async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    tracing::info!("far-host stopping");
}
