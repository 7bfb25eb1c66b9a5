use proptest::prelude::*;

use super::*;
use far_api::{Heartbeat, RestartPolicy, Workload};

fn spec() -> FarAgentSpec {
    FarAgentSpec {
        workload: Workload {
            image: Some("busybox:1".into()),
            memory: Some("512Mi".into()),
            cpu: Some(1),
            entrypoint: Some("/bin/agent".into()),
            ..Workload::default()
        },
        pool_ref: None,
        restart_policy: RestartPolicy::Never,
        backoff_limit: 2,
        active_deadline_seconds: None,
        ttl_seconds_after_finished: None,
        heartbeat: Heartbeat {
            interval_seconds: 10,
            timeout_seconds: 60,
        },
        network: None,
    }
}

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn observe<'a>(spec: &'a FarAgentSpec, status: &'a FarAgentStatus, now: i64) -> Observation<'a> {
    Observation {
        spec,
        status,
        generation: Some(1),
        has_finalizer: true,
        deleting_since: None,
        vm: None,
        claimed: None,
        reusable: false,
        guest: Guest::default(),
        workload: Ok(()),
        placement: None,
        config: Ok(()),
        grace_period: Duration::from_secs(5),
        heartbeat_refresh: HEARTBEAT_REFRESH,
        listening_since: t(-1_000_000),
        now: t(now),
    }
}

fn fits() -> Placement {
    placed(false)
}

fn placed(bound: bool) -> Placement {
    Placement::Fits {
        host: "h1".into(),
        vm: VmSize {
            vcpu: 1,
            memory_mib: 1024,
        },
        message: "sized".into(),
        bound,
        claimed: None,
    }
}

fn binding() -> Binding {
    Binding {
        attempt: 0,
        host: "h1".into(),
        vm: VmSize {
            vcpu: 1,
            memory_mib: 1024,
        },
        claimed: None,
    }
}

fn present(state: VmState) -> Option<Vm> {
    Some(Vm::Present {
        uid: "vm1".into(),
        state,
        stopped: false,
        failure: None,
    })
}

/// Walks an agent through its whole life, feeding each decision's status into the next.
#[test]
fn an_agent_goes_from_accepted_to_completed_with_one_vm() {
    let spec = spec();
    let status = FarAgentStatus::default();
    let mut o = observe(&spec, &status, 0);
    o.has_finalizer = false;
    o.placement = Some(fits());
    let d = decide(&o);
    // The finalizer and the first attempt's binding: one metadata write, and no status yet.
    assert_eq!(d.actions, [Action::AddFinalizer, Action::Bind(binding())]);
    assert_eq!(d.status, status);

    let status = d.status;
    let mut o = observe(&spec, &status, 1);
    o.placement = Some(placed(true));
    let d = decide(&o);
    // Bound already: the VM is created, and the host goes into status with it.
    assert!(!d.actions.iter().any(|a| matches!(a, Action::Bind(_))));
    assert_eq!(
        d.status.host.as_deref(),
        Some("h1"),
        "host recorded before any VM"
    );
    assert_eq!(
        d.actions
            .iter()
            .filter(|a| matches!(a, Action::CreateVm { attempt: 0 }))
            .count(),
        1
    );
    assert_eq!(d.status.reason, Some(AgentReason::Provisioning));

    // The shell records the VM at once; the next decision, while Flintlock still says PENDING
    // and then CREATED, has nothing new to write.
    let status = vm_created(&d.status, &spec, "vm1", VmState::Pending, Some(1), t(2));
    let mut o = observe(&spec, &status, 3);
    o.vm = present(VmState::Pending);
    let d = decide(&o);
    assert_eq!(
        (d.status.phase, d.status.reason),
        (Some(Phase::Pending), Some(AgentReason::Booting)),
        "CREATED is not Running"
    );
    assert_eq!(d.status, status, "no write while booting");
    let mut o = observe(&spec, &status, 4);
    o.vm = present(VmState::Created);
    assert_eq!(
        decide(&o).status,
        status,
        "PENDING -> CREATED alone is not worth a write"
    );

    let status = d.status;
    let mut o = observe(&spec, &status, 5);
    o.vm = present(VmState::Created);
    o.guest.last_heartbeat = Some(t(4));
    let usage = |mib| GuestUsage {
        boot_to_entrypoint_ms: Some(900),
        memory_used_mib: mib,
        memory_total_mib: 480,
        cpu_used_ms: 10,
    };
    o.guest.usage = Some(usage(40));
    let d = decide(&o);
    assert_eq!(d.status.phase, Some(Phase::Running));
    assert_eq!(d.status.start_time, Some(Time(t(4))));
    assert_eq!(d.status.last_heartbeat_time, Some(Time(t(4))));
    assert_eq!(
        d.status.guest,
        Some(usage(40)),
        "usage summarised at Running"
    );

    // Heartbeats live in memory: status is not rewritten for each one, only when stale.
    let running = d.status.clone();
    let mut o = observe(&spec, &running, 7);
    o.vm = present(VmState::Created);
    o.guest.last_heartbeat = Some(t(6));
    o.guest.usage = Some(usage(41));
    assert_eq!(
        decide(&o).status,
        running,
        "a fresh heartbeat (new usage included) changes nothing to write"
    );
    let mut o = observe(&spec, &running, 305);
    o.vm = present(VmState::Created);
    o.guest.last_heartbeat = Some(t(304));
    o.guest.usage = Some(usage(99));
    let refreshed = decide(&o).status;
    assert_eq!(refreshed.last_heartbeat_time, Some(Time(t(304))));
    assert_eq!(refreshed.guest, Some(usage(99)), "and usage with it");

    let status = d.status;
    let mut o = observe(&spec, &status, 9);
    o.vm = present(VmState::Created);
    o.guest = Guest {
        last_heartbeat: Some(t(8)),
        exit: Some((0, None)),
        usage: None,
    };
    let d = decide(&o);
    assert_eq!(
        (d.status.phase, d.status.exit_code),
        (Some(Phase::Completed), Some(0))
    );
    assert!(
        d.actions.contains(&Action::DeleteVm { uid: "vm1".into() }),
        "a finished agent's VM is freed"
    );
    assert!(conditions::is_true(
        &d.status.conditions,
        agent_condition::FINISHED
    ));
}

