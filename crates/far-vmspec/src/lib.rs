//! From a FarAgent placed on a FlintlockHost to the exact `CreateMicroVMRequest` for its VM.
//!
//! Pure: no IO, no clock. The controller and `far run` both build requests here, so what a real
//! flintlockd needs is honoured in one place:
//! - the interface type is TAP, sent explicitly (the Firecracker provider rejects MACVTAP, the
//!   enum's zero value);
//! - `kernel.filename` is always set;
//! - every metadata value is base64;
//! - `overrides` is only sent with a `bridge_name` (upstream crashes otherwise);
//! - the VM's name carries the FarAgent's UID and the attempt number ([`VmName`]), so a deleted
//!   and re-created agent, or a restarted one, never adopts an old VM.

mod name;

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use far_api::sizing::{Sizing, SizingError, size_vm};
use far_api::workload::ResolvedWorkload;
use far_api::{FarAgent, FlintlockHost};
use flintlock_proto::types::{
    Initrd, Kernel, MicroVmSpec, NetworkInterface, NetworkOverrides, StaticAddress, Volume,
    VolumeSource, network_interface::IfaceType,
};
use flintlock_proto::v1alpha1::CreateMicroVmRequest;
use kube::ResourceExt;

pub use name::{MAX_ID_LEN, Owner, VmName, VmNameError};

/// The interface id FAR gives the agent's network interface. Upstream's Firecracker provider
/// adds its own interface for the metadata service; a distinct id keeps the two apart.
pub const INTERFACE_ID: &str = "agent0";

/// The root volume's id.
pub const ROOT_VOLUME_ID: &str = "root";

/// Labels FAR puts on every VM. Upstream flintlockd drops labels, so nothing may depend on them:
/// the VM's name is the source of truth ([`VmName`]).
pub mod labels {
    /// The FarAgent's namespace.
    pub const NAMESPACE: &str = "tiffany.dev/namespace";
    /// The FarAgent's name.
    pub const NAME: &str = "tiffany.dev/name";
    /// The FarAgent's UID.
    pub const UID: &str = "tiffany.dev/uid";
}

/// A kernel or initrd file inside an OCI image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFile {
    /// OCI image reference.
    pub image: String,
    /// Path of the file within the image.
    pub filename: String,
}

/// What the controller (or `far run`) decides for every VM it creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Defaults {
    /// Flintlock namespace holding FAR's VMs.
    pub namespace: String,
    /// The kernel booted unless the FarAgent overrides it.
    pub kernel: ImageFile,
    /// Kernel command line under any FarAgent override (an empty value is a bare flag).
    pub kernel_cmdline: BTreeMap<String, String>,
    /// The initrd carrying far-init, FAR's PID 1.
    pub initrd: ImageFile,
}

/// What one run of an agent does: everything from the spec, plus what only the caller knows
/// (resolved env, whether secret values wait on the channel). A cold VM reads it in its run
/// configuration; a pool's idle VM receives it with its claim.
///
/// # Errors
/// [`VmNameError`] when the FarAgent has no namespace or uid.
pub fn task(
    agent: &FarAgent,
    workload: &ResolvedWorkload,
    attempt: u32,
    env: Vec<far_agent_protocol::EnvVar>,
    has_secrets: bool,
) -> Result<far_agent_protocol::Task, VmNameError> {
    let name = VmName::for_agent(agent, attempt)?;
    Ok(far_agent_protocol::Task {
        agent: far_agent_protocol::AgentRef {
            namespace: name.namespace().to_owned(),
            name: name.name().to_owned(),
            uid: name.uid().to_owned(),
            attempt,
        },
        hostname: name.name().to_owned(),
        entrypoint: workload.entrypoint.clone(),
        args: workload.args.clone(),
        env,
        has_secrets,
        heartbeat_interval_seconds: agent.spec.heartbeat.interval_seconds,
    })
}

/// The run configuration far-init reads from the metadata service: how to reach the channel,
/// the VM's volumes, and the run's [`task`], or none for a pool's idle VM (it waits for a
/// claim).
pub fn run_config(
    task: Option<far_agent_protocol::Task>,
    workload: &ResolvedWorkload,
    channel: far_agent_protocol::ChannelConfig,
    grace_period_seconds: u32,
) -> far_agent_protocol::RunConfig {
    far_agent_protocol::RunConfig {
        version: far_agent_protocol::RUN_CONFIG_VERSION,
        task,
        mounts: (0u32..)
            .zip(&workload.volumes)
            .map(|(index, v)| far_agent_protocol::Mount {
                index,
                mount_path: v.mount_path.clone(),
            })
            .collect(),
        channel,
        grace_period_seconds,
        reusable: false,
    }
}

