//! The reconcile decision: from what is known of a FarAgent, its VM and its guest, to the
//! status it should have and the actions to take. Pure: no IO, no clock (`now` is an input),
//! so it is property-tested; [`crate::reconcile`] is the thin shell that observes and acts.
//!
//! The life it encodes (see `docs/controller.md`): finalizer first; a host recorded before any
//! VM exists; at most one VM created per attempt; `Running` only on the guest's first heartbeat;
//! `Completed`/`Failed` from the exit code; `Failed` with a reason on VM FAILED, boot timeout,
//! heartbeat loss or deadline; restarts with back-off; a finished agent's VM deleted; deletion
//! through the finalizer, bounded when the host is gone.

use std::time::Duration;

use far_api::{
    AgentReason, Binding, FarAgentSpec, FarAgentStatus, GuestUsage, Phase, RestartPolicy, VmSize,
    agent_condition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::conditions;

/// How long a deleted agent waits for an unreachable host before its finalizer is released.
pub const DELETE_GRACE: Duration = Duration::from_secs(120);
/// Beyond a heartbeat interval and the grace period, how long a stopping guest gets to report
/// its exit before its VM is deleted anyway.
pub const STOP_MARGIN: Duration = Duration::from_secs(5);
/// How often an agent waiting on something outside the controller is looked at again.
pub const RECHECK: Duration = Duration::from_secs(30);
/// How stale `status.lastHeartbeatTime` may get, on average, before it is written again:
/// heartbeats live in the controller's memory, and 10,000 agents refreshing every 5 minutes is
/// 33 writes a second. Each agent has its own period within [`HEARTBEAT_REFRESH_SPREAD`] of it
/// ([`heartbeat_refresh`]).
pub const HEARTBEAT_REFRESH: Duration = Duration::from_secs(300);
/// How far an agent's refresh period lies from [`HEARTBEAT_REFRESH`], either way.
pub const HEARTBEAT_REFRESH_SPREAD: Duration = Duration::from_secs(60);

/// How stale the agent with this uid lets `status.lastHeartbeatTime` get: a period of its own
/// in [`HEARTBEAT_REFRESH`] ± [`HEARTBEAT_REFRESH_SPREAD`], fixed by the uid, so agents started
/// together (a burst of creates) do not all write again together, wave after wave.
pub fn heartbeat_refresh(uid: &str) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    uid.hash(&mut hasher);
    let seconds = 2 * HEARTBEAT_REFRESH_SPREAD.as_secs();
    HEARTBEAT_REFRESH - HEARTBEAT_REFRESH_SPREAD + Duration::from_secs(hasher.finish() % seconds)
}

/// Flintlock's view of the agent's current VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vm {
    /// The host could not be asked (unreachable since the given time).
    Unknown {
        /// When the host was first found unreachable.
        since: Timestamp,
    },
    /// The host says there is no such VM.
    Absent,
    /// The VM exists.
    Present {
        /// Flintlock's uid.
        uid: String,
        /// Flintlock's state.
        state: VmState,
        /// The VM's process has exited (its guest powered off or crashed). Only far-host can
        /// say so (its Guests extension); from upstream flintlockd it stays `false` and a dead
        /// guest is found by its missing heartbeats instead.
        stopped: bool,
        /// Why starting the VM failed, when the host says (far-host's extension).
        failure: Option<String>,
    },
}

/// Flintlock's VM states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Accepted, not started.
    Pending,
    /// The hypervisor started (says nothing of the guest).
    Created,
    /// Starting failed for good.
    Failed,
    /// Being torn down.
    Deleting,
}

impl VmState {
    /// Flintlock's name for it, as written to `status.vmState`.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Pending => "PENDING",
            VmState::Created => "CREATED",
            VmState::Failed => "FAILED",
            VmState::Deleting => "DELETING",
        }
    }
}

/// What the status channel heard from the current attempt's guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Guest {
    /// The last heartbeat.
    pub last_heartbeat: Option<Timestamp>,
    /// The exit code and, when the agent never started, why.
    pub exit: Option<(i32, Option<String>)>,
    /// What its last heartbeat said of its use of the VM.
    pub usage: Option<GuestUsage>,
}

