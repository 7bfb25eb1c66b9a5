//! Hostile gRPC requests leave nothing behind: thousands of invalid, oversized and
//! unauthenticated calls over a real socket, each refused with its code, and the process's live
//! heap does not grow.
//!
//! A test binary of its own, because it counts every allocation of the process.

mod common;

use std::alloc::System;
use std::time::Duration;

use cap::Cap;
use common::spec;
use far_host::provider::sim::{Sim, SimConfig};
use far_host::{Host, HostConfig};
use flintlock_proto::MicroVmClient;
use flintlock_proto::auth::BasicToken;
use flintlock_proto::v1alpha1::{CreateMicroVmRequest, GetMicroVmRequest};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[global_allocator]
static HEAP: Cap<System> = Cap::new(System, usize::MAX);

type Client = MicroVmClient<InterceptedService<Channel, BasicToken>>;

/// One round of every kind of bad call; each must be refused with its code.
async fn round(client: &mut Client, stranger: &mut Client, i: usize) {
    let create = |f: &dyn Fn(&mut flintlock_proto::types::MicroVmSpec)| {
        let mut vm = spec(&format!("vm-{i}"), None);
        f(&mut vm);
        CreateMicroVmRequest {
            microvm: Some(vm),
            metadata: Default::default(),
        }
    };
    let oversized = create(&|vm| {
        vm.metadata
            .insert("blob".into(), "A".repeat(5 * 1024 * 1024));
    });
    let cases = [
        (create(&|vm| vm.id.clear()), Code::InvalidArgument),
        (
            create(&|vm| vm.id = "../escape".into()),
            Code::InvalidArgument,
        ),
        (create(&|vm| vm.vcpu = 1000), Code::InvalidArgument),
        (create(&|vm| vm.root_volume = None), Code::InvalidArgument),
        // Past the 4 MiB a message may have: refused before it is decoded.
        (oversized, Code::OutOfRange),
    ];
    for (request, want) in cases {
        let got = client.create_micro_vm(request).await.unwrap_err().code();
        assert_eq!(got, want);
    }
    let got = stranger
        .create_micro_vm(create(&|_| {}))
        .await
        .unwrap_err()
        .code();
    assert_eq!(got, Code::Unauthenticated);
    let missing = client
        .get_micro_vm(GetMicroVmRequest {
            uid: format!("no-such-vm-{i}"),
        })
        .await
        .unwrap_err();
    assert!(missing.message().contains("not found"), "{missing:?}");
}

/// Runs `rounds` rounds over a connection of their own, which then closes, and answers the live
/// heap once the server has let go of it too: what is left is what far-host kept.
async fn heap_after(endpoint: &str, rounds: std::ops::Range<usize>) -> usize {
    let channel = Channel::from_shared(endpoint.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        MicroVmClient::with_interceptor(channel.clone(), BasicToken::new("t0ken").unwrap());
    let mut stranger = MicroVmClient::with_interceptor(channel, BasicToken::new("guess").unwrap());
    for i in rounds {
        round(&mut client, &mut stranger, i).await;
    }
    drop((client, stranger));
    tokio::time::sleep(Duration::from_millis(300)).await;
    HEAP.allocated()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_hostile_calls_leave_the_heap_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::open(
        HostConfig {
            retry_delay: Duration::from_millis(10),
            ..HostConfig::default()
        },
        dir.path(),
        Sim::new(SimConfig::default()),
    )
    .await
    .unwrap();
    let endpoint = far_host::serve_on_loopback(host, Some("t0ken".into()))
        .await
        .unwrap();
    // Warm up the runtime's and the allocator's own caches.
    let before = heap_after(&endpoint, 0..100).await;
    let rounds = 1_000;
    let after = heap_after(&endpoint, 100..100 + rounds).await;
    let grown = after.saturating_sub(before);
    eprintln!(
        "live heap {before} -> {after} bytes ({grown} grown) over {} calls carrying {} MiB",
        rounds * 7,
        rounds * 5
    );
    // Measured: at most a few bytes. A leak of 3 bytes a call, or a record per refused VM, would
    // exceed this.
    assert!(grown < 16 * 1024, "the live heap grew by {grown} bytes");
}
