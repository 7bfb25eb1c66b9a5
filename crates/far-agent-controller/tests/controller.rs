//! The real controller loop against the in-repo fake API server (real HTTP), a far-host with
//! the sim provider (real gRPC), and the status channel (real HTTP).

mod chart;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use far_agent_controller::reconcile::Config;
use far_api::{FarAgent, FarAgentPool, FarAgentPoolStatus, FlintlockHost, Phase};
use far_channel::{Channel, TokenKey};
use far_host::provider::sim::{Sim, SimConfig};
use far_host::{Host, HostConfig};
use far_testkit::apiserver::FakeApiServer;
use far_vmspec::{Defaults, VmName};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::events::Reporter;
use serde_json::json;
use tokio::sync::oneshot;

struct Env {
    api: FakeApiServer,
    host: Arc<Host<Sim>>,
    endpoint: String,
    channel: Channel,
    channel_url: String,
    _state: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    metrics: Arc<far_agent_controller::metrics::Metrics>,
    /// The far-host's gRPC server, and what stops it (the host becomes unreachable).
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    host_down: Option<oneshot::Sender<()>>,
    /// Which Events the controller records.
    events: far_agent_controller::reconcile::EventPolicy,
    /// Where the web UI finds the controller.
    ui: far_agent_controller::ui::Live,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn env() -> Env {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let api = FakeApiServer::start().await;
    let state = tempfile::tempdir().unwrap();
    let host = Host::open(
        HostConfig {
            retry_delay: Duration::from_millis(20),
            ..HostConfig::default()
        },
        state.path(),
        Sim::new(SimConfig {
            boot_delay: Duration::from_millis(20),
            fail_starts_containing: Some("doomed".into()),
        }),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (host_down, down) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(far_host::routes(Arc::clone(&host), None))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = down.await;
                },
            ),
    );

    let channel = Channel::new(far_channel::Config::new(
        TokenKey::new(vec![9; 32]).unwrap(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let channel_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(channel.clone().serve(listener));

    let hosts: Api<FlintlockHost> = Api::all(api.client());
    let host_object: FlintlockHost = serde_json::from_value(json!({
        "apiVersion": "tiffany.dev/v1", "kind": "FlintlockHost", "metadata": {"name": "sim-1"},
        "spec": {"endpoint": endpoint, "provider": "sim", "capacity": {"cpu": 4, "memory": "8Gi"}, "vmLimits": {"minMemory": "64Mi", "maxMemory": "8Gi", "maxCpu": 4}}
    })).unwrap();
    hosts
        .create(&PostParams::default(), &host_object)
        .await
        .unwrap();
    Env {
        api,
        host,
        endpoint,
        channel,
        channel_url,
        _state: state,
        stop: None,
        metrics: Arc::default(),
        server,
        host_down: Some(host_down),
        events: far_agent_controller::reconcile::EventPolicy::All,
        ui: Default::default(),
    }
}

impl Env {
    fn start_controller(&mut self) {
        let config = Config {
            defaults: Defaults::local(),
            channel_url: self.channel_url.clone(),
            grace_period_seconds: 5,
            call_timeout: Duration::from_secs(2),
            concurrency: far_agent_controller::reconcile::DEFAULT_CONCURRENCY,
            events: self.events,
            ui: self.ui.clone(),
        };
        let (tx, rx) = oneshot::channel();
        self.stop = Some(tx);
        let reporter = Reporter {
            controller: "far-agent-controller".into(),
            instance: Some("test".into()),
        };
        tokio::spawn(far_agent_controller::run::run(
            self.api.client(),
            config,
            self.channel.clone(),
            reporter,
            Arc::clone(&self.metrics),
            async {
                let _ = rx.await;
            },
        ));
    }

    /// Serves the web UI and the agents' log routes as the controller's metrics port does; the
    /// base URL.
    async fn serve_ui(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let router =
            far_agent_controller::ui::router(self.ui.clone()).merge(self.channel.logs_router());
        tokio::spawn(async move { axum::serve(listener, router).await });
        base
    }

    /// Stops the far-host's gRPC server: no new connection, existing ones closed.
    async fn kill_host(&mut self) {
        if let Some(down) = self.host_down.take() {
            let _ = down.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.server).await;
        self.server.abort();
    }

    /// Waits until the agent is gone and no VM is left on the host.
    async fn wait_gone(&self, name: &str) {
        for _ in 0..300 {
            if self.agents().get_opt(name).await.unwrap().is_none() && self.vms().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "left behind: agent {:?}, {} VMs",
            self.agents().get_opt(name).await.unwrap().map(|a| a.status),
            self.vms().len()
        );
    }

    /// Waits until the controller has probed the host Ready (an agent created before waits
    /// Unschedulable, which costs a write of its own).
    async fn wait_host_ready(&self) {
        for _ in 0..200 {
            let host = self.api.object("flintlockhosts", "", "sim-1").unwrap();
            if host["status"]["conditions"][0]["status"] == "True" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the host was never probed Ready");
    }

    /// Waits for an Event with this reason (Events are written after the status they follow).
    async fn wait_for_event(&self, reason: &str) {
        for _ in 0..200 {
            if self.event_reasons().iter().any(|r| r == reason) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no {reason} event in {:?}", self.event_reasons());
    }

    fn agents(&self) -> Api<FarAgent> {
        Api::namespaced(self.api.client(), "default")
    }

    async fn create(&self, name: &str, extra: serde_json::Value) -> FarAgent {
        let mut spec = json!({"image": "busybox:1", "memory": "256Mi", "cpu": 1, "entrypoint": "/bin/agent", "heartbeat": {"intervalSeconds": 1, "timeoutSeconds": 10}});
        json_patch::merge(&mut spec, &extra);
        let agent: FarAgent = serde_json::from_value(json!({"apiVersion": "tiffany.dev/v1", "kind": "FarAgent", "metadata": {"name": name}, "spec": spec})).unwrap();
        self.agents()
            .create(&PostParams::default(), &agent)
            .await
            .unwrap()
    }

    async fn wait_for(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&FarAgent) -> bool,
    ) -> FarAgent {
        for _ in 0..600 {
            if let Some(agent) = self.agents().get_opt(name).await.unwrap()
                && check(&agent)
            {
                return agent;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{name}: timed out waiting for {what}; last: {:?}; hosts: {:?}; requests: {:?}",
            self.agents()
                .get_opt(name)
                .await
                .unwrap()
                .and_then(|a| a.status),
            self.api
                .objects("flintlockhosts")
                .iter()
                .map(|h| h["status"].clone())
                .collect::<Vec<_>>(),
            self.api.requests()
        );
    }

    fn vms(&self) -> Vec<flintlock_proto::types::MicroVm> {
        self.host.list("far", None)
    }

    fn pools(&self) -> Api<FarAgentPool> {
        Api::namespaced(self.api.client(), "default")
    }

    /// Creates a FarAgentPool of the agents' usual VM (what [`Env::create`] gives them).
    async fn create_pool(&self, name: &str, extra: serde_json::Value) {
        let mut spec = json!({"template": {"image": "busybox:1", "memory": "256Mi", "cpu": 1, "entrypoint": "/bin/agent"}});
        json_patch::merge(&mut spec, &extra);
        let pool: FarAgentPool = serde_json::from_value(json!({"apiVersion": "tiffany.dev/v1", "kind": "FarAgentPool", "metadata": {"name": name}, "spec": spec})).unwrap();
        self.pools()
            .create(&PostParams::default(), &pool)
            .await
            .unwrap();
    }

    async fn wait_for_pool(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&FarAgentPoolStatus) -> bool,
    ) -> FarAgentPoolStatus {
        for _ in 0..600 {
            let status = self.pools().get(name).await.unwrap().status;
            if let Some(status) = status.filter(|s| check(s)) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "pool {name}: timed out waiting for {what}; last: {:?}",
            self.pools().get(name).await.unwrap().status
        );
    }

    /// The uids of the VMs on the host whose name starts with `prefix`.
    fn vm_uids(&self, prefix: &str) -> Vec<String> {
        self.vms()
            .into_iter()
            .filter_map(|vm| vm.spec)
            .filter(|spec| spec.id.starts_with(prefix))
            .filter_map(|spec| spec.uid)
            .collect()
    }

    fn event_reasons(&self) -> Vec<String> {
        self.api
            .objects("events")
            .iter()
            .filter_map(|e| e["reason"].as_str().map(str::to_owned))
            .collect()
    }
}

/// A log sink the test can read back.
#[derive(Clone, Default)]
struct Output(Arc<std::sync::Mutex<Vec<u8>>>);

impl Output {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Output {
    type Writer = Output;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// A VM spec far-host accepts, named as the controller names an agent's VM.
fn bare_vm_spec(id: &str) -> flintlock_proto::types::MicroVmSpec {
    flintlock_proto::types::MicroVmSpec {
        id: id.to_owned(),
        namespace: "far".into(),
        kernel: Some(flintlock_proto::types::Kernel {
            image: "k".into(),
            filename: Some("vmlinuz".into()),
            ..Default::default()
        }),
        root_volume: Some(flintlock_proto::types::Volume {
            id: "root".into(),
            source: Some(flintlock_proto::types::VolumeSource {
                container_source: Some("busybox:1".into()),
                virtiofs_source: None,
            }),
            ..Default::default()
        }),
        interfaces: vec![flintlock_proto::types::NetworkInterface {
            device_id: "agent0".into(),
            r#type: 1,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn phase(agent: &FarAgent) -> Option<Phase> {
    agent.status.as_ref().and_then(|s| s.phase)
}

#[tokio::test]
async fn an_agent_runs_to_completed_and_its_vm_is_freed() {
    let mut env = env().await;
    env.start_controller();
    env.wait_host_ready().await;
    env.create(
        "ok",
        json!({"args": ["--seconds", "0.5", "--exit-code", "0"]}),
    )
    .await;
    let agent = env
        .wait_for("ok", "Completed", |a| phase(a) == Some(Phase::Completed))
        .await;
    let status = agent.status.unwrap();
    assert_eq!(status.exit_code, Some(0));
    assert_eq!(status.host.as_deref(), Some("sim-1"));
    assert!(status.vm_uid.is_some() && status.start_time.is_some() && status.finish_time.is_some());
    assert_eq!(status.vm.unwrap().memory_mib, 256);
    // The sim guest's heartbeat, summarised at Running and kept.
    assert_eq!(
        status.guest,
        Some(far_api::GuestUsage {
            boot_to_entrypoint_ms: Some(50),
            memory_used_mib: 64,
            memory_total_mib: 512,
            cpu_used_ms: 10,
        })
    );
    assert!(
        agent
            .metadata
            .finalizers
            .unwrap()
            .contains(&far_api::FINALIZER.to_owned())
    );
    for _ in 0..100 {
        if env.vms().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(env.vms().is_empty(), "the finished agent's VM is deleted");
    let metrics = env.metrics.encode();
    assert!(
        metrics.contains("far_controller_time_to_running_seconds_count 1"),
        "{metrics}"
    );
    assert!(metrics.contains("far_controller_flintlock_rpc_duration_seconds_count{method=\"CreateMicroVM\",code=\"OK\"} 1"), "{metrics}");
    for reason in ["Scheduled", "VMCreated", "Started", "Completed"] {
        env.wait_for_event(reason).await;
    }

    env.agents()
        .delete("ok", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone("ok").await;
    // The whole life's writes, create to deletion: finalizer, placement with the VM, Running,
    // the exit, the finalizer's release; and an Event per step. Nothing refused or repeated.
    assert_eq!(
        agent_writes(&env.api),
        BTreeMap::from([
            (("create".into(), "events".into()), 4),
            (("patch".into(), "faragents".into()), 5),
        ])
    );
}

/// The writes the controller made to FarAgents and Events (the test's own create and delete
/// of the agent left out), and refusals.
fn agent_writes(api: &FakeApiServer) -> BTreeMap<(String, String), u64> {
    api.requests()
        .into_iter()
        .filter(|((verb, resource), _)| {
            matches!(resource.as_str(), "faragents" | "events")
                && matches!(
                    verb.as_str(),
                    "create" | "patch" | "update" | "delete" | "conflict"
                )
        })
        .filter_map(|((verb, resource), n)| {
            let own = u64::from(resource == "faragents" && (verb == "create" || verb == "delete"));
            (n > own).then(|| ((verb, resource), n - own))
        })
        .collect()
}

/// Deleting an agent that runs stops it as Kubernetes stops a Pod: its guest is told (the answer
/// to its next heartbeat), the agent gets SIGTERM and the grace period, and the exit it ends with
/// is recorded before its VM goes.
#[tokio::test]
async fn a_deleted_running_agent_is_stopped_and_its_exit_recorded_before_its_vm_goes() {
    let mut env = env().await;
    env.start_controller();
    env.wait_host_ready().await;
    env.create("stopper", json!({"args": ["--seconds", "600"]}))
        .await;
    env.wait_for("stopper", "Running", |a| phase(a) == Some(Phase::Running))
        .await;
    env.agents()
        .delete("stopper", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone("stopper").await;
    let notes: Vec<String> = env
        .api
        .objects("events")
        .iter()
        .filter(|e| e["reason"] == "Deleted")
        .filter_map(|e| e["note"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        notes,
        ["the agent stopped with exit code 143; its VM is gone"],
        "the SIGTERM the agent ended by is recorded: {notes:?} (events {:?})",
        env.event_reasons()
    );
}

/// With `--events warnings` only Warnings are recorded: a healthy life is its 5 writes.
#[tokio::test]
async fn with_warnings_only_a_healthy_life_is_five_writes_and_a_failure_still_says_why() {
    let mut env = env().await;
    env.events = far_agent_controller::reconcile::EventPolicy::Warnings;
    env.start_controller();
    env.wait_host_ready().await;
    env.create(
        "ok",
        json!({"args": ["--seconds", "0.2", "--exit-code", "0"]}),
    )
    .await;
    env.wait_for("ok", "Completed", |a| phase(a) == Some(Phase::Completed))
        .await;
    env.agents()
        .delete("ok", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone("ok").await;
    assert_eq!(
        agent_writes(&env.api),
        BTreeMap::from([(("patch".into(), "faragents".into()), 5)])
    );
    assert!(env.event_reasons().is_empty(), "{:?}", env.event_reasons());

    env.create(
        "bad",
        json!({"args": ["--seconds", "0.2", "--exit-code", "3"]}),
    )
    .await;
    env.wait_for("bad", "Failed", |a| phase(a) == Some(Phase::Failed))
        .await;
    env.wait_for_event("Failed").await;
    assert_eq!(env.event_reasons(), ["Failed"]);
}

#[tokio::test]
async fn a_non_zero_exit_fails_and_on_failure_restarts_in_a_new_vm() {
    let mut env = env().await;
    env.start_controller();
    env.create(
        "three",
        json!({"args": ["--seconds", "0.2", "--exit-code", "3"]}),
    )
    .await;
    let agent = env
        .wait_for("three", "Failed", |a| phase(a) == Some(Phase::Failed))
        .await;
    let status = agent.status.unwrap();
    assert_eq!(
        (status.exit_code, status.reason),
        (Some(3), Some(far_api::AgentReason::Error))
    );

    env.create("again", json!({"args": ["--seconds", "0.2", "--exit-code", "4"], "restartPolicy": "OnFailure", "backoffLimit": 1})).await;
    let agent = env
        .wait_for("again", "the restart to fail for good", |a| {
            phase(a) == Some(Phase::Failed)
        })
        .await;
    let status = agent.status.unwrap();
    assert_eq!((status.restart_count, status.exit_code), (1, Some(4)));
    env.wait_for_event("BackOff").await;
}

/// far-host's Guests extension: a guest that dies without reporting fails its agent at the next
/// host probe, long before its heartbeat timeout; a VM that cannot start fails it with the
/// host's reason.
#[tokio::test]
async fn a_crashed_guest_or_a_vm_that_cannot_start_fails_the_agent_with_the_cause() {
    let mut env = env().await;
    env.start_controller();
    env.create(
        "crasher",
        json!({"args": ["--sim-crash", "--seconds", "0.2"], "heartbeat": {"intervalSeconds": 5, "timeoutSeconds": 600}}),
    )
    .await;
    let started = std::time::Instant::now();
    let agent = env
        .wait_for("crasher", "Failed", |a| phase(a) == Some(Phase::Failed))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "found by the probe, not the timeout"
    );
    let status = agent.status.unwrap();
    assert_eq!(status.reason, Some(far_api::AgentReason::VMFailed));
    let message = status.message.unwrap_or_default();
    assert!(
        message.ends_with("stopped without the agent reporting an exit"),
        "{message}"
    );
    assert_eq!(status.exit_code, None);

    env.create("doomed", json!({})).await;
    let agent = env
        .wait_for("doomed", "Failed", |a| phase(a) == Some(Phase::Failed))
        .await;
    let status = agent.status.unwrap();
    assert_eq!(status.reason, Some(far_api::AgentReason::VMFailed));
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("FAILED: sim: injected start failure for VM \"default.doomed.0."),
        "{message}"
    );
}

#[tokio::test]
async fn an_agent_no_host_can_hold_stays_pending_unschedulable() {
    let mut env = env().await;
    env.start_controller();
    env.create("huge", json!({"memory": "64Gi"})).await;
    let agent = env
        .wait_for("huge", "Unschedulable for its size", |a| {
            a.status
                .as_ref()
                .and_then(|s| s.message.as_deref())
                .is_some_and(|m| m.contains("runs no VM over"))
        })
        .await;
    let status = agent.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Pending));
    assert!(
        status
            .message
            .unwrap()
            .contains("sim-1: asks for 65536 MiB; host sim-1 runs no VM over 8192 MiB")
    );
    assert!(env.vms().is_empty());
}

#[tokio::test]
async fn a_vm_created_before_a_crash_is_adopted_not_duplicated() {
    let mut env = env().await;
    // The controller "crashed" after CreateMicroVM and before writing status: the VM exists,
    // the FarAgent does not know it.
    let agent = env
        .create("adopt", json!({"args": ["--seconds", "0.5"]}))
        .await;
    let name = VmName::for_agent(&agent, 0).unwrap();
    let client = flintlock_proto::MicroVmClient::connect(env.endpoint.clone())
        .await
        .unwrap();
    let spec = bare_vm_spec(name.id());
    let mut c = client.clone();
    let existing = c
        .create_micro_vm(flintlock_proto::v1alpha1::CreateMicroVmRequest {
            microvm: Some(spec),
            metadata: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .microvm
        .unwrap()
        .spec
        .unwrap()
        .uid
        .unwrap();
    // The status write that was lost: the agent was already placed.
    let api = env.agents();
    api.patch_status("adopt", &Default::default(), &kube::api::Patch::Merge(json!({"status": {"phase": "Pending", "reason": "Provisioning", "host": "sim-1", "vm": {"vcpu": 1, "memoryMiB": 256}}}))).await.unwrap();
    let finalizer = json!({"metadata": {"finalizers": [far_api::FINALIZER]}});
    api.patch(
        "adopt",
        &Default::default(),
        &kube::api::Patch::Merge(finalizer),
    )
    .await
    .unwrap();

    env.start_controller();
    let agent = env
        .wait_for("adopt", "the VM adopted", |a| {
            a.status.as_ref().and_then(|s| s.vm_uid.clone()).is_some()
        })
        .await;
    assert_eq!(
        agent.status.unwrap().vm_uid.as_deref(),
        Some(existing.as_str())
    );
    // No second VM: the controller never called CreateMicroVM. (The adopted VM itself may be
    // gone by now: it has no run configuration, so its guest stops and the agent fails.)
    let metrics = env.metrics.encode();
    assert!(
        !metrics.contains("method=\"CreateMicroVM\""),
        "the controller created a VM: {metrics}"
    );
    assert!(env.host.list("far", Some(name.id())).len() <= 1);
}

#[tokio::test]
async fn orphaned_vms_are_collected_and_a_deleted_running_agent_takes_its_vm_along() {
    let mut env = env().await;
    env.start_controller();
    env.create("long", json!({"args": ["--seconds", "600"]}))
        .await;
    env.wait_for("long", "Running", |a| phase(a) == Some(Phase::Running))
        .await;

    let orphan = VmName::new(
        "default",
        "ghost",
        "00000000-dead-beef-0000-000000000000",
        0,
    )
    .unwrap();
    let mut client = flintlock_proto::MicroVmClient::connect(env.endpoint.clone())
        .await
        .unwrap();
    let spec = bare_vm_spec(orphan.id());
    client
        .create_micro_vm(flintlock_proto::v1alpha1::CreateMicroVmRequest {
            microvm: Some(spec),
            metadata: Default::default(),
        })
        .await
        .unwrap();
    for _ in 0..300 {
        if env.host.list("far", Some(orphan.id())).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        env.host.list("far", Some(orphan.id())).is_empty(),
        "the orphan is deleted"
    );
    assert_eq!(env.vms().len(), 1, "the running agent's VM is left alone");

    env.agents()
        .delete("long", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone("long").await;
}

#[tokio::test]
async fn with_two_replicas_only_the_leader_acts_and_the_other_takes_over() {
    let mut env = env().await;
    let replica =
        |env: &Env, identity: &str, metrics: Arc<far_agent_controller::metrics::Metrics>| {
            let config = Config {
                defaults: Defaults::local(),
                channel_url: env.channel_url.clone(),
                grace_period_seconds: 5,
                call_timeout: Duration::from_secs(2),
                concurrency: far_agent_controller::reconcile::DEFAULT_CONCURRENCY,
                events: far_agent_controller::reconcile::EventPolicy::All,
                ui: Default::default(),
            };
            let election = far_agent_controller::leader::Election {
                namespace: "far-system".into(),
                name: "far-agent-controller".into(),
                identity: identity.into(),
                duration: Duration::from_secs(2),
            };
            let (tx, rx) = oneshot::channel::<()>();
            let reporter = Reporter {
                controller: "far-agent-controller".into(),
                instance: Some(identity.into()),
            };
            let task = tokio::spawn(far_agent_controller::run::run_leading(
                env.api.client(),
                config,
                env.channel.clone(),
                reporter,
                metrics,
                election,
                async {
                    let _ = rx.await;
                },
            ));
            (tx, task)
        };
    let (a_metrics, b_metrics) = (
        Arc::<far_agent_controller::metrics::Metrics>::default(),
        Arc::<far_agent_controller::metrics::Metrics>::default(),
    );
    let (stop_a, task_a) = replica(&env, "replica-a", Arc::clone(&a_metrics));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_stop_b, _task_b) = replica(&env, "replica-b", Arc::clone(&b_metrics));

    env.create("first", json!({"args": ["--seconds", "0.2"]}))
        .await;
    env.wait_for("first", "Completed", |a| phase(a) == Some(Phase::Completed))
        .await;
    assert!(a_metrics.reconciles.get() > 0);
    assert_eq!(b_metrics.reconciles.get(), 0, "the follower does nothing");

    stop_a.send(()).unwrap();
    task_a.await.unwrap();
    env.create("second", json!({"args": ["--seconds", "0.2"]}))
        .await;
    env.wait_for("second", "Completed after the takeover", |a| {
        phase(a) == Some(Phase::Completed)
    })
    .await;
    assert!(
        b_metrics.reconciles.get() > 0,
        "the other replica took over"
    );
    env.stop = None;
}

/// A running agent keeps no timer: while it runs heard from, nothing reconciles it; what
/// changes for it is still found. A guest that falls silent while its host answers (only the
/// heartbeat watch can tell) fails `HeartbeatLost`; a VM deleted under a running agent (only the
/// host probe can tell) fails it `VMFailed`.
#[tokio::test]
async fn a_running_agent_is_decided_again_only_when_its_guest_or_vm_calls_for_it() {
    let mut env = env().await;
    env.start_controller();
    // Before running agents kept no timer, one was looked at every heartbeat timeout at most.
    let fast = json!({"intervalSeconds": 1, "timeoutSeconds": 6});
    env.create(
        "steady",
        json!({"args": ["--seconds", "600"], "heartbeat": fast}),
    )
    .await;
    // Its VM's loss must be found long before its guest's silence could tell.
    let patient = json!({"intervalSeconds": 1, "timeoutSeconds": 600});
    env.create(
        "vm-lost",
        json!({"args": ["--seconds", "600"], "heartbeat": patient}),
    )
    .await;
    for name in ["steady", "vm-lost"] {
        env.wait_for(name, "Running", |a| phase(a) == Some(Phase::Running))
            .await;
    }
    // Its own write's watch event, and nothing else.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = env.metrics.reconciles.get();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        env.metrics.reconciles.get() - before,
        0,
        "running agents reconciled with nothing new"
    );

    env.create("hangs", json!({"args": ["--sim-hang"], "heartbeat": fast}))
        .await;
    let hangs = env
        .wait_for("hangs", "Failed", |a| phase(a) == Some(Phase::Failed))
        .await
        .status
        .unwrap();
    assert_eq!(hangs.reason, Some(far_api::AgentReason::HeartbeatLost));
    assert!(hangs.start_time.is_some(), "it ran first: {hangs:?}");

    let uid = env.vm_uids("default.vm-lost.")[0].clone();
    env.host.delete(&uid).unwrap();
    let lost = env
        .wait_for("vm-lost", "Failed", |a| phase(a) == Some(Phase::Failed))
        .await
        .status
        .unwrap();
    assert_eq!(
        lost.reason,
        Some(far_api::AgentReason::VMFailed),
        "{lost:?}"
    );
    assert_eq!(
        env.agents()
            .get("steady")
            .await
            .unwrap()
            .status
            .unwrap()
            .reason,
        Some(far_api::AgentReason::Running)
    );
}

#[tokio::test]
async fn a_host_lost_while_running_shows_unreachable_and_silent_agents_fail() {
    let mut env = env().await;
    env.start_controller();
    let fast = json!({"intervalSeconds": 1, "timeoutSeconds": 6});
    // One guest goes on heartbeating (its host's API is down, not the guest); one falls silent.
    env.create(
        "alive",
        json!({"args": ["--seconds", "600"], "heartbeat": fast}),
    )
    .await;
    env.create("silent", json!({"args": ["--sim-hang"], "heartbeat": fast}))
        .await;
    env.wait_for("alive", "Running", |a| phase(a) == Some(Phase::Running))
        .await;
    env.wait_for("silent", "Running", |a| phase(a) == Some(Phase::Running))
        .await;
    env.kill_host().await;

    let alive = env
        .wait_for("alive", "HostUnreachable", |a| {
            a.status.as_ref().and_then(|s| s.reason) == Some(far_api::AgentReason::HostUnreachable)
        })
        .await;
    assert_eq!(
        alive.status.unwrap().phase,
        Some(Phase::Running),
        "heartbeats still arrive"
    );
    env.wait_for_event("HostUnreachable").await;
    let silent = env
        .wait_for("silent", "Failed", |a| phase(a) == Some(Phase::Failed))
        .await;
    assert_eq!(
        silent.status.unwrap().reason,
        Some(far_api::AgentReason::HeartbeatLost)
    );
    for _ in 0..200 {
        let host = env.api.object("flintlockhosts", "", "sim-1").unwrap();
        if host["status"]["conditions"][0]["status"] == "False" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the lost host never turned not Ready");
}

#[tokio::test]
async fn a_host_down_at_create_leaves_the_agent_pending_without_a_vm() {
    let mut env = env().await;
    env.start_controller();
    // Ready first, then gone before the agent arrives.
    for _ in 0..100 {
        if env
            .api
            .object("flintlockhosts", "", "sim-1")
            .is_some_and(|h| h["status"]["conditions"][0]["status"] == "True")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.server.abort();
    env.create("early", json!({"args": ["--seconds", "1"]}))
        .await;
    let agent = env
        .wait_for("early", "Unschedulable on a host that is not Ready", |a| {
            a.status
                .as_ref()
                .and_then(|s| s.message.as_deref())
                .is_some_and(|m| m.contains("sim-1: not Ready"))
        })
        .await;
    let status = agent.status.unwrap();
    assert_eq!(
        (status.phase, status.host, status.vm_uid),
        (Some(Phase::Pending), None, None)
    );
    assert!(env.vms().is_empty(), "no VM was made");
}

#[tokio::test]
async fn an_agent_deleted_while_its_vm_is_being_created_leaves_nothing_behind() {
    let mut env = env().await;
    env.start_controller();
    env.create("brief", json!({"args": ["--seconds", "600"]}))
        .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    env.agents()
        .delete("brief", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone("brief").await;
}

#[tokio::test]
async fn hosts_are_reached_over_mutual_tls_with_the_token_from_their_secrets() {
    let mut env = env().await;
    let server = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let client =
        rcgen::generate_simple_self_signed(vec!["far-agent-controller".to_owned()]).unwrap();
    let (server_cert, server_key) = (server.cert.pem(), server.signing_key.serialize_pem());
    let (client_cert, client_key) = (client.cert.pem(), client.signing_key.serialize_pem());

    // A second far-host, TLS with client certificates and a token.
    let state = tempfile::tempdir().unwrap();
    let host = Host::open(
        HostConfig::default(),
        state.path(),
        Sim::new(SimConfig::default()),
    )
    .await
    .unwrap();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &server_cert,
            &server_key,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(&client_cert));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_routes(far_host::routes(Arc::clone(&host), Some("s3cret".into())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let b64 = |text: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, text);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(env.api.client(), "default");
    for (name, data) in [
        (
            "tls-host",
            json!({"ca.crt": b64(&server_cert), "tls.crt": b64(&client_cert), "tls.key": b64(&client_key)}),
        ),
        ("token-host", json!({"token": b64("s3cret")})),
    ] {
        let secret = serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data}),
        )
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    // The plaintext host is cordoned, so the agent must go to the TLS one.
    let hosts: Api<FlintlockHost> = Api::all(env.api.client());
    hosts
        .patch(
            "sim-1",
            &Default::default(),
            &kube::api::Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();
    let tls_host: FlintlockHost = serde_json::from_value(json!({
        "apiVersion": "tiffany.dev/v1", "kind": "FlintlockHost", "metadata": {"name": "tls-1"},
        "spec": {"endpoint": format!("https://localhost:{port}"), "provider": "sim",
                 "tlsSecretRef": {"name": "tls-host", "namespace": "default"},
                 "tokenSecretRef": {"name": "token-host", "namespace": "default"},
                 "capacity": {"cpu": 4, "memory": "8Gi"}, "vmLimits": {"minMemory": "64Mi", "maxMemory": "8Gi", "maxCpu": 4}}
    })).unwrap();
    hosts
        .create(&PostParams::default(), &tls_host)
        .await
        .unwrap();

    env.start_controller();
    env.create("secure", json!({"args": ["--seconds", "0.2"]}))
        .await;
    let agent = env
        .wait_for("secure", "Completed", |a| {
            phase(a) == Some(Phase::Completed)
        })
        .await;
    assert_eq!(agent.status.unwrap().host.as_deref(), Some("tls-1"));
    let exits: Vec<_> = host.list("far", None);
    assert!(exits.len() <= 1, "one VM at most on the TLS host");
}

#[tokio::test]
async fn an_agents_output_is_read_through_the_api_servers_service_proxy() {
    use futures::StreamExt;
    let mut env = env().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("http://{}", listener.local_addr().unwrap());
    let router = env.channel.logs_router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    env.api
        .proxy_service("far-system", "far-agent-controller-metrics:8080", &backend);
    let via = far_agent_controller::logs::LogService {
        namespace: "far-system".into(),
        service: "far-agent-controller-metrics:8080".into(),
    };
    env.start_controller();

    env.create("talker", json!({"args": ["--seconds", "2"]}))
        .await;
    env.wait_for("talker", "Running", |a| phase(a) == Some(Phase::Running))
        .await;
    let client = env.api.client();
    let followed = far_agent_controller::logs::fetch(&client, &via, "default", "talker", true)
        .await
        .unwrap();
    let lines: Vec<String> = tokio::time::timeout(
        Duration::from_secs(20),
        followed.map(Result::unwrap).collect(),
    )
    .await
    .expect("the stream ends when the agent exits");
    assert_eq!(lines, ["sim: /bin/agent --seconds 2"]);
    env.wait_for("talker", "Completed", |a| {
        phase(a) == Some(Phase::Completed)
    })
    .await;

    let later: Vec<String> =
        far_agent_controller::logs::fetch(&client, &via, "default", "talker", false)
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect()
            .await;
    assert_eq!(
        later, lines,
        "the buffer keeps the output after the agent finished"
    );
    let unknown =
        far_agent_controller::logs::fetch(&client, &via, "default", "nobody", false).await;
    assert!(
        matches!(unknown, Err(kube::Error::Api(ref s)) if s.code == 404),
        "{:?}",
        unknown.err()
    );
}

#[tokio::test]
async fn the_controller_converges_through_api_server_errors() {
    let mut env = env().await;
    env.start_controller();
    // Status and finalizer writes fail with 500, then 429, Events with 500: retried until through;
    // watches are dropped.
    env.api.fail_next("patch", 500, 3);
    env.create("stubborn", json!({"args": ["--seconds", "0.3"]}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.api.fail_next("patch", 429, 2);
    env.api.fail_next("create", 500, 2);
    // Every watch is cut mid-stream while the agent runs: the controller watches again from
    // where it was and misses nothing.
    env.api.drop_watches();
    tokio::time::sleep(Duration::from_millis(100)).await;
    env.api.drop_watches();
    let agent = env
        .wait_for("stubborn", "Completed", |a| {
            phase(a) == Some(Phase::Completed)
        })
        .await;
    assert_eq!(agent.status.unwrap().exit_code, Some(0));
    assert!(env.vms().len() <= 1, "no VM was made twice");
}

#[tokio::test]
async fn secret_values_appear_in_no_status_event_or_host_record() {
    far_tls::install();
    // Everything this process logs, at every level: controller, channel, far-host, sim guest.
    let output = Output::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(output.clone())
        .init();
    let mut env = env().await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(env.api.client(), "default");
    let secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "llm"},
        "data": {"key": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "sk-live-4f2a9c")}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    env.start_controller();
    env.create("holder", json!({"args": ["--seconds", "600"], "env": [{"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "llm", "key": "key"}}}]})).await;
    env.wait_for("holder", "Running", |a| phase(a) == Some(Phase::Running))
        .await;
    // The guest fetched its secret values (the sim guest does, as far-init does), so they
    // crossed the channel; they must be nowhere in what was logged.
    let id = far_agent_protocol::channel_id(
        &env.agents()
            .get("holder")
            .await
            .unwrap()
            .metadata
            .uid
            .unwrap(),
        0,
    );
    let logged = output.text();
    assert!(
        logged.contains("secrets/llm"),
        "the log holds the reads of the Secret itself: {} bytes",
        logged.len()
    );
    for (what, value) in [
        ("the secret value", "sk-live-4f2a9c".to_owned()),
        (
            "the secret value in base64",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "sk-live-4f2a9c"),
        ),
        ("the agent's token", env.channel.token_for(&id)),
        (
            "the agent's enrolment token",
            env.channel.enrolment_token_for(&id),
        ),
    ] {
        assert!(!logged.contains(&value), "{what} is in the log");
    }
    let mut records = 0;

    let everything = format!(
        "{:?}{:?}",
        env.api.objects("faragents"),
        env.api.objects("events")
    );
    assert!(
        !everything.contains("sk-live-4f2a9c"),
        "a secret value reached the API server: {everything}"
    );
    for entry in std::fs::read_dir(env._state.path().join("vms"))
        .into_iter()
        .flatten()
    {
        let record = std::fs::read(entry.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&record);
        assert!(
            !text.contains("sk-live-4f2a9c"),
            "a secret value reached far-host's records"
        );
        // The run configuration sits base64-encoded in the spec's metadata: decode it and look.
        let record: far_host::record::VmRecord = serde_json::from_slice(&record).unwrap();
        let spec = record.spec();
        assert!(
            !spec.metadata.is_empty(),
            "the VM has its run configuration"
        );
        records += 1;
        for (key, value) in &spec.metadata {
            let decoded =
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, value).unwrap();
            let text = String::from_utf8_lossy(&decoded);
            if key == "meta-data" {
                // Added by the host, as flintlockd adds it: the VM's uid and nothing else.
                assert!(text.starts_with("instance_id: "), "{text}");
                continue;
            }
            assert!(text.contains("\"hasSecrets\":true"), "{text}");
            assert!(
                !text.contains("sk-live-4f2a9c"),
                "a secret value is in the VM's metadata"
            );
            // Nor is the agent's token: only a one-time enrolment token, spent by the guest.
            let run = far_agent_protocol::RunConfig::parse(&decoded).unwrap();
            let token = env.channel.token_for(&run.channel.id);
            assert!(
                !text.contains(&token),
                "the agent's token is in the VM's metadata"
            );
            let post = |route: &str, bearer: &str| {
                reqwest::Client::new()
                    .post(format!(
                        "{}{}",
                        env.channel_url,
                        far_agent_protocol::paths::for_agent(route, &run.channel.id)
                    ))
                    .bearer_auth(bearer)
                    .header("content-type", "application/json")
                    .body(
                        serde_json::to_vec(&far_agent_protocol::Heartbeat {
                            boot_to_entrypoint_ms: None,
                            memory_used_bytes: 1,
                            memory_total_bytes: 1,
                            cpu_used_ms: 1,
                        })
                        .unwrap(),
                    )
                    .send()
            };
            let enrolment = &run.channel.enrolment_token;
            let again = post(far_agent_protocol::paths::ENROL, enrolment)
                .await
                .unwrap();
            assert_eq!(
                again.status(),
                409,
                "whoever reads the record cannot enrol again"
            );
            let beat = post(far_agent_protocol::paths::HEARTBEAT, enrolment)
                .await
                .unwrap();
            assert_eq!(beat.status(), 401, "an enrolment token is no agent token");
        }
    }
    assert_eq!(records, 1, "the running agent's VM record was checked");
}

#[tokio::test]
async fn a_missing_secret_holds_the_agent_pending_naming_it_and_no_vm_is_made() {
    let mut env = env().await;
    env.start_controller();
    env.create("needy", json!({"env": [{"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "key"}}}]})).await;
    let agent = env
        .wait_for("needy", "ConfigMissing", |a| {
            a.status.as_ref().and_then(|s| s.reason) == Some(far_api::AgentReason::ConfigMissing)
        })
        .await;
    let status = agent.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Pending));
    assert!(
        status
            .message
            .unwrap()
            .contains("Secret \"absent\" not found")
    );
    assert!(env.vms().is_empty());
}

/// A run configuration beyond what Firecracker's metadata service holds (here two 30,000-byte
/// env values) holds the agent Pending saying so and how to fix it; no VM is made to fail.
#[tokio::test]
async fn a_run_configuration_too_large_for_the_metadata_service_holds_the_agent_pending() {
    let mut env = env().await;
    env.start_controller();
    let big = "x".repeat(30_000);
    env.create(
        "wordy",
        json!({"env": [{"name": "A", "value": big}, {"name": "B", "value": big}]}),
    )
    .await;
    let agent = env
        .wait_for("wordy", "ConfigTooLarge", |a| {
            a.status.as_ref().and_then(|s| s.reason) == Some(far_api::AgentReason::ConfigTooLarge)
        })
        .await;
    let status = agent.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Pending));
    let message = status.message.unwrap();
    assert!(
        message.starts_with("spec.env and spec.args: ") && message.contains("at most 51200"),
        "{message}"
    );
    assert!(env.vms().is_empty());
}

/// A pool keeps its idle VMs booted. An agent naming it runs its own task on one of them
/// (WarmStart: no VM is created for it); the VM is destroyed after the exit (reuse: Never), the
/// pool boots another, and its status counts the claim. A deleted pool's idle VMs go.
#[tokio::test]
async fn a_claim_runs_on_an_idle_vm_of_its_pool_and_the_pool_refills() {
    let mut env = env().await;
    env.start_controller();
    env.wait_host_ready().await;
    env.create_pool("warm", json!({"minIdle": 2, "maxSize": 4}))
        .await;
    let status = env
        .wait_for_pool("warm", "2 idle VMs", |s| s.idle == 2)
        .await;
    assert_eq!(
        (status.desired_idle, status.ready_replicas, status.busy),
        (2, 2, 0)
    );
    assert_eq!(
        status.label_selector.as_deref(),
        Some("tiffany.dev/pool=warm")
    );
    let idle = env.vm_uids("default.warm.");
    assert_eq!(idle.len(), 2, "{:?}", env.vms());

    env.create(
        "claimer",
        json!({"poolRef": {"name": "warm"}, "args": ["--seconds", "0.3"],
            "entrypoint": null, "image": null, "memory": null, "cpu": null}),
    )
    .await;
    let agent = env
        .wait_for("claimer", "Completed", |a| {
            phase(a) == Some(Phase::Completed)
        })
        .await;
    let status = agent.status.unwrap();
    let claimed = status.vm_uid.clone().unwrap();
    assert!(
        idle.contains(&claimed),
        "ran on {claimed}, not on one of the idle VMs {idle:?}"
    );
    let created = status
        .conditions
        .iter()
        .find(|c| c.type_ == "VMCreated")
        .unwrap();
    assert_eq!(created.reason, "WarmStart", "{created:?}");
    assert!(created.message.contains("of pool warm"), "{created:?}");
    // Only the pool's VMs were ever made: none named after the agent.
    assert!(env.vm_uids("default.claimer.").is_empty());

    // The claimed VM is destroyed and the pool boots another in its place.
    let status = env
        .wait_for_pool("warm", "refilled after one warm claim", |s| {
            s.idle == 2 && s.warm_claims == 1 && s.busy == 0
        })
        .await;
    assert_eq!(status.cold_claims, 0);
    let now = env.vm_uids("default.warm.");
    assert_eq!(now.len(), 2);
    assert!(!now.contains(&claimed), "the claimed VM is reused");

    env.pools()
        .delete("warm", &DeleteParams::default())
        .await
        .unwrap();
    env.agents()
        .delete("claimer", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone("claimer").await;
}

/// `reuse: Reset`: a claimed VM goes back to its pool once its agent's exit is on record
/// (its guest resets it and waits again), so a pool of one VM serves one claim after another
/// on the same VM, warm each time; the finished agent's status stops naming the VM.
#[tokio::test]
async fn a_reset_pool_gives_its_vm_back_after_each_agent_and_the_next_claim_takes_it() {
    let mut env = env().await;
    env.start_controller();
    env.wait_host_ready().await;
    env.create_pool(
        "reused",
        json!({"minIdle": 1, "maxSize": 1, "reuse": "Reset"}),
    )
    .await;
    env.wait_for_pool("reused", "1 idle VM", |s| s.idle == 1)
        .await;
    let only = env.vm_uids("default.reused.");
    assert_eq!(only.len(), 1, "{:?}", env.vms());
    let mut ran_on = Vec::new();
    for name in ["first", "second", "third"] {
        env.create(
            name,
            json!({"poolRef": {"name": "reused"}, "args": ["--seconds", "0.2"]}),
        )
        .await;
        let agent = env
            .wait_for(name, "Completed, its VM given back", |a| {
                phase(a) == Some(Phase::Completed)
                    && a.status.as_ref().is_some_and(|s| s.vm_uid.is_none())
            })
            .await;
        let status = agent.status.unwrap();
        assert_eq!(status.exit_code, Some(0));
        let created = status
            .conditions
            .iter()
            .find(|c| c.type_ == "VMCreated")
            .unwrap();
        assert_eq!(created.reason, "WarmStart", "{name}: {created:?}");
        ran_on.push(created.message.clone());
    }
    assert!(
        ran_on.windows(2).all(|w| w[0] == w[1]),
        "every claim took the one VM: {ran_on:?}"
    );
    assert_eq!(
        env.vm_uids("default.reused."),
        only,
        "the VM was never replaced"
    );
    let status = env
        .wait_for_pool("reused", "idle again after three warm claims", |s| {
            s.idle == 1 && s.warm_claims == 3 && s.busy == 0
        })
        .await;
    assert_eq!(status.cold_claims, 0);
    env.pools()
        .delete("reused", &DeleteParams::default())
        .await
        .unwrap();
}

/// A pool nobody sized (minIdle and replicas 0) keeps idle VMs once claims arrive: its
/// autoscaler measures the claim rate and the cold boots, and asks for rate x boot time idle
/// VMs, so later claims start warm. The rise is told as an Event on the pool; once the claims
/// stop, the pool is back to none within its idle timeout and 10 s, and the fall is told.
#[tokio::test]
async fn an_unsized_pool_grows_with_its_claims() {
    let mut env = env().await;
    env.start_controller();
    env.wait_host_ready().await;
    env.create_pool("elastic", json!({"maxSize": 30, "idleTimeoutSeconds": 3}))
        .await;
    for i in 0..40 {
        env.create(
            &format!("c{i:02}"),
            json!({"poolRef": {"name": "elastic"}, "args": ["--seconds", "0.2"]}),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut reasons = Vec::new();
    for i in 0..40 {
        let agent = env
            .wait_for(&format!("c{i:02}"), "Completed", |a| {
                phase(a) == Some(Phase::Completed)
            })
            .await;
        let status = agent.status.unwrap();
        let created = status.conditions.iter().find(|c| c.type_ == "VMCreated");
        reasons.push(created.map(|c| c.reason.clone()).unwrap_or_default());
    }
    assert_eq!(reasons[0], "ColdStart", "nothing was idle at first");
    let warm = reasons.iter().filter(|r| *r == "WarmStart").count();
    assert!(warm > 0, "no claim was served warm: {reasons:?}");
    let status = env.pools().get("elastic").await.unwrap().status.unwrap();
    assert_eq!(status.warm_claims + status.cold_claims, 40, "{status:?}");
    env.wait_for_event("ScaledUp").await;
    // The claims over, the pool is back to its minimum (none) within idleTimeoutSeconds and
    // 10 s, not when the averaged claim rate has faded (minutes).
    let quiet = std::time::Instant::now();
    env.wait_for_pool("elastic", "back to no idle VM", |s| s.idle + s.booting == 0)
        .await;
    assert!(
        quiet.elapsed() <= Duration::from_secs(3 + 10),
        "back to its minimum after {:?}",
        quiet.elapsed()
    );
    env.wait_for_event("ScaledDown").await;
}

/// The controller runs a whole agent life as the chart's ServiceAccount, with RBAC enforced
/// as kube-apiserver does: leader election, the finalizer, a Secret and a ConfigMap read for
/// env, status and Events, host probing, deletion past ttlSecondsAfterFinished, a pool's idle
/// VM, its status and a claim on it, the web UI's view of an agent with its Events. Nothing is
/// refused, and every permission the chart grants
/// is used (but two, named below).
#[tokio::test]
async fn the_controller_needs_exactly_the_rbac_its_chart_grants() {
    let mut env = env().await;
    const TOKEN: &str = "far-agent-controller-token";
    env.api.enforce_rbac(
        TOKEN,
        &chart::user("far-system"),
        chart::grants("far-system"),
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(env.api.client(), "default");
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "creds"}, "data": {"token": "dDBr"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(env.api.client(), "default");
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "settings"}, "data": {"mode": "fast"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();

    let (tx, rx) = oneshot::channel::<()>();
    env.stop = Some(tx);
    tokio::spawn(far_agent_controller::run::run_leading(
        env.api.client_as(TOKEN),
        Config {
            defaults: Defaults::local(),
            channel_url: env.channel_url.clone(),
            grace_period_seconds: 5,
            call_timeout: Duration::from_secs(2),
            concurrency: far_agent_controller::reconcile::DEFAULT_CONCURRENCY,
            events: far_agent_controller::reconcile::EventPolicy::All,
            ui: env.ui.clone(),
        },
        env.channel.clone(),
        Reporter {
            controller: "far-agent-controller".into(),
            instance: Some("far-agent-controller-0".into()),
        },
        Arc::clone(&env.metrics),
        far_agent_controller::leader::Election {
            namespace: "far-system".into(),
            name: "far-agent-controller".into(),
            identity: "far-agent-controller-0".into(),
            duration: Duration::from_secs(5),
        },
        async {
            let _ = rx.await;
        },
    ));
    env.create(
        "ruled",
        json!({"args": ["--seconds", "0.3"], "ttlSecondsAfterFinished": 0, "env": [
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}}
        ]}),
    )
    .await;
    env.wait_gone("ruled").await;
    // A pool's idle VM, and a claim on it.
    env.create_pool("warm", json!({"minIdle": 1, "maxSize": 2}))
        .await;
    env.wait_for_pool("warm", "an idle VM", |s| s.idle == 1)
        .await;
    env.create(
        "claimer",
        json!({"poolRef": {"name": "warm"}, "args": ["--seconds", "0.3"], "ttlSecondsAfterFinished": 0}),
    )
    .await;
    // The web UI shows the agent, with its Events.
    let ui = env.serve_ui().await;
    let mut shown = serde_json::Value::Null;
    for _ in 0..100 {
        let answer = reqwest::get(format!("{ui}/ui/api/agents/default/claimer"))
            .await
            .unwrap();
        if answer.status().is_success() {
            shown = answer.json().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(shown["events"].is_array(), "{shown}");
    env.wait_for_pool("warm", "a warm claim", |s| s.warm_claims == 1)
        .await;
    // The host's status is written at its first probe; the Lease is renewed every 5/3 s.
    for _ in 0..200 {
        let renewed = env
            .api
            .requests()
            .contains_key(&("update".to_owned(), "leases".to_owned()));
        if renewed && env.api.objects("flintlockhosts")[0]["status"]["conditions"].is_array() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused: Vec<_> = env
        .api
        .requests()
        .into_iter()
        .filter(|((verb, _), _)| verb == "forbidden")
        .collect();
    assert!(refused.is_empty(), "refused by RBAC: {refused:?}");
    assert_eq!(
        env.api.unused_grants(),
        // A FarAgent is read only when no copy at hand can be trusted (a create with no write
        // of its own reconcile before it, as after a restart; an exit whose cached copy the
        // controller's writes replaced), which a healthy life never needs. kube's Event
        // recorder patches an Event when the same one repeats (its series count).
        ["get tiffany.dev/faragents", "patch events.k8s.io/events"],
        "the chart grants more than the controller uses"
    );
}

/// A host whose far-host runs another provider than its FlintlockHost says refuses the VM
/// (INVALID_ARGUMENT). The agent says so in status and in a Warning Event, and its attempt goes
/// to the other host; with no other host, it stays Pending/CreateRefused with the host's words
/// and asks again only after a while.
#[tokio::test]
async fn a_host_that_refuses_the_vm_is_named_and_another_host_takes_the_agent() {
    let mut env = env().await;
    // The refusing host has more memory free, so placement picks it first.
    let refusing: FlintlockHost = serde_json::from_value(json!({
        "apiVersion": "tiffany.dev/v1", "kind": "FlintlockHost", "metadata": {"name": "big-qemu"},
        "spec": {"endpoint": env.endpoint, "provider": "qemu", "capacity": {"cpu": 4, "memory": "16Gi"}, "vmLimits": {"minMemory": "64Mi", "maxMemory": "8Gi", "maxCpu": 4}}
    }))
    .unwrap();
    Api::<FlintlockHost>::all(env.api.client())
        .create(&PostParams::default(), &refusing)
        .await
        .unwrap();
    env.start_controller();
    env.wait_host_ready().await;
    env.create("moved", json!({"args": ["--seconds", "0.3"]}))
        .await;
    let agent = env
        .wait_for("moved", "Completed", |a| phase(a) == Some(Phase::Completed))
        .await;
    assert_eq!(agent.status.unwrap().host.as_deref(), Some("sim-1"));
    env.wait_for_event("CreateRefused").await;

    // Only the refusing host left: the agent waits, saying why.
    Api::<FlintlockHost>::all(env.api.client())
        .delete("sim-1", &DeleteParams::default())
        .await
        .unwrap();
    env.create("stuck", json!({"args": ["--seconds", "0.3"]}))
        .await;
    let agent = env
        .wait_for("stuck", "CreateRefused", |a| {
            a.status
                .as_ref()
                .is_some_and(|s| s.reason == Some(far_api::AgentReason::CreateRefused))
        })
        .await;
    let status = agent.status.unwrap();
    let message = status.message.unwrap_or_default();
    assert_eq!(status.phase, Some(Phase::Pending));
    assert_eq!(
        message,
        "0/1 hosts fit: big-qemu: refused the VM: INVALID_ARGUMENT: invalid microvm spec: provider \"qemu\" is not available: this host runs \"sim\""
    );
    assert_eq!(status.vm_uid, None);
    // Asked once, then left alone for a minute: not every 2 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = env.metrics.encode();
    assert!(
        metrics.contains(
            "far_controller_flintlock_rpc_duration_seconds_count{method=\"CreateMicroVM\",code=\"INVALID_ARGUMENT\"} 2"
        ),
        "one refusal per agent: {metrics}"
    );
}

/// A write the API server keeps refusing is told on the agent after three tries, then the agent
/// carries on once the writes go through.
#[tokio::test]
async fn a_write_refused_again_and_again_is_told_as_a_warning_event() {
    let mut env = env().await;
    env.start_controller();
    env.wait_host_ready().await;
    env.api.fail_next("patch", 500, 4);
    env.create("refused", json!({"args": ["--seconds", "0.3"]}))
        .await;
    env.wait_for_event("ReconcileFailed").await;
    env.wait_for("refused", "Completed", |a| {
        phase(a) == Some(Phase::Completed)
    })
    .await;
}

/// The web UI in a real browser (headless Chromium over WebDriver), used as a person would:
/// agents created through the API appear and change phase live, a filter narrows the table,
/// the keyboard reaches the rows and opens an agent whose conditions, Events and log (live)
/// show, a host going down turns within a probe interval, text is readable (4.5:1), 10,000
/// rows stay virtualised, and no secret value reaches the page or the UI's answers.
/// Screenshots go to `target/tmp/ui/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_shows_live_agent_state_in_a_real_browser() {
    use far_testkit::browser::{Browser, keys};
    const SECRET: &str = "sk-ui-7c1d90e3";
    let mut env = env().await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(env.api.client(), "default");
    let secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "llm"},
        "data": {"key": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, SECRET)}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    env.start_controller();
    env.wait_host_ready().await;
    let base = env.serve_ui().await;
    let shots = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui");
    let browser = Browser::start().await;
    browser.goto(&format!("{base}/ui/")).await;
    let within = Duration::from_secs(30);
    browser
        .wait_for(
            "the stream is live",
            "return document.getElementById('connection').textContent === 'live'",
            within,
        )
        .await;

    // Agents created through the API appear and change phase live.
    env.create(
        "ui-worker",
        json!({"args": ["--seconds", "6"], "env": [{"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "llm", "key": "key"}}}]}),
    )
    .await;
    env.create(
        "ui-failing",
        json!({"args": ["--seconds", "0.5", "--exit-code", "3"]}),
    )
    .await;
    let phase_is = |name: &str, phase: &str| {
        format!(
            "return document.querySelector('[data-key=\"default/{name}\"] .phase')?.textContent === '{phase}'"
        )
    };
    browser
        .wait_for(
            "ui-worker Running",
            &phase_is("ui-worker", "Running"),
            within,
        )
        .await;
    browser
        .wait_for(
            "ui-failing Failed",
            &phase_is("ui-failing", "Failed"),
            within,
        )
        .await;
    browser.screenshot(&shots.join("agents.png")).await;

    // A filter narrows the table.
    browser.type_into("#f-text", "failing").await;
    browser
        .wait_for(
            "one row left",
            "return document.querySelectorAll('#rows .row').length === 1 && document.getElementById('count').textContent === '1 of 2 agents'",
            within,
        )
        .await;
    browser
        .run(
            "const f = document.getElementById('f-text'); f.value = ''; f.dispatchEvent(new Event('input'));",
            vec![],
        )
        .await;

    // The keyboard: Tab from the top reaches the views, the filters and the rows, in order.
    // (A click on the heading puts the start of Tab navigation at the top of the page.)
    browser.click("h1").await;
    let mut reached = Vec::new();
    for _ in 0..20 {
        browser.press(keys::TAB).await;
        let id = browser
            .run(
                "return document.activeElement.id || document.activeElement.textContent",
                vec![],
            )
            .await;
        let id = id.as_str().unwrap_or_default().to_owned();
        let done = id == "viewport";
        reached.push(id);
        if done {
            break;
        }
    }
    let at = |id: &str| reached.iter().position(|r| r == id);
    assert!(
        at("tab-agents") < at("f-text")
            && at("f-text") < at("viewport")
            && at("tab-agents").is_some(),
        "Tab order: {reached:?}"
    );
    // Arrow keys move to ui-worker's row, Enter opens it.
    let index = browser
        .run(
            "return window.farUi.state.shown.findIndex((a) => a.name === 'ui-worker')",
            vec![],
        )
        .await
        .as_u64()
        .unwrap();
    for _ in 0..index {
        browser.press(keys::DOWN).await;
    }
    browser.press(keys::ENTER).await;
    browser
        .wait_for(
            "ui-worker's detail",
            "return document.getElementById('detail-title').textContent === 'default/ui-worker'",
            within,
        )
        .await;
    browser
        .wait_for(
            "its log, following",
            "return document.getElementById('detail-log').textContent.includes('sim: ')",
            within,
        )
        .await;
    browser
        .wait_for(
            "its conditions and Events",
            "return document.querySelectorAll('#detail-conditions tbody tr').length >= 3 && document.querySelectorAll('#detail-events li').length >= 1 && !document.getElementById('detail-events').textContent.startsWith('unavailable') && document.getElementById('detail-status').textContent.includes('MiB') && !document.getElementById('main').textContent.includes('undefined')",
            within,
        )
        .await;
    browser.screenshot(&shots.join("agent.png")).await;

    // No secret value in the page, or in anything the UI answers.
    let page = browser
        .run("return document.documentElement.outerHTML", vec![])
        .await;
    assert!(!page.to_string().contains(SECRET), "a secret on the page");
    let detail = reqwest::get(format!("{base}/ui/api/agents/default/ui-worker"))
        .await
        .unwrap();
    let csp = detail.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let detail = detail.text().await.unwrap();
    assert!(
        detail.contains("\"phase\"") && !detail.contains(SECRET),
        "{detail}"
    );
    let mut stream = reqwest::get(format!("{base}/ui/api/stream")).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let first = String::from_utf8_lossy(&first);
    assert!(
        first.contains("ui-worker") && !first.contains(SECRET),
        "{first}"
    );
    assert!(
        reqwest::Client::new()
            .post(format!("{base}/ui/api/agents/default/ui-worker"))
            .send()
            .await
            .unwrap()
            .status()
            .is_client_error(),
        "no route changes anything"
    );

    // Readable: every text the views show has 4.5:1 contrast or more against its background.
    browser.press(keys::ESCAPE).await;
    let contrast = r"
        const lum = (c) => { const [r, g, b] = c.match(/[\d.]+/g).slice(0, 3).map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; }); return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
        const bg = (e) => { for (; e; e = e.parentElement) { const c = getComputedStyle(e).backgroundColor; if (!c.startsWith('rgba(0, 0, 0, 0)') && c !== 'transparent') return c; } return 'rgb(255, 255, 255)'; };
        let worst = [99, ''];
        for (const e of document.querySelectorAll('h1, h2, nav button, #summary, #connection, label, #count, .row span, .phase, th, td, dt, dd, .state, p')) {
          if (!e.offsetParent || !e.textContent.trim()) continue;
          const [a, b] = [lum(getComputedStyle(e).color), lum(bg(e))];
          const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
          if (ratio < worst[0]) worst = [ratio, e.outerHTML.slice(0, 80)];
        }
        return worst;";
    let agents_view = browser.run(contrast, vec![]).await;
    assert!(
        agents_view[0].as_f64().unwrap() >= 4.5,
        "agents view: {agents_view}"
    );

    // A host going down turns within a probe interval.
    browser.click("#tab-hosts").await;
    browser
        .wait_for(
            "a ready host",
            "return document.querySelectorAll('.host.ready').length === 1",
            within,
        )
        .await;
    let hosts_view = browser.run(contrast, vec![]).await;
    assert!(
        hosts_view[0].as_f64().unwrap() >= 4.5,
        "hosts view: {hosts_view}"
    );
    env.kill_host().await;
    browser
        .wait_for(
            "the host shown down",
            "return document.querySelectorAll('.host.down').length === 1",
            within,
        )
        .await;
    browser.screenshot(&shots.join("hosts.png")).await;

    // 10,000 rows through the page's own snapshot handling: the table renders only what is in
    // view, and a filter applies quickly.
    browser.click("#tab-agents").await;
    let rows: Vec<_> = (0..10_000)
        .map(|i| {
            let phase = ["Pending", "Running", "Completed", "Failed"][i % 4];
            json!({"key": format!("bulk/agent-{i:05}"), "namespace": "bulk", "name": format!("agent-{i:05}"),
                   "phase": phase, "reason": "",
                   "host": format!("blade-{}", i % 40), "heartbeat": null, "exitCode": null,
                   "created": "2026-12-02T03:00:00Z"})
        })
        .collect();
    browser
        .run(
            "window.farUi.applySnapshot({now: new Date().toISOString(), leading: true, agents: arguments[0], hosts: [], pools: []});",
            vec![json!(rows)],
        )
        .await;
    browser
        .wait_for(
            "10,000 rows counted, few drawn",
            "return document.getElementById('count').textContent.startsWith('100') && document.querySelectorAll('#rows .row').length < 100",
            within,
        )
        .await;
    browser.type_into("#f-text", "agent-09999").await;
    browser
        .wait_for(
            "the filter applied",
            "return document.getElementById('count').textContent.startsWith('1 of 100')",
            within,
        )
        .await;
    let filter_ms = browser
        .run("return window.farUi.lastFilterMs", vec![])
        .await;
    println!("10,000 agents: a filter applied in {filter_ms} ms (headless Chromium)");
    assert!(filter_ms.as_f64().unwrap() < 100.0, "{filter_ms} ms");
    browser.close().await;
}
