//! Test support for FAR: components tests run against for real.
//!
//! - [`apiserver::FakeApiServer`]: a Kubernetes API server over real HTTP, for the resources
//!   the controller uses, answering as a real kube-apiserver does.
//! - [`registry::Registry`]: a real OCI registry on loopback.
//! - [`cluster`]: a real cluster, when `FAR_TEST_KUBECONFIG` names one.
//! - [`faults`]: faults injected into a client's writes, against either.
//! - [`conformance`]: the script, recorded against kube-apiserver, the fake is held to.
//! - [`browser::Browser`]: a headless Chromium over WebDriver, for the web UI's tests.

pub mod apiserver;
pub mod browser;
pub mod cluster;
pub mod conformance;
pub mod faults;
pub mod http;
mod managed_fields;
pub mod registry;
pub mod request_metrics;

#[cfg(test)]
mod tests;
