//! The web UI: live agent state, read-only, served by the controller at `/ui/` on its metrics
//! port. It is reached through `kubectl port-forward` or the API server's service proxy, so
//! Kubernetes RBAC decides who sees it and no credential of its own exists. Its page, script and
//! style are embedded in the binary (nothing is fetched from elsewhere); every response carries
//! a Content-Security-Policy without inline script; there is no route that changes anything.
//!
//! Live state goes out as one server-sent-events stream per page: a snapshot, then the changes
//! ([`view::diff`]) at most every [`TICK`]. The views are computed from a [`Source`] (the
//! controller's own caches, or `far run`'s one agent) by one task ([`Live::publish`]), only
//! while a page is open, and shared by all pages (`feed`). Agents' logs stream from the status
//! channel's log route on the same port.

mod feed;
pub mod view;

use std::convert::Infallible;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use far_api::{FarAgent, FarAgentStatus};
use futures::Stream;
use futures::future::BoxFuture;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::reconcile::Context;
use view::View;

/// How often the view is looked at while a page is open: changes reach a page at most this
/// often, coalesced.
pub const TICK: Duration = Duration::from_millis(500);

/// No script but the page's own, no style but its own, no requests but to where it came from.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Where the UI's live state comes from: the controller's caches, or the one agent of a
/// `far run`.
pub trait Source: Send + Sync + 'static {
    /// Everything the page shows, now.
    fn look(&self) -> View;

    /// One agent's page ([`detail`]), or `None` when there is no such agent.
    fn agent(self: Arc<Self>, namespace: String, name: String)
    -> BoxFuture<'static, Option<Value>>;
}

/// Where the UI finds its [`Source`]: the controller attaches its context once its caches are
/// filled ([`crate::run::run`]), `far run` its agent; the routes read it. Cheap to clone; a
/// replica that does not lead has none attached.
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

struct Inner {
    source: RwLock<Option<Weak<dyn Source>>>,
    frames: watch::Sender<Arc<feed::Frame>>,
    /// One look at a time.
    looking: Mutex<()>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                source: RwLock::new(None),
                frames: watch::Sender::new(Arc::default()),
                looking: Mutex::new(()),
            }),
        }
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

impl Live {
    /// Shows `source` from now on (held weakly: the UI keeps nothing alive).
    pub fn attach<S: Source>(&self, source: &Arc<S>) {
        let source: Arc<dyn Source> = Arc::clone(source) as Arc<dyn Source>;
        *self.inner.source.write().unwrap_or_else(|e| e.into_inner()) =
            Some(Arc::downgrade(&source));
    }

    fn source(&self) -> Option<Arc<dyn Source>> {
        self.inner
            .source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Weak::upgrade)
    }

    /// Looks at the source every [`TICK`] while a page is open and sends the change to every
    /// page at once. Runs until dropped.
    pub async fn publish(self) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if self.inner.frames.receiver_count() > 0 {
                // Not twice in a row when a page that just opened looked.
                self.look(TICK / 2);
            }
        }
    }

    /// Looks at the source and publishes what changed, unless the newest look is younger than
    /// `age`.
    fn look(&self, age: Duration) {
        let Some(source) = self.source() else {
            return;
        };
        let _one = self.inner.looking.lock().unwrap_or_else(|e| e.into_inner());
        if !feed::fresh(&self.inner.frames, age) {
            feed::publish(&self.inner.frames, source.look(), &now());
        }
    }
}

impl Source for Context {
    fn look(&self) -> View {
        let unreachable = self
            .unreachable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let allocation: view::Allocation = self
            .held()
            .into_iter()
            .map(|(host, held)| (host, (held.cpu, held.memory_mib, held.agents)))
            .collect();
        let mut hosts: Vec<_> = self
            .hosts
            .state()
            .iter()
            .map(|h| view::host_row(h, !unreachable.contains_key(&h.name_any()), &allocation))
            .collect();
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        let mut pools: Vec<_> = self
            .pools
            .state()
            .iter()
            .map(|p| view::pool_row(p, self.pool_vms.claim_rate(&p.uid().unwrap_or_default())))
            .collect();
        pools.sort_by(|a, b| a.key.cmp(&b.key));
        View {
            agents: self
                .agents
                .state()
                .iter()
                .map(|a| {
                    let row = view::agent_row(a);
                    (row.key.clone(), row)
                })
                .collect(),
            hosts,
            pools,
        }
    }

    fn agent(
        self: Arc<Self>,
        namespace: String,
        name: String,
    ) -> BoxFuture<'static, Option<Value>> {
        Box::pin(async move {
            let agent = self
                .agents
                .get(&ObjectRef::new(&name).within(&namespace))?
                .agent()
                .ok()?;
            let events = events(&self, &agent).await;
            Some(detail(&agent, events))
        })
    }
}

