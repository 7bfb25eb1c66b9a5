//! The `FarAgentPool` custom resource: VMs booted ahead of demand, which FarAgents claim.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Workload;

/// The label `status.labelSelector` selects: `tiffany.dev/pool=<pool name>`. FAR does not set it;
/// put it on a pool's FarAgents for tools that find them by the scale subresource's selector.
pub const POOL_LABEL: &str = "tiffany.dev/pool";

/// A pool of VMs booted from one template and kept idle until a FarAgent claims one.
///
/// A FarAgent names the pool in `spec.poolRef`; it gets an idle VM of the pool if one is ready,
/// and a VM booted cold on the pool's template otherwise. A VM runs one agent; with
/// `reuse: Reset` it is wiped and returns idle after the agent exits.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tiffany.dev",
    version = "v1",
    kind = "FarAgentPool",
    plural = "faragentpools",
    singular = "faragentpool",
    shortname = "fap",
    category = "tiffany",
    namespaced,
    doc = "A pool of microVMs booted from one template and kept idle, so that a FarAgent naming the pool in spec.poolRef starts on an already booted VM instead of booting one.",
    status = "FarAgentPoolStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.labelSelector"
    ),
    printcolumn = r#"{"name":"Idle","type":"integer","jsonPath":".status.idle","description":"VMs booted and waiting for a claim."}"#,
    printcolumn = r#"{"name":"Busy","type":"integer","jsonPath":".status.busy","description":"VMs running a claimed agent."}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredIdle","description":"Idle VMs the pool is keeping: the largest of minIdle, spec.replicas and the autoscaler's measure of demand, within maxSize."}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = kube::core::Rule::new("self.minIdle <= self.maxSize").message(
    "minIdle must not be greater than maxSize: the pool could never hold that many idle VMs"
))]
#[x_kube(validation = kube::core::Rule::new("self.replicas <= self.maxSize").message(
    "replicas (idle VMs asked for) must not be greater than maxSize"
))]
#[x_kube(validation = kube::core::Rule::new("has(self.template.image) && has(self.template.memory) && has(self.template.cpu)").message(
    "template needs image, memory and cpu: every VM of the pool is booted from them before any agent claims it"
))]
#[serde(rename_all = "camelCase")]
pub struct FarAgentPoolSpec {
    /// What every VM of the pool is booted from, and the defaults of the agents that claim one:
    /// an agent leaves out what the template says, or says the same for the VM's shape.
    pub template: Workload,

    /// Idle VMs asked for from outside: what `kubectl scale`, a HorizontalPodAutoscaler or
    /// KEDA write through the scale subresource. The pool keeps the largest of minIdle, this
    /// and what its own autoscaler measures demand to be, within maxSize. Defaults to 0, so
    /// the scale subresource always has a value to read.
    #[serde(default)]
    #[schemars(range(max = 10000))]
    pub replicas: u32,

    /// Idle VMs kept at the least, however few claims arrive.
    #[serde(default)]
    #[schemars(range(max = 10000))]
    pub min_idle: u32,

    /// Most VMs of the pool at once: idle, booting and busy together. Claims beyond it boot
    /// cold, outside the pool.
    #[schemars(range(min = 1, max = 10000))]
    pub max_size: u32,

    /// Seconds an idle VM beyond the desired count is kept before it is destroyed, so a burst's
    /// VMs serve the next burst.
    #[serde(default = "default_idle_timeout")]
    #[schemars(range(min = 0, max = 86400))]
    pub idle_timeout_seconds: i64,

    /// What happens to a VM after its agent exits: `Never` (the default) destroys it and the
    /// pool boots a fresh one; `Reset` wipes what the agent left (processes, writable files,
    /// secrets) and returns the VM idle, or destroys it if the wipe cannot be proven.
    #[serde(default)]
    pub reuse: Reuse,
}

fn default_idle_timeout() -> i64 {
    300
}

/// What happens to a pool's VM after its agent exits.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reuse {
    /// One agent per VM: the VM is destroyed when its agent exits.
    #[default]
    Never,
    /// After its agent exits, the VM is made clean (every process killed; /tmp, /run,
    /// /dev/shm and the secret files renewed) and waits for the next claim. Its root
    /// filesystem is read-only. For agents that trust each other: no defence against a hostile
    /// task running as root in the guest.
    Reset,
}

/// What is known of the pool's VMs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FarAgentPoolStatus {
    /// Idle and booting VMs: what the scale subresource reports as the current replicas.
    #[serde(default)]
    pub replicas: u32,

    /// Idle VMs ready for a claim: the scale subresource's ready replicas.
    #[serde(default)]
    pub ready_replicas: u32,

    /// VMs booted and waiting for a claim.
    #[serde(default)]
    pub idle: u32,

    /// VMs being created or booting.
    #[serde(default)]
    pub booting: u32,

    /// VMs running a claimed agent.
    #[serde(default)]
    pub busy: u32,

    /// Idle VMs the pool is keeping now: the largest of minIdle, spec.replicas and the
    /// autoscaler's measure of demand, within maxSize.
    #[serde(default)]
    pub desired_idle: u32,

    /// Claims served by an idle VM since the pool was created.
    #[serde(default)]
    pub warm_claims: u64,

    /// Claims that found no idle VM and booted cold on the template.
    #[serde(default)]
    pub cold_claims: u64,

    /// The label selector of the pool's FarAgents, for the scale subresource (and so for
    /// HorizontalPodAutoscalers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<String>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready: the pool holds its desired idle VMs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
