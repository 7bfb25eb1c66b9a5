//! The controller's life-cycle scenarios (`scenario/`) against a real cluster, when
//! `FAR_TEST_KUBECONFIG=/path/to/kubeconfig` names one (skipped, saying so, otherwise). The
//! same scenarios run on the fake API server in `scenarios_on_the_fake.rs`.

mod chart;
mod scenario;

use far_testkit::cluster;
use scenario::{
    Cluster, Stage, a_vm_whose_controller_died_before_recording_it_is_adopted,
    one_vm_per_attempt_whatever_write_fails, scenarios,
};

#[tokio::test]
async fn the_scenarios_hold_against_a_real_cluster() {
    let Some(kubeconfig) = cluster::kubeconfig("a disposable cluster without FAR's controller")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::Real(kubeconfig);
    let stage = Stage::new(&cluster, dir.path(), None).await;
    scenarios(&stage).await;
    stage.tear_down(&cluster).await;
}

#[tokio::test]
async fn one_vm_per_attempt_whatever_write_fails_on_a_real_cluster() {
    let Some(kubeconfig) = cluster::kubeconfig("a disposable cluster without FAR's controller")
    else {
        return;
    };
    one_vm_per_attempt_whatever_write_fails(&Cluster::Real(kubeconfig)).await;
}

#[tokio::test]
async fn a_vm_whose_controller_died_before_recording_it_is_adopted_on_a_real_cluster() {
    let Some(kubeconfig) = cluster::kubeconfig("a disposable cluster without FAR's controller")
    else {
        return;
    };
    a_vm_whose_controller_died_before_recording_it_is_adopted(&Cluster::Real(kubeconfig)).await;
}
