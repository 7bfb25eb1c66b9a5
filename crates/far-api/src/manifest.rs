//! Reading FAR objects from YAML manifests and admitting them as the API server would.

use std::sync::OnceLock;

use kube::Resource as _;
use serde_json::Value;

use crate::admission::{Admission, Admitted, Rejected, SchemaError};
use crate::{FarAgent, FarAgentPool, FlintlockHost};

/// An admitted FAR object.
#[derive(Debug, Clone)]
pub enum Object {
    /// A FarAgent.
    FarAgent(Box<FarAgent>),
    /// A FlintlockHost.
    FlintlockHost(Box<FlintlockHost>),
    /// A FarAgentPool.
    FarAgentPool(Box<FarAgentPool>),
}

/// Why a manifest could not be read or admitted.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The text is not YAML.
    #[error("not valid YAML: {0}")]
    Yaml(#[from] serde_saphyr::Error),
    /// A document is not one of FAR's kinds.
    #[error(
        "document {index}: apiVersion {api_version:?}, kind {kind:?} is not a FAR resource: use apiVersion tiffany.dev/v1 with kind FarAgent, FarAgentPool or FlintlockHost"
    )]
    UnknownKind {
        /// Position of the document in the stream, from 0.
        index: usize,
        /// The document's apiVersion.
        api_version: String,
        /// The document's kind.
        kind: String,
    },
    /// The object breaks the CRD's rules.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// The CRD's own schema could not be prepared (a bug in FAR).
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The admitted object does not decode into its Rust type (a bug in FAR).
    #[error("admitted object does not decode: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Splits a YAML stream into its non-empty documents.
///
/// # Errors
/// [`ManifestError::Yaml`] when the text is not YAML.
pub fn documents(yaml: &str) -> Result<Vec<Value>, ManifestError> {
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(yaml)?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The admission rules of our CRDs, in [`crate::crds`]'s order, prepared once per process.
fn admissions() -> Result<&'static [Admission; 3], ManifestError> {
    static RULES: OnceLock<Result<[Admission; 3], String>> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        let [agent, host, pool] = crate::crds();
        Ok([
            Admission::for_crd(&agent).map_err(|e| e.to_string())?,
            Admission::for_crd(&host).map_err(|e| e.to_string())?,
            Admission::for_crd(&pool).map_err(|e| e.to_string())?,
        ])
    });
    rules.as_ref().map_err(|e| {
        ManifestError::Schema(SchemaError::Missing(format!(
            "{e} (FAR's own CRD is broken)"
        )))
    })
}

/// The admission rules for a document's kind, if it is one of ours.
pub fn admission_for(
    api_version: &str,
    kind: &str,
) -> Result<Option<&'static Admission>, ManifestError> {
    let [agent, host, pool] = admissions()?;
    let ours = api_version == FarAgent::api_version(&());
    Ok(match kind {
        "FarAgent" if ours => Some(agent),
        "FlintlockHost" if ours => Some(host),
        "FarAgentPool" if ours => Some(pool),
        _ => None,
    })
}

/// Admits one document (`index` is its position, for messages) on create.
///
/// # Errors
/// [`ManifestError::UnknownKind`] for other kinds, [`ManifestError::Rejected`] naming each bad
/// field.
pub fn admit(index: usize, doc: &Value) -> Result<(Object, Vec<String>), ManifestError> {
    let field = |name| {
        doc.get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let admission = admission_for(&api_version, &kind)?.ok_or(ManifestError::UnknownKind {
        index,
        api_version,
        kind: kind.clone(),
    })?;
    let Admitted { object, warnings } = admission.admit(doc, None)?;
    let object = match kind.as_str() {
        "FarAgent" => Object::FarAgent(Box::new(serde_json::from_value(object)?)),
        "FarAgentPool" => Object::FarAgentPool(Box::new(serde_json::from_value(object)?)),
        _ => Object::FlintlockHost(Box::new(serde_json::from_value(object)?)),
    };
    Ok((object, warnings))
}
