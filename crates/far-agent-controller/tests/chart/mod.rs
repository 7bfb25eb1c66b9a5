//! The Helm chart's RBAC, read from the chart itself, for the tests that run the controller
//! under exactly what it grants.
#![allow(dead_code)]

use far_testkit::apiserver::Grant;
use serde_json::Value;

/// The ServiceAccount the chart binds, as the user the API server sees.
pub fn user(namespace: &str) -> String {
    format!("system:serviceaccount:{namespace}:far-agent-controller")
}

/// The chart's RBAC objects (ClusterRole, Role and their bindings) for a release in
/// `namespace`.
pub fn rbac_documents(namespace: &str) -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/helm/far-agent-controller/templates/rbac.yaml"
    );
    let text = std::fs::read_to_string(path)
        .unwrap()
        .replace("{{ .Release.Namespace }}", namespace);
    far_api::manifest::documents(&text).unwrap()
}

/// The rules those objects grant the controller's ServiceAccount (its ClusterRole, and the
/// leader-election Role in the release namespace).
pub fn grants(namespace: &str) -> Vec<Grant> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    rbac_documents(namespace)
        .iter()
        .filter(|doc| matches!(doc["kind"].as_str(), Some("ClusterRole" | "Role")))
        .flat_map(|role| {
            let scope = role["metadata"]["namespace"].as_str().map(str::to_owned);
            role["rules"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |rule| Grant {
                    namespace: scope.clone(),
                    groups: strings(&rule["apiGroups"]),
                    resources: strings(&rule["resources"]),
                    verbs: strings(&rule["verbs"]),
                })
        })
        .collect()
}