/// Where the agent can go, computed by the shell only while it has no host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// This host fits; the VM will have this size.
    Fits {
        /// The FlintlockHost.
        host: String,
        /// The VM's size there.
        vm: VmSize,
        /// What the sizing rule says (raised sizes are named).
        message: String,
        /// Already recorded on the agent (its binding): its VM may exist there.
        bound: bool,
        /// The idle VM of the agent's pool taken for it (its Flintlock name), reserved so no
        /// other agent can take it; none: the agent boots its own VM.
        claimed: Option<String>,
    },
    /// No host fits; why, for each.
    Unschedulable(String),
    /// No host fits because the hosts that would refused the VM; what each said.
    Refused(String),
}

/// What a running agent's heartbeats call for: the one rule both the decision and the
/// heartbeat watch ([`crate::liveness`]) apply, so a running agent needs no timer of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heard {
    /// Silent for its whole heartbeat timeout (this long): the agent is lost.
    Lost(Duration),
    /// Heard, and `status.lastHeartbeatTime` is the agent's refresh period behind
    /// ([`heartbeat_refresh`]): written again.
    Stale,
    /// Nothing to do.
    Fresh,
}

/// What a running agent last heard at `last` calls for `now`, its status recording `recorded`,
/// its heartbeat timeout `timeout` and its refresh period `refresh` ([`heartbeat_refresh`]).
pub fn heard(
    last: Timestamp,
    recorded: Option<&Time>,
    timeout: Duration,
    refresh: Duration,
    now: Timestamp,
) -> Heard {
    let silent = now.duration_since(last).unsigned_abs();
    if silent >= timeout {
        Heard::Lost(silent)
    } else if recorded.is_none_or(|t| last.duration_since(t.0).unsigned_abs() >= refresh) {
        Heard::Stale
    } else {
        Heard::Fresh
    }
}

/// Everything the decision looks at.
#[derive(Clone, Debug)]
pub struct Observation<'a> {
    /// The agent's spec.
    pub spec: &'a FarAgentSpec,
    /// Its current status.
    pub status: &'a FarAgentStatus,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// Whether our finalizer is on it.
    pub has_finalizer: bool,
    /// When deletion was asked, if it was.
    pub deleting_since: Option<Timestamp>,
    /// The current VM, when the agent has one or a host to ask.
    pub vm: Option<Vm>,
    /// The idle VM of its pool the current attempt claimed (its binding says so): the agent's
    /// VM, which is never created for it, and whose guest is offered the task.
    pub claimed: Option<&'a str>,
    /// The claimed VM is of a pool with `reuse: Reset`: once its guest has reported the exit
    /// (far-init then makes it clean), it goes back to the pool instead of being deleted.
    pub reusable: bool,
    /// The guest's reports for the current attempt.
    pub guest: Guest,
    /// Whether what it runs, and in what VM, could be decided (`far_api::workload`): `Err`
    /// gives the reason (`PoolNotFound` waits for the pool; `InvalidSpec`, an agent that would
    /// reshape its pool's VM, fails) and a message naming the pool or field.
    pub workload: Result<(), (AgentReason, String)>,
    /// Where it could go (only looked at while it has no host).
    pub placement: Option<Placement>,
    /// Whether a VM can be configured for it: every Secret and ConfigMap value it needs is
    /// there (`ConfigMissing`), and its run configuration fits the metadata service
    /// (`ConfigTooLarge`). `Err` gives the reason and a message naming what is wrong.
    pub config: Result<(), (AgentReason, String)>,
    /// What far-init gives the agent between SIGTERM and SIGKILL.
    pub grace_period: Duration,
    /// How stale it lets `status.lastHeartbeatTime` get ([`heartbeat_refresh`] of its uid).
    pub heartbeat_refresh: Duration,
    /// Since when this controller's status channel has been listening: a guest's silence
    /// before it is not the guest's (it may have reported to a controller since gone).
    pub listening_since: Timestamp,
    /// The time now.
    pub now: Timestamp,
}

impl Observation<'_> {
    /// Whether the guest can still be asked to stop, `waited` after the reason to stop arose:
    /// it reports in, has not exited, and a heartbeat interval, the grace period and
    /// [`STOP_MARGIN`] have not passed.
    fn stoppable(&self, waited: Duration) -> bool {
        let within = Duration::from_secs(self.spec.heartbeat.interval_seconds.into())
            + self.grace_period
            + STOP_MARGIN;
        self.guest.exit.is_none()
            && self.guest.last_heartbeat.is_some()
            && matches!(
                self.vm,
                Some(Vm::Present {
                    state: VmState::Created,
                    ..
                })
            )
            && waited < within
    }
}