#[test]
fn a_non_zero_exit_is_failed_or_restarted_with_backoff() {
    let mut spec = spec();
    let mut status = FarAgentStatus {
        phase: Some(Phase::Running),
        host: Some("h1".into()),
        vm_uid: Some("vm1".into()),
        ..Default::default()
    };
    let mut o = observe(&spec, &status, 0);
    o.vm = present(VmState::Created);
    o.guest.exit = Some((3, None));
    let d = decide(&o);
    assert_eq!(
        (d.status.phase, d.status.reason, d.status.exit_code),
        (Some(Phase::Failed), Some(AgentReason::Error), Some(3))
    );

    spec.restart_policy = RestartPolicy::OnFailure;
    let mut o = observe(&spec, &status, 0);
    o.vm = present(VmState::Created);
    o.guest.exit = Some((3, None));
    let d = decide(&o);
    assert_eq!(
        (d.status.phase, d.status.reason, d.status.restart_count),
        (Some(Phase::Pending), Some(AgentReason::BackOff), 1)
    );
    assert_eq!(d.requeue, Some(Duration::from_secs(10)));
    assert!(d.actions.contains(&Action::DeleteVm { uid: "vm1".into() }));
    assert_eq!(d.status.host, None, "a restart may go to another host");

    status = d.status;
    let mut o = observe(&spec, &status, 5);
    o.placement = Some(fits());
    assert!(
        decide(&o).actions.is_empty(),
        "nothing happens during the back-off"
    );
    let mut o = observe(&spec, &status, 11);
    o.placement = Some(fits());
    let d = decide(&o);
    assert_eq!(d.status.host.as_deref(), Some("h1"));
    let status = d.status;
    let mut o = observe(&spec, &status, 12);
    o.vm = Some(Vm::Absent);
    assert_eq!(
        decide(&o).actions,
        [Action::CreateVm { attempt: 1 }],
        "the restart is attempt 1"
    );
}

#[test]
fn a_stopped_vm_fails_the_agent_unless_its_exit_is_known() {
    let spec = spec();
    let running = FarAgentStatus {
        phase: Some(Phase::Running),
        host: Some("h1".into()),
        vm_uid: Some("vm1".into()),
        ..Default::default()
    };
    let stopped = Some(Vm::Present {
        uid: "vm1".into(),
        state: VmState::Created,
        stopped: true,
        failure: None,
    });
    let mut o = observe(&spec, &running, 10);
    o.vm = stopped.clone();
    o.guest.last_heartbeat = Some(t(9));
    let d = decide(&o);
    assert_eq!(
        (d.status.phase, d.status.reason, d.status.exit_code),
        (Some(Phase::Failed), Some(AgentReason::VMFailed), None)
    );
    assert!(d.actions.contains(&Action::DeleteVm { uid: "vm1".into() }));

    // The exit came first (it always does when the guest reports it): it decides.
    o.guest.exit = Some((0, None));
    assert_eq!(decide(&o).status.phase, Some(Phase::Completed));

    // A FAILED VM's reason, when the host gives one, reaches the message.
    let mut o = observe(&spec, &running, 10);
    o.vm = Some(Vm::Present {
        uid: "vm1".into(),
        state: VmState::Failed,
        stopped: false,
        failure: Some("kernel: image k has no file \"vmlinuz\"".into()),
    });
    assert_eq!(
        decide(&o).status.message.as_deref(),
        Some("Flintlock reports VM vm1 FAILED: kernel: image k has no file \"vmlinuz\"")
    );
}

