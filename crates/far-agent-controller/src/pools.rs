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
use far_api::{FarAgentPool, FarAgentPoolStatus, VmSize};
use far_vmspec::{VmName, VmPlan, plan};
use futures::StreamExt as _;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tracing::{info, warn};

use crate::cache::CachedAgent;
use crate::hosts::Listed;
use crate::placement::Held;
use crate::reconcile::Context;

/// How often every pool is looked at.
pub const TICK: Duration = Duration::from_secs(1);

/// A pool's VM that has not waited for a claim this long after its creation (or, after a
/// restart, after it was first listed) is deleted and replaced: its guest did not come up.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The most VMs one pool creates per [`TICK`]: a burst grows the pool at a bounded rate.
pub const MAX_CREATES_PER_TICK: u32 = 128;

/// CreateMicroVM calls one pool has in flight at once.
const CREATES_IN_FLIGHT: usize = 16;

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
    /// Created by this process (so `since` is its creation, and its boot time is known).
    pub created_here: bool,
}

#[derive(Debug, Default)]
struct State {
    /// By Flintlock name.
    vms: BTreeMap<String, PoolVm>,
    /// Agent UID holding each claimed VM, by the VM's channel id.
    holders: HashMap<String, String>,
    /// Claims made since the pool's status was last written: (warm, cold), by pool UID.
    claims: HashMap<String, (u64, u64)>,
    /// Each pool's autoscaler, by pool UID.
    scalers: HashMap<String, Scaler>,
}

