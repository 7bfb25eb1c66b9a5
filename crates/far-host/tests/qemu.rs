//! Real microVMs: far-host's qemu provider boots Debian's cloud kernel under QEMU (software
//! emulation here) with the far-init initrd and an ext4 root volume holding the tiffany
//! stand-in; the agent's output and exit code arrive on a real HTTP status channel.
//!
//! Needs the guest images from `./scripts/build-guest` (the test suite builds them first).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{channel, run_config, spec};
use far_host::images::{ImageArgs, Images};
use far_host::provider::qemu::{Accel, Qemu, QemuConfig};
use far_host::{Host, HostConfig, HostError};
use far_oci::push::push_dir;
use far_testkit::registry::Registry;
use flintlock_proto::types::micro_vm_status::MicroVmState;

fn guest_images() -> PathBuf {
    let dir = std::env::var("FAR_GUEST_DIR").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"),
        PathBuf::from,
    );
    let images = dir.join("images");
    assert!(
        images.join("far-init/initrd.cpio").is_file(),
        "guest images missing in {}: run ./scripts/build-guest first",
        images.display()
    );
    images
}

/// The guest pieces of `scripts/build-guest` under local references.
fn local_aliases() -> Vec<(String, PathBuf)> {
    let images = guest_images();
    vec![
        ("far.local/kernel:dev".to_owned(), images.join("kernel")),
        (
            "far.local/debian-kernel:dev".to_owned(),
            images.join("debian-kernel"),
        ),
        ("far.local/far-init:dev".to_owned(), images.join("far-init")),
        ("far.local/tiffany:dev".to_owned(), images.join("tiffany")),
    ]
}

async fn qemu_host(state: &std::path::Path) -> std::sync::Arc<Host<Qemu>> {
    let images = Images::new(local_aliases().into_iter().collect());
    let mut config = QemuConfig::new(images, state.join("run"));
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
        filename: Some("initrd.cpio".into()),
    });
    set_root_image(&mut spec, "far.local/tiffany:dev");
    spec
}

#[tokio::test]
async fn a_real_microvm_runs_the_agent_and_its_exit_code_reaches_the_channel() {
    let state = tempfile::tempdir().unwrap();
    let host = qemu_host(state.path()).await;
    let console = runs_to_exit_code_3(&host, state.path(), |config| vm_spec("fail3", config)).await;
    assert!(
        console.contains("far-init: network: eth0 169.254.0.15/16 (link-local default)"),
        "{console}"
    );
    assert!(
        console.contains("far-init: reading the run configuration from http://169.254.0.2:"),
        "far-init is pointed at the metadata service on host loopback: {console}"
    );
}

/// The FAR kernel (the default) has its drivers built in: far-init loads no module. Debian's
/// modular cloud kernel boots the same initrd, far-init loading the virtio modules built for it.
#[tokio::test]
async fn far_init_loads_modules_for_a_modular_kernel_and_none_for_the_far_kernel() {
    let state = tempfile::tempdir().unwrap();
    let host = qemu_host(state.path()).await;
    let far =
        runs_to_exit_code_3(&host, state.path(), |config| vm_spec("far-kernel", config)).await;
    let debian = runs_to_exit_code_3(&host, state.path(), |config| {
        let mut spec = vm_spec("debian-kernel", config);
        spec.kernel.as_mut().unwrap().image = "far.local/debian-kernel:dev".into();
        spec
    })
    .await;
    let boot_line = |console: &str| {
        console
            .lines()
            .find(|l| l.starts_with("far-init: boot: "))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no boot timeline: {console}"))
    };
    assert!(!boot_line(&far).contains("modules"), "{far}");
    assert!(boot_line(&debian).contains("modules +"), "{debian}");
}

/// A guest that reads the metadata service where Firecracker's MMDS answers (169.254.169.254)
/// finds it there too, through the relay.
#[tokio::test]
async fn the_metadata_service_also_answers_at_the_mmds_address() {
    let state = tempfile::tempdir().unwrap();
    let host = qemu_host(state.path()).await;
    let console = runs_to_exit_code_3(&host, state.path(), |config| {
        let mut spec = vm_spec("mmds", config);
        spec.kernel
            .as_mut()
            .unwrap()
            .cmdline
            .insert("far.metadata".into(), "http://169.254.169.254".into());
        spec
    })
    .await;
    assert!(
        console.lines().any(|l| l.trim_end()
            == "far-init: reading the run configuration from http://169.254.169.254"),
        "{console}"
    );
}

