//! The `far` binary, run as a user runs it.

use std::path::Path;
use std::process::Command;

fn far(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_far"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .output()
        .unwrap()
}

/// The CRD YAML under deploy/ is generated: this fails when it drifts from the code.
#[test]
fn crd_output_matches_the_committed_deploy_crds() {
    let out = far(&["crd"]);
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.contains("name: faragents.tiffany.dev"));
    assert!(printed.contains("name: flintlockhosts.tiffany.dev"));
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds/tiffany.dev.yaml"),
    )
    .unwrap();
    assert!(
        printed == committed,
        "deploy/crds/tiffany.dev.yaml is stale: regenerate it with `cargo run -p far-cli -- crd > deploy/crds/tiffany.dev.yaml`"
    );
}

#[test]
fn validate_accepts_the_examples_and_refuses_a_bad_agent_naming_the_field() {
    let ok = far(&[
        "validate",
        "examples/embedder-worker-01.yaml",
        "examples/flintlockhost-local.yaml",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        String::from_utf8(ok.stdout).unwrap(),
        "examples/embedder-worker-01.yaml: FarAgent \"embedder-worker-01\" is valid\n\
         examples/flintlockhost-local.yaml: FlintlockHost \"local\" is valid\n"
    );

    let bad = far(&["validate", "examples/invalid/cpu-zero.yaml"]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(bad.stderr).unwrap(),
        "examples/invalid/cpu-zero.yaml: FarAgent.tiffany.dev \"cpu-zero\" is invalid: spec.cpu: Invalid value: 0: spec.cpu in body should be greater than or equal to 1\n"
    );
}

#[test]
fn validate_reports_a_missing_file_by_name() {
    let out = far(&["validate", "examples/nope.yaml"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("reading examples/nope.yaml")
    );
}

const SMALL_BENCH: &[&str] = &[
    "bench",
    "--agents",
    "20",
    "--hosts",
    "2",
    "--run-seconds",
    "0.2",
    "--baseline-patches",
    "50",
];

/// `far bench`'s JSON report, once it has run every agent to its exit code.
fn bench_report(out: std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&stdout[stdout.find('{').unwrap()..]).unwrap();
    assert_eq!(
        (
            json["finished"].as_u64(),
            json["lost"].as_u64(),
            json["wrong_exit_or_phase"].as_u64()
        ),
        (Some(20), Some(0), Some(0))
    );
    // The sim hosts' own count: one VM per agent, none left.
    assert_eq!(
        (
            json["vms_created"].as_u64(),
            json["duplicate_vms"].as_u64(),
            json["leaked_vms"].as_u64()
        ),
        (Some(20), Some(0), Some(0))
    );
    assert!(json["api_writes_refused"].is_object(), "{json}");
    // Measured, not derived: each guest timed its exit report's acknowledgement, and the watch
    // saw each agent's writes up to Running (the finalizer with the binding, the placement
    // with the VM, Running: at least these three).
    assert_eq!(
        json["exit_to_completed_seconds"]["count"].as_u64(),
        Some(20)
    );
    assert!(
        json["api_writes_per_agent_to_running"]
            .as_f64()
            .is_some_and(|w| w >= 3.0),
        "{json}"
    );
    json
}

/// The benchmark harness itself works: every agent finishes with its exit code. (Its figures
/// are for docs/benchmarks.md, not asserted.)
#[test]
fn bench_runs_every_agent_to_its_exit_code() {
    bench_report(far(SMALL_BENCH));
}

/// A run cut by --timeout-seconds says so, calls its unfinished agents under way rather than
/// lost, and deletes them before it ends: no VM is left behind.
#[test]
fn bench_that_gives_up_says_so_and_loses_nothing() {
    let out = far(&[
        "bench",
        "--agents",
        "4",
        "--hosts",
        "1",
        "--run-seconds",
        "60",
        "--timeout-seconds",
        "3",
        "--baseline-patches",
        "10",
    ]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("gave up after 3 s with 0 of 4 agents finished"),
        "{stderr}"
    );
    assert!(
        stderr.contains("gave up after 3 s; deleting the 4 agents left"),
        "{stderr}"
    );
    assert!(
        stdout.contains("4 unfinished when it gave up after 3 s"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&stdout[stdout.find('{').unwrap()..]).unwrap();
    assert_eq!(json["gave_up_after_seconds"], 3, "{json}");
    assert_eq!(
        (json["vms_created"].as_u64(), json["leaked_vms"].as_u64()),
        (Some(4), Some(0)),
        "{json}"
    );
}

/// `far bench --pool` fills a pool, then claims from it: every claim finishes with its exit
/// code, the claims are served by the pool's idle VMs, and once the agents and the pool are
/// deleted no VM is left. (Its latency figures are for docs/benchmarks.md, not asserted.)
#[test]
fn bench_pool_serves_claims_from_idle_vms_and_leaves_nothing() {
    let out = far(&[
        "bench",
        "--pool",
        "--agents",
        "20",
        "--hosts",
        "2",
        "--run-seconds",
        "0.2",
        "--rate",
        "20",
    ]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&stdout[stdout.find("{\n").unwrap()..]).unwrap();
    assert_eq!(
        (
            json["finished"].as_u64(),
            json["lost"].as_u64(),
            json["wrong_exit_or_phase"].as_u64(),
            json["duplicate_vms"].as_u64(),
            json["leaked_vms"].as_u64()
        ),
        (Some(20), Some(0), Some(0), Some(0), Some(0)),
        "{json}"
    );
    assert!(json["served_warm"].as_u64().unwrap() > 0, "{json}");
    assert_eq!(
        json["served_warm"].as_u64().unwrap() + json["served_cold"].as_u64().unwrap(),
        20
    );
    assert_eq!(json["claim_to_running_seconds"]["count"].as_u64(), Some(20));
    assert!(json["refill_seconds"].as_f64().is_some(), "{json}");
}

/// With `--kubeconfig` the benchmark runs against the API server it names, as against a real
/// cluster (here the fake, reached only through the kubeconfig): requests are read from that
/// server's `/metrics`, and the benchmark's hosts are removed afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn bench_runs_against_the_api_server_a_kubeconfig_names() {
    let api = far_testkit::apiserver::FakeApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let path = kubeconfig.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        let mut args = SMALL_BENCH.to_vec();
        args.extend(["--kubeconfig", &path]);
        far(&args)
    })
    .await
    .unwrap();
    let json = bench_report(out);
    let patches = json["api_requests_per_agent"]["patch faragents"]
        .as_f64()
        .unwrap_or_default();
    assert!(
        patches >= 5.0,
        "finalizer, placement, Running, exit and release, read from /metrics: {json}"
    );
    assert!(
        api.objects("flintlockhosts").is_empty(),
        "the benchmark's hosts are deleted"
    );
    assert_eq!(api.objects("namespaces").len(), 1, "far-bench was created");
}

