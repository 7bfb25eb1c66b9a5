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

use std::collections::HashMap;
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

/// The running agents whose heartbeats call for a decision `now`, each with when it was last
/// heard. `last_heard` tells when the run with a channel id was last heard, if this controller
/// heard it: a running agent not heard since the controller started waits on a timer of its own
/// until it is.
pub fn due<'a>(
    agents: &'a [Arc<CachedAgent>],
    last_heard: impl Fn(&str) -> Option<Timestamp> + 'a,
    now: Timestamp,
) -> impl Iterator<Item = (&'a CachedAgent, Timestamp)> {
    agents.iter().filter_map(move |agent| {
        let status = agent.status.as_ref()?;
        if status.phase != Some(Phase::Running) || agent.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let last = last_heard(&run_id(&agent.metadata, Some(status)))?;
        let recorded = status.last_heartbeat_time.as_ref();
        let (timeout, refresh) = (agent.heartbeat_timeout(), agent.heartbeat_refresh());
        (decision::heard(last, recorded, timeout, refresh, now) != Heard::Fresh)
            .then_some((agent.as_ref(), last))
    })
}

/// The due agents to decide again: each once for what it is due on (its cached version and
/// its last heartbeat, to the second: read off the channel's monotonic clock each sweep, it
/// moves by microseconds). Until its status write comes back through the watch, a second kick
/// would only queue a reconcile of a copy already superseded; a reconcile that failed comes back
/// by itself, and one that wrote nothing met a newer heartbeat, which is due anew.
#[derive(Debug, Default)]
pub struct Kicks(HashMap<String, (Option<String>, i64)>);

impl Kicks {
    /// Of the agents due now, those not kicked yet for what they are due on.
    pub fn of<'a>(
        &mut self,
        due: impl Iterator<Item = (&'a CachedAgent, Timestamp)>,
    ) -> Vec<&'a CachedAgent> {
        let mut now = HashMap::with_capacity(self.0.len());
        let mut kick = Vec::new();
        for (agent, last) in due {
            let on = (agent.metadata.resource_version.clone(), last.as_second());
            let uid = agent.metadata.uid.clone().unwrap_or_default();
            if self.0.get(&uid) != Some(&on) {
                kick.push(agent);
            }
            now.insert(uid, on);
        }
        self.0 = now;
        kick
    }
}

/// Runs the heartbeat watch forever.
pub async fn run(ctx: Arc<Context>) {
    let mut ticks = tokio::time::interval(SWEEP);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut kicks = Kicks::default();
    loop {
        ticks.tick().await;
        let agents = ctx.agents.state();
        let now = Timestamp::now();
        let last_heard = |id: &str| Some(now - ctx.channel.view(id)?.since_heartbeat?);
        for agent in kicks.of(due(&agents, last_heard, now)) {
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
        let mut metadata =
            json!({"name": "a", "namespace": "n", "uid": UID, "resourceVersion": "7"});
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
        let refresh = decision::heartbeat_refresh(UID).as_secs() as i64;
        assert!(refresh != 300, "a period of its own");
        assert!(!decided(&a, Some(refresh - 1), refresh));
        assert!(decided(&a, Some(refresh), refresh));
        let never_recorded = agent(json!({"phase": "Running", "restartCount": 2}), false);
        assert!(decided(&never_recorded, Some(5), 6));
    }

    #[test]
    fn a_due_agent_is_kicked_once_for_each_version_and_heartbeat_it_is_due_on() {
        let a = agent(running(0), false);
        let mut newer = (*a).clone();
        newer.metadata.resource_version = Some("8".into());
        let mut kicks = Kicks::default();
        let mut sweep = |due: &[(&CachedAgent, Timestamp)]| kicks.of(due.iter().copied()).len();
        assert_eq!(sweep(&[(&a, t(100))]), 1);
        assert_eq!(sweep(&[(&a, t(100))]), 0, "due on the same again");
        let jittered = t(100) + std::time::Duration::from_micros(30);
        assert_eq!(sweep(&[(&a, jittered)]), 0, "the same, read again");
        assert_eq!(sweep(&[(&a, t(101))]), 1, "heard since");
        assert_eq!(sweep(&[(&newer, t(101))]), 1, "a newer copy");
        assert_eq!(sweep(&[]), 0);
        assert_eq!(
            sweep(&[(&newer, t(101))]),
            1,
            "due again after a sweep it was not"
        );
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
