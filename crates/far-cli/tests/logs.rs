//! `far logs`, run as a user runs it, against the fake API server's service proxy in front of
//! the status channel's log routes: the agent's lines come out on stdout.

use std::process::Command;

use far_channel::{Channel, TokenKey};
use far_testkit::apiserver::FakeApiServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// POSTs a JSON body over plain HTTP/1.1, as a guest would.
async fn post(address: &str, path: &str, token: &str, body: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn far_logs_prints_an_agents_output_through_the_service_proxy() {
    let api = FakeApiServer::start().await;
    let channel = Channel::new(far_channel::Config::new(
        TokenKey::new(vec![5; 32]).unwrap(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let router = channel.router().merge(channel.logs_router());
    tokio::spawn(async move { axum::serve(listener, router).await });
    api.proxy_service(
        "far-system",
        "far-agent-controller-metrics:8080",
        &format!("http://{address}"),
    );

    channel.name("agents", "writer", "uid-1.0");
    let batch = r#"{"seq":0,"lines":[{"stream":"stdout","text":"hello from the VM"},{"stream":"stderr","text":"and its stderr"}]}"#;
    let answer = post(
        &address,
        "/v1/agents/uid-1.0/logs",
        &channel.token_for("uid-1.0"),
        batch,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_far"))
            .args(["logs", "writer", "-n", "agents"])
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "hello from the VM\nand its stderr\n"
    );
}
