//! What looks after a running agent. It has no timer of its own: 10,000 running agents each
//! rechecked every few seconds cost a core in reconciles and Flintlock calls, and a scheduler
//! entry each. It is decided again when something calls for it:
//!
//! - its guest: the first heartbeat and the exit reconcile it at once ([`crate::run`]);
//! - time: the heartbeat watch here decides again, within a [`SWEEP`], every running agent
//!   whose heartbeats call for it ([`decision::heard`]: silent for its timeout, or its
//!   `lastHeartbeatTime` due a refresh), by the rule the decision applies;
//! - its VM: the host probe ([`crate::hosts::vm_news`]) decides again every agent whose host
//!   stopped answering or answered without its VM, or with it FAILED or being deleted; far-host
//!   also tells of guests that ended ([`crate::hosts::note_ended`]);
//! - its deadline (`activeDeadlineSeconds`): the one timer it keeps.

use std::sync::Arc;
use std::time::Duration;

use far_api::Phase;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;

use crate::cache::CachedAgent;
use crate::decision::{self, Heard};
use crate::reconcile::{Context, run_id};

/// How often the heartbeat watch looks: at most this late past its timeout, a silent agent is
/// found lost.
pub const SWEEP: Duration = Duration::from_secs(1);

/// The running agents whose heartbeats call for a decision `now`. `last_heard` tells when the
/// run with a channel id was last heard, if this controller heard it: a running agent not heard
/// since the controller started waits on a timer of its own until it is.
pub fn due<'a>(
    agents: &'a [Arc<CachedAgent>],
    last_heard: impl Fn(&str) -> Option<Timestamp> + 'a,
    now: Timestamp,
) -> impl Iterator<Item = &'a CachedAgent> {
    agents.iter().map(AsRef::as_ref).filter(move |agent| {
        let Some(status) = &agent.status else {
            return false;
        };
        if status.phase != Some(Phase::Running) || agent.metadata.deletion_timestamp.is_some() {
            return false;
        }
        last_heard(&run_id(&agent.metadata, Some(status))).is_some_and(|last| {
            let recorded = status.last_heartbeat_time.as_ref();
            decision::heard(last, recorded, agent.heartbeat_timeout(), now) != Heard::Fresh
        })
    })
}

/// Runs the heartbeat watch forever.
pub async fn run(ctx: Arc<Context>) {
    let mut ticks = tokio::time::interval(SWEEP);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        let agents = ctx.agents.state();
        let now = Timestamp::now();
        let last_heard = |id: &str| Some(now - ctx.channel.view(id)?.since_heartbeat?);
        for agent in due(&agents, last_heard, now) {
            let _ = ctx.kick.send(ObjectRef::from_obj(agent));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use far_api::FarAgent;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    const UID: &str = "0123abcd-0000-4000-8000-000000000001";

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn agent(status: serde_json::Value, deleting: bool) -> Arc<CachedAgent> {
        let mut metadata = json!({"name": "a", "namespace": "n", "uid": UID});
        if deleting {
            metadata["deletionTimestamp"] = json!("2027-01-15T08:00:00Z");
        }
        let agent: FarAgent = serde_json::from_value(json!({
            "apiVersion": "tiffany.dev/v1", "kind": "FarAgent", "metadata": metadata,
            "spec": {"image": "busybox:1", "memory": "256Mi", "cpu": 1, "entrypoint": "/bin/a",
                "heartbeat": {"intervalSeconds": 5, "timeoutSeconds": 30}},
            "status": status,
        }))
        .unwrap();
        Arc::new(agent.into())
    }

    fn running(recorded: i64) -> serde_json::Value {
        json!({"phase": "Running", "reason": "Running", "restartCount": 2,
            "lastHeartbeatTime": Time(t(recorded))})
    }

    /// Whether the watch decides the agent again at `now`, its run (attempt 2) last heard at
    /// `heard`.
    fn decided(agent: &Arc<CachedAgent>, heard: Option<i64>, now: i64) -> bool {
        let run = format!("{UID}.2");
        let last_heard = |id: &str| heard.filter(|_| id == run).map(t);
        due(std::slice::from_ref(agent), last_heard, t(now)).count() == 1
    }

    #[test]
    fn a_running_agent_is_decided_again_once_its_silence_reaches_the_timeout() {
        let a = agent(running(0), false);
        assert!(!decided(&a, Some(100), 100));
        assert!(!decided(&a, Some(100), 129));
        assert!(decided(&a, Some(100), 130));
        // Never heard by this controller: its own timer waits for it.
        assert!(!decided(&a, None, 1000));
    }

    #[test]
    fn a_running_agent_is_decided_again_when_its_heartbeat_time_is_due_a_refresh() {
        let a = agent(running(0), false);
        assert!(!decided(&a, Some(299), 300));
        assert!(decided(&a, Some(300), 300));
        let never_recorded = agent(json!({"phase": "Running", "restartCount": 2}), false);
        assert!(decided(&never_recorded, Some(5), 6));
    }

    #[test]
    fn only_running_agents_not_being_deleted_are_watched() {
        for phase in ["Pending", "Completed", "Failed"] {
            let mut status = running(0);
            status["phase"] = json!(phase);
            assert!(!decided(&agent(status, false), Some(100), 1000), "{phase}");
        }
        assert!(!decided(&agent(running(0), true), Some(100), 1000));
        assert!(!decided(
            &agent(serde_json::Value::Null, false),
            Some(100),
            1000
        ));
    }
}
