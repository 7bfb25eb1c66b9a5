//! What the web UI shows, computed from the controller's caches: one row per agent, host and
//! pool, and the changes between two looks. Pure, so the rows and the diff are unit-tested; no
//! row carries a secret (no env, args or secret values: only names, phases, places and counts).

use std::collections::{BTreeMap, HashMap};

use far_api::{FarAgentPool, FlintlockHost, host_condition};
use kube::ResourceExt;
use serde::Serialize;

use crate::cache::CachedAgent;

/// One agent, as the agents table shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRow {
    /// `namespace/name`.
    pub key: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Phase (`Pending` before the controller wrote any).
    pub phase: String,
    /// One-word reason.
    pub reason: String,
    /// The FlintlockHost it is placed on.
    pub host: Option<String>,
    /// Its last heartbeat, RFC 3339: the page shows its age (the row stays the same as time
    /// passes, so no update is sent for it).
    pub heartbeat: Option<String>,
    /// The exit code, once known.
    pub exit_code: Option<i32>,
    /// Created, RFC 3339.
    pub created: Option<String>,
}

/// One host, as the hosts grid shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRow {
    /// Name.
    pub name: String,
    /// Answered its last probe and not seen unreachable since.
    pub ready: bool,
    /// Cordoned.
    pub unschedulable: bool,
    /// vCPUs for VMs.
    pub cpu: u64,
    /// Memory for VMs, MiB.
    pub memory_mib: u64,
    /// vCPUs held (agents' VMs and idle pool VMs).
    pub cpu_allocated: u64,
    /// Memory held, MiB.
    pub memory_allocated_mib: u64,
    /// Agents placed on it and not finished.
    pub agents: u32,
    /// When the controller last probed it, RFC 3339.
    pub last_probe: Option<String>,
}

/// One pool.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolRow {
    /// `namespace/name`.
    pub key: String,
    /// Idle VMs.
    pub idle: u32,
    /// Booting VMs.
    pub booting: u32,
    /// Claimed VMs.
    pub busy: u32,
    /// Idle VMs it keeps.
    pub desired: u32,
    /// Claims served by an idle VM.
    pub warm_claims: u64,
    /// Claims that booted their own VM.
    pub cold_claims: u64,
    /// Claims a second, as its autoscaler measures them.
    pub claim_rate: f64,
}

/// Everything the page shows, at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct View {
    /// By key.
    pub agents: BTreeMap<String, AgentRow>,
    /// By name.
    pub hosts: Vec<HostRow>,
    /// By key.
    pub pools: Vec<PoolRow>,
}

/// What changed between two views: agents one by one, hosts and pools whole (few, small).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Delta {
    /// Agents new or changed.
    pub upsert: Vec<AgentRow>,
    /// Keys of agents gone.
    pub remove: Vec<String>,
    /// All hosts, when any changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<HostRow>>,
    /// All pools, when any changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pools: Option<Vec<PoolRow>>,
}

impl Delta {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty()
            && self.remove.is_empty()
            && self.hosts.is_none()
            && self.pools.is_none()
    }
}

