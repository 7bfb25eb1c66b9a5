//! Admission as a kube-apiserver performs it for our CRDs, without an API server.
//!
//! The rules are declared once, in the CRDs (OpenAPI schema and CEL `x-kubernetes-validations`).
//! This module evaluates those same declarations: it prunes unknown fields (with a warning),
//! applies schema defaults, checks the structural schema, then runs the CEL rules with
//! `kube-cel`, in the order and with the field paths a real API server reports. `far run`, the
//! in-repo fake API server and the tests all admit objects through here, so a bad FarAgent is
//! refused the same way with or without a cluster.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::{CompiledSchema, Validator, apply_defaults, compile_schema};
use regex::Regex;
use serde_json::{Map, Value};

use crate::patterns;

/// One refused field, as the API server lists it in a 422's `details.causes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path, e.g. `spec.env[0].name`.
    pub field: String,
    /// The API server's cause reason: `FieldValueInvalid`, `FieldValueRequired`, ...
    pub reason: &'static str,
    /// What is wrong and, where the schema says, what is expected.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// An object refused at admission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Rejected {
    /// `Kind.group`, e.g. `FarAgent.tiffany.dev`.
    pub kind: String,
    /// The object's name (empty when it has none).
    pub name: String,
    /// Every refused field.
    pub causes: Vec<FieldError>,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?} is invalid: ", self.kind, self.name)?;
        match self.causes.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                let joined: Vec<String> = many.iter().map(ToString::to_string).collect();
                write!(f, "[{}]", joined.join(", "))
            }
        }
    }
}

/// An object that passed admission.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    /// The object as the API server would store it: unknown fields pruned, defaults applied.
    pub object: Value,
    /// `unknown field "spec.x"` for each pruned field, as the API server's Warning headers.
    pub warnings: Vec<String>,
}

/// The admission rules of one CRD.
pub struct Admission {
    kind: String,
    schema: Value,
    compiled: CompiledSchema,
    patterns: HashMap<String, Regex>,
    validator: Validator,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A CRD whose schema this module cannot use.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The CRD has no `openAPIV3Schema` for its first version.
    #[error("CRD {0} has no openAPIV3Schema")]
    Missing(String),
    /// A `pattern` in the schema is not a valid regular expression.
    #[error("CRD {crd}: pattern {pattern:?}: {source}")]
    Pattern {
        /// The CRD's name.
        crd: String,
        /// The offending pattern.
        pattern: String,
        /// Why it does not compile.
        #[source]
        source: regex::Error,
    },
    /// A CEL rule in the schema does not compile.
    #[error("CRD {crd}: CEL rule does not compile: {detail}")]
    Rule {
        /// The CRD's name.
        crd: String,
        /// The compiler's message.
        detail: String,
    },
}

impl Admission {
    /// Prepares the rules of a CRD: compiles its patterns and CEL rules once.
    ///
    /// # Errors
    /// [`SchemaError`] when the CRD has no schema, or a pattern or CEL rule in it does not
    /// compile (a CRD a real API server would also refuse or fail on).
    pub fn for_crd(crd: &CustomResourceDefinition) -> Result<Self, SchemaError> {
        let crd_name = crd.metadata.name.clone().unwrap_or_default();
        let version = crd.spec.versions.first();
        let schema = version
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .ok_or_else(|| SchemaError::Missing(crd_name.clone()))?;
        let schema =
            serde_json::to_value(schema).map_err(|_| SchemaError::Missing(crd_name.clone()))?;
        let mut texts = BTreeSet::new();
        collect_patterns(&schema, &mut texts);
        let mut compiled_patterns = HashMap::new();
        for pattern in texts {
            let regex = Regex::new(&pattern).map_err(|source| SchemaError::Pattern {
                crd: crd_name.clone(),
                pattern: pattern.clone(),
                source,
            })?;
            compiled_patterns.insert(pattern, regex);
        }
        let compiled = compile_schema(&schema);
        if let Some(first) = compiled.compilation_errors().into_iter().next() {
            return Err(SchemaError::Rule {
                crd: crd_name,
                detail: first.to_string(),
            });
        }
        Ok(Self {
            kind: format!("{}.{}", crd.spec.names.kind, crd.spec.group),
            schema,
            compiled,
            patterns: compiled_patterns,
            validator: Validator::new(),
        })
    }