/// Something the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Put the finalizer on the agent.
    AddFinalizer,
    /// Record where the current attempt goes, before its VM is created (see
    /// [`far_api::Binding`]); written with the finalizer when both are due.
    Bind(Binding),
    /// Take the finalizer off: the agent may go.
    RemoveFinalizer,
    /// Find the VM of this attempt on the agent's host (adopt it), else create it.
    CreateVm {
        /// The attempt, from 0.
        attempt: u32,
    },
    /// Offer the agent's task to the idle VM it claimed (the channel answers the VM's wait for
    /// a claim with it, and again until the task's first heartbeat).
    OfferClaim,
    /// Ask the current attempt's guest to stop its agent (the answer to its next heartbeat).
    StopGuest,
    /// Delete the VM with this Flintlock uid.
    DeleteVm {
        /// Flintlock's uid.
        uid: String,
    },
    /// Give the claimed VM back to its pool (its guest reported the exit and resets it); the
    /// agent's status no longer names it.
    ReturnVm,
    /// Delete the FarAgent itself (`ttlSecondsAfterFinished` passed).
    DeleteAgent,
    /// Tell users: a Kubernetes Event on the agent.
    Event {
        /// Warning (else Normal).
        warning: bool,
        /// One word (`Scheduled`, `VMCreated`, ...).
        reason: &'static str,
        /// A sentence.
        message: String,
    },
}

/// What to do and what the status should be.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The status the agent should have (written only when it differs).
    pub status: FarAgentStatus,
    /// Actions, in order.
    pub actions: Vec<Action>,
    /// When to look again; `None`: only when something changes.
    pub requeue: Option<Duration>,
}

fn at(t: Timestamp) -> Time {
    Time(t)
}

fn elapsed(since: Option<&Time>, now: Timestamp) -> Duration {
    since.map_or(Duration::ZERO, |t| now.duration_since(t.0).unsigned_abs())
}

/// Restart back-off: 10 s doubling to 5 minutes, by restarts so far.
pub fn backoff(restarts: u32) -> Duration {
    Duration::from_secs(10u64.saturating_mul(1 << restarts.min(5)).min(300))
}

struct Builder<'a> {
    o: &'a Observation<'a>,
    status: FarAgentStatus,
    actions: Vec<Action>,
}

impl Builder<'_> {
    fn condition(&mut self, kind: &str, value: bool, reason: AgentReason, message: &str) {
        set_condition(
            &mut self.status,
            (kind, value, reason),
            message,
            self.o.generation,
            self.o.now,
        );
    }

    fn event(&mut self, warning: bool, reason: &'static str, message: String) {
        self.actions.push(Action::Event {
            warning,
            reason,
            message,
        });
    }

    fn phase(&mut self, phase: Phase, reason: AgentReason, message: impl Into<String>) {
        self.status.phase = Some(phase);
        self.status.reason = Some(reason);
        self.status.message = Some(message.into());
    }

    fn done(self, requeue: Option<Duration>) -> Decision {
        Decision {
            status: self.status,
            actions: self.actions,
            requeue,
        }
    }

    /// Frees the attempt's VM: back to its pool when it is reusable and its guest reported the
    /// exit, else deleted.
    fn free_vm(&mut self) {
        let Some(Vm::Present { uid, state, .. }) = &self.o.vm else {
            return;
        };
        if self.o.reusable && self.o.guest.exit.is_some() {
            self.status.vm_uid = None;
            self.status.vm_state = None;
            self.actions.push(Action::ReturnVm);
        } else if *state != VmState::Deleting {
            self.actions.push(Action::DeleteVm { uid: uid.clone() });
        }
    }

    /// The agent failed (or exited non-zero): restart it or finish it.
    fn fail(mut self, reason: AgentReason, message: String, exit_code: Option<i32>) -> Decision {
        let o = self.o;
        let restarts = self.status.restart_count;
        self.free_vm();
        self.status.exit_code = exit_code;
        if o.spec.restart_policy == RestartPolicy::OnFailure && restarts < o.spec.backoff_limit {
            let wait = backoff(restarts);
            self.event(
                true,
                "BackOff",
                format!(
                    "{message}; restarting in a new VM in {} s (restart {} of {})",
                    wait.as_secs(),
                    restarts + 1,
                    o.spec.backoff_limit
                ),
            );
            self.phase(
                Phase::Pending,
                AgentReason::BackOff,
                format!("{message}; restarting in {} s", wait.as_secs()),
            );
            self.status.restart_count = restarts + 1;
            self.status.finish_time = Some(at(o.now));
            self.status.host = None;
            self.status.vm_uid = None;
            self.status.vm_state = None;
            self.status.start_time = None;
            self.condition(agent_condition::AGENT_READY, false, reason, &message);
            self.condition(
                agent_condition::VM_CREATED,
                false,
                reason,
                "the VM of the failed run is deleted",
            );
            return self.done(Some(wait));
        }
        self.event(true, "Failed", message.clone());
        self.phase(Phase::Failed, reason, message.clone());
        self.status.finish_time = Some(at(o.now));
        self.condition(agent_condition::AGENT_READY, false, reason, &message);
        self.condition(agent_condition::FINISHED, true, reason, &message);
        let requeue = self.finished_requeue();
        self.done(requeue)
    }

    /// How long until `activeDeadlineSeconds` runs out, for a started agent that has one.
    fn deadline_left(&self) -> Option<Duration> {
        let limit = Duration::from_secs(self.o.spec.active_deadline_seconds?.unsigned_abs());
        let start = self.status.start_time.as_ref()?;
        Some(limit.saturating_sub(elapsed(Some(start), self.o.now)))
    }

    fn finished_requeue(&self) -> Option<Duration> {
        let ttl = self.o.spec.ttl_seconds_after_finished?;
        let left = Duration::from_secs(ttl.unsigned_abs())
            .saturating_sub(elapsed(self.status.finish_time.as_ref(), self.o.now));
        Some(left.max(Duration::from_secs(1)))
    }
}

