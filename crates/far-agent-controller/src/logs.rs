//! Reading an agent's output as `far logs` does: through the API server's service proxy to the
//! controller's log routes (`far_channel::Channel::logs_router`), so Kubernetes RBAC decides who
//! may read it (`get` on `services/proxy` in the controller's namespace).

use futures::io::AsyncBufReadExt;
use futures::{Stream, StreamExt, TryStreamExt};

/// Where the controller's log routes are served, as a Service.
#[derive(Clone, Debug)]
pub struct LogService {
    /// The controller's namespace.
    pub namespace: String,
    /// `name:port` of the Service, e.g. `far-agent-controller-metrics:8080`.
    pub service: String,
}

/// The agent's output, line by line; with `follow`, until the agent exits.
///
/// # Errors
/// The API server's answer when the proxy request fails (403 without RBAC, 404/503 when the
/// Service or the agent is unknown).
pub async fn fetch(
    client: &kube::Client,
    via: &LogService,
    namespace: &str,
    name: &str,
    follow: bool,
) -> Result<impl Stream<Item = Result<String, std::io::Error>> + use<>, kube::Error> {
    let path = format!(
        "/api/v1/namespaces/{}/services/{}/proxy/v1/namespaces/{namespace}/faragents/{name}/logs?follow={follow}",
        via.namespace, via.service
    );
    let request = http::Request::get(path)
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    let reader = client.request_stream(request).await?;
    Ok(reader.lines().map_err(std::io::Error::other).boxed())
}
