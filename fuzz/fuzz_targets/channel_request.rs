//! The status channel's request bodies: whatever an agent (or anyone) sends to any route, with
//! its own token, another agent's, its enrolment token or none, the answer is a success or a
//! 4xx, never a 5xx or a panic.
#![no_main]

use std::sync::OnceLock;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, header};
use far_channel::{Channel, Config, TokenKey};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    router: Router,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let channel = Channel::new(Config::new(TokenKey::new(vec![7; 32]).unwrap()));
        Fixture {
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
            router: channel.router(),
            channel,
        }
    })
}

const ROUTES: [(&str, Method); 5] = [
    ("enrol", Method::POST),
    ("heartbeat", Method::POST),
    ("logs", Method::POST),
    ("exit", Method::POST),
    ("secrets", Method::GET),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let (route, method) = &ROUTES[usize::from(selector) % ROUTES.len()];
    let agent = "agent-a.0";
    let token = match (usize::from(selector) / ROUTES.len()) % 4 {
        0 => Some(f.channel.token_for(agent)),
        1 => Some(f.channel.token_for("agent-b.0")),
        2 => Some(f.channel.enrolment_token_for(agent)),
        _ => None,
    };
    let mut request = Request::builder()
        .method(method.clone())
        .uri(format!("/v1/agents/{agent}/{route}"))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Body::from(body.to_vec())).unwrap();
    let response = f
        .runtime
        .block_on(f.router.clone().oneshot(request))
        .unwrap();
    assert!(
        !response.status().is_server_error(),
        "{route}: {}",
        response.status()
    );
});
