//! far-host beyond the shared conformance suite: restarts, failure injection, and the sim
//! guest talking to a real HTTP status channel.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{channel, run_config, spec};
use far_host::provider::sim::{Sim, SimConfig};
use far_host::{Host, HostConfig};
use flintlock_proto::MicroVmClient;
use flintlock_proto::errors::Failure;
use flintlock_proto::types::micro_vm_status::MicroVmState;
use flintlock_proto::v1alpha1::{CreateMicroVmRequest, GetMicroVmRequest, ListMicroVMsRequest};

fn state(vm: &flintlock_proto::types::MicroVm) -> MicroVmState {
    MicroVmState::try_from(vm.status.as_ref().unwrap().state).unwrap()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_vm_that_never_starts_ends_failed_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = HostConfig {
        retry_delay: Duration::from_millis(10),
        ..HostConfig::default()
    };
    let sim = Sim::new(SimConfig {
        fail_starts_containing: Some("broken".into()),
        ..SimConfig::default()
    });
    let host = Host::open(config, dir.path(), sim).await.unwrap();
    let uid = host
        .create(spec("broken-image", None))
        .await
        .unwrap()
        .spec
        .unwrap()
        .uid
        .unwrap();
    eventually("FAILED", || {
        state(&host.get(&uid).unwrap()) == MicroVmState::Failed
    })
    .await;
    let vm = host.get(&uid).unwrap();
    assert_eq!(vm.status.unwrap().retry, 3);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(format!("vms/{uid}.json"))).unwrap())
            .unwrap();
    assert_eq!(
        record["failure"],
        "sim: injected start failure for VM \"broken-image\""
    );
}

#[tokio::test]
async fn records_survive_a_restart_and_vms_are_adopted_not_duplicated() {
    let dir = tempfile::tempdir().unwrap();
    let config = HostConfig {
        retry_delay: Duration::from_millis(10),
        ..HostConfig::default()
    };
    let first = Host::open(config.clone(), dir.path(), Sim::new(SimConfig::default()))
        .await
        .unwrap();
    let a = first
        .create(spec("a", None))
        .await
        .unwrap()
        .spec
        .unwrap()
        .uid
        .unwrap();
    let b = first
        .create(spec("b", None))
        .await
        .unwrap()
        .spec
        .unwrap()
        .uid
        .unwrap();
    eventually("both CREATED", || {
        first
            .list("far", None)
            .iter()
            .all(|vm| state(vm) == MicroVmState::Created)
    })
    .await;
    let before = first.list("far", None);
    drop(first);

    let second = Host::open(config, dir.path(), Sim::new(SimConfig::default()))
        .await
        .unwrap();
    let after = second.list("far", None);
    assert_eq!(
        after, before,
        "same VMs, same uids, same versions and states"
    );
    assert_eq!(after.len(), 2);
    assert!(second.get(&a).is_ok() && second.get(&b).is_ok());
}

#[tokio::test]
async fn the_sim_guest_heartbeats_logs_and_reports_its_exit_code_over_http() {
    let (address, received) = channel().await;
    let dir = tempfile::tempdir().unwrap();
    let host = Host::open(
        HostConfig::default(),
        dir.path(),
        Sim::new(SimConfig::default()),
    )
    .await
    .unwrap();
    let config = run_config(
        address,
        &["--task", "sleep", "--seconds", "1.5", "--exit-code", "3"],
    );
    let uid = host
        .create(spec("sleeper", Some(&config)))
        .await
        .unwrap()
        .spec
        .unwrap()
        .uid
        .unwrap();

    eventually("the exit", || {
        received
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.ends_with("exit:3"))
    })
    .await;
    let log = received.0.lock().unwrap().clone();
    assert_eq!(log[0], "agent-uid enrol", "enrolment comes first");
    assert_eq!(log[1], "agent-uid heartbeat");
    assert_eq!(
        log[2],
        "agent-uid logs:sim: /usr/local/bin/tiffany --task sleep --seconds 1.5 --exit-code 3"
    );
    assert!(
        log.iter().filter(|e| e.ends_with("heartbeat")).count() >= 2,
        "heartbeats while running: {log:?}"
    );
    assert_eq!(log.last().unwrap(), "agent-uid exit:3");
    // Like upstream, the API still says CREATED after the guest stopped.
    assert_eq!(state(&host.get(&uid).unwrap()), MicroVmState::Created);
}

/// Runs the far-host binary, as an operator would.
struct Daemon {
    child: Child,
    endpoint: String,
}

