//! FAR's Kubernetes API (`tiffany.dev/v1`).
//!
//! - [`FarAgent`]: one agent, run to completion in its own microVM.
//! - [`FlintlockHost`]: one Flintlock endpoint that runs those VMs, like a Node.
//!
//! The CRDs are generated from these types ([`crds`]); their admission rules (schema and CEL)
//! are evaluated client-side by [`admission`], and the VM sizing rule lives in [`sizing`].

pub mod admission;
mod agent;
mod binding;
mod host;
pub mod manifest;
pub mod patterns;
pub mod quantity;
pub mod sizing;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use binding::{BINDING_ANNOTATION, Binding};

pub use agent::{
    AgentReason, EnvVar, EnvVarSource, FarAgent, FarAgentSpec, FarAgentStatus, GuestUsage,
    Heartbeat, ImageVolume, KernelOverride, KeyRef, KeyToPath, Network, Phase, RestartPolicy,
    SecretFile, StaticAddress, VmSize, condition as agent_condition,
};
pub use host::{
    Allocated, FlintlockHost, FlintlockHostSpec, FlintlockHostStatus, HostCapacity, SecretKeyRef,
    SecretRef, VmLimits, condition as host_condition,
};

/// The API group of every FAR resource.
pub const GROUP: &str = "tiffany.dev";

/// The finalizer the controller puts on every FarAgent so its VM is deleted before it goes.
pub const FINALIZER: &str = "tiffany.dev/vm-cleanup";

/// Both CRDs, FarAgent first.
pub fn crds() -> [CustomResourceDefinition; 2] {
    [FarAgent::crd(), FlintlockHost::crd()]
}

/// Both CRDs as one multi-document YAML stream, as `far crd` prints and `deploy/crds` holds.
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

    /// The mission's `embedder-worker-01` spec.
    pub fn embedder_spec() -> FarAgentSpec {
        FarAgentSpec {
            image: "ghcr.io/microscaler/tiffany-vm:v0.3.1".into(),
            memory: "512Mi".into(),
            cpu: 1,
            entrypoint: "/usr/local/bin/tiffany".into(),
            args: vec!["--task".into(), "embedder".into()],
            env: vec![],
            secret_files: vec![],
            volumes: vec![],
            kernel: None,
            host_selector: Default::default(),
            restart_policy: RestartPolicy::Never,
            backoff_limit: 3,
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            heartbeat: Heartbeat::default(),
            network: None,
        }
    }
}
