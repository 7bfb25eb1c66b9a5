//! Real microVMs: far-host's qemu provider boots Debian's cloud kernel under QEMU (software
//! emulation here) with the far-init initrd and an ext4 root volume holding the tiffany
//! stand-in; the agent's output and exit code arrive on a real HTTP status channel.
//!
//! Needs the guest images from `./scripts/build-guest` (the test suite builds them first).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{channel, run_config, spec};
use far_host::images::Images;
use far_host::provider::qemu::{Accel, Qemu, QemuConfig};
use far_host::{Host, HostConfig, HostError};
use flintlock_proto::types::micro_vm_status::MicroVmState;

fn guest_images() -> PathBuf {
    let dir = std::env::var("FAR_GUEST_DIR").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"),
        PathBuf::from,
    );
    let images = dir.join("images");
    assert!(
        images.join("far-init/initrd.cpio.gz").is_file(),
        "guest images missing in {}: run ./scripts/build-guest first",
        images.display()
    );
    images
}

async fn qemu_host(state: &std::path::Path) -> std::sync::Arc<Host<Qemu>> {
    let images = guest_images();
    let aliases = [
        ("far.local/kernel:dev".to_owned(), images.join("kernel")),
        ("far.local/far-init:dev".to_owned(), images.join("far-init")),
        ("far.local/tiffany:dev".to_owned(), images.join("tiffany")),
    ];
    let mut config = QemuConfig::new(Images::new(aliases.into()), state.join("run"));
    config.accel = Accel::Tcg;
    Host::open(HostConfig::default(), state, Qemu::new(config))
        .await
        .unwrap()
}

fn vm_spec(
    id: &str,
    config: &far_agent_protocol::RunConfig,
) -> flintlock_proto::types::MicroVmSpec {
    let mut spec = spec(id, Some(config));
    spec.kernel.as_mut().unwrap().image = "far.local/kernel:dev".into();
    spec.initrd = Some(flintlock_proto::types::Initrd {
        image: "far.local/far-init:dev".into(),
        filename: Some("initrd.cpio.gz".into()),
    });
    spec.root_volume
        .as_mut()
        .unwrap()
        .source
        .as_mut()
        .unwrap()
        .container_source = Some("far.local/tiffany:dev".into());
    spec
}

#[tokio::test]
async fn a_real_microvm_runs_the_agent_and_its_exit_code_reaches_the_channel() {
    let (address, received) = channel().await;
    let state = tempfile::tempdir().unwrap();
    let host = qemu_host(state.path()).await;
    let mut config = run_config(address, &["--task", "fail", "--exit-code", "3"]);
    // The guest reaches host loopback services through the user-mode network's host address.
    config.channel.url = format!("http://169.254.0.2:{}", address.port());
    let uid = host
        .create(vm_spec("fail3", &config))
        .unwrap()
        .spec
        .unwrap()
        .uid
        .unwrap();

    let mut exited = false;
    for _ in 0..1200 {
        let vm = host.get(&uid).unwrap();
        assert_ne!(
            vm.status.as_ref().unwrap().state,
            MicroVmState::Failed as i32,
            "VM failed to start"
        );
        if received
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.ends_with("exit:3"))
            && host_guest_exited(state.path(), &uid)
        {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = received.0.lock().unwrap().clone();
    let console = std::fs::read_to_string(state.path().join(format!("run/{uid}/console.log")))
        .unwrap_or_default();
    assert!(
        exited,
        "no exit 3 and VM exit within 120 s; channel saw {log:?}; console:\n{console}"
    );
    assert!(
        log.contains(&"agent-uid logs:failing on purpose with exit code 3".to_owned()),
        "{log:?}"
    );
    assert!(log.iter().any(|e| e == "agent-uid heartbeat"), "{log:?}");
    assert!(
        console.contains("far-init: agent exited with code 3; powering off"),
        "{console}"
    );

    host.delete(&uid).unwrap();
    for _ in 0..100 {
        if matches!(host.get(&uid), Err(HostError::NotFound(_))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(host.get(&uid), Err(HostError::NotFound(_))));
    assert!(
        !state.path().join(format!("run/{uid}")).exists(),
        "the VM's working files are removed"
    );
}

/// far-host's record says the VM's process has exited (read after a get refreshed it).
fn host_guest_exited(state: &std::path::Path, uid: &str) -> bool {
    std::fs::read(state.join(format!("vms/{uid}.json")))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|r| r["guest_exited"] == true)
}

#[tokio::test]
async fn a_missing_image_file_is_refused_at_create_naming_it() {
    let state = tempfile::tempdir().unwrap();
    let host = qemu_host(state.path()).await;
    let (address, _) = channel().await;
    let mut spec = vm_spec("nokernel", &run_config(address, &[]));
    spec.kernel.as_mut().unwrap().filename = Some("boot/vmlinux".into());
    let err = host.create(spec).unwrap_err().to_string();
    assert!(
        err.contains("kernel: image \"far.local/kernel:dev\" has no file \"boot/vmlinux\""),
        "{err}"
    );

    let mut spec = vm_spec("noimage", &run_config(address, &[]));
    spec.root_volume
        .as_mut()
        .unwrap()
        .source
        .as_mut()
        .unwrap()
        .container_source = Some("ghcr.io/nope/agent:1".into());
    let err = host.create(spec).unwrap_err().to_string();
    assert!(
        err.contains("root_volume: image \"ghcr.io/nope/agent:1\" is not available on this host"),
        "{err}"
    );
}