/// The UI's routes, to merge into the metrics port's router.
pub fn router(live: Live) -> Router {
    Router::new()
        // Relative, so it also works behind the API server's service proxy.
        .route(
            "/ui",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "ui/")]) }),
        )
        .route("/ui/", get(|| async { asset("text/html", INDEX) }))
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript", SCRIPT) }),
        )
        .route("/ui/app.css", get(|| async { asset("text/css", STYLE) }))
        .route("/ui/api/stream", get(stream))
        .route("/ui/api/agents/{namespace}/{name}", get(agent))
        .layer(axum::middleware::map_response(secure))
        .with_state(live)
}

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// The headers every UI response carries.
async fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// The page's live state: `snapshot` at once (and after each reconnection), then `delta`s.
async fn stream(State(live): State<Live>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    // Pages may have been closed for hours: the snapshot is at most a tick old.
    live.look(TICK);
    let leading = live.source().is_some();
    let events = feed::follow(live.inner.frames.subscribe(), leading, &now());
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// One agent: its status with conditions in order, its guest's figures, its Events (no spec
/// values: env, args and secrets never reach the page).
async fn agent(
    State(live): State<Live>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let Some(source) = live.source() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this replica does not lead: no live state",
        )
            .into_response();
    };
    match source.agent(namespace.clone(), name.clone()).await {
        Some(detail) => Json(detail).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("no FarAgent {namespace}/{name}"),
        )
            .into_response(),
    }
}

/// An agent's page: what it runs (never its env, args or secrets), its status with the
/// conditions in the order they happened, and its Events (or why they could not be read).
pub fn detail(agent: &FarAgent, events: Result<Vec<Value>, String>) -> Value {
    let spec = &agent.spec;
    let mut status: FarAgentStatus = agent.status.clone().unwrap_or_default();
    status.conditions.sort_by_key(|c| c.last_transition_time.0);
    json!({
        "namespace": agent.namespace(),
        "name": agent.name_any(),
        "created": agent.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        "image": spec.workload.image,
        "memory": spec.workload.memory,
        "cpu": spec.workload.cpu,
        "pool": spec.pool_ref.as_ref().map(|p| &p.name),
        "status": status,
        "events": events.as_ref().ok(),
        "eventsError": events.as_ref().err(),
    })
}

/// The agent's Events (events.k8s.io, as the controller records them), oldest first.
async fn events(ctx: &Context, agent: &FarAgent) -> Result<Vec<Value>, String> {
    let api: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(ctx.client.clone(), &agent.namespace().unwrap_or_default());
    let uid = agent.uid();
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut events: Vec<_> = list
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.uid.clone()) == uid)
        .collect();
    events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    Ok(events
        .into_iter()
        .map(|e| {
            json!({
                "type": e.type_,
                "reason": e.reason,
                "note": e.note,
                "time": e.event_time.map(|t| t.0.to_string()),
                "count": e.deprecated_count.or(e.series.map(|s| s.count)),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use far_testkit::http::ask;

    /// A source showing whatever agent phase the test sets.
    struct Phases(Mutex<&'static str>);

    impl Source for Phases {
        fn look(&self) -> View {
            let row = view::AgentRow {
                key: "team/a".into(),
                namespace: "team".into(),
                name: "a".into(),
                phase: (*self.0.lock().unwrap()).into(),
                reason: String::new(),
                host: None,
                heartbeat: None,
                exit_code: None,
                created: None,
            };
            View {
                agents: [(row.key.clone(), row)].into(),
                ..View::default()
            }
        }

        fn agent(self: Arc<Self>, _: String, _: String) -> BoxFuture<'static, Option<Value>> {
            Box::pin(async { None })
        }
    }

    /// The first event of a page opened now.
    async fn snapshot(address: &str) -> String {
        let answer = ask(address, "GET", "/ui/api/stream", "\n\n").await;
        answer
            .split("event: snapshot")
            .nth(1)
            .unwrap_or_default()
            .to_owned()
    }

    #[tokio::test]
    async fn a_page_opened_after_a_quiet_spell_gets_the_state_of_now() {
        let source = Arc::new(Phases(Mutex::new("Pending")));
        let live = Live::default();
        live.attach(&source);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, router(live)).await });

        assert!(snapshot(&address).await.contains(r#""phase":"Pending""#));
        // No page open, so nothing looks at the source until the next page opens.
        *source.0.lock().unwrap() = "Running";
        tokio::time::sleep(TICK).await;
        let now = snapshot(&address).await;
        assert!(now.contains(r#""phase":"Running""#), "{now}");
        assert!(now.contains(r#""leading":true"#), "{now}");
    }
}
