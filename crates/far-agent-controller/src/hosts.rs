//! FlintlockHosts: probed over gRPC for readiness, their allocation derived from the agents
//! placed on them, and their VMs checked for orphans.
//!
//! One pass every [`PROBE_INTERVAL`]: each host is asked for every VM in FAR's Flintlock
//! namespace. An answer makes it Ready; silence makes it not Ready. The VMs of live
//! FarAgentPools are handed to the pool manager ([`crate::pools`]), and so are those agents
//! claimed; of the rest, any VM whose owner (read from its name, [`far_vmspec::VmName`]) is no
//! FarAgent, or is an earlier attempt of one, is deleted. Host status is written only when it
//! changes, plus `lastProbeTime` once a minute.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use far_api::{Allocated, FlintlockHost, FlintlockHostStatus, VmSize, host_condition};
use far_vmspec::VmName;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tracing::{info, warn};

use crate::cache::CachedAgent;
use crate::conditions;
use crate::decision::VmState;
use crate::reconcile::Context;

/// How often hosts are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// How often `lastProbeTime` is refreshed when nothing else changes.
const PROBE_TIME_REFRESH: Duration = Duration::from_secs(60);

/// Probes every host once, updates their status, and deletes orphaned VMs.
pub async fn probe_all(ctx: &Context) {
    let agents = ctx.agents.state();
    for phase in [
        far_api::Phase::Pending,
        far_api::Phase::Running,
        far_api::Phase::Completed,
        far_api::Phase::Failed,
    ] {
        let count = agents
            .iter()
            .filter(|a| {
                a.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .unwrap_or(far_api::Phase::Pending)
                    == phase
            })
            .count();
        ctx.metrics
            .agents
            .get_or_create(&crate::metrics::PhaseLabels {
                phase: phase.as_str(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    let held = ctx.held();
    let pools: HashSet<String> = ctx.pools.state().iter().filter_map(|p| p.uid()).collect();
    let mut probed = Probed::new();
    for host in ctx.hosts.state() {
        let name = host.name_any();
        let credentials = crate::reconcile::host_credentials(ctx, &host)
            .await
            .unwrap_or_default();
        let asked = std::time::Instant::now();
        let probe = ctx
            .flintlock
            .list_narrowly(&host, &credentials, &ctx.config.defaults.namespace)
            .await
            .map(|vms| vms.into_iter().filter_map(Listed::of).collect::<Vec<_>>());
        let ready = probe.is_ok();
        match &probe {
            Ok(listed) => {
                ctx.unreachable
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&name);
                // Orphans only once the agents are known: an empty cache is not "no agents".
                // The owners are read after the host's list: a VM listed was created by a
                // reconcile of an agent already in the cache, so no VM is younger than its owner here.
                let owners = owners(ctx);
                note_ended(ctx, &host, &credentials).await;
                // Pools' VMs too only once the pools are known: a live pool's VMs are not orphans.
                if ctx.agents_ready() && ctx.pools_ready() {
                    ctx.pool_vms.listed(&name, listed, &pools, asked);
                    let claimed = ctx.pool_vms.claimed();
                    for (vm, why) in surplus(listed, &owners, &pools, &claimed) {
                        info!(host = %name, vm = %vm.uid, id = %vm.id, why = why.as_str(), "deleting a VM no agent keeps");
                        if let Surplus::Duplicate(kept) = &why {
                            tell_duplicate(ctx, vm, kept, &name).await;
                        }
                        if let Err(e) = ctx.flintlock.delete(&host, &credentials, &vm.uid).await {
                            warn!(host = %name, vm = %vm.uid, error = %e, "VM not deleted");
                        }
                    }
                }
            }
            Err(e) => {
                warn!(host = %name, error = %e, "probe failed");
                ctx.unreachable
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(name.clone())
                    .or_insert_with(Timestamp::now);
            }
        }
        let h = held.get(&name).copied().unwrap_or_default();
        let error = probe.as_ref().err().map(ToString::to_string);
        probed.insert(
            name,
            probe
                .ok()
                .map(|listed| listed.into_iter().map(|vm| (vm.uid, vm.state)).collect()),
        );
        write_status(
            ctx,
            &host,
            ready,
            error,
            Allocated {
                cpu: u32::try_from(h.cpu).unwrap_or(u32::MAX),
                memory_mib: h.memory_mib,
            },
            h.agents,
        )
        .await;
    }
    // Of the agents as they were before any host was asked: a VM they record existed before
    // its host's list, so a list without it means it is gone. Only those the cache still holds
    // as they were: one that changed since (finished, say, and its VM freed) is decided on its
    // change already, and a kick would only decide a copy its own writes have superseded.
    for agent in vm_news(&agents, &probed) {
        let kick = ObjectRef::from_obj(agent);
        let current = ctx.agents.get(&kick);
        if current
            .is_some_and(|now| now.metadata.resource_version == agent.metadata.resource_version)
        {
            let _ = ctx.kick.send(kick);
        }
    }
}

/// What one probe pass found: for each host, its VMs' states by uid when it answered, `None`
/// when it did not. A host not in it is no FlintlockHost.
pub type Probed = HashMap<String, Option<HashMap<String, VmState>>>;

/// The agents a probe pass finds cause to decide again. A running agent has no timer
/// ([`crate::liveness`]), so what befalls its VM is found here: its host stopped answering or is
/// no FlintlockHost any more (and the agent does not say so yet), or it answered without the
/// agent's VM, or with the VM FAILED or being deleted. Only unfinished agents with a VM on
/// record and not being deleted: the others wait on timers of their own.
pub fn vm_news<'a>(agents: &'a [Arc<CachedAgent>], probed: &Probed) -> Vec<&'a CachedAgent> {
    agents
        .iter()
        .map(AsRef::as_ref)
        .filter(|agent| !agent.finished() && agent.metadata.deletion_timestamp.is_none())
        .filter(|agent| {
            let Some(status) = &agent.status else {
                return false;
            };
            let (Some(host), Some(vm)) = (&status.host, &status.vm_uid) else {
                return false;
            };
            match probed.get(host) {
                Some(Some(vms)) => {
                    !matches!(vms.get(vm), Some(VmState::Pending | VmState::Created))
                }
                _ => status.reason != Some(far_api::AgentReason::HostUnreachable),
            }
        })
        .collect()
}

/// Asks a host which of its VMs ended (far-host's extension; upstream has none), keeps the
/// answer for reconciles to read, and reconciles at once the agents whose VM newly ended.
pub async fn note_ended(
    ctx: &Context,
    host: &FlintlockHost,
    credentials: &crate::flintlock::Credentials,
) {
    let name = host.name_any();
    let answer = ctx
        .flintlock
        .ended(host, credentials, &ctx.config.defaults.namespace)
        .await;
    let guests = match answer {
        Ok(Some(guests)) => guests,
        Ok(None) => {
            ctx.ended
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
            return;
        }
        Err(e) => {
            warn!(host = %name, error = %e, "ListEnded failed");
            return;
        }
    };
    let now: std::collections::HashMap<String, _> =
        guests.into_iter().map(|g| (g.uid.clone(), g)).collect();
    let before = ctx
        .ended
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name, now.clone())
        .unwrap_or_default();
    for guest in now.values().filter(|g| !before.contains_key(&g.uid)) {
        let Some(owner) = VmName::parse(&guest.id) else {
            continue;
        };
        if let Some(agent) = ctx.agent_by_run(&owner.channel_id())
            && !agent
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(far_api::Phase::is_terminal)
        {
            let _ = ctx.kick.send(ObjectRef::from_obj(agent.as_ref()));
        }
    }
}

