//! Proof that the fake API server answers as kube-apiserver does: a fixed script of raw HTTP
//! requests, recorded once against a real kube-apiserver (`recordings/`), replayed against
//! [`FakeApiServer`](crate::apiserver::FakeApiServer) in CI, and compared answer by answer.
//!
//! The script is data ([`script`]): every request shape FAR's controller, CLI and bench send,
//! and the edges their correctness rests on. Answers are normalised so that only what is
//! deterministic and matters is compared: the HTTP code, a Status's reason, message and details,
//! Warning headers, chosen fields of returned objects, and watch events. Values that differ on
//! every run are replaced by what they mean: a resourceVersion by the step that first returned it
//! (so "unchanged" and "new" survive), a uid likewise, times by their format, the run's random
//! suffix by `<run>`.
//!
//! Record against a disposable API server: the bookmark step expects no other FlintlockHost
//! writes while it runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::{Request, header};
use kube::client::Body;
use serde_json::{Map, Value, json};

/// The committed recording the fake is held to, relative to this crate.
pub const RECORDING: &str = "recordings/kube-apiserver-1.28.7.json";

/// Where a recording for `version` (e.g. `v1.28.7`) is written.
pub fn recording_path(version: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "recordings/kube-apiserver-{}.json",
        version.trim_start_matches('v')
    ))
}

/// Edges left out of the script, and why; written into the recording.
pub const EXCLUDED: &[(&str, &str)] = &[
    (
        "core v1 Events (/api/v1/.../events)",
        "FAR writes events.k8s.io/v1 Events only (kube-rs Recorder); the fake does not serve the core view",
    ),
    (
        "server-side apply",
        "FAR never applies (the fake treats apply as a merge, without field ownership or conflicts)",
    ),
    (
        "the list's own resourceVersion",
        "the current etcd revision: the API server's own Lease renewals in kube-system move it at any time",
    ),
    (
        "periodic (60 s) bookmarks",
        "too slow for CI; the script records the bookmark sent before a watch's timeout",
    ),
    (
        "managedFields, creationTimestamp values, Namespace status and finalizers",
        "best-effort or server-specific bookkeeping no FAR component reads",
    ),
    (
        "writes into a missing or terminating namespace (404, 403)",
        "the fake does not model namespaces' life; FAR writes only into namespaces that exist",
    ),
    (
        "list and watch resourceVersion variants (0, Exact, future, compacted continue tokens)",
        "FAR lists without one and watches from the list's; kube-rs sends none of the others",
    ),
];

const AGENTS: &str = "/apis/tiffany.dev/v1/namespaces/{ns}/faragents";
const HOSTS: &str = "/apis/tiffany.dev/v1/flintlockhosts";
const POOLS: &str = "/apis/tiffany.dev/v1/namespaces/{ns}/faragentpools";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/{ns}/events";
const JSON: &str = "application/json";
const MERGE: &str = "application/merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";
const STRATEGIC: &str = "application/strategic-merge-patch+json";
const FINALIZER: &str = "tiffany.dev/vm-cleanup";
const SECOND: &str = "conformance.far.test/second";
/// The event name kube-rs's Recorder makes: `<regarding>.<hex nanoseconds>`.
const EVENT: &str = "a2.18ebf7386706d270";

/// One request of the script, and which fields of its answer matter.
///
/// `path` and `body` are templates: `{ns}` is the run's namespace, `{run}` its random suffix,
/// `{rv:STEP}`, `{uid:STEP}` and `{continue:STEP}` the resourceVersion, uid and continue
/// token an earlier step's answer carried.
#[derive(Clone, Debug)]
pub struct Step {
    /// Names the step in the recording and in references.
    pub name: &'static str,
    /// The HTTP method.
    pub method: &'static str,
    /// Path and query.
    pub path: String,
    /// The request's Content-Type, if any.
    pub content_type: Option<&'static str>,
    /// The request body, a template filled as text.
    pub body: Option<String>,
    /// JSON pointers of the answer's object (of each watch event's object) to record; `/*/`
    /// ranges over an array.
    pub keep: Vec<&'static str>,
    /// A watch left open while the following steps run; its answer is read at the end.
    pub background: bool,
}

fn step(name: &'static str, method: &'static str, path: &str) -> Step {
    Step {
        name,
        method,
        path: path.to_owned(),
        content_type: None,
        body: None,
        keep: Vec::new(),
        background: false,
    }
}

fn get(name: &'static str, path: &str) -> Step {
    step(name, "GET", path)
}

fn send(
    name: &'static str,
    method: &'static str,
    path: &str,
    content_type: &'static str,
    body: &Value,
) -> Step {
    Step {
        content_type: Some(content_type),
        body: Some(body.to_string()),
        ..step(name, method, path)
    }
}

fn post(name: &'static str, path: &str, body: &Value) -> Step {
    send(name, "POST", path, JSON, body)
}

fn put(name: &'static str, path: &str, body: &Value) -> Step {
    send(name, "PUT", path, JSON, body)
}

fn merge(name: &'static str, path: &str, body: &Value) -> Step {
    send(name, "PATCH", path, MERGE, body)
}

fn json_patch(name: &'static str, path: &str, body: &Value) -> Step {
    send(name, "PATCH", path, JSON_PATCH, body)
}

