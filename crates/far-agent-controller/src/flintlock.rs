//! Flintlock clients, one per FlintlockHost: the basic token from the host's Secret, a deadline
//! on every call, and retries with back-off for calls that are safe to repeat.
//!
//! CreateMicroVM is never retried here: Flintlock's create is not idempotent, so a lost answer
//! is resolved by the next reconcile listing the VM by name and adopting it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use far_api::FlintlockHost;
use flintlock_proto::MicroVmClient;
use flintlock_proto::auth::BasicToken;
use flintlock_proto::errors::{Failure, code_label};
use flintlock_proto::far_host::guests_client::GuestsClient;
use flintlock_proto::far_host::{EndedGuest, ListEndedRequest};
use flintlock_proto::listing::ListedMicroVm;
use flintlock_proto::types::MicroVm;
use flintlock_proto::v1alpha1::{
    CreateMicroVmRequest, DeleteMicroVmRequest, GetMicroVmRequest, ListMicroVMsRequest,
};
use tonic::codegen::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

/// Adds the host's token, when it has one.
#[derive(Clone, Debug, Default)]
pub struct Auth(Option<BasicToken>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match &mut self.0 {
            Some(token) => token.call(request),
            None => Ok(request),
        }
    }
}

/// A host's connection with its token: the typed clients of both services are built on it.
type Conn = InterceptedService<Channel, Auth>;

/// How the controller proves itself to a host and checks the host: the shared token and, for
/// `https://` endpoints, the CA (and for mutual TLS the client certificate and key), all read
/// from the host's Secrets. `Debug` shows none of it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// The shared token.
    pub token: Option<String>,
    /// PEM `ca.crt`.
    pub ca: Option<Vec<u8>>,
    /// PEM `tls.crt` and `tls.key`.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

/// A host's client, with the endpoint and credentials it was built for.
struct Cached {
    endpoint: String,
    credentials: Credentials,
    conn: Conn,
}

/// Why a Flintlock call failed.
#[derive(Debug, thiserror::Error)]
pub enum FlintlockError {
    /// The endpoint is not a usable URL.
    #[error("host {host}: endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The FlintlockHost.
        host: String,
        /// Its endpoint.
        endpoint: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The host answered with an error, or could not be reached.
    #[error("host {host}: {method}: {status}")]
    Call {
        /// The FlintlockHost.
        host: String,
        /// The RPC.
        method: &'static str,
        /// gRPC's status.
        status: Status,
    },
}

/// The decision's name for a VM state Flintlock reports (`MicroVMState`, as its number); a
/// state not told, or unknown, is not yet started.
pub fn vm_state(state: Option<i32>) -> crate::decision::VmState {
    use crate::decision::VmState;
    use flintlock_proto::types::micro_vm_status::MicroVmState;
    match state.and_then(|s| MicroVmState::try_from(s).ok()) {
        Some(MicroVmState::Created) => VmState::Created,
        Some(MicroVmState::Failed) => VmState::Failed,
        Some(MicroVmState::Deleting) => VmState::Deleting,
        _ => VmState::Pending,
    }
}

impl FlintlockError {
    /// How the failure should be treated.
    pub fn failure(&self) -> Failure {
        match self {
            FlintlockError::Endpoint { .. } => Failure::Invalid,
            FlintlockError::Call { status, .. } => Failure::of(status),
        }
    }

    /// Whether the host could not be reached at all (as opposed to refusing the call).
    pub fn unreachable(&self) -> bool {
        matches!(self.failure(), Failure::Transient)
    }

    /// What the host said, for users (status, Events): its code and message, at most 512
    /// characters, with each of `redact` (tokens the request carried) blanked out.
    pub fn said(&self, redact: &[&str]) -> String {
        let mut said = match self {
            FlintlockError::Endpoint { reason, .. } => reason.clone(),
            FlintlockError::Call { status, .. } => {
                format!("{}: {}", code_label(status.code()), status.message())
            }
        };
        for secret in redact.iter().filter(|s| !s.is_empty()) {
            said = said.replace(secret, "[redacted]");
        }
        match said.char_indices().nth(512) {
            Some((end, _)) => format!("{}...", &said[..end]),
            None => said,
        }
    }

