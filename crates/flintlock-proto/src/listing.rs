//! ListMicroVMs read narrowly: [`list`] asks a host the upstream call and decodes its answer as
//! [`ListedMicroVMs`] (`far.listing.v1`), the few fields a probe of every VM on a host needs.
//! A host holding thousands of VMs answers megabytes, nearly all of it the guests' run
//! configurations in their metadata; decoding skips those bytes instead of copying them.

use tonic::codegen::{Body, Bytes, StdError, http};

pub use crate::packages::far::listing::v1::{
    ListedMicroVMs, ListedMicroVm, ListedSpec, ListedStatus,
};
use crate::v1alpha1::ListMicroVMsRequest;

/// ListMicroVMs, its answer decoded as [`ListedMicroVMs`].
///
/// # Errors
/// The call's [`tonic::Status`], as the generated client would answer it.
pub async fn list<T>(
    transport: T,
    request: ListMicroVMsRequest,
) -> Result<tonic::Response<ListedMicroVMs>, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let mut grpc = tonic::client::Grpc::new(transport);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {}", e.into())))?;
    let path =
        http::uri::PathAndQuery::from_static("/microvm.services.api.v1alpha1.MicroVM/ListMicroVMs");
    let codec = tonic_prost::ProstCodec::<ListMicroVMsRequest, ListedMicroVMs>::default();
    grpc.unary(tonic::Request::new(request), path, codec).await
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::types::micro_vm_status::MicroVmState;
    use crate::types::{MicroVm, MicroVmSpec, MicroVmStatus};
    use crate::v1alpha1::ListMicroVMsResponse;

    /// The narrow view reads the fields of the full message it stands for: same numbers, same
    /// types; and what it leaves out costs nothing once decoded.
    #[test]
    fn the_narrow_view_reads_the_full_answer() {
        let full = ListMicroVMsResponse {
            microvm: vec![MicroVm {
                version: 3,
                spec: Some(MicroVmSpec {
                    id: "agent-0.1".into(),
                    namespace: "far".into(),
                    vcpu: 2,
                    memory_in_mb: 1536,
                    metadata: [("user-data".to_owned(), "x".repeat(4096))].into(),
                    uid: Some("01JDQXYZ0123456789ABCDEFGH".into()),
                    ..Default::default()
                }),
                status: Some(MicroVmStatus {
                    state: MicroVmState::Deleting.into(),
                    ..Default::default()
                }),
            }],
        };
        let bytes = full.encode_to_vec();
        let narrow = ListedMicroVMs::decode(bytes.as_slice()).unwrap();
        assert_eq!(
            narrow,
            ListedMicroVMs {
                microvm: vec![ListedMicroVm {
                    spec: Some(ListedSpec {
                        id: "agent-0.1".into(),
                        vcpu: 2,
                        memory_in_mb: 1536,
                        uid: Some("01JDQXYZ0123456789ABCDEFGH".into()),
                    }),
                    status: Some(ListedStatus {
                        state: MicroVmState::Deleting.into(),
                    }),
                }],
            }
        );
        assert!(narrow.encoded_len() < 100, "{} bytes", narrow.encoded_len());
    }
}