/// A DELETE as kube-rs sends it: DeleteOptions as a JSON body.
fn delete(name: &'static str, path: &str, options: &Value) -> Step {
    send(name, "DELETE", path, JSON, options)
}

impl Step {
    fn keep(mut self, pointers: &[&'static str]) -> Self {
        self.keep = pointers.to_vec();
        self
    }

    fn in_background(mut self) -> Self {
        self.background = true;
        self
    }
}

fn agent(name: &str) -> Value {
    json!({"apiVersion": "tiffany.dev/v1", "kind": "FarAgent", "metadata": {"name": name},
           "spec": {"image": "busybox:1", "memory": "512Mi", "cpu": 1, "entrypoint": "/bin/sh"}})
}

fn lease(rv: Option<&str>, holder: &str, renewed: &str) -> Value {
    let mut lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "far-agent-controller", "namespace": "{ns}"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                 "acquireTime": "2026-01-01T00:00:00.000000Z", "renewTime": renewed,
                 "leaseTransitions": 0}});
    if let Some(rv) = rv {
        lease["metadata"]["resourceVersion"] = json!(rv);
    }
    lease
}

/// The Event kube-rs's `Recorder::publish` posts for an agent (the controller's events).
fn event() -> Value {
    json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": EVENT, "namespace": "{ns}"},
        "action": "Reconcile", "reason": "Scheduled", "note": "placed on host h1", "type": "Normal",
        "eventTime": "2026-01-01T00:00:00.123456Z",
        "regarding": {"apiVersion": "tiffany.dev/v1", "kind": "FarAgent", "name": "a2",
                      "namespace": "{ns}", "uid": "{uid:create-a2}",
                      "resourceVersion": "{rv:create-a2}"},
        "reportingController": "far-agent-controller",
        "reportingInstance": "far-agent-controller-0"})
}

