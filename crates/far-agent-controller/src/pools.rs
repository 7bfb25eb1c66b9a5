//! Warm pools: the idle VMs each FarAgentPool keeps booted, and the claims that take them.
//!
//! - [`PoolVms`]: what the controller knows of every pool's VMs (where each is, which agent
//!   holds it), and the one lock under which a claim reserves an idle VM;
//! - [`scale`]: the pure decision of how many VMs a pool creates and which it deletes,
//!   property-tested;
//! - [`run`]: the loop that acts on it every [`TICK`] and writes each pool's status.
//!
//! A pool's VM is named after the pool ([`VmName::for_pool`]): its owner read back is the pool,
//! and its channel id is its own. It boots with a run configuration without a task and waits on
//! the status channel for a claim. It is handed to an agent only when this process has seen it
//! wait (the channel's view says idle), no agent holds it (their bindings, read from the cache
//! before the first claim, and the claims made since), and no other reconcile reserved it (the
//! lock). The agent's binding names the VM before the task is offered, so a restarted
//! controller knows every claimed VM and offers none twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use far_agent_protocol::{ChannelConfig, RUN_CONFIG_KEY};
use far_api::{FarAgent, FarAgentPool, FarAgentPoolStatus, VmSize};
use far_vmspec::{VmName, VmPlan, plan};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tracing::{info, warn};

use crate::hosts::Listed;
use crate::placement::Held;
use crate::reconcile::Context;

/// How often every pool is looked at.
pub const TICK: Duration = Duration::from_secs(1);

/// A pool's VM that has not waited for a claim this long after its creation (or, after a
/// restart, after it was first listed) is deleted and replaced: its guest did not come up.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The most VMs one pool creates per [`TICK`]: a burst grows the pool at a bounded rate.
pub const MAX_CREATES_PER_TICK: u32 = 16;

/// The condition a pool's status carries.
pub const READY: &str = "Ready";

/// One VM of a pool, as the controller knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolVm {
    /// The FarAgentPool's UID.
    pub pool: String,
    /// Its id on the status channel.
    pub channel_id: String,
    /// The FlintlockHost it is on.
    pub host: String,
    /// Flintlock's uid.
    pub uid: String,
    /// Its size, held on its host while no agent holds the VM.
    pub size: VmSize,
    /// When it was created, or first listed by this process.
    pub since: Instant,
    /// When this process first saw it wait for a claim.
    pub idle_since: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    /// By Flintlock name.
    vms: BTreeMap<String, PoolVm>,
    /// Agent UID holding each claimed VM, by the VM's channel id.
    holders: HashMap<String, String>,
    /// Claims made since the pool's status was last written: (warm, cold), by pool UID.
    claims: HashMap<String, (u64, u64)>,
}

impl State {
    /// A VM is gone: it is known, and held, no more.
    fn forget(&mut self, name: &str) {
        if let Some(vm) = self.vms.remove(name) {
            self.holders.remove(&vm.channel_id);
        }
    }
}

/// What the controller knows of every pool's VMs.
#[derive(Debug, Default)]
pub struct PoolVms {
    state: Mutex<State>,
    /// Every agent's claim has been read from the cache: claims may be made.
    holders_known: AtomicBool,
    /// Every host has been listed once: the pools may be scaled.
    listed: AtomicBool,
}

