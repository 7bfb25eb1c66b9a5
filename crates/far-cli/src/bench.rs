//! `far bench`: the control plane under load, measured.
//!
//! In one process: several far-hosts with the `sim` provider (real gRPC; each simulated guest
//! heartbeats and reports its exit over real HTTP), the status channel, and the real controller
//! (or the controller as its own process), against the in-repo fake API server (real HTTP) or
//! the API server a kubeconfig names. It creates N FarAgents in one burst or at a rate, follows
//! them with a watch, deletes each once finished, and prints what happened as a table and as
//! JSON: times from create to Running and to finished, the rate agents reached Running, API
//! requests per agent by verb (read from the API server's own `apiserver_request_total` at
//! `/metrics`, the fake's or a real one's), and peak memory and CPU time. A baseline first
//! measures how fast the same API server takes plain FarAgent status patches, with one request
//! in flight and with as many as the controller has; divided by the writes an agent needs to
//! reach Running, it gives the ceiling the controller's rate is a share of. With `--pool`, the
//! agents claim from a warm FarAgentPool instead ([`pool`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use far_agent_controller::metrics::Metrics;
use far_agent_controller::reconcile::Config as ControllerConfig;
use far_api::{FarAgent, FlintlockHost, Phase};
use far_channel::{Channel, TokenKey};
use far_host::provider::sim::{Sim, SimConfig};
use far_host::validate::Limits;
use far_host::{Host, HostConfig};
use far_testkit::apiserver::FakeApiServer;
use far_testkit::request_metrics;
use far_vmspec::Defaults;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;
use kube::runtime::watcher;
use serde_json::json;
use tokio::time::Instant;

/// What `far bench` was asked.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// FarAgents to create (in one burst, or at --rate).
    #[arg(long, default_value_t = 500)]
    pub agents: usize,
    /// Simulated Flintlock hosts.
    #[arg(long, default_value_t = 4)]
    pub hosts: usize,
    /// Seconds each simulated agent runs.
    #[arg(long, default_value_t = 2.0)]
    pub run_seconds: f64,
    /// Give up after this many seconds. By default the run's own length: creating the agents
    /// (at --rate, or in a burst at 20 a second), --run-seconds, and 10 minutes to spare.
    #[arg(long)]
    pub timeout_seconds: Option<u64>,
    /// Status patches in the API-server baseline.
    #[arg(long, default_value_t = 2000)]
    pub baseline_patches: usize,
    /// Create agents at this steady rate per second; 0 creates them in one burst.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Run the controller as its own process from this binary (e.g.
    /// target/release/far-agent-controller), so its memory and CPU are measured alone.
    #[arg(long, value_name = "PATH")]
    pub controller_binary: Option<std::path::PathBuf>,
    /// Agents the controller reconciles at once (0: no bound).
    #[arg(long, default_value_t = far_agent_controller::reconcile::DEFAULT_CONCURRENCY)]
    pub concurrency: u16,
    /// Which Events the controller records (`all` or `warnings`).
    #[arg(long, value_enum, default_value_t)]
    pub events: far_agent_controller::reconcile::EventPolicy,
    /// Run against the API server this kubeconfig names instead of the in-repo fake: a
    /// disposable cluster with FAR's CRDs installed (`far crd | kubectl apply -f -`) and no FAR
    /// controller running, since the benchmark's controller reconciles every FarAgent there.
    /// Reading `/metrics` needs `get` on that non-resource URL.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Claim from a warm FarAgentPool instead: the pool is filled with --pool-idle idle VMs,
    /// then --agents claims arrive (a Poisson process at --rate, or in one burst).
    #[arg(long)]
    pub pool: bool,
    /// Idle VMs the pool keeps (its minIdle) with --pool; 0: as many as --agents.
    #[arg(long, default_value_t = 0, requires = "pool")]
    pub pool_idle: usize,
}

impl BenchArgs {
    /// When the run gives up: --timeout-seconds, or the run's own length with time to spare
    /// (a fixed default gave up on long runs of many agents while they were still running).
    pub fn timeout(&self) -> Duration {
        self.timeout_seconds.map_or_else(
            || {
                let per_second = if self.rate > 0.0 {
                    self.rate.min(20.0)
                } else {
                    20.0
                };
                Duration::from_secs_f64(self.agents as f64 / per_second + self.run_seconds + 600.0)
            },
            Duration::from_secs,
        )
    }
}

/// The namespace the benchmark's agents (and the controller's Lease) live in.
const NAMESPACE: &str = "far-bench";

/// The API server the benchmark runs against.
struct ApiServer {
    client: kube::Client,
    /// Its kubeconfig, for a controller run as its own process.
    kubeconfig: std::path::PathBuf,
    /// The in-repo fake, when no kubeconfig was given; serves until dropped.
    _fake: Option<FakeApiServer>,
}