/// The script: every request shape of FAR's controller (watcher list and watch, fenced status
/// and metadata merges, finalizers, Lease election, Events, Secret reads), its CLI (logs through
/// the service proxy) and bench (Namespace, hosts, unconditional status patches, deletes), and
/// the edges of their semantics.
pub fn script() -> Vec<Step> {
    let a1 = &format!("{AGENTS}/a1");
    let a2 = &format!("{AGENTS}/a2");
    let a3 = &format!("{AGENTS}/a3");
    let a1_status = &format!("{a1}/status");
    let phase = |p: &str| json!({"status": {"phase": p}});
    let fenced = |rv: &str, mut patch: Value| {
        patch["metadata"]["resourceVersion"] = json!(rv);
        patch
    };
    let host = "far-conformance-{run}-h1";
    let host_path = &format!("{HOSTS}/{host}");
    let lease_path = &format!("{LEASES}/far-agent-controller");
    let pool = &format!("{POOLS}/p1");
    let pool_scale = &format!("{pool}/scale");
    let mut bad_agent = agent("bad");
    bad_agent["spec"]["cpu"] = json!(0);
    bad_agent["spec"]["entrypoint"] = json!("bin/sh");
    let mut with_status = agent("a1");
    with_status["status"] = json!({"phase": "Running"});
    let mut unknown = agent("u1");
    unknown["spec"]["bogus"] = json!(true);
    unknown["extra"] = json!(1);
    let unknown_patch = json!({"metadata": {"labels": {"u": "1"}}, "spec": {"bogus": true}});
    let finalizers = |f: &[&str]| json!({"metadata": {"finalizers": f}});
    vec![
        // The bench's namespace, made whether or not it exists.
        post(
            "create-namespace",
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "{ns}"}}),
        )
        .keep(&["/metadata/name"]),
        post(
            "create-namespace-again",
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "{ns}"}}),
        ),
        // Create: status dropped, defaults applied, generation 1.
        post("create-a1", AGENTS, &with_status).keep(&[
            "/metadata/generation",
            "/metadata/finalizers",
            "/spec/backoffLimit",
            "/status",
        ]),
        post("create-a1-again", AGENTS, &agent("a1")),
        post("create-invalid", AGENTS, &bad_agent),
        post("create-namespace-mismatch", AGENTS, &{
            let mut other = agent("a9");
            other["metadata"]["namespace"] = json!("elsewhere");
            other
        }),
        post("create-a2", AGENTS, &agent("a2")),
        post("create-a3", AGENTS, &agent("a3")),
        get("get-missing", &format!("{AGENTS}/nope")),
        get("get-a1", a1).keep(&["/metadata/name", "/metadata/uid"]),
        // Lists: the kube-rs watcher's first page, pages with continue, a cluster-wide list
        // narrowed by a field selector.
        get("list-as-watcher", &format!("{AGENTS}?limit=500")).keep(&[
            "/items/*/metadata/name",
            "/items/*/kind",
            "/metadata/continue",
            "/metadata/remainingItemCount",
        ]),
        get("list-page-1", &format!("{AGENTS}?limit=2")).keep(&[
            "/items/*/metadata/name",
            "/metadata/continue",
            "/metadata/remainingItemCount",
        ]),
        get(
            "list-page-2",
            &format!("{AGENTS}?limit=2&continue={{continue:list-page-1}}"),
        )
        .keep(&[
            "/items/*/metadata/name",
            "/metadata/continue",
            "/metadata/remainingItemCount",
        ]),
        get(
            "list-all-namespaces-by-field",
            "/apis/tiffany.dev/v1/faragents?limit=1&fieldSelector=metadata.namespace%3D{ns}",
        )
        .keep(&[
            "/items/*/metadata/name",
            "/metadata/continue",
            "/metadata/remainingItemCount",
        ]),
        // Status: fenced by resourceVersion (current, stale, null), unconditional, no-op.
        merge(
            "status-rv-current",
            a1_status,
            &fenced("{rv:create-a1}", phase("Pending")),
        )
        .keep(&["/status/phase", "/metadata/generation"]),
        merge(
            "status-rv-stale",
            a1_status,
            &fenced("{rv:create-a1}", phase("Running")),
        ),
        merge(
            "status-rv-null",
            a1_status,
            &json!({"metadata": {"resourceVersion": null}, "status": {"phase": "Running"}}),
        ),
        merge("status-rv-absent", a1_status, &phase("Running")).keep(&["/status/phase"]),
        merge("status-unchanged", a1_status, &phase("Running")),
        merge("status-via-main-ignored", a1, &phase("Failed")).keep(&["/status/phase"]),
        merge(
            "main-via-status-ignored",
            a1_status,
            &json!({"metadata": {"labels": {"x": "y"}}, "spec": {"cpu": 4},
                    "status": {"message": "hi"}}),
        )
        .keep(&[
            "/metadata/labels",
            "/metadata/generation",
            "/spec/cpu",
            "/status",
        ]),
        // The main resource: the same fencing.
        merge(
            "labels-rv-current",
            a1,
            &json!({"metadata": {"resourceVersion": "{rv:main-via-status-ignored}",
                                 "labels": {"app": "far"}}}),
        )
        .keep(&["/metadata/labels", "/metadata/generation"]),
        merge(
            "labels-rv-stale",
            a1,
            &json!({"metadata": {"resourceVersion": "{rv:create-a1}", "labels": {"app": "x"}}}),
        ),
        merge(
            "labels-rv-null",
            a1,
            &json!({"metadata": {"resourceVersion": null, "labels": {"app": "x"}}}),
        ),
        merge(
            "labels-rv-absent",
            a1,
            &json!({"metadata": {"labels": {"tier": "t"}}}),
        )
        .keep(&["/metadata/labels"]),
        // CEL: the spec is immutable; resending it unchanged is a no-op.
        merge("spec-change-refused", a1, &json!({"spec": {"cpu": 2}})),
        merge("spec-resent-unchanged", a1, &json!({"spec": {"cpu": 1}})),
        send(
            "strategic-merge-on-cr",
            "PATCH",
            a1,
            STRATEGIC,
            &json!({"metadata": {"labels": {"s": "1"}}}),
        ),
        // JSON patches: test ok, test failing, and the finalizers as kube-rs and FAR add them.
        json_patch(
            "json-test-passes",
            a1,
            &json!([{"op": "test", "path": "/metadata/labels/app", "value": "far"},
                    {"op": "add", "path": "/metadata/labels/k", "value": "v"}]),
        )
        .keep(&["/metadata/labels"]),
        json_patch(
            "json-test-fails",
            a1,
            &json!([{"op": "test", "path": "/metadata/labels/app", "value": "nope"},
                    {"op": "add", "path": "/metadata/labels/k", "value": "w"}]),
        ),
        merge(
            "finalizer-fenced-merge",
            a1,
            &fenced("{rv:json-test-passes}", finalizers(&[FINALIZER])),
        )
        .keep(&["/metadata/finalizers", "/metadata/generation"]),
        json_patch(
            "finalizer-first-kube-rs",
            a2,
            &json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
                    {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}]),
        )
        .keep(&["/metadata/finalizers"]),
        json_patch(
            "finalizer-further-kube-rs",
            a1,
            &json!([{"op": "test", "path": "/metadata/finalizers", "value": [FINALIZER]},
                    {"op": "add", "path": "/metadata/finalizers/-", "value": SECOND}]),
        )
        .keep(&["/metadata/finalizers"]),
        // Unknown fields: refused with fieldValidation=Strict, pruned with a warning otherwise.
        send(
            "create-unknown-strict",
            "POST",
            &format!("{AGENTS}?fieldValidation=Strict"),
            JSON,
            &unknown,
        ),
        post("create-unknown-warn", AGENTS, &unknown).keep(&["/spec/bogus", "/extra"]),
        send(
            "patch-unknown-strict",
            "PATCH",
            &format!("{a1}?fieldValidation=Strict"),
            MERGE,
            &unknown_patch,
        ),
        merge("patch-unknown-warn", a1, &unknown_patch).keep(&["/spec/bogus", "/metadata/labels"]),
        // Deletion held by finalizers.
        delete("delete-a1", a1, &json!({})).keep(&[
            "/metadata/deletionTimestamp",
            "/metadata/finalizers",
            "/metadata/generation",
        ]),
        delete("delete-a1-again", a1, &json!({})).keep(&["/metadata/deletionTimestamp"]),
        merge(
            "finalizer-added-while-terminating",
            a1,
            &finalizers(&[FINALIZER, SECOND, "conformance.far.test/third"]),
        ),
        merge("status-while-terminating", a1_status, &phase("Completed"))
            .keep(&["/status/phase"]),
        json_patch(
            "finalizer-removed-kube-rs",
            a1,
            &json!([{"op": "test", "path": "/metadata/finalizers/1", "value": SECOND},
                    {"op": "remove", "path": "/metadata/finalizers/1"}]),
        )
        .keep(&["/metadata/finalizers"]),
        merge(
            "last-finalizer-removed-fenced",
            a1,
            &json!({"metadata": {"resourceVersion": "{rv:finalizer-removed-kube-rs}",
                                 "finalizers": null}}),
        )
        .keep(&["/metadata/finalizers", "/metadata/deletionTimestamp"]),
        get("get-after-last-finalizer", a1),
        // What watchers saw of both deletions (a3's is made while the watch is open).
        get(
            "watch-deletions",
            &format!(
                "{AGENTS}?watch=true&timeoutSeconds=4&resourceVersion={{rv:patch-unknown-warn}}"
            ),
        )
        .keep(&[
            "/metadata/name",
            "/metadata/finalizers",
            "/metadata/deletionTimestamp",
        ])
        .in_background(),
        get(
            "watch-too-old",
            &format!("{AGENTS}?watch=true&timeoutSeconds=5&resourceVersion=1"),
        ),
        // Deletion with preconditions; deletion of a missing object.
        delete(
            "delete-precondition-uid",
            a3,
            &json!({"preconditions": {"uid": "00000000-0000-0000-0000-000000000000"}}),
        ),
        delete(
            "delete-precondition-rv",
            a3,
            &json!({"preconditions": {"resourceVersion": "{rv:create-a1}"}}),
        ),
        delete(
            "delete-preconditions-hold",
            a3,
            &json!({"preconditions": {"uid": "{uid:create-a3}", "resourceVersion": "{rv:create-a3}"}}),
        ),
        delete("delete-missing", a3, &json!({})),
        // A FarAgentPool's scale subresource, as kubectl scale and autoscalers use it: read,
        // written, refused by the pool's own CEL rules, fenced by resourceVersion.
        post(
            "create-pool",
            POOLS,
            &json!({"apiVersion": "tiffany.dev/v1", "kind": "FarAgentPool",
                "metadata": {"name": "p1"},
                "spec": {"maxSize": 5, "template": {"image": "busybox:1", "memory": "512Mi", "cpu": 1}}}),
        )
        .keep(&["/spec/replicas", "/spec/minIdle", "/spec/idleTimeoutSeconds", "/spec/reuse"]),
        get("pool-scale", pool_scale).keep(&[
            "/kind",
            "/apiVersion",
            "/metadata/name",
            "/metadata/resourceVersion",
            "/spec",
            "/status",
        ]),
        merge("pool-scale-up", pool_scale, &json!({"spec": {"replicas": 3}}))
            .keep(&["/spec", "/status", "/metadata/resourceVersion"]),
        get("pool-after-scale", pool).keep(&["/spec/replicas", "/metadata/generation"]),
        merge("pool-scale-past-max", pool_scale, &json!({"spec": {"replicas": 40}})),
        put(
            "pool-scale-stale",
            pool_scale,
            &json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": "p1", "namespace": "{ns}", "resourceVersion": "{rv:create-pool}"},
                "spec": {"replicas": 1}}),
        ),
        put(
            "pool-scale-put",
            pool_scale,
            &json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": "p1", "namespace": "{ns}", "resourceVersion": "{rv:pool-scale-up}"},
                "spec": {"replicas": 0}}),
        )
        .keep(&["/spec", "/status"]),
        // Leader election on a Lease.
        get("lease-get-missing", lease_path),
        post(
            "lease-create",
            LEASES,
            &lease(None, "replica-a", "2026-01-01T00:00:00.000000Z"),
        )
        .keep(&[
            "/spec/holderIdentity",
            "/spec/renewTime",
            "/metadata/generation",
        ]),
        post(
            "lease-create-again",
            LEASES,
            &lease(None, "replica-b", "2026-01-01T00:00:00.000000Z"),
        ),
        put(
            "lease-renew",
            lease_path,
            &lease(
                Some("{rv:lease-create}"),
                "replica-a",
                "2026-01-01T00:00:05.000000Z",
            ),
        )
        .keep(&["/spec/renewTime"]),
        put(
            "lease-takeover-stale",
            lease_path,
            &lease(
                Some("{rv:lease-create}"),
                "replica-b",
                "2026-01-01T00:00:06.000000Z",
            ),
        ),
        put(
            "lease-put-without-rv",
            lease_path,
            &lease(None, "replica-b", "2026-01-01T00:00:06.000000Z"),
        ),
        get("lease-list", LEASES).keep(&[
            "/items/*/metadata/name",
            "/items/*/kind",
            "/metadata/continue",
        ]),
        // Events as kube-rs's Recorder writes them: a create, then a series merge.
        post("event-create", EVENTS, &event()).keep(&[
            "/metadata/name",
            "/eventTime",
            "/regarding/name",
            "/note",
        ]),
        merge("event-series", &format!("{EVENTS}/{EVENT}"), &{
            let mut e = event();
            e["series"] = json!({"count": 2, "lastObservedTime": "2026-01-01T00:01:00.654321Z"});
            e
        })
        .keep(&["/series", "/eventTime"]),
        // The controller's Secret and ConfigMap reads.
        get(
            "secret-get-missing",
            "/api/v1/namespaces/{ns}/secrets/far-token",
        ),
        post(
            "secret-create",
            "/api/v1/namespaces/{ns}/secrets",
            &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "far-token"},
                    "data": {"token": "c2VjcmV0"}}),
        ),
        get("secret-get", "/api/v1/namespaces/{ns}/secrets/far-token").keep(&["/data"]),
        get(
            "configmap-get-missing",
            "/api/v1/namespaces/{ns}/configmaps/far-config",
        ),
        // `far logs`: through the service proxy, with no Service.
        get(
            "logs-proxy-without-service",
            "/api/v1/namespaces/{ns}/services/far-agent-controller-metrics:8080/proxy/v1/namespaces/{ns}/faragents/a2/logs?follow=false",
        ),
        // The bench's hosts (cluster-scoped), the controller's unconditional status writes.
        post(
            "host-create",
            HOSTS,
            &json!({"apiVersion": "tiffany.dev/v1", "kind": "FlintlockHost",
                    "metadata": {"name": host},
                    "spec": {"endpoint": "http://127.0.0.1:9090",
                             "capacity": {"cpu": 8, "memory": "16Gi"}}}),
        )
        .keep(&["/spec/vmLimits", "/metadata/generation"]),
        merge(
            "host-status",
            &format!("{host_path}/status"),
            &json!({"status": {"agents": 2, "allocated": {"cpu": 2, "memoryMiB": 1024}}}),
        )
        .keep(&["/status", "/metadata/generation"]),
        get(
            "host-wrong-scope",
            &format!("/apis/tiffany.dev/v1/namespaces/{{ns}}/flintlockhosts/{host}"),
        ),
        // A bookmark: the watch's selector filters out the write made while it is open, and the
        // bookmark sent before its timeout carries that write's resourceVersion.
        get(
            "watch-bookmark",
            &format!(
                "{HOSTS}?watch=true&allowWatchBookmarks=true&timeoutSeconds=4&labelSelector=conformance%3Dnone&resourceVersion={{rv:host-status}}"
            ),
        )
        .in_background(),
        merge(
            "host-label-during-watch",
            host_path,
            &json!({"metadata": {"labels": {"pool": "a"}}}),
        )
        .keep(&["/metadata/labels"]),
    ]
}