async fn write_status(
    ctx: &Context,
    host: &FlintlockHost,
    ready: bool,
    error: Option<String>,
    allocated: Allocated,
    agents: u32,
) {
    let now = Timestamp::now();
    let old = host.status.clone().unwrap_or_default();
    let mut new = FlintlockHostStatus {
        allocated: Some(allocated),
        agents,
        observed_generation: host.metadata.generation,
        ..old.clone()
    };
    let (reason, message) = match &error {
        None => ("Probed", "the host answered ListMicroVMs".to_owned()),
        Some(e) => ("Unreachable", e.clone()),
    };
    conditions::set(
        &mut new.conditions,
        host_condition::READY,
        ready,
        reason,
        &message,
        host.metadata.generation,
        now,
    );
    let stale = old
        .last_probe_time
        .as_ref()
        .is_none_or(|t| now.duration_since(t.0).unsigned_abs() >= PROBE_TIME_REFRESH);
    if new == old && !stale {
        return;
    }
    new.last_probe_time = Some(Time(now));
    let api: Api<FlintlockHost> = Api::all(ctx.client.clone());
    if let Err(e) = api
        .patch_status(
            &host.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": new})),
        )
        .await
    {
        warn!(host = %host.name_any(), error = %e, "host status not written");
    }
}