    /// A closed-set label for metrics.
    pub fn code_label(&self) -> &'static str {
        match self {
            FlintlockError::Endpoint { .. } => "ENDPOINT",
            FlintlockError::Call { status, .. } => code_label(status.code()),
        }
    }
}

/// Clients for every host, built on first use and rebuilt when the endpoint or token changes.
pub struct Pool {
    clients: Mutex<HashMap<String, Cached>>,
    timeout: Duration,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// How many times a call safe to repeat is tried.
const ATTEMPTS: u32 = 3;

impl Pool {
    /// A pool whose calls each get `timeout`, timed into `metrics`.
    pub fn new(timeout: Duration, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        Self {
            clients: Mutex::default(),
            timeout,
            metrics,
        }
    }

    fn client(
        &self,
        host: &FlintlockHost,
        credentials: &Credentials,
    ) -> Result<Conn, FlintlockError> {
        let name = kube::ResourceExt::name_any(host);
        let endpoint = host.spec.endpoint.clone();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cached) = clients.get(&name)
            && cached.endpoint == endpoint
            && cached.credentials == *credentials
        {
            return Ok(cached.conn.clone());
        }
        let bad = |reason: String| FlintlockError::Endpoint {
            host: name.clone(),
            endpoint: endpoint.clone(),
            reason,
        };
        let mut channel = Endpoint::from_shared(endpoint.clone())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        if endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &credentials.ca {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &credentials.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            channel = channel
                .tls_config(tls)
                .map_err(|e| bad(format!("TLS: {e}")))?;
        }
        let auth = Auth(
            credentials
                .token
                .as_deref()
                .map(BasicToken::new)
                .transpose()
                .map_err(|e| bad(e.message().to_owned()))?,
        );
        let conn = InterceptedService::new(channel.connect_lazy(), auth);
        clients.insert(
            name,
            Cached {
                endpoint,
                credentials: credentials.clone(),
                conn: conn.clone(),
            },
        );
        Ok(conn)
    }

