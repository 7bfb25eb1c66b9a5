//! A fake Kubernetes API server: real HTTP, answering as `shared/kube-apiserver-semantics.md`
//! records a real kube-apiserver does, for the resources FAR's controller uses.
//!
//! What it does: list and watch with resourceVersion (one global counter; watches replay from a
//! given version, then stream live, one JSON object per line, and end at `timeoutSeconds`), the
//! status subresource (status writes touch only status; main-resource writes ignore status),
//! merge, JSON and apply patches (apply is treated as a merge: there is no field ownership),
//! 409 on a stale resourceVersion, `generation` bumped on spec changes, finalizers and
//! `deletionTimestamp`, admission of FarAgents and FlintlockHosts with their CRD rules
//! (`far_api::admission`), Events and Leases. Each request is counted by verb and resource.
//! Failure injection answers the next N requests of a verb with a chosen status.
//!
//! Where it differs from kube-apiserver on purpose, found against a real one:
//! - The service proxy ([`FakeApiServer::proxy_service`]) forwards to a backend the test names;
//!   kube-apiserver forwards only to an Endpoints address whose `targetRef` is a Pod with that
//!   IP in its status, and never to a loopback address.
//! - kube-apiserver's proxy re-serializes `text/html` answers (to rewrite absolute links under
//!   the proxy path): `defer` comes back as `defer=""`, byte for byte different but the same
//!   page. The fake passes them unchanged, so tests assert a page's meaning, not its bytes.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::managed_fields::{self, Landing, Writer};
use crate::request_metrics;

/// A resource the fake serves.
#[derive(Clone, Copy, Debug)]
struct Kind {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
}

const KINDS: &[Kind] = &[
    Kind {
        group: "tiffany.dev",
        version: "v1",
        plural: "faragents",
        kind: "FarAgent",
        namespaced: true,
        status: true,
    },
    Kind {
        group: "tiffany.dev",
        version: "v1",
        plural: "faragentpools",
        kind: "FarAgentPool",
        namespaced: true,
        status: true,
    },
    Kind {
        group: "tiffany.dev",
        version: "v1",
        plural: "flintlockhosts",
        kind: "FlintlockHost",
        namespaced: false,
        status: true,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        status: false,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        status: false,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        status: false,
    },
    Kind {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status: false,
    },
    Kind {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status: false,
    },
];

impl Kind {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn is_custom(&self) -> bool {
        self.group == "tiffany.dev"
    }

    /// `Kind.group` (`FarAgent.tiffany.dev`; `Secret` for the core group), as validation and
    /// precondition errors name a kind.
    fn kind_group(&self) -> String {
        if self.group.is_empty() {
            self.kind.to_owned()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

type Key = (&'static str, String, String);

/// The resourceVersion the fake starts from. A real cluster's revision is in the hundreds before
/// any client writes and its watch cache holds nothing older, so a watch from an older version
/// (a made-up `1`, say) is answered `410 Expired`, as there.
const FIRST_RV: u64 = 100;

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    plural: &'static str,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<Change>,
    /// `apiserver_request_total`, as the real one counts.
    requests: BTreeMap<request_metrics::Series, u64>,
    failures: HashMap<String, (u16, u32)>,
    rbac: Option<Rbac>,
}

/// One RBAC rule of a Role (namespaced) or ClusterRole (`namespace: None`), as bound to a
/// subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The Role's namespace; `None` for a ClusterRole (every namespace and cluster scope).
    pub namespace: Option<String>,
    /// `apiGroups`.
    pub groups: Vec<String>,
    /// `resources`, subresources as `plural/sub`.
    pub resources: Vec<String>,
    /// `verbs`.
    pub verbs: Vec<String>,
}

/// RBAC for the requests that carry one bearer token: everything else is an administrator.
struct Rbac {
    token: String,
    user: String,
    grants: Vec<Grant>,
    /// What the subject did that a grant allowed: `verb group/resource`.
    used: std::collections::BTreeSet<String>,
}

impl Rbac {
    /// Whether the subject may `verb` this target; records the use.
    fn allows(&mut self, verb: &str, target: &Target) -> bool {
        let resource = match &target.subresource {
            Some(sub) => format!("{}/{sub}", target.kind.plural),
            None => target.kind.plural.to_owned(),
        };
        let allowed = self.grants.iter().any(|g| {
            g.groups.iter().any(|x| x == target.kind.group)
                && g.resources.contains(&resource)
                && g.verbs.iter().any(|v| v == verb)
                && g.namespace
                    .as_ref()
                    .is_none_or(|ns| target.namespace.as_ref() == Some(ns))
        });
        if allowed {
            self.used
                .insert(format!("{verb} {}/{resource}", target.kind.group));
        }
        allowed
    }
}

struct Shared {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
    /// Ends every open watch, as an API server restart or a load balancer does.
    cuts: broadcast::Sender<()>,
    /// `namespace/service:port` -> backend base URL, for the service proxy.
    proxies: Mutex<HashMap<String, String>>,
}

/// A running fake API server; stops when dropped.
pub struct FakeApiServer {
    address: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl FakeApiServer {
    /// Starts a fake API server on a free loopback port.
    ///
    /// # Panics
    /// When no loopback port can be bound (a broken test machine).
    pub async fn start() -> Self {
        let (changes, _) = broadcast::channel(65_536);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: FIRST_RV,
                ..Inner::default()
            }),
            changes,
            cuts: broadcast::channel(16).0,
            proxies: Mutex::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let address = listener.local_addr().expect("local address");
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            address,
            shared,
            task,
        }
    }

