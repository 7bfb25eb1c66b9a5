//! The controller's life-cycle scenarios (`scenario/`) against the in-repo fake API server,
//! which enforces the chart's RBAC. `scenarios.rs` runs them against a real cluster.

mod chart;
mod scenario;

use far_testkit::apiserver::FakeApiServer;
use scenario::{
    Cluster, Stage, a_vm_whose_controller_died_before_recording_it_is_adopted,
    one_vm_per_attempt_whatever_write_fails, scenarios,
};

#[tokio::test]
async fn the_scenarios_hold_against_the_fake_api_server() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::Fake(FakeApiServer::start().await);
    let stage = Stage::new(&cluster, dir.path(), None).await;
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
async fn one_vm_per_attempt_whatever_write_fails_on_the_fake_api_server() {
    let cluster = Cluster::Fake(FakeApiServer::start().await);
    one_vm_per_attempt_whatever_write_fails(&cluster).await;
}

#[tokio::test]
async fn a_vm_whose_controller_died_before_recording_it_is_adopted_on_the_fake_api_server() {
    let cluster = Cluster::Fake(FakeApiServer::start().await);
    a_vm_whose_controller_died_before_recording_it_is_adopted(&cluster).await;
}
