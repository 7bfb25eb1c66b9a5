//! `far`: FAR's command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

mod bench;
mod run;
mod ui;
mod voice;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use far_api::manifest::{self, Object};
use kube::ResourceExt;

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
    /// Check FarAgent and FlintlockHost manifests against the CRDs' rules, as the API server
    /// would on create. Exits 1 if any is refused.
    Validate {
        /// YAML files, each holding one or more documents.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Serve Flintlock's MicroVM gRPC API on this machine: a far-host (the same server and
    /// flags as the `far-host` binary).
    Host(far_host::cli::ServeArgs),
    /// Run one FarAgent in a real microVM on this machine, with no cluster: an embedded
    /// far-host and status channel, the agent's output streamed, its exit code returned.
    Run(run::RunArgs),
    /// Print a FarAgent's output, read through the API server's service proxy (so RBAC applies).
    Logs {
        /// The FarAgent's name.
        name: String,
        /// Its namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Keep printing new lines until the agent exits.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The controller's namespace.
        #[arg(long, env = "FAR_CONTROLLER_NAMESPACE", default_value = "far-system")]
        controller_namespace: String,
        /// The controller's metrics Service and port.
        #[arg(long, default_value = "far-agent-controller-metrics:8080")]
        service: String,
    },
    /// Serve the controller's web UI on this machine, relayed through the API server's service
    /// proxy with your kubeconfig's credentials (so RBAC applies); open the URL it prints.
    Ui {
        /// Where to serve it.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// The controller's namespace.
        #[arg(long, env = "FAR_CONTROLLER_NAMESPACE", default_value = "far-system")]
        controller_namespace: String,
        /// The controller's metrics Service and port.
        #[arg(long, default_value = "far-agent-controller-metrics:8080")]
        service: String,
    },
    /// Measure the control plane: N FarAgents through the real controller and simulated
    /// Flintlock hosts, against the in-repo fake API server or the one `--kubeconfig` names;
    /// prints a table and JSON.
    Bench(bench::BenchArgs),
    /// Work with OCI images.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Publish a directory as a single-layer linux/amd64 image (the dev kernel, the far-init
    /// initrd, an agent's root filesystem); prints the manifest digest.
    Push {
        /// The directory: its contents become the image's root.
        dir: PathBuf,
        /// Where to push, e.g. 127.0.0.1:5000/far/kernel:6.1.0-40.
        reference: String,
        /// Talk plain HTTP to a registry on a loopback address.
        #[arg(long)]
        plain_http_loopback: bool,
    },
}

fn main() -> Result<ExitCode> {
    far_tls::install();
    match Cli::parse().command {
        Command::Host(args) => {
            far_host::cli::init_logging();
            tokio::runtime::Runtime::new()?.block_on(far_host::cli::serve(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            voice::init("warn");
            tokio::runtime::Runtime::new()?.block_on(run::run(args))
        }
        Command::Bench(args) => {
            voice::init("error");
            tokio::runtime::Runtime::new()?.block_on(bench::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs {
            name,
            namespace,
            follow,
            controller_namespace,
            service,
        } => {
            tokio::runtime::Runtime::new()?.block_on(async {
                use futures::StreamExt;
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to Kubernetes (KUBECONFIG or in-cluster)")?;
                let via = far_agent_controller::logs::LogService {
                    namespace: controller_namespace,
                    service,
                };
                let mut lines =
                    far_agent_controller::logs::fetch(&client, &via, &namespace, &name, follow)
                        .await
                        .with_context(|| {
                            format!("reading the output of FarAgent {namespace}/{name}")
                        })?;
                while let Some(line) = lines.next().await {
                    println!("{}", line.context("reading the output stream")?);
                }
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ui {
            listen,
            controller_namespace,
            service,
        } => {
            tokio::runtime::Runtime::new()?.block_on(ui::serve(
                listen,
                &controller_namespace,
                &service,
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Crd => {
            print!("{}", far_api::crds_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { files } => validate(&files),
        Command::Image(ImageCommand::Push {
            dir,
            reference,
            plain_http_loopback,
        }) => {
            if !dir.is_dir() {
                bail!("{}: not a directory", dir.display());
            }
            let registry = far_oci::RegistryConfig {
                plain_http_loopback,
                ..far_oci::RegistryConfig::default()
            };
            let digest = tokio::runtime::Runtime::new()?
                .block_on(far_oci::push::push_dir(&dir, &reference, registry))
                .with_context(|| format!("pushing {} to {reference}", dir.display()))?;
            println!("{reference}@{digest}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn validate(files: &[PathBuf]) -> Result<ExitCode> {
    let mut refused = 0;
    for file in files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let docs = match manifest::documents(&text) {
            Ok(docs) => docs,
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                refused += 1;
                continue;
            }
        };
        for (index, doc) in docs.iter().enumerate() {
            match manifest::admit(index, doc) {
                Ok((object, warnings)) => {
                    let (kind, name) = match &object {
                        Object::FarAgent(a) => ("FarAgent", a.name_any()),
                        Object::FlintlockHost(h) => ("FlintlockHost", h.name_any()),
                        Object::FarAgentPool(p) => ("FarAgentPool", p.name_any()),
                    };
                    println!("{}: {kind} {name:?} is valid", file.display());
                    for warning in warnings {
                        println!("{}: warning: {warning}", file.display());
                    }
                }
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    refused += 1;
                }
            }
        }
    }
    Ok(if refused == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