/// Which run each agent is on and which VM it owns, by agent UID.
fn owners(ctx: &Context) -> HashMap<String, Owner> {
    ctx.agents
        .state()
        .iter()
        .filter_map(|a| {
            let status = a.status.clone().unwrap_or_default();
            Some((
                a.uid()?,
                Owner {
                    attempt: status.restart_count,
                    finished: status.phase.is_some_and(far_api::Phase::is_terminal),
                    vm_uid: status.vm_uid,
                },
            ))
        })
        .collect()
}

/// A VM of FAR's a host listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Flintlock's uid (a ULID: later VMs sort after earlier ones).
    pub uid: String,
    /// Its name, which names its agent and attempt ([`VmName`]).
    pub id: String,
    /// Its state.
    pub state: VmState,
    /// Its size.
    pub size: VmSize,
}

impl Listed {
    fn of(vm: flintlock_proto::listing::ListedMicroVm) -> Option<Self> {
        let spec = vm.spec?;
        Some(Self {
            uid: spec.uid?,
            id: spec.id,
            state: crate::flintlock::vm_state(vm.status.map(|s| s.state)),
            size: VmSize {
                vcpu: u32::try_from(spec.vcpu).unwrap_or_default(),
                memory_mib: u32::try_from(spec.memory_in_mb).unwrap_or_default(),
            },
        })
    }

    /// Already being deleted.
    pub fn deleting(&self) -> bool {
        self.state == VmState::Deleting
    }
}

/// What the controller's cache says of an agent that may own VMs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Its current attempt.
    pub attempt: u32,
    /// Completed or Failed: no VM of it is kept (its own reconcile frees the one in status;
    /// this frees one whose uid never reached status).
    pub finished: bool,
    /// The VM its status records for that attempt.
    pub vm_uid: Option<String>,
}

/// Why a VM is deleted by the probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Surplus {
    /// No FarAgent has its name.
    Orphan,
    /// Its agent has moved on to a later attempt.
    EarlierAttempt,
    /// Its agent has finished.
    Finished,
    /// A second VM of its agent's current attempt; the one kept (in status, else the oldest),
    /// when known.
    Duplicate(Option<String>),
}

impl Surplus {
    /// A closed-set name, for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Surplus::Orphan => "orphan",
            Surplus::EarlierAttempt => "earlier_attempt",
            Surplus::Finished => "finished",
            Surplus::Duplicate(_) => "duplicate",
        }
    }
}

/// The VMs of one host's list that no agent keeps, and why. The VMs of live pools (`pools`,
/// UIDs) are the pool manager's, and a pool's VM that an agent claimed (`claimed`, channel ids)
/// is that agent's until its reconcile deletes it. Otherwise a finished agent keeps none; an
/// unfinished one keeps the VM of its current attempt that its status records, or, before status records one, the oldest of that
/// name on the host (the one a reconcile adopts). Every other VM of the attempt is a duplicate,
/// on this host or any other. VMs of attempts later than the cache knows are left alone (the
/// cache may lag), as are VMs already being deleted.
pub fn surplus<'a>(
    vms: &'a [Listed],
    owners: &HashMap<String, Owner>,
    pools: &HashSet<String>,
    claimed: &HashSet<String>,
) -> Vec<(&'a Listed, Surplus)> {
    let mut oldest: HashMap<&str, &str> = HashMap::new();
    for vm in vms.iter().filter(|vm| !vm.deleting()) {
        let first = oldest.entry(vm.id.as_str()).or_insert(vm.uid.as_str());
        if vm.uid.as_str() < *first {
            *first = vm.uid.as_str();
        }
    }
    vms.iter()
        .filter(|vm| !vm.deleting())
        .filter_map(|vm| {
            let name = VmName::parse(&vm.id)?;
            if pools.contains(&name.uid) || claimed.contains(&name.channel_id()) {
                return None;
            }
            let why = match owners.get(&name.uid) {
                None => Surplus::Orphan,
                Some(owner) if owner.finished => Surplus::Finished,
                Some(owner) if name.attempt < owner.attempt => {
                    if owner.vm_uid.as_deref() == Some(vm.uid.as_str()) {
                        return None;
                    }
                    Surplus::EarlierAttempt
                }
                Some(owner) if name.attempt > owner.attempt => return None,
                Some(owner) => match &owner.vm_uid {
                    Some(kept) if *kept == vm.uid => return None,
                    Some(kept) => Surplus::Duplicate(Some(kept.clone())),
                    None if oldest.get(vm.id.as_str()) == Some(&vm.uid.as_str()) => return None,
                    None => Surplus::Duplicate(oldest.get(vm.id.as_str()).map(|k| (*k).to_owned())),
                },
            };
            Some((vm, why))
        })
        .collect()
}