/// Decides what to do for one agent.
pub fn decide(o: &Observation<'_>) -> Decision {
    let mut b = Builder {
        o,
        status: o.status.clone(),
        actions: Vec::new(),
    };
    b.status.observed_generation = o.generation;

    // Deletion: tear the VM down, then let the agent go; a host that is gone is waited on for
    // a bounded grace only.
    if let Some(since) = o.deleting_since {
        if !o.has_finalizer {
            return b.done(None);
        }
        let finished = o.status.phase.is_some_and(Phase::is_terminal);
        if finished {
            // A finished agent keeps its outcome in status while its VM goes: nothing to write
            // (not even the generation the deletion bumped).
            b.status = o.status.clone();
        } else {
            b.phase(
                b.status.phase.unwrap_or(Phase::Pending),
                AgentReason::Terminating,
                "the FarAgent is being deleted",
            );
        }
        return match &o.vm {
            None | Some(Vm::Absent) => {
                // Nothing is left to tear down and the agent goes at once: its status is not
                // written. Only the VM of an agent deleted while it lived is news.
                b.status = o.status.clone();
                if !finished {
                    let stopped = o.guest.exit.as_ref().map(|(code, _)| *code);
                    let note = match stopped.or(o.status.exit_code) {
                        Some(code) => {
                            format!("the agent stopped with exit code {code}; its VM is gone")
                        }
                        None => "the agent's VM is gone".into(),
                    };
                    b.event(false, "Deleted", note);
                }
                b.actions.push(Action::RemoveFinalizer);
                b.done(None)
            }
            Some(Vm::Present { .. }) => {
                // A guest still heard from is asked to stop first, so its agent gets SIGTERM,
                // the grace period and its last output out; silent, or out of time, the VM goes.
                if !finished && o.stoppable(o.now.duration_since(since).unsigned_abs()) {
                    b.actions.push(Action::StopGuest);
                    return b.done(Some(Duration::from_secs(1)));
                }
                b.free_vm();
                b.done(Some(Duration::from_secs(2)))
            }
            Some(Vm::Unknown { .. }) => {
                let waited = o.now.duration_since(since).unsigned_abs();
                if waited >= DELETE_GRACE {
                    b.event(true, "HostUnreachable", format!(
                        "host {} did not answer for {} s; releasing the FarAgent, its VM may be left on that host and is collected when the host returns",
                        o.status.host.as_deref().unwrap_or("?"), waited.as_secs()));
                    b.actions.push(Action::RemoveFinalizer);
                    b.done(None)
                } else {
                    b.done(Some((DELETE_GRACE - waited).min(Duration::from_secs(10))))
                }
            }
        };
    }

    if !o.has_finalizer {
        // The finalizer, and with it the first attempt's binding when a host fits: one metadata
        // write, after which the agent is decided on again at once (on the write's answer);
        // status is written from then on.
        b.actions.push(Action::AddFinalizer);
        if let Some(Placement::Fits {
            host,
            vm,
            bound: false,
            claimed,
            ..
        }) = &o.placement
        {
            b.actions.push(Action::Bind(Binding {
                attempt: o.status.restart_count,
                host: host.clone(),
                vm: *vm,
                claimed: claimed.clone(),
            }));
        }
        b.status = o.status.clone();
        return b.done(Some(Duration::ZERO));
    }

    // Finished: nothing brings it back; free the VM, honour the TTL.
    if b.status.phase.is_some_and(Phase::is_terminal) {
        b.free_vm();
        if o.spec.ttl_seconds_after_finished.is_some_and(|ttl| {
            elapsed(b.status.finish_time.as_ref(), o.now).as_secs() >= ttl.unsigned_abs()
        }) {
            b.actions.push(Action::DeleteAgent);
            return b.done(None);
        }
        let requeue = b.finished_requeue();
        return b.done(requeue);
    }

    // Back-off before a restart.
    if b.status.reason == Some(AgentReason::BackOff) {
        let wait = backoff(b.status.restart_count.saturating_sub(1));
        let waited = elapsed(b.status.finish_time.as_ref(), o.now);
        if waited < wait {
            return b.done(Some(wait - waited));
        }
        b.status.finish_time = None;
        b.status.exit_code = None;
    }

    // The deadline counts from the first start and holds across restarts. A guest still heard
    // from is asked to stop first; the agent then fails with the code it ended by.
    if let (Some(limit), Some(start)) =
        (o.spec.active_deadline_seconds, b.status.start_time.as_ref())
        && o.now.duration_since(start.0) >= SignedDuration::from_secs(limit)
    {
        let over =
            (o.now.duration_since(start.0) - SignedDuration::from_secs(limit)).unsigned_abs();
        let why = format!("ran longer than activeDeadlineSeconds ({limit} s)");
        if o.stoppable(over) {
            b.phase(
                b.status.phase.unwrap_or(Phase::Running),
                AgentReason::DeadlineExceeded,
                format!("{why}; stopping the agent"),
            );
            b.actions.push(Action::StopGuest);
            return b.done(Some(Duration::from_secs(1)));
        }
        return b.fail(
            AgentReason::DeadlineExceeded,
            why,
            o.guest.exit.as_ref().map(|(code, _)| *code),
        );
    }

    // Before the VM exists: what it is made of must be decided.
    if b.status.vm_uid.is_none()
        && let Err((reason, message)) = &o.workload
    {
        if *reason == AgentReason::InvalidSpec {
            return b.fail(AgentReason::InvalidSpec, message.clone(), None);
        }
        b.condition(agent_condition::SCHEDULED, false, *reason, message);
        b.phase(Phase::Pending, *reason, message.clone());
        return b.done(Some(RECHECK));
    }

    // Placement: bound (recorded on the agent, fenced) before any VM exists; in status with
    // the VM's creation.
    let mut unbound = None;
    if b.status.host.is_none() {
        match &o.placement {
            Some(Placement::Fits {
                host,
                vm,
                message,
                bound,
                claimed,
            }) => {
                if !bound {
                    unbound = Some(Binding {
                        attempt: b.status.restart_count,
                        host: host.clone(),
                        vm: *vm,
                        claimed: claimed.clone(),
                    });
                }
                b.status.host = Some(host.clone());
                b.status.vm = Some(*vm);
                b.condition(
                    agent_condition::SCHEDULED,
                    true,
                    AgentReason::Provisioning,
                    message,
                );
                b.phase(Phase::Pending, AgentReason::Provisioning, message.clone());
                b.event(
                    false,
                    "Scheduled",
                    format!("placed on host {host}: {message}"),
                );
            }
            Some(Placement::Refused(why)) => {
                b.condition(
                    agent_condition::SCHEDULED,
                    false,
                    AgentReason::CreateRefused,
                    why,
                );
                b.phase(Phase::Pending, AgentReason::CreateRefused, why.clone());
                return b.done(Some(RECHECK));
            }
            Some(Placement::Unschedulable(why)) => {
                b.condition(
                    agent_condition::SCHEDULED,
                    false,
                    AgentReason::Unschedulable,
                    why,
                );
                b.phase(Phase::Pending, AgentReason::Unschedulable, why.clone());
                return b.done(Some(RECHECK));
            }
            None => {
                b.phase(
                    Phase::Pending,
                    AgentReason::Provisioning,
                    "waiting for placement",
                );
                return b.done(Some(RECHECK));
            }
        }
    }

    // Before the VM exists: its configuration must resolve.
    if b.status.vm_uid.is_none()
        && let Err((reason, message)) = &o.config
    {
        b.phase(Phase::Pending, *reason, message.clone());
        return b.done(Some(RECHECK));
    }

    // The guest's own word wins over everything Flintlock says.
    if let Some((code, start_error)) = &o.guest.exit {
        // A VM found by name whose uid never reached status (the write after its creation
        // was lost) is recorded now, so the finished agent's VM can still be found and freed.
        if let Some(Vm::Present { uid, .. }) = &o.vm {
            b.status.vm_uid.get_or_insert_with(|| uid.clone());
        }
        if let Some(reason) = start_error {
            return b.fail(
                AgentReason::StartError,
                format!("the agent could not start: {reason}"),
                Some(*code),
            );
        }
        if *code == 0 {
            b.free_vm();
            b.status.exit_code = Some(0);
            b.status.finish_time = Some(at(o.now));
            b.phase(
                Phase::Completed,
                AgentReason::Completed,
                "the agent exited with code 0",
            );
            b.condition(
                agent_condition::AGENT_READY,
                false,
                AgentReason::Completed,
                "the agent exited",
            );
            b.condition(
                agent_condition::FINISHED,
                true,
                AgentReason::Completed,
                "the agent exited with code 0",
            );
            b.event(false, "Completed", "the agent exited with code 0".into());
            let requeue = b.finished_requeue();
            return b.done(requeue);
        }
        return b.fail(
            AgentReason::Error,
            format!("the agent exited with code {code}"),
            Some(*code),
        );
    }

    let timeout = Duration::from_secs(o.spec.heartbeat.timeout_seconds.into());
    match &o.vm {
        None | Some(Vm::Absent) => {
            if b.status.vm_uid.is_some() {
                // The VM we recorded is gone without a word from the guest.
                return b.fail(
                    AgentReason::VMFailed,
                    "the agent's VM disappeared from its host".into(),
                    None,
                );
            }
            if let Some(claim) = unbound.as_ref().and_then(|u| u.claimed.clone()) {
                // The claim goes on record first; the next pass finds the VM and offers it
                // the task.
                b.actions.extend(unbound.map(Action::Bind));
                b.phase(
                    Phase::Pending,
                    AgentReason::Provisioning,
                    format!("claiming idle VM {claim} of pool {}", pool_name(o.spec)),
                );
                return b.done(Some(Duration::ZERO));
            }
            if let Some(claim) = o.claimed {
                let message = format!(
                    "idle VM {claim} of pool {} is gone from host {}; it never took the claim",
                    pool_name(o.spec),
                    b.status.host.as_deref().unwrap_or("?")
                );
                return b.fail(AgentReason::VMFailed, message, None);
            }
            let attempt = b.status.restart_count;
            b.actions.extend(unbound.map(Action::Bind));
            b.actions.push(Action::CreateVm { attempt });
            b.phase(
                Phase::Pending,
                AgentReason::Provisioning,
                format!(
                    "creating the VM on host {}",
                    b.status.host.as_deref().unwrap_or("?")
                ),
            );
            b.done(Some(Duration::from_secs(2)))
        }
        Some(Vm::Unknown { since }) => {
            let silent = o.guest.last_heartbeat.map_or_else(
                || o.now.duration_since(*since).unsigned_abs(),
                |t| o.now.duration_since(t).unsigned_abs(),
            );
            if silent >= timeout {
                let message = format!(
                    "host {} unreachable and no heartbeat for {} s",
                    b.status.host.as_deref().unwrap_or("?"),
                    silent.as_secs()
                );
                return b.fail(AgentReason::HeartbeatLost, message, None);
            }
            if b.status.reason != Some(AgentReason::HostUnreachable) {
                b.event(
                    true,
                    "HostUnreachable",
                    format!(
                        "host {} does not answer",
                        b.status.host.as_deref().unwrap_or("?")
                    ),
                );
            }
            let phase = b.status.phase.unwrap_or(Phase::Pending);
            b.phase(
                phase,
                AgentReason::HostUnreachable,
                format!(
                    "host {} does not answer",
                    b.status.host.as_deref().unwrap_or("?")
                ),
            );
            b.done(Some(Duration::from_secs(5)))
        }
        Some(Vm::Present {
            uid,
            state,
            stopped,
            failure,
        }) => {
            let first_sight = b.status.vm_uid.as_deref() != Some(uid.as_str());
            b.status.vm_uid = Some(uid.clone());
            // Flintlock's state is written with other changes (first sight, FAILED, DELETING,
            // Running), not on its own: PENDING -> CREATED says nothing about the agent.
            if first_sight || matches!(state, VmState::Failed | VmState::Deleting) {
                b.status.vm_state = Some(state.as_str().to_owned());
            }
            if first_sight {
                let (reason, message) = vm_origin(o.spec, o.claimed.is_some(), uid, &b.status);
                b.condition(agent_condition::VM_CREATED, true, reason, &message);
                b.event(false, "VMCreated", message);
            }
            match state {
                VmState::Failed => b.fail(
                    AgentReason::VMFailed,
                    match failure {
                        Some(why) => format!("Flintlock reports VM {uid} FAILED: {why}"),
                        None => format!("Flintlock reports VM {uid} FAILED"),
                    },
                    None,
                ),
                // The guest reports its exit before it powers off (the channel acknowledges only
                // once the exit is in status), so a stopped VM with no exit known died.
                VmState::Pending | VmState::Created if *stopped => b.fail(
                    AgentReason::VMFailed,
                    format!("VM {uid} stopped without the agent reporting an exit"),
                    None,
                ),
                VmState::Deleting => b.fail(
                    AgentReason::VMFailed,
                    format!("VM {uid} is being deleted by someone else"),
                    None,
                ),
                VmState::Pending | VmState::Created => match o.guest.last_heartbeat {
                    Some(last) => {
                        let recorded = b.status.last_heartbeat_time.as_ref();
                        let stale = match heard(last, recorded, timeout, o.heartbeat_refresh, o.now)
                        {
                            Heard::Lost(silent) => {
                                return b.fail(
                                    AgentReason::HeartbeatLost,
                                    format!("no heartbeat for {} s", silent.as_secs()),
                                    None,
                                );
                            }
                            Heard::Stale => true,
                            Heard::Fresh => false,
                        };
                        if stale {
                            b.status.last_heartbeat_time = Some(at(last));
                            b.status.guest = o.guest.usage.or(b.status.guest);
                        }
                        if b.status.phase != Some(Phase::Running) {
                            b.status.vm_state = Some(state.as_str().to_owned());
                            b.status.start_time.get_or_insert(at(last));
                            b.condition(
                                agent_condition::AGENT_READY,
                                true,
                                AgentReason::Running,
                                "the agent's init reported in",
                            );
                            b.event(false, "Started", format!("the agent runs in VM {uid}"));
                        }
                        // Also after a spell of HostUnreachable: the agent is heard again.
                        if b.status.phase != Some(Phase::Running)
                            || b.status.reason != Some(AgentReason::Running)
                        {
                            b.phase(Phase::Running, AgentReason::Running, "the agent runs");
                        }
                        // No timer but its deadline's: what time alone changes for it, the
                        // heartbeat watch finds ([`heard`]); what its VM does, the host probe.
                        let deadline = b.deadline_left();
                        b.done(deadline)
                    }
                    None => {
                        let since = o
                            .status
                            .conditions
                            .iter()
                            .find(|c| c.type_ == agent_condition::VM_CREATED)
                            .map(|c| c.last_transition_time.0)
                            .unwrap_or(o.now)
                            .max(o.listening_since);
                        let waited = o.now.duration_since(since).unsigned_abs();
                        // It reported in to an earlier controller: it runs, and is waited for
                        // as a running agent is.
                        if b.status.phase == Some(Phase::Running) {
                            if waited >= timeout {
                                return b.fail(
                                    AgentReason::HeartbeatLost,
                                    format!("no heartbeat for {} s", waited.as_secs()),
                                    None,
                                );
                            }
                            // Its VM answers again (after a spell of HostUnreachable, say).
                            if b.status.reason != Some(AgentReason::Running) {
                                b.phase(Phase::Running, AgentReason::Running, "the agent runs");
                            }
                            let left = timeout - waited;
                            let wake = b.deadline_left().map_or(left, |d| d.min(left));
                            return b.done(Some(wake));
                        }
                        if waited >= timeout {
                            return b.fail(AgentReason::BootTimeout, format!("the agent's init did not report in within {} s of the VM's creation", timeout.as_secs()), None);
                        }
                        if o.claimed.is_some() {
                            b.actions.push(Action::OfferClaim);
                        }
                        b.phase(Phase::Pending, AgentReason::Booting, booting(uid));
                        b.done(Some((timeout - waited).min(Duration::from_secs(5))))
                    }
                },
            }
        }
    }
}