#[test]
fn bench_names_an_unreadable_kubeconfig() {
    let out = far(&["bench", "--kubeconfig", "/nonexistent/kubeconfig"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("reading --kubeconfig /nonexistent/kubeconfig"),
        "{stderr}"
    );
}

/// `far host` is the far-host server: it serves Flintlock's API over a real socket, with the
/// same flags as the `far-host` binary, and a VM created through it is listed.
#[test]
fn far_host_serves_flintlocks_api() {
    use flintlock_proto::v1alpha1::{CreateMicroVmRequest, ListMicroVMsRequest};

    let state = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_far"))
        .args(["host", "--provider", "sim", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--state-dir")
        .arg(state.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let served = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut client = None;
        for _ in 0..100 {
            if let Ok(c) = flintlock_proto::MicroVmClient::connect(endpoint.clone()).await {
                client = Some(c);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let mut client = client.expect("far host listens within 10 s");
        let spec = flintlock_proto::types::MicroVmSpec {
            id: "vm-1".into(),
            kernel: Some(flintlock_proto::types::Kernel {
                image: "far.local/kernel:dev".into(),
                filename: Some("vmlinuz".into()),
                ..Default::default()
            }),
            root_volume: Some(flintlock_proto::types::Volume {
                id: "root".into(),
                source: Some(flintlock_proto::types::VolumeSource {
                    container_source: Some("far.local/tiffany:dev".into()),
                    virtiofs_source: None,
                }),
                ..Default::default()
            }),
            interfaces: vec![flintlock_proto::types::NetworkInterface {
                device_id: "eth0".into(),
                r#type: flintlock_proto::types::network_interface::IfaceType::Tap as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        client
            .create_micro_vm(CreateMicroVmRequest {
                microvm: Some(spec),
                metadata: Default::default(),
            })
            .await
            .unwrap();
        client
            .list_micro_v_ms(ListMicroVMsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .microvm
            .into_iter()
            .map(|vm| vm.spec.unwrap().id)
            .collect::<Vec<_>>()
    });
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(served, ["vm-1"]);
    assert_eq!(
        std::fs::read_dir(state.path().join("vms")).unwrap().count(),
        1,
        "the VM's record is in --state-dir"
    );
}
