//! What the controller keeps of each FarAgent between reconciles: a projection, not the whole
//! object.
//!
//! Every FarAgent of the cluster sits in the controller's cache for its whole life, and most of
//! the controller's scans (placement, host probes, pool claims, the UI, metrics) read a few
//! fields of each. The rest (the spec and the conditions) is read only by a reconcile or an
//! exit of that one agent, so it is kept as JSON, LZ4-compressed against a dictionary of what
//! every agent's JSON has in common ([`DICTIONARY`]), and decoded then. Measured on a running
//! agent of `far bench` in the controller's store: 3,565 bytes of heap as a decoded FarAgent,
//! 2,171 projected with that JSON as text, 1,488 with it compressed (`tests/memory.rs`).

use std::borrow::Cow;

use far_api::{BINDING_ANNOTATION, Binding, FarAgent, FarAgentSpec, FarAgentStatus};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::Resource;
use serde::{Deserialize, Serialize};

/// A FarAgent as the controller's cache holds it. Deserializes from a FarAgent (the watch's
/// objects), and is a FarAgent again with [`CachedAgent::agent`].
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "FarAgent")]
pub struct CachedAgent {
    /// The names, versions, finalizers and timestamps. Not kept: labels, owner references and
    /// annotations (the binding is [`CachedAgent::binding`]), the API server's `managedFields`:
    /// the controller never reads them, and every write it makes is a merge patch that leaves
    /// them as they are.
    pub metadata: ObjectMeta,
    /// The status, but for its conditions.
    pub status: Option<FarAgentStatus>,
    /// `spec.poolRef.name`.
    pub pool: Option<String>,
    /// `spec.heartbeat.timeoutSeconds`, for the heartbeat watch ([`crate::liveness`]).
    heartbeat_timeout_seconds: u32,
    /// The binding annotation, parsed, of whichever attempt.
    annotated_binding: Option<Binding>,
    /// [`Rest`] as JSON, compressed against [`DICTIONARY`], its length first.
    rest: Box<[u8]>,
}

/// What the JSON of a FarAgent's spec and conditions mostly consists of: the field names, in
/// the order they are written, and the words and messages the controller's conditions use.
/// The more of an agent's JSON is found here, the less of it its cache entry holds; a text not
/// found here is held as it is, so the dictionary only decides how well it compresses.
const DICTIONARY: &[u8] = concat!(
    r#"{"spec":{"image":"","memory":"512Mi","cpu":1,"entrypoint":"/usr/local/bin/tiffany","#,
    r#""args":["--"],"env":[{"name":"","value":""},{"name":"","valueFrom":{"secretKeyRef":"#,
    r#"{"name":"","key":""}}}],"secretFiles":[],"volumes":[],"hostSelector":{},"#,
    r#""poolRef":{"name":""},"restartPolicy":"Never","backoffLimit":3,"#,
    r#""heartbeat":{"intervalSeconds":10,"timeoutSeconds":60}},"conditions":["#,
    r#"{"lastTransitionTime":"2026-12-01T00:00:00Z","message":"VM of 512 MiB and 1 vCPU on host ","#,
    r#""observedGeneration":1,"reason":"Provisioning","status":"True","type":"Scheduled"},"#,
    r#"{"lastTransitionTime":"2026-12-01T00:00:00Z","message":"VM  created on host ","#,
    r#""observedGeneration":1,"reason":"Booting","status":"True","type":"VMCreated"},"#,
    r#"{"lastTransitionTime":"2026-12-01T00:00:00Z","message":"the agent's init reported in","#,
    r#""observedGeneration":1,"reason":"Running","status":"True","type":"AgentReady"},"#,
    r#"{"lastTransitionTime":"2026-12-01T00:00:00Z","message":"the agent exited with code 0","#,
    r#""observedGeneration":1,"reason":"Completed","status":"True","type":"Finished"}]}"#,
)
.as_bytes();

/// What only a reconcile of the agent reads.
#[derive(Serialize, Deserialize)]
struct Rest<S, C> {
    spec: S,
    conditions: C,
}

