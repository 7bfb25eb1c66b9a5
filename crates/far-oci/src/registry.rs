//! Talking to OCI registries: which registry serves a reference (mirrors), over which scheme,
//! and what a registry's failure means.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::{Client, Reference};

use crate::OciError;

/// How far-host reaches registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Registry host -> the registry that serves it instead (`ghcr.io` -> `127.0.0.1:5000`).
    /// The repository path and tag are kept.
    pub mirrors: BTreeMap<String, String>,
    /// Use plain HTTP for registries on a loopback address (`localhost`, `127.0.0.0/8`, `::1`).
    /// Everything else is always HTTPS.
    pub plain_http_loopback: bool,
    /// Bound on connecting and on each read; `None` is 30 seconds.
    pub timeout: Option<Duration>,
}

/// One client per registry, each with its scheme.
pub(crate) struct Registries {
    config: RegistryConfig,
    clients: Mutex<HashMap<String, Client>>,
}

impl Registries {
    pub(crate) fn new(config: RegistryConfig) -> Self {
        far_tls::install();
        Self {
            config,
            clients: Mutex::default(),
        }
    }

    /// Parses `reference` and points it at the registry that serves it.
    pub(crate) fn locate(&self, reference: &str) -> Result<Reference, OciError> {
        let parsed: Reference = reference.parse().map_err(|e| OciError::BadReference {
            reference: reference.to_owned(),
            reason: format!("{e}"),
        })?;
        let Some(mirror) = self.config.mirrors.get(parsed.registry()) else {
            return Ok(parsed);
        };
        let repository = parsed.repository().to_owned();
        Ok(match (parsed.tag(), parsed.digest()) {
            (Some(tag), Some(digest)) => Reference::with_tag_and_digest(
                mirror.clone(),
                repository,
                tag.to_owned(),
                digest.to_owned(),
            ),
            (_, Some(digest)) => {
                Reference::with_digest(mirror.clone(), repository, digest.to_owned())
            }
            (tag, None) => Reference::with_tag(
                mirror.clone(),
                repository,
                tag.unwrap_or("latest").to_owned(),
            ),
        })
    }

    /// The client for the registry serving `reference`.
    pub(crate) fn client(&self, reference: &Reference) -> Client {
        let registry = reference.resolve_registry().to_owned();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(registry.clone())
            .or_insert_with(|| {
                let timeout = self.config.timeout.unwrap_or(Duration::from_secs(30));
                Client::new(ClientConfig {
                    protocol: if self.config.plain_http_loopback && is_loopback(&registry) {
                        ClientProtocol::Http
                    } else {
                        ClientProtocol::Https
                    },
                    connect_timeout: Some(timeout),
                    read_timeout: Some(timeout),
                    user_agent: concat!("far-oci/", env!("CARGO_PKG_VERSION")),
                    ..ClientConfig::default()
                })
            })
            .clone()
    }
}

/// Whether a registry (`host[:port]`) names this machine.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// What a registry client's failure means for the reference asked for.
pub(crate) fn classify(reference: &Reference, error: OciDistributionError) -> OciError {
    let registry = reference.resolve_registry().to_owned();
    let image = reference.whole();
    match error {
        OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
            OciError::Unreachable {
                registry,
                reason: source_chain(&e),
            }
        }
        OciDistributionError::ImageManifestNotFoundError(_) => OciError::NotFound { image },
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) =>
        {
            OciError::NotFound { image }
        }
        OciDistributionError::ServerError { code: 404, .. } => OciError::NotFound { image },
        OciDistributionError::AuthenticationFailure(reason) => OciError::Denied { image, reason },
        OciDistributionError::UnauthorizedError { url } => OciError::Denied {
            image,
            reason: format!("unauthorized at {url}"),
        },
        OciDistributionError::RegistryError { envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) =>
        {
            OciError::Denied {
                image,
                reason: format!("{envelope:?}"),
            }
        }
        other => OciError::Registry {
            image,
            reason: match &other {
                OciDistributionError::RequestError(e) => source_chain(e),
                _ => other.to_string(),
            },
        },
    }
}

/// An error with its causes, which is where reqwest says what actually went wrong.
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognised_by_address() {
        for yes in [
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "ghcr.io",
            "10.0.0.1:5000",
            "localhost.evil.com:5000",
            "[::2]:80",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn mirrors_keep_repository_tag_and_digest() {
        let registries = Registries::new(RegistryConfig {
            mirrors: [("ghcr.io".to_owned(), "127.0.0.1:5000".to_owned())].into(),
            ..RegistryConfig::default()
        });
        let r = registries
            .locate("ghcr.io/microscaler/tiffany-vm:v0.3.1")
            .unwrap();
        assert_eq!(r.whole(), "127.0.0.1:5000/microscaler/tiffany-vm:v0.3.1");
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = registries.locate(&format!("ghcr.io/x/y@{digest}")).unwrap();
        assert_eq!(r.whole(), format!("127.0.0.1:5000/x/y@{digest}"));
        assert_eq!(
            registries.locate("quay.io/x/y:1").unwrap().whole(),
            "quay.io/x/y:1"
        );
        let err = registries.locate("Not A Reference").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("image \"Not A Reference\" is not a valid OCI reference"),
            "{err}"
        );
    }
}
