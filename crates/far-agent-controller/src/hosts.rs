//! FlintlockHosts: probed over gRPC for readiness, their allocation derived from the agents
//! placed on them, and their VMs checked for orphans.
//!
//! One pass every [`PROBE_INTERVAL`]: each host is asked for every VM in FAR's Flintlock
//! namespace. An answer makes it Ready; silence makes it not Ready. Any VM whose owner (read
//! from its name, [`far_vmspec::VmName`]) is no FarAgent, or is an earlier attempt of one, is
//! deleted. Host status is written only when it changes, plus `lastProbeTime` once a minute.

use std::sync::Arc;
use std::time::Duration;

use far_api::{Allocated, FlintlockHost, FlintlockHostStatus, host_condition};
use far_vmspec::VmName;
use flintlock_proto::types::micro_vm_status::MicroVmState;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tracing::{info, warn};

use crate::conditions;
use crate::placement::held;
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
    let held = held(agents.iter().map(AsRef::as_ref));
    for host in ctx.hosts.state() {
        let name = host.name_any();
        let credentials = crate::reconcile::host_credentials(ctx, &host)
            .await
            .unwrap_or_default();
        let probe = ctx
            .flintlock
            .list(&host, &credentials, &ctx.config.defaults.namespace, None)
            .await;
        let ready = probe.is_ok();
        match &probe {
            Ok(vms) => {
                ctx.unreachable
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&name);
                // Orphans only once the agents are known: an empty cache is not "no agents".
                // The owners are read after the host's list: a VM listed was created by a
                // reconcile of an agent already in the cache, so no VM is younger than its owner here.
                let owners = owners(ctx);
                note_ended(ctx, &host, &credentials).await;
                if ctx.agents_ready() {
                    for vm in vms {
                        let Some(spec) = &vm.spec else { continue };
                        let Some(uid) = spec.uid.clone() else {
                            continue;
                        };
                        let deleting = vm
                            .status
                            .as_ref()
                            .is_some_and(|s| s.state == MicroVmState::Deleting as i32);
                        let Some(owner) = VmName::parse(&spec.id) else {
                            continue;
                        };
                        let orphan = match owners.get(&owner.uid) {
                            None => true,
                            Some((attempt, current)) => {
                                owner.attempt < *attempt && current.as_deref() != Some(uid.as_str())
                            }
                        };
                        if orphan && !deleting {
                            info!(host = %name, vm = %uid, id = %spec.id, "deleting orphaned VM");
                            if let Err(e) = ctx.flintlock.delete(&host, &credentials, &uid).await {
                                warn!(host = %name, vm = %uid, error = %e, "orphaned VM not deleted");
                            }
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
        write_status(
            ctx,
            &host,
            ready,
            probe.err().map(|e| e.to_string()),
            Allocated {
                cpu: u32::try_from(h.cpu).unwrap_or(u32::MAX),
                memory_mib: h.memory_mib,
            },
            h.agents,
        )
        .await;
    }
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
        let agent = ctx
            .by_uid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&owner.uid)
            .cloned();
        let running = agent
            .as_ref()
            .and_then(|r| ctx.agents.get(r))
            .is_some_and(|a| {
                !a.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(far_api::Phase::is_terminal)
            });
        if let (Some(agent), true) = (agent, running) {
            let _ = ctx.kick.send(agent);
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
fn owners(ctx: &Context) -> std::collections::HashMap<String, (u32, Option<String>)> {
    ctx.agents
        .state()
        .iter()
        .filter_map(|a| {
            let status = a.status.clone().unwrap_or_default();
            Some((a.uid()?, (status.restart_count, status.vm_uid)))
        })
        .collect()
}

/// Probes hosts forever.
pub async fn run(ctx: Arc<Context>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    loop {
        ticks.tick().await;
        probe_all(&ctx).await;
    }
}
