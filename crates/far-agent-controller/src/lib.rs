//! far-agent-controller: reconciles FarAgents into Flintlock microVMs.
//!
//! - [`decision`]: the pure reconcile decision, property-tested;
//! - [`placement`]: which FlintlockHost an agent goes to;
//! - [`conditions`]: standard conditions merged by type.

pub mod conditions;
pub mod decision;
pub mod placement;