/// Network-config asking for DHCP (as flintlockd writes it for an interface without an
/// address; a client may set it on the command line): QEMU's user-mode network, a real DHCP
/// server, answers: address, router, name server.
#[tokio::test]
async fn network_config_asking_for_dhcp_gets_the_address_by_dhcp() {
    use base64::Engine as _;
    let state = tempfile::tempdir().unwrap();
    let host = qemu_host(state.path()).await;
    let console = runs_to_exit_code_3(&host, state.path(), |config| {
        let mut spec = vm_spec("dhcp", config);
        let kernel = spec.kernel.as_mut().unwrap();
        kernel.add_network_config = false;
        kernel.cmdline.insert(
            "network-config".into(),
            base64::engine::general_purpose::STANDARD
                .encode(r#"{"version": 2, "ethernets": {"eth0": {"dhcp4": true}}}"#),
        );
        spec
    })
    .await;
    assert!(
        console.contains(
            "far-init: network: eth0 169.254.0.15/16 via 169.254.0.2 (DHCP from 169.254.0.2, lease"
        ),
        "{console}"
    );
    assert!(
        console.contains("far-init: network: 1 nameserver(s) in /etc/resolv.conf"),
        "{console}"
    );
}

/// A stop request (the answer to a heartbeat, as the controller gives it when the FarAgent is
/// deleted) reaches the agent as SIGTERM; the exit it ends with is reported, then the VM stops.
#[tokio::test]
async fn a_stop_request_sigterms_the_agent_and_its_exit_is_reported() {
    let state = tempfile::tempdir().unwrap();
    let host = qemu_host(state.path()).await;
    let (console, _) = runs_to_exit(
        &host,
        state.path(),
        &["--task", "sleep", "--seconds", "600"],
        143,
        true,
        |config| vm_spec("stop", config),
    )
    .await;
    assert!(
        console.contains("far-init: the controller asks the agent to stop"),
        "{console}"
    );
}

/// Without an address, far-host gives the guest what QEMU's DHCP server would lease, as
/// network-config: the same address, router and name server, and no DHCP exchange at boot.
#[tokio::test]
async fn without_an_address_the_guest_is_given_the_lease_statically() {
    let state = tempfile::tempdir().unwrap();
    let host = qemu_host(state.path()).await;
    let console = runs_to_exit_code_3(&host, state.path(), |config| {
        let mut spec = vm_spec("no-address", config);
        spec.kernel.as_mut().unwrap().add_network_config = true;
        spec.interfaces[0].guest_mac = Some("02:fa:00:00:00:33".into());
        spec
    })
    .await;
    assert!(
        console.contains("far-init: network: eth0 169.254.0.15/16 (network-config)"),
        "{console}"
    );
    assert!(
        console.contains("far-init: network: 1 nameserver(s) in /etc/resolv.conf"),
        "{console}"
    );
}

/// A static address reaches the guest as flintlockd passes it: cloud-init network-config v2 on
/// the kernel command line, matched to the interface by MAC.
#[tokio::test]
async fn a_static_address_reaches_the_guest_as_network_config() {
    let state = tempfile::tempdir().unwrap();
    let host = qemu_host(state.path()).await;
    let console = runs_to_exit_code_3(&host, state.path(), |config| {
        let mut spec = vm_spec("static", config);
        spec.kernel.as_mut().unwrap().add_network_config = true;
        let interface = &mut spec.interfaces[0];
        interface.guest_mac = Some("02:fa:00:00:00:32".into());
        interface.address = Some(flintlock_proto::types::StaticAddress {
            address: "169.254.0.50/16".into(),
            gateway: None,
            nameservers: vec!["169.254.0.3".into()],
        });
        spec
    })
    .await;
    assert!(
        console.contains("far-init: network: eth0 169.254.0.50/16 (network-config)"),
        "{console}"
    );
    assert!(
        console.contains("far-init: network: 1 nameserver(s) in /etc/resolv.conf"),
        "{console}"
    );
}

/// The kernel, the far-init initrd and the agent image all come from a real registry: the
/// agent under the reference the mission's example names, served by a loopback mirror.
#[tokio::test]
async fn a_real_microvm_boots_from_images_pulled_from_a_registry() {
    let registry = Registry::start();
    let images = guest_images();
    let push = |dir: PathBuf, reference: String| async move {
        push_dir(&dir, &reference, plain_http()).await.unwrap()
    };
    let kernel = format!("{}/far/kernel:dev", registry.addr());
    let init = format!("{}/far/far-init:dev", registry.addr());
    push(images.join("kernel"), kernel.clone()).await;
    push(images.join("far-init"), init.clone()).await;
    push(
        images.join("../agent-root"),
        format!("{}/microscaler/tiffany-vm:v0.3.1", registry.addr()),
    )
    .await;

    let state = tempfile::tempdir().unwrap();
    let host = registry_host(state.path(), registry.addr()).await;
    runs_to_exit_code_3(&host, state.path(), |config| {
        let mut spec = vm_spec("pulled", config);
        spec.kernel.as_mut().unwrap().image = kernel.clone();
        spec.initrd.as_mut().unwrap().image = init.clone();
        set_root_image(&mut spec, "ghcr.io/microscaler/tiffany-vm:v0.3.1");
        spec
    })
    .await;
}

fn plain_http() -> far_oci::RegistryConfig {
    far_oci::RegistryConfig {
        plain_http_loopback: true,
        ..far_oci::RegistryConfig::default()
    }
}

/// A qemu host pulling from `registry`, which also mirrors ghcr.io (and has the local guest
/// pieces).
async fn registry_host(state: &Path, registry: &str) -> std::sync::Arc<Host<Qemu>> {
    let args = ImageArgs {
        aliases: local_aliases(),
        mirrors: vec![("ghcr.io".into(), registry.into())],
        plain_http_loopback: true,
        image_cache: None,
    };
    let images = args.images(&state.join("images")).unwrap();
    let mut qemu_config = QemuConfig::new(images, state.join("run"));
    qemu_config.accel = Accel::Tcg;
    let config = HostConfig {
        retry_delay: Duration::from_millis(10),
        ..HostConfig::default()
    };
    Host::open(config, state, Qemu::new(qemu_config))
        .await
        .unwrap()
}

fn set_root_image(spec: &mut flintlock_proto::types::MicroVmSpec, image: &str) {
    spec.root_volume
        .as_mut()
        .unwrap()
        .source
        .as_mut()
        .unwrap()
        .container_source = Some(image.into());
}

/// Creates the VM `spec` makes for a run of `tiffany --task fail --exit-code 3` and follows it:
/// its output, heartbeat and exit code on the channel, the VM's exit, then its deletion.
async fn runs_to_exit_code_3(
    host: &std::sync::Arc<Host<Qemu>>,
    state: &Path,
    spec: impl FnOnce(&far_agent_protocol::RunConfig) -> flintlock_proto::types::MicroVmSpec,
) -> String {
    let (console, log) = runs_to_exit(
        host,
        state,
        &["--task", "fail", "--exit-code", "3"],
        3,
        false,
        spec,
    )
    .await;
    assert!(
        log.contains(&"agent-uid logs:failing on purpose with exit code 3".to_owned()),
        "{log:?}"
    );
    console
}

/// Creates the VM `spec` makes for a run of `tiffany ARGS` (told to stop by its first
/// heartbeat's answer when `stop`) and follows it: heartbeats and the exit `code` on the
/// channel, the VM's exit, then its deletion. Answers the console and what the channel heard.
async fn runs_to_exit(
    host: &std::sync::Arc<Host<Qemu>>,
    state: &Path,
    args: &[&str],
    code: i32,
    stop: bool,
    spec: impl FnOnce(&far_agent_protocol::RunConfig) -> flintlock_proto::types::MicroVmSpec,
) -> (String, Vec<String>) {
    let (address, received) = channel().await;
    received.1.store(stop, std::sync::atomic::Ordering::Relaxed);
    let exit = format!("exit:{code}");
    let mut config = run_config(address, args);
    // The guest reaches host loopback services through the user-mode network's host address.
    config.channel.url = format!("http://169.254.0.2:{}", address.port());
    let uid = host
        .create(spec(&config))
        .await
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
            .any(|e| e.ends_with(&exit))
            && host_guest_exited(state, &uid)
        {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = received.0.lock().unwrap().clone();
    let console =
        std::fs::read_to_string(state.join(format!("run/{uid}/console.log"))).unwrap_or_default();
    assert!(
        exited,
        "no {exit} and VM exit within 120 s; channel saw {log:?}; console:\n{console}"
    );
    assert!(log.iter().any(|e| e == "agent-uid heartbeat"), "{log:?}");
    assert!(
        console.contains(&format!(
            "far-init: agent exited with code {code}; powering off"
        )),
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
        !state.join(format!("run/{uid}")).exists(),
        "the VM's working files are removed"
    );
    (console, log)
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
    let err = host.create(spec).await.unwrap_err().to_string();
    assert!(
        err.contains("kernel: image \"far.local/kernel:dev\" has no file \"boot/vmlinux\""),
        "{err}"
    );

    let mut spec = vm_spec("noimage", &run_config(address, &[]));
    set_root_image(&mut spec, "ghcr.io/nope/agent:1");
    let err = host.create(spec).await.unwrap_err().to_string();
    assert!(
        err.contains("root_volume: image \"ghcr.io/nope/agent:1\" is not available on this host"),
        "{err}"
    );
}

#[tokio::test]
async fn image_failures_name_their_cause_at_create_or_in_the_failed_vm() {
    let registry = Registry::start();
    let state = tempfile::tempdir().unwrap();
    let host = registry_host(state.path(), registry.addr()).await;
    let (address, _) = channel().await;
    let with_root = |id: &str, image: &str| {
        let mut spec = vm_spec(id, &run_config(address, &[]));
        set_root_image(&mut spec, image);
        spec
    };

    let err = host
        .create(with_root("a", "127.0.0.1:1/far/agent:1"))
        .await
        .unwrap_err();
    assert!(matches!(err, HostError::Unavailable(_)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("root_volume: registry 127.0.0.1:1 is unreachable: "),
        "{err}"
    );

    let unknown = format!("{}/far/nothing:1", registry.addr());
    let err = host.create(with_root("b", &unknown)).await.unwrap_err();
    assert!(matches!(err, HostError::Image(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("root_volume: image {unknown} not found in its registry")
    );

    let err = host
        .create(with_root("c", "ghcr.io/Bad Name:1"))
        .await
        .unwrap_err();
    assert!(matches!(err, HostError::Invalid(_)), "{err:?}");
    assert!(
        err.to_string().contains("is not a valid OCI reference"),
        "{err}"
    );

    // A kernel image without the file: nothing is downloaded at create, so the start finds it
    // and the VM fails naming the file; once the image is here, create refuses at once.
    let not_kernel = format!("{}/far/not-a-kernel:1", registry.addr());
    push_dir(&guest_images().join("far-init"), &not_kernel, plain_http())
        .await
        .unwrap();
    let kernel_from = |id: &str| {
        let mut spec = vm_spec(id, &run_config(address, &[]));
        spec.kernel.as_mut().unwrap().image = not_kernel.clone();
        spec
    };
    let uid = host
        .create(kernel_from("d"))
        .await
        .unwrap()
        .spec
        .unwrap()
        .uid
        .unwrap();
    let record = state.path().join(format!("vms/{uid}.json"));
    let mut failure = serde_json::Value::Null;
    for _ in 0..200 {
        let vm = host.get(&uid).unwrap();
        if vm.status.unwrap().state == MicroVmState::Failed as i32 {
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
            failure = json["failure"].clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expected = format!("kernel: image {not_kernel} has no file \"vmlinuz\"");
    assert_eq!(failure, serde_json::json!(expected));
    let err = host.create(kernel_from("e")).await.unwrap_err();
    assert_eq!(err.to_string(), expected);
}

/// A pool's idle VM under QEMU, waiting on a real status channel.
struct IdleVm {
    state: tempfile::TempDir,
    host: std::sync::Arc<Host<Qemu>>,
    channel: far_channel::Channel,
    events: tokio::sync::broadcast::Receiver<far_channel::Event>,
    id: &'static str,
    uid: String,
}

/// What the channel heard of one claimed run.
#[derive(Debug, Default)]
struct Followed {
    first_heartbeat: Option<Duration>,
    lines: Vec<String>,
    exit: Option<i32>,
}

impl IdleVm {
    /// Boots a pool's VM (a run configuration without a task; `reusable` as `reuse: Reset`
    /// sets it) and waits until far-init says it waits for a claim.
    async fn boot(id: &'static str, reusable: bool) -> Self {
        use far_agent_protocol::ChannelConfig;
        let state = tempfile::tempdir().unwrap();
        let host = qemu_host(state.path()).await;
        let channel = far_channel::Channel::new(far_channel::Config::new(
            far_channel::TokenKey::new(vec![7; 32]).unwrap(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = channel.router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let events = channel.subscribe();
        let mut config = run_config(address, &[]);
        config.task = None;
        config.reusable = reusable;
        config.channel = ChannelConfig {
            url: format!("http://169.254.0.2:{}", address.port()),
            id: id.into(),
            enrolment_token: channel.enrolment_token_for(id),
        };
        let uid = host
            .create(vm_spec(id, &config))
            .await
            .unwrap()
            .spec
            .unwrap()
            .uid
            .unwrap();
        let mut vm = Self {
            state,
            host,
            channel,
            events,
            id,
            uid,
        };
        vm.wait_idle().await;
        vm
    }

    /// Deletes the VM and waits until it is torn down: the test's runtime ends with the test,
    /// and a teardown still under way would leave QEMU running.
    async fn destroy(self) {
        self.host.delete(&self.uid).unwrap();
        let gone = tokio::time::timeout(Duration::from_secs(30), async {
            while self.host.get(&self.uid).is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(gone.is_ok(), "VM {} not torn down", self.uid);
    }

    fn console(&self) -> String {
        std::fs::read_to_string(
            self.state
                .path()
                .join(format!("run/{}/console.log", self.uid)),
        )
        .unwrap_or_default()
    }

    /// Waits for the VM to say it is idle, or to power off without a word (far-init refused
    /// something: its console says what).
    async fn wait_idle(&mut self) {
        use far_channel::Event;
        let (id, events) = (self.id, &mut self.events);
        let (host, state, uid) = (&self.host, self.state.path(), &self.uid);
        let idle = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                tokio::select! {
                    event = events.recv() => if let Ok(Event::Idle { uid }) = event && uid == id {
                        return true;
                    },
                    () = tokio::time::sleep(Duration::from_millis(500)) => {
                        let _ = host.get(uid);
                        if host_guest_exited(state, uid) {
                            return false;
                        }
                    }
                }
            }
        })
        .await;
        assert!(
            idle == Ok(true),
            "the VM never waited for a claim: {}",
            self.console()
        );
    }

    /// Offers a claim for run `run` with this task and secrets, and follows the run to its exit.
    async fn claim(
        &mut self,
        run: &str,
        task: far_agent_protocol::Task,
        secrets: far_agent_protocol::Secrets,
    ) -> Followed {
        use far_channel::Event;
        let offered = std::time::Instant::now();
        self.channel.offer_claim(
            self.id,
            far_agent_protocol::Claim {
                task,
                secrets,
                run: far_agent_protocol::RunGrant {
                    id: run.into(),
                    token: self.channel.token_for(run),
                },
            },
        );
        let mut seen = Followed::default();
        let events = &mut self.events;
        let followed = tokio::time::timeout(Duration::from_secs(60), async {
            while seen.exit.is_none() {
                match events.recv().await {
                    Ok(Event::Heartbeat { uid, .. }) if uid == run => {
                        seen.first_heartbeat
                            .get_or_insert_with(|| offered.elapsed());
                    }
                    Ok(Event::Logs { uid, lines }) if uid == run => {
                        seen.lines.extend(lines.into_iter().map(|l| l.text));
                    }
                    Ok(Event::Exited { uid, exit }) if uid == run => seen.exit = Some(exit.code),
                    _ => {}
                }
            }
        })
        .await;
        assert!(
            followed.is_ok(),
            "the claimed task never ended: {}",
            self.console()
        );
        seen
    }
}

/// A pool's idle VM: booted with a run configuration without a task, far-init mounts, brings up
/// the network, enrols with a real status channel and waits on it. The claim arrives and the
/// agent starts at once with the claim's task, environment and secret files (the stand-in
/// embeds the secret file it is given as input), reporting on the run's own channel id.
#[tokio::test]
async fn an_idle_vm_runs_the_task_of_the_claim_it_receives() {
    use base64::Engine as _;
    use far_agent_protocol::{EnvVar, SecretFile, Secrets};

    let mut vm = IdleVm::boot("pool-vm-1", false).await;
    // Idle is idle: nothing runs until a claim comes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(vm.channel.view(vm.id).unwrap().idle);
    assert!(vm.channel.view(vm.id).unwrap().heartbeat.is_none());

    let input = "warm claims start at once";
    let seen = vm
        .claim(
            "agent-uid.0",
            common::task(&["--task", "embedder", "--input", "/run/far-test/input"]),
            Secrets {
                env: vec![EnvVar {
                    name: "API_KEY".into(),
                    value: "sk-test".into(),
                }],
                files: vec![SecretFile {
                    path: "/run/far-test/input".into(),
                    content: base64::engine::general_purpose::STANDARD.encode(input),
                }],
            },
        )
        .await;
    let embedded = seen
        .lines
        .iter()
        .any(|l| l.starts_with("embedding 0 ") && l.ends_with(input));
    let first_heartbeat = seen.first_heartbeat.expect("the task reported in");
    println!(
        "claim offered -> the task's first heartbeat: {} ms (under QEMU software emulation)",
        first_heartbeat.as_millis()
    );
    assert_eq!(seen.exit, Some(0), "{}", vm.console());
    assert!(
        embedded,
        "the secret file reached the task: {}",
        vm.console()
    );
    let console = vm.console();
    assert!(
        console.contains("far-init: idle: ") && console.contains("waiting for a claim"),
        "{console}"
    );
    assert!(
        console.contains("far-init: running agent default/sleeper (attempt 0)"),
        "{console}"
    );
    assert!(
        !console.contains("sk-test"),
        "a secret on the console: {console}"
    );
    for line in console
        .lines()
        .filter(|l| l.starts_with("far-init: boot:") || l.contains("entrypoint started"))
    {
        println!("{line}");
    }
    // Not reusable: the VM powers off after its one task.
    let powered_off = tokio::time::timeout(Duration::from_secs(30), async {
        while !host_guest_exited(vm.state.path(), &vm.uid) {
            let _ = vm.host.get(&vm.uid);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(powered_off.is_ok(), "still running: {}", vm.console());
    vm.destroy().await;
}

/// `reuse: Reset`: a task that litters every writable place, leaves a process running and
/// gets a secret env and file; the VM is made clean and waits again; the next task sees none
/// of it (and the survey is not blind: the first task's own survey saw what it left).
#[tokio::test]
async fn a_reset_vm_shows_its_next_task_nothing_of_the_last() {
    use base64::Engine as _;
    use far_agent_protocol::{EnvVar, SecretFile, Secrets};

    let mut vm = IdleVm::boot("pool-vm-2", true).await;
    let mut first = common::task(&["--task", "litter"]);
    first.env = vec![EnvVar {
        name: "FIRST_ONLY".into(),
        value: "1".into(),
    }];
    let secrets = Secrets {
        env: vec![EnvVar {
            name: "FIRST_SECRET".into(),
            value: "sk-first".into(),
        }],
        files: vec![SecretFile {
            path: "/run/far-test/credential".into(),
            content: base64::engine::general_purpose::STANDARD.encode("sk-first-file"),
        }],
    };
    let litter = vm.claim("first.0", first, secrets).await;
    assert_eq!(litter.exit, Some(0), "{}", vm.console());
    let saw = |followed: &Followed, what: &str| followed.lines.iter().any(|l| l == what);
    for trace in [
        "survey: env FIRST_ONLY",
        "survey: env FIRST_SECRET",
        "survey: file /tmp/litter",
        "survey: file /run/litter",
        "survey: file /dev/shm/litter",
        "survey: file /dev/litter",
        "survey: file /run/far-test/credential",
        "root writable: false",
    ] {
        assert!(
            saw(&litter, trace),
            "the first task saw no {trace:?}: {:?}",
            litter.lines
        );
    }
    let left_behind = litter
        .lines
        .iter()
        .filter(|l| l.starts_with("survey: process "))
        .count();
    assert!(
        left_behind >= 1,
        "no process left behind: {:?}",
        litter.lines
    );

    let reset = std::time::Instant::now();
    vm.wait_idle().await;
    println!(
        "exit -> idle again: {} ms (under QEMU software emulation)",
        reset.elapsed().as_millis()
    );
    let mut second = common::task(&["--task", "survey"]);
    second.env = vec![EnvVar {
        name: "SECOND_ONLY".into(),
        value: "2".into(),
    }];
    let survey = vm.claim("second.0", second, Secrets::default()).await;
    assert_eq!(survey.exit, Some(0), "{}", vm.console());
    assert!(
        saw(&survey, "survey: env SECOND_ONLY"),
        "{:?}",
        survey.lines
    );
    let traces: Vec<&String> = survey
        .lines
        .iter()
        .filter(|l| {
            l.starts_with("survey: process ")
                || l.starts_with("survey: file ")
                || l.contains("FIRST")
        })
        .collect();
    assert!(
        traces.is_empty(),
        "the second task saw the first's traces: {traces:?}\n{}",
        vm.console()
    );
    let console = vm.console();
    assert!(console.contains("the VM is clean"), "{console}");
    assert!(
        !console.contains("sk-first"),
        "a secret on the console: {console}"
    );
    vm.destroy().await;
}
