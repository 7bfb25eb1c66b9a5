//! The shell around [`crate::decision`]: observe (the API server's cache, Flintlock, the status
//! channel), decide, act (Flintlock calls, finalizer and status patches, Events).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use far_agent_protocol::{
    ChannelConfig, Claim, EnvVar, RUN_CONFIG_KEY, RunGrant, SecretFile, Secrets, channel_id,
};
use far_api::workload::{ResolvedWorkload, Template};
use far_api::{
    AgentReason, FINALIZER, FarAgent, FarAgentPool, FarAgentStatus, FlintlockHost, GuestUsage,
    host_condition,
};
use far_vmspec::{Defaults, VmName, VmPlan, plan};
use flintlock_proto::far_host::EndedGuest;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::cache::CachedAgent;
use crate::decision::{self, Action, Guest, Observation, Vm, VmState};
use crate::flintlock::{Credentials, FlintlockError, Pool};
use crate::placement::{Held, HostView, bound, held, place};

/// What the controller decides for every agent.
#[derive(Clone, Debug)]
pub struct Config {
    /// Kernel, initrd and Flintlock namespace for VMs.
    pub defaults: Defaults,
    /// The status channel's URL as guests reach it.
    pub channel_url: String,
    /// Seconds the agent gets between SIGTERM and SIGKILL.
    pub grace_period_seconds: u32,
    /// Deadline of each Flintlock call.
    pub call_timeout: Duration,
    /// How many agents are reconciled at once. Each reconcile in flight holds its future, an
    /// API server connection and a Flintlock call: unbounded, a burst of 10,000 agents held
    /// thousands of each (see docs/benchmarks.md).
    pub concurrency: u16,
    /// Which Events are recorded.
    pub events: EventPolicy,
    /// Where the web UI ([`crate::ui`]) finds the running controller's caches.
    pub ui: crate::ui::Live,
}

/// Which Kubernetes Events the controller records. Each Event is an API write: a healthy
/// agent's life is 5 writes of status and finalizer, and 4 more with every step as an Event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EventPolicy {
    /// Every lifecycle step: Scheduled, VMCreated, Started, Completed, Failed, Deleted and the
    /// warnings.
    All,
    /// Only Warnings (Failed, HostUnreachable, ...): the steps stay visible as conditions, each
    /// with its time and message. The default: a healthy life is then 5 writes in all.
    #[default]
    Warnings,
}

/// The default for [`Config::concurrency`]: enough to keep a Flintlock host and the API server
/// busy (a reconcile mostly waits on one of them), few enough that a burst costs little memory.
pub const DEFAULT_CONCURRENCY: u16 = 64;

/// Everything a reconcile needs.
pub struct Context {
    /// The Kubernetes client.
    pub client: kube::Client,
    /// Settings.
    pub config: Config,
    /// The status channel.
    pub channel: far_channel::Channel,
    /// FlintlockHosts, from a reflector.
    pub hosts: Store<FlintlockHost>,
    /// FarAgents, from the controller's reflector.
    pub agents: Store<CachedAgent>,
    /// FarAgentPools, from a reflector: the templates agents with a poolRef run on.
    pub pools: Store<FarAgentPool>,
    /// Flintlock clients.
    pub flintlock: Pool,
    /// Hosts that stopped answering, and since when.
    pub unreachable: Mutex<HashMap<String, Timestamp>>,
    /// Credentials of hosts, read from their Secrets.
    pub credentials: Mutex<HashMap<String, Credentials>>,
    /// Who writes Events.
    pub reporter: Reporter,
    /// Set once the FarAgent cache has been filled.
    pub agents_ready: std::sync::atomic::AtomicBool,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// What far-host hosts said at their last probe of VMs that ended, by host and VM uid.
    pub ended: Mutex<HashMap<String, HashMap<String, EndedGuest>>>,
    /// Reconciles asked for from outside the watches (a guest seen to have ended).
    pub kick: tokio::sync::mpsc::UnboundedSender<ObjectRef<CachedAgent>>,
    /// Versions of agents that the controller's own writes replaced.
    pub superseded: Arc<Superseded>,
    /// Hosts that refused to create an attempt's VM, by attempt.
    pub refusals: Refusals,
    /// Attempts this process bound and has not yet asked any host to create (by channel id):
    /// one whose host stops answering can be placed elsewhere, since no VM of it can exist.
    pub unsent: Mutex<std::collections::HashSet<String>>,
    /// Reconciles failed in a row, by agent UID.
    pub failures: Mutex<HashMap<String, u32>>,
    /// The pools' VMs, and which agents hold them.
    pub pool_vms: crate::pools::PoolVms,
    /// When this controller started to hear its guests (its status channel is new with it).
    pub listening_since: Timestamp,
}

/// How long a host's refusal to create an attempt's VM keeps the attempt off that host. Then
/// the host may be tried again (its configuration may have been fixed): one refused create per
/// attempt and host a minute at most.
pub const REFUSAL_HOLD: Duration = Duration::from_secs(60);

/// When an agent refused as stale (409) is looked at again if no newer copy arrived.
pub const STALE_RECHECK: Duration = Duration::from_secs(10);

/// After this many failed reconciles in a row, the failure is told on the agent (a Warning
/// Event), not only in the controller's log.
pub const FAILURES_TOLD: u32 = 3;

/// The hosts that refused each attempt's VM, and what they said. Kept in memory only: after a
/// restart a refusing host is simply asked again.
#[derive(Debug, Default)]
pub struct Refusals(Mutex<HashMap<String, RefusedBy>>);

/// Host -> what it said and when.
type RefusedBy = BTreeMap<String, (String, Timestamp)>;

impl Refusals {
    /// `host` refused the VM of attempt `id` (a channel id: agent UID and attempt).
    pub fn note(&self, id: &str, host: &str, said: String) {
        self.lock()
            .entry(id.to_owned())
            .or_default()
            .insert(host.to_owned(), (said, now()));
    }

    /// The hosts that refused attempt `id` within [`REFUSAL_HOLD`], and what they said.
    pub fn of(&self, id: &str) -> BTreeMap<String, String> {
        let mut all = self.lock();
        let Some(hosts) = all.get_mut(id) else {
            return BTreeMap::new();
        };
        let hold = k8s_openapi::jiff::SignedDuration::try_from(REFUSAL_HOLD).unwrap_or_default();
        hosts.retain(|_, (_, at)| now().duration_since(*at) < hold);
        let current = hosts
            .iter()
            .map(|(host, (said, _))| (host.clone(), said.clone()))
            .collect();
        if hosts.is_empty() {
            all.remove(id);
        }
        current
    }