fn time(t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> Option<String> {
    t.map(|t| t.0.to_string())
}

/// An agent's row.
pub fn agent_row(agent: &CachedAgent) -> AgentRow {
    // Borrowed, not cloned: this runs for every agent at every look.
    let status = agent.status.as_ref();
    let namespace = agent.namespace().unwrap_or_default();
    let name = agent.name_any();
    AgentRow {
        key: format!("{namespace}/{name}"),
        namespace,
        name,
        phase: status
            .and_then(|s| s.phase)
            .map_or("Pending", far_api::Phase::as_str)
            .to_owned(),
        reason: status
            .and_then(|s| s.reason)
            .map_or("", far_api::AgentReason::as_str)
            .to_owned(),
        host: status.and_then(|s| s.host.clone()),
        heartbeat: time(status.and_then(|s| s.last_heartbeat_time.as_ref())),
        exit_code: status.and_then(|s| s.exit_code),
        created: time(agent.metadata.creation_timestamp.as_ref()),
    }
}

/// What the hosts hold now, by host: vCPUs, MiB and agents.
pub type Allocation = HashMap<String, (u64, u64, u32)>;

/// A host's row; `reachable` from the controller's own calls (sooner than the next probe's
/// status write), `allocation` from its caches.
pub fn host_row(host: &FlintlockHost, reachable: bool, allocation: &Allocation) -> HostRow {
    let status = host.status.clone().unwrap_or_default();
    let name = host.name_any();
    let (cpu_allocated, memory_allocated_mib, agents) =
        allocation.get(&name).copied().unwrap_or_default();
    HostRow {
        ready: reachable && crate::conditions::is_true(&status.conditions, host_condition::READY),
        unschedulable: host.spec.unschedulable,
        cpu: u64::from(host.spec.capacity.cpu),
        memory_mib: far_api::quantity::Memory::parse(&host.spec.capacity.memory)
            .map_or(0, |m| m.mib_ceil()),
        cpu_allocated,
        memory_allocated_mib,
        agents,
        last_probe: time(status.last_probe_time.as_ref()),
        name,
    }
}

/// A pool's row, with its measured claim rate.
pub fn pool_row(pool: &FarAgentPool, claim_rate: f64) -> PoolRow {
    let status = pool.status.clone().unwrap_or_default();
    PoolRow {
        key: format!(
            "{}/{}",
            pool.namespace().unwrap_or_default(),
            pool.name_any()
        ),
        idle: status.idle,
        booting: status.booting,
        busy: status.busy,
        desired: status.desired_idle,
        warm_claims: status.warm_claims,
        cold_claims: status.cold_claims,
        // Two decimals: a rate that wobbles in the fourth is no change worth sending.
        claim_rate: (claim_rate * 100.0).round() / 100.0,
    }
}

/// What changed from `before` to `now`.
pub fn diff(before: &View, now: &View) -> Delta {
    Delta {
        upsert: now
            .agents
            .values()
            .filter(|row| before.agents.get(&row.key) != Some(row))
            .cloned()
            .collect(),
        remove: before
            .agents
            .keys()
            .filter(|key| !now.agents.contains_key(*key))
            .cloned()
            .collect(),
        hosts: (before.hosts != now.hosts).then(|| now.hosts.clone()),
        pools: (before.pools != now.pools).then(|| now.pools.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agent(name: &str, status: serde_json::Value) -> CachedAgent {
        serde_json::from_value(json!({
            "apiVersion": "tiffany.dev/v1", "kind": "FarAgent",
            "metadata": {"name": name, "namespace": "team", "uid": "u",
                         "creationTimestamp": "2026-12-02T03:00:00Z"},
            "spec": {"image": "busybox:1", "memory": "256Mi", "cpu": 1, "entrypoint": "/bin/a",
                     "args": ["--token", "sk-in-args"],
                     "env": [{"name": "API_KEY", "value": "sk-literal"}]},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn an_agents_row_has_what_the_table_shows_and_nothing_of_its_spec() {
        let row = agent_row(&agent(
            "a",
            json!({"phase": "Running", "reason": "Running", "host": "blade-1",
                   "lastHeartbeatTime": "2026-12-02T03:00:05Z"}),
        ));
        assert_eq!(row.key, "team/a");
        assert_eq!(
            (row.phase.as_str(), row.reason.as_str()),
            ("Running", "Running")
        );
        assert_eq!(row.host.as_deref(), Some("blade-1"));
        assert_eq!(row.heartbeat.as_deref(), Some("2026-12-02T03:00:05Z"));
        let text = serde_json::to_string(&row).unwrap();
        assert!(!text.contains("sk-"), "{text}");
        let fresh = agent_row(&agent("b", json!({})));
        assert_eq!(
            (fresh.phase.as_str(), fresh.reason.as_str()),
            ("Pending", "")
        );
    }

    #[test]
    fn the_diff_sends_changed_and_new_agents_and_names_the_gone() {
        let view = |rows: &[(&str, &str)], hosts: usize| View {
            agents: rows
                .iter()
                .map(|(name, phase)| {
                    let row = agent_row(&agent(name, json!({"phase": phase})));
                    (row.key.clone(), row)
                })
                .collect(),
            hosts: (0..hosts)
                .map(|i| HostRow {
                    name: format!("h{i}"),
                    ready: true,
                    unschedulable: false,
                    cpu: 8,
                    memory_mib: 8192,
                    cpu_allocated: 0,
                    memory_allocated_mib: 0,
                    agents: 0,
                    last_probe: None,
                })
                .collect(),
            pools: vec![],
        };
        let before = view(&[("a", "Pending"), ("b", "Running")], 1);
        let now = view(&[("a", "Running"), ("c", "Pending")], 1);
        let delta = diff(&before, &now);
        let upserted: Vec<_> = delta.upsert.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(upserted, ["team/a", "team/c"]);
        assert_eq!(delta.remove, ["team/b"]);
        assert_eq!(delta.hosts, None, "unchanged hosts are not sent");
        assert!(diff(&now, &now).is_empty());
        assert_eq!(
            diff(&now, &view(&[("a", "Running"), ("c", "Pending")], 2))
                .hosts
                .map(|h| h.len()),
            Some(2)
        );
    }
}