/// A pool's autoscaler: what it measured, and where it last moved.
#[derive(Debug, Default)]
struct Scaler {
    demand: Demand,
    /// Claims since its last tick.
    claims: u64,
    /// Boot times measured since its last tick.
    boots: Vec<Duration>,
    last_tick: Option<Instant>,
    /// The desired count last decided, and whether it last went up.
    desired: Option<u32>,
    rising: Option<bool>,
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
    pub fn learn_holders<'a>(&self, agents: impl IntoIterator<Item = &'a CachedAgent>) {
        let mut state = self.lock();
        for agent in agents {
            if let (Some(uid), Some(claimed)) = (agent.uid(), held_claim(agent)) {
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

    /// Agent `agent` gives the VM with `channel_id` back (its task exited; its guest resets it
    /// for the next claim): it counts as booting until it waits for a claim again.
    pub fn give_back(&self, channel_id: &str, agent: &str) {
        let mut state = self.lock();
        if state.holders.get(channel_id).is_none_or(|h| h != agent) {
            return;
        }
        state.holders.remove(channel_id);
        if let Some(vm) = state
            .vms
            .values_mut()
            .find(|vm| vm.channel_id == channel_id)
        {
            vm.since = Instant::now();
            vm.idle_since = None;
            // Its reset is no boot: the autoscaler's boot time stays the cold one.
            vm.created_here = false;
        }
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
        state.scalers.entry(pool.to_owned()).or_default().claims += 1;
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
            .filter(|vm| !vm.deleting())
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
        for vm in vms.iter().filter(|vm| !vm.deleting()) {
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
                    created_here: false,
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
        let State {
            vms,
            holders,
            scalers,
            ..
        } = &mut *state;
        let scaler = scalers.entry(pool.to_owned()).or_default();
        vms.iter_mut()
            .filter(|(_, vm)| vm.pool == pool)
            .map(|(name, vm)| {
                let held = holders.contains_key(&vm.channel_id);
                if !held && vm.idle_since.is_none() && idle(&vm.channel_id) {
                    let now = Instant::now();
                    vm.idle_since = Some(now);
                    if vm.created_here {
                        scaler.boots.push(now - vm.since);
                    }
                }
                (name.clone(), vm.clone(), held)
            })
            .collect()
    }

    /// A VM booted for a claim on pool `pool` (UID) took `boot` to its agent's first heartbeat.
    pub fn note_boot(&self, pool: &str, boot: Duration) {
        self.lock()
            .scalers
            .entry(pool.to_owned())
            .or_default()
            .boots
            .push(boot);
    }

    /// The pool's demand, updated with the claims and boot times since its last tick.
    fn measure(&self, pool: &str) -> Demand {
        let mut state = self.lock();
        let scaler = state.scalers.entry(pool.to_owned()).or_default();
        let now = Instant::now();
        let elapsed = scaler.last_tick.map_or(Duration::ZERO, |t| now - t);
        scaler.demand = scaler.demand.update(scaler.claims, elapsed, &scaler.boots);
        scaler.claims = 0;
        scaler.boots.clear();
        scaler.last_tick = Some(now);
        scaler.demand
    }

    /// Pool `pool`'s (UID) claims a second, as its autoscaler last measured them.
    pub fn claim_rate(&self, pool: &str) -> f64 {
        self.lock()
            .scalers
            .get(pool)
            .map_or(0.0, |s| s.demand.claim_rate)
    }

    /// Records the pool's desired count; when it moved, from what and whether up, and whether
    /// that is a change of direction.
    fn moved(&self, pool: &str, desired: u32) -> Option<Move> {
        let mut state = self.lock();
        let scaler = state.scalers.entry(pool.to_owned()).or_default();
        let before = scaler.desired.replace(desired)?;
        if before == desired {
            return None;
        }
        let up = desired > before;
        let turned = scaler.rising.replace(up) != Some(up);
        Some(Move { before, up, turned })
    }

    /// Only these pools (UIDs) exist: the autoscalers and claim counts of others go.
    fn keep_pools(&self, live: &HashSet<String>) {
        let mut state = self.lock();
        state.scalers.retain(|pool, _| live.contains(pool));
        state.claims.retain(|pool, _| live.contains(pool));
    }
}

/// A change of a pool's desired count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Move {
    before: u32,
    up: bool,
    /// The other way than the last change (or the first change): worth an Event.
    turned: bool,
}

/// What a pool's autoscaler measures: claims a second and how long an idle VM takes from its
/// creation to waiting for a claim, both smoothed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Demand {
    /// Claims a second (warm and cold), an exponential average over about [`RATE_WINDOW`].
    pub claim_rate: f64,
    /// Seconds an idle VM took to boot, averaged (each new one weighs a fifth); none before one
    /// was measured.
    pub boot_seconds: Option<f64>,
    /// Time since the last claim.
    pub quiet: Duration,
}

/// How quickly the measured claim rate follows the real one.
pub const RATE_WINDOW: Duration = Duration::from_secs(30);

/// A claim rate below this (one claim in about 17 minutes) is none: an average decays towards
/// zero without reaching it, and would keep one idle VM forever.
const NEGLIGIBLE_RATE: f64 = 1e-3;

impl Demand {
    /// After `elapsed` with `claims` claims and these boot times.
    pub fn update(self, claims: u64, elapsed: Duration, boots: &[Duration]) -> Self {
        let dt = elapsed.as_secs_f64();
        let mut claim_rate = self.claim_rate;
        if dt > 0.0 {
            let weight = 1.0 - (-dt / RATE_WINDOW.as_secs_f64()).exp();
            claim_rate += weight * (claims as f64 / dt - claim_rate);
        }
        if claim_rate < NEGLIGIBLE_RATE {
            claim_rate = 0.0;
        }
        let boot_seconds = boots.iter().fold(self.boot_seconds, |average, boot| {
            let boot = boot.as_secs_f64();
            Some(average.map_or(boot, |a| a + 0.2 * (boot - a)))
        });
        Self {
            claim_rate,
            boot_seconds,
            quiet: if claims > 0 {
                Duration::ZERO
            } else {
                self.quiet + elapsed
            },
        }
    }

    /// The idle VMs that serve the claims arriving while their replacements boot: claim rate x
    /// boot time, rounded up; none once no claim came for `idle_timeout` (the pool's
    /// `idleTimeoutSeconds`), so after a burst the pool is back to its minimum within that time
    /// rather than when the averaged rate has faded.
    pub fn idle_vms(self, idle_timeout: Duration) -> u32 {
        if self.quiet >= idle_timeout {
            return 0;
        }
        let want = (self.claim_rate * self.boot_seconds.unwrap_or(0.0)).ceil();
        if want.is_finite() && want > 0.0 {
            want.min(f64::from(u32::MAX)) as u32
        } else {
            0
        }
    }
}

/// The channel id of the pool VM an agent holds: the one its current attempt's binding
/// ([`FarAgent::binding`]) claims, until the agent finishes. A finished agent's VM is its
/// pool's again: deleted, or (reused) reset by its guest, which waits for its exit to be on
/// record (the finished status) first.
fn held_claim(agent: &CachedAgent) -> Option<String> {
    let binding = agent.binding()?;
    if agent.finished() {
        return None;
    }
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
    /// The autoscaler's measure of demand ([`Demand::idle_vms`]).
    pub demand: u32,
}

impl Shape {
    /// A pool's shape.
    pub fn of(pool: &FarAgentPool) -> Self {
        Self {
            min_idle: pool.spec.min_idle,
            replicas: pool.spec.replicas,
            max_size: pool.spec.max_size,
            idle_timeout: Duration::from_secs(pool.spec.idle_timeout_seconds.unsigned_abs()),
            demand: 0,
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
    /// Idle VMs the pool keeps: the largest of minIdle, replicas and demand, within maxSize.
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
/// The pool keeps `max(minIdle, replicas, demand)` VMs idle or booting, its held VMs included within
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
        .max(shape.demand)
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
        let pools = ctx.pools.state();
        let mut counted = [0u32; 3];
        for pool in &pools {
            let scaling = tend(&ctx, pool).await;
            for (total, n) in counted
                .iter_mut()
                .zip([scaling.idle, scaling.booting, scaling.busy])
            {
                *total += n;
            }
        }
        ctx.pool_vms
            .keep_pools(&pools.iter().filter_map(|p| p.uid()).collect());
        for (state, n) in ["idle", "booting", "busy"].into_iter().zip(counted) {
            ctx.metrics
                .pool_vms
                .get_or_create(&crate::metrics::VmStateLabels { state })
                .set(i64::from(n));
        }
    }
}

/// Scales one pool and writes its status; what it counted.
async fn tend(ctx: &Context, pool: &FarAgentPool) -> Scaling {
    let Some(pool_uid) = pool.uid() else {
        return Scaling::default();
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
    let demand = ctx.pool_vms.measure(&pool_uid);
    let shape = Shape::of(pool);
    let shape = Shape {
        demand: demand.idle_vms(shape.idle_timeout),
        ..shape
    };
    let scaling = scale(shape, &members);
    if let Some(moved) = ctx.pool_vms.moved(&pool_uid, scaling.desired) {
        tell_move(ctx, pool, moved, shape, &scaling, demand).await;
    }
    for &i in &scaling.delete {
        let (name, vm, _) = &vms[i];
        delete(ctx, pool, name, vm, members[i]).await;
    }
    let unschedulable = if scaling.create > 0 {
        create(ctx, pool, scaling.create).await.err()
    } else {
        None
    };
    write_status(ctx, pool, &scaling, unschedulable).await;
    scaling
}

/// Counts a change of a pool's desired count, and tells it on the pool (a Normal Event) when it
/// turns: the first rise after a fall, or the reverse. Steady growth is one Event, not many.
async fn tell_move(
    ctx: &Context,
    pool: &FarAgentPool,
    moved: Move,
    shape: Shape,
    scaling: &Scaling,
    demand: Demand,
) {
    let direction = if moved.up { "up" } else { "down" };
    ctx.metrics
        .pool_scale
        .get_or_create(&crate::metrics::DirectionLabels { direction })
        .inc();
    if !moved.turned {
        return;
    }
    let boot = demand
        .boot_seconds
        .map_or_else(|| "not measured yet".to_owned(), |b| format!("{b:.2} s"));
    let note = format!(
        "desired idle VMs {} -> {} (minIdle {}, replicas {}, demand {}: {:.2} claims/s x boot {boot}; {} busy, maxSize {})",
        moved.before,
        scaling.desired,
        shape.min_idle,
        shape.replicas,
        shape.demand,
        demand.claim_rate,
        scaling.busy,
        shape.max_size
    );
    let reason = if moved.up { "ScaledUp" } else { "ScaledDown" };
    crate::reconcile::publish_on(ctx, pool, false, reason, note).await;
}

/// Creates `count` idle VMs of the pool: placed one after the other (each counted before the
/// next is placed), booted [`CREATES_IN_FLIGHT`] at a time. `Err` says why not all could be.
async fn create(ctx: &Context, pool: &FarAgentPool, count: u32) -> Result<(), String> {
    let workload = far_api::workload::pool_vm(&pool.spec.template).map_err(|e| e.to_string())?;
    let hosts = crate::reconcile::host_views(ctx);
    let mut held = ctx.held();
    let mut placed = Vec::new();
    let mut unplaced = None;
    for _ in 0..count {
        match place_new(ctx, &workload, &hosts, &mut held) {
            Ok(target) => placed.push(target),
            Err(why) => {
                unplaced = Some(why);
                break;
            }
        }
    }
    let failed = futures::stream::iter(placed)
        .map(|(host, size)| {
            let workload = &workload;
            async move { boot(ctx, pool, workload, &host, size).await }
        })
        .buffer_unordered(CREATES_IN_FLIGHT)
        .filter_map(|result| async move { result.err() })
        .collect::<Vec<String>>()
        .await;
    match (unplaced, failed.into_iter().next()) {
        (Some(why), _) | (None, Some(why)) => Err(why),
        (None, None) => Ok(()),
    }
}

/// Where a new VM of the pool goes: the host placement picks, with the VMs placed before it
/// in `held`, where it is counted too.
fn place_new(
    ctx: &Context,
    workload: &far_api::workload::ResolvedWorkload,
    hosts: &[crate::placement::HostView],
    held: &mut HashMap<String, Held>,
) -> Result<(Arc<far_api::FlintlockHost>, VmSize), String> {
    use crate::decision::Placement;
    match crate::placement::place(workload, hosts, held, &BTreeMap::new()) {
        Placement::Fits { host, vm, .. } => {
            let h = held.entry(host.clone()).or_default();
            h.cpu += u64::from(vm.vcpu);
            h.memory_mib += u64::from(vm.memory_mib);
            let object = ctx
                .hosts
                .get(&kube::runtime::reflector::ObjectRef::new(&host))
                .ok_or_else(|| format!("host {host} is gone"))?;
            Ok((object, vm))
        }
        Placement::Unschedulable(why) | Placement::Refused(why) => Err(why),
    }
}

/// Boots one idle VM of the pool on `host`; `Err` says why it could not.
async fn boot(
    ctx: &Context,
    pool: &FarAgentPool,
    workload: &far_api::workload::ResolvedWorkload,
    host: &far_api::FlintlockHost,
    size: VmSize,
) -> Result<(), String> {
    let host_name = host.name_any();
    let name = VmName::for_pool(pool, serial()).map_err(|e| e.to_string())?;
    let id = name.channel_id();
    let channel = ChannelConfig {
        url: ctx.config.channel_url.clone(),
        enrolment_token: ctx.channel.enrolment_token_for(&id),
        id: id.clone(),
    };
    let mut run = far_vmspec::run_config(None, workload, channel, ctx.config.grace_period_seconds);
    run.reusable = pool.spec.reuse == far_api::Reuse::Reset;
    let metadata = BTreeMap::from([(RUN_CONFIG_KEY.to_owned(), run.to_bytes())]);
    let planned = plan(&VmPlan {
        name: &name,
        workload,
        network: None,
        host,
        defaults: &ctx.config.defaults,
        guest_metadata: &metadata,
    })
    .map_err(|e| e.to_string())?;
    let credentials = crate::reconcile::host_credentials(ctx, host)
        .await
        .map_err(|e| e.to_string())?;
    let vm = ctx
        .flintlock
        .create(host, &credentials, planned.request)
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
            created_here: true,
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

    const VM: &str = "ns.warm.7.pool-uid";

    fn claimant(status: far_api::FarAgentStatus) -> CachedAgent {
        let mut agent: far_api::FarAgent = serde_json::from_value(json!({
            "apiVersion": "tiffany.dev/v1", "kind": "FarAgent",
            "metadata": {"name": "a", "uid": "agent-uid"},
            "spec": {"poolRef": {"name": "warm"}},
        }))
        .unwrap();
        let binding = far_api::Binding {
            attempt: status.restart_count,
            host: "h1".into(),
            vm: VmSize {
                vcpu: 1,
                memory_mib: 512,
            },
            claimed: Some(VM.into()),
        };
        agent.metadata.annotations = Some(
            [(
                far_api::BINDING_ANNOTATION.to_owned(),
                binding.to_annotation(),
            )]
            .into(),
        );
        agent.status = Some(status);
        agent.into()
    }

    /// After a restart an agent holds its claimed VM from its binding until it finishes; a
    /// restarted attempt no longer holds the last attempt's.
    #[test]
    fn an_agent_holds_its_claimed_vm_until_it_finishes() {
        use far_api::{FarAgentStatus, Phase};
        let vm = VmName::parse(VM).unwrap().channel_id();
        let bound = claimant(FarAgentStatus::default());
        assert_eq!(held_claim(&bound), Some(vm.clone()));
        let running = claimant(FarAgentStatus {
            phase: Some(Phase::Running),
            host: Some("h1".into()),
            vm_uid: Some("vm1".into()),
            ..FarAgentStatus::default()
        });
        assert_eq!(held_claim(&running), Some(vm));
        let mut finished = running.clone();
        finished.status.as_mut().unwrap().phase = Some(Phase::Completed);
        assert_eq!(held_claim(&finished), None);
        let mut found_later = running.clone();
        found_later.status.as_mut().unwrap().vm_uid = None;
        assert_eq!(
            held_claim(&found_later),
            Some(VmName::parse(VM).unwrap().channel_id()),
            "bound to its host, its VM not yet recorded"
        );
        let mut restarted = running;
        restarted.status.as_mut().unwrap().restart_count = 1;
        assert_eq!(held_claim(&restarted), None);
    }

    /// A VM given back counts as booting until its guest waits for a claim again; only its
    /// holder can give it back.
    #[test]
    fn a_vm_given_back_is_booting_until_it_waits_again_and_only_its_holder_gives_it_back() {
        let vms = PoolVms::default();
        let name = "ns.warm.7.pool-uid";
        let id = VmName::parse(name).unwrap().channel_id();
        vms.created(
            name.into(),
            PoolVm {
                pool: "pool-uid".into(),
                channel_id: id.clone(),
                host: "h1".into(),
                uid: "vm1".into(),
                size: VmSize {
                    vcpu: 1,
                    memory_mib: 512,
                },
                since: Instant::now(),
                idle_since: None,
                created_here: true,
            },
        );
        let idle = |_: &str| true;
        assert!(vms.reserve("pool-uid", "agent-a", |_| true, idle).is_some());
        vms.give_back(&id, "agent-b");
        assert_eq!(
            vms.holder(&id).as_deref(),
            Some("agent-a"),
            "not b's to give"
        );
        vms.give_back(&id, "agent-a");
        assert_eq!(vms.holder(&id), None);
        let (_, vm, held) = vms.of_pool("pool-uid", |_| false).remove(0);
        assert!(!held && vm.idle_since.is_none() && !vm.created_here);
        let (_, vm, _) = vms.of_pool("pool-uid", idle).remove(0);
        assert!(vm.idle_since.is_some(), "idle again once it waits");
        assert!(
            vms.reserve("pool-uid", "agent-c", |_| true, idle).is_some(),
            "and claimed again"
        );
    }

    fn shape(min_idle: u32, replicas: u32, max_size: u32) -> Shape {
        Shape {
            min_idle,
            replicas,
            max_size,
            idle_timeout: Duration::from_secs(300),
            demand: 0,
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn an_empty_pool_boots_its_minimum_at_a_bounded_rate() {
        let s = scale(shape(2, 0, 10), &[]);
        assert_eq!((s.desired, s.create), (2, 2));
        let s = scale(shape(0, 1000, 2000), &[]);
        assert_eq!((s.desired, s.create), (1000, MAX_CREATES_PER_TICK));
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

    /// A steady 10 claims a second with VMs booting in 1.5 s asks for 15 idle VMs; once the
    /// claims stop, the demand fades to none within minutes, and is none at once after the
    /// pool's idle timeout without a claim.
    #[test]
    fn demand_is_claim_rate_times_boot_time_and_fades_when_claims_stop() {
        let long = Duration::from_secs(3600);
        let mut d = Demand::default();
        assert_eq!(d.idle_vms(long), 0, "nothing measured, nothing asked");
        let boot = [Duration::from_millis(1500)];
        for _ in 0..300 {
            d = d.update(10, S, &boot);
        }
        assert!((d.claim_rate - 10.0).abs() < 0.01, "{d:?}");
        assert_eq!(d.idle_vms(long), 15);
        let burst = d;
        let mut quiet = 0;
        while d.idle_vms(long) > 0 {
            d = d.update(0, S, &[]);
            quiet += 1;
        }
        assert!((200..400).contains(&quiet), "faded after {quiet} s");
        assert_eq!(d.claim_rate, 0.0);
        // With a 60 s idle timeout: 60 s without a claim and the pool asks for no more.
        let mut d = burst;
        for _ in 0..59 {
            d = d.update(0, S, &[]);
        }
        assert!(d.idle_vms(Duration::from_secs(60)) > 0);
        d = d.update(0, S, &[]);
        assert_eq!(d.idle_vms(Duration::from_secs(60)), 0);
        assert_eq!(
            d.update(1, S, &[]).quiet,
            Duration::ZERO,
            "a claim ends the quiet"
        );
    }

    #[test]
    fn the_demand_raises_the_pool_within_max_size() {
        let mut s = shape(2, 0, 10);
        s.demand = 15;
        let scaling = scale(s, &[Member::Busy; 3]);
        assert_eq!((scaling.desired, scaling.create), (7, 7));
    }

    /// Each change of the desired count is counted; only a change of direction is told.
    #[test]
    fn a_pool_tells_only_the_turns_of_its_desired_count() {
        let vms = PoolVms::default();
        let turns: Vec<Option<(u32, bool, bool)>> = [2, 2, 5, 9, 9, 4, 3, 6]
            .into_iter()
            .map(|desired| vms.moved("p", desired).map(|m| (m.before, m.up, m.turned)))
            .collect();
        assert_eq!(
            turns,
            [
                None,
                None,
                Some((2, true, true)),
                Some((5, true, false)),
                None,
                Some((9, false, true)),
                Some((4, false, false)),
                Some((3, true, true)),
            ]
        );
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
            timeout in 0u64..600, demand in 0u32..60, members in members(),
        ) {
            let shape = Shape { min_idle, replicas, max_size, idle_timeout: Duration::from_secs(timeout), demand };
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
            prop_assert!(s.desired <= min_idle.max(replicas).max(demand));
            prop_assert!(s.desired <= max_size);
        }

        #[test]
        fn demand_follows_the_claim_rate_and_never_goes_negative(
            ticks in proptest::collection::vec((0u64..200, 1u64..3000), 1..60),
            boot in 1u64..5000,
        ) {
            let mut d = Demand::default();
            let boots = [Duration::from_millis(boot)];
            for (claims, millis) in ticks {
                let before = d.claim_rate;
                let elapsed = Duration::from_millis(millis);
                let rate = claims as f64 / elapsed.as_secs_f64();
                d = d.update(claims, elapsed, &boots);
                prop_assert!(d.claim_rate >= 0.0 && d.claim_rate.is_finite());
                // An average: it moves towards the rate measured, never past it.
                prop_assert!(d.claim_rate <= before.max(rate) + 1e-9);
                prop_assert!(d.claim_rate >= before.min(rate) - 1e-9 || d.claim_rate == 0.0);
            }
            prop_assert!(d.boot_seconds.is_some());
        }
    }
}
