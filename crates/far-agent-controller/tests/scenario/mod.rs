//! The controller's life-cycle scenarios through nothing but a Kubernetes client, so the same
//! code runs against the in-repo fake API server (`scenarios_on_the_fake.rs`, always) and
//! against a real cluster (`scenarios.rs`) when `FAR_TEST_KUBECONFIG=/path/to/kubeconfig` is
//! given (skipped, saying so, otherwise).
//!
//! The controller runs in this process with a far-host (`sim` provider) on loopback, so the
//! cluster needs no access to this machine, and it runs as the chart's ServiceAccount under
//! exactly the chart's RBAC: the fake API server enforces it; on a real cluster the chart's
//! ClusterRole, Role and bindings are applied and the controller's client impersonates the
//! ServiceAccount. Use a disposable cluster (kind, k3d) without FAR's own controller: the CRDs
//! and RBAC are applied, and the controller under test watches every FarAgent and probes every
//! FlintlockHost of the cluster. Its agents select its host by a unique label.

use std::sync::Arc;
use std::time::Duration;

use far_agent_controller::reconcile::{Config, DEFAULT_CONCURRENCY, EventPolicy};
use far_api::{FarAgent, FarAgentPool, FlintlockHost, Phase};
use far_channel::{Channel, TokenKey};
use far_host::provider::sim::{Sim, SimConfig};
use far_host::{Host, HostConfig};
use far_testkit::apiserver::FakeApiServer;
use far_testkit::cluster;
use far_testkit::faults::{Fault, Faults};
use far_vmspec::{Defaults, VmName};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::events::Reporter;
use kube::{Api, Client};
use serde_json::json;

/// One run of the scenarios: a namespace, a FlintlockHost, the far-host behind it, and the
/// controller.
pub struct Stage {
    /// An administrator: the user creating agents, and the test's own checks.
    client: Client,
    namespace: String,
    /// The label value that ties this run's agents to this run's host.
    run: String,
    host: Arc<Host<Sim>>,
    _state: tempfile::TempDir,
    /// The controller's client (the chart's ServiceAccount), before any faults.
    controller_client: Client,
    channel: Channel,
    channel_url: String,
    /// The controller, running in this process: aborting it is its process killed.
    controller: tokio::task::JoinHandle<()>,
    /// The controller's web UI, and where it is served.
    ui: far_agent_controller::ui::Live,
    ui_address: String,
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

/// Where the scenarios run: who is the administrator, and how the controller gets a client
/// restricted to the chart's RBAC in a namespace.
#[allow(dead_code, reason = "each test binary makes one kind")]
pub enum Cluster {
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
                api.enforce_rbac(
                    TOKEN,
                    &crate::chart::user(namespace),
                    crate::chart::grants(namespace),
                );
                api.client_as(TOKEN)
            }
            Cluster::Real(kubeconfig) => {
                for doc in crate::chart::rbac_documents(namespace) {
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
                cluster::client(kubeconfig, Some(crate::chart::user(namespace))).await
            }
        }
    }
}