    /// The server's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A kubeconfig for this server, for a controller run as its own process.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nobody\n    namespace: default\nusers:\n- name: nobody\n  user: {{}}\ncurrent-context: fake\n",
            self.url()
        )
    }

    /// A kube client talking to this server.
    ///
    /// # Panics
    /// Never for a running server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("url"));
        kube::Client::try_from(config).expect("client")
    }

    /// From now on, requests bearing `token` are authorized against `grants` as kube-apiserver's
    /// RBAC would (403 Forbidden otherwise) for the subject `user`; requests without it are an
    /// administrator's.
    pub fn enforce_rbac(&self, token: &str, user: &str, grants: Vec<Grant>) {
        lock(&self.shared).rbac = Some(Rbac {
            token: token.to_owned(),
            user: user.to_owned(),
            grants,
            used: std::collections::BTreeSet::new(),
        });
    }

    /// A kube client that authenticates with a bearer token (see [`Self::enforce_rbac`]).
    ///
    /// # Panics
    /// Never for a running server.
    pub fn client_as(&self, token: &str) -> kube::Client {
        let mut config = kube::Config::new(self.url().parse().expect("url"));
        config.auth_info.token = Some(token.to_owned().into());
        kube::Client::try_from(config).expect("client")
    }

    /// Every `verb group/resource` a grant allows that the subject never used.
    pub fn unused_grants(&self) -> Vec<String> {
        let inner = lock(&self.shared);
        let Some(rbac) = &inner.rbac else {
            return Vec::new();
        };
        let mut unused: Vec<String> = rbac
            .grants
            .iter()
            .flat_map(|g| {
                g.verbs.iter().flat_map(move |v| {
                    g.groups.iter().flat_map(move |group| {
                        g.resources.iter().map(move |r| format!("{v} {group}/{r}"))
                    })
                })
            })
            .filter(|grant| !rbac.used.contains(grant))
            .collect();
        unused.sort();
        unused.dedup();
        unused
    }

    /// Ends every watch open now, mid-stream (clients must watch again from where they were).
    pub fn drop_watches(&self) {
        let _ = self.shared.cuts.send(());
    }

    /// Requests served so far, by `(verb, resource)`: verbs are get, list, watch, create,
    /// update, patch and delete; `conflict` counts the requests of any verb answered 409,
    /// `forbidden` those refused by RBAC.
    pub fn requests(&self) -> BTreeMap<(String, String), u64> {
        request_metrics::by_verb(&lock(&self.shared).requests)
    }

    /// Answers the next `times` requests with this verb (any resource) with `status`.
    pub fn fail_next(&self, verb: &str, status: u16, times: u32) {
        lock(&self.shared)
            .failures
            .insert(verb.to_owned(), (status, times));
    }

    /// Serves `/api/v1/namespaces/{namespace}/services/{service}/proxy/...` by forwarding to
    /// `backend` (what a real API server does through the Service's Endpoints).
    pub fn proxy_service(&self, namespace: &str, service: &str, backend: &str) {
        self.shared
            .proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                format!("{namespace}/{service}"),
                backend.trim_end_matches('/').to_owned(),
            );
    }

    /// Every stored object of a resource (for assertions).
    pub fn objects(&self, plural: &str) -> Vec<Value> {
        lock(&self.shared)
            .objects
            .iter()
            .filter(|((p, _, _), _)| *p == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The stored object, if any (for assertions).
    pub fn object(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.shared)
            .objects
            .iter()
            .find(|((p, n, m), _)| *p == plural && n == namespace && m == name)
            .map(|(_, v)| v.clone())
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    shared.inner.lock().unwrap_or_else(|e| e.into_inner())
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now())
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn status(code: u16, reason: &str, message: String, details: Value) -> Response {
    let mut body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code});
    if !details.is_null() {
        body["details"] = details;
        // As kube-apiserver (omitempty): the core group is no `group` at all.
        if body["details"]["group"] == ""
            && let Some(d) = body["details"].as_object_mut()
        {
            d.remove("group");
        }
    }
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn not_found(kind: &Kind, name: &str) -> Response {
    status(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", kind.qualified()),
        json!({"name": name, "group": kind.group, "kind": kind.plural}),
    )
}

fn conflict(kind: &Kind, name: &str) -> Response {
    status(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            kind.qualified()
        ),
        json!({"name": name, "group": kind.group, "kind": kind.plural}),
    )
}

/// An update without a resourceVersion: refused for every PUT, and for a patch of a custom
/// resource whose body removes it (`"metadata": {"resourceVersion": null}`), since custom
/// resources allow no unconditional update.
fn version_required(kind: &Kind, name: &str) -> Response {
    let cause = "Invalid value: 0x0: must be specified for an update";
    status(
        422,
        "Invalid",
        format!(
            "{} \"{name}\" is invalid: metadata.resourceVersion: {cause}",
            kind.qualified()
        ),
        json!({"name": name, "group": kind.group, "kind": kind.plural,
               "causes": [{"reason": "FieldValueInvalid", "message": cause, "field": "metadata.resourceVersion"}]}),
    )
}

/// What a write does with unknown fields (`?fieldValidation=`, default `Warn`), and whether it
/// is a patch: a strict patch is refused with 422, a strict create or update with 400.
#[derive(Clone, Copy)]
struct FieldValidation<'a> {
    mode: &'a str,
    patch: bool,
}

impl<'a> FieldValidation<'a> {
    fn new(q: &'a HashMap<String, String>, patch: bool) -> Self {
        let mode = q.get("fieldValidation").map_or("Warn", String::as_str);
        Self { mode, patch }
    }

