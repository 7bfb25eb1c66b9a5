//! `far run`: one FarAgent in a real microVM on this machine, with no cluster.
//!
//! It starts what a cluster would provide, in this process: a far-host (qemu provider) served
//! over gRPC on loopback and the agent status channel. It then does what the controller does
//! for one agent (plan the VM with `far-vmspec`, create it through Flintlock's API, follow it
//! through the channel) and shows it: progress on stderr, the agent's stdout and stderr as they
//! arrive, and the agent's exit code as its own. Ctrl-C deletes the VM and waits until it is
//! gone; the working directory is removed. With `--ui` it also serves the controller's web UI
//! for this one run ([`shown`]: the status a controller would write for it).

mod shown;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use far_agent_protocol::{ChannelConfig, EnvVar, RUN_CONFIG_KEY, Stream};
use far_api::manifest::{self, Object};
use far_api::workload::{ResolvedWorkload, Template};
use far_api::{AgentReason, FarAgent, FlintlockHost, FlintlockHostSpec, HostCapacity, VmLimits};
use far_channel::{Channel, Config, Event, TokenKey};
use far_host::images::{Fetch, ImageArgs, Images};
use far_host::provider::qemu::{Accel, HOST_ADDRESS, Qemu, QemuConfig};
use far_host::validate::Limits;
use far_host::{Host, HostConfig};
use far_vmspec::{Defaults, VmPlan, plan};
use flintlock_proto::MicroVmClient;
use flintlock_proto::errors::Failure;
use flintlock_proto::types::micro_vm_status::MicroVmState;
use flintlock_proto::v1alpha1::{DeleteMicroVmRequest, GetMicroVmRequest};
use kube::ResourceExt;
use tokio::time::Instant;
use tonic::transport::Channel as GrpcChannel;

use crate::voice::say;
use shown::Shown;

/// What `far run` was asked.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A YAML file holding one FarAgent.
    pub manifest: PathBuf,
    /// Where `scripts/build-guest` put the guest images (kernel, far-init initrd).
    #[arg(long, env = "FAR_GUEST_DIR", default_value = "target/guest")]
    pub guest_dir: PathBuf,
    #[command(flatten)]
    pub images: ImageArgs,
    /// The accelerator.
    #[arg(long, value_enum, default_value_t)]
    pub accel: Accel,
    /// Serve the web UI of this run (the controller's page, showing this one agent and this
    /// machine's far-host, its log following live) while it runs: at 127.0.0.1:8080, or at
    /// `--ui=ADDRESS`.
    #[arg(long, value_name = "ADDRESS", num_args = 0..=1, require_equals = true, default_missing_value = "127.0.0.1:8080")]
    pub ui: Option<SocketAddr>,
}

/// The manifest's FarAgent and what it runs: its own spec, over the template of the
/// FarAgentPool it names when that pool is in the same file (without a cluster there is no
/// other place to find it; the VM is booted from the template, as a cold claim would be).
fn load_agent(path: &Path) -> Result<(FarAgent, ResolvedWorkload)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let docs = manifest::documents(&text).with_context(|| path.display().to_string())?;
    let (mut agents, mut pools) = (Vec::new(), Vec::new());
    for (i, doc) in docs.iter().enumerate() {
        let (object, warnings) =
            manifest::admit(i, doc).with_context(|| path.display().to_string())?;
        for warning in warnings {
            say(format!("warning: {}: {warning}", path.display()));
        }
        match object {
            Object::FarAgent(agent) => agents.push(*agent),
            Object::FarAgentPool(pool) => pools.push(*pool),
            Object::FlintlockHost(_) => bail!(
                "{}: document {i} is a FlintlockHost; far run takes one FarAgent (and the FarAgentPool it names, if any)",
                path.display()
            ),
        }
    }
    let [agent] = <[FarAgent; 1]>::try_from(agents).map_err(|agents| {
        anyhow::anyhow!(
            "{}: holds {} FarAgents; far run takes exactly one",
            path.display(),
            agents.len()
        )
    })?;
    let pool = match &agent.spec.pool_ref {
        None => None,
        Some(r) => Some(pools.iter().find(|p| p.name_any() == r.name).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: spec.poolRef names FarAgentPool {:?}, which is not in the file: far run has no cluster to find it in; add the pool to the same file",
                path.display(),
                r.name
            )
        })?),
    };
    let template = pool.map(|p| Template {
        pool: p.metadata.name.as_deref().unwrap_or_default(),
        workload: &p.spec.template,
    });
    let workload = far_api::workload::resolve(&agent.spec.workload, template)
        .with_context(|| path.display().to_string())?;
    Ok((agent, workload))
}

