//! The admission examples against a real API server, when one is given with
//! `FAR_TEST_KUBECONFIG=/path/to/kubeconfig` (skipped, saying so, otherwise): the CRDs are
//! applied, every valid example is admitted (a server-side dry run: nothing is stored) and
//! every invalid one is refused with its field named, exactly as the client-side admission in
//! `far_api::admission` refuses it.

use std::path::{Path, PathBuf};

use far_api::manifest;
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

async fn client() -> Option<Client> {
    let kubeconfig = far_testkit::cluster::kubeconfig("no real API server to test against")?;
    Some(far_testkit::cluster::client(&kubeconfig, None).await)
}

fn api_for(client: &Client, doc: &serde_json::Value, namespace: &str) -> Api<DynamicObject> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("tiffany.dev", "v1", kind));
    if kind != "FlintlockHost" {
        Api::namespaced_with(client.clone(), namespace, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    }
}

#[tokio::test]
async fn examples_are_admitted_and_refused_by_a_real_api_server_as_by_far() {
    let Some(client) = client().await else { return };
    far_testkit::cluster::apply_crds(&client).await;
    let namespace = format!("far-test-{}", ulid::Ulid::new().to_string().to_lowercase());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");

    let mut failures = Vec::new();
    for dir in [examples(), examples().join("invalid")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let expect = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("# refused: "))
                .map(|e| e.split_once(": ").unwrap());
            for doc in manifest::documents(&text).unwrap() {
                let mut doc = doc.clone();
                if doc["kind"] == "FlintlockHost" {
                    // Cluster-scoped: keep test runs apart.
                    doc["metadata"]["name"] =
                        format!("{}-{namespace}", doc["metadata"]["name"].as_str().unwrap()).into();
                } else if doc["metadata"].get("namespace").is_some() {
                    // Into the test's namespace: a real API server refuses a body naming
                    // another one (400) before admission is reached.
                    doc["metadata"]["namespace"] = namespace.clone().into();
                }
                let object: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
                // A server-side dry run: admitted or refused as a create, and nothing stored.
                // (Objects left behind outlive the namespace on a bare API server, which has
                // no namespace controller to empty it, and any controller tested there later
                // would run them.)
                let dry_run = PostParams {
                    dry_run: true,
                    ..PostParams::default()
                };
                let result = api_for(&client, &doc, &namespace)
                    .create(&dry_run, &object)
                    .await;
                match (expect, result) {
                    (None, Ok(_)) => {}
                    (Some((field, _)), Err(kube::Error::Api(s)))
                        if s.code == 422 && s.message.contains(field) => {}
                    (expect, result) => failures.push(format!(
                        "{}: want {expect:?}, got {result:?}",
                        path.display()
                    )),
                }
            }
        }
    }
    let _ = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
