//! The `FarAgent` custom resource: one autonomous agent, run to completion in its own microVM.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::patterns;

/// The desired agent: what runs, in what image, with how much CPU and memory.
///
/// The whole spec is immutable once created: a microVM cannot be reshaped, so a change means a
/// new FarAgent.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tiffany.dev",
    version = "v1",
    kind = "FarAgent",
    plural = "faragents",
    singular = "faragent",
    shortname = "fa",
    category = "tiffany",
    namespaced,
    doc = "An autonomous agent run to completion in its own microVM, created through Flintlock on a FlintlockHost. The VM boots straight into the agent: it is never a Kubernetes node.",
    status = "FarAgentStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Where the agent is in its life: Pending, Running, Completed or Failed."}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.reason","description":"Why the agent is in its phase."}"#,
    printcolumn = r#"{"name":"Host","type":"string","jsonPath":".status.host","description":"The FlintlockHost running the agent's microVM."}"#,
    printcolumn = r#"{"name":"Exit","type":"integer","jsonPath":".status.exitCode","description":"The agent's exit code once it has finished."}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = kube::core::Rule::new("self == oldSelf").message(
    "spec is immutable: a microVM cannot be reshaped; delete the FarAgent and create a new one"
))]
#[x_kube(validation = kube::core::Rule::new("has(self.poolRef) || has(self.image)").message(
    "image is required unless poolRef names a FarAgentPool, whose template then supplies it"
))]
#[x_kube(validation = kube::core::Rule::new("has(self.poolRef) || has(self.memory)").message(
    "memory is required unless poolRef names a FarAgentPool, whose template then supplies it"
))]
#[x_kube(validation = kube::core::Rule::new("has(self.poolRef) || has(self.cpu)").message(
    "cpu is required unless poolRef names a FarAgentPool, whose template then supplies it"
))]
#[x_kube(validation = kube::core::Rule::new("has(self.poolRef) || has(self.entrypoint)").message(
    "entrypoint is required unless poolRef names a FarAgentPool, whose template then supplies it"
))]
#[x_kube(validation = kube::core::Rule::new("!has(self.poolRef) || !has(self.network)").message(
    "network cannot be set with poolRef: a pool's VMs are networked when they boot, before any claim"
))]
#[serde(rename_all = "camelCase")]
pub struct FarAgentSpec {
    /// What runs, and in what VM.
    #[serde(flatten)]
    pub workload: Workload,

    /// Claim an idle, already booted VM of this FarAgentPool (in the agent's namespace) instead
    /// of booting one. The pool's template supplies what the agent leaves out; the VM's shape
    /// (image, memory, cpu, volumes, kernel, hostSelector) must match the pool's if given. No
    /// idle VM: the agent boots cold on the pool's template (condition reason ColdStart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_ref: Option<PoolRef>,

    /// Whether a failed agent is run again in a fresh VM: `Never` (the default) or `OnFailure`.
    #[serde(default)]
    pub restart_policy: RestartPolicy,

    /// How many times an agent with `restartPolicy: OnFailure` is restarted before it is marked
    /// Failed for good. Restarts back off exponentially from 10 s up to 5 minutes.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub backoff_limit: u32,

    /// Seconds the agent may run, counted from its first start, before it is stopped and marked
    /// Failed with reason DeadlineExceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,

    /// Seconds after the agent finishes (Completed or Failed) before the FarAgent deletes itself.
    /// Unset keeps it until someone deletes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// How often the agent's init reports in, and how long silence is tolerated.
    #[serde(default)]
    pub heartbeat: Heartbeat,

    /// The VM's network interface. Unset: one interface that far-init configures by DHCP
    /// (from the DHCP server on the host's bridge; under far-host, QEMU's user-mode network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
}

fn default_backoff_limit() -> u32 {
    3
}