impl PoolVms {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads which VMs the agents' bindings claim; until then no VM is reserved.
    pub fn learn_holders<'a>(&self, agents: impl IntoIterator<Item = &'a FarAgent>) {
        let mut state = self.lock();
        for agent in agents {
            if let (Some(uid), Some(claimed)) = (agent.uid(), claimed_in_annotation(agent)) {
                state.holders.insert(claimed, uid);
            }
        }
        self.holders_known.store(true, Ordering::Release);
    }

    /// Whether claims can be made (the agents' bindings have been read).
    pub fn holders_known(&self) -> bool {
        self.holders_known.load(Ordering::Acquire)
    }

    /// The agent holding the VM with this channel id.
    pub fn holder(&self, channel_id: &str) -> Option<String> {
        self.lock().holders.get(channel_id).cloned()
    }

    /// The channel ids of every claimed VM.
    pub fn claimed(&self) -> HashSet<String> {
        self.lock().holders.keys().cloned().collect()
    }

    /// The agent `uid` is gone: the VMs it held are held no more.
    pub fn forget_agent(&self, uid: &str) {
        self.lock().holders.retain(|_, holder| holder != uid);
    }

    /// Reserves an idle VM of pool `pool` (UID) for agent `agent` (UID): one no agent holds,
    /// on a host `usable` accepts, whose guest `idle` says waits for a claim. The reservation
    /// holds until [`PoolVms::release`]: the caller releases it when the API server refused
    /// the agent's binding naming the VM.
    pub fn reserve(
        &self,
        pool: &str,
        agent: &str,
        usable: impl Fn(&str) -> bool,
        idle: impl Fn(&str) -> bool,
    ) -> Option<(String, PoolVm)> {
        let mut state = self.lock();
        let State { vms, holders, .. } = &mut *state;
        // One this agent reserved before, whose binding's fate is unknown, comes first: its
        // binding may have landed.
        let free = |vm: &PoolVm, holder: Option<&String>| {
            vm.pool == pool && holder.is_none() && usable(&vm.host) && idle(&vm.channel_id)
        };
        let mine = vms.iter().find(|(_, vm)| {
            holders.get(&vm.channel_id).is_some_and(|h| h == agent)
                && vm.pool == pool
                && idle(&vm.channel_id)
        });
        let (name, vm) = mine.or_else(|| {
            vms.iter()
                .find(|(_, vm)| free(vm, holders.get(&vm.channel_id)))
        })?;
        holders.insert(vm.channel_id.clone(), agent.to_owned());
        Some((name.clone(), vm.clone()))
    }

    /// The reservation of `channel_id` by `agent` did not go on record: the VM is free again.
    pub fn release(&self, channel_id: &str, agent: &str) {
        let mut state = self.lock();
        if state.holders.get(channel_id).is_some_and(|h| h == agent) {
            state.holders.remove(channel_id);
        }
    }

    /// Counts a claim on pool `pool` (UID) for its status.
    pub fn count_claim(&self, pool: &str, warm: bool) {
        let mut state = self.lock();
        let counts = state.claims.entry(pool.to_owned()).or_default();
        if warm {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }

    fn take_claims(&self, pool: &str) -> (u64, u64) {
        self.lock().claims.remove(pool).unwrap_or_default()
    }

    fn put_back_claims(&self, pool: &str, (warm, cold): (u64, u64)) {
        let mut state = self.lock();
        let counts = state.claims.entry(pool.to_owned()).or_default();
        counts.0 += warm;
        counts.1 += cold;
    }

    /// A VM the pool manager just created.
    fn created(&self, name: String, vm: PoolVm) {
        self.lock().vms.insert(name, vm);
    }

    /// A VM the pool manager deleted.
    fn removed(&self, name: &str) {
        self.lock().forget(name);
    }

    /// A claimed VM its agent deleted (by Flintlock uid): it no longer counts as busy.
    pub fn deleted(&self, uid: &str) {
        let mut state = self.lock();
        let name = state
            .vms
            .iter()
            .find(|(_, vm)| vm.uid == uid)
            .map(|(name, _)| name.clone());
        if let Some(name) = name {
            state.forget(&name);
        }
    }

    /// What host `host` listed at `listed_at`: the VMs of pools in `live` (UIDs) are known from
    /// now on; a VM it no longer has is forgotten (unless created after the list was asked for).
    pub fn listed(&self, host: &str, vms: &[Listed], live: &HashSet<String>, listed_at: Instant) {
        let mut state = self.lock();
        let present: HashSet<&str> = vms
            .iter()
            .filter(|vm| !vm.deleting)
            .map(|vm| vm.id.as_str())
            .collect();
        let gone: Vec<String> = state
            .vms
            .iter()
            .filter(|(name, vm)| {
                vm.host == host && vm.since < listed_at && !present.contains(name.as_str())
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            state.forget(&name);
        }
        for vm in vms.iter().filter(|vm| !vm.deleting) {
            let Some(owner) = VmName::parse(&vm.id) else {
                continue;
            };
            if !live.contains(&owner.uid) || state.vms.contains_key(&vm.id) {
                continue;
            }
            state.vms.insert(
                vm.id.clone(),
                PoolVm {
                    pool: owner.uid.clone(),
                    channel_id: owner.channel_id(),
                    host: host.to_owned(),
                    uid: vm.uid.clone(),
                    size: vm.size,
                    since: Instant::now(),
                    idle_since: None,
                },
            );
        }
    }

    /// Every host has been listed once.
    pub fn mark_listed(&self) {
        self.listed.store(true, Ordering::Release);
    }

    /// What the pools' VMs no agent holds take on each host (a held VM is counted with its
    /// agent's placement).
    pub fn held_by_host(&self) -> HashMap<String, Held> {
        let state = self.lock();
        let mut by_host: HashMap<String, Held> = HashMap::new();
        for vm in state
            .vms
            .values()
            .filter(|vm| !state.holders.contains_key(&vm.channel_id))
        {
            let h = by_host.entry(vm.host.clone()).or_default();
            h.cpu += u64::from(vm.size.vcpu);
            h.memory_mib += u64::from(vm.size.memory_mib);
        }
        by_host
    }

    /// The VMs of pool `pool` (UID), each with whether an agent holds it; notes when each was
    /// first seen waiting for a claim.
    fn of_pool(&self, pool: &str, idle: impl Fn(&str) -> bool) -> Vec<(String, PoolVm, bool)> {
        let mut state = self.lock();
        let State { vms, holders, .. } = &mut *state;
        vms.iter_mut()
            .filter(|(_, vm)| vm.pool == pool)
            .map(|(name, vm)| {
                let held = holders.contains_key(&vm.channel_id);
                if !held && vm.idle_since.is_none() && idle(&vm.channel_id) {
                    vm.idle_since = Some(Instant::now());
                }
                (name.clone(), vm.clone(), held)
            })
            .collect()
    }
}

/// The VM an agent's binding claims, whatever its attempt: a VM once claimed is never idle
/// again.
fn claimed_in_annotation(agent: &FarAgent) -> Option<String> {
    let value = agent
        .metadata
        .annotations
        .as_ref()?
        .get(far_api::BINDING_ANNOTATION)?;
    let binding: far_api::Binding = serde_json::from_str(value).ok()?;
    Some(VmName::parse(&binding.claimed?)?.channel_id())
}

/// What a pool asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// `spec.minIdle`.
    pub min_idle: u32,
    /// `spec.replicas`.
    pub replicas: u32,
    /// `spec.maxSize`.
    pub max_size: u32,
    /// `spec.idleTimeoutSeconds`.
    pub idle_timeout: Duration,
}

