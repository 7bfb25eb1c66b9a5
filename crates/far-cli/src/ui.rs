//! `far ui`: the controller's web UI on this machine, relayed through the API server's service
//! proxy with the kubeconfig's own credentials, so Kubernetes RBAC decides who sees it (`get`
//! on `services/proxy` in the controller's namespace) and the UI needs none of its own.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};

/// Serves the UI at `listen` until interrupted.
///
/// # Errors
/// No kubeconfig, or `listen` cannot be bound.
pub async fn serve(listen: SocketAddr, namespace: &str, service: &str) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (KUBECONFIG or in-cluster)")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding --listen {listen}"))?;
    let base = format!("/api/v1/namespaces/{namespace}/services/{service}/proxy");
    eprintln!(
        "far ui: http://{}/ui/ (through {base}; Ctrl-C to stop)",
        listener.local_addr()?
    );
    let app = axum::Router::new().fallback(move |request: Request| {
        let (client, base) = (client.clone(), base.clone());
        async move { relay(&client, &base, request).await }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving the UI")
}

/// One GET, relayed with the answer's status, headers and body as they stream.
async fn relay(client: &kube::Client, base: &str, request: Request) -> Response {
    if request.method() != Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, "the UI is read-only").into_response();
    }
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let upstream = match axum::http::Request::get(format!("{base}{path}")).body(Vec::new()) {
        Ok(upstream) => upstream.map(kube::client::Body::from),
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    match client.send(upstream).await {
        Ok(answer) => {
            let (parts, body) = answer.into_parts();
            Response::from_parts(parts, axum::body::Body::new(body))
        }
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            format!("the API server's service proxy: {e}"),
        )
            .into_response(),
    }
}