/// What runs and in what VM: the part of a FarAgent's spec a FarAgentPool's template can
/// supply. One type for both, so an agent and a pool are validated by the same rules.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// OCI image whose filesystem becomes the VM's root volume, e.g.
    /// `ghcr.io/microscaler/tiffany-vm:v0.3.1`. The image is used unchanged: FAR's init is
    /// delivered separately, as the VM's initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = patterns::IMAGE_REFERENCE))]
    pub image: Option<String>,

    /// Memory for the agent, as a Kubernetes quantity (`512Mi`, `2Gi`). The VM gets at least
    /// this much: a host whose smallest VM is larger sizes the VM up to its minimum, and
    /// `status.vm.memoryMiB` reports the size actually used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32), regex(pattern = patterns::MEMORY_QUANTITY))]
    pub memory: Option<String>,

    /// Whole virtual CPUs for the VM, from 1 to 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub cpu: Option<u32>,

    /// Absolute path, inside the image, of the program to run as the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 4096))]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('/')")
        .message("must be an absolute path inside the image, e.g. /usr/local/bin/tiffany"))]
    pub entrypoint: Option<String>,

    /// Arguments passed to the entrypoint, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 4096)))]
    pub args: Vec<String>,

    /// Environment variables for the agent: a literal `value`, or `valueFrom` a Secret or
    /// ConfigMap key resolved when the VM is created. The agent sees exactly these variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub env: Vec<EnvVar>,

    /// Secrets whose keys are written as files inside the VM (on a memory-backed filesystem,
    /// mode 0400), one directory per entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(
        merge_strategy = kube::core::ListMerge::Map(vec!["mountPath".into()]),
        validation = kube::core::Rule::new("self.all(f, self.all(g, f.mountPath == g.mountPath || !f.mountPath.startsWith(g.mountPath + '/')))")
            .message("secret file paths must not be nested inside one another")
    )]
    pub secret_files: Vec<SecretFile>,

    /// Read-only volumes built from OCI images, mounted inside the VM (models, data sets, tools).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[x_kube(
        merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]),
        validation = kube::core::Rule::new("self.all(v, self.exists_one(w, w.mountPath == v.mountPath))")
            .message("each volume needs its own mountPath")
    )]
    pub volumes: Vec<ImageVolume>,

    /// Boot a different kernel than the controller's default for this agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelOverride>,

    /// Only place the agent on FlintlockHosts whose labels include all of these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub host_selector: BTreeMap<String, String>,
}

/// One environment variable of the agent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = kube::core::Rule::new("!(has(self.value) && has(self.valueFrom))")
    .message("set either value or valueFrom, not both"))]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    /// Variable name: letters, digits, `_`, `-` and `.`, not starting with a digit.
    #[schemars(length(min = 1, max = 256), regex(pattern = patterns::ENV_NAME))]
    pub name: String,

    /// Literal value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub value: Option<String>,

    /// Take the value from a Secret or ConfigMap key in the agent's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

/// Where an environment variable's value comes from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = kube::core::Rule::new("has(self.secretKeyRef) != has(self.configMapKeyRef)")
    .message("set exactly one of secretKeyRef or configMapKeyRef"))]
#[serde(rename_all = "camelCase")]
pub struct EnvVarSource {
    /// A key of a Secret in the agent's namespace. The value is never logged or shown in status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,

    /// A key of a ConfigMap in the agent's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
}

/// A key of a named Secret or ConfigMap in the agent's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// Name of the Secret or ConfigMap.
    #[schemars(length(min = 1, max = 253), regex(pattern = patterns::DNS_SUBDOMAIN))]
    pub name: String,

    /// Key within it.
    #[schemars(length(min = 1, max = 253), regex(pattern = patterns::CONFIG_KEY))]
    pub key: String,

    /// When true, a missing Secret, ConfigMap or key leaves the variable unset instead of
    /// holding the agent in Pending.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