/// Without a cluster there are no Secrets or ConfigMaps to read values from.
fn literal_env(workload: &ResolvedWorkload) -> Result<Vec<EnvVar>> {
    if let Some(i) = workload.secret_files.first().map(|_| 0) {
        bail!(
            "spec.secretFiles[{i}]: far run has no cluster to read Secrets from; run this agent through the controller"
        );
    }
    workload
        .env
        .iter()
        .enumerate()
        .map(|(i, e)| match (&e.value, &e.value_from) {
            (_, Some(_)) => bail!("spec.env[{i}] ({}): valueFrom needs a cluster; give a literal value to run it with far run", e.name),
            (value, None) => Ok(EnvVar { name: e.name.clone(), value: value.clone().unwrap_or_default() }),
        })
        .collect()
}

fn random_key() -> Result<TokenKey> {
    let mut bytes = vec![0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)
        .context("reading /dev/urandom")?;
    Ok(TokenKey::new(bytes)?)
}

/// What `far run` keeps between runs (images, the KVM verdict): the user's cache directory.
fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("far")
}

/// The images a local run uses: the flags' (aliases, registries, cache under the user's cache
/// directory), and the guest pieces `scripts/build-guest` made, under their local references.
fn images(args: &RunArgs) -> Result<Images> {
    let guest = args.guest_dir.join("images");
    if !guest.join("far-init").is_dir() || !guest.join("kernel").is_dir() {
        bail!(
            "guest images missing in {}: run ./scripts/build-guest first",
            guest.display()
        );
    }
    let images = args
        .images
        .images(&cache_dir().join("images"))
        .context("opening the image cache")?;
    Ok(images
        .with_alias(
            Defaults::LOCAL_KERNEL_IMAGE,
            std::fs::canonicalize(guest.join("kernel"))?,
        )
        .with_alias(
            Defaults::LOCAL_INIT_IMAGE,
            std::fs::canonicalize(guest.join("far-init"))?,
        ))
}

/// The FlintlockHost `far run` plays: this machine, with far-host's VM limits.
fn local_host(endpoint: &str, limits: &Limits) -> FlintlockHost {
    FlintlockHost::new(
        "local",
        FlintlockHostSpec {
            endpoint: endpoint.to_owned(),
            tls_secret_ref: None,
            token_secret_ref: None,
            provider: Some("qemu".into()),
            capacity: HostCapacity {
                cpu: u32::try_from(limits.max_vcpu).unwrap_or(1),
                memory: format!("{}Mi", limits.max_memory_mib),
            },
            vm_limits: VmLimits {
                min_memory: format!("{}Mi", limits.min_memory_mib),
                max_memory: format!("{}Mi", limits.max_memory_mib),
                max_cpu: u32::try_from(limits.max_vcpu).unwrap_or(1),
            },
            bridge_name: None,
            unschedulable: false,
        },
    )
}