    /// The agent is gone.
    pub fn forget(&self, uid: &str) {
        let prefix = format!("{uid}.");
        self.lock().retain(|id, _| !id.starts_with(&prefix));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RefusedBy>> {
        lock(&self.0)
    }
}

/// The resourceVersions of each agent that the controller's own writes have replaced. A
/// reconcile of a cached copy still at one of them would decide on the past and be refused
/// (409, a wasted write): it waits instead for the watch to bring the copy the write made.
/// Versions are only compared for equality, as the API conventions require.
#[derive(Debug, Default)]
pub struct Superseded(Mutex<HashMap<String, std::collections::HashSet<String>>>);

impl Superseded {
    /// The agent `uid` at version `before` was just written over.
    pub fn wrote(&self, uid: &str, before: Option<String>) {
        if let Some(before) = before {
            self.lock()
                .entry(uid.to_owned())
                .or_default()
                .insert(before);
        }
    }

    /// Whether `version` of agent `uid` is one the controller's writes replaced. A version
    /// not among them means the cache has caught up, and the record is dropped.
    pub fn is_stale(&self, uid: &str, version: Option<&str>) -> bool {
        let mut superseded = self.lock();
        match (superseded.get(uid), version) {
            (Some(old), Some(version)) if old.contains(version) => true,
            (Some(_), _) => {
                superseded.remove(uid);
                false
            }
            (None, _) => false,
        }
    }