impl Shape {
    /// A pool's shape.
    pub fn of(pool: &FarAgentPool) -> Self {
        Self {
            min_idle: pool.spec.min_idle,
            replicas: pool.spec.replicas,
            max_size: pool.spec.max_size,
            idle_timeout: Duration::from_secs(pool.spec.idle_timeout_seconds.unsigned_abs()),
        }
    }
}

/// One VM of a pool, as [`scale`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Member {
    /// Created, not yet waiting for a claim, for this long.
    Booting(Duration),
    /// Waiting for a claim, for this long.
    Idle(Duration),
    /// Held by an agent (claimed, or reserved by a claim in flight).
    Busy,
    /// Its VM stopped without being claimed.
    Stopped,
}

/// What to do with one pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scaling {
    /// Idle VMs the pool keeps: the larger of minIdle and replicas, within maxSize.
    pub desired: u32,
    /// VMs waiting for a claim.
    pub idle: u32,
    /// VMs booting.
    pub booting: u32,
    /// VMs held by agents.
    pub busy: u32,
    /// VMs to create now.
    pub create: u32,
    /// Indexes (into the members given) of VMs to delete now.
    pub delete: Vec<usize>,
}

/// How many VMs a pool creates and which it deletes. Pure.
///
/// The pool keeps `max(minIdle, replicas)` VMs idle or booting, its held VMs included within
/// `maxSize`; creates at most [`MAX_CREATES_PER_TICK`] at a time; deletes an idle VM beyond
/// that count only once it has been idle `idleTimeoutSeconds` (the longest idle first), a VM
/// that stopped unclaimed, and one that has booted longer than [`BOOT_TIMEOUT`]; never a held
/// one.
pub fn scale(shape: Shape, members: &[Member]) -> Scaling {
    let mut s = Scaling::default();
    let mut idle: Vec<(usize, Duration)> = Vec::new();
    for (i, member) in members.iter().enumerate() {
        match *member {
            Member::Busy => s.busy += 1,
            Member::Stopped => s.delete.push(i),
            Member::Booting(age) if age >= BOOT_TIMEOUT => s.delete.push(i),
            Member::Booting(_) => s.booting += 1,
            Member::Idle(age) => idle.push((i, age)),
        }
    }
    s.idle = u32::try_from(idle.len()).unwrap_or(u32::MAX);
    s.desired = shape
        .min_idle
        .max(shape.replicas)
        .min(shape.max_size.saturating_sub(s.busy));
    let supply = s.idle + s.booting;
    if supply < s.desired {
        s.create = (s.desired - supply).min(MAX_CREATES_PER_TICK);
    } else {
        idle.sort_by_key(|(_, age)| std::cmp::Reverse(*age));
        let surplus = (supply - s.desired) as usize;
        s.delete.extend(
            idle.iter()
                .filter(|(_, age)| *age >= shape.idle_timeout)
                .take(surplus)
                .map(|(i, _)| *i),
        );
    }
    s
}