#[test]
fn silence_fails_the_agent_with_the_right_reason() {
    let spec = spec();
    let mut booting = FarAgentStatus {
        host: Some("h1".into()),
        vm_uid: Some("vm1".into()),
        ..Default::default()
    };
    conditions::set(
        &mut booting.conditions,
        agent_condition::VM_CREATED,
        true,
        "Booting",
        "",
        Some(1),
        t(0),
    );
    let mut o = observe(&spec, &booting, 61);
    o.vm = present(VmState::Created);
    assert_eq!(decide(&o).status.reason, Some(AgentReason::BootTimeout));

    let running = FarAgentStatus {
        phase: Some(Phase::Running),
        host: Some("h1".into()),
        vm_uid: Some("vm1".into()),
        ..Default::default()
    };
    let mut o = observe(&spec, &running, 100);
    o.vm = present(VmState::Created);
    o.guest.last_heartbeat = Some(t(30));
    assert_eq!(decide(&o).status.reason, Some(AgentReason::HeartbeatLost));

    let mut o = observe(&spec, &running, 100);
    o.vm = Some(Vm::Unknown { since: t(90) });
    o.guest.last_heartbeat = Some(t(95));
    let d = decide(&o);
    assert_eq!(
        (d.status.phase, d.status.reason),
        (Some(Phase::Running), Some(AgentReason::HostUnreachable))
    );

    // The host answers again and the agent is heard: Running again, reason and all.
    let unreachable = d.status;
    let mut o = observe(&spec, &unreachable, 101);
    o.vm = present(VmState::Created);
    o.guest.last_heartbeat = Some(t(100));
    let d = decide(&o);
    assert_eq!(
        (d.status.phase, d.status.reason),
        (Some(Phase::Running), Some(AgentReason::Running))
    );

    let mut o = observe(&spec, &running, 100);
    o.vm = present(VmState::Failed);
    assert_eq!(decide(&o).status.reason, Some(AgentReason::VMFailed));
}

#[test]
fn deletion_waits_for_the_vm_but_not_forever_for_a_dead_host() {
    let spec = spec();
    let status = FarAgentStatus {
        phase: Some(Phase::Running),
        host: Some("h1".into()),
        vm_uid: Some("vm1".into()),
        ..Default::default()
    };
    let mut o = observe(&spec, &status, 10);
    o.deleting_since = Some(t(0));
    o.vm = present(VmState::Created);
    assert_eq!(decide(&o).actions, [Action::DeleteVm { uid: "vm1".into() }]);
    o.vm = present(VmState::Deleting);
    assert!(decide(&o).actions.is_empty());
    o.vm = Some(Vm::Absent);
    let d = decide(&o);
    assert!(
        matches!(
            &d.actions[..],
            [
                Action::Event {
                    reason: "Deleted",
                    ..
                },
                Action::RemoveFinalizer
            ]
        ),
        "the Event goes out before the agent does: {:?}",
        d.actions
    );
    assert_eq!(
        d.status, status,
        "an agent that goes at once is not written"
    );

    o.vm = Some(Vm::Unknown { since: t(0) });
    assert!(
        !decide(&o).actions.contains(&Action::RemoveFinalizer),
        "within the grace the host is waited for"
    );
    let mut o = observe(&spec, &status, 121);
    o.deleting_since = Some(t(0));
    o.vm = Some(Vm::Unknown { since: t(0) });
    let d = decide(&o);
    assert!(d.actions.contains(&Action::RemoveFinalizer));
    assert!(d.actions.iter().any(|a| matches!(
        a,
        Action::Event {
            warning: true,
            reason: "HostUnreachable",
            ..
        }
    )));
}

#[test]
fn a_live_agent_is_asked_to_stop_before_its_vm_goes() {
    let spec = spec();
    let status = FarAgentStatus {
        phase: Some(Phase::Running),
        host: Some("h1".into()),
        vm_uid: Some("vm1".into()),
        ..Default::default()
    };
    let mut o = observe(&spec, &status, 11);
    o.deleting_since = Some(t(10));
    o.vm = present(VmState::Created);
    o.guest.last_heartbeat = Some(t(9));
    let d = decide(&o);
    assert_eq!(d.actions, [Action::StopGuest]);
    assert_eq!(d.status.reason, Some(AgentReason::Terminating));
    assert_eq!(d.requeue, Some(Duration::from_secs(1)));

    // Its exit is in: the VM goes.
    o.guest.exit = Some((143, None));
    assert_eq!(decide(&o).actions, [Action::DeleteVm { uid: "vm1".into() }]);

    // No exit within a heartbeat interval, the grace period and the margin: the VM goes anyway.
    o.guest.exit = None;
    let waited = i64::from(spec.heartbeat.interval_seconds) + 5 + 5;
    let mut late = observe(&spec, &status, 10 + waited);
    late.deleting_since = o.deleting_since;
    late.vm = o.vm.clone();
    late.guest = o.guest.clone();
    assert_eq!(
        decide(&late).actions,
        [Action::DeleteVm { uid: "vm1".into() }]
    );
}

#[test]
fn past_its_deadline_a_live_agent_is_stopped_then_fails_with_its_code() {
    let mut spec = spec();
    spec.active_deadline_seconds = Some(10);
    let status = FarAgentStatus {
        phase: Some(Phase::Running),
        host: Some("h1".into()),
        vm_uid: Some("vm1".into()),
        start_time: Some(Time(t(0))),
        ..Default::default()
    };
    let mut o = observe(&spec, &status, 11);
    o.vm = present(VmState::Created);
    o.guest.last_heartbeat = Some(t(10));
    assert_eq!(decide(&o).actions, [Action::StopGuest]);

    o.guest.exit = Some((143, None));
    let d = decide(&o);
    assert_eq!(d.status.phase, Some(Phase::Failed));
    assert_eq!(d.status.reason, Some(AgentReason::DeadlineExceeded));
    assert_eq!(d.status.exit_code, Some(143));
    assert!(d.actions.contains(&Action::DeleteVm { uid: "vm1".into() }));

    // Silent past the stop window: failed without a code, the VM deleted.
    let mut late = observe(&spec, &status, 11 + 60);
    late.vm = present(VmState::Created);
    late.guest.last_heartbeat = Some(t(10));
    let d = decide(&late);
    assert_eq!(d.status.reason, Some(AgentReason::DeadlineExceeded));
    assert_eq!(d.status.exit_code, None);
    assert!(d.actions.contains(&Action::DeleteVm { uid: "vm1".into() }));
}