impl From<FarAgent> for CachedAgent {
    fn from(agent: FarAgent) -> Self {
        let FarAgent {
            mut metadata,
            spec,
            mut status,
        } = agent;
        let annotated_binding = metadata
            .annotations
            .take()
            .and_then(|a| Binding::from_annotation(a.get(BINDING_ANNOTATION)?));
        metadata.labels = None;
        metadata.owner_references = None;
        metadata.managed_fields = None;
        let conditions = status
            .as_mut()
            .map(|s| std::mem::take(&mut s.conditions))
            .unwrap_or_default();
        // Cannot fail (strings, numbers and string-keyed maps); were it to, decoding the empty
        // text fails the agent's reconciles, loudly, rather than deciding on a spec not read.
        let rest = serde_json::to_vec(&Rest {
            spec: &spec,
            conditions: &conditions,
        })
        .unwrap_or_default();
        let rest = lz4_flex::block::compress_prepend_size_with_dict(&rest, DICTIONARY);
        Self {
            metadata,
            status,
            pool: spec.pool_ref.map(|p| p.name),
            heartbeat_timeout_seconds: spec.heartbeat.timeout_seconds,
            annotated_binding,
            rest: rest.into_boxed_slice(),
        }
    }
}

impl CachedAgent {
    /// The FarAgent whole again: as the API server had it, less what [`CachedAgent::metadata`]
    /// does not keep (the binding annotation is written back).
    ///
    /// # Errors
    /// The kept spec and conditions do not decode (they always do: the controller encoded
    /// them).
    pub fn agent(&self) -> Result<FarAgent, serde_json::Error> {
        let rest = lz4_flex::block::decompress_size_prepended_with_dict(&self.rest, DICTIONARY)
            .map_err(serde::de::Error::custom)?;
        let Rest::<FarAgentSpec, Vec<Condition>> { spec, conditions } =
            serde_json::from_slice(&rest)?;
        let mut metadata = self.metadata.clone();
        if let Some(binding) = &self.annotated_binding {
            metadata.annotations = Some(
                [(BINDING_ANNOTATION.to_owned(), binding.to_annotation())]
                    .into_iter()
                    .collect(),
            );
        }
        let status = self
            .status
            .clone()
            .map(|s| FarAgentStatus { conditions, ..s });
        Ok(FarAgent {
            metadata,
            spec,
            status,
        })
    }

    /// The binding of the agent's current attempt ([`FarAgent::binding`]).
    pub fn binding(&self) -> Option<Binding> {
        self.annotated_binding
            .clone()?
            .of_current_attempt(self.status.as_ref())
    }

    /// Where the agent's current attempt is placed ([`FarAgent::placement`]).
    pub fn placement(&self) -> Option<Binding> {
        Binding::placement(self.status.as_ref(), self.annotated_binding.as_ref())
    }

    /// How long its guest may be silent (`spec.heartbeat.timeoutSeconds`).
    pub fn heartbeat_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.heartbeat_timeout_seconds.into())
    }

    /// How stale it lets `status.lastHeartbeatTime` get ([`crate::decision::heartbeat_refresh`]).
    pub fn heartbeat_refresh(&self) -> std::time::Duration {
        crate::decision::heartbeat_refresh(self.metadata.uid.as_deref().unwrap_or_default())
    }

    /// Whether the agent has finished (Completed or Failed).
    pub fn finished(&self) -> bool {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(far_api::Phase::is_terminal)
    }
}

/// A FarAgent's kind, group and version: the cache's watch, store and object references are
/// FarAgents'.
impl Resource for CachedAgent {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        FarAgent::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        FarAgent::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        FarAgent::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        FarAgent::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use far_api::VmSize;
    use serde_json::json;

    fn binding(attempt: u32) -> Binding {
        Binding {
            attempt,
            host: "blade-1".into(),
            vm: VmSize {
                vcpu: 1,
                memory_mib: 512,
            },
            claimed: Some("ns.warm.3.pool-uid".into()),
        }
    }