/// A Warning Event on the agent a duplicate VM belongs to: it should never happen.
async fn tell_duplicate(ctx: &Context, vm: &Listed, kept: &Option<String>, host: &str) {
    let Some(owner) = VmName::parse(&vm.id) else {
        return;
    };
    let Some(agent) = ctx.agent_by_run(&owner.channel_id()) else {
        return;
    };
    let kept = kept.as_deref().unwrap_or("another");
    crate::reconcile::publish_on(
        ctx,
        agent.as_ref(),
        true,
        "DuplicateVM",
        format!(
            "VM {} on host {host} is a second VM of attempt {}; deleting it and keeping VM {kept}",
            vm.uid, owner.attempt
        ),
    )
    .await;
}

/// Probes hosts forever.
pub async fn run(ctx: Arc<Context>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    loop {
        ticks.tick().await;
        probe_all(&ctx).await;
        if ctx.pools_ready() {
            ctx.pool_vms.mark_listed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123abcd-0000-4000-8000-000000000001";

    fn vm(uid: &str, attempt: u32) -> Listed {
        Listed {
            uid: uid.into(),
            id: format!("ns.agent.{attempt}.{A}"),
            state: VmState::Created,
            size: VmSize {
                vcpu: 1,
                memory_mib: 512,
            },
        }
    }

    fn owner(attempt: u32, vm_uid: Option<&str>) -> HashMap<String, Owner> {
        HashMap::from([(
            A.to_owned(),
            Owner {
                attempt,
                finished: false,
                vm_uid: vm_uid.map(str::to_owned),
            },
        )])
    }

    fn judged(vms: &[Listed], owners: &HashMap<String, Owner>) -> Vec<(String, Surplus)> {
        surplus(vms, owners, &HashSet::new(), &HashSet::new())
            .into_iter()
            .map(|(vm, why)| (vm.uid.clone(), why))
            .collect()
    }

    #[test]
    fn a_second_vm_of_an_attempt_goes_and_the_one_in_status_stays() {
        let vms = [vm("01B", 0), vm("01A", 0)];
        assert_eq!(
            judged(&vms, &owner(0, Some("01B"))),
            [("01A".to_owned(), Surplus::Duplicate(Some("01B".into())))]
        );
    }

    #[test]
    fn before_status_records_one_the_oldest_stays() {
        let vms = [vm("01B", 0), vm("01A", 0), vm("01C", 0)];
        assert_eq!(
            judged(&vms, &owner(0, None)),
            [
                ("01B".to_owned(), Surplus::Duplicate(Some("01A".into()))),
                ("01C".to_owned(), Surplus::Duplicate(Some("01A".into())))
            ]
        );
        assert!(
            judged(&vms[1..2], &owner(0, None)).is_empty(),
            "one VM is no duplicate"
        );
    }

    #[test]
    fn orphans_and_earlier_attempts_go_later_attempts_and_deleting_vms_are_left() {
        let mut deleting = vm("01D", 0);
        deleting.state = VmState::Deleting;
        let vms = [vm("01A", 0), vm("01E", 2), deleting];
        assert_eq!(
            judged(&vms, &owner(1, None)),
            [("01A".to_owned(), Surplus::EarlierAttempt)]
        );
        assert_eq!(
            judged(&vms[..1], &HashMap::new()),
            [("01A".to_owned(), Surplus::Orphan)]
        );
        // An earlier attempt's VM that status still records stays (its reconcile frees it).
        assert!(judged(&vms[..1], &owner(1, Some("01A"))).is_empty());
    }

    #[test]
    fn a_finished_agent_keeps_no_vm_even_one_status_never_recorded() {
        let mut finished = owner(0, None);
        finished.get_mut(A).unwrap().finished = true;
        assert_eq!(
            judged(&[vm("01A", 0)], &finished),
            [("01A".to_owned(), Surplus::Finished)]
        );
    }

    fn placed(name: &str, status: serde_json::Value, deleting: bool) -> Arc<CachedAgent> {
        let mut metadata = serde_json::json!({"name": name, "namespace": "n", "uid": name});
        if deleting {
            metadata["deletionTimestamp"] = "2027-01-15T08:00:00Z".into();
        }
        let agent: far_api::FarAgent = serde_json::from_value(serde_json::json!({
            "apiVersion": "tiffany.dev/v1", "kind": "FarAgent", "metadata": metadata,
            "spec": {"image": "busybox:1", "memory": "256Mi", "cpu": 1, "entrypoint": "/bin/a"},
            "status": status,
        }))
        .unwrap();
        Arc::new(agent.into())
    }

    fn on(host: &str, vm: &str, phase: &str, reason: &str) -> serde_json::Value {
        serde_json::json!({"phase": phase, "reason": reason, "host": host, "vmUid": vm})
    }

    /// Running agents have no timer: the probe is what finds their VMs gone, failed or being
    /// deleted, and their hosts silent or removed; once each, and only for agents with a VM on
    /// record that are neither finished nor being deleted.
    #[test]
    fn a_probe_decides_again_the_agents_whose_vm_it_finds_in_trouble() {
        let agents = [
            placed("fine", on("h1", "01A", "Running", "Running"), false),
            placed("booting", on("h1", "01B", "Pending", "Booting"), false),
            placed("gone", on("h1", "01C", "Running", "Running"), false),
            placed("failed", on("h1", "01D", "Running", "Running"), false),
            placed("torn-down", on("h1", "01E", "Running", "Running"), false),
            placed("silent-host", on("h2", "01F", "Running", "Running"), false),
            placed(
                "said-so",
                on("h2", "01G", "Running", "HostUnreachable"),
                false,
            ),
            placed("host-removed", on("h3", "01H", "Running", "Running"), false),
            placed("finished", on("h1", "01I", "Completed", "Completed"), false),
            placed("deleted", on("h1", "01J", "Running", "Running"), true),
            placed(
                "creating",
                serde_json::json!({"phase": "Pending", "host": "h1"}),
                false,
            ),
            placed("new", serde_json::Value::Null, false),
        ];
        let probed = Probed::from([
            (
                "h1".to_owned(),
                Some(HashMap::from([
                    ("01A".to_owned(), VmState::Created),
                    ("01B".to_owned(), VmState::Pending),
                    ("01D".to_owned(), VmState::Failed),
                    ("01E".to_owned(), VmState::Deleting),
                ])),
            ),
            ("h2".to_owned(), None),
        ]);
        let names: Vec<String> = vm_news(&agents, &probed)
            .into_iter()
            .map(|a| a.name_any())
            .collect();
        assert_eq!(
            names,
            ["gone", "failed", "torn-down", "silent-host", "host-removed"]
        );
    }

    /// A live pool's VMs are the pool manager's; a dead pool's are orphans unless an agent
    /// claimed them, and then they are that agent's.
    #[test]
    fn pool_vms_are_left_to_their_pool_or_their_claimant() {
        const P: &str = "0123abcd-0000-4000-8000-00000000000p";
        let pool_vm = |serial: u32| Listed {
            id: format!("ns.warm.{serial}.{P}"),
            uid: format!("01P{serial}"),
            ..vm("x", 0)
        };
        let vms = [pool_vm(1), pool_vm(2)];
        let live = HashSet::from([P.to_owned()]);
        let none = HashSet::new();
        assert!(surplus(&vms, &HashMap::new(), &live, &none).is_empty());
        let claimed = HashSet::from([format!("{P}.2")]);
        assert_eq!(
            surplus(&vms, &HashMap::new(), &none, &claimed)
                .into_iter()
                .map(|(vm, why)| (vm.uid.clone(), why))
                .collect::<Vec<_>>(),
            [("01P1".to_owned(), Surplus::Orphan)]
        );
    }
}