#[test]
fn deleting_a_finished_agent_whose_vm_was_freed_is_one_write() {
    let spec = spec();
    let status = FarAgentStatus {
        phase: Some(Phase::Completed),
        host: Some("h1".into()),
        vm_uid: Some("vm1".into()),
        exit_code: Some(0),
        ..Default::default()
    };
    let mut o = observe(&spec, &status, 10);
    o.deleting_since = Some(t(5));
    o.generation = Some(2);
    o.vm = Some(Vm::Absent);
    let d = decide(&o);
    assert_eq!(d.actions, [Action::RemoveFinalizer]);
    assert_eq!(d.status, status);
    // Deleted before its VM was freed: the VM goes, the outcome stays unwritten.
    o.vm = present(VmState::Created);
    let d = decide(&o);
    assert_eq!(d.actions, [Action::DeleteVm { uid: "vm1".into() }]);
    assert_eq!(d.status, status);
}

#[test]
fn missing_configuration_holds_the_agent_pending_without_a_vm() {
    let spec = spec();
    let status = FarAgentStatus {
        host: Some("h1".into()),
        ..Default::default()
    };
    let mut o = observe(&spec, &status, 0);
    o.vm = Some(Vm::Absent);
    o.config = Err((
        AgentReason::ConfigMissing,
        "secret \"creds\" not found".into(),
    ));
    let d = decide(&o);
    assert_eq!(d.status.reason, Some(AgentReason::ConfigMissing));
    assert_eq!(
        d.status.message.as_deref(),
        Some("secret \"creds\" not found")
    );
    assert!(d.actions.is_empty());
}

#[test]
fn backoff_doubles_to_five_minutes() {
    let waits: Vec<u64> = (0..8).map(|n| backoff(n).as_secs()).collect();
    assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300, 300]);
}

fn phases() -> impl Strategy<Value = Option<Phase>> {
    prop_oneof![
        Just(None),
        Just(Some(Phase::Pending)),
        Just(Some(Phase::Running)),
        Just(Some(Phase::Completed)),
        Just(Some(Phase::Failed))
    ]
}

fn vms() -> impl Strategy<Value = Option<Vm>> {
    prop_oneof![
        Just(None),
        Just(Some(Vm::Absent)),
        (0i64..200).prop_map(|s| Some(Vm::Unknown { since: t(s) })),
        prop_oneof![
            Just(VmState::Pending),
            Just(VmState::Created),
            Just(VmState::Failed),
            Just(VmState::Deleting)
        ]
        .prop_flat_map(
            |state| any::<bool>().prop_map(move |stopped| Some(Vm::Present {
                uid: "vm1".into(),
                state,
                stopped,
                failure: stopped.then(|| "kernel: image k has no file \"vmlinuz\"".to_owned()),
            }))
        ),
    ]
}