impl Defaults {
    /// Kernel image reference of a single machine's guest images (`scripts/build-guest`).
    pub const LOCAL_KERNEL_IMAGE: &'static str = "far.local/kernel:dev";
    /// far-init initrd image reference of a single machine's guest images.
    pub const LOCAL_INIT_IMAGE: &'static str = "far.local/far-init:dev";
    /// The initrd's file name in far-init's image (`scripts/build-guest`): an uncompressed cpio
    /// archive, which the kernel unpacks faster than a gzipped one.
    pub const INIT_FILENAME: &'static str = "initrd.cpio";

    /// Defaults for one machine (`far run`, `far bench`, tests): Flintlock namespace `far`, and
    /// the kernel and far-init initrd that `scripts/build-guest` builds, by the references above.
    pub fn local() -> Self {
        Self {
            namespace: "far".into(),
            kernel: ImageFile {
                image: Self::LOCAL_KERNEL_IMAGE.into(),
                filename: "vmlinuz".into(),
            },
            kernel_cmdline: BTreeMap::new(),
            initrd: ImageFile {
                image: Self::LOCAL_INIT_IMAGE.into(),
                filename: Self::INIT_FILENAME.into(),
            },
        }
    }
}

/// Why no request could be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The agent does not fit the host.
    #[error(transparent)]
    Sizing(#[from] SizingError),
    /// The FarAgent lacks what the API server always sets (namespace, UID).
    #[error(transparent)]
    Name(#[from] VmNameError),
    /// The guest's metadata would not fit Firecracker's metadata service.
    #[error(
        "spec.env and spec.args: the run configuration makes a metadata document of {bytes} bytes, and Firecracker's metadata service holds at most {MMDS_LIMIT_BYTES}: pass large values as Secrets (they go over the status channel) or in a volume"
    )]
    MetadataTooLarge {
        /// The document's size.
        bytes: usize,
    },
}

/// The most Firecracker's metadata service (MMDS) holds: its API's payload limit,
/// `--http-api-max-payload-size`, 51,200 bytes by default since Firecracker 0.25.1, which
/// flintlockd does not raise. A larger document makes the VM fail as it starts.
pub const MMDS_LIMIT_BYTES: usize = 51_200;

/// The document flintlockd gives Firecracker's MMDS for these values is
/// `{"latest": {key: value, ...}}`, each value a JSON string, plus the `meta-data` key it adds
/// (`instance_id: <uid>`): this is its size, with that key counted at its largest.
///
/// # Errors
/// [`PlanError::MetadataTooLarge`] past [`MMDS_LIMIT_BYTES`].
pub fn check_metadata(metadata: &BTreeMap<String, Vec<u8>>) -> Result<(), PlanError> {
    const META_DATA: usize = 128;
    let values: BTreeMap<&str, String> = metadata
        .iter()
        .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    let document = serde_json::json!({ "latest": values });
    let bytes = document.to_string().len() + META_DATA;
    if bytes > MMDS_LIMIT_BYTES {
        return Err(PlanError::MetadataTooLarge { bytes });
    }
    Ok(())
}

/// Everything one VM is made from: an agent's, or an idle one of a pool.
#[derive(Clone, Debug)]
pub struct VmPlan<'a> {
    /// Its name: an agent's attempt ([`VmName::for_agent`]) or a pool's VM
    /// ([`VmName::for_pool`]).
    pub name: &'a VmName,
    /// What it runs and in what VM, its pool's template applied.
    pub workload: &'a ResolvedWorkload,
    /// The agent's network settings (a pool's VMs take DHCP).
    pub network: Option<&'a far_api::Network>,
    /// The host it is placed on.
    pub host: &'a FlintlockHost,
    /// The controller's defaults.
    pub defaults: &'a Defaults,
    /// Served to the guest by the metadata service, by key. Values are raw bytes: they are
    /// base64-encoded here, as Flintlock requires.
    pub guest_metadata: &'a BTreeMap<String, Vec<u8>>,
}

