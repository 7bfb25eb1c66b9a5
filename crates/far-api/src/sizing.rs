//! How big a FarAgent's VM is on a given host.
//!
//! The rule, in one place: the VM gets the vCPUs the agent asks for, and the memory it asks for
//! rounded up to whole MiB, then raised to the host's smallest VM when that is larger (upstream
//! flintlockd refuses VMs under 1024 MiB, while agents commonly ask for 512Mi). A request above
//! the host's largest VM, or with more vCPUs than the host allows, does not fit that host at all.
//! The size used is reported in `status.vm`, and a raised size is said in the Scheduled
//! condition's message: an agent is never silently given something other than it asked for.

use crate::{
    VmLimits, VmSize,
    quantity::{Memory, QuantityError},
    workload::ResolvedWorkload,
};

/// The VM size chosen for an agent on one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizing {
    /// The VM's size.
    pub vm: VmSize,
    /// The memory the agent asked for, in MiB (rounded up).
    pub requested_memory_mib: u64,
}

impl Sizing {
    /// Whether the VM has more memory than the agent asked for.
    pub fn raised(&self) -> bool {
        u64::from(self.vm.memory_mib) > self.requested_memory_mib
    }

    /// A sentence for status saying what was asked and what was given.
    pub fn describe(&self, host: &str) -> String {
        if self.raised() {
            format!(
                "asked for {} MiB; host {host} runs no VM under {} MiB, so the VM has {} MiB and {} vCPU",
                self.requested_memory_mib, self.vm.memory_mib, self.vm.memory_mib, self.vm.vcpu
            )
        } else {
            format!(
                "VM of {} MiB and {} vCPU on host {host}",
                self.vm.memory_mib, self.vm.vcpu
            )
        }
    }
}

/// Why an agent's VM cannot be sized for a host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizingError {
    /// The agent's `spec.memory` does not parse (admission normally stops this).
    #[error("spec.memory: {0}")]
    AgentMemory(#[source] QuantityError),
    /// The host's `spec.vmLimits` does not parse.
    #[error("host {host}: spec.vmLimits.{field}: {source}")]
    HostLimits {
        /// The FlintlockHost.
        host: String,
        /// `minMemory` or `maxMemory`.
        field: &'static str,
        /// The parse failure.
        #[source]
        source: QuantityError,
    },
    /// More memory than the host's largest VM.
    #[error("asks for {requested_mib} MiB; host {host} runs no VM over {max_mib} MiB")]
    MemoryTooLarge {
        /// The FlintlockHost.
        host: String,
        /// What the agent asked for.
        requested_mib: u64,
        /// The host's largest VM.
        max_mib: u64,
    },
    /// More vCPUs than the host allows in one VM.
    #[error("asks for {requested} vCPU; host {host} runs no VM over {max} vCPU")]
    TooManyCpus {
        /// The FlintlockHost.
        host: String,
        /// What the agent asked for.
        requested: u32,
        /// The host's largest VM.
        max: u32,
    },
}

/// Sizes an agent's VM for a host with the given limits.
///
/// # Errors
/// [`SizingError`] when the agent does not fit the host, or a quantity does not parse.
pub fn size_vm(
    spec: &ResolvedWorkload,
    host: &str,
    limits: &VmLimits,
) -> Result<Sizing, SizingError> {
    let requested = Memory::parse(&spec.memory).map_err(SizingError::AgentMemory)?;
    let host_limit = |field, text: &str| {
        Memory::parse(text).map_err(|source| SizingError::HostLimits {
            host: host.to_owned(),
            field,
            source,
        })
    };
    let min = host_limit("minMemory", &limits.min_memory)?.mib_ceil();
    let max = host_limit("maxMemory", &limits.max_memory)?.mib_ceil();
    let requested_mib = requested.mib_ceil();
    if requested_mib > max {
        return Err(SizingError::MemoryTooLarge {
            host: host.to_owned(),
            requested_mib,
            max_mib: max,
        });
    }
    if spec.cpu > limits.max_cpu {
        return Err(SizingError::TooManyCpus {
            host: host.to_owned(),
            requested: spec.cpu,
            max: limits.max_cpu,
        });
    }
    let memory_mib = requested_mib.max(min);
    Ok(Sizing {
        vm: VmSize {
            vcpu: spec.cpu,
            // Bounded by `max`, which is at most the 16-digit schema limit in MiB; Flintlock's
            // field is an int32, so clamp rather than wrap for absurd host limits.
            memory_mib: u32::try_from(memory_mib).unwrap_or(u32::MAX),
        },
        requested_memory_mib: requested_mib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::embedder_workload;
    use proptest::prelude::*;

    fn limits(min: &str, max: &str, cpu: u32) -> VmLimits {
        VmLimits {
            min_memory: min.into(),
            max_memory: max.into(),
            max_cpu: cpu,
        }
    }

    #[test]
    fn small_request_is_raised_to_the_hosts_minimum_and_says_so() {
        let sizing = size_vm(&embedder_workload(), "blade-1", &VmLimits::default()).unwrap();
        assert_eq!(
            sizing.vm,
            VmSize {
                vcpu: 1,
                memory_mib: 1024
            }
        );
        assert!(sizing.raised());
        assert_eq!(
            sizing.describe("blade-1"),
            "asked for 512 MiB; host blade-1 runs no VM under 1024 MiB, so the VM has 1024 MiB and 1 vCPU"
        );
    }

    #[test]
    fn request_within_bounds_is_used_as_is() {
        let sizing = size_vm(&embedder_workload(), "dev", &limits("128Mi", "4Gi", 4)).unwrap();
        assert_eq!(sizing.vm.memory_mib, 512);
        assert!(!sizing.raised());
    }

    #[test]
    fn request_over_the_hosts_largest_vm_does_not_fit() {
        let mut spec = embedder_workload();
        spec.memory = "64Gi".into();
        let err = size_vm(&spec, "blade-1", &VmLimits::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "asks for 65536 MiB; host blade-1 runs no VM over 32768 MiB"
        );
        spec.memory = "1Gi".into();
        spec.cpu = 8;
        let err = size_vm(&spec, "small", &limits("1Gi", "2Gi", 4)).unwrap_err();
        assert!(matches!(
            err,
            SizingError::TooManyCpus {
                requested: 8,
                max: 4,
                ..
            }
        ));
    }

    #[test]
    fn a_bad_host_limit_names_the_host_and_field() {
        let err = size_vm(&embedder_workload(), "h", &limits("lots", "2Gi", 4)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("host h: spec.vmLimits.minMemory:"),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn a_fitting_vm_is_never_smaller_than_asked_nor_outside_the_host_bounds(
            asked in 1u64..70_000, min in 1u64..4096, span in 0u64..40_000, cpu in 1u32..8,
        ) {
            let mut spec = embedder_workload();
            spec.memory = format!("{asked}Mi");
            spec.cpu = cpu;
            let max = min + span;
            let l = limits(&format!("{min}Mi"), &format!("{max}Mi"), 4);
            match size_vm(&spec, "h", &l) {
                Ok(s) => {
                    let mib = u64::from(s.vm.memory_mib);
                    prop_assert!(mib >= asked && mib >= min && mib <= max);
                    prop_assert!(cpu <= 4);
                    prop_assert_eq!(s.raised(), asked < min);
                }
                Err(SizingError::MemoryTooLarge { .. }) => prop_assert!(asked > max),
                Err(SizingError::TooManyCpus { .. }) => prop_assert!(cpu > 4),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