/// Runs the agent; its exit code becomes `far`'s.
pub async fn run(args: RunArgs) -> Result<ExitCode> {
    let started = Instant::now();
    // Taken over before any VM exists, so an interrupt at any moment still deletes it.
    let mut stop = Stop::listen()?;
    let (mut agent, workload) = load_agent(&args.manifest)?;
    let env = literal_env(&workload)?;
    let images = images(&args)?;
    agent
        .metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    agent.metadata.uid = Some(ulid::Ulid::new().to_string().to_lowercase());
    let (name, uid) = (agent.name_any(), agent.uid().unwrap_or_default());
    let channel_id = far_agent_protocol::channel_id(&uid, 0);

    let channel = Channel::new(Config::new(random_key()?));
    let channel_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let channel_port = channel_listener.local_addr()?.port();
    tokio::spawn(channel.clone().serve(channel_listener));

    let state = tempfile::Builder::new()
        .prefix("far-run-")
        .tempdir()
        .context("creating a working directory")?;
    let limits = Limits::default();
    let mut qemu = QemuConfig::new(images.clone(), state.path().join("run"));
    qemu.accel = args.accel;
    qemu.accel_verdict = Some(cache_dir().join("accel.json"));
    let host = Host::open(
        HostConfig {
            limits,
            ..HostConfig::default()
        },
        state.path(),
        Qemu::new(qemu),
    )
    .await?;
    let endpoint = far_host::serve_on_loopback(Arc::clone(&host), None).await?;
    let mut client = MicroVmClient::connect(endpoint.clone())
        .await
        .context("connecting to the embedded far-host")?;

    let channel_config = ChannelConfig {
        url: format!("http://{HOST_ADDRESS}:{channel_port}"),
        id: channel_id.clone(),
        enrolment_token: channel.enrolment_token_for(&channel_id),
    };
    let task = far_vmspec::task(&agent, &workload, 0, env, false)?;
    let run_config = far_vmspec::run_config(Some(task), &workload, channel_config, 30);
    let defaults = Defaults::local();
    let metadata = BTreeMap::from([(RUN_CONFIG_KEY.to_owned(), run_config.to_bytes())]);
    let local = local_host(&endpoint, &limits);
    let planned = plan(&VmPlan {
        name: &far_vmspec::VmName::for_agent(&agent, 0)?,
        workload: &workload,
        network: agent.spec.network.as_ref(),
        host: &local,
        defaults: &defaults,
        guest_metadata: &metadata,
    })?;
    say(format!("{name}: {}", planned.sizing.describe("local")));
    let shown = Shown::new(agent.clone(), local);
    if let Some(address) = args.ui {
        serve_ui(address, &channel, &shown, &agent, &channel_id).await?;
    }

    // Pulled here rather than inside the VM's start, so the user sees it happen.
    let volumes = workload.volumes.iter().enumerate();
    let wanted = std::iter::once(("spec.image".to_owned(), workload.image.clone()))
        .chain(volumes.map(|(i, v)| (format!("spec.volumes[{i}].image"), v.image.clone())));
    for (field, image) in wanted {
        let preparing = Instant::now();
        say(format!("{name}: preparing {image}"));
        tokio::select! {
            prepared = images.volume(&image, Fetch::Pull) => {
                prepared.with_context(|| format!("{field}: {image}"))?;
            }
            () = stop.requested() => {
                say(format!("{name}: interrupted"));
                return Ok(ExitCode::from(130));
            }
        }
        say(format!(
            "{name}: {image} ready after {:.1} s",
            preparing.elapsed().as_secs_f64()
        ));
    }

    let mut events = channel.subscribe();
    let created = client
        .create_micro_vm(planned.request)
        .await
        .context("CreateMicroVM")?
        .into_inner();
    let vm_uid = created
        .microvm
        .and_then(|vm| vm.spec)
        .and_then(|s| s.uid)
        .context("far-host answered without a uid")?;
    say(format!("{name}: VM {vm_uid} created; booting"));
    shown.created(&vm_uid, planned.sizing.vm);

    let followed = Followed {
        shown: &shown,
        agent: &agent,
        vm_uid: &vm_uid,
        channel_id: &channel_id,
        started,
    };
    let outcome = follow(&mut client, &host, &mut events, &mut stop, &followed).await;
    if matches!(outcome, Outcome::Failed(..)) {
        // Before the VM's working files go with it.
        show_console(&host.provider().console_log(&vm_uid));
    }
    say(format!("{name}: deleting VM {vm_uid}"));
    delete(&mut client, &vm_uid).await;
    let code = match outcome {
        Outcome::Exited(code) => {
            say(format!("{name}: agent exited with code {code}"));
            let reason = if code == 0 {
                AgentReason::Completed
            } else {
                AgentReason::Error
            };
            shown.finished(
                Some(code),
                reason,
                &format!("the agent exited with code {code}"),
            );
            code
        }
        Outcome::Failed(why, reason) => {
            say(format!("{name}: failed: {reason}"));
            shown.finished(None, why, &reason);
            1
        }
        Outcome::Interrupted => {
            say(format!("{name}: interrupted"));
            130
        }
    };
    Ok(ExitCode::from(
        u8::try_from(code.rem_euclid(256)).unwrap_or(1),
    ))
}

