//! A VM as far-host keeps it: the spec it was created with and what became of it.

use base64::engine::general_purpose::STANDARD;
use flintlock_proto::types::{MicroVm, MicroVmSpec, MicroVmStatus, micro_vm_status::MicroVmState};
use prost::Message as _;
use serde::{Deserialize, Serialize};

/// Flintlock's VM states.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Accepted; the provider has not started it yet (or is retrying).
    Pending,
    /// The provider started it. Like upstream, this says nothing about the guest.
    Created,
    /// Starting failed for good; only delete clears it.
    Failed,
    /// Being torn down; it disappears when done.
    Deleting,
}

impl State {
    fn proto(self) -> MicroVmState {
        match self {
            State::Pending => MicroVmState::Pending,
            State::Created => MicroVmState::Created,
            State::Failed => MicroVmState::Failed,
            State::Deleting => MicroVmState::Deleting,
        }
    }
}

/// How far-host recognises a VM's process after a restart: a pid alone can be reused.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ProcessIdentity {
    /// The process id.
    pub pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_ticks: u64,
}

/// One VM's record, saved on disk as JSON.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VmRecord {
    /// Server-minted ULID.
    pub uid: String,
    /// +1 on every save, as upstream's `MicroVM.version`.
    pub version: i32,
    /// Flintlock state.
    pub state: State,
    /// Failed start attempts.
    pub retry: i32,
    /// The spec as created (uid filled in), protobuf-encoded.
    #[serde(with = "base64_bytes")]
    pub spec: Vec<u8>,
    /// The running VM's process, when the provider has one.
    #[serde(default)]
    pub process: Option<ProcessIdentity>,
    /// far-host extension: why the VM failed, in words.
    #[serde(default)]
    pub failure: Option<String>,
    /// far-host extension: the VM's guest has stopped (its process exited).
    #[serde(default)]
    pub guest_exited: bool,
}

impl VmRecord {
    /// A new PENDING record for a spec whose uid is already set.
    pub fn new(spec: &MicroVmSpec) -> Self {
        Self {
            uid: spec.uid.clone().unwrap_or_default(),
            version: 1,
            state: State::Pending,
            retry: 0,
            spec: spec.encode_to_vec(),
            process: None,
            failure: None,
            guest_exited: false,
        }
    }

    /// The stored spec.
    pub fn spec(&self) -> MicroVmSpec {
        // Written by `new` from a valid message; a damaged file is caught when loading.
        MicroVmSpec::decode(self.spec.as_slice()).unwrap_or_default()
    }

    /// The record as Flintlock's `MicroVM`.
    pub fn to_proto(&self) -> MicroVm {
        MicroVm {
            version: self.version,
            spec: Some(self.spec()),
            status: Some(MicroVmStatus {
                state: self.state.proto() as i32,
                retry: self.retry,
                ..Default::default()
            }),
        }
    }
}

mod base64_bytes {
    use super::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// Checks that a stored spec decodes, for loading records from disk.
pub fn spec_decodes(record: &VmRecord) -> bool {
    MicroVmSpec::decode(record.spec.as_slice()).is_ok()
}
