//! The Flintlock MicroVM gRPC service: parses requests, calls the [`Host`], and reports errors
//! the way upstream flintlockd does (so clients are tested against its quirks): "not found" is
//! code UNKNOWN with the words in the message. Beside it, far-host's own `far.host.v1.Guests`
//! service ([`Guests`]); [`routes`] serves both.

use std::sync::Arc;

use flintlock_proto::auth::check_basic_token;
use flintlock_proto::far_host::{
    self, ListEndedRequest, ListEndedResponse, guests_server::GuestsServer,
};
use flintlock_proto::v1alpha1::{
    CreateMicroVmRequest, CreateMicroVmResponse, DeleteMicroVmRequest, GetMicroVmRequest,
    GetMicroVmResponse, ListMessage, ListMicroVMsRequest, ListMicroVMsResponse,
};
use flintlock_proto::{MicroVm, MicroVmServer};
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::host::{Host, HostError};
use crate::provider::Provider;

/// The MicroVM service over a [`Host`].
pub struct Service<P: Provider> {
    host: Arc<Host<P>>,
    token: Option<String>,
}

impl<P: Provider> Service<P> {
    /// Serves `host`; with a token, every call must carry it (`authorization: basic ...`).
    pub fn new(host: Arc<Host<P>>, token: Option<String>) -> MicroVmServer<Self> {
        MicroVmServer::new(Self { host, token })
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        authorize(self.token.as_deref(), request)
    }
}

/// With a token, every call must carry it (`authorization: basic ...`), as flintlockd's.
fn authorize<T>(token: Option<&str>, request: &Request<T>) -> Result<(), Status> {
    match token {
        Some(token) => check_basic_token(request.metadata(), token),
        None => Ok(()),
    }
}

/// far-host's extension service (`far.host.v1.Guests`): what Flintlock's status cannot say.
pub struct Guests<P: Provider> {
    host: Arc<Host<P>>,
    token: Option<String>,
}

impl<P: Provider> Guests<P> {
    /// Serves `host`'s guests, with the same token rule as [`Service`].
    pub fn new(host: Arc<Host<P>>, token: Option<String>) -> GuestsServer<Self> {
        GuestsServer::new(Self { host, token })
    }
}

/// Both services of a far-host: Flintlock's MicroVM service and far-host's Guests service.
pub fn routes<P: Provider>(host: Arc<Host<P>>, token: Option<String>) -> Routes {
    Routes::new(Service::new(Arc::clone(&host), token.clone()))
        .add_service(Guests::new(host, token))
}

/// Serves both services in plain gRPC on a free loopback port, in a task of its own, for as long
/// as the runtime runs: the embedded far-host of `far run` and `far bench`, and tests. Answers
/// the endpoint (`http://127.0.0.1:PORT`).
///
/// # Errors
/// When no loopback port can be bound.
pub async fn serve_on_loopback<P: Provider>(
    host: Arc<Host<P>>,
    token: Option<String>,
) -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes(host, token))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(endpoint)
}

#[tonic::async_trait]
impl<P: Provider> far_host::guests_server::Guests for Guests<P> {
    async fn list_ended(
        &self,
        request: Request<ListEndedRequest>,
    ) -> Result<Response<ListEndedResponse>, Status> {
        authorize(self.token.as_deref(), &request)?;
        let namespace = request.into_inner().namespace;
        Ok(Response::new(ListEndedResponse {
            guests: off_the_runtime(&self.host, move |h| h.ended(&namespace)).await?,
        }))
    }
}

/// Runs a host call that may write a record (a file, fsync'd) on the blocking pool, so a slow
/// disk never stalls the runtime serving every other call.
async fn off_the_runtime<P: Provider, T: Send + 'static>(
    host: &Arc<Host<P>>,
    call: impl FnOnce(&Arc<Host<P>>) -> Result<T, HostError> + Send + 'static,
) -> Result<T, Status> {
    let host = Arc::clone(host);
    tokio::task::spawn_blocking(move || call(&host))
        .await
        .map_err(|e| Status::internal(format!("far-host: {e}")))?
        .map_err(status)
}

fn status(error: HostError) -> Status {
    match error {
        HostError::Invalid(_) => Status::invalid_argument(error.to_string()),
        // Not UNKNOWN: clients read UNKNOWN + "not found" as a missing VM.
        HostError::Image(_) => Status::failed_precondition(error.to_string()),
        HostError::Unavailable(_) => Status::unavailable(error.to_string()),
        HostError::NotFound(_) | HostError::Store(_) => Status::unknown(error.to_string()),
    }
}

fn required(uid: &str) -> Result<(), Status> {
    if uid.is_empty() {
        Err(Status::invalid_argument("uid is required"))
    } else {
        Ok(())
    }
}

#[tonic::async_trait]
impl<P: Provider> MicroVm for Service<P> {
    async fn create_micro_vm(
        &self,
        request: Request<CreateMicroVmRequest>,
    ) -> Result<Response<CreateMicroVmResponse>, Status> {
        self.authorize(&request)?;
        let spec = request
            .into_inner()
            .microvm
            .ok_or_else(|| Status::invalid_argument("microvm is required"))?;
        let vm = self.host.create(spec).await.map_err(status)?;
        Ok(Response::new(CreateMicroVmResponse { microvm: Some(vm) }))
    }

    async fn delete_micro_vm(
        &self,
        request: Request<DeleteMicroVmRequest>,
    ) -> Result<Response<()>, Status> {
        self.authorize(&request)?;
        let uid = request.into_inner().uid;
        required(&uid)?;
        off_the_runtime(&self.host, move |h| h.delete(&uid)).await?;
        Ok(Response::new(()))
    }

    async fn get_micro_vm(
        &self,
        request: Request<GetMicroVmRequest>,
    ) -> Result<Response<GetMicroVmResponse>, Status> {
        self.authorize(&request)?;
        let uid = request.into_inner().uid;
        required(&uid)?;
        let vm = off_the_runtime(&self.host, move |h| h.get(&uid)).await?;
        Ok(Response::new(GetMicroVmResponse { microvm: Some(vm) }))
    }

    async fn list_micro_v_ms(
        &self,
        request: Request<ListMicroVMsRequest>,
    ) -> Result<Response<ListMicroVMsResponse>, Status> {
        self.authorize(&request)?;
        let ListMicroVMsRequest { namespace, name } = request.into_inner();
        Ok(Response::new(ListMicroVMsResponse {
            microvm: self.host.list(&namespace, name.as_deref()),
        }))
    }

    type ListMicroVMsStreamStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<ListMessage, Status>>>;

    async fn list_micro_v_ms_stream(
        &self,
        request: Request<ListMicroVMsRequest>,
    ) -> Result<Response<Self::ListMicroVMsStreamStream>, Status> {
        self.authorize(&request)?;
        // As flintlockd: the stream needs a namespace and takes no name filter.
        let namespace = request.into_inner().namespace;
        if namespace.is_empty() {
            return Err(Status::invalid_argument("invalid request"));
        }
        let items: Vec<_> = self
            .host
            .list(&namespace, None)
            .into_iter()
            .map(|vm| Ok(ListMessage { microvm: Some(vm) }))
            .collect();
        Ok(Response::new(tokio_stream::iter(items)))
    }
}
