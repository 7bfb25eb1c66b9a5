//! The host: VM records, their state machine, and the provider driven from it.
//!
//! Semantics follow upstream flintlockd where clients can see them: the server mints each uid,
//! create answers at once with a PENDING VM that turns CREATED when the provider has started it,
//! failed starts are retried and end in FAILED, delete turns the VM DELETING and it disappears
//! once the provider has torn it down, and nothing is said about the guest in the API.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flintlock_proto::far_host::EndedGuest;
use flintlock_proto::types::{MicroVm, MicroVmSpec};
use tracing::{info, warn};

use crate::provider::Provider;
use crate::record::{State, VmRecord};
use crate::store::{Store, StoreError};
use crate::validate::{Limits, add_instance_id, validate};

/// How far-host behaves.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// VM size bounds.
    pub limits: Limits,
    /// Start attempts before a VM is FAILED.
    pub max_start_attempts: u32,
    /// Delay before retrying a failed start or teardown; multiplied by the attempt number.
    pub retry_delay: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_start_attempts: 3,
            retry_delay: Duration::from_secs(1),
        }
    }
}

/// What a client did wrong, or what went wrong here.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The spec breaks a rule.
    #[error("invalid microvm spec: {0}")]
    Invalid(String),
    /// An image cannot be used as asked (unknown, refused, missing a file).
    #[error("{0}")]
    Image(String),
    /// Something the VM needs is unreachable for now (a registry): the same call may succeed
    /// later.
    #[error("{0}")]
    Unavailable(String),
    /// No VM with this uid.
    #[error("microvm {0} not found")]
    NotFound(String),
    /// The record could not be saved.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A far-host: records, state machine and provider.
pub struct Host<P: Provider> {
    config: HostConfig,
    store: Store,
    provider: P,
    vms: Mutex<BTreeMap<String, VmRecord>>,
    /// One provider operation at a time per VM, so a delete never races a start.
    ops: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// VMs created since the host opened, by `namespace/name`: a name created twice is a
    /// client's duplicate (Flintlock's create is not idempotent), which tests and benchmarks
    /// count.
    created: Mutex<HashMap<String, u32>>,
}

impl<P: Provider> std::fmt::Debug for Host<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("provider", &self.provider.name())
            .finish_non_exhaustive()
    }
}

impl<P: Provider> Host<P> {
    /// Opens the host's records under `state_dir` and takes every VM found back under control:
    /// PENDING ones are started, CREATED ones adopted, DELETING ones torn down.
    ///
    /// # Errors
    /// [`HostError::Store`] when the records cannot be read.
    pub async fn open(
        config: HostConfig,
        state_dir: &Path,
        provider: P,
    ) -> Result<Arc<Self>, HostError> {
        let store = Store::open(state_dir)?;
        let loaded = store.load()?;
        for path in &loaded.corrupt {
            warn!(path = %path.display(), "unreadable VM record moved aside");
        }
        let host = Arc::new(Self {
            config,
            store,
            provider,
            vms: Mutex::new(
                loaded
                    .records
                    .iter()
                    .map(|r| (r.uid.clone(), r.clone()))
                    .collect(),
            ),
            ops: Mutex::default(),
            created: Mutex::default(),
        });
        for record in loaded.records {
            match record.state {
                State::Pending => host.spawn_start(record.uid),
                State::Deleting => host.spawn_teardown(record.uid),
                State::Created => {
                    let adopted = host.provider.adopt(&record, &record.spec()).await;
                    info!(uid = %record.uid, adopted, "VM found at start");
                    if !adopted {
                        host.update(&record.uid, |r| r.guest_exited = true)?;
                    }
                }
                State::Failed => {}
            }
        }
        Ok(host)
    }

