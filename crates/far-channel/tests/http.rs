//! The channel over real HTTP: what agents can do with their own token, and what they cannot
//! do with anyone else's or with bad bodies.

use std::time::Duration;

use far_agent_protocol::{
    AgentRef, Claim, Enrolment, EnvVar, Exit, Heartbeat, HeartbeatReply, LogBatch, LogLine,
    RunGrant, Secrets, Stream, Task, limits,
};
use far_channel::{Channel, Config, Event, TokenKey};
use reqwest::StatusCode;

async fn serve(config: Config) -> (Channel, String) {
    let channel = Channel::new(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = channel.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (channel, base)
}

fn config() -> Config {
    Config::new(TokenKey::new(vec![42; 32]).unwrap())
}

fn beat() -> Heartbeat {
    Heartbeat {
        boot_to_entrypoint_ms: Some(900),
        memory_used_bytes: 1,
        memory_total_bytes: 2,
        cpu_used_ms: 3,
    }
}

/// reqwest has rustls without a provider of its own (see far_tls).
fn client() -> reqwest::Client {
    far_tls::install();
    reqwest::Client::new()
}

async fn post<T: serde::Serialize>(
    base: &str,
    uid: &str,
    route: &str,
    token: &str,
    body: &T,
) -> StatusCode {
    client()
        .post(format!("{base}/v1/agents/{uid}/{route}"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn an_agent_reports_heartbeats_logs_and_exit_and_the_owner_hears_each_once() {
    let (channel, base) = serve(config()).await;
    let mut events = channel.subscribe();
    let token = channel.token_for("a");

    assert_eq!(
        post(&base, "a", "heartbeat", &token, &beat()).await,
        StatusCode::OK
    );
    assert_eq!(
        post(&base, "a", "heartbeat", &token, &beat()).await,
        StatusCode::OK
    );
    let batch = LogBatch {
        seq: 0,
        lines: vec![LogLine {
            stream: Stream::Stdout,
            text: "hello".into(),
        }],
    };
    assert_eq!(
        post(&base, "a", "logs", &token, &batch).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        post(&base, "a", "logs", &token, &batch).await,
        StatusCode::NO_CONTENT,
        "a retried batch is accepted"
    );
    let exit = Exit {
        code: 3,
        start_error: None,
    };
    assert_eq!(
        post(&base, "a", "exit", &token, &exit).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        post(&base, "a", "exit", &token, &exit).await,
        StatusCode::NO_CONTENT,
        "a retried exit is accepted"
    );

    let mut seen = Vec::new();
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(200), events.recv()).await
    {
        seen.push(event);
    }
    assert_eq!(
        seen,
        [
            Event::Heartbeat {
                uid: "a".into(),
                first: true,
                heartbeat: beat()
            },
            Event::Heartbeat {
                uid: "a".into(),
                first: false,
                heartbeat: beat()
            },
            Event::Logs {
                uid: "a".into(),
                lines: batch.lines.clone()
            },
            Event::Exited {
                uid: "a".into(),
                exit: exit.clone()
            },
        ]
    );
    assert_eq!(
        channel.logs("a").unwrap(),
        batch.lines,
        "the retried batch is kept once"
    );
    assert_eq!(channel.view("a").unwrap().exit, Some(exit));
}

/// The run configuration (kept in the host's records) carries only an enrolment token: it is
/// good once, for its own agent, for enrolment alone.
#[tokio::test]
async fn enrolment_is_once_and_its_token_opens_nothing_else() {
    let (channel, base) = serve(config()).await;
    let enrol = |uid: &str, bearer: String| {
        client()
            .post(format!("{base}/v1/agents/{uid}/enrol"))
            .bearer_auth(bearer)
            .send()
    };
    let answer = enrol("a", channel.enrolment_token_for("a")).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let enrolment: Enrolment = answer.json().await.unwrap();
    assert_eq!(enrolment.token, channel.token_for("a"));
    assert_eq!(
        post(&base, "a", "heartbeat", &enrolment.token, &beat()).await,
        StatusCode::OK,
        "the answered token is the agent's"
    );

    let again = enrol("a", channel.enrolment_token_for("a")).await.unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT, "spent");
    let foreign = enrol("b", channel.enrolment_token_for("a")).await.unwrap();
    assert_eq!(foreign.status(), StatusCode::UNAUTHORIZED);
    let agent_token = enrol("c", channel.token_for("c")).await.unwrap();
    assert_eq!(agent_token.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        post(
            &base,
            "d",
            "heartbeat",
            &channel.enrolment_token_for("d"),
            &beat()
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "an enrolment token is no agent token"
    );

    // A run known to have reported in (a controller restarted since) stays closed.
    channel.close_enrolment("e");
    let closed = enrol("e", channel.enrolment_token_for("e")).await.unwrap();
    assert_eq!(closed.status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_stop_request_is_the_answer_to_the_next_heartbeat() {
    let (channel, base) = serve(config()).await;
    let token = channel.token_for("a");
    let beat_answer = || async {
        client()
            .post(format!("{base}/v1/agents/a/heartbeat"))
            .bearer_auth(&token)
            .json(&beat())
            .send()
            .await
            .unwrap()
            .json::<HeartbeatReply>()
            .await
            .unwrap()
    };
    assert_eq!(beat_answer().await, HeartbeatReply { stop: false });
    channel.request_stop("a");
    assert_eq!(beat_answer().await, HeartbeatReply { stop: true });
    assert_eq!(
        beat_answer().await,
        HeartbeatReply { stop: true },
        "until it stops"
    );
}

fn task_claim(channel: &Channel) -> Claim {
    Claim {
        task: Task {
            agent: AgentRef {
                namespace: "n".into(),
                name: "pooled".into(),
                uid: "agent-uid".into(),
                attempt: 0,
            },
            hostname: "pooled".into(),
            entrypoint: "/bin/agent".into(),
            args: vec!["--go".into()],
            env: vec![],
            has_secrets: false,
            heartbeat_interval_seconds: 1,
        },
        secrets: Secrets {
            env: vec![EnvVar {
                name: "API_KEY".into(),
                value: "sk-1".into(),
            }],
            files: vec![],
        },
        run: RunGrant {
            id: "agent-uid.0".into(),
            token: channel.token_for("agent-uid.0"),
        },
    }
}

/// An idle VM waits on the channel for its task: it is said to be idle once, its waiting
/// request is answered the moment a claim is offered, the same claim again if it asks again
/// before its task reports in on its own run id, and no longer after; another VM's token gets
/// nothing. Reset and waiting again, it is said to be idle again.
#[tokio::test]
async fn an_idle_vm_gets_its_claim_the_moment_it_is_offered_and_only_it() {
    let (channel, base) = serve(config()).await;
    let mut events = channel.subscribe();
    let token = channel.token_for("vm-1");
    let ask = |token: String| {
        let url = format!("{base}/v1/agents/vm-1/claim");
        async move { client().get(url).bearer_auth(token).send().await.unwrap() }
    };
    let waiting = tokio::spawn(ask(token.clone()));
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .unwrap(),
        Event::Idle { uid: "vm-1".into() }
    );
    assert!(channel.view("vm-1").unwrap().idle);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "held until a claim comes");

    let offered = std::time::Instant::now();
    channel.offer_claim("vm-1", task_claim(&channel));
    let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    println!(
        "claim offered -> answered: {:.1} ms",
        offered.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.json::<Claim>().await.unwrap(), task_claim(&channel));
    assert!(!channel.view("vm-1").unwrap().idle);

    // The answer lost on its way: asked again, the same claim.
    let again = ask(token.clone()).await;
    assert_eq!(again.json::<Claim>().await.unwrap(), task_claim(&channel));
    // Someone else's token: refused, and nothing is said.
    let foreign = ask(channel.token_for("vm-2")).await;
    assert_eq!(foreign.status(), StatusCode::UNAUTHORIZED);

    // The run's routes open with the token of the claim only: its enrolment token is spent.
    let run_token = task_claim(&channel).run.token;
    assert_eq!(
        post(
            &base,
            "agent-uid.0",
            "enrol",
            &channel.enrolment_token_for("agent-uid.0"),
            &()
        )
        .await,
        StatusCode::CONFLICT
    );
    // Its task reports in on the run's id: the claim (with its secret values) is gone from the
    // channel.
    assert_eq!(
        post(&base, "agent-uid.0", "heartbeat", &run_token, &beat()).await,
        StatusCode::OK
    );
    let next = events.recv().await.unwrap();
    assert!(
        matches!(&next, Event::Heartbeat { uid, first: true, .. } if uid == "agent-uid.0"),
        "{next:?}"
    );
    let later = tokio::time::timeout(Duration::from_millis(300), ask(token.clone())).await;
    assert!(
        later.is_err(),
        "no claim is handed out twice after the task ran"
    );
    assert_eq!(
        events.recv().await.unwrap(),
        Event::Idle { uid: "vm-1".into() },
        "a VM waiting again after its task (reset for reuse) is idle again"
    );
    assert!(channel.view("vm-1").unwrap().idle);
    assert!(channel.view("agent-uid.0").unwrap().exit.is_none());
}

#[tokio::test]
async fn a_foreign_token_is_refused_and_changes_nothing() {
    let (channel, base) = serve(config()).await;
    let theirs = channel.token_for("b");
    for route in ["heartbeat", "exit"] {
        let status = if route == "exit" {
            post(
                &base,
                "a",
                route,
                &theirs,
                &Exit {
                    code: 0,
                    start_error: None,
                },
            )
            .await
        } else {
            post(&base, "a", route, &theirs, &beat()).await
        };
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let status = client()
        .post(format!("{base}/v1/agents/a/heartbeat"))
        .json(&beat())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token");
    assert_eq!(channel.view("a"), None, "nothing recorded for agent a");

    channel.provide_secrets(
        "a",
        Secrets {
            env: vec![EnvVar {
                name: "K".into(),
                value: "v".into(),
            }],
            files: vec![],
        },
    );
    let stolen = client()
        .get(format!("{base}/v1/agents/a/secrets"))
        .bearer_auth(&theirs)
        .send()
        .await
        .unwrap();
    assert_eq!(stolen.status(), StatusCode::UNAUTHORIZED);
    let own = client()
        .get(format!("{base}/v1/agents/a/secrets"))
        .bearer_auth(channel.token_for("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), StatusCode::OK);
    assert_eq!(own.json::<Secrets>().await.unwrap().env[0].value, "v");
    let again = client()
        .get(format!("{base}/v1/agents/a/secrets"))
        .bearer_auth(channel.token_for("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        StatusCode::NOT_FOUND,
        "secret values are handed out once"
    );
}

#[tokio::test]
async fn malformed_and_oversized_bodies_get_4xx() {
    let (channel, base) = serve(config()).await;
    let token = channel.token_for("a");
    let client = client();
    let send = |body: Vec<u8>| {
        client
            .post(format!("{base}/v1/agents/a/heartbeat"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(
        send(b"{not json".to_vec()).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send(br#"{"surprise":1}"#.to_vec()).await.unwrap().status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let huge = vec![b' '; limits::REQUEST_BYTES + 1];
    assert_eq!(
        send(huge).await.unwrap().status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let too_many = LogBatch {
        seq: 0,
        lines: vec![
            LogLine {
                stream: Stream::Stdout,
                text: String::new()
            };
            limits::LOG_LINES_PER_BATCH + 1
        ],
    };
    assert_eq!(
        post(&base, "a", "logs", &token, &too_many).await,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn a_flooding_agent_is_slowed_and_its_log_buffer_stays_bounded() {
    let mut config = config();
    config.requests_per_second = 5;
    config.log_lines_per_agent = 3;
    let (channel, base) = serve(config).await;
    let token = channel.token_for("a");
    let mut statuses = Vec::new();
    for seq in 0..8 {
        let batch = LogBatch {
            seq,
            lines: vec![LogLine {
                stream: Stream::Stderr,
                text: format!("line {seq}"),
            }],
        };
        statuses.push(post(&base, "a", "logs", &token, &batch).await);
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::NO_CONTENT)
            .count(),
        5
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count(),
        3
    );
    let kept: Vec<String> = channel
        .logs("a")
        .unwrap()
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert_eq!(kept, ["line 2", "line 3", "line 4"]);
}

/// Long lines are bounded by bytes as well as by count: the newest lines within the budget stay.
#[tokio::test]
async fn an_agents_log_buffer_is_bounded_in_bytes() {
    let mut config = config();
    config.log_bytes_per_agent = 250;
    let (channel, base) = serve(config).await;
    let token = channel.token_for("a");
    let batch = LogBatch {
        seq: 0,
        lines: (0..5)
            .map(|i| LogLine {
                stream: Stream::Stdout,
                text: format!("{i}{}", "x".repeat(99)),
            })
            .collect(),
    };
    assert_eq!(
        post(&base, "a", "logs", &token, &batch).await,
        StatusCode::NO_CONTENT
    );
    let kept: Vec<char> = channel
        .logs("a")
        .unwrap()
        .iter()
        .filter_map(|l| l.text.chars().next())
        .collect();
    assert_eq!(kept, ['3', '4'], "the newest 200 of 500 bytes");
}

/// A controller serves its channel before it leads: an exit that arrives before the leader's
/// hook can write it to status is answered 503 (the guest reports again), never acknowledged
/// and lost. Once the hook is in, the same exit is persisted, then acknowledged.
#[tokio::test]
async fn with_durable_exits_no_exit_is_acknowledged_before_it_can_be_persisted() {
    let (channel, base) = serve(Config {
        durable_exits: true,
        ..config()
    })
    .await;
    let token = channel.token_for("a.0");
    let exit = Exit {
        code: 3,
        start_error: None,
    };
    assert_eq!(
        post(&base, "a.0", "exit", &token, &exit).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(channel.view("a.0").and_then(|v| v.exit), None);

    let persisted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&persisted);
    channel.persist_exits(std::sync::Arc::new(move |report| {
        seen.lock().unwrap().push(report);
        Box::pin(async { Ok(()) })
    }));
    // Not named by this process yet (it just started): the hook gets the run's id alone.
    assert_eq!(
        post(&base, "a.0", "exit", &token, &exit).await,
        StatusCode::NO_CONTENT
    );
    let persisted = persisted.lock().unwrap().clone();
    assert_eq!(
        persisted
            .iter()
            .map(|r| (r.agent.clone(), r.id.as_str(), r.exit.code))
            .collect::<Vec<_>>(),
        [(None, "a.0", 3)]
    );
}

/// The channel keeps which FarAgent each run is of: the owner finds an agent from a report's
/// run, and users read the output of the agent's latest run by its name.
#[tokio::test]
async fn runs_are_named_and_a_users_logs_are_the_latest_runs() {
    let channel = Channel::new(config());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = channel.router().merge(channel.logs_router());
    tokio::spawn(async move { axum::serve(listener, router).await });

    for (run, text) in [
        ("u.1", "second run"),
        ("u.0", "first run"),
        ("v.0", "other agent"),
    ] {
        let agent = if run.starts_with('u') { "a" } else { "b" };
        channel.name("agents", agent, run);
        let batch = LogBatch {
            seq: 0,
            lines: vec![LogLine {
                stream: Stream::Stdout,
                text: text.into(),
            }],
        };
        let token = channel.token_for(run);
        assert!(post(&base, run, "logs", &token, &batch).await.is_success());
    }
    assert_eq!(channel.named("u.0"), Some(("agents".into(), "a".into())));
    assert_eq!(channel.named("u.1"), Some(("agents".into(), "a".into())));
    assert_eq!(channel.named("w.0"), None);
    // Named again (every reconcile does): nothing changes.
    channel.name("agents", "a", "u.1");
    assert_eq!(channel.named("u.1"), Some(("agents".into(), "a".into())));

    let logs = |name: &str| {
        let url = format!("{base}/v1/namespaces/agents/faragents/{name}/logs");
        async move {
            let answer = client().get(url).send().await.unwrap();
            (answer.status(), answer.text().await.unwrap())
        }
    };
    assert_eq!(logs("a").await, (StatusCode::OK, "second run\n".into()));
    assert_eq!(logs("b").await, (StatusCode::OK, "other agent\n".into()));
    assert_eq!(logs("c").await.0, StatusCode::NOT_FOUND);
    channel.forget("u.1");
    assert_eq!(channel.named("u.1"), None);
    assert_eq!(logs("a").await, (StatusCode::OK, "first run\n".into()));
}
