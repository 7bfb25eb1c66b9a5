//! Test fixtures shared by far-host's integration tests: a recording status channel (real
//! HTTP) and VM specs carrying a run configuration.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine as _;
use far_agent_protocol::{
    AgentRef, ChannelConfig, Enrolment, Exit, Heartbeat, HeartbeatReply, LogBatch, RUN_CONFIG_KEY,
    RunConfig, Task,
};
use flintlock_proto::types::{
    Kernel, MicroVmSpec, NetworkInterface, Volume, VolumeSource, network_interface::IfaceType,
};

pub fn spec(id: &str, metadata: Option<&RunConfig>) -> MicroVmSpec {
    MicroVmSpec {
        id: id.to_owned(),
        namespace: "far".into(),
        vcpu: 1,
        memory_in_mb: 256,
        kernel: Some(Kernel {
            image: "kernel:1".into(),
            filename: Some("vmlinuz".into()),
            ..Default::default()
        }),
        root_volume: Some(Volume {
            id: "root".into(),
            source: Some(VolumeSource {
                container_source: Some("root:1".into()),
                virtiofs_source: None,
            }),
            ..Default::default()
        }),
        interfaces: vec![NetworkInterface {
            device_id: "agent0".into(),
            r#type: IfaceType::Tap as i32,
            ..Default::default()
        }],
        metadata: metadata
            .map(|c| {
                [(
                    RUN_CONFIG_KEY.to_owned(),
                    base64::engine::general_purpose::STANDARD.encode(c.to_bytes()),
                )]
                .into()
            })
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// What the fake status channel received, in order; and whether it answers heartbeats "stop".
#[derive(Default, Clone)]
pub struct Received(pub Arc<Mutex<Vec<String>>>, pub Arc<AtomicBool>);

pub async fn channel() -> (SocketAddr, Received) {
    async fn record(
        State(received): State<Received>,
        Path((uid, what)): Path<(String, String)>,
        headers: HeaderMap,
        body: String,
    ) -> axum::response::Response {
        use axum::response::IntoResponse as _;
        let bearer = headers.get("authorization").and_then(|h| h.to_str().ok());
        if what == "enrol" {
            if bearer != Some("Bearer enrolment-token") {
                return StatusCode::UNAUTHORIZED.into_response();
            }
            received.0.lock().unwrap().push(format!("{uid} enrol"));
            return axum::Json(Enrolment {
                token: "agent-token".into(),
            })
            .into_response();
        }
        if bearer != Some("Bearer agent-token") {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let entry = match what.as_str() {
            "heartbeat" => serde_json::from_str::<Heartbeat>(&body).map(|_| "heartbeat".to_owned()),
            "logs" => {
                serde_json::from_str::<LogBatch>(&body).map(|b| format!("logs:{}", b.lines[0].text))
            }
            "exit" => serde_json::from_str::<Exit>(&body).map(|e| format!("exit:{}", e.code)),
            _ => return StatusCode::NOT_FOUND.into_response(),
        };
        match entry {
            Ok(entry) => {
                received.0.lock().unwrap().push(format!("{uid} {entry}"));
                if what == "heartbeat" {
                    let stop = received.1.load(Ordering::Relaxed);
                    return axum::Json(HeartbeatReply { stop }).into_response();
                }
                StatusCode::NO_CONTENT.into_response()
            }
            Err(_) => StatusCode::BAD_REQUEST.into_response(),
        }
    }
    let received = Received::default();
    let app = Router::new()
        .route("/v1/agents/{uid}/{what}", post(record))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, received)
}

/// The stand-in agent with these arguments, as the FarAgent `default/sleeper`.
pub fn task(args: &[&str]) -> Task {
    Task {
        agent: AgentRef {
            namespace: "default".into(),
            name: "sleeper".into(),
            uid: "agent-uid".into(),
            attempt: 0,
        },
        hostname: "sleeper".into(),
        entrypoint: "/usr/local/bin/tiffany".into(),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env: vec![],
        has_secrets: false,
        heartbeat_interval_seconds: 1,
    }
}

pub fn run_config(channel: SocketAddr, args: &[&str]) -> RunConfig {
    RunConfig {
        version: far_agent_protocol::RUN_CONFIG_VERSION,
        task: Some(task(args)),
        mounts: vec![],
        channel: ChannelConfig {
            url: format!("http://{channel}"),
            id: "agent-uid".into(),
            enrolment_token: "enrolment-token".into(),
        },
        grace_period_seconds: 5,
        reusable: false,
    }
}
