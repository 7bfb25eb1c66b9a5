//! Which FlintlockHost an agent goes to: capacity-aware, like the Kubernetes scheduler's
//! filter and score, and pure.
//!
//! A host is a candidate when it is Ready, not cordoned, carries every `hostSelector` label,
//! accepts the agent's VM size ([`far_api::sizing`]) and has room for it after what its agents
//! already hold. Among candidates the one with the most memory left wins (spreading load;
//! ties go to the name that sorts first, so the choice is deterministic).

use std::collections::{BTreeMap, HashMap};

use far_api::sizing::size_vm;
use far_api::workload::ResolvedWorkload;
use far_api::{Binding, VmLimits};

use crate::cache::CachedAgent;
use crate::decision::Placement;

/// What placement needs to know of one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostView {
    /// The FlintlockHost's name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Whether its last probe succeeded.
    pub ready: bool,
    /// Cordoned.
    pub unschedulable: bool,
    /// Total vCPUs for VMs.
    pub cpu: u64,
    /// Total memory for VMs, MiB.
    pub memory_mib: u64,
    /// Its VM size bounds.
    pub limits: VmLimits,
}

/// Resources held on one host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// vCPUs.
    pub cpu: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Agents.
    pub agents: u32,
}

/// What every host holds: the VM sizes of the agents placed on it (bound, or recorded in
/// status) and not finished.
pub fn held<'a>(agents: impl IntoIterator<Item = &'a CachedAgent>) -> HashMap<String, Held> {
    let mut by_host: HashMap<String, Held> = HashMap::new();
    for agent in agents {
        if agent.finished() {
            continue;
        }
        if let Some(placed) = agent.placement() {
            let h = by_host.entry(placed.host).or_default();
            h.cpu += u64::from(placed.vm.vcpu);
            h.memory_mib += u64::from(placed.vm.memory_mib);
            h.agents += 1;
        }
    }
    by_host
}

/// The placement an attempt already has: its binding, described as when it was made.
pub fn bound(workload: &ResolvedWorkload, binding: &Binding, hosts: &[HostView]) -> Placement {
    let message = hosts
        .iter()
        .find(|h| h.name == binding.host)
        .and_then(|h| size_vm(workload, &h.name, &h.limits).ok())
        .filter(|sizing| sizing.vm == binding.vm)
        .map_or_else(
            || {
                format!(
                    "VM of {} MiB and {} vCPU on host {}",
                    binding.vm.memory_mib, binding.vm.vcpu, binding.host
                )
            },
            |sizing| sizing.describe(&binding.host),
        );
    Placement::Fits {
        host: binding.host.clone(),
        vm: binding.vm,
        message,
        bound: true,
        claimed: binding.claimed.clone(),
    }
}