/// Scales every pool, forever (once every host has been listed).
pub async fn run(ctx: Arc<Context>) {
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if !ctx.pool_vms.listed.load(Ordering::Acquire) {
            continue;
        }
        for pool in ctx.pools.state() {
            tend(&ctx, &pool).await;
        }
        let vms = ctx.pool_vms.lock().vms.len();
        ctx.metrics
            .pool_vms
            .set(i64::try_from(vms).unwrap_or(i64::MAX));
    }
}

/// Scales one pool and writes its status.
async fn tend(ctx: &Context, pool: &FarAgentPool) {
    let Some(pool_uid) = pool.uid() else {
        return;
    };
    let channel = &ctx.channel;
    let idle = |id: &str| channel.view(id).is_some_and(|v| v.idle);
    let vms = ctx.pool_vms.of_pool(&pool_uid, idle);
    let now = Instant::now();
    let members: Vec<Member> = vms
        .iter()
        .map(|(_, vm, held)| {
            if *held {
                Member::Busy
            } else if ctx
                .ended_guest(&vm.host, &vm.uid)
                .is_some_and(|g| g.stopped)
            {
                Member::Stopped
            } else {
                match vm.idle_since {
                    Some(at) => Member::Idle(now - at),
                    None => Member::Booting(now - vm.since),
                }
            }
        })
        .collect();
    let scaling = scale(Shape::of(pool), &members);
    for &i in &scaling.delete {
        let (name, vm, _) = &vms[i];
        delete(ctx, pool, name, vm, members[i]).await;
    }
    let mut unschedulable = None;
    for _ in 0..scaling.create {
        if let Err(why) = create(ctx, pool).await {
            unschedulable = Some(why);
            break;
        }
    }
    write_status(ctx, pool, &scaling, unschedulable).await;
}

/// Boots one idle VM for the pool; `Err` says why none could be.
async fn create(ctx: &Context, pool: &FarAgentPool) -> Result<(), String> {
    let workload = far_api::workload::pool_vm(&pool.spec.template).map_err(|e| e.to_string())?;
    let hosts = crate::reconcile::host_views(ctx);
    let placed = crate::placement::place(&workload, &hosts, &ctx.held(), &BTreeMap::new());
    let crate::decision::Placement::Fits {
        host: host_name,
        vm: size,
        ..
    } = placed
    else {
        return Err(match placed {
            crate::decision::Placement::Unschedulable(why)
            | crate::decision::Placement::Refused(why) => why,
            crate::decision::Placement::Fits { .. } => String::new(),
        });
    };
    let host = ctx
        .hosts
        .get(&kube::runtime::reflector::ObjectRef::new(&host_name))
        .ok_or_else(|| format!("host {host_name} is gone"))?;
    let name = VmName::for_pool(pool, serial()).map_err(|e| e.to_string())?;
    let id = name.channel_id();
    let channel = ChannelConfig {
        url: ctx.config.channel_url.clone(),
        enrolment_token: ctx.channel.enrolment_token_for(&id),
        id: id.clone(),
    };
    let run = far_vmspec::run_config(None, &workload, channel, ctx.config.grace_period_seconds);
    let metadata = BTreeMap::from([(RUN_CONFIG_KEY.to_owned(), run.to_bytes())]);
    let planned = plan(&VmPlan {
        name: &name,
        workload: &workload,
        network: None,
        host: &host,
        defaults: &ctx.config.defaults,
        guest_metadata: &metadata,
    })
    .map_err(|e| e.to_string())?;
    let credentials = crate::reconcile::host_credentials(ctx, &host)
        .await
        .map_err(|e| e.to_string())?;
    let vm = ctx
        .flintlock
        .create(&host, &credentials, planned.request)
        .await
        .map_err(|e| {
            let token = ctx.channel.enrolment_token_for(&id);
            format!("host {host_name}: {}", e.said(&[&token]))
        })?;
    let uid = vm.spec.and_then(|s| s.uid).unwrap_or_default();
    info!(pool = %pool.name_any(), vm = %uid, host = %host_name, "idle VM created");
    ctx.pool_vms.created(
        name.id().to_owned(),
        PoolVm {
            pool: pool.uid().unwrap_or_default(),
            channel_id: id,
            host: host_name,
            uid,
            size,
            since: Instant::now(),
            idle_since: None,
        },
    );
    Ok(())
}