/// Serves the web UI of this run at `address`: the controller's page and routes, fed by
/// `shown`, and the agent's log from the status channel, for as long as `far run` runs.
async fn serve_ui(
    address: SocketAddr,
    channel: &Channel,
    shown: &Arc<Shown>,
    agent: &FarAgent,
    channel_id: &str,
) -> Result<()> {
    use far_agent_controller::ui;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("--ui {address}: cannot listen there"))?;
    channel.name(
        &agent.namespace().unwrap_or_default(),
        &agent.name_any(),
        channel_id,
    );
    let live = ui::Live::default();
    live.attach(shown);
    let router = ui::router(live.clone()).merge(channel.logs_router());
    say(format!("web UI at http://{}/ui/", listener.local_addr()?));
    tokio::spawn(async move {
        tokio::select! {
            _ = axum::serve(listener, router) => {}
            () = live.publish() => {}
        }
    });
    Ok(())
}

/// Ctrl-C (SIGINT) and SIGTERM.
struct Stop {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Stop {
    fn listen() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn requested(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

enum Outcome {
    Exited(i32),
    /// Why, as status would say it, and a sentence.
    Failed(AgentReason, String),
    Interrupted,
}

/// The run `follow` watches.
struct Followed<'a> {
    /// What the web UI shows of it.
    shown: &'a Shown,
    agent: &'a FarAgent,
    vm_uid: &'a str,
    /// The status channel's id of this run.
    channel_id: &'a str,
    /// When `far run` started: what "running after" counts from.
    started: Instant,
}

async fn follow(
    client: &mut MicroVmClient<GrpcChannel>,
    host: &Host<Qemu>,
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    stop: &mut Stop,
    run: &Followed<'_>,
) -> Outcome {
    let &Followed {
        shown,
        agent,
        vm_uid,
        channel_id: uid,
        started,
    } = run;
    let name = agent.name_any();
    let heartbeat_timeout = Duration::from_secs(agent.spec.heartbeat.timeout_seconds.into());
    let deadline = agent
        .spec
        .active_deadline_seconds
        .map(|s| Instant::now() + Duration::from_secs(s.unsigned_abs()));
    let mut last_heartbeat: Option<Instant> = None;
    let mut created_at: Option<Instant> = None;
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            () = stop.requested() => return Outcome::Interrupted,
            event = events.recv() => match event {
                Ok(Event::Heartbeat { uid: who, first, heartbeat }) if who == uid => {
                    if first {
                        let boot = heartbeat.boot_to_entrypoint_ms.map_or(String::new(), |ms| format!(", {ms} ms from kernel start to entrypoint"));
                        say(format!("{name}: agent running {:.1} s after far run started{boot}", started.elapsed().as_secs_f64()));
                    }
                    last_heartbeat = Some(Instant::now());
                    shown.heartbeat(&heartbeat);
                }
                Ok(Event::Logs { uid: who, lines }) if who == uid => {
                    for line in lines {
                        match line.stream {
                            Stream::Stdout => println!("{}", line.text),
                            Stream::Stderr => eprintln!("{}", line.text),
                        }
                    }
                }
                Ok(Event::Exited { uid: who, exit }) if who == uid => {
                    return match exit.start_error {
                        Some(reason) => Outcome::Failed(AgentReason::StartError, format!("the agent could not start: {reason}")),
                        None => Outcome::Exited(exit.code),
                    };
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => say(format!("{n} channel events were missed")),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Outcome::Failed(AgentReason::HeartbeatLost, "the status channel closed".into()),
            },
            _ = poll.tick() => {
                match client.get_micro_vm(GetMicroVmRequest { uid: vm_uid.to_owned() }).await {
                    Ok(vm) => {
                        let state = vm.into_inner().microvm.and_then(|vm| vm.status).map(|s| s.state);
                        if state == Some(MicroVmState::Failed as i32) {
                            return Outcome::Failed(AgentReason::VMFailed, "the VM could not be started (state FAILED)".into());
                        }
                        if state == Some(MicroVmState::Created as i32) && created_at.is_none() {
                            created_at = Some(Instant::now());
                        }
                    }
                    Err(status) => return Outcome::Failed(AgentReason::VMFailed, format!("GetMicroVM: {status}")),
                }
                if host.guest_exited(vm_uid).unwrap_or(false) {
                    // Give the exit report, sent just before power-off, a moment to land.
                    if let Ok(Ok(Event::Exited { exit, .. })) = tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
                        return Outcome::Exited(exit.code);
                    }
                    return Outcome::Failed(AgentReason::VMFailed, "the VM stopped without the agent reporting an exit code".into());
                }
                let silent_since = last_heartbeat.or(created_at);
                if silent_since.is_some_and(|at| at.elapsed() > heartbeat_timeout) {
                    let what = if last_heartbeat.is_some() { AgentReason::HeartbeatLost } else { AgentReason::BootTimeout };
                    return Outcome::Failed(what, format!("{}: no heartbeat for {} s", what.as_str(), heartbeat_timeout.as_secs()));
                }
                if deadline.is_some_and(|d| Instant::now() > d) {
                    return Outcome::Failed(AgentReason::DeadlineExceeded, "DeadlineExceeded: activeDeadlineSeconds passed".into());
                }
            }
        }
    }
}

