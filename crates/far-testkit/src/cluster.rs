//! A real cluster, for the tests that can also run against one: named by the kubeconfig in
//! `FAR_TEST_KUBECONFIG`, and skipped, saying so, without it.

use std::path::{Path, PathBuf};

/// The variable naming a real cluster's kubeconfig.
pub const KUBECONFIG_VAR: &str = "FAR_TEST_KUBECONFIG";

/// The kubeconfig `FAR_TEST_KUBECONFIG` names; without one, says the test is skipped and
/// `why` a cluster would be needed, and answers `None`.
pub fn kubeconfig(why: &str) -> Option<PathBuf> {
    let path = std::env::var_os(KUBECONFIG_VAR).map(PathBuf::from);
    if path.is_none() {
        eprintln!("skipped: {KUBECONFIG_VAR} is not set ({why})");
    }
    path
}

/// A client as `kubectl` makes it from this kubeconfig, impersonating `user` when given.
///
/// # Panics
/// When the kubeconfig cannot be read or used: the test cannot run.
pub async fn client(kubeconfig: &Path, impersonate: Option<String>) -> kube::Client {
    far_tls::install();
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kubeconfig.display()));
    let mut config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("using {}: {e}", kubeconfig.display()));
    config.auth_info.impersonate = impersonate;
    kube::Client::try_from(config).expect("a client from the kubeconfig")
}

/// Applies FAR's CRDs (server-side apply) and waits the moment a fresh CRD takes to be served.
///
/// # Panics
/// When the API server refuses a CRD: the test cannot run.
pub async fn apply_crds(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in far_api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(
            &name,
            &PatchParams::apply("far-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("applying the CRD {name}: {e}"));
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
}
