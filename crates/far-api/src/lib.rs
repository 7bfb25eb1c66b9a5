//! FAR's Kubernetes API (`tiffany.dev/v1`).
//!
//! - [`FarAgent`]: one agent, run to completion in its own microVM.
//! - [`FlintlockHost`]: one Flintlock endpoint that runs those VMs, like a Node.
//! - [`FarAgentPool`]: VMs booted ahead of demand from one template, which FarAgents claim.
//!
//! The CRDs are generated from these types ([`crds`]); their admission rules (schema and CEL)
//! are evaluated client-side by [`admission`], the VM sizing rule lives in [`sizing`], and how
//! an agent and its pool's template combine in [`workload`].

pub mod admission;
mod agent;
mod binding;
mod host;
pub mod manifest;
pub mod patterns;
mod pool;
pub mod quantity;
pub mod sizing;
pub mod workload;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use binding::{BINDING_ANNOTATION, Binding};

pub use agent::{
    AgentReason, EnvVar, EnvVarSource, FarAgent, FarAgentSpec, FarAgentStatus, GuestUsage,
    Heartbeat, ImageVolume, KernelOverride, KeyRef, KeyToPath, Network, Phase, PoolRef,
    RestartPolicy, SecretFile, StaticAddress, VmSize, Workload, condition as agent_condition,
};
pub use host::{
    Allocated, FlintlockHost, FlintlockHostSpec, FlintlockHostStatus, HostCapacity, SecretKeyRef,
    SecretRef, VmLimits, condition as host_condition,
};
pub use pool::{FarAgentPool, FarAgentPoolSpec, FarAgentPoolStatus, POOL_LABEL, Reuse};

/// The API group of every FAR resource.
pub const GROUP: &str = "tiffany.dev";

/// The finalizer the controller puts on every FarAgent so its VM is deleted before it goes.
pub const FINALIZER: &str = "tiffany.dev/vm-cleanup";

/// Every CRD, FarAgent first.
pub fn crds() -> [CustomResourceDefinition; 3] {
    [FarAgent::crd(), FlintlockHost::crd(), FarAgentPool::crd()]
}

/// Every CRD as one multi-document YAML stream, as `far crd` prints and `deploy/crds` holds.
///
/// # Errors
/// When YAML serialization fails (it does not for these types).
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// The mission's `embedder-worker-01` workload, resolved.
    pub fn embedder_workload() -> workload::ResolvedWorkload {
        workload::resolve(&embedder_spec().workload, None).unwrap()
    }

    /// The mission's `embedder-worker-01` spec.
    pub fn embedder_spec() -> FarAgentSpec {
        FarAgentSpec {
            workload: Workload {
                image: Some("ghcr.io/microscaler/tiffany-vm:v0.3.1".into()),
                memory: Some("512Mi".into()),
                cpu: Some(1),
                entrypoint: Some("/usr/local/bin/tiffany".into()),
                args: vec!["--task".into(), "embedder".into()],
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
}
