//! The conformance script (`far_testkit::conformance`): the fake held to what a real
//! kube-apiserver answered, and, given a cluster, the recording made or checked against it.

use std::path::Path;

use far_testkit::apiserver::FakeApiServer;
use far_testkit::{cluster, conformance};
use serde_json::Value;

/// The variable that makes the real-server test (re)write the recording instead of checking it.
const RECORD_VAR: &str = "FAR_RECORD";

fn committed() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(conformance::RECORDING);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn assert_same(recorded: &Value, run: &conformance::Run) {
    let differences = conformance::differences(recorded, run);
    assert!(
        differences.is_empty(),
        "{} answered {} of {} steps differently from {} (- recorded, + now):\n\n{}",
        run.server,
        differences.len(),
        run.answers.len(),
        recorded["server"],
        differences.join("\n")
    );
}

#[tokio::test]
async fn the_fake_answers_the_recorded_script_as_kube_apiserver_did() {
    let server = FakeApiServer::start().await;
    let client = conformance::client_for_url(&server.url()).expect("a client for the fake");
    let run = conformance::run(&client).await.expect("the script runs");
    assert_same(&committed(), &run);
}

/// With `FAR_TEST_KUBECONFIG` and `FAR_RECORD=1`: records the script against that server.
/// With `FAR_TEST_KUBECONFIG` alone: checks that server still answers as recorded (drift of
/// the real server, or a script changed without recording it again).
#[tokio::test]
async fn a_real_api_server_answers_the_script_as_recorded() {
    let Some(kubeconfig) = cluster::kubeconfig(
        "the conformance script is recorded or checked against a real kube-apiserver",
    ) else {
        return;
    };
    let client = conformance::client_from_kubeconfig(&kubeconfig)
        .await
        .expect("a client from the kubeconfig");
    cluster::apply_crds(&client).await;
    let run = conformance::run(&client).await.expect("the script runs");
    if std::env::var(RECORD_VAR).as_deref() == Ok("1") {
        let path = conformance::recording_path(&run.server);
        let text = serde_json::to_string_pretty(&conformance::recording(&run))
            .expect("a recording serialises");
        std::fs::write(&path, format!("{text}\n"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        eprintln!(
            "recorded {} steps against {} in {}",
            run.answers.len(),
            run.server,
            path.display()
        );
        return;
    }
    assert_same(&committed(), &run);
}
