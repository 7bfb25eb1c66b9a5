//! `metadata.managedFields` as kube-apiserver keeps it on every write (see
//! `../shared/kube-apiserver-semantics.md`): one entry per manager, operation and subresource,
//! whose `fieldsV1` names the fields that manager set. Best-effort, as the real bookkeeping is:
//! the fake keeps them so objects are as large as a real API server's (a controller's cache
//! holds them unless it drops them), not to resolve apply conflicts.

use axum::http::{HeaderMap, header};
use serde_json::{Map, Value, json};

/// Metadata the API server sets itself: never in a manager's fields.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "managedFields",
];

/// Who wrote: `?fieldManager=`, else the User-Agent up to its first `/` (`kube-rs/1.0` ->
/// `kube-rs`), else `unknown`.
pub fn manager(field_manager: Option<&str>, headers: &HeaderMap) -> String {
    if let Some(m) = field_manager.filter(|m| !m.is_empty()) {
        return m.to_owned();
    }
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|m| !m.is_empty())
        .unwrap_or("unknown")
        .to_owned()
}

/// Who wrote, and how.
pub struct Writer {
    /// The field manager ([`manager`]).
    pub manager: String,
    /// `Update` (POST, PUT, merge and JSON patches) or `Apply` (server-side apply).
    pub operation: &'static str,
}

/// Where a write landed: the object's apiVersion, the subresource written (`status`, or none
/// for the object itself), and when (seconds precision).
pub struct Landing<'a> {
    /// The object's apiVersion.
    pub api_version: &'a str,
    /// `status` for writes through `/status`.
    pub subresource: Option<&'a str>,
    /// The write's time.
    pub time: &'a str,
}

