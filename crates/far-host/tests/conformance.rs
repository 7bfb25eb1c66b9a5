//! A conformance suite for Flintlock's MicroVM API.
//!
//! It runs against far-host (sim provider, in-process, over a real TCP socket) by default, and
//! against any Flintlock endpoint given as `FAR_TEST_FLINTLOCK=http[s]://host:port` (with
//! `FAR_TEST_FLINTLOCK_TOKEN`, and `FAR_TEST_KERNEL_IMAGE` / `FAR_TEST_ROOT_IMAGE` for images that
//! host can pull). Each test uses its own Flintlock namespace and deletes what it made.
//! Assertions hold for upstream flintlockd too: errors are classified with
//! `flintlock_proto::errors::Failure`, never by exact code where upstream says UNKNOWN.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use far_host::provider::sim::{Sim, SimConfig};
use far_host::{Host, HostConfig, Service};
use flintlock_proto::MicroVmClient;
use flintlock_proto::auth::BasicToken;
use flintlock_proto::errors::Failure;
use flintlock_proto::types::{
    Kernel, MicroVm, MicroVmSpec, NetworkInterface, StaticAddress, Volume, VolumeSource,
    micro_vm_status::MicroVmState, network_interface::IfaceType,
};
use flintlock_proto::v1alpha1::{
    CreateMicroVmRequest, DeleteMicroVmRequest, GetMicroVmRequest, ListMicroVMsRequest,
};
use tokio_stream::StreamExt;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

type Client = MicroVmClient<InterceptedService<Channel, BasicToken>>;

struct Target {
    client: Client,
    namespace: String,
    token: String,
    endpoint: String,
    _state: Option<tempfile::TempDir>,
}

async fn target() -> Target {
    let namespace = format!(
        "far-conformance-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let (endpoint, token, state) = match std::env::var("FAR_TEST_FLINTLOCK") {
        Ok(endpoint) => (
            endpoint,
            std::env::var("FAR_TEST_FLINTLOCK_TOKEN").unwrap_or_default(),
            None,
        ),
        Err(_) => {
            let state = tempfile::tempdir().unwrap();
            let config = HostConfig {
                retry_delay: Duration::from_millis(20),
                ..HostConfig::default()
            };
            let host = Host::open(config, state.path(), Sim::new(SimConfig::default()))
                .await
                .unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(Service::new(host, Some("conformance".into())))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            (endpoint, "conformance".to_owned(), Some(state))
        }
    };
    let client = connect(&endpoint, &token).await;
    Target {
        client,
        namespace,
        token,
        endpoint,
        _state: state,
    }
}

