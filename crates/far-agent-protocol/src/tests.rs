use proptest::prelude::*;

use super::*;

fn config() -> RunConfig {
    RunConfig {
        version: RUN_CONFIG_VERSION,
        task: Some(Task {
            agent: AgentRef {
                namespace: "default".into(),
                name: "embedder-worker-01".into(),
                uid: "u-1".into(),
                attempt: 0,
            },
            hostname: "embedder-worker-01".into(),
            entrypoint: "/usr/local/bin/tiffany".into(),
            args: vec!["--task".into(), "embedder".into()],
            env: vec![EnvVar {
                name: "RUST_LOG".into(),
                value: "info".into(),
            }],
            has_secrets: false,
            heartbeat_interval_seconds: 10,
        }),
        mounts: vec![Mount {
            index: 0,
            mount_path: "/models".into(),
        }],
        channel: ChannelConfig {
            url: "http://10.0.2.2:8443".into(),
            id: channel_id("u-1", 0),
            enrolment_token: "tok".into(),
        },
        grace_period_seconds: 30,
        reusable: false,
    }
}

#[test]
fn a_run_config_round_trips_through_its_bytes() {
    assert_eq!(RunConfig::parse(&config().to_bytes()).unwrap(), config());
}

#[test]
fn other_versions_are_refused_by_number() {
    let mut value = serde_json::to_value(config()).unwrap();
    value["version"] = 1.into();
    let err = RunConfig::parse(value.to_string().as_bytes()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "run configuration version 1 is not supported (this far-init reads version 5)"
    );
}

#[test]
fn unknown_fields_and_bad_values_are_refused_by_name() {
    let mut value = serde_json::to_value(config()).unwrap();
    value["surprise"] = true.into();
    assert!(matches!(
        RunConfig::parse(value.to_string().as_bytes()),
        Err(RunConfigError::Malformed(_))
    ));

    let mut relative = config();
    relative.task.as_mut().unwrap().entrypoint = "tiffany".into();
    let err = RunConfig::parse(&relative.to_bytes()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "run configuration field task.entrypoint: must be an absolute path"
    );

    let mut escape = config();
    escape.mounts[0].mount_path = "/models/../etc".into();
    assert!(matches!(
        RunConfig::parse(&escape.to_bytes()),
        Err(RunConfigError::Invalid {
            field: "mounts",
            ..
        })
    ));
}

/// A pool's idle VM boots without a task; the task comes later, in a claim, and is checked by
/// the same rules.
#[test]
fn an_idle_vms_config_has_no_task_and_a_claims_task_is_checked_alike() {
    let mut idle = config();
    let task = idle.task.take().unwrap();
    assert_eq!(RunConfig::parse(&idle.to_bytes()).unwrap(), idle);
    let claim = Claim {
        task: task.clone(),
        secrets: Secrets::default(),
        run: RunGrant {
            id: "u.0".into(),
            token: "run-token".into(),
        },
    };
    let text = serde_json::to_string(&claim).unwrap();
    let back: Claim = serde_json::from_str(&text).unwrap();
    assert_eq!(back, claim);
    back.task.check().unwrap();
    let mut bad = task;
    bad.env[0].name = "A=B".into();
    assert_eq!(
        bad.check().unwrap_err().to_string(),
        "run configuration field task.env: names must be non-empty, without '=' or NUL"
    );
}

#[test]
fn oversized_configs_are_refused_before_parsing() {
    let huge = vec![b' '; limits::RUN_CONFIG_BYTES + 1];
    assert!(matches!(
        RunConfig::parse(&huge),
        Err(RunConfigError::TooLarge(_))
    ));
}

#[test]
fn debug_output_never_shows_the_token_or_secret_values() {
    let shown = format!("{:?}", config());
    assert!(!shown.contains("\"tok\""), "{shown}");
    let secrets = Secrets {
        env: vec![EnvVar {
            name: "API_KEY".into(),
            value: "sk-live-123".into(),
        }],
        files: vec![SecretFile {
            path: "/run/creds/key".into(),
            content: "c2VjcmV0".into(),
        }],
    };
    let shown = format!("{secrets:?}");
    assert!(
        shown.contains("API_KEY") && !shown.contains("sk-live-123") && !shown.contains("c2VjcmV0")
    );
    let shown = format!(
        "{:?}",
        Enrolment {
            token: "agent-token".into()
        }
    );
    assert!(!shown.contains("agent-token"), "{shown}");
    let shown = format!(
        "{:?}",
        RunGrant {
            id: "u-1.0".into(),
            token: "run-token".into()
        }
    );
    assert!(
        shown.contains("u-1.0") && !shown.contains("run-token"),
        "{shown}"
    );
}

#[test]
fn channel_paths_are_per_agent() {
    assert_eq!(
        paths::for_agent(paths::HEARTBEAT, &channel_id("u-1", 2)),
        "/v1/agents/u-1.2/heartbeat"
    );
}

proptest! {
    #[test]
    fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = RunConfig::parse(&bytes);
    }

    #[test]
    fn any_valid_config_round_trips(
        args in proptest::collection::vec(".{0,20}", 0..5),
        env in proptest::collection::vec(("[A-Z_]{1,8}", ".{0,20}"), 0..5),
        interval in 1u32..3600,
    ) {
        let mut c = config();
        let task = c.task.as_mut().unwrap();
        task.args = args;
        task.env = env.into_iter().map(|(name, value)| EnvVar { name, value }).collect();
        task.heartbeat_interval_seconds = interval;
        prop_assert_eq!(RunConfig::parse(&c.to_bytes()).unwrap(), c);
    }
}
