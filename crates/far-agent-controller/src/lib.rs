//! far-agent-controller: reconciles FarAgents into Flintlock microVMs.
//!
//! - [`cache`]: what the controller keeps of each FarAgent;
//! - [`decision`]: the pure reconcile decision, property-tested;
//! - [`placement`]: which FlintlockHost an agent goes to;
//! - [`pools`]: the idle VMs of FarAgentPools, and the claims that take them;
//! - [`conditions`]: standard conditions merged by type;
//! - [`reconcile`]: the shell that observes, decides and acts;
//! - [`flintlock`]: per-host Flintlock clients with deadlines and retries;
//! - [`hosts`]: host probing, allocation and orphan collection;
//! - [`liveness`]: what decides a running agent again (it has no timer);
//! - [`leader`]: leader election on a Lease;
//! - [`logs`]: reading an agent's output through the API server's service proxy;
//! - [`metrics`]: OpenMetrics and health endpoints;
//! - [`ui`]: the web UI of live agent state;
//! - [`run`]: the wiring.

pub mod cache;
pub mod conditions;
pub mod decision;
pub mod flintlock;
pub mod hosts;
pub mod leader;
pub mod liveness;
pub mod logs;
pub mod metrics;
pub mod placement;
pub mod pools;
pub mod reconcile;
pub mod run;
pub mod ui;
