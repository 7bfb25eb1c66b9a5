//! Every example manifest is admitted, and every invalid one is refused with its field named,
//! by the same schema and CEL rules the CRDs give the API server.

use std::path::{Path, PathBuf};

use far_api::manifest::{self, ManifestError, Object};
use far_api::{FarAgent, Phase, admission::Admission};
use serde_json::json;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_valid_example_is_admitted_without_warnings() {
    let files = yaml_files(&examples());
    assert!(files.len() >= 4, "examples missing: {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, doc) in manifest::documents(&text).unwrap().iter().enumerate() {
            let (_, warnings) = manifest::admit(i, doc)
                .unwrap_or_else(|e| panic!("{} refused: {e}", file.display()));
            assert!(warnings.is_empty(), "{}: {warnings:?}", file.display());
        }
    }
}

#[test]
fn every_invalid_example_is_refused_with_its_field_named() {
    let files = yaml_files(&examples().join("invalid"));
    assert!(
        files.len() >= 30,
        "want at least 30 invalid examples, have {}",
        files.len()
    );
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# refused: "))
            .unwrap_or_else(|| {
                panic!(
                    "{}: first line must be '# refused: FIELD: TEXT'",
                    file.display()
                )
            });
        let (field, fragment) = expect.split_once(": ").unwrap();
        let doc = &manifest::documents(&text).unwrap()[0];
        match manifest::admit(0, doc) {
            Err(ManifestError::Rejected(rejected)) => {
                assert!(
                    rejected
                        .causes
                        .iter()
                        .any(|c| c.field == field && c.message.contains(fragment)),
                    "{}: want {field}: ...{fragment}..., got {rejected}",
                    file.display()
                );
            }
            other => panic!("{}: want refusal at {field}, got {other:?}", file.display()),
        }
    }
}

#[test]
fn the_mission_example_gets_the_documented_defaults() {
    let text = std::fs::read_to_string(examples().join("embedder-worker-01.yaml")).unwrap();
    let doc = &manifest::documents(&text).unwrap()[0];
    let Object::FarAgent(agent) = manifest::admit(0, doc).unwrap().0 else {
        panic!("not a FarAgent")
    };
    assert_eq!(agent.spec.workload.args, ["--task", "embedder"]);
    assert_eq!(agent.spec.backoff_limit, 3);
    assert_eq!(agent.spec.heartbeat.interval_seconds, 10);
    assert_eq!(agent.spec.heartbeat.timeout_seconds, 60);
    assert!(agent.status.is_none());
}

#[test]
fn spec_changes_are_refused_after_creation_but_status_and_labels_are_not_spec() {
    let admission = Admission::for_crd(&far_api::crds()[0]).unwrap();
    let old = json!({
        "apiVersion": "tiffany.dev/v1", "kind": "FarAgent",
        "metadata": {"name": "a", "namespace": "ns"},
        "spec": {"image": "busybox:1", "memory": "512Mi", "cpu": 1, "entrypoint": "/bin/sh"}
    });
    let old = admission.admit(&old, None).unwrap().object;

    let mut resized = old.clone();
    resized["spec"]["cpu"] = json!(2);
    let err = admission.admit(&resized, Some(&old)).unwrap_err();
    assert_eq!(err.causes.len(), 1, "{err}");
    assert_eq!(err.causes[0].field, "spec");
    assert!(err.causes[0].message.contains("spec is immutable"), "{err}");

    let mut relabelled = old.clone();
    relabelled["metadata"]["labels"] = json!({"team": "research"});
    relabelled["status"] = json!({"phase": "Running"});
    let admitted = admission.admit(&relabelled, Some(&old)).unwrap();
    let agent: FarAgent = serde_json::from_value(admitted.object).unwrap();
    assert_eq!(agent.status.unwrap().phase, Some(Phase::Running));
}

#[test]
fn unknown_fields_are_pruned_with_a_warning_as_the_api_server_does() {
    let doc = json!({
        "apiVersion": "tiffany.dev/v1", "kind": "FarAgent",
        "metadata": {"name": "typo"},
        "spec": {"image": "busybox:1", "memory": "512Mi", "cpu": 1, "entryPoint": "/bin/sh"},
        "extra": true
    });
    let err = manifest::admit(0, &doc).unwrap_err();
    let ManifestError::Rejected(rejected) = err else {
        panic!("{err}")
    };
    assert_eq!(rejected.causes[0].field, "spec");
    assert!(
        rejected.causes[0]
            .message
            .contains("entrypoint is required unless poolRef"),
        "{rejected}"
    );

    let mut fixed = doc.clone();
    fixed["spec"]["entrypoint"] = json!("/bin/sh");
    let (_, warnings) = manifest::admit(0, &fixed).unwrap();
    assert_eq!(
        warnings,
        [
            r#"unknown field "extra""#,
            r#"unknown field "spec.entryPoint""#
        ]
    );
}

#[test]
fn rejection_reads_like_the_api_servers_422() {
    let doc = json!({
        "apiVersion": "tiffany.dev/v1", "kind": "FarAgent",
        "metadata": {"name": "bad1"},
        "spec": {"image": "busybox:1", "memory": "512Mi", "cpu": 0, "entrypoint": "/bin/sh"}
    });
    let ManifestError::Rejected(rejected) = manifest::admit(0, &doc).unwrap_err() else {
        panic!()
    };
    assert_eq!(
        rejected.to_string(),
        "FarAgent.tiffany.dev \"bad1\" is invalid: spec.cpu: Invalid value: 0: spec.cpu in body should be greater than or equal to 1"
    );
}

#[test]
fn other_kinds_are_refused_with_the_fix() {
    let doc = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
    let err = manifest::admit(2, &doc).unwrap_err();
    assert_eq!(
        err.to_string(),
        "document 2: apiVersion \"v1\", kind \"Pod\" is not a FAR resource: use apiVersion tiffany.dev/v1 with kind FarAgent, FarAgentPool or FlintlockHost"
    );
}