    fn agent(binding: Option<&str>, status: serde_json::Value) -> FarAgent {
        let mut annotations = json!({
            "kubectl.kubernetes.io/last-applied-configuration": "{...}", "note": "theirs"});
        if let Some(binding) = binding {
            annotations[BINDING_ANNOTATION] = binding.into();
        }
        serde_json::from_value(json!({
            "apiVersion": "tiffany.dev/v1", "kind": "FarAgent",
            "metadata": {"name": "a", "namespace": "n", "uid": "u", "resourceVersion": "7",
                "generation": 2, "creationTimestamp": "2026-12-02T09:00:00Z",
                "deletionTimestamp": "2026-12-02T09:01:00Z",
                "finalizers": ["tiffany.dev/vm-cleanup"], "labels": {"team": "x"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "c", "uid": "o"}],
                "annotations": annotations,
                "managedFields": [{"manager": "kubectl", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
            "spec": {"image": "busybox:1", "memory": "256Mi", "cpu": 1, "entrypoint": "/bin/a",
                "args": ["--x", "1"], "env": [{"name": "K", "value": "v"},
                    {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
                "hostSelector": {"zone": "a"}, "poolRef": {"name": "warm"},
                "heartbeat": {"intervalSeconds": 5, "timeoutSeconds": 30}},
            "status": status,
        }))
        .unwrap()
    }

    fn running() -> serde_json::Value {
        json!({"phase": "Running", "reason": "Running", "message": "the agent runs",
            "host": "blade-1", "vmUid": "vm1", "vm": {"vcpu": 1, "memoryMiB": 512},
            "restartCount": 0, "lastHeartbeatTime": "2026-12-02T09:00:30Z",
            "conditions": [
                {"type": "Scheduled", "status": "True", "reason": "Provisioning",
                 "message": "VM of 512 MiB and 1 vCPU on host blade-1", "observedGeneration": 2,
                 "lastTransitionTime": "2026-12-02T09:00:01Z"},
                {"type": "AgentReady", "status": "True", "reason": "Running",
                 "message": "the agent's init reported in", "observedGeneration": 2,
                 "lastTransitionTime": "2026-12-02T09:00:02Z"}]})
    }

    #[test]
    fn the_cache_gives_back_the_agent_less_what_the_controller_never_reads() {
        let annotation = binding(0).to_annotation();
        let original = agent(Some(&annotation), running());
        let cached = CachedAgent::from(original.clone());
        // What the watch decodes is the same projection.
        let decoded: CachedAgent =
            serde_json::from_value(serde_json::to_value(&original).unwrap()).unwrap();
        assert_eq!(format!("{decoded:?}"), format!("{cached:?}"));

        let mut expected = original;
        expected.metadata.labels = None;
        expected.metadata.owner_references = None;
        expected.metadata.managed_fields = None;
        expected.metadata.annotations = Some([(BINDING_ANNOTATION.to_owned(), annotation)].into());
        assert_eq!(
            serde_json::to_value(cached.agent().unwrap()).unwrap(),
            serde_json::to_value(expected).unwrap()
        );
        assert_eq!(cached.pool.as_deref(), Some("warm"));
        assert_eq!(cached.heartbeat_timeout().as_secs(), 30);
        assert!(
            cached.status.as_ref().unwrap().conditions.is_empty(),
            "kept in the rest"
        );

        // No binding, no status: none made up.
        let bare = CachedAgent::from(agent(None, serde_json::Value::Null));
        let whole = bare.agent().unwrap();
        assert_eq!(whole.metadata.annotations, None);
        assert_eq!(whole.status, None);
    }

    #[test]
    fn a_spec_unlike_the_dictionary_comes_back_whole() {
        let mut original = agent(None, running());
        original.spec.workload.args = vec!["ünïcödé ✓".into(), "x".repeat(100_000)];
        original.spec.workload.entrypoint = Some("/opt/other/agent".into());
        let cached = CachedAgent::from(original.clone());
        assert!(cached.rest.len() < 1_000, "{} bytes", cached.rest.len());
        assert_eq!(cached.agent().unwrap().spec, original.spec);
    }

    #[test]
    fn binding_and_placement_read_as_the_agents_own() {
        let unbound = json!({"restartCount": 1});
        let cases = [
            (Some(binding(0).to_annotation()), json!({})),
            (Some(binding(0).to_annotation()), running()),
            (Some(binding(0).to_annotation()), unbound.clone()),
            (Some(binding(1).to_annotation()), unbound),
            (Some("edited by hand".to_owned()), json!({})),
            (None, running()),
            (None, serde_json::Value::Null),
        ];
        for (annotation, status) in cases {
            let agent = agent(annotation.as_deref(), status);
            let cached = CachedAgent::from(agent.clone());
            assert_eq!(cached.binding(), agent.binding(), "{agent:?}");
            assert_eq!(cached.placement(), agent.placement(), "{agent:?}");
        }
    }

    #[test]
    fn finished_is_completed_or_failed() {
        for (phase, finished) in [
            (json!("Pending"), false),
            (json!("Running"), false),
            (json!("Completed"), true),
            (json!("Failed"), true),
        ] {
            let cached = CachedAgent::from(agent(None, json!({"phase": phase})));
            assert_eq!(cached.finished(), finished, "{phase}");
        }
        assert!(!CachedAgent::from(agent(None, serde_json::Value::Null)).finished());
    }
}