impl Daemon {
    fn start(state: &std::path::Path, port: u16) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_far-host"))
            .args([
                "--provider",
                "sim",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--state-dir",
            ])
            .arg(state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn client(&self) -> MicroVmClient<tonic::transport::Channel> {
        for _ in 0..500 {
            if let Ok(client) = MicroVmClient::connect(self.endpoint.clone()).await {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("far-host did not come up at {}", self.endpoint);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn far_host_killed_with_sigkill_comes_back_with_every_vm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut daemon = Daemon::start(dir.path(), port);
    let mut client = daemon.client().await;
    let mut uids = Vec::new();
    for i in 0..5 {
        let request = CreateMicroVmRequest {
            microvm: Some(spec(&format!("vm{i}"), None)),
            metadata: Default::default(),
        };
        uids.push(
            client
                .create_micro_vm(request)
                .await
                .unwrap()
                .into_inner()
                .microvm
                .unwrap()
                .spec
                .unwrap()
                .uid
                .unwrap(),
        );
    }
    let list = |mut c: MicroVmClient<tonic::transport::Channel>| async move {
        let r = ListMicroVMsRequest {
            namespace: "far".into(),
            name: None,
        };
        let mut uids: Vec<String> = c
            .list_micro_v_ms(r)
            .await
            .unwrap()
            .into_inner()
            .microvm
            .into_iter()
            .map(|vm| vm.spec.unwrap().uid.unwrap())
            .collect();
        uids.sort();
        uids
    };
    daemon.child.kill().unwrap(); // SIGKILL: no chance to clean up
    daemon.child.wait().unwrap();
    drop(daemon);

    let daemon = Daemon::start(dir.path(), port);
    let client = daemon.client().await;
    let mut want = uids.clone();
    want.sort();
    assert_eq!(
        list(client.clone()).await,
        want,
        "every VM is back, none duplicated"
    );
    let mut c = client.clone();
    let err = c
        .get_micro_vm(GetMicroVmRequest {
            uid: "01NOPE".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(Failure::of(&err), Failure::NotFound);
}

/// far-host's Guests extension over real gRPC: a VM that could not start is listed with its
/// reason, one whose guest ended without a word as stopped; running VMs and other namespaces
/// are not listed; the token rule is the MicroVM service's.
#[tokio::test]
async fn list_ended_names_failed_and_stopped_vms_over_grpc() {
    use flintlock_proto::far_host::ListEndedRequest;
    use flintlock_proto::far_host::guests_client::GuestsClient;

    let dir = tempfile::tempdir().unwrap();
    let host = Host::open(
        HostConfig {
            retry_delay: Duration::from_millis(10),
            ..HostConfig::default()
        },
        dir.path(),
        Sim::new(SimConfig {
            boot_delay: Duration::from_millis(10),
            fail_starts_containing: Some("broken".into()),
        }),
    )
    .await
    .unwrap();
    let (address, _received) = channel().await;
    let create = |id: &str, args: &[&str]| {
        let spec = spec(id, Some(&run_config(address, args)));
        let host = std::sync::Arc::clone(&host);
        async move { host.create(spec).await.unwrap().spec.unwrap().uid.unwrap() }
    };
    let broken = create("broken", &[]).await;
    let crashed = create("crashed", &["--sim-crash", "--seconds", "0"]).await;
    let running = create("running", &["--sim-hang"]).await;

    let endpoint = far_host::serve_on_loopback(std::sync::Arc::clone(&host), Some("t0ken".into()))
        .await
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = flintlock_proto::auth::BasicToken::new("t0ken").unwrap();
    let mut client = GuestsClient::with_interceptor(channel.clone(), token);
    let ask = |namespace: &str| ListEndedRequest {
        namespace: namespace.into(),
    };
    let mut ended = Vec::new();
    for _ in 0..200 {
        ended = client
            .list_ended(ask("far"))
            .await
            .unwrap()
            .into_inner()
            .guests;
        if ended.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ended.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert_eq!(
        (ended[0].uid.as_str(), ended[0].id.as_str()),
        (broken.as_str(), "broken")
    );
    assert_eq!(
        ended[0].failure.as_deref(),
        Some("sim: injected start failure for VM \"broken\"")
    );
    assert_eq!(
        (ended[1].uid.as_str(), ended[1].stopped),
        (crashed.as_str(), true)
    );
    assert_eq!(ended[1].failure, None);
    assert!(ended.iter().all(|g| g.uid != running));
    assert!(
        client
            .list_ended(ask("elsewhere"))
            .await
            .unwrap()
            .into_inner()
            .guests
            .is_empty()
    );
    let refused = GuestsClient::new(channel)
        .list_ended(ask("far"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
}