impl ApiServer {
    async fn start(kubeconfig: Option<&std::path::Path>, state: &std::path::Path) -> Result<Self> {
        let Some(path) = kubeconfig else {
            let fake = FakeApiServer::start().await;
            let path = state.join("kubeconfig");
            std::fs::write(&path, fake.kubeconfig())?;
            return Ok(Self {
                client: fake.client(),
                kubeconfig: path,
                _fake: Some(fake),
            });
        };
        let file = kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
        let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .with_context(|| format!("using --kubeconfig {}", path.display()))?;
        let client = kube::Client::try_from(config)?;
        if let Err(e) = Api::<FarAgent>::all(client.clone())
            .list(&ListParams::default().limit(1))
            .await
        {
            bail!(
                "the API server --kubeconfig names does not serve FarAgents ({e}): install FAR's CRDs first (far crd | kubectl apply -f -)"
            );
        }
        Ok(Self {
            client,
            kubeconfig: path.to_owned(),
            _fake: None,
        })
    }

    /// Requests the API server has served so far, by `(verb, resource)` (and `conflict`),
    /// from its `apiserver_request_total`. A real one counts every client's requests.
    async fn requests(&self) -> Result<BTreeMap<(String, String), u64>> {
        Ok(request_metrics::by_verb(&self.series().await?))
    }

    /// The API server's `apiserver_request_total`, every series of it.
    async fn series(&self) -> Result<BTreeMap<request_metrics::Series, u64>> {
        Ok(request_metrics::parse(&self.metrics().await?))
    }

    /// CPU seconds the API server's process has used, from its `process_cpu_seconds_total`
    /// (kube-apiserver has it; the in-repo fake, which shares this process, does not).
    async fn cpu_seconds(&self) -> Result<Option<f64>> {
        Ok(self.metrics().await?.lines().find_map(|line| {
            line.strip_prefix("process_cpu_seconds_total ")
                .and_then(|v| v.trim().parse().ok())
        }))
    }

    async fn metrics(&self) -> Result<String> {
        let request = axum::http::Request::get("/metrics").body(Vec::new())?;
        self.client
            .request_text(request)
            .await
            .context("reading the API server's /metrics")
    }

    /// The benchmark's namespace, created unless it exists, and holding no FarAgent: an earlier
    /// run's would share names with this run's.
    async fn namespace(&self) -> Result<()> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
        match namespaces.create(&PostParams::default(), &namespace).await {
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            other => {
                other.context("creating the benchmark's namespace")?;
            }
        }
        let agents: Api<FarAgent> = Api::namespaced(self.client.clone(), NAMESPACE);
        let left = agents.list(&ListParams::default().limit(1)).await?;
        if let Some(agent) = left.items.first() {
            bail!(
                "namespace {NAMESPACE} holds FarAgents of an earlier run ({} among them), whose names \
                 this run would reuse: delete them first (kubectl -n {NAMESPACE} delete faragents \
                 --all, with a FAR controller running to release them)",
                kube::ResourceExt::name_any(agent)
            );
        }
        Ok(())
    }
}