/// A serial for a new VM of a pool: random, so a VM whose create was in flight when an earlier
/// controller died never shares its name with a new one.
fn serial() -> u32 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (hasher.finish() >> 32) as u32
}

async fn delete(ctx: &Context, pool: &FarAgentPool, name: &str, vm: &PoolVm, why: Member) {
    let Some(host) = ctx
        .hosts
        .get(&kube::runtime::reflector::ObjectRef::new(&vm.host))
    else {
        return;
    };
    let credentials = match crate::reconcile::host_credentials(ctx, &host).await {
        Ok(credentials) => credentials,
        Err(e) => {
            warn!(pool = %pool.name_any(), vm = %vm.uid, error = %e, "idle VM not deleted");
            return;
        }
    };
    let why = match why {
        Member::Stopped => "it stopped unclaimed",
        Member::Booting(_) => "it did not come up",
        _ => "idle past idleTimeoutSeconds beyond the pool's desired count",
    };
    match ctx.flintlock.delete(&host, &credentials, &vm.uid).await {
        Ok(()) => {
            info!(pool = %pool.name_any(), vm = %vm.uid, host = %vm.host, why, "idle VM deleted");
            ctx.pool_vms.removed(name);
            ctx.channel.forget(&vm.channel_id);
        }
        Err(e) => warn!(pool = %pool.name_any(), vm = %vm.uid, error = %e, "idle VM not deleted"),
    }
}