prop_compose! {
    fn observations()(
        phase in phases(),
        backoff_reason in any::<bool>(),
        host in any::<bool>(),
        vm_uid in any::<bool>(),
        restart_count in 0u32..4,
        on_failure in any::<bool>(),
        has_finalizer in any::<bool>(),
        deleting in proptest::option::of(0i64..300),
        vm in vms(),
        heartbeat in proptest::option::of(0i64..300),
        exit in proptest::option::of((-1i32..4, proptest::option::of(Just("no entrypoint".to_owned())))),
        placement in proptest::option::of(0u8..5),
        claimed in any::<bool>(),
        reusable in any::<bool>(),
        config_ok in any::<bool>(),
        workload in 0u8..3,
        ttl in proptest::option::of(0i64..100),
        deadline in proptest::option::of(1i64..100),
        started in proptest::option::of(0i64..300),
        now in 0i64..400,
    ) -> (FarAgentSpec, FarAgentStatus, bool, Option<i64>, Option<Vm>, Guest, Option<Placement>, (bool, u8, bool, bool), i64) {
        let mut s = spec();
        s.restart_policy = if on_failure { RestartPolicy::OnFailure } else { RestartPolicy::Never };
        s.ttl_seconds_after_finished = ttl;
        s.active_deadline_seconds = deadline;
        let status = FarAgentStatus {
            phase,
            reason: backoff_reason.then_some(AgentReason::BackOff),
            host: host.then(|| "h1".to_owned()),
            vm_uid: (host && vm_uid).then(|| "vm1".to_owned()),
            restart_count: restart_count.min(s.backoff_limit),
            start_time: started.map(|s| Time(t(s))),
            finish_time: phase.filter(|p| p.is_terminal()).map(|_| Time(t(0))),
            ..Default::default()
        };
        let guest = Guest { last_heartbeat: heartbeat.map(t), exit, usage: None };
        let placement = placement.map(|p| match p {
            0 => fits(),
            1 => placed(true),
            2 => Placement::Refused("h1 refused".into()),
            3 => claiming(),
            _ => Placement::Unschedulable("no host".into()),
        });
        (s, status, has_finalizer, deleting, vm, guest, placement, (config_ok, workload, claimed, claimed && reusable), now)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_decision_keeps_its_promises((spec, status, has_finalizer, deleting, vm, guest, placement, (config_ok, workload, claimed, reusable), now) in observations()) {
        let o = Observation {
            spec: &spec,
            status: &status,
            generation: Some(1),
            has_finalizer,
            deleting_since: deleting.map(t),
            vm,
            claimed: claimed.then_some(IDLE_VM),
            reusable,
            guest,
            workload: match workload {
                0 => Ok(()),
                1 => Err((AgentReason::PoolNotFound, "no pool".into())),
                _ => Err((AgentReason::InvalidSpec, "reshapes the pool's VM".into())),
            },
            placement,
            config: if config_ok {
                Ok(())
            } else {
                Err((AgentReason::ConfigMissing, "missing".into()))
            },
            grace_period: Duration::from_secs(5),
            heartbeat_refresh: HEARTBEAT_REFRESH,
            listening_since: t(-1_000_000),
            now: t(now),
        };
        let d = decide(&o);
        let creates = d.actions.iter().filter(|a| matches!(a, Action::CreateVm { .. })).count();

        // No way back from a terminal phase.
        if status.phase.is_some_and(Phase::is_terminal) {
            prop_assert_eq!(d.status.phase, status.phase);
            prop_assert_eq!(creates, 0);
        }
        // At most one VM per decision, only with a host, a finalizer, a decided workload and
        // resolved configuration, and never while deleting.
        prop_assert!(creates <= 1);
        if creates == 1 {
            prop_assert!(d.status.host.is_some() && has_finalizer && deleting.is_none() && config_ok && workload == 0);
            prop_assert!(status.vm_uid.is_none());
            // The attempt's host is on record before its VM is made: in status already, bound
            // earlier, or bound by this decision ahead of the create.
            let bound_here = d.actions.iter().position(|a| matches!(a, Action::Bind(_)));
            let create_at = d.actions.iter().position(|a| matches!(a, Action::CreateVm { .. }));
            let bound_before = matches!(o.placement, Some(Placement::Fits { bound: true, .. }));
            prop_assert!(
                status.host.is_some() || bound_before || (bound_here.is_some() && bound_here < create_at),
                "a VM made before its host is on record"
            );
        }
        // A claimed VM is the agent's: none is ever created for a claim, and the task is
        // offered only to the claimed VM, once it is found and while the agent lives.
        // (A placement counts only while the agent has no host.)
        let claiming = claimed
            || (status.host.is_none()
                && matches!(&o.placement, Some(Placement::Fits { claimed: Some(_), .. })));
        if claiming {
            prop_assert_eq!(creates, 0, "a VM created for a claim");
        }
        if d.actions.contains(&Action::OfferClaim) {
            prop_assert!(claimed && has_finalizer && deleting.is_none());
            let present = matches!(o.vm, Some(Vm::Present { .. }));
            prop_assert!(present, "a claim offered before its VM was found");
            prop_assert!(o.guest.exit.is_none() && !terminal_before(&status));
        }
        // A binding names the host the status will show.
        for a in &d.actions {
            if let Action::Bind(b) = a && has_finalizer {
                prop_assert_eq!(Some(&b.host), d.status.host.as_ref());
                prop_assert_eq!(b.attempt, d.status.restart_count);
            }
        }
        // The attempt is the restart count: a new attempt only after a recorded restart.
        for a in &d.actions {
            if let Action::CreateVm { attempt } = a {
                prop_assert_eq!(*attempt, d.status.restart_count);
            }
        }
        // Restarts only grow, within the limit.
        prop_assert!(d.status.restart_count >= status.restart_count);
        prop_assert!(d.status.restart_count <= spec.backoff_limit);
        // Every path ends terminal, lets the agent go, takes it in (the finalizer), or waits
        // with a reason.
        let released = d.actions.iter().any(|a| matches!(a, Action::RemoveFinalizer | Action::DeleteAgent | Action::AddFinalizer))
            || (deleting.is_some() && !has_finalizer);
        let terminal = d.status.phase.is_some_and(Phase::is_terminal);
        if !terminal && !released {
            prop_assert!(d.status.reason.is_some(), "a waiting agent says why");
        }
        // An agent with no timer is one that runs, heard from, in a VM its host has, with no
        // deadline: the heartbeat watch and the host probe look after it (`crate::liveness`).
        if !terminal && !released && d.requeue.is_none() {
            prop_assert_eq!(d.status.phase, Some(Phase::Running));
            prop_assert!(spec.active_deadline_seconds.is_none());
            prop_assert!(o.guest.last_heartbeat.is_some(), "no timer for an agent never heard");
            let present = matches!(o.vm, Some(Vm::Present { state: VmState::Pending | VmState::Created, stopped: false, .. }));
            prop_assert!(present, "no timer for an agent whose VM is not known to run");
        }
        // A terminal agent's VM is always on its way out (once the finalizer guards it):
        // deleted, or given back to its pool.
        let returned = d.actions.contains(&Action::ReturnVm);
        if terminal && has_finalizer && let Some(Vm::Present { state, .. }) = &o.vm {
            let deleting_vm = d.actions.iter().any(|a| matches!(a, Action::DeleteVm { .. }));
            prop_assert!(*state == VmState::Deleting || deleting_vm || returned || deleting.is_some(), "VM left running");
        }
        // A VM goes back to its pool only when reusable and its guest reported the exit (it
        // resets itself then), never also deleted, and the status stops naming it.
        if returned {
            prop_assert!(reusable && o.guest.exit.is_some());
            let deletes = d.actions.iter().any(|a| matches!(a, Action::DeleteVm { .. }));
            prop_assert!(!deletes, "a returned VM deleted too");
            prop_assert!(d.status.vm_uid.is_none());
        }
    }
}

prop_compose! {
    /// An agent whose VM runs and whose guest reports: booting, running, or running with its
    /// host's API silent a while; its `lastHeartbeatTime` recorded at some time or never.
    fn heard_from()(
        phase in prop_oneof![Just(Phase::Pending), Just(Phase::Running)],
        reason in prop_oneof![Just(AgentReason::Booting), Just(AgentReason::Running), Just(AgentReason::HostUnreachable)],
        state in prop_oneof![Just(VmState::Pending), Just(VmState::Created)],
        timeout in 2u32..120,
        deadline in proptest::option::of(1i64..1_000),
        recorded in proptest::option::of(-600i64..0),
        silent in 0i64..150,
    ) -> (FarAgentSpec, FarAgentStatus, VmState, i64) {
        let mut s = spec();
        s.heartbeat.timeout_seconds = timeout;
        s.active_deadline_seconds = deadline;
        let status = FarAgentStatus {
            phase: Some(phase),
            reason: Some(reason),
            host: Some("h1".into()),
            vm_uid: Some("vm1".into()),
            start_time: (phase == Phase::Running).then(|| Time(t(-700))),
            last_heartbeat_time: recorded.map(|r| Time(t(r))),
            ..Default::default()
        };
        (s, status, state, silent)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// A running agent heard within its timeout keeps no timer but its deadline's, and what
    /// time alone changes for it is exactly what `heard` tells the heartbeat watch: decided
    /// again later on the same reports, it stays as it is while its heartbeats are Fresh.
    #[test]
    fn the_heartbeat_watch_sees_every_change_time_makes_to_a_running_agent((spec, status, state, silent) in heard_from()) {
        let mut o = observe(&spec, &status, 0);
        o.vm = present(state);
        o.guest.last_heartbeat = Some(t(-silent));
        o.heartbeat_refresh = heartbeat_refresh(&format!("uid-{silent}"));
        let d = decide(&o);
        let timeout = Duration::from_secs(spec.heartbeat.timeout_seconds.into());
        if spec.active_deadline_seconds.is_some_and(|limit| limit <= 700 || status.phase != Some(Phase::Running)) {
            // Past its deadline, or started just now with one: its timer is that deadline.
            return Ok(());
        }
        if silent >= i64::from(spec.heartbeat.timeout_seconds) {
            prop_assert_eq!(d.status.reason, Some(AgentReason::HeartbeatLost));
            return Ok(());
        }
        prop_assert_eq!(d.status.phase, Some(Phase::Running));
        let deadline = spec.active_deadline_seconds.map(|limit| Duration::from_secs((limit - 700).unsigned_abs()));
        prop_assert_eq!(d.requeue, deadline, "a running agent's only timer is its deadline");
        for later in [0, 1, 29, 30, 59, 60, 61, 119, 120, 239, 240, 299, 300, 301, 359, 360, 1_000] {
            let mut again = o.clone();
            again.status = &d.status;
            again.now = t(later);
            let next = decide(&again);
            let still = next.status == d.status && next.actions.is_empty();
            let recorded = d.status.last_heartbeat_time.as_ref();
            let fresh = heard(t(-silent), recorded, timeout, o.heartbeat_refresh, again.now) == Heard::Fresh;
            let deadline_passed = deadline.is_some_and(|d| later >= d.as_secs() as i64);
            if !deadline_passed {
                prop_assert_eq!(still, fresh, "{} s later: {:?}", later, next.status);
            }
        }
    }
}

fn terminal_before(status: &FarAgentStatus) -> bool {
    status.phase.is_some_and(Phase::is_terminal)
}

const IDLE_VM: &str = "ns.warm.7.pool-uid";

fn claiming() -> Placement {
    claim(false)
}

fn claim(bound: bool) -> Placement {
    Placement::Fits {
        host: "h1".into(),
        vm: VmSize {
            vcpu: 1,
            memory_mib: 1024,
        },
        message: "claimed".into(),
        bound,
        claimed: Some(IDLE_VM.into()),
    }
}

/// A claim's whole life: the claimed VM on record with the finalizer, then found and offered
/// the task (WarmStart), Running on the task's first heartbeat, and destroyed after the exit.
#[test]
fn a_claim_binds_the_idle_vm_offers_it_the_task_and_never_creates_one() {
    let mut spec = spec();
    spec.pool_ref = Some(far_api::PoolRef {
        name: "warm".into(),
    });
    let status = FarAgentStatus::default();
    let mut o = observe(&spec, &status, 0);
    o.has_finalizer = false;
    o.placement = Some(claiming());
    let d = decide(&o);
    let mut claimed = binding();
    claimed.claimed = Some(IDLE_VM.into());
    assert_eq!(d.actions, [Action::AddFinalizer, Action::Bind(claimed)]);

    // Bound: the claimed VM is found on its host; its uid is recorded and the task offered.
    let mut o = observe(&spec, &status, 1);
    o.placement = Some(claim(true));
    o.claimed = Some(IDLE_VM);
    o.vm = present(VmState::Created);
    let d = decide(&o);
    assert!(d.actions.contains(&Action::OfferClaim), "{:?}", d.actions);
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::CreateVm { .. }))
    );
    assert_eq!(d.status.vm_uid.as_deref(), Some("vm1"));
    let created = d
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == agent_condition::VM_CREATED)
        .unwrap();
    assert_eq!(created.reason, "WarmStart");
    assert_eq!(
        created.message,
        "claimed idle VM vm1 of pool warm on host h1"
    );

    // The task reports in: Running, and the claim is not offered again.
    let status = d.status;
    let mut o = observe(&spec, &status, 2);
    o.claimed = Some(IDLE_VM);
    o.vm = present(VmState::Created);
    o.guest.last_heartbeat = Some(t(2));
    let d = decide(&o);
    assert_eq!(d.status.phase, Some(Phase::Running));
    assert!(!d.actions.contains(&Action::OfferClaim));

    // It exits: the VM is destroyed (reuse: Never), never handed out again.
    let status = d.status;
    let mut o = observe(&spec, &status, 3);
    o.claimed = Some(IDLE_VM);
    o.vm = present(VmState::Created);
    o.guest.exit = Some((0, None));
    let d = decide(&o);
    assert_eq!(d.status.phase, Some(Phase::Completed));
    assert!(d.actions.contains(&Action::DeleteVm { uid: "vm1".into() }));

    // reuse: Reset: the VM goes back to its pool (its guest resets it) and the agent's status
    // stops naming it; the exit code is kept.
    o.reusable = true;
    let d = decide(&o);
    assert_eq!(d.status.phase, Some(Phase::Completed));
    assert_eq!(
        d.actions.first(),
        Some(&Action::ReturnVm),
        "{:?}",
        d.actions
    );
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::DeleteVm { .. }))
    );
    assert_eq!((d.status.vm_uid, d.status.exit_code), (None, Some(0)));

    // A guest that never reported an exit (lost, hung) leaves doubt: the VM is deleted.
    let lost = FarAgentStatus {
        phase: Some(Phase::Running),
        ..status
    };
    let mut o = observe(&spec, &lost, 300);
    o.claimed = Some(IDLE_VM);
    o.reusable = true;
    o.vm = present(VmState::Created);
    o.guest.last_heartbeat = Some(t(2));
    let d = decide(&o);
    assert_eq!(d.status.reason, Some(AgentReason::HeartbeatLost));
    assert!(d.actions.contains(&Action::DeleteVm { uid: "vm1".into() }));
    assert!(!d.actions.contains(&Action::ReturnVm));
}