    /// The `Warning` headers for the `unknown` fields admission pruned from `object`, or the
    /// refusal.
    fn check(
        self,
        kind: &Kind,
        unknown: &[String],
        object: &Value,
    ) -> Result<Vec<String>, Box<Response>> {
        match self.mode {
            _ if unknown.is_empty() => Ok(Vec::new()),
            "Ignore" => Ok(Vec::new()),
            "Strict" => {
                let error = format!("strict decoding error: {}", unknown.join(", "));
                Err(Box::new(if self.patch {
                    let cause = format!("Invalid value: {:?}: {error}", object.to_string());
                    status(
                        422,
                        "Invalid",
                        format!(" \"\" is invalid: patch: {cause}"),
                        json!({"causes": [{"reason": "FieldValueInvalid", "message": cause, "field": "patch"}]}),
                    )
                } else {
                    status(
                        400,
                        "BadRequest",
                        format!(
                            "{k} in version {v:?} cannot be handled as a {k}: {error}",
                            k = kind.kind,
                            v = kind.version
                        ),
                        Value::Null,
                    )
                }))
            }
            _ => Ok(unknown.iter().map(|u| format!("299 - {u:?}")).collect()),
        }
    }
}

/// `response` with one `Warning` header per warning.
fn warned(mut response: Response, warnings: &[String]) -> Response {
    for warning in warnings {
        if let Ok(value) = warning.parse() {
            response.headers_mut().append(header::WARNING, value);
        }
    }
    response
}

fn ok(code: StatusCode, value: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{value}\n"),
    )
        .into_response()
}

/// A parsed request path.
struct Target {
    kind: &'static Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, ..] if !plural.is_empty() => {
            (Some((*ns).to_owned()), &rest[2..])
        }
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, sub] => (*plural, Some((*name).to_owned()), Some((*sub).to_owned())),
        _ => return None,
    };
    // A bare /api/v1/namespaces/NAME is the Namespace object itself.
    let (namespace, plural, name) = match (&namespace, plural, &name) {
        (None, "namespaces", _) => (None, "namespaces", name),
        _ => (namespace, plural, name),
    };
    let kind = KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)?;
    if !kind.namespaced && namespace.is_some() {
        return None;
    }
    if kind.namespaced && namespace.is_none() && name.is_some() {
        return None;
    }
    Some(Target {
        kind,
        namespace,
        name,
        subresource,
    })
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn selected(object: &Value, q: &HashMap<String, String>) -> bool {
    let labels = object
        .pointer("/metadata/labels")
        .and_then(Value::as_object);
    let label_ok = q.get("labelSelector").is_none_or(|sel| {
        sel.split(',')
            .filter(|s| !s.is_empty())
            .all(|term| match term.split_once('=') {
                Some((k, v)) => {
                    labels
                        .and_then(|l| l.get(k.trim_end_matches('=')))
                        .and_then(Value::as_str)
                        == Some(v.trim_start_matches('='))
                }
                None => labels.is_some_and(|l| l.contains_key(term)),
            })
    });
    let field_ok = q.get("fieldSelector").is_none_or(|sel| {
        sel.split(',')
            .filter(|s| !s.is_empty())
            .all(|term| match term.split_once('=') {
                Some(("metadata.name", v)) => {
                    object.pointer("/metadata/name").and_then(Value::as_str) == Some(v)
                }
                Some(("metadata.namespace", v)) => {
                    object
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        == Some(v)
                }
                _ => true,
            })
    });
    label_ok && field_ok
}

fn verb(method: &Method, target: &Target, q: &HashMap<String, String>) -> &'static str {
    match (method.as_str(), target.name.is_some()) {
        ("GET", false) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => "other",
    }
}

/// The service proxy: `/api/v1/namespaces/NS/services/NAME[:PORT]/proxy/PATH`, answered with the
/// backend's own status and (streamed) body, as the real one does.
async fn proxy(shared: &Shared, uri: &Uri) -> Option<Response> {
    let rest = uri.path().strip_prefix("/api/v1/namespaces/")?;
    let (namespace, rest) = rest.split_once("/services/")?;
    let (service, path) = rest.split_once("/proxy")?;
    let key = format!("{namespace}/{service}");
    let backend = shared
        .proxies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    let Some(backend) = backend else {
        let name = service.split(':').next().unwrap_or(service);
        return Some(status(
            404,
            "NotFound",
            format!("services \"{name}\" not found"),
            json!({"name": name, "kind": "services"}),
        ));
    };
    let url = format!(
        "{backend}{path}{}",
        uri.query().map(|q| format!("?{q}")).unwrap_or_default()
    );
    far_tls::install();
    let answer = match reqwest::get(&url).await {
        Ok(answer) => answer,
        Err(e) => {
            return Some(status(
                503,
                "ServiceUnavailable",
                format!("error trying to reach service: {e}"),
                Value::Null,
            ));
        }
    };
    let code = answer.status().as_u16();
    // The backend's headers pass through (its content type, its security headers), as
    // kube-apiserver's proxy passes them; not those of the connection itself.
    let mut response = Response::builder().status(code);
    for (name, value) in answer.headers() {
        if !matches!(
            name.as_str(),
            "connection" | "transfer-encoding" | "content-length" | "keep-alive"
        ) {
            response = response.header(name.as_str(), value.as_bytes());
        }
    }
    Some(
        response
            .body(Body::from_stream(answer.bytes_stream()))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
    )
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if uri.path().starts_with("/api/v1/namespaces/")
        && uri.path().contains("/proxy")
        && let Some(response) = proxy(&shared, &uri).await
    {
        return response;
    }
    if uri.path() == "/metrics" && method == Method::GET {
        let text = request_metrics::render(&lock(&shared).requests);
        return ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response();
    }
    let Some(target) = parse_path(uri.path()) else {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain")],
            "404 page not found",
        )
            .into_response();
    };
    let q = query(&uri);
    let verb = verb(&method, &target, &q);
    let response = answer(&shared, &method, verb, &target, &q, &headers, &body);
    count(&shared, &method, verb, &target, &headers, response.status());
    response
}

/// Whether a request is a server-side apply.
fn is_apply(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/apply-patch"))
}

