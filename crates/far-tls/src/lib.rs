//! FAR's TLS policy: rustls with the ring provider, TLS 1.3 only.
//!
//! Every FAR process calls [`install`] before it makes or serves a TLS connection. rustls
//! then uses this provider wherever a configuration does not name one: tonic (gRPC to and from
//! Flintlock hosts), kube (the API server), reqwest (registries). The provider carries only
//! TLS 1.3 cipher suites, so a peer that offers TLS 1.2 alone gets no handshake.
//! reqwest is built with rustls but without a provider of its own: it panics if this was not
//! installed first.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// ring, with its TLS 1.3 cipher suites only.
pub fn provider() -> CryptoProvider {
    let ring = rustls::crypto::ring::default_provider();
    CryptoProvider {
        cipher_suites: ring
            .cipher_suites
            .iter()
            .copied()
            .filter(|suite| suite.version() == &rustls::version::TLS13)
            .collect(),
        ..ring
    }
}

/// Makes [`provider`] the process's default, once; later calls change nothing.
pub fn install() {
    if CryptoProvider::get_default().is_none() {
        let _ = provider().install_default();
    }
}

/// The provider in force: the installed default (installing [`provider`] when there is none).
pub fn current() -> Arc<CryptoProvider> {
    install();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(provider()))
}

#[cfg(test)]
mod tests;
