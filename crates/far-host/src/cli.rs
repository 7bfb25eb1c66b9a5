//! The far-host server's command line, shared by the `far-host` binary and `far host`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::images::ImageArgs;
use crate::provider::Provider;
use crate::provider::qemu::{Accel, Qemu, QemuConfig};
use crate::provider::sim::{Sim, SimConfig};
use crate::validate::Limits;
use crate::{Host, HostConfig};
use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProviderName {
    /// QEMU microVMs (KVM when it works, software emulation otherwise).
    Qemu,
    /// No VMs: simulated guests, for scale tests.
    Sim,
}

/// Serve Flintlock's MicroVM gRPC API on this machine.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to serve gRPC on. Plaintext is served only on loopback addresses.
    #[arg(long, env = "FAR_HOST_LISTEN", default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Directory for VM records and VM working files.
    #[arg(long, env = "FAR_HOST_STATE_DIR", default_value = "/var/lib/far-host")]
    state_dir: PathBuf,
    /// PEM certificate to serve TLS with (with --tls-key). Required off loopback.
    #[arg(long, env = "FAR_HOST_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FAR_HOST_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA whose client certificates are required (mutual TLS).
    #[arg(long, env = "FAR_HOST_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// File holding the shared token clients must send (`authorization: basic ...`).
    #[arg(long, env = "FAR_HOST_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Provider that runs VMs.
    #[arg(long, env = "FAR_HOST_PROVIDER", value_enum, default_value_t = ProviderName::Qemu)]
    provider: ProviderName,
    #[command(flatten)]
    images: ImageArgs,
    /// qemu: accelerator.
    #[arg(long, value_enum, default_value_t)]
    accel: Accel,
    /// qemu: the QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu_binary: PathBuf,
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

/// Serves until Ctrl-C or SIGTERM; VMs keep running and are adopted at the next start.
///
/// # Errors
/// Bad flags (named), an unreadable token or TLS file, a state directory that cannot be opened,
/// or an address that cannot be served.
pub async fn serve(args: ServeArgs) -> Result<()> {
    if args.tls_cert.is_none() && !args.listen.ip().is_loopback() {
        bail!(
            "--listen {}: plaintext gRPC is only served on loopback; use 127.0.0.1 or [::1], or serve TLS with --tls-cert and --tls-key",
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
    match args.provider {
        ProviderName::Sim => {
            let sim = Sim::new(SimConfig {
                boot_delay: Duration::from_millis(args.sim_boot_delay_ms),
                fail_starts_containing: args.sim_fail_starts_containing.clone(),
            });
            run(&args, config, token, sim).await
        }
        ProviderName::Qemu => {
            let images = args
                .images
                .images(&args.state_dir.join("images"))
                .context("opening the image cache")?;
            let mut qemu = QemuConfig::new(images, args.state_dir.join("run"));
            qemu.binary = args.qemu_binary.clone();
            qemu.accel_verdict = Some(args.state_dir.join("accel.json"));
            qemu.accel = args.accel;
            run(&args, config, token, Qemu::new(qemu)).await
        }
    }
}

async fn run<P: Provider>(
    args: &ServeArgs,
    config: HostConfig,
    token: Option<String>,
    provider: P,
) -> Result<()> {
    let host: Arc<Host<P>> = Host::open(config, &args.state_dir, provider)
        .await
        .with_context(|| format!("opening state dir {}", args.state_dir.display()))?;
    tracing::info!(listen = %args.listen, provider = ?args.provider, tls = args.tls_cert.is_some(), "far-host serving");
    let mut server = Server::builder();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
        };
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
            read(cert, "--tls-cert")?,
            read(key, "--tls-key")?,
        ));
        if let Some(ca) = &args.tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca, "--tls-client-ca")?));
        }
        server = server.tls_config(tls).context("TLS configuration")?;
    }
    server
        .add_routes(crate::routes(host, token))
        .serve_with_shutdown(args.listen, shutdown())
        .await
        .context("serving gRPC")
}

/// Resolves on Ctrl-C or SIGTERM. VMs keep running: they are adopted at the next start.
async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        } => {}
    }
    tracing::info!("far-host stopping");
}

/// A server's log on stderr: `RUST_LOG` (default `info`), colour only on a terminal.
pub fn init_logging() {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
