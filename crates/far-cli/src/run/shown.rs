//! What the web UI shows of a `far run` (`--ui`): its one agent, with the status a controller
//! would write for it (phase, reason, conditions, heartbeat, guest figures, exit code), and the
//! local far-host. Kept in this process; nothing is written anywhere.

use std::sync::{Arc, Mutex, MutexGuard};

use far_agent_controller::conditions;
use far_agent_controller::ui::{Source, detail, view};
use far_agent_protocol::Heartbeat;
use far_api::{
    AgentReason, FarAgent, FlintlockHost, FlintlockHostStatus, Phase, VmSize, agent_condition,
    host_condition,
};
use futures::future::BoxFuture;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde_json::Value;

/// The run's agent and host, as the UI reads them.
pub struct Shown {
    agent: Mutex<FarAgent>,
    host: FlintlockHost,
}

impl Shown {
    /// The agent placed on `host` (this machine's far-host, which is Ready while it runs).
    pub fn new(mut agent: FarAgent, mut host: FlintlockHost) -> Arc<Self> {
        let now = Timestamp::now();
        agent.metadata.creation_timestamp = Some(Time(now));
        let mut host_status = FlintlockHostStatus {
            last_probe_time: Some(Time(now)),
            ..FlintlockHostStatus::default()
        };
        conditions::set(
            &mut host_status.conditions,
            host_condition::READY,
            true,
            "Serving",
            "far run's own far-host",
            None,
            now,
        );
        host.status = Some(host_status);
        let shown = Arc::new(Self {
            agent: Mutex::new(agent),
            host,
        });
        let host = shown.host.name_any();
        shown.change(|status, now| {
            status.phase = Some(Phase::Pending);
            status.reason = Some(AgentReason::Provisioning);
            status.host = Some(host.clone());
            let message = format!("placed on {host}, this machine");
            set(
                status,
                agent_condition::SCHEDULED,
                true,
                "Placed",
                &message,
                now,
            );
        });
        shown
    }

    fn locked(&self) -> MutexGuard<'_, FarAgent> {
        self.agent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn change(&self, change: impl FnOnce(&mut far_api::FarAgentStatus, Timestamp)) {
        change(
            self.locked().status.get_or_insert_with(Default::default),
            Timestamp::now(),
        );
    }

    /// Its VM was created.
    pub fn created(&self, vm_uid: &str, vm: VmSize) {
        self.change(|status, now| {
            status.reason = Some(AgentReason::Booting);
            status.vm_uid = Some(vm_uid.to_owned());
            status.vm_state = Some("CREATED".into());
            status.vm = Some(vm);
            let message = format!("VM {vm_uid} created");
            set(
                status,
                agent_condition::VM_CREATED,
                true,
                "Created",
                &message,
                now,
            );
        });
    }

    /// Its guest reported in.
    pub fn heartbeat(&self, beat: &Heartbeat) {
        self.change(|status, now| {
            if status.phase == Some(Phase::Pending) {
                status.phase = Some(Phase::Running);
                status.reason = Some(AgentReason::Running);
                status.start_time = Some(Time(now));
                let message = "the agent's init reported in";
                set(
                    status,
                    agent_condition::AGENT_READY,
                    true,
                    "Running",
                    message,
                    now,
                );
            }
            status.last_heartbeat_time = Some(Time(now));
            status.guest = Some(far_agent_controller::reconcile::guest_usage(beat));
        });
    }

    /// It ended: with `exit_code` when the agent exited, else failed for `reason`.
    pub fn finished(&self, exit_code: Option<i32>, reason: AgentReason, message: &str) {
        self.change(|status, now| {
            status.phase = Some(match (exit_code, reason) {
                (Some(0), AgentReason::Completed) => Phase::Completed,
                _ => Phase::Failed,
            });
            status.reason = Some(reason);
            status.message = Some(message.to_owned());
            status.exit_code = exit_code;
            status.finish_time = Some(Time(now));
            set(
                status,
                agent_condition::AGENT_READY,
                false,
                reason.as_str(),
                message,
                now,
            );
            set(
                status,
                agent_condition::FINISHED,
                true,
                reason.as_str(),
                message,
                now,
            );
        });
    }
}

fn set(
    status: &mut far_api::FarAgentStatus,
    kind: &str,
    value: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    conditions::set(
        &mut status.conditions,
        kind,
        value,
        reason,
        message,
        None,
        now,
    );
}

impl Source for Shown {
    fn look(&self) -> view::View {
        let agent = self.locked().clone();
        let status = agent.status.clone().unwrap_or_default();
        let finished = matches!(status.phase, Some(Phase::Completed | Phase::Failed));
        let held = status.vm.filter(|_| !finished).map_or((0, 0, 0), |vm| {
            (u64::from(vm.vcpu), u64::from(vm.memory_mib), 1)
        });
        let allocation = view::Allocation::from([(self.host.name_any(), held)]);
        let row = view::agent_row(&agent.into());
        view::View {
            agents: [(row.key.clone(), row)].into(),
            hosts: vec![view::host_row(&self.host, true, &allocation)],
            pools: vec![],
        }
    }

    fn agent(
        self: Arc<Self>,
        namespace: String,
        name: String,
    ) -> BoxFuture<'static, Option<Value>> {
        let agent = self.locked().clone();
        let ours =
            agent.namespace().as_deref() == Some(namespace.as_str()) && agent.name_any() == name;
        // No cluster, so no Events: the conditions say what happened.
        Box::pin(async move { ours.then(|| detail(&agent, Ok(Vec::new()))) })
    }
}