    /// The agent is gone.
    pub fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, std::collections::HashSet<String>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Context {
    /// What the host's last probe said of this VM, if it ended.
    pub fn ended_guest(&self, host: &str, vm_uid: &str) -> Option<EndedGuest> {
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
            .and_then(|vms| vms.get(vm_uid))
            .cloned()
    }

    /// Whether the FarAgent cache holds every agent (so absence means none).
    pub fn agents_ready(&self) -> bool {
        self.agents_ready.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the FarAgentPool cache has been filled.
    pub fn pools_ready(&self) -> bool {
        use futures::FutureExt as _;
        self.pools.wait_until_ready().now_or_never().is_some()
    }

    /// The cached FarAgent whose run has channel id `id`: by the name the channel keeps of the
    /// run, else looked for in the cache (a run this process has not reconciled yet).
    pub fn agent_by_run(&self, id: &str) -> Option<Arc<CachedAgent>> {
        let uid = run_owner(id);
        self.agent_named(id)
            .and_then(|r| self.agents.get(&r))
            .filter(|a| a.metadata.uid.as_deref() == Some(uid))
            .or_else(|| {
                self.agents
                    .state()
                    .into_iter()
                    .find(|a| a.metadata.uid.as_deref() == Some(uid))
            })
    }

    /// The reference of the FarAgent whose run has channel id `id`, if the channel has it named.
    pub fn agent_named(&self, id: &str) -> Option<ObjectRef<CachedAgent>> {
        let (namespace, name) = self.channel.named(id)?;
        Some(ObjectRef::new(&name).within(&namespace))
    }

    /// What every host holds: its agents' VMs, and the pools' VMs no agent holds.
    pub fn held(&self) -> HashMap<String, Held> {
        let agents = self.agents.state();
        let mut by_host = held(agents.iter().map(AsRef::as_ref));
        for (host, pool) in self.pool_vms.held_by_host() {
            let h = by_host.entry(host).or_default();
            h.cpu += pool.cpu;
            h.memory_mib += pool.memory_mib;
        }
        by_host
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Why a reconcile failed; each variant has a closed-set metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a call.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// A Flintlock call failed.
    #[error(transparent)]
    Flintlock(#[from] FlintlockError),
    /// The VM could not be planned.
    #[error("planning the VM: {0}")]
    Plan(#[from] far_vmspec::PlanError),
    /// The agent's host is not (or no longer) a FlintlockHost.
    #[error("host {0} is not a FlintlockHost")]
    NoHost(String),
    /// The decision was made on a stale copy of the agent; it is made again on a fresh one.
    #[error("the agent changed since it was read")]
    Stale,
    /// A cache the decision needs (FarAgentPools) is not filled yet, just after start.
    #[error("the FarAgentPool cache is not filled yet")]
    CachesNotReady,
    /// The cached copy of the agent does not decode ([`CachedAgent::agent`]).
    #[error("the cached copy of the agent does not decode: {0}")]
    Cached(serde_json::Error),
}

/// A 409 on a fenced write means our copy was stale.
fn stale(error: kube::Error) -> Error {
    match error {
        kube::Error::Api(status) if status.code == 409 => Error::Stale,
        other => Error::Kube(other),
    }
}

impl Error {
    /// Whether the reconcile failed, rather than waits on something on its way (a newer copy
    /// of the agent, a cache being filled): only failures are counted and told on the agent.
    pub fn is_failure(&self) -> bool {
        !matches!(self, Error::Stale | Error::CachesNotReady)
    }

    /// The label for metrics: a closed set, never object names.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Flintlock(_) => "flintlock",
            Error::Plan(_) => "plan",
            Error::NoHost(_) => "no_host",
            Error::Stale => "stale",
            Error::CachesNotReady => "caches_not_ready",
            Error::Cached(_) => "cached",
        }
    }
}

fn now() -> Timestamp {
    Timestamp::now()
}

/// A lock on state that stays usable if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A Secret's key, if both exist.
async fn secret_value(
    ctx: &Context,
    namespace: Option<&str>,
    name: &str,
    key: &str,
) -> Result<Option<Vec<u8>>, Error> {
    let namespace =
        namespace.map_or_else(|| ctx.client.default_namespace().to_owned(), str::to_owned);
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(name)
        .await?;
    Ok(secret
        .and_then(|s| s.data)
        .and_then(|mut d| d.remove(key))
        .map(|b| b.0))
}

/// The host's credentials, read from its Secrets (cached; read again when the host's object
/// changes).
pub async fn host_credentials(ctx: &Context, host: &FlintlockHost) -> Result<Credentials, Error> {
    let cache_key = format!(
        "{}@{}",
        host.name_any(),
        host.resource_version().unwrap_or_default()
    );
    if let Some(credentials) = ctx
        .credentials
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&cache_key)
    {
        return Ok(credentials.clone());
    }
    let mut credentials = Credentials::default();
    if let Some(r) = &host.spec.token_secret_ref {
        credentials.token = secret_value(ctx, r.namespace.as_deref(), &r.name, &r.key)
            .await?
            .map(|b| String::from_utf8_lossy(&b).trim().to_owned());
    }
    if let Some(r) = &host.spec.tls_secret_ref {
        credentials.ca = secret_value(ctx, r.namespace.as_deref(), &r.name, "ca.crt").await?;
        let cert = secret_value(ctx, r.namespace.as_deref(), &r.name, "tls.crt").await?;
        let key = secret_value(ctx, r.namespace.as_deref(), &r.name, "tls.key").await?;
        credentials.identity = cert.zip(key);
    }
    ctx.credentials
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(cache_key, credentials.clone());
    Ok(credentials)
}

fn host_object(ctx: &Context, name: &str) -> Option<Arc<FlintlockHost>> {
    ctx.hosts.get(&ObjectRef::new(name))
}

/// Notes a host's reachability and returns since when it has been unreachable.
fn mark(ctx: &Context, host: &str, reachable: bool) -> Option<Timestamp> {
    let mut unreachable = ctx.unreachable.lock().unwrap_or_else(|e| e.into_inner());
    if reachable {
        unreachable.remove(host);
        None
    } else {
        Some(*unreachable.entry(host.to_owned()).or_insert_with(now))
    }
}

fn vm_state(vm: &flintlock_proto::types::MicroVm) -> VmState {
    crate::flintlock::vm_state(vm.status.as_ref().map(|s| s.state))
}

/// The channel id of the agent's current run, its UID and attempt: a claimed VM's task
/// reports there too (the claim hands it the run's token), apart from the VM's own id.
pub fn run_id(metadata: &ObjectMeta, status: Option<&FarAgentStatus>) -> String {
    channel_id(
        metadata.uid.as_deref().unwrap_or_default(),
        status.map_or(0, |s| s.restart_count),
    )
}

/// The UID of the agent whose run has channel id `id` (its first part, [`channel_id`]).
pub fn run_owner(id: &str) -> &str {
    far_agent_protocol::parse_channel_id(id).map_or(id, |(uid, _)| uid)
}

fn vm_uid(vm: &flintlock_proto::types::MicroVm) -> Option<String> {
    vm.spec.as_ref().and_then(|s| s.uid.clone())
}

/// Asks the agent's host about its current VM: by uid when recorded, else by name (the idle VM
/// it claimed, or one created by a reconcile whose status write was lost).
async fn observe_vm(
    ctx: &Context,
    agent: &FarAgent,
    status: &FarAgentStatus,
    host_name: &str,
    claimed: Option<&str>,
) -> Result<Vm, Error> {
    let Some(host) = host_object(ctx, host_name) else {
        return Ok(Vm::Unknown {
            since: mark(ctx, host_name, false).unwrap_or_else(now),
        });
    };
    if let Some(vm) = claimed.and_then(VmName::parse) {
        // Who holds which VM is known once the agents' bindings have been read after a start.
        if !ctx.pool_vms.holders_known() {
            return Err(Error::CachesNotReady);
        }
        if ctx.pool_vms.holder(&vm.channel_id()).as_deref() != agent.uid().as_deref() {
            // Given back to its pool (or gone): no longer this agent's to look after.
            return Ok(Vm::Absent);
        }
    }
    let credentials = host_credentials(ctx, &host).await?;
    let result = match &status.vm_uid {
        Some(uid) => ctx
            .flintlock
            .get(&host, &credentials, uid)
            .await
            .map(|vm| vm.map(|v| (uid.clone(), v))),
        None => {
            let name = match claimed {
                Some(claimed) => claimed.to_owned(),
                None => VmName::for_agent(agent, status.restart_count)
                    .map_err(far_vmspec::PlanError::from)?
                    .id()
                    .to_owned(),
            };
            ctx.flintlock
                .list(
                    &host,
                    &credentials,
                    &ctx.config.defaults.namespace,
                    Some(&name),
                )
                .await
                // The oldest, should there be several: the one the host probe keeps.
                .map(|vms| {
                    vms.into_iter()
                        .filter_map(|vm| vm_uid(&vm).map(|u| (u, vm)))
                        .min_by(|a, b| a.0.cmp(&b.0))
                })
        }
    };
    match result {
        Ok(found) => {
            mark(ctx, host_name, true);
            Ok(match found {
                Some((uid, vm)) => {
                    let mut ended = ctx.ended_guest(host_name, &uid);
                    // A FAILED VM's reason is asked for at once rather than at the next probe.
                    if ended.is_none() && vm_state(&vm) == VmState::Failed {
                        crate::hosts::note_ended(ctx, &host, &credentials).await;
                        ended = ctx.ended_guest(host_name, &uid);
                    }
                    Vm::Present {
                        state: vm_state(&vm),
                        stopped: ended.as_ref().is_some_and(|g| g.stopped),
                        failure: ended.and_then(|g| g.failure),
                        uid,
                    }
                }
                None => Vm::Absent,
            })
        }
        Err(e) if e.unreachable() => {
            warn!(host = host_name, error = %e, "host unreachable");
            Ok(Vm::Unknown {
                since: mark(ctx, host_name, false).unwrap_or_else(now),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// What placement needs of every host.
pub fn host_views(ctx: &Context) -> Vec<HostView> {
    let unreachable = lock(&ctx.unreachable).clone();
    ctx.hosts
        .state()
        .iter()
        .map(|h| HostView {
            name: h.name_any(),
            labels: h.labels().clone(),
            // Ready at its last probe, and not seen unreachable since.
            ready: h
                .status
                .as_ref()
                .is_some_and(|s| crate::conditions::is_true(&s.conditions, host_condition::READY))
                && !unreachable.contains_key(&h.name_any()),
            unschedulable: h.spec.unschedulable,
            cpu: u64::from(h.spec.capacity.cpu),
            memory_mib: far_api::quantity::Memory::parse(&h.spec.capacity.memory)
                .map_or(0, |m| m.mib_ceil()),
            limits: h.spec.vm_limits.clone(),
        })
        .collect()
}

/// What the agent runs and in what VM: its spec over its pool's template (`Ok(Err)` gives the
/// reason and message when that cannot be decided). `Err` while the pool cache is not yet
/// filled, so a pool is never called missing for having not been read yet.
fn workload(
    ctx: &Context,
    agent: &FarAgent,
) -> Result<Result<ResolvedWorkload, (AgentReason, String)>, Error> {
    let pool = match &agent.spec.pool_ref {
        None => None,
        Some(r) => {
            let namespace = agent.namespace().unwrap_or_default();
            match ctx.pools.get(&ObjectRef::new(&r.name).within(&namespace)) {
                Some(pool) => Some(pool),
                None if !ctx.pools_ready() => return Err(Error::CachesNotReady),
                None => {
                    return Ok(Err((
                        AgentReason::PoolNotFound,
                        format!(
                            "spec.poolRef: no FarAgentPool {:?} in namespace {namespace:?}: create it, or correct spec.poolRef.name",
                            r.name
                        ),
                    )));
                }
            }
        }
    };
    let template = pool.as_ref().map(|p| Template {
        pool: p.metadata.name.as_deref().unwrap_or_default(),
        workload: &p.spec.template,
    });
    Ok(far_api::workload::resolve(&agent.spec.workload, template)
        .map_err(|e| (AgentReason::InvalidSpec, e.to_string())))
}

/// The FarAgentPool an agent names, if it exists.
fn pool_of(ctx: &Context, agent: &FarAgent) -> Option<Arc<FarAgentPool>> {
    let name = &agent.spec.pool_ref.as_ref()?.name;
    ctx.pools
        .get(&ObjectRef::new(name).within(&agent.namespace().unwrap_or_default()))
}

/// Counts a claim on the pool with UID `pool`, warm (an idle VM) or cold (a VM booted for it).
fn count_claim(ctx: &Context, pool: &str, warm: bool) {
    let outcome = if warm { "warm" } else { "cold" };
    ctx.metrics
        .pool_claims
        .get_or_create(&crate::metrics::ClaimLabels { outcome })
        .inc();
    ctx.pool_vms.count_claim(pool, warm);
}

/// What a claimed VM is offered: the attempt's task, its secret values and the run's place on
/// the channel (none while the workload or its configuration is not resolved).
fn claim(
    ctx: &Context,
    agent: &FarAgent,
    workload: Option<&ResolvedWorkload>,
    resolved: Option<&Result<(Vec<EnvVar>, Secrets), String>>,
    attempt: u32,
) -> Result<Option<Claim>, Error> {
    let (Some(workload), Some(Ok((env, secrets)))) = (workload, resolved) else {
        return Ok(None);
    };
    let task = far_vmspec::task(agent, workload, attempt, env.clone(), !secrets.is_empty())
        .map_err(far_vmspec::PlanError::from)?;
    let id = run_id(&agent.metadata, agent.status.as_ref());
    Ok(Some(Claim {
        task,
        secrets: secrets.clone(),
        run: RunGrant {
            token: ctx.channel.token_for(&id),
            id,
        },
    }))
}

/// An idle VM of a pool that a reconcile reserved for its agent.
struct Reservation {
    agent: String,
    pool: String,
    name: String,
    vm: crate::pools::PoolVm,
}

impl Reservation {
    fn placement(&self) -> decision::Placement {
        decision::Placement::Fits {
            host: self.vm.host.clone(),
            vm: self.vm.size,
            message: format!(
                "claimed idle VM {} of pool {} on host {}",
                self.name, self.pool, self.vm.host
            ),
            bound: false,
            claimed: Some(self.name.clone()),
        }
    }

    /// The binding naming the VM was not written: another agent may have it.
    fn release(&self, ctx: &Context) {
        ctx.pool_vms.release(&self.vm.channel_id, &self.agent);
    }
}

/// Reserves an idle VM of the agent's pool on a host that takes VMs, if one waits for a claim.
/// `Err` until the agents' claims have been read after a start.
fn reserve(
    ctx: &Context,
    agent: &FarAgent,
    hosts: &[HostView],
) -> Result<Option<Reservation>, Error> {
    let (Some(pool), Some(uid)) = (pool_of(ctx, agent), agent.uid()) else {
        return Ok(None);
    };
    if !ctx.pool_vms.holders_known() {
        return Err(Error::CachesNotReady);
    }
    let usable = |host: &str| {
        hosts
            .iter()
            .any(|h| h.name == host && h.ready && !h.unschedulable)
    };
    let idle = |id: &str| ctx.channel.view(id).is_some_and(|v| v.idle);
    let pool_uid = pool.uid().unwrap_or_default();
    Ok(ctx
        .pool_vms
        .reserve(&pool_uid, &uid, usable, idle)
        .map(|(name, vm)| Reservation {
            agent: uid,
            pool: pool.name_any(),
            name,
            vm,
        }))
}

/// What the guest of one attempt reads from the metadata service: its run configuration.
fn guest_metadata(
    ctx: &Context,
    agent: &FarAgent,
    workload: &ResolvedWorkload,
    attempt: u32,
    env: Vec<EnvVar>,
    has_secrets: bool,
) -> Result<BTreeMap<String, Vec<u8>>, Error> {
    let id = channel_id(&agent.uid().unwrap_or_default(), attempt);
    let channel = ChannelConfig {
        url: ctx.config.channel_url.clone(),
        enrolment_token: ctx.channel.enrolment_token_for(&id),
        id,
    };
    let task = far_vmspec::task(agent, workload, attempt, env, has_secrets)
        .map_err(far_vmspec::PlanError::from)?;
    let run = far_vmspec::run_config(
        Some(task),
        workload,
        channel,
        ctx.config.grace_period_seconds,
    );
    Ok(BTreeMap::from([(
        RUN_CONFIG_KEY.to_owned(),
        run.to_bytes(),
    )]))
}

/// The agent's environment and secret values, resolved from Secrets and ConfigMaps as a Pod's
/// would be. `Err` names the first missing Secret, ConfigMap or key.
async fn resolve(
    ctx: &Context,
    agent: &FarAgent,
    workload: &ResolvedWorkload,
) -> Result<Result<(Vec<EnvVar>, Secrets), String>, Error> {
    let namespace = agent.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut env = Vec::new();
    let mut secret_values = Secrets::default();
    for var in &workload.env {
        let Some(from) = &var.value_from else {
            env.push(EnvVar {
                name: var.name.clone(),
                value: var.value.clone().unwrap_or_default(),
            });
            continue;
        };
        if let Some(r) = &from.secret_key_ref {
            let value = secrets
                .get_opt(&r.name)
                .await?
                .and_then(|s| s.data)
                .and_then(|d| {
                    d.get(&r.key)
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                });
            match value {
                Some(value) => secret_values.env.push(EnvVar {
                    name: var.name.clone(),
                    value,
                }),
                None if r.optional => {}
                None => {
                    return Ok(Err(format!(
                        "spec.env {}: key {:?} of Secret {:?} not found",
                        var.name, r.key, r.name
                    )));
                }
            }
        } else if let Some(r) = &from.config_map_key_ref {
            let value = config_maps
                .get_opt(&r.name)
                .await?
                .and_then(|c| c.data)
                .and_then(|d| d.get(&r.key).cloned());
            match value {
                Some(value) => env.push(EnvVar {
                    name: var.name.clone(),
                    value,
                }),
                None if r.optional => {}
                None => {
                    return Ok(Err(format!(
                        "spec.env {}: key {:?} of ConfigMap {:?} not found",
                        var.name, r.key, r.name
                    )));
                }
            }
        }
    }
    for (i, file) in workload.secret_files.iter().enumerate() {
        let Some(data) = secrets
            .get_opt(&file.secret_name)
            .await?
            .and_then(|s| s.data)
        else {
            return Ok(Err(format!(
                "spec.secretFiles[{i}]: Secret {:?} not found",
                file.secret_name
            )));
        };
        let items: Vec<(String, String)> = if file.items.is_empty() {
            data.keys().map(|k| (k.clone(), k.clone())).collect()
        } else {
            file.items
                .iter()
                .map(|i| (i.key.clone(), i.path.clone()))
                .collect()
        };
        for (key, path) in items {
            let Some(bytes) = data.get(&key) else {
                return Ok(Err(format!(
                    "spec.secretFiles[{i}]: key {key:?} of Secret {:?} not found",
                    file.secret_name
                )));
            };
            secret_values.files.push(SecretFile {
                path: format!("{}/{path}", file.mount_path),
                content: base64::engine::general_purpose::STANDARD.encode(&bytes.0),
            });
        }
    }
    Ok(Ok((env, secret_values)))
}

/// A merge patch turning `old` status into `new`: fields `new` no longer has are nulled.
/// Fenced by the resourceVersion the decision was made from (a decision made on a stale copy is
/// refused, 409, instead of written), or unconditional with `None`: then the body carries no
/// `metadata` at all, since kube-apiserver refuses a null resourceVersion on a custom resource
/// (422) rather than writing unconditionally.
fn status_patch(
    old: &FarAgentStatus,
    new: &FarAgentStatus,
    resource_version: Option<&str>,
) -> Value {
    let old = serde_json::to_value(old).unwrap_or_default();
    let mut new = serde_json::to_value(new).unwrap_or_default();
    if let (Some(old), Some(new)) = (old.as_object(), new.as_object_mut()) {
        for key in old.keys() {
            new.entry(key.clone()).or_insert(Value::Null);
        }
    }
    fenced(json!({ "status": new }), resource_version)
}

/// `patch` made conditional on the object still being at `resource_version` (when there is
/// one; never a null, which kube-apiserver refuses).
fn fenced(mut patch: Value, resource_version: Option<&str>) -> Value {
    if let Some(version) = resource_version {
        patch["metadata"]["resourceVersion"] = json!(version);
    }
    patch
}

/// Records an Event on the agent (Normal ones only with `--events all`).
pub(crate) async fn publish(
    ctx: &Context,
    agent: &FarAgent,
    warning: bool,
    reason: &str,
    note: String,
) {
    publish_on(ctx, agent, warning, reason, note).await;
}

/// Records an Event on an agent or a pool (Normal ones only with `--events all`).
pub(crate) async fn publish_on<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    object: &K,
    warning: bool,
    reason: &str,
    note: String,
) {
    if !warning && ctx.config.events == EventPolicy::Warnings {
        return;
    }
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let event = KubeEvent {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &object.object_ref(&())).await {
        warn!(object = %object.name_any(), error = %e, "event not recorded");
    }
}

/// Reconciles one FarAgent.
///
/// # Errors
/// [`Error`] when the API server or a Flintlock host fails a call; the agent is retried.
pub async fn reconcile(cached: Arc<CachedAgent>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let started = tokio::time::Instant::now();
    ctx.metrics.reconciles.inc();
    let result = match cached.agent() {
        Ok(agent) => reconcile_inner(&Arc::new(agent), &ctx).await,
        Err(e) => Err(Error::Cached(e)),
    };
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    tell_failures(&ctx, cached.as_ref(), &result).await;
    result
}

/// A failure that persists is told on the agent (a Warning Event), not only in the log: users
/// see a status write the API server keeps refusing, or a host that keeps failing, with
/// `kubectl describe`. Once per streak of failures.
async fn tell_failures(ctx: &Context, agent: &CachedAgent, result: &Result<Requeue, Error>) {
    let Some(uid) = agent.uid() else {
        return;
    };
    let error = match result {
        Err(error) if error.is_failure() => error,
        _ => {
            lock(&ctx.failures).remove(&uid);
            return;
        }
    };
    let streak = {
        let mut failures = lock(&ctx.failures);
        let streak = failures.entry(uid).or_default();
        *streak += 1;
        *streak
    };
    if streak == FAILURES_TOLD {
        publish_on(
            ctx,
            agent,
            true,
            "ReconcileFailed",
            format!("{error} ({streak} times in a row; retrying)"),
        )
        .await;
    }
}

/// How a pass of a reconcile ended.
enum Pass {
    /// Done until the next event or the requeue.
    Done(Requeue),
    /// The agent was written and the decision wants it back at once: the write's
    /// answer is the agent as the API server now has it, decided on again in the same reconcile
    /// (rather than waiting for the watch to bring it, and reading it again before a create).
    Again(Box<FarAgent>),
}

async fn reconcile_inner(agent: &Arc<FarAgent>, ctx: &Arc<Context>) -> Result<Requeue, Error> {
    match reconcile_pass(Arc::clone(agent), ctx, false).await? {
        Pass::Done(requeue) => Ok(requeue),
        // A second pass wanting the agent back at once is not expected; should one, the watch
        // event of its write brings the agent back.
        Pass::Again(written) => match reconcile_pass(Arc::from(written), ctx, true).await? {
            Pass::Done(requeue) => Ok(requeue),
            Pass::Again(_) => Ok(Requeue::await_change()),
        },
    }
}

/// One observe-decide-act pass. `confirmed`: the copy of the agent is the API server's answer
/// to a write of this reconcile, so it had no newer one an instant ago.
async fn reconcile_pass(
    agent: Arc<FarAgent>,
    ctx: &Arc<Context>,
    mut confirmed: bool,
) -> Result<Pass, Error> {
    let ctx = Arc::clone(ctx);
    let namespace = agent.namespace().unwrap_or_default();
    let name = agent.name_any();
    let uid = agent.uid().unwrap_or_default();
    // (A confirmed copy is current; checking it would also forget the versions it replaced,
    // which the watch has yet to bring.)
    if !confirmed
        && ctx
            .superseded
            .is_stale(&uid, agent.metadata.resource_version.as_deref())
    {
        // Our own write replaced this copy; its watch event reconciles the agent again.
        return Ok(Pass::Done(Requeue::await_change()));
    }
    let api: Api<FarAgent> = Api::namespaced(ctx.client.clone(), &namespace);
    let status = agent.status.clone().unwrap_or_default();
    let terminal = status.phase.is_some_and(far_api::Phase::is_terminal);
    let deleting_since = agent.metadata.deletion_timestamp.as_ref().map(|t| t.0);

    let id = run_id(&agent.metadata, agent.status.as_ref());
    if deleting_since.is_some() && !agent.finalizers().iter().any(|f| f == FINALIZER) {
        ctx.pool_vms.forget_agent(&uid);
    }
    // Where this attempt went: its status, else its binding (unless that host has since refused
    // the VM: it was asked for the VM by name then, and had none).
    let refused = ctx.refusals.of(&id);
    let mut binding = agent.binding().filter(|b| !refused.contains_key(&b.host));
    let claimed = binding.as_ref().and_then(|b| b.claimed.clone());
    let mut vm = match status.host.as_ref().or(binding.as_ref().map(|b| &b.host)) {
        Some(host) if status.vm_uid.is_some() || !terminal => {
            Some(observe_vm(&ctx, &agent, &status, host, claimed.as_deref()).await?)
        }
        _ => None,
    };
    if status.host.is_none()
        && matches!(vm, Some(Vm::Unknown { .. }))
        && lock(&ctx.unsent).contains(&id)
    {
        // Bound to a host that stopped answering before any VM was asked of it: placed again.
        binding = None;
        vm = None;
    }
    ctx.channel.name(&namespace, &name, &id);
    if status.phase == Some(far_api::Phase::Running) {
        // This run has reported in, so it enrolled, perhaps with a controller since restarted:
        // its enrolment token (in the host's records) stays spent.
        ctx.channel.close_enrolment(&id);
    }
    let view = ctx.channel.view(&id);
    let guest = Guest {
        last_heartbeat: view
            .as_ref()
            .and_then(|v| v.since_heartbeat)
            .map(|ago| now() - ago),
        usage: view
            .as_ref()
            .and_then(|v| v.heartbeat)
            .map(|h| guest_usage(&h)),
        // The channel's memory, or what it made durable before acknowledging the guest (a
        // controller restarted since then only has the latter).
        exit: view
            .and_then(|v| v.exit)
            .map(|e| (e.code, e.start_error))
            .or_else(|| {
                let recorded = !terminal && status.reason != Some(far_api::AgentReason::BackOff);
                status
                    .exit_code
                    .filter(|_| recorded)
                    .map(|code| (code, None))
            }),
    };
    // A claimed VM is offered the task (and so its env and secrets) until the task reports in.
    let offering = claimed.is_some() && guest.last_heartbeat.is_none() && guest.exit.is_none();
    let needs_config =
        (status.vm_uid.is_none() || offering) && !terminal && deleting_since.is_none();
    let workload = if needs_config {
        Some(workload(&ctx, &agent)?)
    } else {
        None
    };
    let decided = workload.as_ref().and_then(|w| w.as_ref().ok());
    // An idle VM of the agent's pool, reserved for it by this pass until its binding is written.
    let mut reservation = None;
    let placement = match decided.filter(|_| status.host.is_none()) {
        None => None,
        Some(workload) => {
            let hosts = host_views(&ctx);
            Some(match &binding {
                Some(binding) => bound(workload, binding, &hosts),
                None => match reserve(&ctx, &agent, &hosts)? {
                    Some(reserved) => {
                        let placement = reserved.placement();
                        reservation = Some(reserved);
                        placement
                    }
                    None => place(workload, &hosts, &ctx.held(), &refused),
                },
            })
        }
    };
    let resolved = match decided {
        Some(workload) => Some(resolve(&ctx, &agent, workload).await?),
        None => None,
    };
    let config = match (&resolved, decided) {
        (Some(Err(missing)), _) => Err((AgentReason::ConfigMissing, missing.clone())),
        // Checked before any host is asked: under Firecracker a run configuration past the
        // metadata service's limit would only fail as the VM starts. (A claim's task goes over
        // the channel.)
        (Some(Ok((env, secrets))), Some(workload))
            if claimed.is_none() && reservation.is_none() =>
        {
            let metadata = guest_metadata(
                &ctx,
                &agent,
                workload,
                status.restart_count,
                env.clone(),
                !secrets.is_empty(),
            )?;
            far_vmspec::check_metadata(&metadata)
                .map_err(|e| (AgentReason::ConfigTooLarge, e.to_string()))
        }
        _ => Ok(()),
    };

    let decision = decision::decide(&Observation {
        spec: &agent.spec,
        status: &status,
        generation: agent.metadata.generation,
        has_finalizer: agent.finalizers().iter().any(|f| f == FINALIZER),
        deleting_since,
        vm,
        claimed: claimed.as_deref(),
        reusable: claimed.is_some()
            && pool_of(&ctx, &agent).is_some_and(|p| p.spec.reuse == far_api::Reuse::Reset),
        guest,
        workload: match &workload {
            Some(Err(problem)) => Err(problem.clone()),
            _ => Ok(()),
        },
        placement,
        config,
        grace_period: Duration::from_secs(ctx.config.grace_period_seconds.into()),
        heartbeat_refresh: decision::heartbeat_refresh(
            agent.metadata.uid.as_deref().unwrap_or_default(),
        ),
        listening_since: ctx.listening_since,
        now: now(),
    });
    let mut new_status = decision.status;
    // A reservation the decision does not put on record is free again at once.
    if let Some(reserved) = &reservation
        && !decision.actions.iter().any(
            |a| matches!(a, Action::Bind(b) if b.claimed.as_deref() == Some(reserved.name.as_str())),
        )
    {
        reserved.release(&ctx);
        reservation = None;
    }
    // Status first, fenced by resourceVersion: a decision made on a stale copy of the agent is
    // refused here, before it can act. A decision that creates the VM is fenced by a fresh read
    // instead, and its status goes out in one write with the VM's uid.
    let mut resource_version = agent.resource_version();
    let creating = decision
        .actions
        .iter()
        .any(|a| matches!(a, Action::CreateVm { .. }));
    let wrote = new_status != status;
    // A claim's task goes out first when this copy is the answer to the write that put the
    // claim on record: the guest starts it while the status is written.
    // It goes to the VM's own channel id, where the idle guest waits.
    let claimed_vm = claimed
        .as_deref()
        .and_then(VmName::parse)
        .map(|vm| vm.channel_id());
    let mut offer = match &claimed_vm {
        Some(vm) if decision.actions.contains(&Action::OfferClaim) => claim(
            &ctx,
            &agent,
            decided,
            resolved.as_ref(),
            status.restart_count,
        )?
        .map(|claim| (vm.clone(), claim)),
        _ => None,
    };
    if confirmed && let Some((vm, claim)) = offer.take() {
        ctx.channel.offer_claim(&vm, claim);
    }
    // The API server's answer to this pass's last write: the agent as it now is.
    let mut last_written = None;
    if wrote && !creating {
        let written = api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(status_patch(
                    &status,
                    &new_status,
                    resource_version.as_deref(),
                )),
            )
            .await
            .map_err(stale)?;
        ctx.superseded.wrote(&uid, resource_version);
        resource_version = written.resource_version();
        confirmed = true;
        last_written = Some(written);
    }
    if new_status.phase == Some(far_api::Phase::Running)
        && status.phase != Some(far_api::Phase::Running)
        && let Some(created) = &agent.metadata.creation_timestamp
    {
        let took = now().duration_since(created.0).as_secs_f64().max(0.0);
        ctx.metrics.time_to_running.observe(took);
        if let Some(pool) = pool_of(&ctx, &agent) {
            let created = new_status
                .conditions
                .iter()
                .find(|c| c.type_ == far_api::agent_condition::VM_CREATED);
            let warm = created.is_some_and(|c| c.reason == AgentReason::WarmStart.as_str());
            // A cold start's boot (its VM's creation to the agent's first heartbeat) is what
            // the pool's autoscaler multiplies the claim rate by.
            if let Some(created) = created.filter(|_| !warm) {
                let boot = now().duration_since(created.last_transition_time.0);
                ctx.pool_vms
                    .note_boot(&pool.uid().unwrap_or_default(), boot.unsigned_abs());
            }
            let outcome = if warm { "warm" } else { "cold" };
            ctx.metrics
                .claim_seconds
                .get_or_create(&crate::metrics::ClaimLabels { outcome })
                .observe(took);
        }
    }

    // The agent's metadata (finalizer, binding) first, then the VM, then the rest: nothing (not
    // even an Event) is said of a decision that turns out stale, and no VM is made before its
    // host is on record.
    let mut actions = decision.actions;
    actions.sort_by_key(|a| match a {
        Action::AddFinalizer | Action::Bind(_) => 0,
        Action::CreateVm { .. } => 1,
        _ => 2,
    });
    let mut metadata = json!({});
    for action in &actions {
        match action {
            Action::AddFinalizer => {
                let mut finalizers = agent.finalizers().to_vec();
                finalizers.push(FINALIZER.to_owned());
                metadata["finalizers"] = json!(finalizers);
            }
            Action::Bind(binding) => {
                metadata["annotations"][far_api::BINDING_ANNOTATION] =
                    json!(binding.to_annotation());
            }
            _ => {}
        }
    }
    if metadata.as_object().is_some_and(|m| !m.is_empty()) {
        // Fenced: the whole finalizer list is written, and a binding made on a stale copy
        // could place the agent twice.
        let written = api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(fenced(
                    json!({ "metadata": metadata }),
                    resource_version.as_deref(),
                )),
            )
            .await;
        // A claim refused is free again. One whose fate is unknown (no answer) stays the
        // agent's: its next pass takes the same VM, whether or not the binding landed.
        if let (Err(kube::Error::Api(_)), Some(reserved)) = (&written, &reservation) {
            reserved.release(&ctx);
        }
        let written = written.map_err(stale)?;
        if let Some(reserved) = &reservation {
            info!(agent = %name, vm = %reserved.name, host = %reserved.vm.host, "idle VM claimed");
            count_claim(&ctx, &reserved.vm.pool, true);
        }
        ctx.superseded.wrote(&uid, resource_version);
        resource_version = written.resource_version();
        confirmed = true;
        last_written = Some(written);
        if actions
            .iter()
            .any(|a| matches!(a, Action::Bind(b) if b.claimed.is_none()))
        {
            lock(&ctx.unsent).insert(id.clone());
        }
    }
    for action in actions {
        match action {
            Action::AddFinalizer | Action::Bind(_) => {}
            Action::RemoveFinalizer => {
                let finalizers: Vec<String> = agent
                    .finalizers()
                    .iter()
                    .filter(|f| *f != FINALIZER)
                    .cloned()
                    .collect();
                let patch = fenced(
                    json!({"metadata": {"finalizers": if finalizers.is_empty() { Value::Null } else { json!(finalizers) }}}),
                    resource_version.as_deref(),
                );
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                ctx.channel.forget(&id);
                ctx.pool_vms.forget_agent(&uid);
                ctx.superseded.forget(&uid);
                ctx.refusals.forget(&uid);
                lock(&ctx.unsent).retain(|attempt| !attempt.starts_with(&format!("{uid}.")));
                info!(agent = %name, "released");
                return Ok(Pass::Done(Requeue::await_change()));
            }
            Action::CreateVm { attempt } => {
                let (Some((env, secrets)), Some(workload)) =
                    (resolved.clone().and_then(Result::ok), decided)
                else {
                    continue;
                };
                let host_name = new_status.host.clone().unwrap_or_default();
                let host = host_object(&ctx, &host_name)
                    .ok_or_else(|| Error::NoHost(host_name.clone()))?;
                let has_secrets = !secrets.is_empty();
                if has_secrets {
                    ctx.channel
                        .provide_secrets(&channel_id(&uid, attempt), secrets);
                }
                let metadata = guest_metadata(&ctx, &agent, workload, attempt, env, has_secrets)?;
                let planned = plan(&VmPlan {
                    name: &VmName::for_agent(&agent, attempt)
                        .map_err(far_vmspec::PlanError::from)?,
                    workload,
                    network: agent.spec.network.as_ref(),
                    host: &host,
                    defaults: &ctx.config.defaults,
                    guest_metadata: &metadata,
                })?;
                let credentials = host_credentials(&ctx, &host).await?;
                // The one call that cannot be repeated safely: act only if the agent we decided
                // on is still the agent the API server has (known when the copy is the answer to
                // a write of this reconcile, else read).
                if !confirmed && api.get(&name).await?.resource_version() != resource_version {
                    return Err(Error::Stale);
                }
                let vm_name = planned.name.id().to_owned();
                lock(&ctx.unsent).remove(&channel_id(&uid, attempt));
                let vm = match ctx
                    .flintlock
                    .create(&host, &credentials, planned.request)
                    .await
                {
                    Ok(vm) => vm,
                    // The host answered no (rather than not at all): once it is seen to hold no
                    // VM of this attempt, the attempt goes elsewhere. Anything else leaves the
                    // outcome unknown, and the next reconcile asks the bound host by name.
                    Err(e) if !e.unreachable() => {
                        let existing = ctx
                            .flintlock
                            .list(
                                &host,
                                &credentials,
                                &ctx.config.defaults.namespace,
                                Some(&vm_name),
                            )
                            .await?;
                        if !existing.is_empty() {
                            return Err(e.into());
                        }
                        // A host may echo the request; the run's enrolment token is in it.
                        let token = ctx.channel.enrolment_token_for(&channel_id(&uid, attempt));
                        let said = e.said(&[&token]);
                        warn!(agent = %name, host = %host_name, attempt, %said, "VM refused");
                        ctx.refusals
                            .note(&channel_id(&uid, attempt), &host_name, said.clone());
                        let refused = decision::create_refused(
                            &new_status,
                            &host_name,
                            &said,
                            agent.metadata.generation,
                            now(),
                        );
                        api.patch_status(
                            &name,
                            &PatchParams::default(),
                            &Patch::Merge(status_patch(&status, &refused, None)),
                        )
                        .await?;
                        ctx.superseded.wrote(&uid, resource_version);
                        publish(
                            &ctx,
                            &agent,
                            true,
                            "CreateRefused",
                            decision::refusal(&host_name, &said),
                        )
                        .await;
                        return Ok(Pass::Done(Requeue::await_change()));
                    }
                    Err(e) => return Err(e.into()),
                };
                let vm_uid = vm_uid(&vm).unwrap_or_default();
                info!(agent = %name, vm = %vm_uid, host = %host_name, attempt, "VM created");
                // A VM created for an agent of a pool: the pool had no idle VM.
                if let Some(pool) = pool_of(&ctx, &agent) {
                    count_claim(&ctx, &pool.uid().unwrap_or_default(), false);
                }
                new_status = decision::vm_created(
                    &new_status,
                    &agent.spec,
                    &vm_uid,
                    vm_state(&vm),
                    agent.metadata.generation,
                    now(),
                );
                // Unfenced: the uid must land even if the agent changed meanwhile. Should it be
                // lost all the same, the binding written before the create leads the next
                // reconcile to this VM by name.
                let written = api
                    .patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(status_patch(&status, &new_status, None)),
                    )
                    .await?;
                ctx.superseded.wrote(&uid, resource_version);
                resource_version = written.resource_version();
                last_written = Some(written);
                publish(
                    &ctx,
                    &agent,
                    false,
                    "VMCreated",
                    format!("VM {vm_uid} created on host {host_name}"),
                )
                .await;
            }
            Action::DeleteVm { uid: vm } => {
                if let Some(host_name) = status.host.as_ref()
                    && let Some(host) = host_object(&ctx, host_name)
                {
                    let credentials = host_credentials(&ctx, &host).await?;
                    ctx.flintlock.delete(&host, &credentials, &vm).await?;
                    ctx.pool_vms.deleted(&vm);
                    info!(agent = %name, %vm, "VM deleted");
                }
            }
            Action::ReturnVm => {
                if let Some(vm) = &claimed_vm {
                    ctx.pool_vms.give_back(vm, &uid);
                    info!(agent = %name, %vm, "VM given back to its pool for reuse");
                }
            }
            Action::OfferClaim => {
                if let Some((vm, claim)) = offer.take() {
                    ctx.channel.offer_claim(&vm, claim);
                }
            }
            Action::StopGuest => ctx.channel.request_stop(&id),
            Action::DeleteAgent => {
                api.delete(&name, &Default::default()).await?;
            }
            Action::Event {
                warning,
                reason,
                message,
            } => publish(&ctx, &agent, warning, reason, message).await,
        }
    }
    // Wanted back at once after a write: decided again on the write's answer. A requeue would
    // only race the write's watch event with a stale copy.
    Ok(match (decision.requeue, last_written) {
        (Some(after), Some(written)) if after.is_zero() => Pass::Again(Box::new(written)),
        (Some(after), _) if !(wrote && after.is_zero()) => {
            Pass::Done(Requeue::requeue(after.max(Duration::from_millis(1))))
        }
        _ => Pass::Done(Requeue::await_change()),
    })
}

/// What to do after a failed reconcile: try again soon.
pub fn error_policy(agent: Arc<CachedAgent>, error: &Error, ctx: Arc<Context>) -> Requeue {
    match error {
        // The newer copy is on its way through the watch, and its arrival reconciles the agent
        // again. The timer is only a safety net (a watch event lost, or a 409 from something in
        // between that changed nothing).
        Error::Stale => return Requeue::requeue(STALE_RECHECK),
        // The cache fills within moments of the start.
        Error::CachesNotReady => return Requeue::requeue(Duration::from_millis(200)),
        _ => {}
    }
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabels {
            error: error.metric_label(),
        })
        .inc();
    warn!(agent = %agent.name_any(), error = %error, kind = error.metric_label(), "reconcile failed");
    Requeue::requeue(Duration::from_secs(2))
}

/// Writes a guest's exit to its FarAgent's status before the channel acknowledges it, so a
/// controller that dies right after loses nothing (see `far_channel::Channel::persist_exits`).
/// When the exit finishes the agent, the write is the decision's whole terminal status (one
/// write, not the code and then the phase), and its Events follow; when the agent restarts,
/// only the code is written and the reconcile that follows does the rest. Exits of an earlier
/// run, of a finished agent, or already recorded are accepted unchanged.
///
/// # Errors
/// The API server's refusal, as text: the guest is answered 503 and reports again.
pub async fn persist_exit(ctx: &Context, report: far_channel::ExitReport) -> Result<(), String> {
    // A run this process has not named yet (it just started) is found by its agent's UID in
    // the cache: the exit need not wait for that agent's turn to be reconciled.
    let (namespace, name) = match report.agent.clone() {
        Some(named) => named,
        None => {
            match ctx.agent_by_run(&report.id) {
                Some(agent) => (agent.namespace().unwrap_or_default(), agent.name_any()),
                None if ctx.agents_ready() => return Ok(()), // its agent is gone
                None => return Err("the FarAgent cache is not filled yet".into()),
            }
        }
    };
    let api: Api<FarAgent> = Api::namespaced(ctx.client.clone(), &namespace);
    // The cached copy unless the controller's own writes replaced it: usually current, and a
    // request fewer than a read. A copy that is not is refused (409) and read afresh.
    let cached = ctx
        .agents
        .get(&ObjectRef::new(&name).within(&namespace))
        .filter(|a| {
            !ctx.superseded.is_stale(
                &a.uid().unwrap_or_default(),
                a.metadata.resource_version.as_deref(),
            )
        })
        .and_then(|a| a.agent().ok());
    let mut agent = match cached {
        Some(agent) => agent,
        None => match api.get_opt(&name).await.map_err(|e| e.to_string())? {
            Some(agent) => agent,
            None => return Ok(()),
        },
    };
    let mut tries = 0;
    loop {
        tries += 1;
        match write_exit(ctx, &api, &agent, &report).await {
            Err(kube::Error::Api(status)) if status.code == 409 && tries < EXIT_WRITE_TRIES => {
                match api.get_opt(&name).await.map_err(|e| e.to_string())? {
                    Some(fresh) => agent = fresh,
                    None => return Ok(()),
                }
            }
            result => return result.map_err(|e| e.to_string()),
        }
    }
}

/// Writes of an exit refused as stale before the guest is answered 503 (and reports again):
/// a 409 means the agent changed meanwhile (its Running status landing, say), and a fresh
/// copy almost always takes the write.
const EXIT_WRITE_TRIES: u32 = 3;

/// [`persist_exit`]'s write, decided on `agent` and fenced by its version.
async fn write_exit(
    ctx: &Context,
    api: &Api<FarAgent>,
    agent: &FarAgent,
    report: &far_channel::ExitReport,
) -> Result<(), kube::Error> {
    let status = agent.status.clone().unwrap_or_default();
    let current = run_id(&agent.metadata, agent.status.as_ref()) == report.id
        && !status.phase.is_some_and(far_api::Phase::is_terminal)
        && status.exit_code.is_none();
    if !current {
        return Ok(());
    }
    let decision = decision::decide(&Observation {
        spec: &agent.spec,
        status: &status,
        generation: agent.metadata.generation,
        has_finalizer: agent.finalizers().iter().any(|f| f == FINALIZER),
        deleting_since: agent.metadata.deletion_timestamp.as_ref().map(|t| t.0),
        vm: None,
        claimed: None,
        reusable: false,
        guest: Guest {
            last_heartbeat: None,
            usage: None,
            exit: Some((report.exit.code, report.exit.start_error.clone())),
        },
        // An agent that reports an exit has a VM: what it is made of was decided.
        workload: Ok(()),
        placement: None,
        config: Ok(()),
        grace_period: Duration::from_secs(ctx.config.grace_period_seconds.into()),
        heartbeat_refresh: decision::heartbeat_refresh(
            agent.metadata.uid.as_deref().unwrap_or_default(),
        ),
        listening_since: ctx.listening_since,
        now: now(),
    });
    let finished = decision
        .status
        .phase
        .is_some_and(far_api::Phase::is_terminal);
    let patch = if finished {
        status_patch(
            &status,
            &decision.status,
            agent.resource_version().as_deref(),
        )
    } else {
        json!({"metadata": {"resourceVersion": agent.resource_version()}, "status": {"exitCode": report.exit.code}})
    };
    api.patch_status(
        &agent.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    if let Some(uid) = agent.uid() {
        ctx.superseded.wrote(&uid, agent.resource_version());
    }
    if finished {
        for action in decision.actions {
            if let Action::Event {
                warning,
                reason,
                message,
            } = action
            {
                publish(ctx, agent, warning, reason, message).await;
            }
        }
    }
    Ok(())
}

/// What a guest's heartbeat says of its VM, as status records it.
pub fn guest_usage(heartbeat: &far_agent_protocol::Heartbeat) -> GuestUsage {
    GuestUsage {
        boot_to_entrypoint_ms: heartbeat.boot_to_entrypoint_ms,
        memory_used_mib: heartbeat.memory_used_bytes >> 20,
        memory_total_mib: heartbeat.memory_total_bytes >> 20,
        cpu_used_ms: heartbeat.cpu_used_ms,
    }
}
