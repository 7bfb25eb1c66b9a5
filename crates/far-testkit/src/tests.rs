//! The fake API server, driven by kube-rs as the controller drives a real one.

use far_api::{FarAgent, FarAgentStatus, Phase};
use futures::StreamExt;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

use crate::apiserver::FakeApiServer;

fn agent(name: &str) -> FarAgent {
    serde_json::from_value(json!({
        "apiVersion": "tiffany.dev/v1", "kind": "FarAgent",
        "metadata": {"name": name},
        "spec": {"image": "busybox:1", "memory": "512Mi", "cpu": 1, "entrypoint": "/bin/sh"}
    }))
    .unwrap()
}

#[tokio::test]
async fn create_get_list_and_admission_behave_as_the_api_server() {
    let server = FakeApiServer::start().await;
    let api: Api<FarAgent> = Api::namespaced(server.client(), "ns1");
    let created = api
        .create(&PostParams::default(), &agent("a"))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    assert_eq!(created.spec.backoff_limit, 3, "defaults applied");

    let err = api
        .create(&PostParams::default(), &agent("a"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err:?}"
    );
    let mut bad = agent("b");
    bad.spec.workload.cpu = Some(0);
    let err = api.create(&PostParams::default(), &bad).await.unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
            assert!(s.message.contains("spec.cpu"), "{}", s.message);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(api.list(&Default::default()).await.unwrap().items.len(), 1);
    assert!(matches!(api.get("nope").await.unwrap_err(), kube::Error::Api(s) if s.code == 404));
}

#[tokio::test]
async fn status_writes_touch_only_status_and_stale_writes_conflict() {
    let server = FakeApiServer::start().await;
    let api: Api<FarAgent> = Api::namespaced(server.client(), "ns1");
    let created = api
        .create(&PostParams::default(), &agent("a"))
        .await
        .unwrap();
    let status = json!({"status": {"phase": "Running"}, "spec": {"cpu": 4}});
    let patched = api
        .patch_status("a", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().phase, Some(Phase::Running));
    assert_eq!(
        patched.spec.workload.cpu,
        Some(1),
        "spec is ignored on the status subresource"
    );
    assert_eq!(patched.metadata.generation, Some(1));

    let immutable = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cpu": 2}})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(immutable, kube::Error::Api(ref s) if s.code == 422 && s.message.contains("spec is immutable")),
        "{immutable:?}"
    );

    let stale = json!({"metadata": {"resourceVersion": created.metadata.resource_version}, "status": {"phase": "Failed"}});
    let err = api
        .patch_status("a", &PatchParams::default(), &Patch::Merge(&stale))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409));

    // As kube-apiserver 1.28 answers: a null resourceVersion deletes it from the patched
    // object, and a custom resource has no unconditional update (the fake once took this, and
    // the controller lost every VM uid it wrote so on a real cluster).
    let null = json!({"metadata": {"resourceVersion": null}, "status": {"phase": "Failed"}});
    for err in [
        api.patch_status("a", &PatchParams::default(), &Patch::Merge(&null))
            .await
            .unwrap_err(),
        api.patch("a", &PatchParams::default(), &Patch::Merge(&null))
            .await
            .unwrap_err(),
    ] {
        assert!(
            matches!(err, kube::Error::Api(ref s) if s.code == 422
                && s.message.ends_with("metadata.resourceVersion: Invalid value: 0x0: must be specified for an update")),
            "{err:?}"
        );
    }

    let same = api
        .patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        same.metadata.resource_version, patched.metadata.resource_version,
        "a no-op write keeps the version"
    );
    let _ = FarAgentStatus::default();
}

