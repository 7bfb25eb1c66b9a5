//! An MMDS-compatible metadata endpoint for one VM, on host loopback.
//!
//! Layout as flintlockd gives Firecracker's MMDS: `GET /latest/<key>` answers the key's value
//! (base64-decoded from the spec's metadata). The V2 session flow is served too
//! (`PUT /latest/api/token` with `X-metadata-token-ttl-seconds`, then `X-metadata-token` on
//! reads); plain V1 reads are accepted, as Firecracker's V1 mode does.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tokio::task::JoinHandle;

/// A running metadata endpoint; stops when dropped.
#[derive(Debug)]
pub struct MetadataServer {
    port: u16,
    task: JoinHandle<()>,
}

impl MetadataServer {
    /// The loopback port it answers on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct Served {
    values: BTreeMap<String, Vec<u8>>,
    tokens: Mutex<HashSet<String>>,
}

/// Decodes a spec's metadata values; undecodable ones are left out (and said in the log).
pub fn decode(metadata: &BTreeMap<String, String>) -> BTreeMap<String, Vec<u8>> {
    metadata
        .iter()
        .filter_map(|(k, v)| match STANDARD.decode(v) {
            Ok(bytes) => Some((k.clone(), bytes)),
            Err(_) => {
                tracing::warn!(key = %k, "metadata value is not base64; not served");
                None
            }
        })
        .collect()
}

/// Serves `values` on `127.0.0.1:port` (0 picks a free port).
///
/// # Errors
/// When the port cannot be bound.
pub async fn serve(
    port: u16,
    values: BTreeMap<String, Vec<u8>>,
) -> std::io::Result<MetadataServer> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let port = listener.local_addr()?.port();
    let state = Arc::new(Served {
        values,
        tokens: Mutex::default(),
    });
    let app = Router::new()
        .route("/latest/api/token", put(token))
        .route("/latest", get(index))
        .route("/latest/", get(index))
        .route("/latest/{*key}", get(value))
        .with_state(state);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(MetadataServer { port, task })
}

async fn token(State(state): State<Arc<Served>>, headers: HeaderMap) -> (StatusCode, String) {
    if !headers.contains_key("x-metadata-token-ttl-seconds") {
        return (
            StatusCode::BAD_REQUEST,
            "X-metadata-token-ttl-seconds is required".into(),
        );
    }
    let token = ulid::Ulid::new().to_string();
    state
        .tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(token.clone());
    (StatusCode::OK, token)
}

fn authorized(state: &Served, headers: &HeaderMap) -> bool {
    match headers
        .get("x-metadata-token")
        .and_then(|v| v.to_str().ok())
    {
        None => true,
        Some(token) => state
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(token),
    }
}

async fn index(State(state): State<Arc<Served>>, headers: HeaderMap) -> (StatusCode, String) {
    if !authorized(&state, &headers) {
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    (
        StatusCode::OK,
        state.values.keys().cloned().collect::<Vec<_>>().join("\n"),
    )
}

async fn value(
    State(state): State<Arc<Served>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> (StatusCode, Vec<u8>) {
    if !authorized(&state, &headers) {
        return (StatusCode::UNAUTHORIZED, Vec::new());
    }
    match state.values.get(&key) {
        Some(v) => (StatusCode::OK, v.clone()),
        None => (StatusCode::NOT_FOUND, Vec::new()),
    }
}
