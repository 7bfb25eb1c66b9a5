//! `far ui`, run as a user runs it, against the fake API server's service proxy in front of the
//! controller's UI routes: the page, its script and its live stream come through, with the
//! page's security headers; nothing but GET is relayed.

use std::process::{Command, Stdio};
use std::time::Duration;

use far_testkit::apiserver::FakeApiServer;
use far_testkit::http::ask;

#[tokio::test]
async fn far_ui_serves_the_controllers_page_through_the_service_proxy() {
    let api = FakeApiServer::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("http://{}", listener.local_addr().unwrap());
    let router = far_agent_controller::ui::router(far_agent_controller::ui::Live::default());
    tokio::spawn(async move { axum::serve(listener, router).await });
    api.proxy_service("far-system", "far-agent-controller-metrics:8080", &backend);

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .to_string();
    let mut far = Command::new(env!("CARGO_BIN_EXE_far"))
        .args(["ui", "--listen", &address])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut page = String::new();
    for _ in 0..100 {
        page = ask(&address, "GET", "/ui/", "</html>").await;
        if page.contains("</html>") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = std::panic::AssertUnwindSafe(async {
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(
            page.contains(r#"<script src="app.js" defer></script>"#),
            "{page}"
        );
        let headers = page.to_lowercase();
        assert!(
            headers.contains("content-security-policy: default-src 'none'; script-src 'self'"),
            "{page}"
        );
        assert!(headers.contains("content-type: text/html"), "{page}");
        let script = ask(&address, "GET", "/ui/app.js", "connect();").await;
        assert!(
            script
                .to_lowercase()
                .contains("content-type: text/javascript"),
            "{script}"
        );
        // The live stream comes through as it streams: a snapshot at once (this UI has no
        // controller attached: it says so).
        let stream = ask(&address, "GET", "/ui/api/stream", "\"leading\":false").await;
        assert!(
            stream.contains("event: snapshot") && stream.contains("\"leading\":false"),
            "{stream}"
        );
        let post = ask(&address, "POST", "/ui/api/stream", "\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    });
    let outcome = futures::FutureExt::catch_unwind(result).await;
    let _ = far.kill();
    let _ = far.wait();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