async fn delete(client: &mut MicroVmClient<GrpcChannel>, vm_uid: &str) {
    if let Err(status) = client
        .delete_micro_vm(DeleteMicroVmRequest {
            uid: vm_uid.to_owned(),
        })
        .await
    {
        say(format!("DeleteMicroVM: {status}"));
        return;
    }
    for _ in 0..300 {
        match client
            .get_micro_vm(GetMicroVmRequest {
                uid: vm_uid.to_owned(),
            })
            .await
        {
            Err(status) if Failure::of(&status) == Failure::NotFound => return,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    say(format!("VM {vm_uid} was not gone after 30 s"));
}

/// The end of the VM's console, for a failure nobody reported over the channel.
fn show_console(log: &Path) {
    if let Ok(console) = std::fs::read_to_string(log) {
        let lines: Vec<&str> = console.lines().collect();
        say("last lines of the VM console:");
        for line in &lines[lines.len().saturating_sub(20)..] {
            eprintln!("  | {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn examples(files: &[&str]) -> String {
        files
            .iter()
            .map(|f| {
                std::fs::read_to_string(
                    Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../../examples")
                        .join(f),
                )
                .unwrap()
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }

    #[test]
    fn an_agent_of_a_pool_in_the_same_file_runs_on_the_template() {
        let (_dir, path) = manifest(&examples(&[
            "pool-embedders.yaml",
            "embedder-from-pool.yaml",
        ]));
        let (agent, workload) = load_agent(&path).unwrap();
        assert_eq!(agent.name_any(), "embedder-from-pool");
        assert_eq!(workload.image, "ghcr.io/microscaler/tiffany-vm:v0.3.1");
        assert_eq!(workload.entrypoint, "/usr/local/bin/tiffany");
        assert_eq!(workload.args, ["--task", "embedder", "--shard", "7"]);
    }

    #[test]
    fn a_pool_that_is_not_in_the_file_is_named_with_the_fix() {
        let (_dir, path) = manifest(&examples(&["embedder-from-pool.yaml"]));
        let err = load_agent(&path).unwrap_err().to_string();
        assert!(
            err.ends_with(
                "spec.poolRef names FarAgentPool \"embedders\", which is not in the file: far run has no cluster to find it in; add the pool to the same file"
            ),
            "{err}"
        );
    }

    #[test]
    fn two_agents_are_refused() {
        let (_dir, path) = manifest(&examples(&[
            "embedder-worker-01.yaml",
            "embedder-worker-01.yaml",
        ]));
        let err = load_agent(&path).unwrap_err().to_string();
        assert!(
            err.ends_with("holds 2 FarAgents; far run takes exactly one"),
            "{err}"
        );
    }
}