/// Records a write in `next` (the object about to be stored; `old` before it, `None` on
/// create): the fields it changed join the fields its writer already held.
pub fn record(old: Option<&Value>, next: &mut Value, writer: &Writer, at: &Landing) {
    let touched = match old {
        None => fields_of(next, at.subresource),
        Some(old) => changed(
            &without_server_fields(old, at.subresource),
            &without_server_fields(next, at.subresource),
        )
        .unwrap_or_else(|| json!({})),
    };
    let mut entries: Vec<Value> = old
        .and_then(|o| o.pointer("/metadata/managedFields"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let same = |e: &Value| {
        e["manager"] == writer.manager.as_str()
            && e["operation"] == writer.operation
            && e.get("subresource").and_then(Value::as_str) == at.subresource
    };
    let mut fields = entries
        .iter()
        .find(|e| same(e))
        .map_or_else(|| json!({}), |e| e["fieldsV1"].clone());
    union(&mut fields, &touched);
    entries.retain(|e| !same(e));
    let mut entry = json!({
        "manager": writer.manager,
        "operation": writer.operation,
        "apiVersion": at.api_version,
        "time": at.time,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    });
    if let Some(sub) = at.subresource {
        entry["subresource"] = json!(sub);
    }
    entries.push(entry);
    next["metadata"]["managedFields"] = Value::Array(entries);
}

/// The part of an object a write through `subresource` can set.
fn without_server_fields(object: &Value, subresource: Option<&str>) -> Value {
    let mut out = Map::new();
    for (k, v) in object.as_object().into_iter().flatten() {
        match (k.as_str(), subresource) {
            ("status", Some("status")) => {
                out.insert(k.clone(), v.clone());
            }
            (_, Some("status")) | ("apiVersion" | "kind" | "status", None) => {}
            ("metadata", None) => {
                let mut meta = v.as_object().cloned().unwrap_or_default();
                meta.retain(|k, _| !SERVER_METADATA.contains(&k.as_str()));
                if !meta.is_empty() {
                    out.insert(k.clone(), Value::Object(meta));
                }
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(out)
}

fn fields_of(object: &Value, subresource: Option<&str>) -> Value {
    let mut top = fields(&without_server_fields(object, subresource));
    // The top level and metadata always exist: no "." entries for them.
    if let Some(map) = top.as_object_mut() {
        map.remove(".");
        if let Some(meta) = map.get_mut("f:metadata").and_then(Value::as_object_mut) {
            meta.remove(".");
        }
    }
    top
}

/// The fieldsV1 set of a value: `f:<name>` per field, `k:{"type":"X"}` per item of a list keyed
/// by `type` or `name` (conditions, env), `.` for the container itself.
fn fields(value: &Value) -> Value {
    let mut out = Map::new();
    match value {
        Value::Object(map) => {
            out.insert(".".into(), json!({}));
            for (k, v) in map {
                out.insert(format!("f:{k}"), fields(v));
            }
        }
        Value::Array(items) => {
            out.insert(".".into(), json!({}));
            for item in items {
                let key = ["type", "name"]
                    .iter()
                    .find_map(|k| item.get(*k).map(|v| json!({*k: v})));
                if let Some(key) = key {
                    out.insert(format!("k:{key}"), fields(item));
                }
            }
        }
        _ => {}
    }
    Value::Object(out)
}

/// The fields of `new` whose values differ from `old`'s, or `None` when nothing differs.
fn changed(old: &Value, new: &Value) -> Option<Value> {
    if old == new {
        return None;
    }
    let (Value::Object(old_map), Value::Object(new_map)) = (old, new) else {
        return Some(fields(new));
    };
    let mut out = Map::new();
    for (k, v) in new_map {
        let diff = match old_map.get(k) {
            Some(was) => changed(was, v),
            None => Some(fields(v)),
        };
        if let Some(diff) = diff {
            out.insert(format!("f:{k}"), diff);
        }
    }
    Some(Value::Object(out))
}

fn union(into: &mut Value, from: &Value) {
    let (Value::Object(into), Value::Object(from)) = (into, from) else {
        return;
    };
    for (k, v) in from {
        union(into.entry(k.clone()).or_insert_with(|| json!({})), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(manager: &str) -> Writer {
        Writer {
            manager: manager.to_owned(),
            operation: "Update",
        }
    }

    fn at(subresource: Option<&str>) -> Landing<'_> {
        Landing {
            api_version: "example.far.test/v1",
            subresource,
            time: "2026-11-27T17:24:14Z",
        }
    }

    #[test]
    fn a_create_records_its_fields_as_the_api_server_does() {
        let mut object = json!({"apiVersion": "example.far.test/v1", "kind": "Widget",
            "metadata": {"name": "w1", "namespace": "ns1", "uid": "u", "labels": {"app": "a", "tier": "x"}},
            "spec": {"size": 3}});
        record(None, &mut object, &writer("curl"), &at(None));
        assert_eq!(
            object["metadata"]["managedFields"],
            json!([{"apiVersion": "example.far.test/v1", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}, "f:tier": {}}}, "f:spec": {".": {}, "f:size": {}}},
                "manager": "curl", "operation": "Update", "time": "2026-11-27T17:24:14Z"}])
        );
    }

    #[test]
    fn a_status_write_gets_its_own_entry_naming_what_it_changed() {
        let mut old =
            json!({"metadata": {"name": "a"}, "spec": {"size": 3}, "status": {"phase": "Pending"}});
        record(None, &mut old, &writer("kubectl"), &at(None));
        let mut next = old.clone();
        next["status"] =
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
        record(
            Some(&old),
            &mut next,
            &writer("far-agent-controller"),
            &at(Some("status")),
        );
        let entries = next["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1]["subresource"], "status");
        assert_eq!(
            entries[1]["fieldsV1"],
            json!({"f:status": {"f:phase": {}, "f:conditions": {".": {}, "k:{\"type\":\"Ready\"}": {".": {}, "f:type": {}, "f:status": {}}}}})
        );

        // The same manager again: one entry, its fields joined.
        let mut later = next.clone();
        later["status"]["exitCode"] = json!(0);
        record(
            Some(&next),
            &mut later,
            &writer("far-agent-controller"),
            &at(Some("status")),
        );
        let entries = later["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        assert!(
            entries[1]["fieldsV1"]["f:status"]
                .get("f:exitCode")
                .is_some()
        );
        assert!(entries[1]["fieldsV1"]["f:status"].get("f:phase").is_some());
    }

    #[test]
    fn the_manager_comes_from_the_request() {
        let mut headers = HeaderMap::new();
        assert_eq!(manager(None, &headers), "unknown");
        headers.insert(
            header::USER_AGENT,
            "kube-rs/0.99.0 (linux)".parse().unwrap(),
        );
        assert_eq!(manager(None, &headers), "kube-rs");
        assert_eq!(manager(Some("far"), &headers), "far");
    }
}