/// A Secret written as files inside the VM.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretFile {
    /// Name of the Secret in the agent's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = patterns::DNS_SUBDOMAIN))]
    pub secret_name: String,

    /// Absolute directory inside the VM; each key becomes a file in it.
    #[schemars(length(min = 2, max = 1024))]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('/') && !self.endsWith('/') && !self.contains('/../') && !self.endsWith('/..') && !self.contains('//')")
        .message("must be an absolute directory path such as /var/run/secrets/api, without '..', '//' or a trailing '/'"))]
    pub mount_path: String,

    /// Only these keys, each at its own relative path. Unset: every key, named after the key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub items: Vec<KeyToPath>,
}

/// One Secret key written at a chosen relative path.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeyToPath {
    /// Key of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = patterns::CONFIG_KEY))]
    pub key: String,

    /// Relative file path under the entry's mountPath.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = kube::core::Rule::new("!self.startsWith('/') && !self.startsWith('../') && !self.contains('/../') && !self.endsWith('/..') && self != '..'")
        .message("must be a relative path that stays inside mountPath (no leading '/', no '..')"))]
    pub path: String,
}

/// A read-only volume built from an OCI image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageVolume {
    /// Volume name, unique within the agent: lower-case letters, digits and `_`, starting
    /// with a letter (it becomes a Flintlock volume id).
    #[schemars(length(min = 1, max = 63), regex(pattern = patterns::VOLUME_NAME))]
    pub name: String,

    /// OCI image whose filesystem is the volume's content.
    #[schemars(length(min = 1, max = 512), regex(pattern = patterns::IMAGE_REFERENCE))]
    pub image: String,

    /// Absolute path inside the VM where the volume is mounted, read-only.
    #[schemars(length(min = 2, max = 1024))]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('/') && !self.contains('/../') && !self.endsWith('/..') && self != '/'")
        .message("must be an absolute path other than /, without '..'"))]
    pub mount_path: String,
}

/// A kernel other than the controller's default.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KernelOverride {
    /// OCI image holding the kernel.
    #[schemars(length(min = 1, max = 512), regex(pattern = patterns::IMAGE_REFERENCE))]
    pub image: String,

    /// Path of the kernel file within the image, e.g. `boot/vmlinux`.
    #[schemars(length(min = 1, max = 1024), regex(pattern = patterns::RELATIVE_FILE))]
    pub filename: String,

    /// Kernel command-line arguments merged over the defaults by key; an empty value is a bare
    /// flag.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub cmdline: BTreeMap<String, String>,
}

/// A FarAgentPool to claim a VM of.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolRef {
    /// Name of the FarAgentPool, in the agent's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = patterns::DNS_SUBDOMAIN))]
    pub name: String,
}

/// What happens when an agent fails.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestartPolicy {
    /// A failed agent stays Failed.
    #[default]
    Never,
    /// A failed agent is run again in a fresh VM, up to `backoffLimit` times.
    OnFailure,
}

/// Heartbeat settings for the agent's init.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[x_kube(validation = kube::core::Rule::new("self.timeoutSeconds >= 2 * self.intervalSeconds")
    .message("timeoutSeconds must be at least twice intervalSeconds, so one lost heartbeat is not fatal"))]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// Seconds between heartbeats.
    #[serde(default = "default_heartbeat_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub interval_seconds: u32,

    /// Seconds without a heartbeat after which a running agent is marked Failed with reason
    /// HeartbeatLost. Also bounds the wait for the first heartbeat after the VM boots.
    #[serde(default = "default_heartbeat_timeout")]
    #[schemars(range(min = 2, max = 86400))]
    pub timeout_seconds: u32,
}

fn default_heartbeat_interval() -> u32 {
    10
}

fn default_heartbeat_timeout() -> u32 {
    60
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            interval_seconds: default_heartbeat_interval(),
            timeout_seconds: default_heartbeat_timeout(),
        }
    }
}

