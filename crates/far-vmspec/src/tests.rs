use std::collections::BTreeMap;

use base64::Engine as _;
use far_api::{FarAgent, FlintlockHost, manifest};
use flintlock_proto::types::network_interface::IfaceType;
use proptest::prelude::*;

use super::*;

const UID: &str = "6f1c1d9a-3b51-4a8e-9d0e-3f0c6f7b2a10";

fn load<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = format!("{}/../../examples/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    let doc = manifest::documents(&text).unwrap().remove(0);
    let admitted = manifest::admission_for("tiffany.dev/v1", doc["kind"].as_str().unwrap())
        .unwrap()
        .unwrap()
        .admit(&doc, None)
        .unwrap();
    serde_json::from_value(admitted.object).unwrap()
}

fn agent(file: &str) -> FarAgent {
    let mut agent: FarAgent = load(file);
    agent
        .metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    agent.metadata.uid = Some(UID.into());
    agent
}

/// The agent's own workload (no pool).
fn own(agent: &FarAgent) -> ResolvedWorkload {
    far_api::workload::resolve(&agent.spec.workload, None).unwrap()
}

fn defaults() -> Defaults {
    Defaults {
        namespace: "far".into(),
        kernel: ImageFile {
            image: "127.0.0.1:5000/far/kernel:6.1".into(),
            filename: "boot/vmlinuz".into(),
        },
        kernel_cmdline: BTreeMap::from([
            ("console".into(), "ttyS0".into()),
            ("panic".into(), "-1".into()),
        ]),
        initrd: ImageFile {
            image: "127.0.0.1:5000/far/init:dev".into(),
            filename: Defaults::INIT_FILENAME.into(),
        },
    }
}