/// Counts a request as kube-apiserver's `apiserver_request_total` does.
fn count(
    shared: &Shared,
    method: &Method,
    verb: &str,
    target: &Target,
    headers: &HeaderMap,
    code: StatusCode,
) {
    let apply = is_apply(headers);
    let series = request_metrics::Series {
        verb: match verb {
            "list" => "LIST",
            "watch" => "WATCH",
            "patch" if apply => "APPLY",
            _ => method.as_str(),
        }
        .to_owned(),
        group: target.kind.group.to_owned(),
        version: target.kind.version.to_owned(),
        resource: target.kind.plural.to_owned(),
        subresource: target.subresource.clone().unwrap_or_default(),
        // As kube-apiserver's CleanScope: a create counts as one object's.
        scope: match (&target.name, &target.namespace) {
            (Some(_), _) => "resource",
            _ if verb == "create" => "resource",
            (None, Some(_)) => "namespace",
            (None, None) => "cluster",
        }
        .to_owned(),
        code: code.as_u16(),
    };
    *lock(shared).requests.entry(series).or_default() += 1;
}

fn answer(
    shared: &Arc<Shared>,
    method: &Method,
    verb: &'static str,
    target: &Target,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    {
        let mut inner = lock(shared);
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(rbac) = inner.rbac.as_mut()
            && bearer == Some(rbac.token.as_str())
            && !rbac.allows(verb, target)
        {
            let resource = match &target.subresource {
                Some(sub) => format!("{}/{sub}", target.kind.plural),
                None => target.kind.plural.to_owned(),
            };
            let scope = match &target.namespace {
                Some(ns) => format!(" in the namespace \"{ns}\""),
                None => " at the cluster scope".to_owned(),
            };
            let message = format!(
                "{}{} is forbidden: User \"{}\" cannot {verb} resource \"{resource}\" in API group \"{}\"{scope}",
                target.kind.qualified(),
                target
                    .name
                    .as_ref()
                    .map(|n| format!(" \"{n}\""))
                    .unwrap_or_default(),
                rbac.user,
                target.kind.group,
            );
            return status(
                403,
                "Forbidden",
                message,
                json!({"kind": target.kind.plural}),
            );
        }
        if let Some((code, left)) = inner.failures.get_mut(verb) {
            let code = *code;
            *left -= 1;
            if *left == 0 {
                inner.failures.remove(verb);
            }
            if code == 429 {
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, "1")],
                    "Too many requests, please try again later.",
                )
                    .into_response();
            }
            return status(
                code,
                "InternalError",
                format!("injected failure for {verb}"),
                Value::Null,
            );
        }
    }
    // Only writes have a writer (reads and watches are most requests).
    let writer = || Writer {
        manager: managed_fields::manager(q.get("fieldManager").map(String::as_str), headers),
        operation: if is_apply(headers) { "Apply" } else { "Update" },
    };
    if target.subresource.as_deref() == Some("scale") {
        return scale(shared, verb, target, q, headers, body, &writer());
    }
    match verb {
        "list" => list(shared, target, q),
        "watch" => watch(shared, target, q),
        "get" => get(shared, target),
        "create" => create(shared, target, q, body, &writer()),
        "update" => update(shared, target, q, body, &writer()),
        "patch" => patch(shared, target, q, headers, body, &writer()),
        "delete" => delete(shared, target, body),
        _ => status(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported"),
            Value::Null,
        ),
    }
}

/// A list, in pages with `limit` and `continue` (a token `RV/namespace/name` of the last item:
/// later pages read the state as of the first page's resourceVersion, replayed from the log, as
/// kube-apiserver's consistent snapshot).
fn list(shared: &Shared, target: &Target, q: &HashMap<String, String>) -> Response {
    let inner = lock(shared);
    let in_scope = |plural: &str, ns: &str| {
        plural == target.kind.plural && target.namespace.as_ref().is_none_or(|n| n == ns)
    };
    let (rv, after, state) = match q.get("continue").filter(|c| !c.is_empty()) {
        None => {
            let state: BTreeMap<(&str, &str), &Value> = inner
                .objects
                .iter()
                .filter(|((p, ns, _), _)| in_scope(p, ns))
                .map(|((_, ns, name), v)| ((ns.as_str(), name.as_str()), v))
                .collect();
            (inner.rv, None, state)
        }
        Some(token) => {
            let Some((rv, after)) = token
                .split_once('/')
                .and_then(|(rv, key)| Some((rv.parse::<u64>().ok()?, key.split_once('/')?)))
            else {
                return status(
                    400,
                    "BadRequest",
                    format!("invalid continue token: {token}"),
                    Value::Null,
                );
            };
            let mut state = BTreeMap::new();
            for c in inner
                .log
                .iter()
                .filter(|c| c.rv <= rv && in_scope(c.plural, &c.namespace))
            {
                let name = c.object["metadata"]["name"].as_str().unwrap_or_default();
                if c.kind == "DELETED" {
                    state.remove(&(c.namespace.as_str(), name));
                } else {
                    state.insert((c.namespace.as_str(), name), &c.object);
                }
            }
            (rv, Some(after), state)
        }
    };
    let matching: Vec<(&(&str, &str), &&Value)> = state
        .iter()
        .filter(|(k, v)| after.is_none_or(|a| **k > a) && selected(v, q))
        .collect();
    let page = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .map_or(matching.len(), |l| l.min(matching.len()));
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if page < matching.len() {
        let (ns, name) = matching[page - 1].0;
        metadata["continue"] = json!(format!("{rv}/{ns}/{name}"));
        if !q.contains_key("labelSelector") && !q.contains_key("fieldSelector") {
            metadata["remainingItemCount"] = json!(matching.len() - page);
        }
    } else if target.kind.is_custom() {
        // Custom resource lists always carry it; built-in ones only when there is more.
        metadata["continue"] = json!("");
    }
    let items: Vec<Value> = matching[..page]
        .iter()
        .map(|(_, v)| {
            let mut item = (**v).clone();
            // Built-in list items carry no kind or apiVersion.
            if !target.kind.is_custom()
                && let Some(m) = item.as_object_mut()
            {
                m.remove("kind");
                m.remove("apiVersion");
            }
            item
        })
        .collect();
    let list = json!({
        "apiVersion": target.kind.api_version(),
        "kind": format!("{}List", target.kind.kind),
        "metadata": metadata,
        "items": items,
    });
    ok(StatusCode::OK, &list)
}

