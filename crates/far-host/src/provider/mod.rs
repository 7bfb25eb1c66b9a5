//! Providers run VMs; far-host's service decides when.

pub mod accel;
pub mod mmds;
pub mod qemu;
pub mod sim;

use std::future::Future;

use flintlock_proto::types::MicroVmSpec;

use crate::host::HostError;
use crate::record::{ProcessIdentity, VmRecord};

/// Why a provider could not start or stop a VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProviderError(pub String);

/// What a started VM is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// Its process, for providers that run one.
    pub process: Option<ProcessIdentity>,
}

/// Something that runs microVMs.
pub trait Provider: Send + Sync + 'static {
    /// The provider's name as clients ask for it in `MicroVMSpec.provider`.
    fn name(&self) -> &'static str;

    /// Checks, when the VM is created, what can be checked without downloading (image
    /// references, files of images already here), so a client hears of a bad reference from
    /// CreateMicroVM rather than from a FAILED VM later.
    ///
    /// # Errors
    /// [`HostError`] naming the field and the cause.
    fn check(&self, _spec: &MicroVmSpec) -> impl Future<Output = Result<(), HostError>> + Send {
        async { Ok(()) }
    }

    /// Starts a VM.
    fn start(
        &self,
        record: &VmRecord,
        spec: &MicroVmSpec,
    ) -> impl Future<Output = Result<Started, ProviderError>> + Send;

    /// Stops a VM and frees what it held. Stopping a VM that is not running succeeds.
    fn stop(&self, record: &VmRecord) -> impl Future<Output = Result<(), ProviderError>> + Send;

    /// After a far-host restart: takes a VM that was running back under control. `false` when
    /// it is no longer running.
    fn adopt(&self, record: &VmRecord, spec: &MicroVmSpec) -> impl Future<Output = bool> + Send;

    /// Whether the VM's guest has stopped (its process exited). Checked when the VM is read.
    fn has_exited(&self, record: &VmRecord) -> bool;
}