/// Writes the pool's status when it changed.
async fn write_status(
    ctx: &Context,
    pool: &FarAgentPool,
    scaling: &Scaling,
    unschedulable: Option<String>,
) {
    let pool_uid = pool.uid().unwrap_or_default();
    let old = pool.status.clone().unwrap_or_default();
    let claims = ctx.pool_vms.take_claims(&pool_uid);
    let mut new = FarAgentPoolStatus {
        replicas: scaling.idle + scaling.booting,
        ready_replicas: scaling.idle,
        idle: scaling.idle,
        booting: scaling.booting,
        busy: scaling.busy,
        desired_idle: scaling.desired,
        warm_claims: old.warm_claims + claims.0,
        cold_claims: old.cold_claims + claims.1,
        label_selector: Some(format!("{}={}", far_api::POOL_LABEL, pool.name_any())),
        observed_generation: pool.metadata.generation,
        conditions: old.conditions.clone(),
    };
    let (ready, reason, message) = match (&unschedulable, scaling.idle >= scaling.desired) {
        (_, true) => (
            true,
            "Ready",
            format!("{} of {} idle VMs ready", scaling.idle, scaling.desired),
        ),
        (Some(why), false) => (
            false,
            "Unschedulable",
            format!("no host takes another idle VM: {why}"),
        ),
        (None, false) => (
            false,
            "Filling",
            format!(
                "{} of {} idle VMs ready, {} booting",
                scaling.idle, scaling.desired, scaling.booting
            ),
        ),
    };
    crate::conditions::set(
        &mut new.conditions,
        READY,
        ready,
        reason,
        &message,
        pool.metadata.generation,
        Timestamp::now(),
    );
    if new == old {
        return;
    }
    let api: Api<FarAgentPool> =
        Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
    // Fenced: the claim counts add to the status read; a stale read is refused and the counts
    // go into the next write.
    let patch = json!({
        "metadata": {"resourceVersion": pool.resource_version()},
        "status": new,
    });
    if let Err(e) = api
        .patch_status(
            &pool.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        ctx.pool_vms.put_back_claims(&pool_uid, claims);
        if !matches!(&e, kube::Error::Api(s) if s.code == 409) {
            warn!(pool = %pool.name_any(), error = %e, "pool status not written");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shape(min_idle: u32, replicas: u32, max_size: u32) -> Shape {
        Shape {
            min_idle,
            replicas,
            max_size,
            idle_timeout: Duration::from_secs(300),
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn an_empty_pool_boots_its_minimum_at_a_bounded_rate() {
        let s = scale(shape(2, 0, 10), &[]);
        assert_eq!((s.desired, s.create), (2, 2));
        let s = scale(shape(0, 100, 200), &[]);
        assert_eq!((s.desired, s.create), (100, MAX_CREATES_PER_TICK));
    }

    #[test]
    fn claimed_vms_count_within_max_size_and_booting_ones_count_as_coming() {
        let members = [
            Member::Busy,
            Member::Busy,
            Member::Booting(S),
            Member::Idle(S),
        ];
        let s = scale(shape(3, 0, 4), &members);
        assert_eq!((s.desired, s.create, s.busy), (2, 0, 2));
        let s = scale(shape(3, 0, 10), &members);
        assert_eq!((s.desired, s.create), (3, 1));
    }

    #[test]
    fn surplus_idle_vms_go_only_after_the_idle_timeout_longest_idle_first() {
        let members = [
            Member::Idle(Duration::from_secs(10)),
            Member::Idle(Duration::from_secs(400)),
            Member::Idle(Duration::from_secs(500)),
        ];
        assert_eq!(scale(shape(1, 0, 10), &members).delete, [2, 1]);
        assert_eq!(scale(shape(2, 0, 10), &members).delete, [2]);
        assert!(scale(shape(3, 0, 10), &members).delete.is_empty());
    }

    #[test]
    fn a_stopped_or_stuck_vm_is_replaced() {
        let members = [Member::Stopped, Member::Booting(BOOT_TIMEOUT)];
        let s = scale(shape(2, 0, 10), &members);
        assert_eq!(s.delete, [0, 1]);
        assert_eq!(s.create, 2);
    }

    fn members() -> impl Strategy<Value = Vec<Member>> {
        proptest::collection::vec(
            prop_oneof![
                (0u64..200).prop_map(|s| Member::Booting(Duration::from_secs(s))),
                (0u64..600).prop_map(|s| Member::Idle(Duration::from_secs(s))),
                Just(Member::Busy),
                Just(Member::Stopped),
            ],
            0..40,
        )
    }

    proptest! {
        #[test]
        fn scaling_keeps_its_promises(
            min_idle in 0u32..30, replicas in 0u32..30, max_size in 1u32..40,
            timeout in 0u64..600, members in members(),
        ) {
            let shape = Shape { min_idle, replicas, max_size, idle_timeout: Duration::from_secs(timeout) };
            let s = scale(shape, &members);
            // Never a held VM; an idle one only past the timeout; each at most once.
            let mut seen = HashSet::new();
            for &i in &s.delete {
                prop_assert!(seen.insert(i));
                match members[i] {
                    Member::Busy => prop_assert!(false, "a held VM deleted"),
                    Member::Idle(age) => prop_assert!(age >= shape.idle_timeout),
                    Member::Booting(age) => prop_assert!(age >= BOOT_TIMEOUT),
                    Member::Stopped => {}
                }
            }
            // Creates only to reach the desired count, never past maxSize, at a bounded rate.
            prop_assert!(s.create <= MAX_CREATES_PER_TICK);
            if s.create > 0 {
                prop_assert!(s.idle + s.booting + s.create <= s.desired);
                prop_assert!(s.busy + s.idle + s.booting + s.create <= max_size.max(s.busy));
            }
            // Deletes of idle VMs never take the pool below its desired count.
            let idle_deleted = s.delete.iter().filter(|&&i| matches!(members[i], Member::Idle(_))).count() as u32;
            prop_assert!(idle_deleted == 0 || s.idle + s.booting - idle_deleted >= s.desired);
            prop_assert!(s.desired <= min_idle.max(replicas));
        }
    }
}