async fn connect(endpoint: &str, token: &str) -> Client {
    let channel = Channel::from_shared(endpoint.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    MicroVmClient::with_interceptor(channel, BasicToken::new(token).unwrap())
}

fn image(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

impl Target {
    fn spec(&self, id: &str) -> MicroVmSpec {
        MicroVmSpec {
            id: id.to_owned(),
            namespace: self.namespace.clone(),
            vcpu: 1,
            memory_in_mb: 1024,
            kernel: Some(Kernel {
                image: image(
                    "FAR_TEST_KERNEL_IMAGE",
                    "ghcr.io/liquidmetal-dev/flintlock-kernel:6.1",
                ),
                filename: Some("boot/vmlinux".into()),
                ..Default::default()
            }),
            root_volume: Some(Volume {
                id: "root".into(),
                source: Some(VolumeSource {
                    container_source: Some(image(
                        "FAR_TEST_ROOT_IMAGE",
                        "ghcr.io/liquidmetal-dev/flintlock-ubuntu:22.04",
                    )),
                    virtiofs_source: None,
                }),
                ..Default::default()
            }),
            interfaces: vec![NetworkInterface {
                device_id: "eth1".into(),
                r#type: IfaceType::Tap as i32,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    async fn create(&mut self, spec: MicroVmSpec) -> MicroVm {
        let request = CreateMicroVmRequest {
            microvm: Some(spec),
            metadata: Default::default(),
        };
        self.client
            .create_micro_vm(request)
            .await
            .unwrap()
            .into_inner()
            .microvm
            .unwrap()
    }

    async fn get(&mut self, uid: &str) -> Result<MicroVm, tonic::Status> {
        self.client
            .get_micro_vm(GetMicroVmRequest {
                uid: uid.to_owned(),
            })
            .await
            .map(|r| r.into_inner().microvm.unwrap())
    }

    async fn list(&mut self, name: Option<&str>) -> Vec<MicroVm> {
        let namespace = self.namespace.clone();
        self.list_in(&namespace, name).await
    }

    async fn list_in(&mut self, namespace: &str, name: Option<&str>) -> Vec<MicroVm> {
        let request = ListMicroVMsRequest {
            namespace: namespace.to_owned(),
            name: name.map(str::to_owned),
        };
        self.client
            .list_micro_v_ms(request)
            .await
            .unwrap()
            .into_inner()
            .microvm
    }

    async fn delete_and_wait(&mut self, uid: &str) {
        self.client
            .delete_micro_vm(DeleteMicroVmRequest {
                uid: uid.to_owned(),
            })
            .await
            .unwrap();
        let deadline = Deadline::new("not found after delete");
        loop {
            match self.get(uid).await {
                Err(status) if Failure::of(&status) == Failure::NotFound => break,
                Err(status) => panic!("get after delete: {status:?}"),
                Ok(vm) => assert_eq!(
                    state(&vm),
                    MicroVmState::Deleting,
                    "a deleted VM reads DELETING until gone"
                ),
            }
            deadline.tick().await;
        }
    }
}

fn uid(vm: &MicroVm) -> String {
    vm.spec
        .as_ref()
        .and_then(|s| s.uid.clone())
        .expect("server sets the uid")
}

fn state(vm: &MicroVm) -> MicroVmState {
    MicroVmState::try_from(vm.status.as_ref().map_or(0, |s| s.state)).unwrap()
}

/// Polls with a bound: Flintlock has no watch.
struct Deadline {
    at: tokio::time::Instant,
    what: &'static str,
}

impl Deadline {
    fn new(what: &'static str) -> Self {
        Self {
            at: tokio::time::Instant::now() + Duration::from_secs(60),
            what,
        }
    }

    async fn tick(&self) {
        assert!(
            tokio::time::Instant::now() < self.at,
            "timed out waiting for {}",
            self.what
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn create_mints_its_own_uid_and_keeps_the_spec() {
    let mut t = target().await;
    let mut spec = t.spec("mint");
    spec.uid = Some("client-chosen".into());
    let vm = t.create(spec.clone()).await;
    let minted = uid(&vm);
    assert!(!minted.is_empty() && minted != "client-chosen");
    let got = vm.spec.as_ref().unwrap();
    assert_eq!(
        (
            got.id.as_str(),
            got.namespace.as_str(),
            got.vcpu,
            got.memory_in_mb
        ),
        ("mint", t.namespace.as_str(), 1, 1024)
    );
    assert_eq!(got.kernel, spec.kernel);
    assert!(matches!(
        state(&vm),
        MicroVmState::Pending | MicroVmState::Created
    ));
    t.delete_and_wait(&minted).await;
}

#[tokio::test]
async fn create_is_not_idempotent_so_list_by_name_finds_every_copy() {
    let mut t = target().await;
    let a = uid(&t.create(t.spec("twice")).await);
    let b = uid(&t.create(t.spec("twice")).await);
    assert_ne!(a, b, "each create mints a new VM");
    let mut found: Vec<String> = t.list(Some("twice")).await.iter().map(uid).collect();
    found.sort();
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(found, want);
    t.delete_and_wait(&a).await;
    t.delete_and_wait(&b).await;
}

#[tokio::test]
async fn a_vm_turns_created_and_delete_goes_through_deleting_to_not_found() {
    let mut t = target().await;
    let id = uid(&t.create(t.spec("life")).await);
    let deadline = Deadline::new("CREATED");
    while state(&t.get(&id).await.unwrap()) != MicroVmState::Created {
        deadline.tick().await;
    }
    t.delete_and_wait(&id).await;
    assert!(t.list(Some("life")).await.is_empty());
}

#[tokio::test]
async fn list_filters_by_namespace_and_name_and_the_stream_sends_it_once() {
    let mut t = target().await;
    let a = uid(&t.create(t.spec("alpha")).await);
    let b = uid(&t.create(t.spec("beta")).await);
    let mut elsewhere = t.spec("alpha");
    elsewhere.namespace = format!("{}-other", t.namespace);
    let c = uid(&t.create(elsewhere).await);

    assert_eq!(t.list(None).await.len(), 2);
    assert_eq!(
        t.list(Some("alpha"))
            .await
            .iter()
            .map(uid)
            .collect::<Vec<_>>(),
        std::slice::from_ref(&a)
    );
    assert!(t.list(Some("gamma")).await.is_empty());

    let request = ListMicroVMsRequest {
        namespace: t.namespace.clone(),
        name: None,
    };
    let stream = t
        .client
        .list_micro_v_ms_stream(request)
        .await
        .unwrap()
        .into_inner();
    let streamed: Vec<_> = stream.collect().await;
    assert_eq!(
        streamed.len(),
        2,
        "the stream sends the current list and closes"
    );

    for id in [a, b, c] {
        t.delete_and_wait(&id).await;
    }
}

#[tokio::test]
async fn unknown_uids_are_not_found_for_get_and_delete() {
    let mut t = target().await;
    let err = t.get("01NOSUCHVM0000000000000000").await.unwrap_err();
    assert_eq!(Failure::of(&err), Failure::NotFound, "{err:?}");
    let err = t
        .client
        .delete_micro_vm(DeleteMicroVmRequest {
            uid: "01NOSUCHVM0000000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(Failure::of(&err), Failure::NotFound, "{err:?}");
}

#[tokio::test]
async fn empty_requests_are_invalid_arguments() {
    let mut t = target().await;
    let err = t
        .client
        .create_micro_vm(CreateMicroVmRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = t.get("").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_vm_outside_the_hosts_memory_bounds_is_refused_naming_memory() {
    let mut t = target().await;
    let mut spec = t.spec("huge");
    spec.memory_in_mb = 1_000_000;
    let request = CreateMicroVmRequest {
        microvm: Some(spec),
        metadata: Default::default(),
    };
    let err = t.client.create_micro_vm(request).await.unwrap_err();
    assert!(err.message().to_lowercase().contains("memory"), "{err:?}");
    assert!(t.list(Some("huge")).await.is_empty(), "nothing is created");
}

#[tokio::test]
async fn a_wrong_token_is_refused() {
    let t = target().await;
    if t.token.is_empty() {
        eprintln!(
            "skipped: FAR_TEST_FLINTLOCK_TOKEN is not set, the endpoint may not check tokens"
        );
        return;
    }
    let mut wrong = connect(&t.endpoint, "wrong-token").await;
    let err = wrong
        .list_micro_v_ms(ListMicroVMsRequest {
            namespace: t.namespace.clone(),
            name: None,
        })
        .await
        .unwrap_err();
    assert_eq!(Failure::of(&err), Failure::Unauthenticated);
}

/// Every uid in `vms` that is one of `ours` (a shared flintlockd may hold others' VMs).
fn ours(vms: &[MicroVm], ours: &[&String]) -> Vec<String> {
    let mut found: Vec<String> = vms.iter().map(uid).filter(|u| ours.contains(&u)).collect();
    found.sort();
    found
}

#[tokio::test]
async fn an_empty_namespace_lists_every_namespace_and_a_name_alone_finds_it_in_each() {
    let mut t = target().await;
    let other = format!("{}-other", t.namespace);
    let a = uid(&t.create(t.spec("alpha")).await);
    let b = uid(&t.create(t.spec("beta")).await);
    let mut elsewhere = t.spec("alpha");
    elsewhere.namespace.clone_from(&other);
    let c = uid(&t.create(elsewhere).await);
    let all = [&a, &b, &c];

    let mut want = vec![a.clone(), b.clone(), c.clone()];
    want.sort();
    assert_eq!(
        ours(&t.list_in("", None).await, &all),
        want,
        "{{}} lists every VM"
    );

    let by_name = t.list_in("", Some("alpha")).await;
    let mut want = vec![a.clone(), c.clone()];
    want.sort();
    assert_eq!(
        ours(&by_name, &all),
        want,
        "{{name}} finds it in every namespace"
    );
    assert!(
        by_name
            .iter()
            .all(|vm| vm.spec.as_ref().unwrap().id == "alpha")
    );

    assert_eq!(
        ours(&t.list_in(&other, Some("alpha")).await, &all),
        vec![c.clone()]
    );
    for id in [a, b, c] {
        t.delete_and_wait(&id).await;
    }
}

#[tokio::test]
async fn the_stream_needs_a_namespace_and_ignores_the_name() {
    let mut t = target().await;
    let err = t
        .client
        .list_micro_v_ms_stream(ListMicroVMsRequest {
            namespace: String::new(),
            name: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    let a = uid(&t.create(t.spec("alpha")).await);
    let b = uid(&t.create(t.spec("beta")).await);
    let request = ListMicroVMsRequest {
        namespace: t.namespace.clone(),
        name: Some("alpha".into()),
    };
    let streamed: Vec<MicroVm> = t
        .client
        .list_micro_v_ms_stream(request)
        .await
        .unwrap()
        .into_inner()
        .map(|m| m.unwrap().microvm.unwrap())
        .collect()
        .await;
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(ours(&streamed, &[&a, &b]), want);
    t.delete_and_wait(&a).await;
    t.delete_and_wait(&b).await;
}

#[tokio::test]
async fn meta_data_carries_the_instance_id_and_keeps_the_clients_keys() {
    let mut t = target().await;
    let plain = uid(&t.create(t.spec("plain")).await);
    let mut spec = t.spec("hosted");
    spec.metadata.insert(
        "meta-data".into(),
        STANDARD.encode("local_hostname: agent-1\n"),
    );
    let hosted = uid(&t.create(spec).await);
    for (id, hostname) in [(&plain, None), (&hosted, Some("agent-1"))] {
        let vm = t.get(id).await.unwrap();
        let text = STANDARD
            .decode(&vm.spec.unwrap().metadata["meta-data"])
            .unwrap();
        let data: std::collections::BTreeMap<String, String> =
            serde_saphyr::from_slice(&text).unwrap();
        assert_eq!(data.get("instance_id"), Some(id), "{data:?}");
        assert_eq!(data.get("local_hostname").map(String::as_str), hostname);
    }
    t.delete_and_wait(&plain).await;
    t.delete_and_wait(&hosted).await;
}

#[tokio::test]
async fn an_empty_namespace_and_zero_sizes_take_upstreams_defaults() {
    let mut t = target().await;
    let mut spec = t.spec(&format!("defaults-{}", t.namespace));
    spec.namespace = String::new();
    spec.vcpu = 0;
    spec.memory_in_mb = 0;
    let vm = t.create(spec).await;
    let got = vm.spec.as_ref().unwrap();
    assert_eq!(
        (got.namespace.as_str(), got.vcpu, got.memory_in_mb),
        ("default", 2, 1024)
    );
    t.delete_and_wait(&uid(&vm)).await;
}

/// A spec flintlockd cannot run is refused at create (far-host) or never turns CREATED
/// (flintlockd fails it as it reconciles).
async fn never_runs(t: &mut Target, spec: MicroVmSpec, field: &str) {
    let request = CreateMicroVmRequest {
        microvm: Some(spec),
        metadata: Default::default(),
    };
    let vm = match t.client.create_micro_vm(request).await {
        Err(err) => {
            assert!(err.message().contains(field), "{field}: {err:?}");
            return;
        }
        Ok(vm) => vm.into_inner().microvm.unwrap(),
    };
    let id = uid(&vm);
    for _ in 0..50 {
        assert_ne!(
            state(&t.get(&id).await.unwrap()),
            MicroVmState::Created,
            "{field}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t.delete_and_wait(&id).await;
}

#[tokio::test]
async fn macvtap_and_a_gateway_that_is_not_a_cidr_never_run() {
    let mut t = target().await;
    let mut spec = t.spec("macvtap");
    spec.interfaces[0].r#type = IfaceType::Macvtap as i32;
    never_runs(&mut t, spec, "type").await;
    let mut spec = t.spec("gateway");
    spec.interfaces[0].address = Some(StaticAddress {
        address: "10.0.0.2/24".into(),
        gateway: Some("10.0.0.1".into()),
        nameservers: vec![],
    });
    never_runs(&mut t, spec, "gateway").await;
}

#[tokio::test]
async fn delete_without_a_uid_is_invalid_and_a_call_without_a_token_unauthenticated() {
    let t = target().await;
    let mut client = t.client.clone();
    let err = client
        .delete_micro_vm(DeleteMicroVmRequest { uid: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    if t.token.is_empty() {
        eprintln!("skipped the token half: FAR_TEST_FLINTLOCK_TOKEN is not set");
        return;
    }
    let channel = Channel::from_shared(t.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = MicroVmClient::new(channel)
        .list_micro_v_ms(ListMicroVMsRequest {
            namespace: t.namespace.clone(),
            name: None,
        })
        .await
        .unwrap_err();
    assert_eq!(Failure::of(&err), Failure::Unauthenticated, "{err:?}");
}