/// The pool an agent claims from, for messages.
fn pool_name(spec: &FarAgentSpec) -> &str {
    spec.pool_ref.as_ref().map_or("?", |r| r.name.as_str())
}

/// The message of an agent whose VM exists and whose init has not reported in yet.
fn booting(uid: &str) -> String {
    format!("VM {uid} started; waiting for the agent to report in")
}

/// The status after `host` refused to create the agent's VM (`said`: its answer). The attempt
/// is placed again, passing that host over; the shell records a Warning Event with the same
/// message.
pub fn create_refused(
    status: &FarAgentStatus,
    host: &str,
    said: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> FarAgentStatus {
    let mut s = status.clone();
    let message = refusal(host, said);
    s.host = None;
    s.vm = None;
    for kind in [agent_condition::SCHEDULED, agent_condition::VM_CREATED] {
        let condition = (kind, false, AgentReason::CreateRefused);
        set_condition(&mut s, condition, &message, generation, now);
    }
    s.phase = Some(Phase::Pending);
    s.reason = Some(AgentReason::CreateRefused);
    s.message = Some(format!("{message}; placing it on another host that fits"));
    s
}

/// Sets one of an agent's conditions, keeping them in the order of a life
/// ([`agent_condition::LIFECYCLE`]) whatever order they were first set in.
fn set_condition(
    status: &mut FarAgentStatus,
    (kind, value, reason): (&str, bool, AgentReason),
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let c = &mut status.conditions;
    conditions::set(c, kind, value, reason.as_str(), message, generation, now);
    c.sort_by_key(|c| {
        agent_condition::LIFECYCLE
            .iter()
            .position(|k| *k == c.type_)
            .unwrap_or(agent_condition::LIFECYCLE.len())
    });
}

/// The `VMCreated` condition's reason and message: where the agent's VM came from. A claimed
/// idle VM of its pool is a warm start; a VM booted for an agent of a pool, a cold start.
fn vm_origin(
    spec: &FarAgentSpec,
    claimed: bool,
    uid: &str,
    status: &FarAgentStatus,
) -> (AgentReason, String) {
    let host = status.host.as_deref().unwrap_or("?");
    match (claimed, &spec.pool_ref) {
        (true, _) => (
            AgentReason::WarmStart,
            format!(
                "claimed idle VM {uid} of pool {} on host {host}",
                pool_name(spec)
            ),
        ),
        (false, Some(pool)) => (
            AgentReason::ColdStart,
            format!(
                "pool {} had no idle VM: {} (cold start)",
                pool.name,
                vm_on_host(uid, status)
            ),
        ),
        (false, None) => (AgentReason::Booting, vm_on_host(uid, status)),
    }
}

/// The `VMCreated` condition's message: which VM, on which host.
fn vm_on_host(uid: &str, status: &FarAgentStatus) -> String {
    format!(
        "VM {uid} created on host {}",
        status.host.as_deref().unwrap_or("?")
    )
}

/// How a host's refusal to create a VM is told.
pub fn refusal(host: &str, said: &str) -> String {
    format!("host {host} refused to create the VM: {said}")
}

/// The status right after the shell created the agent's VM, written at once with the VM's
/// uid: Flintlock's create is not idempotent, so the uid must land before anything else.
pub fn vm_created(
    status: &FarAgentStatus,
    spec: &FarAgentSpec,
    uid: &str,
    state: VmState,
    generation: Option<i64>,
    now: Timestamp,
) -> FarAgentStatus {
    let mut s = status.clone();
    s.vm_uid = Some(uid.to_owned());
    s.vm_state = Some(state.as_str().to_owned());
    let (reason, message) = vm_origin(spec, false, uid, &s);
    let condition = (agent_condition::VM_CREATED, true, reason);
    set_condition(&mut s, condition, &message, generation, now);
    s.phase = Some(Phase::Pending);
    s.reason = Some(AgentReason::Booting);
    s.message = Some(booting(uid));
    s
}

#[cfg(test)]
mod tests;