/// The VM's network interface.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// A static address for the interface, handed to the guest as cloud-init network-config v2
    /// and applied by far-init. Unset: see network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<StaticAddress>,
}

/// A static IPv4 address for the VM's interface.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StaticAddress {
    /// The address with its prefix length, e.g. `10.0.0.5/24`.
    #[schemars(regex(pattern = patterns::IPV4_CIDR))]
    pub cidr: String,

    /// The default gateway, e.g. `10.0.0.1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = patterns::IPV4))]
    pub gateway: Option<String>,

    /// DNS servers, e.g. `10.0.0.1`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3), inner(regex(pattern = patterns::IPV4)))]
    pub nameservers: Vec<String>,
}

/// What is known of the agent and its VM.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FarAgentStatus {
    /// Where the agent is in its life: Pending (not yet running), Running (its init has reported
    /// in), Completed (exited 0) or Failed (exited non-zero, or could not run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// One word saying why the agent is in its phase. Pending: Unschedulable (no host fits),
    /// ConfigMissing (a Secret or ConfigMap is missing), ConfigTooLarge (env and args beyond
    /// what Firecracker's metadata service holds), Provisioning (VM being created),
    /// Booting (VM started, init not yet reported in), BackOff (waiting to restart),
    /// HostUnreachable. Running: Running. Completed: Completed. Failed: Error (non-zero exit),
    /// StartError, VMFailed, BootTimeout, HeartbeatLost, DeadlineExceeded, InvalidSpec.
    /// Terminating while the FarAgent is being deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<AgentReason>,

    /// A sentence for humans with the details behind the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// Name of the FlintlockHost the agent was placed on. Set before any VM is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,

    /// Flintlock's uid of the agent's current VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_uid: Option<String>,

    /// Flintlock's state of the current VM: PENDING, CREATED, FAILED or DELETING. CREATED only
    /// means the hypervisor started; the phase says whether the agent runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_state: Option<String>,

    /// The size of the VM actually created, which may be larger than requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmSize>,

    /// What the agent's guest last said of itself in a heartbeat. Written with
    /// lastHeartbeatTime (at Running, then every 4 to 6 minutes), not at every heartbeat;
    /// live figures are the controller's metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestUsage>,

    /// When the agent's current run started (its first heartbeat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the agent's init last reported in. Refreshed coarsely, not at every heartbeat: every
    /// 4 to 6 minutes, each agent on a period of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,

    /// When the agent reached Completed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<Time>,

    /// The agent's exit code, once it has exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,

    /// How many times the agent has been restarted in a fresh VM.
    #[serde(default)]
    pub restart_count: u32,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Scheduled, VMCreated, AgentReady and Finished, each with a stable reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// A guest's use of its VM, as its init reported it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GuestUsage {
    /// Milliseconds from the kernel's start to the agent's entrypoint, as far-init measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_to_entrypoint_ms: Option<u64>,
    /// Memory in use in the guest, MiB.
    #[serde(rename = "memoryUsedMiB")]
    pub memory_used_mib: u64,
    /// Memory the guest's kernel manages, MiB.
    #[serde(rename = "memoryTotalMiB")]
    pub memory_total_mib: u64,
    /// CPU time used in the guest since boot, milliseconds.
    pub cpu_used_ms: u64,
}

/// The size of a VM as created.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VmSize {
    /// Virtual CPUs.
    pub vcpu: u32,
    /// Memory in MiB. Larger than the request when the host's smallest VM is larger.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u32,
}

/// Where a FarAgent is in its life.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Accepted, not yet running: being placed, provisioned or booted.
    Pending,
    /// The agent's init has reported in and the agent runs.
    Running,
    /// The agent exited 0.
    Completed,
    /// The agent exited non-zero, or could not be run; `reason` says which.
    Failed,
}

impl Phase {
    /// Completed and Failed are final: nothing moves an agent out of them.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed)
    }

    /// The phase's name as written in status, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Completed => "Completed",
            Phase::Failed => "Failed",
        }
    }
}