/// The claimed idle VM vanished before it was found (its host lost it): the agent fails with a
/// reason that says so, and no VM is created under the pool's name.
#[test]
fn a_claimed_vm_gone_before_it_took_the_claim_fails_the_attempt() {
    let mut spec = spec();
    spec.pool_ref = Some(far_api::PoolRef {
        name: "warm".into(),
    });
    let status = FarAgentStatus::default();
    let mut o = observe(&spec, &status, 1);
    o.placement = Some(claim(true));
    o.claimed = Some(IDLE_VM);
    o.vm = Some(Vm::Absent);
    let d = decide(&o);
    assert_eq!(d.status.phase, Some(Phase::Failed));
    assert_eq!(d.status.reason, Some(AgentReason::VMFailed));
    assert!(
        d.status.message.as_deref().unwrap().contains(IDLE_VM),
        "{:?}",
        d.status.message
    );
    assert!(
        !d.actions
            .iter()
            .any(|a| matches!(a, Action::CreateVm { .. }))
    );
}

/// The write after a VM's creation was lost and the agent exited before a reconcile recorded
/// the VM: the exit's status still names the VM, so it is found and freed later.
#[test]
fn an_exit_records_the_vm_found_by_name_that_status_never_had() {
    let spec = spec();
    let status = FarAgentStatus {
        host: Some("h1".into()),
        ..Default::default()
    };
    let mut o = observe(&spec, &status, 5);
    o.vm = present(VmState::Created);
    o.guest.exit = Some((0, None));
    let d = decide(&o);
    assert_eq!(d.status.phase, Some(Phase::Completed));
    assert_eq!(d.status.vm_uid.as_deref(), Some("vm1"));
    assert!(d.actions.contains(&Action::DeleteVm { uid: "vm1".into() }));
}

