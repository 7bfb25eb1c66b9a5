//! The controller's life-cycle scenarios through nothing but a Kubernetes client, so the same
//! code runs against the in-repo fake API server (always) and against a real cluster when
//! `FAR_TEST_KUBECONFIG=/path/to/kubeconfig` is given (skipped, saying so, otherwise).
//!
//! The controller runs in this process with a far-host (`sim` provider) on loopback, so the
//! cluster needs no access to this machine, and it runs as the chart's ServiceAccount under
//! exactly the chart's RBAC: the fake API server enforces it; on a real cluster the chart's
//! ClusterRole, Role and bindings are applied and the controller's client impersonates the
//! ServiceAccount. Use a disposable cluster (kind, k3d) without FAR's own controller: the CRDs
//! and RBAC are applied, and the controller under test watches every FarAgent and probes every
//! FlintlockHost of the cluster. Its agents select its host by a unique label.

mod chart;

use std::sync::Arc;
use std::time::Duration;

use far_agent_controller::reconcile::{Config, DEFAULT_CONCURRENCY, EventPolicy};
use far_api::{FarAgent, FlintlockHost, Phase};
use far_channel::{Channel, TokenKey};
use far_host::provider::sim::{Sim, SimConfig};
use far_host::{Host, HostConfig};
use far_testkit::apiserver::FakeApiServer;
use far_testkit::cluster;
use far_vmspec::Defaults;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::events::Reporter;
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::oneshot;

/// One run of the scenarios: a namespace, a FlintlockHost, the far-host behind it, and the
/// controller.
struct Stage {
    /// An administrator: the user creating agents, and the test's own checks.
    client: Client,
    namespace: String,
    /// The label value that ties this run's agents to this run's host.
    run: String,
    host: Arc<Host<Sim>>,
    _state: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

/// Where the scenarios run: who is the administrator, and how the controller gets a client
/// restricted to the chart's RBAC in a namespace.
enum Cluster {
    Fake(FakeApiServer),
    Real(std::path::PathBuf),
}

impl Cluster {
    /// The administrator's client.
    async fn admin(&self, dir: &std::path::Path) -> Client {
        match self {
            Cluster::Fake(api) => {
                // Through a kubeconfig, as with a real cluster.
                let kubeconfig = dir.join("kubeconfig");
                std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
                cluster::client(&kubeconfig, None).await
            }
            Cluster::Real(kubeconfig) => cluster::client(kubeconfig, None).await,
        }
    }

    /// A client for the controller, as the chart's ServiceAccount in `namespace`, with the
    /// chart's RBAC in force.
    async fn controller(&self, admin: &Client, namespace: &str) -> Client {
        match self {
            Cluster::Fake(api) => {
                const TOKEN: &str = "far-agent-controller-token";
                api.enforce_rbac(TOKEN, &chart::user(namespace), chart::grants(namespace));
                api.client_as(TOKEN)
            }
            Cluster::Real(kubeconfig) => {
                for doc in chart::rbac_documents(namespace) {
                    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
                    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
                        "rbac.authorization.k8s.io",
                        "v1",
                        &kind,
                    ));
                    let api: Api<DynamicObject> = match doc["metadata"]["namespace"].as_str() {
                        Some(ns) => Api::namespaced_with(admin.clone(), ns, &resource),
                        None => Api::all_with(admin.clone(), &resource),
                    };
                    let name = doc["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    api.patch(
                        &name,
                        &PatchParams::apply("far-test").force(),
                        &Patch::Apply(&doc),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("applying the chart's {kind} {name}: {e}"));
                }
                cluster::client(kubeconfig, Some(chart::user(namespace))).await
            }
        }
    }
}