/// What one run of the script answered.
#[derive(Debug)]
pub struct Run {
    /// The server's `gitVersion` (`/version`), or `fake`.
    pub server: String,
    /// Each step's name and normalised answer, in script order.
    pub answers: Vec<(String, Value)>,
}

/// A client for the API server a kubeconfig names, with kube's retries off: the script
/// records first answers.
///
/// # Errors
/// When the kubeconfig cannot be read or used.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, String> {
    far_tls::install();
    let file = kube::config::Kubeconfig::read_from(path).map_err(|e| e.to_string())?;
    let mut config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .map_err(|e| e.to_string())?;
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// A client for a server at `url` (the fake), with kube's retries off.
///
/// # Errors
/// When `url` is not a URL.
pub fn client_for_url(url: &str) -> Result<kube::Client, String> {
    let mut config = kube::Config::new(url.parse().map_err(|e| format!("{url}: {e}"))?);
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// Runs the script in a fresh namespace (named with a random suffix) and deletes what it made.
///
/// # Errors
/// When a request cannot be sent or an answer cannot be read (not when the server refuses:
/// refusals are answers).
pub async fn run(client: &kube::Client) -> Result<Run, String> {
    let server = raw(client, "GET", "/version", None, None)
        .await
        .ok()
        .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .and_then(|v| v["gitVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "fake".to_owned());
    let run_id = ulid::Ulid::new().to_string().to_lowercase()[20..].to_owned();
    let mut context = Context {
        run: run_id,
        replies: BTreeMap::new(),
        rvs: Vec::new(),
        uids: Vec::new(),
    };
    let result = run_steps(client, &mut context).await;
    cleanup(client, &context).await;
    Ok(Run {
        server,
        answers: result?,
    })
}

/// What the steps so far answered, for templates and normalisation.
struct Context {
    run: String,
    /// Each step's raw reply body.
    replies: BTreeMap<&'static str, Value>,
    /// resourceVersion -> the step that first returned it.
    rvs: Vec<(String, String)>,
    /// uid -> the step that first returned it.
    uids: Vec<(String, String)>,
}

impl Context {
    fn namespace(&self) -> String {
        format!("far-conformance-{}", self.run)
    }

    /// Fills a template's placeholders (other braces, as in JSON bodies, are left alone).
    fn expand(&self, template: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            rest = &rest[start..];
            let end = rest.find('}').unwrap_or(0);
            match self.placeholder(rest.get(1..end).unwrap_or_default())? {
                Some(value) => {
                    out.push_str(&value);
                    rest = &rest[end + 1..];
                }
                None => {
                    out.push('{');
                    rest = &rest[1..];
                }
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    fn placeholder(&self, inner: &str) -> Result<Option<String>, String> {
        match inner.split_once(':') {
            None if inner == "ns" => Ok(Some(self.namespace())),
            None if inner == "run" => Ok(Some(self.run.clone())),
            Some((what @ ("rv" | "uid" | "continue"), step))
                if step.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
            {
                let field = if what == "rv" {
                    "resourceVersion"
                } else {
                    what
                };
                let value = self
                    .replies
                    .get(step)
                    .and_then(|r| r.pointer(&format!("/metadata/{field}")))
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("{{{inner}}}: step {step} answered no {what}"))?;
                // Escaped for a query (a continue token may hold these).
                Ok(Some(
                    value
                        .replace('=', "%3D")
                        .replace('+', "%2B")
                        .replace('/', "%2F"),
                ))
            }
            _ => Ok(None),
        }
    }

    /// The label of a resourceVersion: the step that first returned it.
    fn rv(&mut self, rv: &str, step: &str) -> String {
        label(&mut self.rvs, rv, step, "rv")
    }
}

/// `<rv STEP>` for a value first seen in STEP (`<rv STEP#2>` for its second new one).
fn label(known: &mut Vec<(String, String)>, value: &str, step: &str, what: &str) -> String {
    if let Some((_, l)) = known.iter().find(|(v, _)| v == value) {
        return l.clone();
    }
    let base = format!("<{what} {step}");
    let earlier = known
        .iter()
        .filter(|(_, l)| *l == format!("{base}>") || l.starts_with(&format!("{base}#")))
        .count();
    let l = match earlier {
        0 => format!("{base}>"),
        n => format!("{base}#{}>", n + 1),
    };
    known.push((value.to_owned(), l.clone()));
    l
}

struct Reply {
    code: u16,
    warnings: Vec<String>,
    body: Vec<u8>,
}

async fn raw(
    client: &kube::Client,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Option<String>,
) -> Result<Reply, String> {
    let response = start(client, method, path, content_type, body).await?;
    finish(response, path).await
}

async fn start(
    client: &kube::Client,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Option<String>,
) -> Result<axum::http::Response<Body>, String> {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(t) = content_type {
        request = request.header(header::CONTENT_TYPE, t);
    }
    let request = request
        .body(Body::from(body.unwrap_or_default().into_bytes()))
        .map_err(|e| format!("{method} {path}: {e}"))?;
    client
        .send(request)
        .await
        .map_err(|e| format!("{method} {path}: {e}"))
}

/// Reads a whole answer; a watch's ends at its `timeoutSeconds` (or at once when refused).
async fn finish(response: axum::http::Response<Body>, path: &str) -> Result<Reply, String> {
    let code = response.status().as_u16();
    let warnings = response
        .headers()
        .get_all("warning")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    let timeout = query_value(path, "timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(0)
        + 10;
    let body = tokio::time::timeout(
        Duration::from_secs(timeout),
        response.into_body().collect_bytes(),
    )
    .await
    .map_err(|_| format!("{path}: the answer did not end within {timeout} s"))?
    .map_err(|e| format!("{path}: {e}"))?;
    Ok(Reply {
        code,
        warnings,
        body: body.to_vec(),
    })
}

fn query_value<'a>(path: &'a str, key: &str) -> Option<&'a str> {
    path.split_once('?')?
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn is_watch(path: &str) -> bool {
    query_value(path, "watch") == Some("true")
}

async fn run_steps(
    client: &kube::Client,
    context: &mut Context,
) -> Result<Vec<(String, Value)>, String> {
    let mut answers: Vec<(String, Option<Value>)> = Vec::new();
    let mut background = Vec::new();
    for step in script() {
        let path = context.expand(&step.path)?;
        let body = step
            .body
            .as_deref()
            .map(|b| context.expand(b))
            .transpose()?;
        if step.background {
            // Open now (the server answers a watch's headers at once), read at the end.
            let response = start(client, step.method, &path, step.content_type, body).await?;
            let reading = tokio::spawn(async move { finish(response, &path).await });
            answers.push((step.name.to_owned(), None));
            background.push((answers.len() - 1, step, reading));
            continue;
        }
        let reply = raw(client, step.method, &path, step.content_type, body).await?;
        let answer = normalise(&step, &reply, context);
        answers.push((step.name.to_owned(), Some(answer)));
    }
    for (index, step, reading) in background {
        let reply = reading.await.map_err(|e| e.to_string())??;
        answers[index] = (
            step.name.to_owned(),
            Some(normalise(&step, &reply, context)),
        );
    }
    Ok(answers
        .into_iter()
        .map(|(name, answer)| (name, answer.unwrap_or(Value::Null)))
        .collect())
}

/// Deletes what the script made: finalizers first, so nothing stays terminating.
async fn cleanup(client: &kube::Client, context: &Context) {
    let namespace = context.namespace();
    let agents = AGENTS.replace("{ns}", &namespace);
    if let Ok(reply) = raw(client, "GET", &agents, None, None).await
        && let Ok(list) = serde_json::from_slice::<Value>(&reply.body)
    {
        for item in list["items"].as_array().into_iter().flatten() {
            if let Some(name) = item.pointer("/metadata/name").and_then(Value::as_str) {
                let path = format!("{agents}/{name}");
                let release = json!({"metadata": {"finalizers": null}}).to_string();
                let _ = raw(client, "PATCH", &path, Some(MERGE), Some(release)).await;
                let _ = raw(client, "DELETE", &path, None, None).await;
            }
        }
    }
    let host = format!("{HOSTS}/far-conformance-{}-h1", context.run);
    let _ = raw(client, "DELETE", &host, None, None).await;
    let _ = raw(
        client,
        "DELETE",
        &format!("/api/v1/namespaces/{namespace}"),
        None,
        None,
    )
    .await;
}

/// The parts of a reply that are compared.
fn normalise(step: &Step, reply: &Reply, context: &mut Context) -> Value {
    let mut answer = Map::new();
    answer.insert("code".into(), json!(reply.code));
    if !reply.warnings.is_empty() {
        let warnings: Vec<Value> = reply
            .warnings
            .iter()
            .map(|w| json!(text(w, context)))
            .collect();
        answer.insert("warnings".into(), Value::Array(warnings));
    }
    let body = String::from_utf8_lossy(&reply.body);
    if is_watch(&step.path) && reply.code == 200 {
        let mut events: Vec<Value> = Vec::new();
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            let event = match serde_json::from_str::<Value>(line) {
                Ok(e) => watch_event(step, &e, context),
                Err(_) => json!({"unparsed": text(line, context)}),
            };
            // The server may send the same bookmark twice before a timeout.
            if events.last() != Some(&event) || event["type"] != "BOOKMARK" {
                events.push(event);
            }
        }
        answer.insert("events".into(), Value::Array(events));
    } else {
        match serde_json::from_str::<Value>(&body) {
            Ok(value) => {
                context.replies.insert(step.name, value.clone());
                let (key, recorded) = if value["kind"] == "Status" {
                    ("status", status(step, &value, context))
                } else {
                    (
                        "object",
                        Value::Object(object_fields(step, &value, context)),
                    )
                };
                answer.insert(key.into(), recorded);
            }
            Err(_) => {
                answer.insert("text".into(), json!(text(body.trim(), context)));
            }
        }
    }
    Value::Object(answer)
}

fn watch_event(step: &Step, event: &Value, context: &mut Context) -> Value {
    let kind = event["type"].as_str().unwrap_or_default();
    let object = &event["object"];
    match kind {
        "ERROR" => json!({"type": kind, "status": status(step, object, context)}),
        "BOOKMARK" => {
            let rv = object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .map(|rv| context.rv(rv, step.name));
            json!({"type": kind, "kind": object["kind"], "resourceVersion": rv})
        }
        _ => {
            let mut recorded = object_fields(step, object, context);
            recorded.insert("type".into(), json!(kind));
            Value::Object(recorded)
        }
    }
}

/// A Status: its reason, code, message and the details a client reads.
fn status(step: &Step, value: &Value, context: &mut Context) -> Value {
    let mut out = Map::new();
    for key in ["status", "reason", "code"] {
        if let Some(v) = value.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(m) = value["message"].as_str() {
        out.insert("message".into(), json!(text(m, context)));
    }
    if let Some(details) = value.get("details").and_then(Value::as_object) {
        let mut d = Map::new();
        for (key, v) in details {
            let v = match (key.as_str(), v) {
                ("causes", Value::Array(causes)) => Value::Array(
                    causes
                        .iter()
                        .map(|c| json!({"reason": c["reason"], "field": c["field"]}))
                        .collect(),
                ),
                ("uid", Value::String(uid)) => {
                    json!(label(&mut context.uids, uid, step.name, "uid"))
                }
                (_, Value::String(s)) => json!(text(s, context)),
                (_, other) => other.clone(),
            };
            d.insert(key.clone(), v);
        }
        out.insert("details".into(), Value::Object(d));
    }
    Value::Object(out)
}

/// An object: its kind, what its resourceVersion is (new, or an earlier step's), and the kept
/// fields. A list's own resourceVersion is left out (see [`EXCLUDED`]).
fn object_fields(step: &Step, value: &Value, context: &mut Context) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("kind".into(), value["kind"].clone());
    let is_list = value.get("items").is_some();
    if !is_list {
        if let Some(rv) = value
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
        {
            out.insert("resourceVersion".into(), json!(context.rv(rv, step.name)));
        }
        if let Some(uid) = value.pointer("/metadata/uid").and_then(Value::as_str) {
            label(&mut context.uids, uid, step.name, "uid");
        }
    }
    for pointer in &step.keep {
        let kept = match pointer.split_once("/*") {
            Some((array, rest)) => match value.pointer(array).and_then(Value::as_array) {
                Some(items) => Value::Array(
                    items
                        .iter()
                        .map(|i| fetch(i, rest, step, context))
                        .collect(),
                ),
                None => json!("<absent>"),
            },
            None => fetch(value, pointer, step, context),
        };
        out.insert((*pointer).to_owned(), kept);
    }
    out
}

fn fetch(value: &Value, pointer: &str, step: &Step, context: &mut Context) -> Value {
    match value.pointer(pointer) {
        Some(v) => {
            let key = pointer.rsplit('/').next().unwrap_or_default();
            normalise_value(key, v, step, context)
        }
        None => json!("<absent>"),
    }
}

fn normalise_value(key: &str, value: &Value, step: &Step, context: &mut Context) -> Value {
    match value {
        Value::String(s) => match key {
            "resourceVersion" => json!(context.rv(s, step.name)),
            "uid" => json!(label(&mut context.uids, s, step.name, "uid")),
            "continue" if !s.is_empty() => json!("<token>"),
            _ => json!(text(s, context)),
        },
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| normalise_value(key, v, step, context))
                .collect(),
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), normalise_value(k, v, step, context)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A string with what changes from run to run replaced: the run's suffix, uids, times,
/// resourceVersions quoted in messages, and objects quoted whole in messages.
fn text(s: &str, context: &Context) -> String {
    if let Some(format) = time_format(s) {
        return format;
    }
    let mut s = s.replace(&context.run, "<run>");
    for (uid, l) in &context.uids {
        s = s.replace(uid.as_str(), l);
    }
    s = quoted_objects(&s);
    versions_in_message(&s)
}

/// `<time>` for RFC 3339 seconds, `<time.6>` for six fractional digits (MicroTime), ...
fn time_format(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let shape = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && s.ends_with('Z')
        && [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
            .iter()
            .all(|i| b[*i].is_ascii_digit());
    if !shape {
        return None;
    }
    let fraction = &s[19..s.len() - 1];
    match fraction.strip_prefix('.') {
        None if fraction.is_empty() => Some("<time>".into()),
        Some(digits) if digits.bytes().all(|c| c.is_ascii_digit()) => {
            Some(format!("<time.{}>", digits.len()))
        }
        _ => None,
    }
}

/// `"{...}"` (an object quoted whole, as in a strict-decoding error) -> `"<object>"`.
fn quoted_objects(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("\"{") {
        let Some(end) = rest[start..].rfind("}\"") else {
            break;
        };
        out.push_str(&rest[..start]);
        out.push_str("\"<object>\"");
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    out
}

/// resourceVersions quoted in messages (`too old resource version: 1 (201)`, `the
/// ResourceVersion in the precondition (1) does not match ... (314)`) -> `<rv>`.
fn versions_in_message(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        let digits = rest.len() - rest.trim_start_matches(|d: char| d.is_ascii_digit()).len();
        let after = &rest[digits..];
        let quoted = (out.ends_with('(') && after.starts_with(')'))
            || out
                .get(out.len().saturating_sub(9)..)
                .is_some_and(|t| t.eq_ignore_ascii_case("version: "));
        if digits > 0 && quoted {
            out.push_str("<rv>");
            rest = after;
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The recording file's content.
pub fn recording(run: &Run) -> Value {
    let date = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%d")
        .to_string();
    let steps: Vec<Value> = script()
        .iter()
        .zip(&run.answers)
        .map(|(step, (_, answer))| {
            json!({"name": step.name, "request": request_line(step), "answer": answer})
        })
        .collect();
    json!({
        "server": format!("kube-apiserver {}", run.server),
        "recorded": date,
        "how": "FAR_TEST_KUBECONFIG=<kubeconfig> FAR_RECORD=1 cargo nextest run -p far-testkit --test conformance",
        "excluded": EXCLUDED.iter().map(|(what, why)| json!({"what": what, "why": why})).collect::<Vec<_>>(),
        "steps": steps,
    })
}

fn request_line(step: &Step) -> Value {
    let mut request = json!({"method": step.method, "path": step.path});
    if let Some(t) = step.content_type {
        request["contentType"] = json!(t);
    }
    if let Some(b) = &step.body {
        request["body"] = serde_json::from_str(b).unwrap_or_else(|_| json!(b));
    }
    request
}

/// Every difference between a recording and a run, one readable block per step.
pub fn differences(recorded: &Value, run: &Run) -> Vec<String> {
    let empty = Vec::new();
    let steps = recorded["steps"].as_array().unwrap_or(&empty);
    let names: Vec<&str> = steps.iter().filter_map(|s| s["name"].as_str()).collect();
    let ours: Vec<&str> = run.answers.iter().map(|(n, _)| n.as_str()).collect();
    if names != ours {
        return vec![format!(
            "the script's steps are not the recording's: re-record (recorded {names:?}, script {ours:?})"
        )];
    }
    steps
        .iter()
        .zip(&run.answers)
        .filter(|(s, (_, answer))| s["answer"] != *answer)
        .map(|(s, (name, answer))| {
            let mut block = format!("step {name} ({}):\n", summary(&s["request"]));
            let want = flatten(&s["answer"]);
            let got = flatten(answer);
            for (path, value) in &want {
                if got.get(path) != Some(value) {
                    let _ = writeln!(block, "  - {path} = {value}");
                    if let Some(g) = got.get(path) {
                        let _ = writeln!(block, "  + {path} = {g}");
                    }
                }
            }
            for (path, value) in &got {
                if !want.contains_key(path) {
                    let _ = writeln!(block, "  + {path} = {value}");
                }
            }
            block
        })
        .collect()
}

fn summary(request: &Value) -> String {
    format!(
        "{} {}",
        request["method"].as_str().unwrap_or_default(),
        request["path"].as_str().unwrap_or_default()
    )
}

/// `path = value` for every leaf, so a difference reads as the lines that differ.
fn flatten(value: &Value) -> BTreeMap<String, String> {
    fn walk(prefix: String, value: &Value, out: &mut BTreeMap<String, String>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    walk(format!("{prefix}.{k}"), v, out);
                }
            }
            Value::Array(items) if !items.is_empty() => {
                for (i, v) in items.iter().enumerate() {
                    walk(format!("{prefix}[{i}]"), v, out);
                }
            }
            leaf => {
                out.insert(prefix, leaf.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(String::new(), value, &mut out);
    out
}