#[test]
fn conditions_are_listed_in_the_order_of_a_life_and_say_what_happened() {
    let mut status = FarAgentStatus {
        host: Some("h1".into()),
        ..Default::default()
    };
    for kind in [agent_condition::FINISHED, agent_condition::SCHEDULED] {
        conditions::set(&mut status.conditions, kind, false, "X", "", Some(1), t(0));
    }
    let created = vm_created(&status, &spec(), "vm1", VmState::Pending, Some(1), t(1));
    let kinds: Vec<&str> = created
        .conditions
        .iter()
        .map(|c| c.type_.as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            agent_condition::SCHEDULED,
            agent_condition::VM_CREATED,
            agent_condition::FINISHED
        ]
    );
    assert_eq!(created.conditions[1].message, "VM vm1 created on host h1");
}

/// An agent naming a pool that does not exist waits for it, saying so; one that would reshape
/// its pool's VM fails at once, with the message naming the field.
#[test]
fn a_missing_pool_waits_and_a_reshaping_claim_fails() {
    let spec = spec();
    let status = FarAgentStatus::default();
    let mut o = observe(&spec, &status, 1);
    o.workload = Err((
        AgentReason::PoolNotFound,
        "spec.poolRef: no FarAgentPool \"warm\"".into(),
    ));
    o.placement = None;
    let d = decide(&o);
    assert_eq!(d.status.phase, Some(Phase::Pending));
    assert_eq!(d.status.reason, Some(AgentReason::PoolNotFound));
    assert!(d.requeue.is_some());
    assert!(d.actions.is_empty());

    o.workload = Err((AgentReason::InvalidSpec, "spec.cpu is 2 but pool".into()));
    let d = decide(&o);
    assert_eq!(d.status.phase, Some(Phase::Failed));
    assert_eq!(d.status.reason, Some(AgentReason::InvalidSpec));
    assert!(d.status.message.unwrap().contains("spec.cpu"));
}