/// The request and the sizing decision behind it.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// The VM's name.
    pub name: VmName,
    /// The VM's size on this host (report it in status).
    pub sizing: Sizing,
    /// What to send to CreateMicroVM.
    pub request: CreateMicroVmRequest,
}

/// Builds the `CreateMicroVMRequest` for one VM.
///
/// # Errors
/// [`PlanError`] when the VM does not fit the host, or its metadata would not fit
/// Firecracker's metadata service.
pub fn plan(p: &VmPlan<'_>) -> Result<Planned, PlanError> {
    check_metadata(p.guest_metadata)?;
    let spec = p.workload;
    let host_name = p.host.name_any();
    let sizing = size_vm(spec, &host_name, &p.host.spec.vm_limits)?;
    let name = p.name.clone();

    let kernel = match &spec.kernel {
        Some(k) => (
            ImageFile {
                image: k.image.clone(),
                filename: k.filename.clone(),
            },
            &k.cmdline,
        ),
        None => (p.defaults.kernel.clone(), &BTreeMap::new()),
    };
    let mut cmdline = p.defaults.kernel_cmdline.clone();
    cmdline.extend(kernel.1.iter().map(|(k, v)| (k.clone(), v.clone())));

    let additional_volumes = spec
        .volumes
        .iter()
        .map(|v| Volume {
            id: v.name.clone(),
            is_read_only: true,
            mount_point: Some(v.mount_path.clone()),
            source: Some(image_source(&v.image)),
            partition_id: None,
            size_in_mb: None,
        })
        .collect();

    let address = p
        .network
        .and_then(|n| n.address.as_ref())
        .map(|a| StaticAddress {
            address: a.cidr.clone(),
            // Upstream parses the gateway as a CIDR.
            gateway: a.gateway.as_ref().map(|g| format!("{g}/32")),
            nameservers: a.nameservers.clone(),
        });
    let interface = NetworkInterface {
        device_id: INTERFACE_ID.to_owned(),
        r#type: IfaceType::Tap as i32,
        guest_mac: Some(name.guest_mac()),
        address,
        overrides: p
            .host
            .spec
            .bridge_name
            .as_ref()
            .map(|bridge| NetworkOverrides {
                bridge_name: Some(bridge.clone()),
            }),
    };

    let microvm = MicroVmSpec {
        id: name.id().to_owned(),
        namespace: p.defaults.namespace.clone(),
        labels: BTreeMap::from([
            (labels::NAMESPACE.to_owned(), name.namespace().to_owned()),
            (labels::NAME.to_owned(), name.name().to_owned()),
            (labels::UID.to_owned(), name.uid().to_owned()),
        ]),
        vcpu: clamp_i32(sizing.vm.vcpu.into()),
        memory_in_mb: clamp_i32(sizing.vm.memory_mib.into()),
        kernel: Some(Kernel {
            image: kernel.0.image,
            cmdline,
            filename: Some(kernel.0.filename),
            add_network_config: true,
        }),
        initrd: Some(Initrd {
            image: p.defaults.initrd.image.clone(),
            filename: Some(p.defaults.initrd.filename.clone()),
        }),
        root_volume: Some(Volume {
            id: ROOT_VOLUME_ID.to_owned(),
            is_read_only: false,
            mount_point: None,
            source: Some(image_source(&spec.image)),
            partition_id: None,
            size_in_mb: None,
        }),
        additional_volumes,
        interfaces: vec![interface],
        metadata: p
            .guest_metadata
            .iter()
            .map(|(k, v)| (k.clone(), STANDARD.encode(v)))
            .collect(),
        created_at: None,
        updated_at: None,
        deleted_at: None,
        uid: None,
        provider: p.host.spec.provider.clone(),
        // A vsock device is a path from the guest to a host socket: FAR does not ask for one.
        allow_guest_agent: false,
    };
    Ok(Planned {
        name,
        sizing,
        request: CreateMicroVmRequest {
            microvm: Some(microvm),
            metadata: BTreeMap::new(),
        },
    })
}

fn image_source(image: &str) -> VolumeSource {
    VolumeSource {
        container_source: Some(image.to_owned()),
        virtiofs_source: None,
    }
}

/// Sizes are bounded by the CRD schemas far below `i32::MAX`; clamp rather than wrap.
fn clamp_i32(value: u64) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests;
