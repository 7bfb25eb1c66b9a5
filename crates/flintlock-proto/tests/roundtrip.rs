//! A tonic client and server built from FAR's protos exchange every message over a real TCP
//! socket, with the shared token checked on the server the way flintlockd checks it.

use std::sync::Mutex;

use flintlock_proto::auth::{BasicToken, check_basic_token};
use flintlock_proto::errors::Failure;
use flintlock_proto::types::{
    Kernel, MicroVm as Vm, MicroVmSpec, MicroVmStatus, NetworkInterface, Volume, VolumeSource,
    micro_vm_status::MicroVmState, network_interface::IfaceType,
};
use flintlock_proto::v1alpha1::{
    CreateMicroVmRequest, CreateMicroVmResponse, DeleteMicroVmRequest, GetMicroVmRequest,
    GetMicroVmResponse, ListMessage, ListMicroVMsRequest, ListMicroVMsResponse,
};
use flintlock_proto::{MicroVm, MicroVmClient, MicroVmServer};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

const TOKEN: &str = "test-token";

/// Keeps what it is sent, the way a Flintlock host would, and mints uids.
#[derive(Default)]
struct Recorder {
    vms: Mutex<Vec<Vm>>,
}

impl Recorder {
    fn authorize<T>(request: &Request<T>) -> Result<(), Status> {
        check_basic_token(request.metadata(), TOKEN)
    }
}

#[tonic::async_trait]
impl MicroVm for Recorder {
    async fn create_micro_vm(
        &self,
        request: Request<CreateMicroVmRequest>,
    ) -> Result<Response<CreateMicroVmResponse>, Status> {
        Self::authorize(&request)?;
        let mut spec = request
            .into_inner()
            .microvm
            .ok_or_else(|| Status::invalid_argument("microvm"))?;
        let mut vms = self.vms.lock().unwrap();
        spec.uid = Some(format!("uid-{}", vms.len()));
        let vm = Vm {
            version: 1,
            spec: Some(spec),
            status: Some(MicroVmStatus {
                state: MicroVmState::Pending as i32,
                ..Default::default()
            }),
        };
        vms.push(vm.clone());
        Ok(Response::new(CreateMicroVmResponse { microvm: Some(vm) }))
    }

    async fn delete_micro_vm(
        &self,
        request: Request<DeleteMicroVmRequest>,
    ) -> Result<Response<()>, Status> {
        Self::authorize(&request)?;
        let uid = request.into_inner().uid;
        let mut vms = self.vms.lock().unwrap();
        let before = vms.len();
        vms.retain(|vm| vm.spec.as_ref().and_then(|s| s.uid.as_deref()) != Some(uid.as_str()));
        if vms.len() == before {
            return Err(Status::unknown(format!("microvm {uid} not found")));
        }
        Ok(Response::new(()))
    }

    async fn get_micro_vm(
        &self,
        request: Request<GetMicroVmRequest>,
    ) -> Result<Response<GetMicroVmResponse>, Status> {
        Self::authorize(&request)?;
        let uid = request.into_inner().uid;
        let vms = self.vms.lock().unwrap();
        let vm = vms
            .iter()
            .find(|vm| vm.spec.as_ref().and_then(|s| s.uid.as_deref()) == Some(uid.as_str()))
            .cloned()
            .ok_or_else(|| Status::unknown(format!("microvm {uid} not found")))?;
        Ok(Response::new(GetMicroVmResponse { microvm: Some(vm) }))
    }

    async fn list_micro_v_ms(
        &self,
        request: Request<ListMicroVMsRequest>,
    ) -> Result<Response<ListMicroVMsResponse>, Status> {
        Self::authorize(&request)?;
        Ok(Response::new(ListMicroVMsResponse {
            microvm: self.matching(request.into_inner()),
        }))
    }

    type ListMicroVMsStreamStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<ListMessage, Status>>>;