fn metadata() -> BTreeMap<String, Vec<u8>> {
    BTreeMap::from([("far-run".to_owned(), br#"{"version":1}"#.to_vec())])
}

#[test]
fn the_mission_example_becomes_the_request_flintlockd_needs() {
    let (agent, host, defaults, md) = (
        agent("embedder-worker-01.yaml"),
        load::<FlintlockHost>("flintlockhost-blade.yaml"),
        defaults(),
        metadata(),
    );
    let planned = plan(&VmPlan {
        name: &VmName::for_agent(&agent, 0).unwrap(),
        network: agent.spec.network.as_ref(),
        workload: &own(&agent),
        host: &host,
        defaults: &defaults,
        guest_metadata: &md,
    })
    .unwrap();
    let vm = planned.request.microvm.unwrap();

    assert_eq!(vm.id, format!("default.embedder-worker-01.0.{UID}"));
    assert_eq!(vm.namespace, "far");
    assert_eq!(
        (vm.vcpu, vm.memory_in_mb),
        (1, 1024),
        "512Mi raised to flintlockd's 1024 MiB floor"
    );
    assert!(planned.sizing.raised());

    let kernel = vm.kernel.unwrap();
    assert_eq!(kernel.image, "127.0.0.1:5000/far/kernel:6.1");
    assert_eq!(kernel.filename.as_deref(), Some("boot/vmlinuz"));
    assert_eq!(kernel.cmdline["console"], "ttyS0");
    assert!(kernel.add_network_config);
    let initrd = vm.initrd.unwrap();
    assert_eq!(
        (initrd.image.as_str(), initrd.filename.as_deref()),
        ("127.0.0.1:5000/far/init:dev", Some("initrd.cpio"))
    );

    let root = vm.root_volume.unwrap();
    assert_eq!(root.id, "root");
    assert_eq!(
        root.source.unwrap().container_source.as_deref(),
        Some("ghcr.io/microscaler/tiffany-vm:v0.3.1")
    );
    assert!(vm.additional_volumes.is_empty());

    let [iface] = vm.interfaces.as_slice() else {
        panic!("one interface")
    };
    assert_eq!(
        iface.r#type,
        IfaceType::Tap as i32,
        "TAP set explicitly, never the MACVTAP default"
    );
    assert_eq!(iface.device_id, "agent0");
    assert!(iface.address.is_none(), "DHCP by default");
    assert_eq!(
        iface.overrides.as_ref().unwrap().bridge_name.as_deref(),
        Some("br-agents")
    );
    assert_eq!(
        iface.guest_mac.as_deref(),
        Some(planned.name.guest_mac().as_str())
    );

    assert_eq!(
        vm.metadata["far-run"],
        base64::engine::general_purpose::STANDARD.encode(br#"{"version":1}"#)
    );
    assert_eq!(vm.provider.as_deref(), Some("firecracker"));
    assert!(vm.uid.is_none(), "the server mints the uid");
    assert!(
        !vm.allow_guest_agent,
        "no vsock path to the host unless asked"
    );
    assert_eq!(vm.labels[labels::UID], UID);
}

#[test]
fn every_field_of_a_full_agent_reaches_the_request() {
    let (agent, host, defaults, md) = (
        agent("agent-with-everything.yaml"),
        load::<FlintlockHost>("flintlockhost-local.yaml"),
        defaults(),
        metadata(),
    );
    let planned = plan(&VmPlan {
        name: &VmName::for_agent(&agent, 2).unwrap(),
        network: agent.spec.network.as_ref(),
        workload: &own(&agent),
        host: &host,
        defaults: &defaults,
        guest_metadata: &md,
    })
    .unwrap();
    let vm = planned.request.microvm.unwrap();

    assert_eq!(vm.id, format!("agents.researcher-02.2.{UID}"));
    assert_eq!((vm.vcpu, vm.memory_in_mb), (2, 2048));
    assert!(!planned.sizing.raised());
    let kernel = vm.kernel.unwrap();
    assert_eq!(kernel.image, "127.0.0.1:5000/far/kernel:6.1-cloud");
    assert_eq!(kernel.filename.as_deref(), Some("boot/vmlinuz"));
    assert_eq!(
        kernel.cmdline.get("quiet").map(String::as_str),
        Some(""),
        "override merged over the defaults"
    );
    assert_eq!(kernel.cmdline["console"], "ttyS0");

    let [models] = vm.additional_volumes.as_slice() else {
        panic!("one volume")
    };
    assert_eq!(models.id, "models");
    assert!(models.is_read_only);
    assert_eq!(models.mount_point.as_deref(), Some("/models"));
    assert_eq!(
        models.source.as_ref().unwrap().container_source.as_deref(),
        Some("127.0.0.1:5000/far/models:minilm")
    );

    let iface = &vm.interfaces[0];
    let address = iface.address.as_ref().unwrap();
    assert_eq!(address.address, "10.20.0.15/24");
    assert_eq!(
        address.gateway.as_deref(),
        Some("10.20.0.1/32"),
        "flintlockd parses the gateway as a CIDR"
    );
    assert_eq!(address.nameservers, ["10.20.0.1"]);
    assert!(
        iface.overrides.is_none(),
        "no overrides without a bridge name: upstream would crash"
    );
    assert_eq!(vm.provider.as_deref(), Some("qemu"));
}

#[test]
fn an_agent_larger_than_the_hosts_largest_vm_is_not_planned() {
    let mut agent = agent("embedder-worker-01.yaml");
    agent.spec.workload.memory = Some("16Gi".into());
    let host: FlintlockHost = load("flintlockhost-local.yaml");
    let (defaults, md) = (defaults(), metadata());
    let err = plan(&VmPlan {
        name: &VmName::for_agent(&agent, 0).unwrap(),
        network: agent.spec.network.as_ref(),
        workload: &own(&agent),
        host: &host,
        defaults: &defaults,
        guest_metadata: &md,
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "asks for 16384 MiB; host local runs no VM over 8192 MiB"
    );
}

#[test]
fn an_agent_without_uid_gets_no_vm_name() {
    let mut agent = agent("embedder-worker-01.yaml");
    agent.metadata.uid = None;
    assert_eq!(
        VmName::for_agent(&agent, 0),
        Err(VmNameError::NoUid("embedder-worker-01".into()))
    );
}

/// A pool's VMs are named after the pool: the owner read back is the pool, each VM has its own
/// channel id, and the name says which pool to an operator.
#[test]
fn a_pools_vm_is_named_after_the_pool_and_has_its_own_channel_id() {
    let mut pool: far_api::FarAgentPool = load("pool-embedders.yaml");
    pool.metadata.uid = Some(UID.into());
    pool.metadata.namespace = Some("team".into());
    let name = VmName::for_pool(&pool, 7).unwrap();
    assert_eq!(name.id(), format!("team.embedders.7.{UID}"));
    let owner = VmName::parse(name.id()).unwrap();
    assert_eq!((owner.uid.as_str(), owner.attempt), (UID, 7));
    assert_eq!(owner.channel_id(), name.channel_id());
    assert_ne!(
        name.channel_id(),
        VmName::for_pool(&pool, 8).unwrap().channel_id()
    );
}

#[test]
fn long_names_are_cut_to_fit_but_keep_uid_and_attempt() {
    let name = VmName::new("ns", &"a".repeat(253), UID, 12).unwrap();
    assert_eq!(name.id().len(), MAX_ID_LEN);
    assert!(name.id().ends_with(&format!(".12.{UID}")));
    let owner = VmName::parse(name.id()).unwrap();
    assert_eq!(
        (owner.namespace.as_str(), owner.uid.as_str(), owner.attempt),
        ("ns", UID, 12)
    );
}

#[test]
fn ids_of_other_vms_are_not_mistaken_for_ours() {
    for foreign in [
        "",
        "vm1",
        "a.b",
        "ns.name.x.uid",
        "ns.name.1.bad/uid",
        ".name.1.uid",
    ] {
        assert_eq!(VmName::parse(foreign), None, "{foreign}");
    }
}

proptest! {
    #[test]
    fn a_vm_name_reads_back_as_its_owner(
        ns in "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?",
        name in "[a-z0-9]([-a-z0-9.]{0,250}[a-z0-9])?",
        uid in "[a-f0-9-]{1,64}",
        attempt in 0u32..1000,
    ) {
        let vm = VmName::new(&ns, &name, &uid, attempt).unwrap();
        prop_assert!(vm.id().len() <= MAX_ID_LEN);
        let owner = VmName::parse(vm.id()).unwrap();
        prop_assert_eq!(owner, Owner { namespace: ns, uid, attempt });
    }

    #[test]
    fn guest_macs_are_stable_unicast_and_locally_administered(uid in "[a-f0-9-]{1,64}", attempt in 0u32..100) {
        let mac = VmName::new("ns", "n", &uid, attempt).unwrap().guest_mac();
        prop_assert_eq!(&mac, &VmName::new("ns", "other", &uid, attempt).unwrap().guest_mac());
        prop_assert!(mac.starts_with("02:"));
        prop_assert_eq!(mac.len(), 17);
    }
}

#[test]
fn the_run_configuration_carries_the_spec_and_parses_back() {
    let agent = agent("agent-with-everything.yaml");
    let channel = far_agent_protocol::ChannelConfig {
        url: "http://10.0.2.2:8443".into(),
        id: format!("{UID}.2"),
        enrolment_token: "t".into(),
    };
    let env = vec![far_agent_protocol::EnvVar {
        name: "RUST_LOG".into(),
        value: "info".into(),
    }];
    let task = super::task(&agent, &own(&agent), 2, env, true).unwrap();
    let config = run_config(Some(task), &own(&agent), channel, 30);
    let task = config.task.as_ref().unwrap();
    assert_eq!(
        (
            task.agent.namespace.as_str(),
            task.agent.name.as_str(),
            task.agent.attempt
        ),
        ("agents", "researcher-02", 2)
    );
    assert_eq!(
        task.args,
        ["--task", "research", "--topic", "microvm schedulers"]
    );
    assert_eq!(
        config.mounts,
        [far_agent_protocol::Mount {
            index: 0,
            mount_path: "/models".into()
        }]
    );
    assert_eq!(task.heartbeat_interval_seconds, 5);
    assert!(task.has_secrets);
    assert_eq!(
        far_agent_protocol::RunConfig::parse(&config.to_bytes()).unwrap(),
        config
    );
}

/// Firecracker's metadata service holds 51,200 bytes: a run configuration that would not fit is
/// refused when the VM is planned, naming the fields and the way out, not found failing at boot.
#[test]
fn metadata_past_firecrackers_limit_is_refused_naming_the_fields() {
    let (agent, host, defaults) = (
        agent("embedder-worker-01.yaml"),
        load::<FlintlockHost>("flintlockhost-blade.yaml"),
        defaults(),
    );
    let with = |value_bytes: usize| {
        let md = BTreeMap::from([("far-run".to_owned(), vec![b'x'; value_bytes])]);
        plan(&VmPlan {
            name: &VmName::for_agent(&agent, 0).unwrap(),
            network: agent.spec.network.as_ref(),
            workload: &own(&agent),
            host: &host,
            defaults: &defaults,
            guest_metadata: &md,
        })
        .map(drop)
    };
    assert_eq!(with(40_000), Ok(()));
    let err = with(51_200).unwrap_err();
    assert!(
        matches!(err, PlanError::MetadataTooLarge { bytes } if bytes > MMDS_LIMIT_BYTES),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.starts_with("spec.env and spec.args: ") && message.contains("as Secrets"),
        "{message}"
    );
    // Quotes and newlines are escaped in the document: counted as they are sent.
    let quotes = BTreeMap::from([("far-run".to_owned(), vec![b'"'; 26_000])]);
    assert!(
        check_metadata(&quotes).is_err(),
        "26,000 quotes are 52,000 bytes escaped"
    );
}

/// An agent claiming a pool says only its task: its VM is the pool's template, its run the
/// agent's arguments.
#[test]
fn an_agent_of_a_pool_gets_the_templates_vm_and_its_own_task() {
    let agent = agent("embedder-from-pool.yaml");
    let pool: far_api::FarAgentPool = load("pool-embedders.yaml");
    let workload = far_api::workload::resolve(
        &agent.spec.workload,
        Some(far_api::workload::Template {
            pool: "embedders",
            workload: &pool.spec.template,
        }),
    )
    .unwrap();
    let (host, defaults, md) = (
        load::<FlintlockHost>("flintlockhost-blade.yaml"),
        defaults(),
        metadata(),
    );
    let planned = plan(&VmPlan {
        name: &VmName::for_agent(&agent, 0).unwrap(),
        network: agent.spec.network.as_ref(),
        workload: &workload,
        host: &host,
        defaults: &defaults,
        guest_metadata: &md,
    })
    .unwrap();
    let vm = planned.request.microvm.unwrap();
    assert_eq!(
        vm.root_volume.unwrap().source.unwrap().container_source,
        Some("ghcr.io/microscaler/tiffany-vm:v0.3.1".into())
    );
    assert_eq!(planned.sizing.requested_memory_mib, 512);
    let channel = far_agent_protocol::ChannelConfig {
        url: "http://10.0.2.2:8443".into(),
        id: format!("{UID}.0"),
        enrolment_token: "t".into(),
    };
    let task = super::task(&agent, &workload, 0, vec![], false).unwrap();
    let run = run_config(Some(task), &workload, channel, 30);
    let task = run.task.unwrap();
    assert_eq!(task.entrypoint, "/usr/local/bin/tiffany");
    assert_eq!(task.args, ["--task", "embedder", "--shard", "7"]);
}
