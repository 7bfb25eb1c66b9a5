//! The name of an agent's VM, and reading an agent back out of it.
//!
//! Upstream flintlockd drops labels, so the VM's name (`MicroVMSpec.id`) is the only place
//! that can say which FarAgent owns a VM. It is
//! `<namespace>.<name>.<attempt>.<uid>`: readable by an operator, unique per FarAgent UID (a
//! re-created agent of the same name never adopts the old VM) and per attempt (a restarted agent
//! never adopts the VM of its failed run, which may still be DELETING). Long names are cut so the
//! whole id stays within [`MAX_ID_LEN`] bytes: hosts use it as a directory name.

use far_api::FarAgent;
use kube::ResourceExt;

/// The longest VM id FAR makes; below Linux's 255-byte file-name limit with room to spare.
pub const MAX_ID_LEN: usize = 200;

/// The name of one VM of one agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmName {
    id: String,
    namespace: String,
    name: String,
    uid: String,
    attempt: u32,
}

/// What a VM's name says about its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The FarAgent's namespace.
    pub namespace: String,
    /// The FarAgent's UID (a pool's VM: the FarAgentPool's).
    pub uid: String,
    /// Which run of the agent the VM is (a pool's VM: its serial).
    pub attempt: u32,
}

impl Owner {
    /// The VM's id on the status channel.
    pub fn channel_id(&self) -> String {
        far_agent_protocol::channel_id(&self.uid, self.attempt)
    }
}

/// A FarAgent that cannot be named (the API server always sets these).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmNameError {
    /// No `metadata.namespace`.
    #[error("FarAgent {0:?} has no namespace")]
    NoNamespace(String),
    /// No `metadata.uid`.
    #[error("FarAgent {0:?} has no uid")]
    NoUid(String),
    /// A uid FAR cannot put in a VM name.
    #[error("FarAgent uid {0:?} is not 1 to 64 letters, digits and '-'")]
    BadUid(String),
}

impl VmName {
    /// The name of an agent's VM for the given attempt (0 for the first run).
    ///
    /// # Errors
    /// [`VmNameError`] when the namespace or uid is missing or unusable.
    pub fn new(namespace: &str, name: &str, uid: &str, attempt: u32) -> Result<Self, VmNameError> {
        if namespace.is_empty() {
            return Err(VmNameError::NoNamespace(name.to_owned()));
        }
        if uid.is_empty() {
            return Err(VmNameError::NoUid(name.to_owned()));
        }
        if uid.len() > 64 || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(VmNameError::BadUid(uid.to_owned()));
        }
        let suffix = format!(".{attempt}.{uid}");
        let prefix = format!("{namespace}.{name}");
        // Names are ASCII (RFC 1123), so cutting at a byte index is a char boundary.
        let keep = prefix.len().min(MAX_ID_LEN - suffix.len());
        let id = format!("{}{suffix}", &prefix[..keep]);
        Ok(Self {
            id,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
            attempt,
        })
    }

    /// The name of a FarAgent's VM for the given attempt.
    ///
    /// # Errors
    /// [`VmNameError`] when the FarAgent has no namespace or uid.
    pub fn for_agent(agent: &FarAgent, attempt: u32) -> Result<Self, VmNameError> {
        let name = agent.name_any();
        let namespace = agent
            .namespace()
            .ok_or_else(|| VmNameError::NoNamespace(name.clone()))?;
        let uid = agent
            .uid()
            .ok_or_else(|| VmNameError::NoUid(name.clone()))?;
        Self::new(&namespace, &name, &uid, attempt)
    }

    /// The name of a FarAgentPool's VM number `serial`: `<namespace>.<pool>.<serial>.<pool uid>`,
    /// so the owner read back is the pool (no FarAgent has its UID) and every VM of the pool
    /// has its own channel id.
    ///
    /// # Errors
    /// [`VmNameError`] when the pool has no namespace or uid.
    pub fn for_pool(pool: &far_api::FarAgentPool, serial: u32) -> Result<Self, VmNameError> {
        let name = pool.name_any();
        let namespace = pool
            .namespace()
            .ok_or_else(|| VmNameError::NoNamespace(name.clone()))?;
        let uid = pool.uid().ok_or_else(|| VmNameError::NoUid(name.clone()))?;
        Self::new(&namespace, &name, &uid, serial)
    }

    /// The VM's id on the status channel: its owner's UID and attempt (a pool's VM: its serial).
    pub fn channel_id(&self) -> String {
        far_agent_protocol::channel_id(&self.uid, self.attempt)
    }

    /// Reads the owner out of a VM id FAR made; `None` for any other VM.
    pub fn parse(id: &str) -> Option<Owner> {
        let mut parts = id.rsplitn(3, '.');
        let uid = parts.next()?;
        let attempt = parts.next()?.parse().ok()?;
        let (namespace, _name) = parts.next()?.split_once('.')?;
        let plausible = !namespace.is_empty()
            && !uid.is_empty()
            && uid.len() <= 64
            && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        plausible.then(|| Owner {
            namespace: namespace.to_owned(),
            uid: uid.to_owned(),
            attempt,
        })
    }

    /// The VM's id in Flintlock (`MicroVMSpec.id`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The FarAgent's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The FarAgent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The FarAgent's UID.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// Which run of the agent this VM is.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// A MAC address derived from the UID and attempt: the same VM always gets the same one,
    /// and it is locally administered and unicast (first octet `02`).
    pub fn guest_mac(&self) -> String {
        let hash = fnv1a(format!("{}/{}", self.uid, self.attempt).as_bytes()).to_be_bytes();
        format!(
            "02:FA:{:02X}:{:02X}:{:02X}:{:02X}",
            hash[0], hash[1], hash[2], hash[3]
        )
    }
}

/// 32-bit FNV-1a: stable across releases and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}