    /// The provider running this host's VMs.
    pub fn provider(&self) -> &P {
        &self.provider
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, VmRecord>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn op_lock(&self, uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(uid.to_owned())
            .or_default()
            .clone()
    }

    /// Applies a change to a record, bumps its version and saves it. `Ok(None)` when the VM is
    /// gone.
    fn update(
        &self,
        uid: &str,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<Option<VmRecord>, HostError> {
        let mut vms = self.lock();
        let Some(record) = vms.get_mut(uid) else {
            return Ok(None);
        };
        let mut next = record.clone();
        change(&mut next);
        next.version += 1;
        self.store.save(&next)?;
        *record = next.clone();
        Ok(Some(next))
    }

    /// Accepts a new VM: validates it, mints its uid, saves it PENDING and starts it in the
    /// background. Like upstream, calling twice makes two VMs.
    ///
    /// # Errors
    /// [`HostError::Invalid`] naming the field; [`HostError::Store`] when it cannot be saved.
    pub async fn create(self: &Arc<Self>, mut spec: MicroVmSpec) -> Result<MicroVm, HostError> {
        validate(&mut spec, &self.config.limits, self.provider.name())
            .map_err(HostError::Invalid)?;
        self.provider.check(&spec).await?;
        let uid = ulid::Ulid::new().to_string();
        add_instance_id(&mut spec, &uid).map_err(HostError::Invalid)?;
        spec.uid = Some(uid.clone());
        let record = VmRecord::new(&spec);
        self.store.save(&record)?;
        self.lock().insert(uid.clone(), record.clone());
        *self
            .created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(format!("{}/{}", spec.namespace, spec.id))
            .or_default() += 1;
        info!(%uid, id = %spec.id, namespace = %spec.namespace, "VM created");
        self.spawn_start(uid);
        Ok(record.to_proto())
    }

    /// The VM with this uid.
    ///
    /// # Errors
    /// [`HostError::NotFound`].
    pub fn get(&self, uid: &str) -> Result<MicroVm, HostError> {
        let record = self
            .lock()
            .get(uid)
            .cloned()
            .ok_or_else(|| HostError::NotFound(uid.to_owned()))?;
        let exited_now = record.state == State::Created
            && !record.guest_exited
            && self.provider.has_exited(&record);
        if exited_now && let Some(updated) = self.update(uid, |r| r.guest_exited = true)? {
            return Ok(updated.to_proto());
        }
        Ok(record.to_proto())
    }

    /// far-host extension: whether the VM's guest has stopped (its process exited). Upstream's
    /// API keeps saying CREATED for such a VM.
    ///
    /// # Errors
    /// [`HostError::NotFound`].
    pub fn guest_exited(&self, uid: &str) -> Result<bool, HostError> {
        self.get(uid)?;
        Ok(self.lock().get(uid).is_some_and(|r| r.guest_exited))
    }

    /// far-host extension: the VMs of `namespace` whose guest has ended (the process exited)
    /// or that failed to start, with the reason.
    ///
    /// # Errors
    /// [`HostError::Store`] when a newly seen exit cannot be recorded.
    pub fn ended(&self, namespace: &str) -> Result<Vec<EndedGuest>, HostError> {
        let candidates: Vec<VmRecord> = self
            .lock()
            .values()
            .filter(|r| {
                r.state == State::Failed
                    || (r.state == State::Created
                        && (r.guest_exited || self.provider.has_exited(r)))
            })
            .cloned()
            .collect();
        let mut ended = Vec::new();
        for mut record in candidates {
            if record.state == State::Created && !record.guest_exited {
                match self.update(&record.uid, |r| r.guest_exited = true)? {
                    Some(updated) => record = updated,
                    None => continue,
                }
            }
            let vm = record.to_proto();
            let Some(spec) = vm.spec.filter(|s| s.namespace == namespace) else {
                continue;
            };
            ended.push(EndedGuest {
                uid: record.uid,
                id: spec.id,
                stopped: record.guest_exited,
                failure: record.failure.filter(|_| record.state == State::Failed),
            });
        }
        Ok(ended)
    }

    /// How many VMs were created under each `namespace/name` since the host opened.
    pub fn created(&self) -> HashMap<String, u32> {
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The VMs of a namespace (an empty one: of every namespace), optionally only those with
    /// this name, oldest first: flintlockd's `ListMicroVMs` filter.
    pub fn list(&self, namespace: &str, name: Option<&str>) -> Vec<MicroVm> {
        self.lock()
            .values()
            .map(VmRecord::to_proto)
            .filter(|vm| {
                vm.spec.as_ref().is_some_and(|s| {
                    (namespace.is_empty() || s.namespace == namespace)
                        && name.is_none_or(|n| n == s.id)
                })
            })
            .collect()
    }

    /// Starts deleting a VM: it turns DELETING and disappears once torn down.
    ///
    /// # Errors
    /// [`HostError::NotFound`]; [`HostError::Store`].
    pub fn delete(self: &Arc<Self>, uid: &str) -> Result<(), HostError> {
        let updated = self.update(uid, |r| r.state = State::Deleting)?;
        if updated.is_none() {
            return Err(HostError::NotFound(uid.to_owned()));
        }
        info!(%uid, "VM deleting");
        self.spawn_teardown(uid.to_owned());
        Ok(())
    }

    fn spawn_start(self: &Arc<Self>, uid: String) {
        let host = Arc::clone(self);
        tokio::spawn(async move { host.start(&uid).await });
    }

    fn spawn_teardown(self: &Arc<Self>, uid: String) {
        let host = Arc::clone(self);
        tokio::spawn(async move { host.teardown(&uid).await });
    }

    async fn start(&self, uid: &str) {
        let op = self.op_lock(uid);
        let _op = op.lock().await;
        for attempt in 1..=self.config.max_start_attempts {
            let Some(record) = self
                .lock()
                .get(uid)
                .cloned()
                .filter(|r| r.state == State::Pending)
            else {
                return; // Deleted meanwhile; the teardown stops whatever was started.
            };
            let result = self.provider.start(&record, &record.spec()).await;
            let saved = match result {
                Ok(started) => {
                    info!(%uid, "VM started");
                    self.update(uid, |r| {
                        r.process = started.process;
                        if r.state == State::Pending {
                            r.state = State::Created;
                        }
                    })
                    .map(|_| ())
                }
                Err(e) => {
                    warn!(%uid, attempt, error = %e, "VM failed to start");
                    let failed = attempt == self.config.max_start_attempts;
                    let updated = self.update(uid, |r| {
                        r.retry += 1;
                        r.failure = Some(e.0.clone());
                        if failed && r.state == State::Pending {
                            r.state = State::Failed;
                        }
                    });
                    if updated.is_ok() && !failed {
                        tokio::time::sleep(self.config.retry_delay * attempt).await;
                        continue;
                    }
                    updated.map(|_| ())
                }
            };
            if let Err(e) = saved {
                warn!(%uid, error = %e, "VM record not saved");
            }
            return;
        }
    }

    async fn teardown(&self, uid: &str) {
        let op = self.op_lock(uid);
        let _op = op.lock().await;
        let mut attempt = 0u32;
        loop {
            let Some(record) = self.lock().get(uid).cloned() else {
                return;
            };
            match self.provider.stop(&record).await {
                Ok(()) => break,
                Err(e) => {
                    attempt += 1;
                    warn!(%uid, attempt, error = %e, "VM teardown failed; it stays DELETING");
                    tokio::time::sleep(self.config.retry_delay * attempt.min(30)).await;
                }
            }
        }
        if let Err(e) = self.store.remove(uid) {
            warn!(%uid, error = %e, "VM record not removed");
            return;
        }
        self.lock().remove(uid);
        self.ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
        info!(%uid, "VM deleted");
    }
}
