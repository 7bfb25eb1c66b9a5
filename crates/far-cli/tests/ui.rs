//! `far ui`, run as a user runs it, against the service proxy of the fake API server (always)
//! and of a real one (`FAR_TEST_KUBECONFIG`) in front of the controller's UI routes: the page,
//! its script and its live stream come through, with the page's security headers; nothing but
//! GET is relayed.

use std::process::{Command, Stdio};
use std::time::Duration;

use far_testkit::apiserver::FakeApiServer;
use far_testkit::http::ask;

/// Runs `far ui` with `kubeconfig` against the controller Service `far-agent-controller-metrics`
/// in `namespace` and checks what comes through it.
async fn far_ui_relays(kubeconfig: &std::path::Path, namespace: &str) {
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .to_string();
    let mut far = Command::new(env!("CARGO_BIN_EXE_far"))
        .args([
            "ui",
            "--listen",
            &address,
            "--controller-namespace",
            namespace,
        ])
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut page = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        page = ask(&address, "GET", "/ui/", "</html>").await;
        if page.contains("</html>") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = std::panic::AssertUnwindSafe(async {
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        // kube-apiserver's proxy re-serializes HTML (`defer` comes back as `defer=""`).
        assert!(page.contains(r#"<script src="app.js" defer"#), "{page}");
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

/// The UI's routes (with no controller attached) served at `listen`; where they listen.
async fn serve_ui(listen: &str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = far_agent_controller::ui::router(far_agent_controller::ui::Live::default());
    tokio::spawn(async move { axum::serve(listener, router).await });
    address
}

#[tokio::test]
async fn far_ui_serves_the_controllers_page_through_the_service_proxy() {
    let api = FakeApiServer::start().await;
    let backend = format!("http://{}", serve_ui("127.0.0.1:0").await);
    api.proxy_service("far-system", "far-agent-controller-metrics:8080", &backend);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    far_ui_relays(&kubeconfig, "far-system").await;
}

/// The same through a real API server's service proxy: a Service without selector whose
/// Endpoints name this machine (kube-apiserver proxies to no loopback address, so the UI
/// listens on the address this machine routes out of, as a Pod's IP).
#[tokio::test]
async fn far_ui_serves_the_controllers_page_through_a_real_api_servers_service_proxy() {
    use k8s_openapi::api::core::v1::{Endpoints, Namespace, Pod, Service};
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
    use serde_json::from_value;
    let Some(kubeconfig) = far_testkit::cluster::kubeconfig("no real API server to test against")
    else {
        return;
    };
    let client = far_testkit::cluster::client(&kubeconfig, None).await;
    let outward = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("203.0.113.1:9").map(|()| s))
        .and_then(|s| s.local_addr())
        .expect("a route out of this machine")
        .ip();
    let backend = serve_ui(&format!("{outward}:0")).await;
    let namespace = format!("far-ui-{}", ulid::Ulid::new().to_string().to_lowercase());
    let ns: Namespace = from_value(serde_json::json!({"metadata": {"name": namespace}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let service: Service = from_value(serde_json::json!({
        "metadata": {"name": "far-agent-controller-metrics"},
        "spec": {"ports": [{"port": 8080}]}
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    // kube-apiserver proxies only to an address some Pod of the namespace has in its status
    // (it checks the endpoint's targetRef): a Pod nobody runs, its status written here.
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let pod: Pod = from_value(serde_json::json!({
        "metadata": {"name": "far-agent-controller"},
        "spec": {"containers": [{"name": "controller", "image": "far-agent-controller"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let ip = serde_json::json!({"status": {"podIP": outward.to_string(), "podIPs": [{"ip": outward.to_string()}]}});
    pods.patch_status(
        "far-agent-controller",
        &PatchParams::default(),
        &Patch::Merge(&ip),
    )
    .await
    .unwrap();
    let endpoints: Endpoints = from_value(serde_json::json!({
        "metadata": {"name": "far-agent-controller-metrics"},
        "subsets": [{
            "addresses": [{"ip": outward.to_string(),
                           "targetRef": {"kind": "Pod", "namespace": namespace, "name": "far-agent-controller"}}],
            "ports": [{"port": backend.port()}]
        }]
    }))
    .unwrap();
    Api::<Endpoints>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &endpoints)
        .await
        .unwrap();
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(far_ui_relays(
        &kubeconfig,
        &namespace,
    )))
    .await;
    let _ = Api::<Namespace>::all(client)
        .delete(&namespace, &DeleteParams::default())
        .await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