/// Places an agent. Hosts in `refused` turned this attempt's VM down (host -> what it said):
/// they are passed over, and when nothing else fits the placement says so.
pub fn place(
    workload: &ResolvedWorkload,
    hosts: &[HostView],
    held: &HashMap<String, Held>,
    refused: &BTreeMap<String, String>,
) -> Placement {
    let mut best: Option<(u64, &HostView, far_api::sizing::Sizing)> = None;
    let mut passed = Vec::new();
    let mut sorted: Vec<&HostView> = hosts.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for host in sorted {
        let why_not = if let Some(said) = refused.get(&host.name) {
            Some(format!("refused the VM: {said}"))
        } else if !host.ready {
            Some("not Ready".to_owned())
        } else if host.unschedulable {
            Some("cordoned".to_owned())
        } else if let Some((k, v)) = workload
            .host_selector
            .iter()
            .find(|(k, v)| host.labels.get(*k) != Some(*v))
        {
            Some(format!("lacks label {k}={v}"))
        } else {
            match size_vm(workload, &host.name, &host.limits) {
                Err(e) => Some(e.to_string()),
                Ok(sizing) => {
                    let used = held.get(&host.name).copied().unwrap_or_default();
                    let cpu_left = host.cpu.saturating_sub(used.cpu);
                    let mem_left = host.memory_mib.saturating_sub(used.memory_mib);
                    if u64::from(sizing.vm.vcpu) > cpu_left {
                        Some(format!("{cpu_left} vCPU free, needs {}", sizing.vm.vcpu))
                    } else if u64::from(sizing.vm.memory_mib) > mem_left {
                        Some(format!(
                            "{mem_left} MiB free, needs {}",
                            sizing.vm.memory_mib
                        ))
                    } else {
                        let left = mem_left - u64::from(sizing.vm.memory_mib);
                        if best.as_ref().is_none_or(|(l, _, _)| left > *l) {
                            best = Some((left, host, sizing));
                        }
                        None
                    }
                }
            }
        };
        if let Some(why) = why_not {
            passed.push(format!("{}: {why}", host.name));
        }
    }
    match best {
        Some((_, host, sizing)) => Placement::Fits {
            host: host.name.clone(),
            vm: sizing.vm,
            message: sizing.describe(&host.name),
            bound: false,
            claimed: None,
        },
        None if hosts.is_empty() => Placement::Unschedulable("no FlintlockHost exists".into()),
        None => {
            let why = format!("0/{} hosts fit: {}", hosts.len(), passed.join("; "));
            if hosts.iter().any(|h| refused.contains_key(&h.name)) {
                Placement::Refused(why)
            } else {
                Placement::Unschedulable(why)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use far_api::{
        FarAgent, FarAgentSpec, FarAgentStatus, Heartbeat, Phase, RestartPolicy, VmSize, Workload,
    };
    use proptest::prelude::*;

    fn spec(memory: &str, cpu: u32) -> FarAgentSpec {
        FarAgentSpec {
            workload: Workload {
                image: Some("busybox:1".into()),
                memory: Some(memory.into()),
                cpu: Some(cpu),
                entrypoint: Some("/bin/agent".into()),
                ..Workload::default()
            },
            pool_ref: None,
            restart_policy: RestartPolicy::Never,
            backoff_limit: 3,
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            heartbeat: Heartbeat::default(),
            network: None,
        }
    }

    fn workload(memory: &str, cpu: u32) -> ResolvedWorkload {
        far_api::workload::resolve(&spec(memory, cpu).workload, None).unwrap()
    }

    fn host(name: &str, cpu: u64, memory_mib: u64) -> HostView {
        HostView {
            name: name.into(),
            labels: Default::default(),
            ready: true,
            unschedulable: false,
            cpu,
            memory_mib,
            limits: VmLimits::default(),
        }
    }

    #[test]
    fn the_host_with_most_memory_left_wins_and_the_vm_is_sized_for_it() {
        let hosts = [host("a", 8, 4096), host("b", 8, 8192)];
        let Placement::Fits {
            host, vm, message, ..
        } = place(
            &workload("512Mi", 1),
            &hosts,
            &HashMap::new(),
            &BTreeMap::new(),
        )
        else {
            panic!()
        };
        assert_eq!(
            (host.as_str(), vm),
            (
                "b",
                VmSize {
                    vcpu: 1,
                    memory_mib: 1024
                }
            )
        );
        assert!(message.contains("runs no VM under 1024 MiB"), "{message}");
    }

    #[test]
    fn unschedulable_says_why_each_host_was_passed_over() {
        let mut sel = workload("512Mi", 2);
        sel.host_selector.insert("zone".into(), "a".into());
        let mut cordoned = host("b", 8, 8192);
        cordoned.unschedulable = true;
        let mut down = host("c", 8, 8192);
        down.ready = false;
        let mut full = host("d", 8, 8192);
        full.labels.insert("zone".into(), "a".into());
        let mut other_zone = host("a", 8, 8192);
        other_zone.labels.insert("zone".into(), "b".into());
        let used = HashMap::from([(
            "d".to_owned(),
            Held {
                cpu: 7,
                memory_mib: 0,
                agents: 3,
            },
        )]);
        assert_eq!(
            place(&sel, &[other_zone, cordoned, down, full], &used, &BTreeMap::new()),
            Placement::Unschedulable("0/4 hosts fit: a: lacks label zone=a; b: cordoned; c: not Ready; d: 1 vCPU free, needs 2".into())
        );
        assert_eq!(
            place(&sel, &[], &used, &BTreeMap::new()),
            Placement::Unschedulable("no FlintlockHost exists".into())
        );
    }

    #[test]
    fn a_host_that_refused_the_vm_is_passed_over_and_named() {
        let hosts = [host("a", 8, 8192), host("b", 8, 4096)];
        let refused = BTreeMap::from([(
            "a".to_owned(),
            "INVALID_ARGUMENT: provider qemu not served".to_owned(),
        )]);
        let Placement::Fits { host, .. } =
            place(&workload("512Mi", 1), &hosts, &HashMap::new(), &refused)
        else {
            panic!()
        };
        assert_eq!(host, "b", "the other host, though it has less memory left");
        assert_eq!(
            place(
                &workload("512Mi", 1),
                &hosts[..1],
                &HashMap::new(),
                &refused
            ),
            Placement::Refused(
                "0/1 hosts fit: a: refused the VM: INVALID_ARGUMENT: provider qemu not served"
                    .into()
            )
        );
    }

    #[test]
    fn a_binding_holds_its_host_before_status_says_so() {
        let mut bound = FarAgent::new("x", spec("1Gi", 1));
        bound.metadata.annotations = Some(BTreeMap::from([(
            far_api::BINDING_ANNOTATION.to_owned(),
            Binding {
                attempt: 0,
                host: "a".into(),
                vm: VmSize {
                    vcpu: 1,
                    memory_mib: 1024,
                },
                claimed: None,
            }
            .to_annotation(),
        )]));
        bound.status = Some(FarAgentStatus::default());
        assert_eq!(
            held([&CachedAgent::from(bound)])["a"],
            Held {
                cpu: 1,
                memory_mib: 1024,
                agents: 1
            }
        );
    }

    #[test]
    fn held_counts_unfinished_agents_on_each_host() {
        let agent = |host: &str, phase: Phase| {
            let mut a = FarAgent::new("x", spec("1Gi", 1));
            a.status = Some(FarAgentStatus {
                phase: Some(phase),
                host: Some(host.into()),
                vm: Some(VmSize {
                    vcpu: 2,
                    memory_mib: 1024,
                }),
                ..Default::default()
            });
            CachedAgent::from(a)
        };
        let agents = [
            agent("a", Phase::Running),
            agent("a", Phase::Pending),
            agent("a", Phase::Completed),
            agent("b", Phase::Running),
        ];
        let held = held(&agents);
        assert_eq!(
            held["a"],
            Held {
                cpu: 4,
                memory_mib: 2048,
                agents: 2
            }
        );
        assert_eq!(held["b"].agents, 1);
    }

    proptest! {
        #[test]
        fn a_placement_never_overcommits_a_host(
            caps in proptest::collection::vec((1u64..16, 1024u64..16384, 0u64..16, 0u64..16384, any::<bool>()), 1..6),
            mem in 1u64..8192, cpu in 1u32..8,
        ) {
            let hosts: Vec<HostView> = caps.iter().enumerate().map(|(i, (c, m, _, _, ready))| {
                let mut h = host(&format!("h{i}"), *c, *m);
                h.ready = *ready;
                h
            }).collect();
            let held: HashMap<String, Held> = caps.iter().enumerate()
                .map(|(i, (_, _, c, m, _))| (format!("h{i}"), Held { cpu: *c, memory_mib: *m, agents: 1 })).collect();
            if let Placement::Fits { host, vm, .. } = place(&workload(&format!("{mem}Mi"), cpu), &hosts, &held, &BTreeMap::new()) {
                let h = hosts.iter().find(|h| h.name == host).unwrap();
                prop_assert!(h.ready);
                prop_assert!(held[&host].cpu + u64::from(vm.vcpu) <= h.cpu);
                prop_assert!(held[&host].memory_mib + u64::from(vm.memory_mib) <= h.memory_mib);
                prop_assert!(u64::from(vm.memory_mib) >= mem);
            }
        }
    }
}