/// The verbs that write to the API server.
fn is_write(verb: &str) -> bool {
    matches!(verb, "create" | "patch" | "update" | "delete")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn summary(mut values: Vec<f64>) -> serde_json::Value {
    values.sort_by(f64::total_cmp);
    json!({
        "count": values.len(),
        "p50": percentile(&values, 50.0),
        "p95": percentile(&values, 95.0),
        "p99": percentile(&values, 99.0),
        "max": values.last().copied().unwrap_or(f64::NAN),
    })
}

/// A memory figure (MiB) of a process (`self` or a pid) from /proc/PID/status: `VmHWM:` (peak
/// RSS) or `VmRSS:`.
fn memory_mib(pid: &str, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Peak RSS (MiB) and CPU seconds of a process (`self` or a pid), from /proc.
fn process_usage(pid: &str) -> (f64, f64) {
    let hwm_mib = memory_mib(pid, "VmHWM:");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    (hwm_mib, ticks / 100.0)
}

/// How fast the API server takes plain FarAgent status patches with `in_flight` requests at
/// once: one object per request in flight, each patched in turn (as the controller writes many
/// agents, each one write at a time; patches racing on one object retry inside the API server
/// and would understate it).
async fn baseline(api: &ApiServer, patches: usize, in_flight: usize) -> Result<f64> {
    let agents: Api<FarAgent> = Api::namespaced(api.client.clone(), NAMESPACE);
    let in_flight = in_flight.clamp(1, patches.max(1));
    let names: Vec<String> = (0..in_flight).map(|i| format!("baseline-{i}")).collect();
    for name in &names {
        let agent: FarAgent = serde_json::from_value(json!({
            "apiVersion": "tiffany.dev/v1", "kind": "FarAgent", "metadata": {"name": name},
            "spec": {"image": "busybox:1", "memory": "256Mi", "cpu": 1, "entrypoint": "/bin/true"}
        }))?;
        agents.create(&PostParams::default(), &agent).await?;
    }
    let started = Instant::now();
    let results: Vec<Result<(), kube::Error>> = futures::stream::iter(names.iter().enumerate())
        .map(|(k, name)| {
            let agents = agents.clone();
            // Worker k sends patches k, k + in_flight, ...: `patches` in all.
            let mine = (k..patches).step_by(in_flight);
            async move {
                for i in mine {
                    let patch = json!({"status": {"message": format!("baseline {i}")}});
                    agents
                        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await?;
                }
                Ok(())
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    let took = started.elapsed().as_secs_f64();
    for name in &names {
        agents.delete(name, &Default::default()).await?;
    }
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        bail!("a baseline status patch failed: {e}");
    }
    Ok(patches as f64 / took)
}

/// Runs the benchmark and prints its figures.
mod pool;

pub async fn run(args: BenchArgs) -> Result<()> {
    if args.pool {
        return pool::run(args).await;
    }
    let state = tempfile::Builder::new().prefix("far-bench-").tempdir()?;
    let api = ApiServer::start(args.kubeconfig.as_deref(), state.path()).await?;
    api.namespace().await?;
    // As many requests in flight as the controller can have: one per agent reconciled at once.
    let in_flight = match args.concurrency {
        0 => args.agents,
        n => usize::from(n),
    };
    eprintln!(
        "far bench: baseline: {} plain FarAgent status patches, 1 and {in_flight} in flight",
        args.baseline_patches
    );
    let patch_rate_1 = baseline(&api, args.baseline_patches, 1).await?;
    let patch_rate_n = baseline(&api, args.baseline_patches, in_flight).await?;
    let before_series = api.series().await?;
    let before = request_metrics::by_verb(&before_series);

    let rig = Rig::start(&args, &api, state.path(), args.agents).await?;
    let Rig {
        run_label,
        sims,
        host_names,
        controller,
        stop,
    } = rig;

    let agents: Api<FarAgent> = Api::namespaced(api.client.clone(), NAMESPACE);
    let mut seen_running: HashMap<String, Instant> = HashMap::new();
    // Each write to an agent makes a new resourceVersion, which the watch shows: the versions
    // seen before Running, less the create's, are the writes that took it there.
    let mut versions_to_running: HashMap<String, std::collections::HashSet<String>> =
        HashMap::new();
    let mut finished: HashMap<String, (Instant, Phase, Option<i32>)> = HashMap::new();
    let mut gone: HashMap<String, Instant> = HashMap::new();
    let mut events = watcher(agents.clone(), watcher::Config::default()).boxed();
    // Each agent is deleted, as its user would, once it has finished: the writes counted are
    // those of a whole life, create to deletion.
    let (finished_tx, finished_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let deleter = {
        let agents = agents.clone();
        tokio::spawn(async move {
            tokio_stream::wrappers::UnboundedReceiverStream::new(finished_rx)
                .map(|name| {
                    let agents = agents.clone();
                    async move {
                        agents
                            .delete(&name, &Default::default())
                            .await
                            .with_context(|| format!("deleting {name}"))
                            .map(drop)
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<Result<()>>>()
                .await
                .into_iter()
                .collect::<Result<()>>()
        })
    };

    // The watch is established before the first create, so it sees every write of every agent.
    while let Some(event) = events.next().await {
        if matches!(
            event.context("watching FarAgents")?,
            watcher::Event::InitDone
        ) {
            break;
        }
    }
    eprintln!(
        "far bench: creating {} FarAgents on {} sim hosts",
        args.agents, args.hosts
    );
    let api_cpu_at_start = api.cpu_seconds().await?;
    // What the controller holds before its first agent: its peak beyond this, over the agents,
    // is what an agent costs it.
    let controller_rss_before = controller
        .as_ref()
        .and_then(tokio::process::Child::id)
        .map(|pid| memory_mib(&pid.to_string(), "VmRSS:"));
    let started = Instant::now();
    let run_seconds = args.run_seconds.to_string();
    // Created in a task of its own, so the watch below is read while agents are still being
    // created (a steady rate takes a while) and every time is taken when it happens.
    let created_at: Arc<std::sync::Mutex<HashMap<String, (Instant, i32)>>> = Arc::default();
    let creator = {
        let (agents, created_at, run_seconds, run_label, rate, count) = (
            agents.clone(),
            Arc::clone(&created_at),
            run_seconds.clone(),
            run_label.clone(),
            args.rate,
            args.agents,
        );
        tokio::spawn(async move {
            let results: Vec<Result<()>> = futures::stream::iter(0..count)
                .map(|i| {
                    let (agents, created_at, run_seconds, run_label) = (agents.clone(), Arc::clone(&created_at), run_seconds.clone(), run_label.clone());
                    async move {
                        if rate > 0.0 {
                            tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / rate)).await;
                        }
                        let name = format!("agent-{i:05}");
                        let code = if i % 10 == 9 { 3 } else { 0 };
                        let agent: FarAgent = serde_json::from_value(json!({
                            "apiVersion": "tiffany.dev/v1", "kind": "FarAgent", "metadata": {"name": name},
                            "spec": {"image": "busybox:1", "memory": "128Mi", "cpu": 1, "entrypoint": "/usr/local/bin/tiffany",
                                     "hostSelector": {"far-bench/run": run_label},
                                     "args": ["--seconds", run_seconds, "--exit-code", code.to_string()],
                                     "heartbeat": {"intervalSeconds": 10, "timeoutSeconds": 60}}
                        }))
                        .context("agent manifest")?;
                        let sent = Instant::now();
                        agents.create(&PostParams::default(), &agent).await.with_context(|| format!("creating {name}"))?;
                        created_at.lock().unwrap_or_else(|e| e.into_inner()).insert(name, (sent, code));
                        anyhow::Ok(())
                    }
                })
                .buffer_unordered(if rate > 0.0 { 1024 } else { 32 })
                .collect()
                .await;
            results.into_iter().collect::<Result<()>>()
        })
    };

    // Steady state: from the moment every agent runs until the first one finishes, only
    // heartbeats happen; the API writes made meanwhile are what a running fleet costs.
    let writes_so_far = async |api: &ApiServer| -> Result<BTreeMap<String, u64>> {
        Ok(api
            .requests()
            .await?
            .into_iter()
            .filter(|((verb, _), _)| is_write(verb))
            .map(|((verb, resource), n)| (format!("{verb} {resource}"), n))
            .collect())
    };
    let mut all_running: Option<(Instant, BTreeMap<String, u64>)> = None;
    let mut api_cpu_to_running = None;
    let mut steady: Option<(f64, BTreeMap<String, u64>)> = None;
    let deadline = started + args.timeout();
    let mut gave_up = false;
    let mut relisted = std::collections::HashSet::new();
    while gone.len() < args.agents {
        let next = tokio::time::timeout_at(deadline, events.next()).await;
        let Ok(Some(event)) = next else {
            gave_up = next.is_err();
            break;
        };
        let agent = match event {
            Ok(watcher::Event::Apply(agent)) => agent,
            Ok(watcher::Event::InitApply(agent)) => {
                relisted.insert(kube::ResourceExt::name_any(&agent));
                agent
            }
            Ok(watcher::Event::Delete(agent)) => {
                gone.entry(kube::ResourceExt::name_any(&agent))
                    .or_insert_with(Instant::now);
                continue;
            }
            Ok(watcher::Event::Init) => {
                relisted.clear();
                continue;
            }
            // A watch that had to list again (its version expired, as on a long run against a
            // real API server) reports no deletion from the gap: a finished agent the list no
            // longer holds was deleted in it.
            Ok(watcher::Event::InitDone) => {
                for name in finished.keys() {
                    if !relisted.contains(name) {
                        gone.entry(name.clone()).or_insert_with(Instant::now);
                    }
                }
                continue;
            }
            Err(_) => continue,
        };
        let name = kube::ResourceExt::name_any(&agent);
        let status = agent.status.clone().unwrap_or_default();
        if !seen_running.contains_key(&name)
            && let Some(version) = kube::ResourceExt::resource_version(&agent)
        {
            versions_to_running
                .entry(name.clone())
                .or_default()
                .insert(version);
        }
        if matches!(
            status.phase,
            Some(Phase::Running | Phase::Completed | Phase::Failed)
        ) {
            seen_running
                .entry(name.clone())
                .or_insert_with(Instant::now);
        }
        if all_running.is_none() && seen_running.len() == args.agents {
            all_running = Some((Instant::now(), writes_so_far(&api).await?));
            api_cpu_to_running = api
                .cpu_seconds()
                .await?
                .zip(api_cpu_at_start)
                .map(|(now, then)| (now - then) / args.agents as f64);
        }
        if status.phase.is_some_and(Phase::is_terminal) {
            if let (Some((since, before)), None) = (&all_running, &steady) {
                let during = writes_so_far(&api)
                    .await?
                    .into_iter()
                    .map(|(k, n)| {
                        let was = before.get(&k).copied().unwrap_or(0);
                        (k, n.saturating_sub(was))
                    })
                    .filter(|(_, n)| *n > 0)
                    .collect();
                steady = Some((since.elapsed().as_secs_f64(), during));
            }
            if !finished.contains_key(&name) {
                finished.insert(
                    name.clone(),
                    (
                        Instant::now(),
                        status.phase.unwrap_or(Phase::Failed),
                        status.exit_code,
                    ),
                );
                let _ = finished_tx.send(name);
            }
        }
    }
    if gave_up {
        // Its agents are deleted while the controller and hosts still run, so their VMs go and
        // the next run finds the namespace empty.
        let left: Vec<String> = created_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|n| !gone.contains_key(*n))
            .cloned()
            .collect();
        eprintln!(
            "far bench: gave up after {} s; deleting the {} agents left",
            args.timeout().as_secs(),
            left.len()
        );
        for name in left.iter().filter(|n| !finished.contains_key(*n)) {
            let _ = finished_tx.send(name.clone());
        }
        let mut waiting: std::collections::HashSet<String> = left.into_iter().collect();
        let cleanup = Instant::now() + Duration::from_secs(120);
        while !waiting.is_empty() {
            match tokio::time::timeout_at(cleanup, events.next()).await {
                Ok(Some(Ok(watcher::Event::Delete(agent)))) => {
                    waiting.remove(&kube::ResourceExt::name_any(&agent));
                }
                Ok(Some(_)) => {}
                _ => {
                    eprintln!("far bench: {} agents not gone within 120 s", waiting.len());
                    break;
                }
            }
        }
    }
    let _ = stop.send(());
    drop(finished_tx);
    creator.await.context("the creating task")??;
    deleter.await.context("the deleting task")??;
    let created_at = created_at.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (rss_mib, cpu_seconds) = process_usage("self");
    let controller_usage = controller
        .as_ref()
        .and_then(tokio::process::Child::id)
        .map(|pid| process_usage(&pid.to_string()));
    if let Some(mut child) = controller {
        let _ = child.kill().await;
    }

    let to_running: Vec<f64> = seen_running
        .iter()
        .filter_map(|(n, t)| Some(t.duration_since(created_at.get(n)?.0).as_secs_f64()))
        .collect();
    let to_finished: Vec<f64> = finished
        .iter()
        .filter_map(|(n, (t, _, _))| Some(t.duration_since(created_at.get(n)?.0).as_secs_f64()))
        .collect();
    let to_gone: Vec<f64> = gone
        .iter()
        .filter_map(|(n, t)| Some(t.duration_since(finished.get(n)?.0).as_secs_f64()))
        .collect();
    let wrong = finished
        .iter()
        .filter(|(n, (_, phase, code))| {
            let want = created_at.get(*n).map_or(-1, |(_, c)| *c);
            *code != Some(want) || (*phase == Phase::Completed) != (want == 0)
        })
        .count();
    let last_running = seen_running.values().max().copied().unwrap_or(started);
    let running_rate =
        seen_running.len() as f64 / last_running.duration_since(started).as_secs_f64().max(1e-9);

    let vms = VmCount::of(&sims);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let exit_acks: Vec<f64> = sims
        .iter()
        .flat_map(|host| host.provider().exit_acknowledgements())
        .map(|took| took.as_secs_f64())
        .collect();
    let writes_to_running = versions_to_running
        .values()
        .map(|versions| versions.len().saturating_sub(1) as f64)
        .sum::<f64>()
        / versions_to_running.len().max(1) as f64;
    // What the API server's baseline allows: the controller cannot bring agents to Running
    // faster than baseline ÷ the writes each needs on the way.
    let ceiling = patch_rate_n / writes_to_running.max(1.0);
    let refused = refused_writes(&before_series, &api.series().await?);
    let after = api.requests().await?;
    delete_hosts(&api, &host_names).await?;
    let mut per_agent = BTreeMap::new();
    for ((verb, resource), count) in &after {
        let own = before
            .get(&(verb.clone(), resource.clone()))
            .copied()
            .unwrap_or(0);
        let mut n = count.saturating_sub(own);
        // The benchmark's own creates, deletes and watch are not the controller's.
        if resource == "faragents" && (verb == "create" || verb == "delete") {
            n = n.saturating_sub(args.agents as u64);
        }
        // Non-resource requests (this benchmark reading /metrics) have no resource.
        if n > 0
            && !resource.is_empty()
            && !matches!(verb.as_str(), "watch" | "list" | "conflict" | "forbidden")
        {
            *per_agent.entry(format!("{verb} {resource}")).or_insert(0.0) +=
                n as f64 / args.agents as f64;
        }
    }
    let writes: f64 = per_agent
        .iter()
        .filter(|(k, _)| k.split(' ').next().is_some_and(is_write))
        .map(|(_, v)| v)
        .sum();
    // The counter is the API server's since it started: only the run's own part counts.
    let conflict = ("conflict".to_owned(), "faragents".to_owned());
    let conflicts = after
        .get(&conflict)
        .copied()
        .unwrap_or(0)
        .saturating_sub(before.get(&conflict).copied().unwrap_or(0)) as f64
        / args.agents as f64;

    let report = json!({
        "agents": args.agents,
        "hosts": args.hosts,
        "run_seconds": args.run_seconds,
        "rate_per_second": if args.rate > 0.0 { json!(args.rate) } else { json!("burst") },
        "finished": finished.len(),
        "wrong_exit_or_phase": wrong,
        // Not finished when the run ended; when it gave up at its timeout
        // (`gave_up_after_seconds`), still under way rather than lost.
        "lost": args.agents - finished.len(),
        "gave_up_after_seconds": gave_up.then(|| args.timeout().as_secs()),
        "finished_but_not_deleted": finished.len().saturating_sub(gone.len()),
        "create_to_running_seconds": summary(to_running),
        "create_to_finished_seconds": summary(to_finished),
        "finished_to_deleted_seconds": summary(to_gone),
        "agents_per_second_reaching_running": running_rate,
        "api_requests_per_agent": per_agent,
        "api_writes_per_agent": writes,
        "api_conflicts_per_agent": conflicts,
        // Every write the API server refused during the run, by code and resource.
        "api_writes_refused": refused,
        // CreateMicroVM calls the sim hosts accepted, VM names created more than once (on one
        // host or several), and VMs still there once every agent is gone: both must be 0.
        "vms_created": vms.created,
        "duplicate_vms": vms.duplicates,
        "leaked_vms": vms.leaked,
        // null unless every agent ran together for at least 5 s (use a long --run-seconds).
        "steady_state": steady.filter(|(seconds, _)| *seconds >= 5.0).map(|(seconds, by_kind)| {
            let writes: u64 = by_kind.values().sum();
            json!({
                "seconds": seconds,
                "api_writes": writes,
                "api_writes_per_second": writes as f64 / seconds,
                "api_writes_by_kind": by_kind,
            })
        }),
        // From each sim guest's exit report to the channel's acknowledgement, sent once the
        // controller's status write has been answered.
        "exit_to_completed_seconds": summary(exit_acks),
        // FarAgent writes per agent from its create to Running, counted on the watch.
        "api_writes_per_agent_to_running": writes_to_running,
        "baseline_status_patches_per_second": {"1": patch_rate_1, "in_flight": in_flight, "n": patch_rate_n},
        "ceiling_agents_per_second": ceiling,
        "share_of_ceiling": running_rate / ceiling,
        // The API server's own CPU from the first create until every agent had reached Running,
        // per agent (every client's requests, the watches' too): on a machine it shares, the
        // bound its CPU sets is this machine's cores ÷ it. Only from an API server that exports
        // process_cpu_seconds_total.
        "api_server_cpu_ms_per_agent_to_running": api_cpu_to_running.map(|s| s * 1000.0),
        "api_server_cpu_bound_agents_per_second": api_cpu_to_running.map(|s| cores as f64 / s.max(1e-9)),
        "process_peak_rss_mib": rss_mib,
        // Only with --controller-binary: the controller's own process.
        "controller_peak_rss_mib": controller_usage.map(|(rss, _)| rss),
        "controller_cpu_seconds": controller_usage.map(|(_, cpu)| cpu),
        "controller_kib_per_agent": controller_usage
            .zip(controller_rss_before)
            .map(|((peak, _), before)| (peak - before) * 1024.0 / args.agents.max(1) as f64),
        "process_cpu_seconds": cpu_seconds,
        "machine": format!("{cores} cores"),
    });
    print_table(&report);
    println!("{}", serde_json::to_string_pretty(&report)?);
    if finished.len() < args.agents
        || wrong > 0
        || gone.len() < finished.len()
        || vms.duplicates > 0
        || vms.leaked > 0
    {
        if gave_up {
            // Agents still running then are not lost, nor their VMs leaked: the run was cut.
            bail!(
                "gave up after {} s with {} of {} agents finished ({} deleted, {} duplicate VMs): \
                 the unfinished ones and their VMs were still under way; give --timeout-seconds \
                 more than creating them all and --run-seconds take",
                args.timeout().as_secs(),
                finished.len(),
                args.agents,
                gone.len(),
                vms.duplicates
            );
        }
        bail!(
            "{} of {} agents finished, {wrong} with the wrong phase or exit code, {} deleted; {} duplicate and {} leaked VMs",
            finished.len(),
            args.agents,
            gone.len(),
            vms.duplicates,
            vms.leaked
        );
    }
    Ok(())
}

/// The benchmark's sim hosts (their FlintlockHosts labelled with the run) and its controller.
struct Rig {
    run_label: String,
    sims: Vec<Arc<Host<Sim>>>,
    host_names: Vec<String>,
    /// The controller's process, with --controller-binary.
    controller: Option<tokio::process::Child>,
    /// Stops the in-process controller.
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Rig {
    /// Starts `args.hosts` sim hosts with room for `vms` VMs in all, and the controller; waits
    /// a moment for the hosts to be probed Ready.
    async fn start(
        args: &BenchArgs,
        api: &ApiServer,
        state: &std::path::Path,
        vms: usize,
    ) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let channel_url = format!("http://{}", listener.local_addr()?);

        // The benchmark's agents go to its own hosts only, should the cluster have others.
        let run_label = ulid::Ulid::new().to_string().to_lowercase();
        let hosts_api: Api<FlintlockHost> = Api::all(api.client.clone());
        let mut host_names = Vec::new();
        let mut sims = Vec::new();
        let per_host = vms.div_ceil(args.hosts.max(1)) as u64;
        for i in 0..args.hosts {
            let limits = Limits {
                max_vcpu: 1,
                min_memory_mib: 64,
                max_memory_mib: 256,
            };
            let sim = Sim::new(SimConfig {
                boot_delay: Duration::from_millis(100),
                fail_starts_containing: None,
            });
            let host = Host::open(
                HostConfig {
                    limits,
                    ..HostConfig::default()
                },
                &state.join(format!("host-{i}")),
                sim,
            )
            .await?;
            sims.push(Arc::clone(&host));
            let endpoint = far_host::serve_on_loopback(host, None).await?;
            let name = format!("far-bench-{run_label}-{i}");
            let object: FlintlockHost = serde_json::from_value(json!({
                "apiVersion": "tiffany.dev/v1", "kind": "FlintlockHost",
                "metadata": {"name": name, "labels": {"far-bench/run": run_label}},
                "spec": {"endpoint": endpoint, "provider": "sim", "capacity": {"cpu": per_host + 1, "memory": format!("{}Mi", (per_host + 1) * 256)},
                         "vmLimits": {"minMemory": "64Mi", "maxMemory": "256Mi", "maxCpu": 1}}
            }))?;
            hosts_api.create(&PostParams::default(), &object).await?;
            host_names.push(name);
        }

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let controller = match &args.controller_binary {
            Some(binary) => {
                drop(listener);
                std::fs::write(state.join("channel.key"), [7u8; 32])?;
                let child = tokio::process::Command::new(binary)
                    .env("KUBECONFIG", &api.kubeconfig)
                    .env("POD_NAME", "far-agent-controller-bench")
                    .env("RUST_LOG", "error")
                    .args([
                        "--lease-namespace",
                        NAMESPACE,
                        "--metrics-listen",
                        "127.0.0.1:0",
                    ])
                    .arg("--channel-key-file")
                    .arg(state.join("channel.key"))
                    .arg("--channel-listen")
                    .arg(channel_url.trim_start_matches("http://"))
                    .arg("--channel-url")
                    .arg(&channel_url)
                    .arg("--concurrency")
                    .arg(args.concurrency.to_string())
                    .arg("--events")
                    .arg(
                        clap::ValueEnum::to_possible_value(&args.events)
                            .map(|v| v.get_name().to_owned())
                            .unwrap_or_default(),
                    )
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .with_context(|| format!("starting {}", binary.display()))?;
                Some(child)
            }
            None => {
                let channel = Channel::new(far_channel::Config::new(TokenKey::new(vec![7; 32])?));
                tokio::spawn(channel.clone().serve(listener));
                let config = ControllerConfig {
                    defaults: Defaults::local(),
                    channel_url,
                    grace_period_seconds: 5,
                    call_timeout: Duration::from_secs(10),
                    concurrency: args.concurrency,
                    events: args.events,
                    ui: Default::default(),
                };
                let reporter = Reporter {
                    controller: "far-agent-controller".into(),
                    instance: Some("bench".into()),
                };
                tokio::spawn(far_agent_controller::run::run(
                    api.client.clone(),
                    config,
                    channel,
                    reporter,
                    Arc::new(Metrics::default()),
                    async {
                        let _ = stopped.await;
                    },
                ));
                None
            }
        };
        // Let the hosts be probed Ready before the burst.
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(Self {
            run_label,
            sims,
            host_names,
            controller,
            stop,
        })
    }
}

/// Deletes the benchmark's FlintlockHosts.
async fn delete_hosts(api: &ApiServer, names: &[String]) -> Result<()> {
    let hosts: Api<FlintlockHost> = Api::all(api.client.clone());
    for name in names {
        hosts
            .delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting the FlintlockHost {name}"))?;
    }
    Ok(())
}

/// What the sim hosts did with VMs over the run.
struct VmCount {
    created: u64,
    duplicates: u64,
    leaked: u64,
}

impl VmCount {
    fn of(hosts: &[Arc<Host<Sim>>]) -> Self {
        let mut by_name: HashMap<String, u64> = HashMap::new();
        for host in hosts {
            for (name, n) in host.created() {
                *by_name.entry(name).or_default() += u64::from(n);
            }
        }
        Self {
            created: by_name.values().sum(),
            duplicates: by_name.values().map(|n| n.saturating_sub(1)).sum(),
            leaked: hosts.iter().map(|h| h.list("far", None).len() as u64).sum(),
        }
    }
}

/// Writes the API server refused between two readings of its counter, as `"<code> <resource>"`.
fn refused_writes(
    before: &BTreeMap<request_metrics::Series, u64>,
    after: &BTreeMap<request_metrics::Series, u64>,
) -> BTreeMap<String, u64> {
    let mut refused = BTreeMap::new();
    for (series, n) in after {
        let verb = request_metrics::rbac_verb(&series.verb);
        if series.code < 400 || !is_write(&verb) {
            continue;
        }
        let new = n.saturating_sub(before.get(series).copied().unwrap_or(0));
        if new > 0 {
            *refused
                .entry(format!("{} {}", series.code, series.resource))
                .or_default() += new;
        }
    }
    refused
}

fn print_table(r: &serde_json::Value) {
    let row = |label: &str, v: &serde_json::Value| {
        println!(
            "{label:<44} p50 {:>7.3}  p95 {:>7.3}  p99 {:>7.3}  max {:>7.3}",
            v["p50"].as_f64().unwrap_or(f64::NAN),
            v["p95"].as_f64().unwrap_or(f64::NAN),
            v["p99"].as_f64().unwrap_or(f64::NAN),
            v["max"].as_f64().unwrap_or(f64::NAN)
        );
    };
    println!(
        "far bench: {} agents on {} sim hosts ({})",
        r["agents"],
        r["hosts"],
        r["machine"].as_str().unwrap_or_default()
    );
    let unfinished = match r["gave_up_after_seconds"].as_u64() {
        Some(seconds) => format!("unfinished when it gave up after {seconds} s"),
        None => "lost".to_owned(),
    };
    println!(
        "{:<44} {} of {} ({} {unfinished}, {} wrong, {} not deleted)",
        "finished",
        r["finished"],
        r["agents"],
        r["lost"],
        r["wrong_exit_or_phase"],
        r["finished_but_not_deleted"]
    );
    row("create -> Running (s)", &r["create_to_running_seconds"]);
    row(
        "exit reported -> in status, acknowledged (s)",
        &r["exit_to_completed_seconds"],
    );
    row(
        "create -> Completed/Failed (s)",
        &r["create_to_finished_seconds"],
    );
    row(
        "finished -> deleted by its user, gone (s)",
        &r["finished_to_deleted_seconds"],
    );
    println!(
        "{:<44} {:.1}",
        "agents reaching Running per second",
        r["agents_per_second_reaching_running"]
            .as_f64()
            .unwrap_or(0.0)
    );
    println!(
        "{:<44} {:.2}",
        "API writes per agent, create to deletion",
        r["api_writes_per_agent"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<44} {:.2}",
        "  of which refused 409 (stale copy)",
        r["api_conflicts_per_agent"].as_f64().unwrap_or(0.0)
    );
    let refused = r["api_writes_refused"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    println!(
        "{:<44} {}",
        "API writes refused, by code",
        if refused.is_empty() { "none" } else { &refused }
    );
    let left = if r["gave_up_after_seconds"].is_u64() {
        "left on the hosts when it gave up"
    } else {
        "leaked"
    };
    println!(
        "{:<44} {} created, {} duplicate, {} {left}",
        "VMs (CreateMicroVM accepted by the hosts)",
        r["vms_created"],
        r["duplicate_vms"],
        r["leaked_vms"]
    );
    match r["steady_state"].as_object() {
        Some(s) => println!(
            "{:<44} {:.1} ({} writes in {:.1} s with every agent running: {})",
            "steady state: API writes per second",
            s["api_writes_per_second"].as_f64().unwrap_or(0.0),
            s["api_writes"],
            s["seconds"].as_f64().unwrap_or(0.0),
            s["api_writes_by_kind"]
                .as_object()
                .map(|m| m
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        ),
        None => println!(
            "{:<44} not measured (agents never all ran together for 5 s: raise --run-seconds)",
            "steady state: API writes per second"
        ),
    }
    if let Some(map) = r["api_requests_per_agent"].as_object() {
        for (k, v) in map {
            println!("  {k:<42} {:.2}", v.as_f64().unwrap_or(0.0));
        }
    }
    let baseline = &r["baseline_status_patches_per_second"];
    println!(
        "{:<44} {:.0} with 1 in flight, {:.0} with {}",
        "baseline: FarAgent status patches per second",
        baseline["1"].as_f64().unwrap_or(0.0),
        baseline["n"].as_f64().unwrap_or(0.0),
        baseline["in_flight"]
    );
    println!(
        "{:<44} {:.2}",
        "API writes per agent, create to Running",
        r["api_writes_per_agent_to_running"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<44} {:.1} agents/s (baseline ÷ writes to Running); measured {:.1}: {:.2} of it",
        "ceiling the API server allows",
        r["ceiling_agents_per_second"].as_f64().unwrap_or(0.0),
        r["agents_per_second_reaching_running"]
            .as_f64()
            .unwrap_or(0.0),
        r["share_of_ceiling"].as_f64().unwrap_or(0.0)
    );
    if let Some(cpu_ms) = r["api_server_cpu_ms_per_agent_to_running"].as_f64() {
        println!(
            "{:<44} {cpu_ms:.1} ms per agent to Running: at most {:.1} agents/s on {}",
            "API server CPU",
            r["api_server_cpu_bound_agents_per_second"]
                .as_f64()
                .unwrap_or(0.0),
            r["machine"].as_str().unwrap_or_default()
        );
    }
    if let Some(rss) = r["controller_peak_rss_mib"].as_f64() {
        println!(
            "{:<44} {:.1} MiB, {:.1} CPU s",
            "controller process peak RSS, CPU",
            rss,
            r["controller_cpu_seconds"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(kib) = r["controller_kib_per_agent"].as_f64() {
        println!(
            "{:<44} {kib:.1} KiB (peak RSS less RSS before the first create, over the agents)",
            "controller memory per agent",
        );
    }
    println!(
        "{:<44} {:.1} MiB, {:.1} CPU s",
        "process peak RSS, CPU (all components)",
        r["process_peak_rss_mib"].as_f64().unwrap_or(0.0),
        r["process_cpu_seconds"].as_f64().unwrap_or(0.0)
    );
}