    async fn call<T, F, Fut>(
        &self,
        host: &FlintlockHost,
        credentials: &Credentials,
        method: &'static str,
        retry: bool,
        f: F,
    ) -> Result<T, FlintlockError>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let client = self.client(host, credentials)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = tokio::time::Instant::now();
            let result = match tokio::time::timeout(self.timeout, f(client.clone())).await {
                Ok(result) => result.map(tonic::Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer within {:?}",
                    self.timeout
                ))),
            };
            let code = result
                .as_ref()
                .map_or_else(|s| code_label(s.code()), |_| "OK");
            self.metrics.rpc(method, code, started.elapsed());
            match result {
                Ok(value) => return Ok(value),
                Err(status)
                    if retry && attempt < ATTEMPTS && Failure::of(&status).is_retryable() =>
                {
                    tokio::time::sleep(Duration::from_millis(100 * 2u64.pow(attempt))).await;
                }
                Err(status) => {
                    return Err(FlintlockError::Call {
                        host: kube::ResourceExt::name_any(host),
                        method,
                        status,
                    });
                }
            }
        }
    }

    /// GetMicroVM; `Ok(None)` when the host says "not found".
    ///
    /// # Errors
    /// [`FlintlockError`] for anything else.
    pub async fn get(
        &self,
        host: &FlintlockHost,
        credentials: &Credentials,
        uid: &str,
    ) -> Result<Option<MicroVm>, FlintlockError> {
        let result = self
            .call(host, credentials, "GetMicroVM", true, |conn| {
                let uid = uid.to_owned();
                async move {
                    MicroVmClient::new(conn)
                        .get_micro_vm(GetMicroVmRequest { uid })
                        .await
                }
            })
            .await;
        match result {
            Ok(response) => Ok(response.microvm),
            Err(e) if e.failure() == Failure::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// ListMicroVMs in a namespace, optionally by name.
    ///
    /// # Errors
    /// [`FlintlockError`].
    pub async fn list(
        &self,
        host: &FlintlockHost,
        credentials: &Credentials,
        namespace: &str,
        name: Option<&str>,
    ) -> Result<Vec<MicroVm>, FlintlockError> {
        self.call(host, credentials, "ListMicroVMs", true, |conn| {
            let request = ListMicroVMsRequest {
                namespace: namespace.to_owned(),
                name: name.map(str::to_owned),
            };
            async move { MicroVmClient::new(conn).list_micro_v_ms(request).await }
        })
        .await
        .map(|r| r.microvm)
    }

    /// ListMicroVMs in a namespace, each VM read only as far as a probe of the whole host
    /// needs ([`flintlock_proto::listing`]): the same call, a fraction of the memory.
    ///
    /// # Errors
    /// [`FlintlockError`].
    pub async fn list_narrowly(
        &self,
        host: &FlintlockHost,
        credentials: &Credentials,
        namespace: &str,
    ) -> Result<Vec<ListedMicroVm>, FlintlockError> {
        self.call(host, credentials, "ListMicroVMs", true, |conn| {
            let request = ListMicroVMsRequest {
                namespace: namespace.to_owned(),
                name: None,
            };
            flintlock_proto::listing::list(conn, request)
        })
        .await
        .map(|r| r.microvm)
    }

    /// CreateMicroVM, once.
    ///
    /// # Errors
    /// [`FlintlockError`].
    pub async fn create(
        &self,
        host: &FlintlockHost,
        credentials: &Credentials,
        request: CreateMicroVmRequest,
    ) -> Result<MicroVm, FlintlockError> {
        let vm = self
            .call(host, credentials, "CreateMicroVM", false, |conn| {
                let request = request.clone();
                async move { MicroVmClient::new(conn).create_micro_vm(request).await }
            })
            .await?
            .microvm;
        vm.ok_or_else(|| FlintlockError::Call {
            host: kube::ResourceExt::name_any(host),
            method: "CreateMicroVM",
            status: Status::internal("the host answered without a microvm"),
        })
    }

    /// DeleteMicroVM; a VM already gone is not an error.
    ///
    /// # Errors
    /// [`FlintlockError`].
    pub async fn delete(
        &self,
        host: &FlintlockHost,
        credentials: &Credentials,
        uid: &str,
    ) -> Result<(), FlintlockError> {
        let result = self
            .call(host, credentials, "DeleteMicroVM", true, |conn| {
                let uid = uid.to_owned();
                async move {
                    MicroVmClient::new(conn)
                        .delete_micro_vm(DeleteMicroVmRequest { uid })
                        .await
                }
            })
            .await;
        match result {
            Err(e) if e.failure() != Failure::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// far-host's ListEnded: VMs whose guest stopped or that failed to start, with the reason.
    /// `Ok(None)` from a host without the extension (upstream flintlockd: UNIMPLEMENTED).
    ///
    /// # Errors
    /// [`FlintlockError`].
    pub async fn ended(
        &self,
        host: &FlintlockHost,
        credentials: &Credentials,
        namespace: &str,
    ) -> Result<Option<Vec<EndedGuest>>, FlintlockError> {
        let result = self
            .call(host, credentials, "ListEnded", true, |conn| {
                let request = ListEndedRequest {
                    namespace: namespace.to_owned(),
                };
                async move { GuestsClient::new(conn).list_ended(request).await }
            })
            .await;
        match result {
            Ok(response) => Ok(Some(response.guests)),
            Err(FlintlockError::Call { status, .. }) if status.code() == Code::Unimplemented => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}