fn watch(shared: &Shared, target: &Target, q: &HashMap<String, String>) -> Response {
    let from: Option<u64> = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1800u64);
    let bookmarks = from.is_some() && q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let bookmark = json!({"apiVersion": target.kind.api_version(), "kind": target.kind.kind});
    let plural = target.kind.plural;
    let namespace = target.namespace.clone();
    let q = q.clone();
    let matches = move |c: &Change| {
        c.plural == plural
            && namespace.as_ref().is_none_or(|n| *n == c.namespace)
            && selected(&c.object, &q)
    };
    // Subscribe first, then read the backlog: nothing falls between the two.
    let mut live = shared.changes.subscribe();
    let mut cut = shared.cuts.subscribe();
    // `type_rv`: the newest change of this type, which a bookmark carries; `seen`: how far the
    // watch is, replayed changes of the type included even when filtered out, so a bookmark is
    // sent only when it moves the client on.
    let (backlog, mut last, mut type_rv, expired) = {
        let inner = lock(shared);
        let type_rv = inner
            .log
            .iter()
            .rev()
            .find(|c| c.plural == plural)
            .map_or(0, |c| c.rv);
        let (backlog, last, expired) = match from {
            Some(rv) if rv < FIRST_RV => (
                vec![
                    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("too old resource version: {rv} ({FIRST_RV})"), "reason": "Expired", "code": 410}}),
                ],
                inner.rv,
                true,
            ),
            Some(rv) => (
                inner
                    .log
                    .iter()
                    .filter(|c| c.rv > rv && matches(c))
                    .map(|c| json!({"type": c.kind, "object": c.object}))
                    .collect(),
                inner.rv,
                false,
            ),
            None => (
                inner
                    .objects
                    .iter()
                    .filter(|((p, _, _), v)| {
                        *p == plural
                            && matches(&Change {
                                rv: 0,
                                plural,
                                namespace: v
                                    .pointer("/metadata/namespace")
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_owned(),
                                kind: "ADDED",
                                object: (*v).clone(),
                            })
                    })
                    .map(|(_, v)| json!({"type": "ADDED", "object": v}))
                    .collect(),
                inner.rv,
                false,
            ),
        };
        (backlog, last, type_rv, expired)
    };
    let mut seen = from.unwrap_or(0).max(type_rv);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1024);
    tokio::spawn(async move {
        for event in backlog {
            if tx
                .send(Ok(Bytes::from(format!("{event}\n"))))
                .await
                .is_err()
            {
                return;
            }
        }
        // A too-old watch ends after its ERROR event.
        if expired {
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let end = tokio::time::sleep_until(deadline);
        tokio::pin!(end);
        let mut bookmark_at = next_bookmark(deadline).filter(|_| bookmarks);
        loop {
            tokio::select! {
                () = &mut end => return,
                () = tokio::time::sleep_until(bookmark_at.unwrap_or(deadline)), if bookmark_at.is_some() => {
                    bookmark_at = next_bookmark(deadline);
                    if type_rv > seen {
                        seen = type_rv;
                        let mut object = bookmark.clone();
                        object["metadata"] = json!({"resourceVersion": type_rv.to_string()});
                        let line = json!({"type": "BOOKMARK", "object": object});
                        if tx.send(Ok(Bytes::from(format!("{line}\n")))).await.is_err() {
                            return;
                        }
                    }
                }
                _ = cut.recv() => return,
                change = live.recv() => match change {
                    Ok(c) if c.rv > last => {
                        last = c.rv;
                        if c.plural == plural {
                            type_rv = c.rv;
                        }
                        if !matches(&c) {
                            continue;
                        }
                        seen = c.rv;
                        let line = json!({"type": c.kind, "object": c.object});
                        if tx.send(Ok(Bytes::from(format!("{line}\n")))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let expired = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
                        let _ = tx.send(Ok(Bytes::from(format!("{expired}\n")))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// When kube-apiserver sends a watch its next bookmark: about every minute, and 2 s before the
/// watch times out; none after that.
fn next_bookmark(deadline: tokio::time::Instant) -> Option<tokio::time::Instant> {
    let now = tokio::time::Instant::now();
    let at = (now + Duration::from_secs(60)).min(deadline.checked_sub(Duration::from_secs(2))?);
    (at > now).then_some(at)
}

fn key(target: &Target, name: &str) -> Key {
    (
        target.kind.plural,
        target.namespace.clone().unwrap_or_default(),
        name.to_owned(),
    )
}

fn get(shared: &Shared, target: &Target) -> Response {
    let name = target.name.clone().unwrap_or_default();
    match lock(shared).objects.get(&key(target, &name)) {
        Some(v) => ok(StatusCode::OK, v),
        None => not_found(target.kind, &name),
    }
}

/// Runs the CRD admission rules for our kinds: the object as stored, and the unknown fields
/// pruned from it. Other kinds are taken as they are.
fn admit(
    kind: &Kind,
    object: &Value,
    old: Option<&Value>,
) -> Result<(Value, Vec<String>), Box<Response>> {
    if !kind.is_custom() {
        return Ok((object.clone(), Vec::new()));
    }
    let admission = far_api::manifest::admission_for(&kind.api_version(), kind.kind)
        .ok()
        .flatten()
        .ok_or_else(|| {
            status(
                500,
                "InternalError",
                "no admission rules".into(),
                Value::Null,
            )
        })?;
    admission.admit(object, old).map(|a| (a.object, a.warnings)).map_err(|rejected| {
        let causes: Vec<Value> = rejected.causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect();
        Box::new(status(422, "Invalid", rejected.to_string(), json!({"name": rejected.name, "group": kind.group, "kind": kind.kind, "causes": causes})))
    })
}

/// Stores a write and tells watchers, or removes the object when it is terminating with no
/// finalizers left.
fn commit(
    inner: &mut Inner,
    shared: &Shared,
    target: &Target,
    name: &str,
    mut object: Value,
    kind: &'static str,
) -> Value {
    inner.rv += 1;
    let rv = inner.rv;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let k = key(target, name);
    let finalizers_left = object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    let (kind, stored) =
        if object.pointer("/metadata/deletionTimestamp").is_some() && !finalizers_left {
            // Gone: watchers get the last stored content at the deletion's version; the writer
            // gets what it wrote at the version it had, as kube-apiserver answers.
            let mut last = inner.objects.remove(&k).unwrap_or_else(|| object.clone());
            object["metadata"]["resourceVersion"] = last["metadata"]["resourceVersion"].clone();
            last["metadata"]["resourceVersion"] = json!(rv.to_string());
            ("DELETED", last)
        } else {
            inner.objects.insert(k, object.clone());
            (kind, object.clone())
        };
    let change = Change {
        rv,
        plural: target.kind.plural,
        namespace: target.namespace.clone().unwrap_or_default(),
        kind,
        object: stored,
    };
    inner.log.push(change.clone());
    let _ = shared.changes.send(change);
    object
}

fn create(
    shared: &Shared,
    target: &Target,
    q: &HashMap<String, String>,
    body: &[u8],
    writer: &Writer,
) -> Response {
    let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
        return status(
            400,
            "BadRequest",
            "the object provided is not JSON".into(),
            Value::Null,
        );
    };
    if let (Some(sent), Some(url)) = (
        object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str),
        &target.namespace,
    ) && sent != url
    {
        return status(
            400,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
            Value::Null,
        );
    }
    if object
        .pointer("/metadata/resourceVersion")
        .is_some_and(|v| !v.is_null())
    {
        return status(
            500,
            "",
            "resourceVersion should not be set on objects to be created".into(),
            Value::Null,
        );
    }
    let generate = object
        .pointer("/metadata/generateName")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let name = match (
        object.pointer("/metadata/name").and_then(Value::as_str),
        generate,
    ) {
        (Some(n), _) if !n.is_empty() => n.to_owned(),
        (_, Some(prefix)) => format!(
            "{prefix}{}",
            &ulid::Ulid::new().to_string().to_lowercase()[21..]
        ),
        _ => String::new(),
    };
    object["apiVersion"] = json!(target.kind.api_version());
    object["kind"] = json!(target.kind.kind);
    object["metadata"]["name"] = json!(name);
    if let Some(ns) = &target.namespace {
        object["metadata"]["namespace"] = json!(ns);
    }
    if target.kind.status
        && let Some(map) = object.as_object_mut()
    {
        map.remove("status");
    }
    let (mut object, warnings) = match admit(target.kind, &object, None).and_then(|(o, unknown)| {
        let warnings = FieldValidation::new(q, false).check(target.kind, &unknown, &object)?;
        Ok((o, warnings))
    }) {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    let mut inner = lock(shared);
    if inner.objects.contains_key(&key(target, &name)) {
        return status(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", target.kind.qualified()),
            json!({"name": name, "group": target.kind.group, "kind": target.kind.plural}),
        );
    }
    let time = now();
    managed_fields::record(
        None,
        &mut object,
        writer,
        &Landing {
            api_version: &target.kind.api_version(),
            subresource: None,
            time: &time,
        },
    );
    let meta = &mut object["metadata"];
    meta["uid"] = json!(ulid::Ulid::new().to_string().to_lowercase());
    meta["creationTimestamp"] = json!(time);
    if target.kind.is_custom() {
        meta["generation"] = json!(1);
    }
    if let Some(m) = meta.as_object_mut() {
        m.remove("deletionTimestamp");
    }
    let stored = commit(&mut inner, shared, target, &name, object, "ADDED");
    warned(ok(StatusCode::CREATED, &stored), &warnings)
}

/// Applies the result of an update or patch (`candidate`) over `current`, with the status
/// subresource's and the main resource's rules, and stores it if anything changed.
fn write(
    shared: &Shared,
    inner: &mut Inner,
    target: &Target,
    current: &Value,
    candidate: Value,
    writer: &Writer,
    fields: FieldValidation,
) -> Response {
    let name = target.name.clone().unwrap_or_default();
    let mut next = current.clone();
    let status_write = target.subresource.as_deref() == Some("status");
    if status_write {
        match candidate.get("status") {
            Some(s) => next["status"] = s.clone(),
            None => {
                if let Some(map) = next.as_object_mut() {
                    map.remove("status");
                }
            }
        }
    } else {
        let keep_status = current.get("status").cloned();
        next = candidate;
        if target.kind.status {
            match keep_status {
                Some(s) => next["status"] = s,
                None => {
                    if let Some(map) = next.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
        }
        // Server-owned metadata is kept whatever the client sent.
        for field in [
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
            "namespace",
            "name",
            "managedFields",
        ] {
            match current["metadata"].get(field) {
                Some(v) => next["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = next["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        let old_finalizers: Vec<Value> = current
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let new_finalizers: Vec<Value> = next
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let added: Vec<String> = new_finalizers
            .iter()
            .filter(|f| !old_finalizers.contains(f))
            .map(|f| format!("{:?}", f.as_str().unwrap_or_default()))
            .collect();
        if current.pointer("/metadata/deletionTimestamp").is_some() && !added.is_empty() {
            let cause = format!(
                "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                added.join(", ")
            );
            // kube-apiserver lists the cause twice.
            let cause_json = json!({"reason": "FieldValueForbidden", "message": cause, "field": "metadata.finalizers"});
            return status(
                422,
                "Invalid",
                format!(
                    "{} {name:?} is invalid: metadata.finalizers: {cause}",
                    target.kind.kind_group()
                ),
                json!({"name": name, "group": target.kind.group, "kind": target.kind.kind,
                       "causes": [cause_json.clone(), cause_json]}),
            );
        }
        if new_finalizers.is_empty()
            && let Some(m) = next["metadata"].as_object_mut()
        {
            m.remove("finalizers");
        }
    }
    let (mut next, warnings) = match admit(target.kind, &next, Some(current))
        .and_then(|(o, unknown)| Ok((o, fields.check(target.kind, &unknown, &next)?)))
    {
        Ok(admitted) => admitted,
        Err(response) => return *response,
    };
    next["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
    if next == *current {
        return warned(ok(StatusCode::OK, current), &warnings);
    }
    if target.kind.is_custom() && next.get("spec") != current.get("spec") {
        let generation = current
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        next["metadata"]["generation"] = json!(generation + 1);
    }
    managed_fields::record(
        Some(current),
        &mut next,
        writer,
        &Landing {
            api_version: &target.kind.api_version(),
            subresource: target.subresource.as_deref(),
            time: &now(),
        },
    );
    let stored = commit(inner, shared, target, &name, next, "MODIFIED");
    warned(ok(StatusCode::OK, &stored), &warnings)
}

/// Where a custom resource's scale subresource reads and writes, from its CRD (as
/// kube-apiserver reads them): spec replicas, status replicas and label selector, as JSON
/// pointers. `None`: the kind has no scale subresource.
fn scale_paths(kind: &Kind) -> Option<[Option<String>; 3]> {
    let pointer = |path: &str| path.replace('.', "/");
    far_api::crds().into_iter().find_map(|crd| {
        let scale = crd
            .spec
            .versions
            .iter()
            .find(|v| v.name == kind.version)?
            .subresources
            .as_ref()?
            .scale
            .clone()?;
        (crd.spec.group == kind.group && crd.spec.names.plural == kind.plural).then(|| {
            [
                Some(pointer(&scale.spec_replicas_path)),
                Some(pointer(&scale.status_replicas_path)),
                scale.label_selector_path.as_deref().map(pointer),
            ]
        })
    })
}

/// The `autoscaling/v1` Scale of `object`, as kube-apiserver builds it: 500 while the spec
/// replicas field is unset.
fn scale_of(object: &Value, paths: &[Option<String>; 3]) -> Result<Value, Box<Response>> {
    let [spec, status_replicas, selector] = paths;
    let spec_path = spec.clone().unwrap_or_default();
    let Some(replicas) = object.pointer(&spec_path).and_then(Value::as_i64) else {
        return Err(Box::new(status(
            500,
            "InternalError",
            format!(
                "Internal error occurred: the spec replicas field {:?} does not exist",
                spec_path.replace('/', ".")
            ),
            json!({"causes": [{"message": format!("the spec replicas field {:?} does not exist", spec_path.replace('/', "."))}]}),
        )));
    };
    let meta = &object["metadata"];
    let mut scale = json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"], "creationTimestamp": meta["creationTimestamp"]},
        "spec": {},
        "status": {"replicas": status_replicas.as_deref().and_then(|p| object.pointer(p)).and_then(Value::as_i64).unwrap_or(0)},
    });
    // autoscaling/v1 omits zero replicas in spec.
    if replicas != 0 {
        scale["spec"]["replicas"] = json!(replicas);
    }
    if let Some(sel) = selector.as_deref().and_then(|p| object.pointer(p)) {
        scale["status"]["selector"] = sel.clone();
    }
    Ok(scale)
}

/// The scale subresource: GET answers the Scale; a merge patch or an update of the Scale sets
/// the object's spec replicas through the object's own admission (so its CEL rules refuse
/// what they refuse), and answers the new Scale.
fn scale(
    shared: &Shared,
    verb: &str,
    target: &Target,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
    writer: &Writer,
) -> Response {
    let Some(paths) = scale_paths(target.kind) else {
        return (StatusCode::NOT_FOUND, "404 page not found").into_response();
    };
    let name = target.name.clone().unwrap_or_default();
    let mut inner = lock(shared);
    let Some(current) = inner.objects.get(&key(target, &name)).cloned() else {
        return not_found(target.kind, &name);
    };
    let mut scale = match scale_of(&current, &paths) {
        Ok(scale) => scale,
        Err(response) => return *response,
    };
    let sent: Value = match verb {
        "get" => return ok(StatusCode::OK, &scale),
        "patch" | "update" => match serde_json::from_slice(body) {
            Ok(sent) => sent,
            Err(_) => {
                return status(
                    400,
                    "BadRequest",
                    "the object provided is not JSON".into(),
                    Value::Null,
                );
            }
        },
        _ => {
            return status(
                405,
                "MethodNotAllowed",
                format!("{verb} is not supported on the scale subresource"),
                Value::Null,
            );
        }
    };
    let merge = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/merge-patch+json"));
    if verb == "patch" && !merge {
        return status(
            415,
            "UnsupportedMediaType",
            "the fake serves merge patches of the scale subresource only".into(),
            Value::Null,
        );
    }
    if let Some(rv) = sent
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|rv| !rv.is_empty())
        && Some(rv)
            != current
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
    {
        return conflict(target.kind, &name);
    }
    if verb == "patch" {
        json_patch::merge(&mut scale, &sent);
    } else {
        scale = sent;
    }
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let mut candidate = current.clone();
    if let Some(slot) = paths[0].as_deref().and_then(|p| candidate.pointer_mut(p)) {
        *slot = json!(replicas);
    }
    let written = write(
        shared,
        &mut inner,
        target,
        &current,
        candidate,
        writer,
        FieldValidation::new(q, false),
    );
    if !written.status().is_success() {
        return written;
    }
    match inner
        .objects
        .get(&key(target, &name))
        .map(|stored| scale_of(stored, &paths))
    {
        Some(Ok(scale)) => ok(StatusCode::OK, &scale),
        Some(Err(response)) => *response,
        None => not_found(target.kind, &name),
    }
}

fn update(
    shared: &Shared,
    target: &Target,
    q: &HashMap<String, String>,
    body: &[u8],
    writer: &Writer,
) -> Response {
    let name = target.name.clone().unwrap_or_default();
    let Ok(candidate) = serde_json::from_slice::<Value>(body) else {
        return status(
            400,
            "BadRequest",
            "the object provided is not JSON".into(),
            Value::Null,
        );
    };
    let mut inner = lock(shared);
    let Some(current) = inner.objects.get(&key(target, &name)).cloned() else {
        return not_found(target.kind, &name);
    };
    match candidate
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        None | Some("") => return version_required(target.kind, &name),
        Some(rv)
            if Some(rv)
                != current
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str) =>
        {
            return conflict(target.kind, &name);
        }
        Some(_) => {}
    }
    let fields = FieldValidation::new(q, false);
    write(
        shared, &mut inner, target, &current, candidate, writer, fields,
    )
}

fn patch(
    shared: &Shared,
    target: &Target,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
    writer: &Writer,
) -> Response {
    let name = target.name.clone().unwrap_or_default();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mut inner = lock(shared);
    let Some(current) = inner.objects.get(&key(target, &name)).cloned() else {
        return not_found(target.kind, &name);
    };
    let mut candidate = current.clone();
    match content_type.split(';').next().unwrap_or_default() {
        "application/merge-patch+json" | "application/apply-patch+yaml" => {
            let Ok(patch) = serde_json::from_slice::<Value>(body) else {
                return status(
                    400,
                    "BadRequest",
                    "error decoding patch".into(),
                    Value::Null,
                );
            };
            if let Some(rv) = patch
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                && Some(rv)
                    != current
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
            {
                return conflict(target.kind, &name);
            }
            json_patch::merge(&mut candidate, &patch);
        }
        "application/json-patch+json" => {
            let Ok(Value::Array(ops)) = serde_json::from_slice::<Value>(body) else {
                return status(
                    400,
                    "BadRequest",
                    "error decoding patch: not an array of operations".into(),
                    Value::Null,
                );
            };
            // As the API server does: `test` of a missing path against null passes (kube-rs
            // relies on it to add the first finalizer).
            let ops: Vec<Value> = ops
                .into_iter()
                .filter(|op| {
                    let missing_null_test = op["op"] == "test"
                        && op["value"].is_null()
                        && op["path"]
                            .as_str()
                            .is_some_and(|p| current.pointer(p).is_none_or(Value::is_null));
                    !missing_null_test
                })
                .collect();
            let Ok(patch) = serde_json::from_value::<json_patch::Patch>(Value::Array(ops)) else {
                return status(
                    400,
                    "BadRequest",
                    "error decoding patch".into(),
                    Value::Null,
                );
            };
            if json_patch::patch(&mut candidate, &patch).is_err() {
                return status(
                    422,
                    "Invalid",
                    "the server rejected our request due to an error in our request".into(),
                    json!({}),
                );
            }
        }
        "application/strategic-merge-patch+json" if !target.kind.is_custom() => {
            let Ok(patch) = serde_json::from_slice::<Value>(body) else {
                return status(
                    400,
                    "BadRequest",
                    "error decoding patch".into(),
                    Value::Null,
                );
            };
            json_patch::merge(&mut candidate, &patch);
        }
        _ => {
            return status(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml".into(),
                Value::Null,
            );
        }
    }
    if target.kind.is_custom()
        && candidate
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        return version_required(target.kind, &name);
    }
    let fields = FieldValidation::new(q, true);
    write(
        shared, &mut inner, target, &current, candidate, writer, fields,
    )
}

fn delete(shared: &Shared, target: &Target, body: &[u8]) -> Response {
    let name = target.name.clone().unwrap_or_default();
    let mut inner = lock(shared);
    let Some(current) = inner.objects.get(&key(target, &name)).cloned() else {
        return not_found(target.kind, &name);
    };
    // DeleteOptions' preconditions, checked as kube-apiserver does: uid, then resourceVersion.
    let options: Value = serde_json::from_slice(body).unwrap_or_default();
    for (field, label, why) in [
        ("uid", "UID", "deleted and then recreated"),
        ("resourceVersion", "ResourceVersion", "modified"),
    ] {
        let held = current["metadata"][field].as_str().unwrap_or_default();
        if let Some(wanted) = options["preconditions"][field].as_str()
            && wanted != held
        {
            return status(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {name:?}: the {label} in the precondition ({wanted}) does not match the {label} in record ({held}). The object might have been {why}",
                    target.kind.kind_group()
                ),
                json!({"name": name, "group": target.kind.group, "kind": target.kind.kind}),
            );
        }
    }
    let has_finalizers = current
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    if has_finalizers {
        if current.pointer("/metadata/deletionTimestamp").is_some() {
            return ok(StatusCode::OK, &current);
        }
        let mut next = current.clone();
        next["metadata"]["deletionTimestamp"] = json!(now());
        next["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        if let Some(g) = current
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
        {
            next["metadata"]["generation"] = json!(g + 1);
        }
        let stored = commit(&mut inner, shared, target, &name, next, "MODIFIED");
        return ok(StatusCode::OK, &stored);
    }
    let mut gone = current.clone();
    gone["metadata"]["deletionTimestamp"] = json!(now());
    let uid = current
        .pointer("/metadata/uid")
        .cloned()
        .unwrap_or(Value::Null);
    commit(&mut inner, shared, target, &name, gone, "DELETED");
    ok(
        StatusCode::OK,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": name, "group": target.kind.group, "kind": target.kind.plural, "uid": uid}}),
    )
}