impl Stage {
    pub async fn new(
        cluster: &Cluster,
        dir: &std::path::Path,
        faults: Option<&Arc<Faults>>,
    ) -> Self {
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
            "spec": {"endpoint": endpoint, "provider": "sim", "capacity": {"cpu": 32, "memory": "32Gi"},
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
        tokio::spawn(channel.clone().serve(listener));
        let ui = far_agent_controller::ui::Live::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ui_address = listener.local_addr().unwrap().to_string();
        let router = far_agent_controller::ui::router(ui.clone()).merge(channel.logs_router());
        tokio::spawn(async move { axum::serve(listener, router).await });
        let controller_client = cluster.controller(&client, &namespace).await;
        let mut stage = Self {
            client,
            namespace,
            run,
            host,
            _state: state,
            controller_client,
            channel,
            channel_url,
            controller: tokio::spawn(async {}),
            ui,
            ui_address,
        };
        stage.start_controller(faults);
        stage
    }

    /// Starts the controller (a new one, as a new process would be, after killing the last),
    /// its client's writes meeting `faults`.
    fn start_controller(&mut self, faults: Option<&Arc<Faults>>) {
        self.controller.abort();
        let client = match faults {
            Some(faults) => faults.wrap(self.controller_client.clone()),
            None => self.controller_client.clone(),
        };
        self.controller = tokio::spawn(far_agent_controller::run::run(
            client,
            Config {
                defaults: Defaults::local(),
                channel_url: self.channel_url.clone(),
                grace_period_seconds: 5,
                call_timeout: Duration::from_secs(2),
                concurrency: DEFAULT_CONCURRENCY,
                events: EventPolicy::All,
                ui: self.ui.clone(),
            },
            self.channel.clone(),
            Reporter {
                controller: "far-agent-controller".into(),
                instance: Some(self.run.clone()),
            },
            Arc::default(),
            std::future::pending(),
        ));
    }

    /// How many VMs the host was asked to create for the current attempt of each agent.
    async fn creates(&self, name: &str) -> u32 {
        let agent = self.agents().get(name).await.unwrap();
        let attempt = agent.status.as_ref().map_or(0, |s| s.restart_count);
        let vm = VmName::for_agent(&agent, attempt).unwrap();
        self.host
            .created()
            .get(&format!("far/{}", vm.id()))
            .copied()
            .unwrap_or(0)
    }

    /// An agent's page in the web UI, as the controller answers it.
    async fn ui_agent(&self, name: &str) -> serde_json::Value {
        let path = format!("/ui/api/agents/{}/{name}", self.namespace);
        // Read to the end: JSON holds no NUL.
        let answer = far_testkit::http::ask(&self.ui_address, "GET", &path, "\0").await;
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {answer}"))
    }

    /// Waits for the agent to complete; its VMCreated condition (warm or cold start).
    async fn completed_vm_created(
        &self,
        name: &str,
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        let agent = self
            .wait_for(name, "Completed", |a| phase(a) == Some(Phase::Completed))
            .await;
        agent
            .status
            .unwrap()
            .conditions
            .into_iter()
            .find(|c| c.type_ == "VMCreated")
            .expect("VMCreated condition")
    }

    fn agents(&self) -> Api<FarAgent> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn create(&self, name: &str, spec: serde_json::Value) {
        let mut full = json!({"image": "busybox:1", "memory": "256Mi", "cpu": 1,
            "entrypoint": "/usr/local/bin/tiffany", "hostSelector": {"far-test": self.run}});
        json_patch::merge(&mut full, &spec);
        self.create_as_given(name, full).await;
    }

    /// Creates an agent with `spec` and nothing else (but a quick heartbeat).
    async fn create_as_given(&self, name: &str, spec: serde_json::Value) {
        let mut full = json!({"heartbeat": {"intervalSeconds": 1, "timeoutSeconds": 10}});
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

    async fn wait_for_pool(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&far_api::FarAgentPoolStatus) -> bool,
    ) -> far_api::FarAgentPoolStatus {
        let pools = Api::<FarAgentPool>::namespaced(self.client.clone(), &self.namespace);
        let mut last = None;
        for _ in 0..600 {
            last = pools.get(name).await.unwrap().status;
            if let Some(status) = last.as_ref().filter(|s| check(s)) {
                return status.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("pool {name}: timed out waiting for {what}; last: {last:?}");
    }

    fn vms(&self) -> usize {
        self.host.list("far", None).len()
    }

    /// Waits up to 20 s (a deleted pool's VMs go at the host probe after it, every 5 s).
    async fn wait_no_vms(&self) {
        for _ in 0..400 {
            if self.vms() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(self.vms(), 0, "no VM is left behind");
    }

    pub async fn tear_down(self, cluster: &Cluster) {
        if let Cluster::Real(_) = cluster {
            for doc in crate::chart::rbac_documents(&self.namespace) {
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
pub async fn scenarios(stage: &Stage) {
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
    // Its page in the web UI: status from the cache, Events listed with the chart's RBAC.
    let page = stage.ui_agent("ok").await;
    assert_eq!(page["status"]["phase"], "Completed", "{page}");
    assert!(page["eventsError"].is_null(), "{page}");
    let events = page["events"].as_array().cloned().unwrap_or_default();
    assert!(
        !events.is_empty() && events.iter().all(|e| e["reason"].is_string()),
        "{page}"
    );

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

    // An agent naming a pool that does not exist waits for it; once the pool exists the agent
    // boots cold on the pool's template (the pool keeps no idle VM yet) and runs its own args.
    stage
        .create_as_given(
            "pooled",
            json!({"poolRef": {"name": "warm"}, "args": ["--seconds", "0.3"]}),
        )
        .await;
    let waiting = stage
        .wait_for("pooled", "PoolNotFound", |a| {
            a.status
                .as_ref()
                .is_some_and(|s| s.reason == Some(far_api::AgentReason::PoolNotFound))
        })
        .await;
    assert_eq!(phase(&waiting), Some(Phase::Pending));
    assert!(
        waiting
            .status
            .unwrap()
            .message
            .unwrap()
            .contains("\"warm\""),
        "the message names the pool"
    );
    let pool: FarAgentPool = serde_json::from_value(json!({
        "apiVersion": "tiffany.dev/v1", "kind": "FarAgentPool", "metadata": {"name": "warm"},
        "spec": {"maxSize": 4, "template": {"image": "busybox:1", "memory": "256Mi", "cpu": 1,
            "entrypoint": "/usr/local/bin/tiffany", "hostSelector": {"far-test": stage.run}}}
    }))
    .unwrap();
    Api::<FarAgentPool>::namespaced(stage.client.clone(), &stage.namespace)
        .create(&PostParams::default(), &pool)
        .await
        .expect("FarAgentPool");
    let created = stage.completed_vm_created("pooled").await;
    assert_eq!(created.reason, "ColdStart", "{created:?}");

    // Scaled up as `kubectl scale` does (the scale subresource), the pool keeps an idle VM,
    // and the next claim runs on it.
    let pools = Api::<FarAgentPool>::namespaced(stage.client.clone(), &stage.namespace);
    pools
        .patch_scale(
            "warm",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .expect("scaling the pool");
    stage
        .wait_for_pool("warm", "an idle VM", |s| s.idle == 1)
        .await;
    stage
        .create_as_given(
            "claimer",
            json!({"poolRef": {"name": "warm"}, "args": ["--seconds", "0.3"]}),
        )
        .await;
    let created = stage.completed_vm_created("claimer").await;
    assert_eq!(created.reason, "WarmStart", "{created:?}");
    let counted = stage
        .wait_for_pool("warm", "its claims counted and refilled", |s| {
            s.warm_claims == 1 && s.cold_claims == 1 && s.idle == 1
        })
        .await;
    assert_eq!((counted.desired_idle, counted.busy), (1, 0));

    // An agent asking its pool's VM for another shape fails, naming the field.
    stage
        .create_as_given("reshaped", json!({"poolRef": {"name": "warm"}, "cpu": 2}))
        .await;
    let reshaped = stage
        .wait_for("reshaped", "Failed", |a| phase(a) == Some(Phase::Failed))
        .await
        .status
        .unwrap();
    assert_eq!(reshaped.reason, Some(far_api::AgentReason::InvalidSpec));
    assert!(reshaped.message.unwrap().contains("spec.cpu is 2"));

    for name in [
        "long", "ok", "bad", "retry", "huge", "pooled", "claimer", "reshaped",
    ] {
        stage.delete_and_wait_gone(name).await;
    }
    // A deleted pool's idle VMs go with it.
    pools
        .delete("warm", &DeleteParams::default())
        .await
        .expect("deleting the pool");
    stage.wait_no_vms().await;
}

/// Every fault a write can meet, at every write of a healthy life (1: finalizer and binding,
/// 2: the VM's uid, 3: Running, 4: the exit, 5: the finalizer's release): one agent each, all at
/// once. Whatever is lost, each agent ends Completed with exactly one VM made for it, and none
/// is left after deletion.
pub async fn one_vm_per_attempt_whatever_write_fails(cluster: &Cluster) {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::default());
    let stage = Stage::new(cluster, dir.path(), Some(&faults)).await;
    let kinds = [
        ("refused422", Fault::Refuse(422)),
        ("conflict409", Fault::Refuse(409)),
        ("failed500", Fault::Refuse(500)),
        ("lost", Fault::Lost),
    ];
    let mut names = Vec::new();
    for nth in 1..=5 {
        for (kind, fault) in kinds {
            let name = format!("w{nth}-{kind}");
            faults.at(&name, nth, fault);
            // Long enough that each agent is written Running before it exits (an exit first
            // makes a life of four writes, and the fifth write's fault would never fire).
            stage
                .create(&name, json!({"args": ["--seconds", "1"]}))
                .await;
            names.push(name);
        }
    }
    for name in &names {
        let agent = stage
            .wait_for(name, "Completed", |a| phase(a) == Some(Phase::Completed))
            .await;
        assert_eq!(agent.status.unwrap().exit_code, Some(0), "{name}");
        assert_eq!(stage.creates(name).await, 1, "{name}: VMs created");
    }
    for name in &names {
        stage.delete_and_wait_gone(name).await;
    }
    let fired = faults.fired();
    assert_eq!(fired.len(), names.len(), "every fault fired: {fired:?}");
    assert_eq!(
        stage.host.created().values().sum::<u32>(),
        20,
        "one VM per agent"
    );
    stage.wait_no_vms().await;
    stage.tear_down(cluster).await;
}

/// The controller killed after CreateMicroVM, before the VM's uid reached status: the next
/// controller finds the VM by the binding and adopts it.
pub async fn a_vm_whose_controller_died_before_recording_it_is_adopted(cluster: &Cluster) {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::default());
    let mut stage = Stage::new(cluster, dir.path(), Some(&faults)).await;
    faults.at("killed", 2, Fault::Hang);
    stage
        .create("killed", json!({"args": ["--seconds", "1"]}))
        .await;
    tokio::time::timeout(Duration::from_secs(30), faults.hung())
        .await
        .expect("the VM's uid write was reached");
    stage.start_controller(None);
    let agent = stage
        .wait_for("killed", "Completed", |a| {
            phase(a) == Some(Phase::Completed)
        })
        .await;
    assert_eq!(agent.status.unwrap().exit_code, Some(0));
    assert_eq!(stage.creates("killed").await, 1, "the VM was adopted");
    stage.delete_and_wait_gone("killed").await;
    stage.wait_no_vms().await;
    stage.tear_down(cluster).await;
}