    async fn list_micro_v_ms_stream(
        &self,
        request: Request<ListMicroVMsRequest>,
    ) -> Result<Response<Self::ListMicroVMsStreamStream>, Status> {
        Self::authorize(&request)?;
        let items: Vec<_> = self
            .matching(request.into_inner())
            .into_iter()
            .map(|vm| Ok(ListMessage { microvm: Some(vm) }))
            .collect();
        Ok(Response::new(tokio_stream::iter(items)))
    }
}

impl Recorder {
    fn matching(&self, request: ListMicroVMsRequest) -> Vec<Vm> {
        self.vms
            .lock()
            .unwrap()
            .iter()
            .filter(|vm| {
                let spec = vm.spec.as_ref().unwrap();
                spec.namespace == request.namespace
                    && request.name.as_ref().is_none_or(|n| *n == spec.id)
            })
            .cloned()
            .collect()
    }
}

async fn serve() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        Server::builder()
            .add_service(MicroVmServer::new(Recorder::default()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    address
}

fn spec(id: &str) -> MicroVmSpec {
    MicroVmSpec {
        id: id.to_owned(),
        namespace: "far".into(),
        vcpu: 1,
        memory_in_mb: 1024,
        kernel: Some(Kernel {
            image: "kernel:1".into(),
            filename: Some("boot/vmlinux".into()),
            cmdline: [("console".to_owned(), "ttyS0".to_owned())].into(),
            add_network_config: false,
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
            device_id: "eth0".into(),
            r#type: IfaceType::Tap as i32,
            ..Default::default()
        }],
        metadata: [("far-run".to_owned(), "e30=".to_owned())].into(),
        allow_guest_agent: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn every_rpc_round_trips_over_a_real_socket() {
    let channel = Channel::from_shared(serve().await)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = MicroVmClient::with_interceptor(channel, BasicToken::new(TOKEN).unwrap());

    let created = client
        .create_micro_vm(CreateMicroVmRequest {
            microvm: Some(spec("a")),
            metadata: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .microvm
        .unwrap();
    let uid = created.spec.as_ref().unwrap().uid.clone().unwrap();
    let mut expected = spec("a");
    expected.uid = Some(uid.clone());
    assert_eq!(
        created.spec.as_ref(),
        Some(&expected),
        "the spec survives the trip unchanged"
    );
    client
        .create_micro_vm(CreateMicroVmRequest {
            microvm: Some(spec("b")),
            metadata: Default::default(),
        })
        .await
        .unwrap();

    let got = client
        .get_micro_vm(GetMicroVmRequest { uid: uid.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.microvm, Some(created.clone()));

    let listed = client
        .list_micro_v_ms(ListMicroVMsRequest {
            namespace: "far".into(),
            name: Some("a".into()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.microvm, std::slice::from_ref(&created));

    let stream = client
        .list_micro_v_ms_stream(ListMicroVMsRequest {
            namespace: "far".into(),
            name: None,
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = stream
        .map(|m| m.unwrap().microvm.unwrap().spec.unwrap().id)
        .collect()
        .await;
    assert_eq!(ids, ["a", "b"]);

    client
        .delete_micro_vm(DeleteMicroVmRequest { uid: uid.clone() })
        .await
        .unwrap();
    let gone = client
        .get_micro_vm(GetMicroVmRequest { uid })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::Unknown);
    assert_eq!(Failure::of(&gone), Failure::NotFound);
}

#[tokio::test]
async fn a_wrong_token_is_refused_as_unauthenticated() {
    let channel = Channel::from_shared(serve().await)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = MicroVmClient::with_interceptor(channel, BasicToken::new("wrong").unwrap());
    let err = client
        .list_micro_v_ms(ListMicroVMsRequest {
            namespace: "far".into(),
            name: None,
        })
        .await
        .unwrap_err();
    assert_eq!(Failure::of(&err), Failure::Unauthenticated);
}
