//! The `FlintlockHost` custom resource: one Flintlock endpoint that runs agents' microVMs, the
//! way a Node runs Pods.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::patterns;

/// A Flintlock endpoint (upstream flintlockd or far-host) and what it can hold.
///
/// Its labels are what a FarAgent's `hostSelector` matches.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tiffany.dev",
    version = "v1",
    kind = "FlintlockHost",
    plural = "flintlockhosts",
    singular = "flintlockhost",
    shortname = "flh",
    category = "tiffany",
    doc = "A Flintlock endpoint (upstream flintlockd or FAR's far-host) that runs agents' microVMs, the way a Node runs Pods. Its labels are what a FarAgent's hostSelector matches.",
    status = "FlintlockHostStatus",
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".spec.endpoint","description":"The host's Flintlock gRPC endpoint."}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status","description":"Whether the host answered its last probe."}"#,
    printcolumn = r#"{"name":"Agents","type":"integer","jsonPath":".status.agents","description":"Agents placed on the host."}"#,
    printcolumn = r#"{"name":"Unschedulable","type":"boolean","jsonPath":".spec.unschedulable","priority":1,"description":"Cordoned: no new agents."}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = kube::core::Rule::new("!has(self.tlsSecretRef) || self.endpoint.startsWith('https://')")
    .message("tlsSecretRef needs an https:// endpoint"))]
#[serde(rename_all = "camelCase")]
pub struct FlintlockHostSpec {
    /// Flintlock gRPC endpoint: `https://host:9090` (TLS, upstream's default) or
    /// `http://host:9090` (plaintext, for loopback development hosts).
    #[schemars(length(min = 1, max = 512), regex(pattern = patterns::ENDPOINT))]
    pub endpoint: String,

    /// Secret with `ca.crt` (to verify the host) and, for mutual TLS, `tls.crt` and `tls.key`
    /// (the controller's client certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_ref: Option<SecretRef>,

    /// Secret holding the host's shared token, sent as `authorization: basic <base64(token)>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,

    /// Flintlock provider to ask for (`firecracker`, `cloudhypervisor`, or far-host's `qemu` and
    /// `sim`). Unset: the host's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = patterns::PROVIDER))]
    pub provider: Option<String>,

    /// What the host can hold in total; placement never allocates past it.
    pub capacity: HostCapacity,

    /// The VM sizes the host accepts. Upstream flintlockd refuses VMs under 1024 MiB; an agent
    /// asking for less gets a VM of `minMemory` on such a host (reported in its status).
    #[serde(default)]
    pub vm_limits: VmLimits,

    /// Linux bridge on the host that agents' TAP interfaces join. Unset: the host's default
    /// network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15), regex(pattern = patterns::BRIDGE_NAME))]
    pub bridge_name: Option<String>,

    /// Cordon: no new agents are placed here; running agents are left alone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unschedulable: bool,
}

/// A Secret in a named namespace (FlintlockHost is cluster-scoped).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = patterns::DNS_SUBDOMAIN))]
    pub name: String,

    /// Namespace of the Secret. Unset: the controller's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = patterns::DNS_LABEL))]
    pub namespace: Option<String>,
}

/// A key of a Secret in a named namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = patterns::DNS_SUBDOMAIN))]
    pub name: String,

    /// Namespace of the Secret. Unset: the controller's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = patterns::DNS_LABEL))]
    pub namespace: Option<String>,

    /// Key within the Secret.
    #[serde(default = "default_token_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = patterns::CONFIG_KEY))]
    pub key: String,
}

fn default_token_key() -> String {
    "token".to_owned()
}

/// Total resources of a host available to agents' VMs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HostCapacity {
    /// Virtual CPUs available to VMs in total.
    #[schemars(range(min = 1, max = 100000))]
    pub cpu: u32,

    /// Memory available to VMs in total, as a Kubernetes quantity (`64Gi`).
    #[schemars(length(min = 1, max = 32), regex(pattern = patterns::MEMORY_QUANTITY))]
    pub memory: String,
}

/// Bounds on a single VM's size that the host enforces.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VmLimits {
    /// Smallest VM memory the host accepts (upstream flintlockd: 1024 MiB). Smaller requests
    /// are sized up to this.
    #[serde(default = "default_min_memory")]
    #[schemars(length(min = 1, max = 32), regex(pattern = patterns::MEMORY_QUANTITY))]
    pub min_memory: String,

    /// Largest VM memory the host accepts (upstream flintlockd: 32768 MiB). An agent asking for
    /// more cannot be placed on this host.
    #[serde(default = "default_max_memory")]
    #[schemars(length(min = 1, max = 32), regex(pattern = patterns::MEMORY_QUANTITY))]
    pub max_memory: String,

    /// Most vCPUs one VM may have (upstream flintlockd: 64).
    #[serde(default = "default_max_cpu")]
    #[schemars(range(min = 1, max = 64))]
    pub max_cpu: u32,
}

fn default_min_memory() -> String {
    "1Gi".to_owned()
}

fn default_max_memory() -> String {
    "32Gi".to_owned()
}

fn default_max_cpu() -> u32 {
    64
}

impl Default for VmLimits {
    fn default() -> Self {
        Self {
            min_memory: default_min_memory(),
            max_memory: default_max_memory(),
            max_cpu: default_max_cpu(),
        }
    }
}

/// What the controller knows of the host.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FlintlockHostStatus {
    /// `Ready`: True when the host answered its last probe.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Resources held by the agents placed on the host (the sizes of their VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<Allocated>,

    /// Agents placed on the host and not yet finished.
    #[serde(default)]
    pub agents: u32,

    /// When the controller last probed the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Resources allocated on a host.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Allocated {
    /// vCPUs of the VMs placed on the host.
    pub cpu: u32,
    /// Memory of the VMs placed on the host, in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
}

/// Condition types a FlintlockHost carries.
pub mod condition {
    /// The host answered its last probe.
    pub const READY: &str = "Ready";
}