impl Stage {
    async fn new(cluster: &Cluster, dir: &std::path::Path) -> Self {
        let client = cluster.admin(dir).await;
        let real = matches!(cluster, Cluster::Real(_));
        let run = format!("t{}", ulid::Ulid::new().to_string().to_lowercase());
        if real {
            cluster::apply_crds(&client).await;
        }
        let namespace = format!("far-test-{run}");
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace");

        let state = tempfile::tempdir().unwrap();
        let host = Host::open(
            HostConfig {
                retry_delay: Duration::from_millis(20),
                ..HostConfig::default()
            },
            state.path(),
            Sim::new(SimConfig {
                boot_delay: Duration::from_millis(20),
                ..SimConfig::default()
            }),
        )
        .await
        .unwrap();
        let endpoint = far_host::serve_on_loopback(Arc::clone(&host), None)
            .await
            .unwrap();
        let host_object: FlintlockHost = serde_json::from_value(json!({
            "apiVersion": "tiffany.dev/v1", "kind": "FlintlockHost",
            "metadata": {"name": run, "labels": {"far-test": run}},
            "spec": {"endpoint": endpoint, "provider": "sim", "capacity": {"cpu": 4, "memory": "4Gi"},
                     "vmLimits": {"minMemory": "64Mi", "maxMemory": "4Gi", "maxCpu": 4}}
        }))
        .unwrap();
        Api::<FlintlockHost>::all(client.clone())
            .create(&PostParams::default(), &host_object)
            .await
            .expect("FlintlockHost");

        let channel = Channel::new(far_channel::Config::new(
            TokenKey::new(vec![3; 32]).unwrap(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let channel_url = format!("http://{}", listener.local_addr().unwrap());
        let router = channel.router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(far_agent_controller::run::run(
            cluster.controller(&client, &namespace).await,
            Config {
                defaults: Defaults::local(),
                channel_url,
                grace_period_seconds: 5,
                call_timeout: Duration::from_secs(2),
                concurrency: DEFAULT_CONCURRENCY,
                events: EventPolicy::All,
            },
            channel,
            Reporter {
                controller: "far-agent-controller".into(),
                instance: Some(run.clone()),
            },
            Arc::default(),
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            client,
            namespace,
            run,
            host,
            _state: state,
            _stop: stop,
        }
    }

    fn agents(&self) -> Api<FarAgent> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn create(&self, name: &str, spec: serde_json::Value) {
        let mut full = json!({"image": "busybox:1", "memory": "256Mi", "cpu": 1,
            "entrypoint": "/usr/local/bin/tiffany", "hostSelector": {"far-test": self.run},
            "heartbeat": {"intervalSeconds": 1, "timeoutSeconds": 10}});
        json_patch::merge(&mut full, &spec);
        let agent: FarAgent = serde_json::from_value(json!({
            "apiVersion": "tiffany.dev/v1", "kind": "FarAgent", "metadata": {"name": name}, "spec": full
        }))
        .unwrap();
        self.agents()
            .create(&PostParams::default(), &agent)
            .await
            .unwrap_or_else(|e| panic!("creating {name}: {e}"));
    }

    async fn wait_for(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&FarAgent) -> bool,
    ) -> FarAgent {
        let mut last = None;
        for _ in 0..600 {
            if let Some(agent) = self.agents().get_opt(name).await.unwrap() {
                if check(&agent) {
                    return agent;
                }
                last = agent.status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{name} never reached {what}; last status {last:?}");
    }

    async fn delete_and_wait_gone(&self, name: &str) {
        self.agents()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
        for _ in 0..600 {
            if self.agents().get_opt(name).await.unwrap().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{name} was not released");
    }

    fn vms(&self) -> usize {
        self.host.list("far", None).len()
    }

    async fn tear_down(self, cluster: &Cluster) {
        if let Cluster::Real(_) = cluster {
            for doc in chart::rbac_documents(&self.namespace) {
                let kind = doc["kind"].as_str().unwrap_or_default();
                if !kind.starts_with("Cluster") {
                    continue; // namespaced: it goes with the namespace
                }
                let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
                    "rbac.authorization.k8s.io",
                    "v1",
                    kind,
                ));
                let _ = Api::<DynamicObject>::all_with(self.client.clone(), &resource)
                    .delete(
                        doc["metadata"]["name"].as_str().unwrap_or_default(),
                        &DeleteParams::default(),
                    )
                    .await;
            }
        }
        let _ = Api::<FlintlockHost>::all(self.client.clone())
            .delete(&self.run, &DeleteParams::default())
            .await;
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.namespace, &DeleteParams::default())
            .await;
    }
}

fn phase(agent: &FarAgent) -> Option<Phase> {
    agent.status.as_ref().and_then(|s| s.phase)
}

/// The scenarios, in order on one stage.
async fn scenarios(stage: &Stage) {
    // create -> Running -> Completed, its VM freed.
    stage
        .create("ok", json!({"args": ["--seconds", "0.5"]}))
        .await;
    let ok = stage
        .wait_for("ok", "Completed", |a| phase(a) == Some(Phase::Completed))
        .await;
    let status = ok.status.unwrap();
    assert_eq!(status.exit_code, Some(0));
    assert_eq!(status.host.as_deref(), Some(stage.run.as_str()));

    // A non-zero exit -> Failed, with its code.
    stage
        .create(
            "bad",
            json!({"args": ["--seconds", "0.2", "--exit-code", "3"]}),
        )
        .await;
    let bad = stage
        .wait_for("bad", "Failed", |a| phase(a) == Some(Phase::Failed))
        .await;
    assert_eq!(bad.status.unwrap().exit_code, Some(3));

    // OnFailure: a new VM for a new attempt.
    stage
        .create(
            "retry",
            json!({"args": ["--seconds", "0.2", "--exit-code", "3"], "restartPolicy": "OnFailure", "backoffLimit": 1}),
        )
        .await;
    let retried = stage
        .wait_for("retry", "restarted", |a| {
            a.status.as_ref().is_some_and(|s| s.restart_count >= 1)
        })
        .await;
    assert!(retried.status.unwrap().restart_count >= 1);

    // No host fits: Pending, Unschedulable, no VM.
    stage.create("huge", json!({"memory": "64Gi"})).await;
    let huge = stage
        .wait_for("huge", "Unschedulable", |a| {
            a.status
                .as_ref()
                .is_some_and(|s| s.reason == Some(far_api::AgentReason::Unschedulable))
        })
        .await;
    assert_eq!(phase(&huge), Some(Phase::Pending));

    // Deleted while running: stopped, released, its VM gone.
    stage
        .create("long", json!({"args": ["--seconds", "600"]}))
        .await;
    stage
        .wait_for("long", "Running", |a| phase(a) == Some(Phase::Running))
        .await;
    for name in ["long", "ok", "bad", "retry", "huge"] {
        stage.delete_and_wait_gone(name).await;
    }
    for _ in 0..200 {
        if stage.vms() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stage.vms(), 0, "no VM is left behind");
}

#[tokio::test]
async fn the_scenarios_hold_against_the_fake_api_server() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::Fake(FakeApiServer::start().await);
    let stage = Stage::new(&cluster, dir.path()).await;
    scenarios(&stage).await;
    stage.tear_down(&cluster).await;
    // The chart's RBAC sufficed: the controller was refused nothing.
    if let Cluster::Fake(api) = &cluster {
        let refused: Vec<_> = api
            .requests()
            .into_iter()
            .filter(|((verb, _), _)| verb == "forbidden")
            .collect();
        assert!(refused.is_empty(), "refused: {refused:?}");
    }
}

#[tokio::test]
async fn the_scenarios_hold_against_a_real_cluster() {
    let Some(kubeconfig) = cluster::kubeconfig("a disposable cluster without FAR's controller")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::Real(kubeconfig);
    let stage = Stage::new(&cluster, dir.path()).await;
    scenarios(&stage).await;
    stage.tear_down(&cluster).await;
}