    /// Admits an object on create (`old` = `None`) or update (`old` = the stored object).
    ///
    /// # Errors
    /// [`Rejected`] listing every refused field, the way a 422 from the API server does.
    pub fn admit(&self, object: &Value, old: Option<&Value>) -> Result<Admitted, Rejected> {
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let mut warnings = Vec::new();
        let pruned = prune(&self.schema, object, "", &mut warnings, true);
        let defaulted = apply_defaults(&self.schema, &pruned);

        let mut causes = Vec::new();
        if old.is_none() {
            check_name(&defaulted, &mut causes);
        }
        let mut checker = SchemaCheck {
            patterns: &self.patterns,
            causes: &mut causes,
            blocking: false,
        };
        checker.check(&self.schema, &defaulted, "");
        if checker.blocking {
            // As the API server does: CEL rules are not run over values of the wrong type.
            causes.push(FieldError {
                field: "<nil>".into(),
                reason: "FieldValueInvalid",
                message: "Invalid value: \"null\": some validation rules were not checked because the object was invalid; correct the existing errors to complete validation".into(),
            });
        } else if let Err(errors) =
            self.validator
                .validate_compiled(&self.compiled, &defaulted, old)
        {
            for e in errors.into_vec() {
                let at = if e.field_path.is_empty() {
                    "<root>".to_owned()
                } else {
                    e.field_path.clone()
                };
                let value = lookup(&defaulted, &e.field_path)
                    .map(type_name)
                    .unwrap_or("null");
                causes.push(FieldError {
                    field: at,
                    reason: "FieldValueInvalid",
                    message: format!("Invalid value: \"{value}\": {}", e.message),
                });
            }
        }
        if causes.is_empty() {
            Ok(Admitted {
                object: defaulted,
                warnings,
            })
        } else {
            Err(Rejected {
                kind: self.kind.clone(),
                name,
                causes,
            })
        }
    }
}

fn collect_patterns(schema: &Value, out: &mut BTreeSet<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::String(p)) = map.get("pattern") {
                out.insert(p.clone());
            }
            map.values().for_each(|v| collect_patterns(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_patterns(v, out)),
        _ => {}
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Drops fields the schema does not declare (and nulls it does not allow), recording a
/// warning for each unknown field, as the API server's pruning does.
fn prune(
    schema: &Value,
    value: &Value,
    path: &str,
    warnings: &mut Vec<String>,
    root: bool,
) -> Value {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return value.clone();
    }
    match value {
        Value::Object(fields) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let mut out = Map::new();
            for (key, v) in fields {
                let field_path = join(path, key);
                let sub = props.and_then(|p| p.get(key)).or(additional);
                let keep_as_is = root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata");
                match sub {
                    _ if keep_as_is => {
                        out.insert(key.clone(), v.clone());
                    }
                    Some(sub) if v.is_null() && sub.get("nullable") != Some(&Value::Bool(true)) => {
                    }
                    Some(sub) => {
                        out.insert(key.clone(), prune(sub, v, &field_path, warnings, false));
                    }
                    None => warnings.push(format!("unknown field {field_path:?}")),
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => match schema.get("items") {
            Some(item_schema) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| prune(item_schema, v, &format!("{path}[{i}]"), warnings, false))
                    .collect(),
            ),
            None => value.clone(),
        },
        _ => value.clone(),
    }
}

/// Checks the RFC 1123 name every object of ours needs.
fn check_name(object: &Value, causes: &mut Vec<FieldError>) {
    let name = object.pointer("/metadata/name").and_then(Value::as_str);
    let generate = object
        .pointer("/metadata/generateName")
        .and_then(Value::as_str);
    match (name, generate) {
        (None | Some(""), None | Some("")) => causes.push(FieldError {
            field: "metadata.name".into(),
            reason: "FieldValueRequired",
            message: "Required value: name or generateName is required".into(),
        }),
        (Some(name), _) if !name.is_empty() => {
            let ok = name.len() <= 253
                && Regex::new(patterns::DNS_SUBDOMAIN).is_ok_and(|r| r.is_match(name));
            if !ok {
                causes.push(FieldError {
                    field: "metadata.name".into(),
                    reason: "FieldValueInvalid",
                    message: format!(
                        "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com')"
                    ),
                });
            }
        }
        _ => {}
    }
}

struct SchemaCheck<'a> {
    patterns: &'a HashMap<String, Regex>,
    causes: &'a mut Vec<FieldError>,
    /// A type or required-field error: CEL rules are then skipped.
    blocking: bool,
}

