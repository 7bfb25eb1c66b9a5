//! The controller's metrics (OpenMetrics at `/metrics`) and health endpoints (`/healthz`,
//! `/readyz`).
//!
//! Every label comes from a closed set of `&'static str` (an error kind, an RPC method, a gRPC
//! code, a phase): never an object name, so 10,000 agents do not make 10,000 series.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a failed reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// [`crate::reconcile::Error::metric_label`].
    pub error: &'static str,
}

/// Labels of a Flintlock call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The RPC, e.g. `CreateMicroVM`.
    pub method: &'static str,
    /// The gRPC code, e.g. `OK`, `UNKNOWN`.
    pub code: &'static str,
}

/// Labels of an agent count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// The phase.
    pub phase: &'static str,
}

/// Labels of a claim on a FarAgentPool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClaimLabels {
    /// `warm` (an idle VM of the pool) or `cold` (none was idle: a VM booted for the agent).
    pub outcome: &'static str,
}

/// Labels of a pool VM count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmStateLabels {
    /// `idle`, `booting` or `busy`.
    pub state: &'static str,
}

/// Labels of a pool's change of its desired idle VMs.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `up` or `down`.
    pub direction: &'static str,
}

/// Every metric the controller keeps.
pub struct Metrics {
    registry: Registry,
    /// Reconciles run.
    pub reconciles: Counter,
    /// Reconciles that failed, by error kind.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// Reconcile durations, seconds.
    pub reconcile_duration: Histogram,
    /// Flintlock call durations, seconds, by method and code.
    pub rpc_duration: Family<RpcLabels, Histogram>,
    /// Agents by phase (refreshed by the host probe loop).
    pub agents: Family<PhaseLabels, Gauge>,
    /// Seconds from an agent's creation to Running.
    pub time_to_running: Histogram,
    /// Guests' boot time: kernel start to entrypoint, seconds (first heartbeat of each run).
    pub guest_boot: Histogram,
    /// Guests' memory in use, bytes, from every heartbeat (one histogram, not one series per agent).
    pub guest_memory: Histogram,
    /// Heartbeats received.
    pub heartbeats: Counter,
    /// Agents with a poolRef given a VM, by whether it was an idle one.
    pub pool_claims: Family<ClaimLabels, Counter>,
    /// VMs of all FarAgentPools, by state (summed over pools: per pool in each pool's status).
    pub pool_vms: Family<VmStateLabels, Gauge>,
    /// Changes of a pool's desired idle VMs, by direction.
    pub pool_scale: Family<DirectionLabels, Counter>,
    /// Seconds from a pool agent's creation to Running, by claim outcome (warm, cold).
    pub claim_seconds: Family<ClaimLabels, Histogram>,
    ready: AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("far_controller");
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by error kind",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile durations",
            reconcile_duration.clone(),
        );
        let rpc_duration = Family::<RpcLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        registry.register(
            "flintlock_rpc_duration_seconds",
            "Flintlock call durations by method and gRPC code",
            rpc_duration.clone(),
        );
        let agents = Family::<PhaseLabels, Gauge>::default();
        registry.register("agents", "FarAgents by phase", agents.clone());
        let time_to_running = Histogram::new(exponential_buckets(0.1, 2.0, 12));
        registry.register(
            "time_to_running_seconds",
            "Seconds from a FarAgent's creation to Running",
            time_to_running.clone(),
        );
        let guest_boot = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        registry.register(
            "guest_boot_to_entrypoint_seconds",
            "Guests' time from kernel start to the agent's entrypoint",
            guest_boot.clone(),
        );
        let pool_claims = Family::<ClaimLabels, Counter>::default();
        registry.register(
            "pool_claims",
            "FarAgents with a poolRef given a VM: warm (an idle VM of the pool) or cold (booted for the agent)",
            pool_claims.clone(),
        );
        let pool_vms = Family::<VmStateLabels, Gauge>::default();
        registry.register(
            "pool_vms",
            "VMs of all FarAgentPools by state: idle (waiting for a claim), booting, busy (claimed)",
            pool_vms.clone(),
        );
        let pool_scale = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "pool_scale",
            "Changes of a FarAgentPool's desired idle VMs, by direction",
            pool_scale.clone(),
        );
        let claim_seconds = Family::<ClaimLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 14))
        });
        registry.register(
            "claim_seconds",
            "Seconds from a FarAgent with a poolRef being created to Running, by claim outcome",
            claim_seconds.clone(),
        );
        let guest_memory = Histogram::new(exponential_buckets(16.0 * 1024.0 * 1024.0, 2.0, 12));
        registry.register(
            "guest_memory_used_bytes",
            "Guests' memory in use, from heartbeats",
            guest_memory.clone(),
        );
        let heartbeats = Counter::default();
        registry.register(
            "heartbeats",
            "Heartbeats received from guests",
            heartbeats.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            rpc_duration,
            agents,
            time_to_running,
            guest_boot,
            guest_memory,
            heartbeats,
            pool_claims,
            pool_vms,
            pool_scale,
            claim_seconds,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Records what a heartbeat says about its guest.
    pub fn heartbeat(&self, first: bool, beat: &far_agent_protocol::Heartbeat) {
        self.heartbeats.inc();
        if beat.memory_total_bytes > 0 {
            self.guest_memory.observe(beat.memory_used_bytes as f64);
        }
        if first && let Some(ms) = beat.boot_to_entrypoint_ms {
            self.guest_boot.observe(ms as f64 / 1000.0);
        }
    }

    /// Records one Flintlock call.
    pub fn rpc(&self, method: &'static str, code: &'static str, took: Duration) {
        self.rpc_duration
            .get_or_create(&RpcLabels { method, code })
            .observe(took.as_secs_f64());
    }

    /// Marks the controller ready (its caches are filled).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The metrics in OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `/metrics`, `/healthz` (the process answers) and `/readyz` (caches filled).
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if m.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready").into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "caches not filled").into_response()
                }
            }),
        )
        .with_state(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_metric_appears_once_used() {
        let m = Metrics::default();
        m.reconciles.inc();
        m.reconcile_errors
            .get_or_create(&ErrorLabels { error: "kube" })
            .inc();
        m.reconcile_duration.observe(0.01);
        m.rpc("GetMicroVM", "OK", Duration::from_millis(3));
        m.agents
            .get_or_create(&PhaseLabels { phase: "Running" })
            .set(2);
        m.time_to_running.observe(1.5);
        m.heartbeat(
            true,
            &far_agent_protocol::Heartbeat {
                boot_to_entrypoint_ms: Some(900),
                memory_used_bytes: 64 << 20,
                memory_total_bytes: 256 << 20,
                cpu_used_ms: 5,
            },
        );
        let text = m.encode();
        for name in [
            "far_controller_reconciles_total 1",
            "far_controller_reconcile_errors_total{error=\"kube\"} 1",
            "far_controller_reconcile_duration_seconds_count 1",
            "far_controller_flintlock_rpc_duration_seconds_count{method=\"GetMicroVM\",code=\"OK\"} 1",
            "far_controller_agents{phase=\"Running\"} 2",
            "far_controller_time_to_running_seconds_count 1",
            "far_controller_guest_boot_to_entrypoint_seconds_count 1",
            "far_controller_guest_memory_used_bytes_count 1",
            "far_controller_heartbeats_total 1",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