#[test]
fn a_cold_start_says_so_in_the_vm_created_condition() {
    let status = FarAgentStatus {
        host: Some("h1".into()),
        ..Default::default()
    };
    let mut pooled = spec();
    pooled.pool_ref = Some(far_api::PoolRef {
        name: "warm".into(),
    });
    let s = vm_created(&status, &pooled, "vm1", VmState::Pending, Some(1), t(1));
    let c = s
        .conditions
        .iter()
        .find(|c| c.type_ == agent_condition::VM_CREATED)
        .unwrap();
    assert_eq!(c.reason, "ColdStart");
    assert_eq!(
        c.message,
        "pool warm had no idle VM: VM vm1 created on host h1 (cold start)"
    );
    assert_eq!(s.reason, Some(AgentReason::Booting));
}

/// A cold VM of a pool's agent found by name (the write after its creation was lost) still
/// says it was a cold start, as it would have had the write landed.
#[test]
fn an_adopted_cold_vm_of_a_pools_agent_is_a_cold_start() {
    let mut spec = spec();
    spec.pool_ref = Some(far_api::PoolRef {
        name: "warm".into(),
    });
    let status = FarAgentStatus {
        host: Some("h1".into()),
        ..Default::default()
    };
    let mut o = observe(&spec, &status, 1);
    o.vm = present(VmState::Created);
    let d = decide(&o);
    let c = d
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == agent_condition::VM_CREATED)
        .unwrap();
    assert_eq!(c.reason, "ColdStart");
    assert!(!d.actions.contains(&Action::OfferClaim));
}

/// A controller that just started has heard nothing yet: a running agent whose VM is older
/// than the heartbeat timeout is not failed for silence that predates the controller.
#[test]
fn a_running_agent_is_not_failed_for_silence_before_the_controller_started() {
    let spec = spec();
    let mut status = FarAgentStatus {
        host: Some("h1".into()),
        vm_uid: Some("vm1".into()),
        phase: Some(Phase::Running),
        reason: Some(AgentReason::Running),
        ..Default::default()
    };
    conditions::set(
        &mut status.conditions,
        agent_condition::VM_CREATED,
        true,
        "Booting",
        "VM vm1 created on host h1",
        Some(1),
        t(0),
    );
    let mut o = observe(&spec, &status, 1000);
    o.vm = present(VmState::Created);
    o.listening_since = t(995);
    let d = decide(&o);
    assert_eq!(d.status.phase, Some(Phase::Running), "{:?}", d.status);
    assert!(d.requeue.is_some());
    // Silent for the whole timeout since the controller started: lost.
    let mut o = observe(&spec, &status, 1100);
    o.vm = present(VmState::Created);
    o.listening_since = t(995);
    let d = decide(&o);
    assert_eq!(d.status.phase, Some(Phase::Failed));
    assert_eq!(d.status.reason, Some(AgentReason::HeartbeatLost));
}

#[test]
fn each_agent_refreshes_its_heartbeat_time_on_a_period_of_its_own_around_five_minutes() {
    let periods: Vec<Duration> = (0..1_000)
        .map(|i| heartbeat_refresh(&format!("0123abcd-0000-4000-8000-{i:012}")))
        .collect();
    let (low, high) = (
        HEARTBEAT_REFRESH - HEARTBEAT_REFRESH_SPREAD,
        HEARTBEAT_REFRESH + HEARTBEAT_REFRESH_SPREAD,
    );
    assert!(periods.iter().all(|p| (low..high).contains(p)));
    assert_eq!(
        periods[7],
        heartbeat_refresh("0123abcd-0000-4000-8000-000000000007")
    );
    // Spread over the whole window: agents created together do not refresh together.
    let per_tenth = |k: u32| {
        let from = low + (high - low) * k / 10;
        periods
            .iter()
            .filter(|p| (from..from + (high - low) / 10).contains(p))
            .count()
    };
    assert!(
        (0..10).all(|k| (50..150).contains(&per_tenth(k))),
        "{:?}",
        (0..10).map(per_tenth).collect::<Vec<_>>()
    );
}