impl SchemaCheck<'_> {
    fn invalid(&mut self, field: &str, message: String) {
        self.causes.push(FieldError {
            field: field.to_owned(),
            reason: "FieldValueInvalid",
            message,
        });
    }

    fn check(&mut self, schema: &Value, value: &Value, path: &str) {
        let display = if path.is_empty() { "<root>" } else { path };
        if value.is_null() {
            return; // Only nullable fields keep a null past pruning.
        }
        if let Some(expected) = schema.get("type").and_then(Value::as_str) {
            let int_or_string =
                schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
            if !matches_type(expected, value)
                && !(int_or_string && (value.is_string() || value.is_i64()))
            {
                self.blocking = true;
                self.causes.push(FieldError {
                    field: display.to_owned(),
                    reason: "FieldValueTypeInvalid",
                    message: format!(
                        "Invalid value: \"{}\": {display} in body must be of type {expected}: \"{}\"",
                        type_name(value),
                        type_name(value)
                    ),
                });
                return;
            }
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            let supported: Vec<String> = allowed.iter().map(Value::to_string).collect();
            self.causes.push(FieldError {
                field: display.to_owned(),
                reason: "FieldValueNotSupported",
                message: format!(
                    "Unsupported value: {value}: supported values: {}",
                    supported.join(", ")
                ),
            });
        }
        match value {
            Value::Object(fields) => self.check_object(schema, fields, path),
            Value::Array(items) => self.check_array(schema, items, path),
            Value::String(s) => self.check_string(schema, s, display),
            Value::Number(n) => self.check_number(schema, n, display),
            _ => {}
        }
    }

    fn check_object(&mut self, schema: &Value, fields: &Map<String, Value>, path: &str) {
        for required in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(key) = required.as_str()
                && fields.get(key).is_none_or(Value::is_null)
            {
                self.blocking = true;
                self.causes.push(FieldError {
                    field: join(path, key),
                    reason: "FieldValueRequired",
                    message: "Required value".into(),
                });
            }
        }
        if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
            && fields.len() as u64 > max
        {
            self.causes.push(FieldError {
                field: path.to_owned(),
                reason: "FieldValueTooMany",
                message: format!("Too many: {}: must have at most {max} items", fields.len()),
            });
        }
        let props = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties").filter(|a| a.is_object());
        for (key, v) in fields {
            if path.is_empty() && key == "metadata" {
                continue; // Checked by check_name, as the API server's ObjectMeta validation.
            }
            if let Some(sub) = props.and_then(|p| p.get(key)).or(additional) {
                self.check(sub, v, &join(path, key));
            }
        }
    }

    fn check_array(&mut self, schema: &Value, items: &[Value], path: &str) {
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && items.len() as u64 > max
        {
            self.causes.push(FieldError {
                field: path.to_owned(),
                reason: "FieldValueTooMany",
                message: format!("Too many: {}: must have at most {max} items", items.len()),
            });
        }
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
            && (items.len() as u64) < min
        {
            self.invalid(
                path,
                format!(
                    "Invalid value: {}: {path} in body should have at least {min} items",
                    items.len()
                ),
            );
        }
        match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("map") => {
                let keys: Vec<&str> = schema
                    .get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|k| k.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut seen = BTreeSet::new();
                for (i, item) in items.iter().enumerate() {
                    let key: Vec<String> = keys
                        .iter()
                        .map(|k| item.get(*k).map(Value::to_string).unwrap_or_default())
                        .collect();
                    if !seen.insert(key.clone()) {
                        let shown: Vec<String> = keys
                            .iter()
                            .zip(&key)
                            .map(|(k, v)| format!("\"{k}\":{v}"))
                            .collect();
                        self.causes.push(FieldError {
                            field: format!("{path}[{i}]"),
                            reason: "FieldValueDuplicate",
                            message: format!(
                                "Duplicate value: map[string]interface {{}}{{{}}}",
                                shown.join(", ")
                            ),
                        });
                    }
                }
            }
            Some("set") => {
                let mut seen = BTreeSet::new();
                for (i, item) in items.iter().enumerate() {
                    if !seen.insert(item.to_string()) {
                        self.causes.push(FieldError {
                            field: format!("{path}[{i}]"),
                            reason: "FieldValueDuplicate",
                            message: format!("Duplicate value: {item}"),
                        });
                    }
                }
            }
            _ => {}
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                self.check(item_schema, item, &format!("{path}[{i}]"));
            }
        }
    }

    fn check_string(&mut self, schema: &Value, s: &str, path: &str) {
        let chars = s.chars().count() as u64;
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && chars > max
        {
            self.causes.push(FieldError {
                field: path.to_owned(),
                reason: "FieldValueTooLong",
                message: format!("Too long: may not be longer than {max}"),
            });
        }
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && chars < min
        {
            self.invalid(
                path,
                format!("Invalid value: {s:?}: {path} in body should be at least {min} chars long"),
            );
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
            && self.patterns.get(pattern).is_some_and(|r| !r.is_match(s))
        {
            self.invalid(
                path,
                format!("Invalid value: {s:?}: {path} in body should match '{pattern}'"),
            );
        }
    }

    fn check_number(&mut self, schema: &Value, n: &serde_json::Number, path: &str) {
        let Some(x) = n.as_f64() else { return };
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && x < min
        {
            self.invalid(
                path,
                format!(
                    "Invalid value: {n}: {path} in body should be greater than or equal to {min}"
                ),
            );
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && x > max
        {
            self.invalid(
                path,
                format!("Invalid value: {n}: {path} in body should be less than or equal to {max}"),
            );
        }
    }
}

fn matches_type(expected: &str, value: &Value) -> bool {
    match expected {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Finds the value at a kube-cel field path such as `spec.env[0]`.
fn lookup<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    let mut current = value;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indices) = part
            .split_once('[')
            .map_or((part, ""), |(k, rest)| (k, rest));
        if !key.is_empty() {
            current = current.get(key)?;
        }
        for index in indices.split('[').filter(|s| !s.is_empty()) {
            current = current.get(index.trim_end_matches(']').parse::<usize>().ok()?)?;
        }
    }
    Some(current)
}