/// Why a FarAgent is in its phase. Stable values: tools may match on them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AgentReason {
    /// No Ready, schedulable FlintlockHost matching hostSelector has room for the agent.
    Unschedulable,
    /// A Secret or ConfigMap the agent needs is missing.
    ConfigMissing,
    /// The agent's run configuration (its env and args, ConfigMap values included) is larger
    /// than Firecracker's metadata service holds; Secrets do not count (they go over the status
    /// channel).
    ConfigTooLarge,
    /// The VM is being created on its host.
    Provisioning,
    /// The VM exists; waiting for the agent's init to report in.
    Booting,
    /// The agent runs.
    Running,
    /// Waiting before restarting a failed agent (restartPolicy OnFailure).
    BackOff,
    /// The agent exited 0.
    Completed,
    /// The agent exited non-zero.
    Error,
    /// The agent could not be started inside the VM (missing entrypoint, bad configuration).
    StartError,
    /// Flintlock reported the VM FAILED.
    VMFailed,
    /// The agent's init did not report in within the heartbeat timeout after the VM started.
    BootTimeout,
    /// The agent's init stopped reporting in.
    HeartbeatLost,
    /// The agent ran longer than activeDeadlineSeconds.
    DeadlineExceeded,
    /// The agent's host does not answer.
    HostUnreachable,
    /// A host refused to create the agent's VM (its message says why); the agent is placed on
    /// another host that fits, or waits for one.
    CreateRefused,
    /// The spec cannot be run as written (for example a memory size no host accepts).
    InvalidSpec,
    /// The FarAgent is being deleted and its VM torn down.
    Terminating,
    /// spec.poolRef names no FarAgentPool in the agent's namespace; the agent waits for it.
    PoolNotFound,
    /// The agent's pool had no idle VM, so one was booted for it (the VMCreated condition's
    /// reason).
    ColdStart,
    /// The agent claimed an idle VM of its pool, booted ahead of it (the VMCreated condition's
    /// reason).
    WarmStart,
}

impl AgentReason {
    /// The reason's name as written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentReason::Unschedulable => "Unschedulable",
            AgentReason::ConfigMissing => "ConfigMissing",
            AgentReason::ConfigTooLarge => "ConfigTooLarge",
            AgentReason::Provisioning => "Provisioning",
            AgentReason::Booting => "Booting",
            AgentReason::Running => "Running",
            AgentReason::BackOff => "BackOff",
            AgentReason::Completed => "Completed",
            AgentReason::Error => "Error",
            AgentReason::StartError => "StartError",
            AgentReason::VMFailed => "VMFailed",
            AgentReason::BootTimeout => "BootTimeout",
            AgentReason::HeartbeatLost => "HeartbeatLost",
            AgentReason::DeadlineExceeded => "DeadlineExceeded",
            AgentReason::HostUnreachable => "HostUnreachable",
            AgentReason::CreateRefused => "CreateRefused",
            AgentReason::InvalidSpec => "InvalidSpec",
            AgentReason::Terminating => "Terminating",
            AgentReason::PoolNotFound => "PoolNotFound",
            AgentReason::ColdStart => "ColdStart",
            AgentReason::WarmStart => "WarmStart",
        }
    }
}

/// Condition types a FarAgent carries.
pub mod condition {
    /// The agent has a host.
    pub const SCHEDULED: &str = "Scheduled";
    /// The agent's current VM exists on its host.
    pub const VM_CREATED: &str = "VMCreated";
    /// The agent's init has reported in and the agent runs.
    pub const AGENT_READY: &str = "AgentReady";
    /// The agent has finished, successfully or not.
    pub const FINISHED: &str = "Finished";
    /// The order of a life, in which status lists them (and `kubectl describe` shows them).
    pub const LIFECYCLE: [&str; 4] = [SCHEDULED, VM_CREATED, AGENT_READY, FINISHED];
}