#[tokio::test]
async fn finalizers_hold_deletion_and_watchers_see_every_step() {
    let server = FakeApiServer::start().await;
    let api: Api<FarAgent> = Api::namespaced(server.client(), "ns1");
    let list = api.list(&Default::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let mut stream = api
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();

    api.create(&PostParams::default(), &agent("a"))
        .await
        .unwrap();
    let add = json!([{"op": "test", "path": "/metadata/finalizers", "value": null}, {"op": "add", "path": "/metadata/finalizers", "value": ["tiffany.dev/vm-cleanup"]}]);
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::<()>::Json(serde_json::from_value(add).unwrap()),
    )
    .await
    .unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();
    let terminating = api.get("a").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(terminating.metadata.generation, Some(2));
    let remove = json!([{"op": "remove", "path": "/metadata/finalizers"}]);
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::<()>::Json(serde_json::from_value(remove).unwrap()),
    )
    .await
    .unwrap();
    assert!(
        api.get_opt("a").await.unwrap().is_none(),
        "gone once the last finalizer is removed"
    );

    let mut kinds = Vec::new();
    while kinds.len() < 4 {
        match stream.next().await.unwrap().unwrap() {
            WatchEvent::Added(_) => kinds.push("ADDED"),
            WatchEvent::Modified(_) => kinds.push("MODIFIED"),
            WatchEvent::Deleted(_) => kinds.push("DELETED"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(kinds, ["ADDED", "MODIFIED", "MODIFIED", "DELETED"]);
    let counts = server.requests();
    assert_eq!(counts[&("patch".to_owned(), "faragents".to_owned())], 2);
}

#[tokio::test]
async fn dropped_watches_end_mid_stream_and_resume_from_their_resource_version() {
    let server = FakeApiServer::start().await;
    let api: Api<FarAgent> = Api::namespaced(server.client(), "ns1");
    let rv = api
        .list(&Default::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = api
        .watch(&WatchParams::default().timeout(60), &rv)
        .await
        .unwrap()
        .boxed();
    let created = api
        .create(&PostParams::default(), &agent("a"))
        .await
        .unwrap();
    assert!(matches!(
        stream.next().await.unwrap().unwrap(),
        WatchEvent::Added(_)
    ));
    server.drop_watches();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
        .await
        .expect("the watch ends at once");
    assert!(ended.is_none(), "{ended:?}");

    // What happened meanwhile is replayed to a watch from the last version seen.
    api.delete("a", &DeleteParams::default()).await.unwrap();
    let mut again = api
        .watch(
            &WatchParams::default().timeout(60),
            &created.metadata.resource_version.unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        again.next().await.unwrap().unwrap(),
        WatchEvent::Deleted(_)
    ));
}

/// `/metrics` counts requests as kube-apiserver's `apiserver_request_total` does (verb, resource,
/// subresource, scope, code), read over HTTP by the same parser `far bench` reads a real one with.
#[tokio::test]
async fn metrics_count_requests_as_the_api_server_does() {
    use crate::request_metrics::{Series, parse};
    let server = FakeApiServer::start().await;
    let client = server.client();
    let api: Api<FarAgent> = Api::namespaced(client.clone(), "ns1");
    api.create(&PostParams::default(), &agent("a"))
        .await
        .unwrap();
    let again = api.create(&PostParams::default(), &agent("a")).await;
    assert!(
        again.is_err(),
        "a second create of the same name is refused"
    );
    let status = json!({"status": {"message": "hello"}});
    api.patch_status("a", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    api.list(&Default::default()).await.unwrap();

    let text = client
        .request_text(
            axum::http::Request::get("/metrics")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let series = parse(&text);
    let count = |verb: &str, subresource: &str, scope: &str, code: u16| {
        series
            .get(&Series {
                verb: verb.into(),
                group: "tiffany.dev".into(),
                version: "v1".into(),
                resource: "faragents".into(),
                subresource: subresource.into(),
                scope: scope.into(),
                code,
            })
            .copied()
    };
    assert_eq!(count("POST", "", "resource", 201), Some(1), "{text}");
    assert_eq!(count("POST", "", "resource", 409), Some(1), "{text}");
    assert_eq!(count("PATCH", "status", "resource", 200), Some(1), "{text}");
    assert_eq!(count("LIST", "", "namespace", 200), Some(1), "{text}");
    let by_verb = server.requests();
    assert_eq!(by_verb[&("create".to_owned(), "faragents".to_owned())], 2);
    assert_eq!(by_verb[&("conflict".to_owned(), "faragents".to_owned())], 1);
}

/// Writes leave `metadata.managedFields` as a real API server's do: one entry per manager,
/// operation and subresource.
#[tokio::test]
async fn writes_keep_managed_fields() {
    let server = FakeApiServer::start().await;
    let api: Api<FarAgent> = Api::namespaced(server.client(), "ns1");
    let created = api
        .create(&PostParams::default(), &agent("a"))
        .await
        .unwrap();
    let entries = created.metadata.managed_fields.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].operation.as_deref(), Some("Update"));
    assert!(
        entries[0].fields_v1.as_ref().unwrap().0["f:spec"]["f:image"].is_object(),
        "{entries:?}"
    );

    let status = json!({"status": {"message": "hello"}});
    let patched = api
        .patch_status(
            "a",
            &PatchParams {
                field_manager: Some("far-agent-controller".into()),
                ..PatchParams::default()
            },
            &Patch::Merge(&status),
        )
        .await
        .unwrap();
    let entries = patched.metadata.managed_fields.unwrap();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[1].manager.as_deref(), Some("far-agent-controller"));
    assert_eq!(entries[1].subresource.as_deref(), Some("status"));
    assert_eq!(
        entries[1].fields_v1.as_ref().unwrap().0,
        json!({"f:status": {".": {}, "f:message": {}, "f:restartCount": {}}}),
        "the status it created, with the schema's default"
    );
}
