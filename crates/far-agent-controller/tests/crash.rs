//! Crash safety: the controller (and the status channel living in its process) killed at random
//! moments while agents are created, run and finish on a sim far-host. At the end every agent is
//! in its right terminal phase with its right exit code, no VM was started twice for the same
//! name, and none is left behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use far_agent_controller::reconcile::Config;
use far_api::{FarAgent, FlintlockHost, Phase};
use far_channel::{Channel, TokenKey};
use far_host::provider::sim::{Sim, SimConfig};
use far_host::provider::{Provider, ProviderError, Started};
use far_host::record::VmRecord;
use far_host::{Host, HostConfig};
use far_testkit::apiserver::FakeApiServer;
use far_vmspec::Defaults;
use flintlock_proto::types::MicroVmSpec;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::events::Reporter;
use serde_json::json;

/// The sim provider, counting how often each VM name is started.
struct Counting {
    sim: Sim,
    starts: Arc<Mutex<HashMap<String, u32>>>,
}

impl Provider for Counting {
    fn name(&self) -> &'static str {
        "sim"
    }
    async fn start(&self, record: &VmRecord, spec: &MicroVmSpec) -> Result<Started, ProviderError> {
        *self
            .starts
            .lock()
            .unwrap()
            .entry(spec.id.clone())
            .or_default() += 1;
        self.sim.start(record, spec).await
    }
    async fn stop(&self, record: &VmRecord) -> Result<(), ProviderError> {
        self.sim.stop(record).await
    }
    async fn adopt(&self, record: &VmRecord, spec: &MicroVmSpec) -> bool {
        self.sim.adopt(record, spec).await
    }
    fn has_exited(&self, record: &VmRecord) -> bool {
        self.sim.has_exited(record)
    }
}

/// A controller and its status channel, as one process: both go down together.
async fn controller(
    api: &FakeApiServer,
    channel_port: u16,
) -> (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>) {
    let channel = Channel::new(far_channel::Config::new(
        TokenKey::new(vec![3; 32]).unwrap(),
    ));
    let listener = loop {
        match tokio::net::TcpListener::bind(("127.0.0.1", channel_port)).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let router = channel.router();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let config = Config {
        defaults: Defaults::local(),
        channel_url: format!("http://127.0.0.1:{channel_port}"),
        grace_period_seconds: 5,
        call_timeout: Duration::from_secs(2),
    };
    let reporter = Reporter {
        controller: "far-agent-controller".into(),
        instance: Some("crashy".into()),
    };
    let run = tokio::spawn(far_agent_controller::run::run(
        api.client(),
        config,
        channel,
        reporter,
        Arc::default(),
        std::future::pending(),
    ));
    (run, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_controller_at_random_moments_loses_and_duplicates_nothing() {
    const AGENTS: usize = 60;
    const KILLS: usize = 10;
    let api = FakeApiServer::start().await;
    let state = tempfile::tempdir().unwrap();
    let starts = Arc::new(Mutex::new(HashMap::new()));
    let provider = Counting {
        sim: Sim::new(SimConfig {
            boot_delay: Duration::from_millis(50),
            ..SimConfig::default()
        }),
        starts: Arc::clone(&starts),
    };
    let host = Host::open(HostConfig::default(), state.path(), provider)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(far_host::routes(Arc::clone(&host), None))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let hosts: Api<FlintlockHost> = Api::all(api.client());
    let object: FlintlockHost = serde_json::from_value(json!({
        "apiVersion": "tiffany.dev/v1", "kind": "FlintlockHost", "metadata": {"name": "sim-1"},
        "spec": {"endpoint": endpoint, "provider": "sim", "capacity": {"cpu": 1000, "memory": "1000Gi"}, "vmLimits": {"minMemory": "64Mi", "maxMemory": "8Gi", "maxCpu": 4}}
    }))
    .unwrap();
    hosts.create(&PostParams::default(), &object).await.unwrap();
    let channel_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    let agents: Api<FarAgent> = Api::namespaced(api.client(), "default");
    let mut running = controller(&api, channel_port).await;
    // Agents arrive while the controller is killed and restarted, every 300-900 ms.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for kill in 0..KILLS {
        for i in (kill * AGENTS / KILLS)..((kill + 1) * AGENTS / KILLS) {
            let code = if i % 4 == 3 { 3 } else { 0 };
            let agent: FarAgent = serde_json::from_value(json!({
                "apiVersion": "tiffany.dev/v1", "kind": "FarAgent", "metadata": {"name": format!("a{i:03}")},
                "spec": {"image": "busybox:1", "memory": "64Mi", "cpu": 1, "entrypoint": "/bin/agent",
                         "args": ["--seconds", "0.5", "--exit-code", code.to_string()],
                         "heartbeat": {"intervalSeconds": 1, "timeoutSeconds": 30}}
            }))
            .unwrap();
            agents.create(&PostParams::default(), &agent).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300 + next() % 600)).await;
        running.0.abort();
        running.1.abort();
        let _ = running.0.await;
        let _ = running.1.await;
        running = controller(&api, channel_port).await;
    }

    let mut done = Vec::new();
    for _ in 0..600 {
        done = agents.list(&Default::default()).await.unwrap().items;
        if done.iter().all(|a| {
            a.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(Phase::is_terminal)
        }) && host.list("far", None).is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.0.abort();
    running.1.abort();
    assert_eq!(done.len(), AGENTS);
    for agent in &done {
        let status = agent.status.clone().unwrap_or_default();
        let i: usize = agent.metadata.name.as_ref().unwrap()[1..].parse().unwrap();
        let (want_phase, want_code) = if i % 4 == 3 {
            (Phase::Failed, 3)
        } else {
            (Phase::Completed, 0)
        };
        assert_eq!(
            (status.phase, status.exit_code),
            (Some(want_phase), Some(want_code)),
            "{}: {status:?}",
            agent.metadata.name.as_ref().unwrap()
        );
    }
    let twice: Vec<_> = starts
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| format!("{id} x{n}"))
        .collect();
    assert!(twice.is_empty(), "VMs started twice: {twice:?}");
    assert_eq!(starts.lock().unwrap().len(), AGENTS, "one VM per agent");
    assert!(host.list("far", None).is_empty(), "no VM left behind");
}
