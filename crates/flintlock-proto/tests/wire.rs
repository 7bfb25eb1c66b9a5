//! The encoding of Flintlock's messages, field by field, against the wire table in
//! `shared/flintlock-api.md`: a renumbered or retyped field fails here.

use std::collections::BTreeMap;

use flintlock_proto::types::{
    Initrd, Kernel, MicroVm, MicroVmSpec, MicroVmStatus, Mount, NetworkInterface,
    NetworkInterfaceStatus, NetworkOverrides, StaticAddress, Volume, VolumeSource, VolumeStatus,
    micro_vm_status::MicroVmState, mount::MountType, network_interface::IfaceType,
};
use flintlock_proto::v1alpha1::{
    CreateMicroVmRequest, DeleteMicroVmRequest, GetMicroVmRequest, ListMicroVMsRequest,
};
use prost::Message;

/// One decoded protobuf field.
#[derive(Debug, Clone, PartialEq)]
enum Wire {
    Varint(u64),
    Bytes(Vec<u8>),
}

impl Wire {
    fn text(&self) -> &str {
        match self {
            Wire::Bytes(b) => std::str::from_utf8(b).expect("utf-8"),
            Wire::Varint(v) => panic!("want a string, got varint {v}"),
        }
    }
    fn message(&self) -> BTreeMap<u32, Vec<Wire>> {
        match self {
            Wire::Bytes(b) => decode(b),
            Wire::Varint(v) => panic!("want a message, got varint {v}"),
        }
    }
}

fn varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = bytes[*at];
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    value
}

/// A minimal protobuf reader, independent of prost: field number -> values in order.
fn decode(bytes: &[u8]) -> BTreeMap<u32, Vec<Wire>> {
    let mut fields: BTreeMap<u32, Vec<Wire>> = BTreeMap::new();
    let mut at = 0;
    while at < bytes.len() {
        let key = varint(bytes, &mut at);
        let (number, wire_type) = ((key >> 3) as u32, key & 7);
        let value = match wire_type {
            0 => Wire::Varint(varint(bytes, &mut at)),
            2 => {
                let len = varint(bytes, &mut at) as usize;
                at += len;
                Wire::Bytes(bytes[at - len..at].to_vec())
            }
            other => panic!("unexpected wire type {other} for field {number}"),
        };
        fields.entry(number).or_default().push(value);
    }
    fields
}

fn one(fields: &BTreeMap<u32, Vec<Wire>>, number: u32) -> &Wire {
    match fields.get(&number).map(Vec::as_slice) {
        Some([value]) => value,
        other => panic!("field {number}: want exactly one value, got {other:?}"),
    }
}

/// A map entry is a message with key = 1 and value = 2.
fn entry(wire: &Wire) -> (String, Wire) {
    let e = wire.message();
    (one(&e, 1).text().to_owned(), one(&e, 2).clone())
}

fn s(text: &str) -> String {
    text.to_owned()
}

fn volume(id: &str, image: &str, mount: Option<&str>) -> Volume {
    Volume {
        id: s(id),
        is_read_only: true,
        mount_point: mount.map(s),
        source: Some(VolumeSource {
            container_source: Some(s(image)),
            virtiofs_source: Some(s("/srv/share")),
        }),
        partition_id: Some(s("p1")),
        size_in_mb: Some(2048),
    }
}

fn full_spec() -> MicroVmSpec {
    MicroVmSpec {
        id: s("vm-id"),
        namespace: s("far"),
        labels: [(s("k"), s("v"))].into(),
        vcpu: 2,
        memory_in_mb: 1024,
        kernel: Some(Kernel {
            image: s("kernel:1"),
            cmdline: [(s("console"), s("ttyS0"))].into(),
            filename: Some(s("boot/vmlinux")),
            add_network_config: true,
        }),
        initrd: Some(Initrd {
            image: s("initrd:1"),
            filename: Some(s("initrd.img")),
        }),
        root_volume: Some(volume("root", "root:1", None)),
        additional_volumes: vec![volume("models", "models:1", Some("/models"))],
        interfaces: vec![NetworkInterface {
            device_id: s("eth0"),
            r#type: IfaceType::Tap as i32,
            guest_mac: Some(s("AA:FF:00:00:00:02")),
            address: Some(StaticAddress {
                address: s("10.0.0.5/24"),
                gateway: Some(s("10.0.0.1/32")),
                nameservers: vec![s("10.0.0.1")],
            }),
            overrides: Some(NetworkOverrides {
                bridge_name: Some(s("br0")),
            }),
        }],
        metadata: [(s("meta-data"), s("aWQ="))].into(),
        created_at: Some(prost_types::Timestamp {
            seconds: 12,
            nanos: 0,
        }),
        updated_at: Some(prost_types::Timestamp {
            seconds: 13,
            nanos: 0,
        }),
        deleted_at: Some(prost_types::Timestamp {
            seconds: 14,
            nanos: 0,
        }),
        uid: Some(s("01HUID")),
        provider: Some(s("firecracker")),
        allow_guest_agent: true,
    }
}

#[test]
fn create_request_encodes_every_field_at_its_upstream_number() {
    let request = CreateMicroVmRequest {
        microvm: Some(full_spec()),
        metadata: [(
            s("x"),
            prost_types::Any {
                type_url: s("t"),
                value: vec![1],
            },
        )]
        .into(),
    };
    let top = decode(&request.encode_to_vec());
    assert_eq!(top.keys().copied().collect::<Vec<_>>(), [1, 2]);
    let (key, any) = entry(one(&top, 2));
    assert_eq!(key, "x");
    assert_eq!(one(&any.message(), 1).text(), "t");

    let spec = one(&top, 1).message();
    assert_eq!(
        spec.keys().copied().collect::<Vec<_>>(),
        (1..=17).collect::<Vec<_>>()
    );
    assert_eq!(one(&spec, 1).text(), "vm-id");
    assert_eq!(one(&spec, 2).text(), "far");
    assert_eq!(entry(one(&spec, 3)), (s("k"), Wire::Bytes(b"v".to_vec())));
    assert_eq!(one(&spec, 4), &Wire::Varint(2));
    assert_eq!(one(&spec, 5), &Wire::Varint(1024));
    assert_eq!(
        entry(one(&spec, 11)),
        (s("meta-data"), Wire::Bytes(b"aWQ=".to_vec()))
    );
    for (number, seconds) in [(12, 12), (13, 13), (14, 14)] {
        assert_eq!(
            one(&one(&spec, number).message(), 1),
            &Wire::Varint(seconds)
        );
    }
    assert_eq!(one(&spec, 15).text(), "01HUID");
    assert_eq!(one(&spec, 16).text(), "firecracker");
    assert_eq!(one(&spec, 17), &Wire::Varint(1));

    let kernel = one(&spec, 6).message();
    assert_eq!(one(&kernel, 1).text(), "kernel:1");
    assert_eq!(
        entry(one(&kernel, 2)),
        (s("console"), Wire::Bytes(b"ttyS0".to_vec()))
    );
    assert_eq!(one(&kernel, 3).text(), "boot/vmlinux");
    assert_eq!(one(&kernel, 4), &Wire::Varint(1));

    let initrd = one(&spec, 7).message();
    assert_eq!(
        (one(&initrd, 1).text(), one(&initrd, 2).text()),
        ("initrd:1", "initrd.img")
    );

    let root = one(&spec, 8).message();
    assert_eq!(root.keys().copied().collect::<Vec<_>>(), [1, 2, 4, 5, 6]);
    assert_eq!(one(&root, 1).text(), "root");
    assert_eq!(one(&root, 2), &Wire::Varint(1));
    let source = one(&root, 4).message();
    assert_eq!(
        (one(&source, 1).text(), one(&source, 2).text()),
        ("root:1", "/srv/share")
    );
    assert_eq!(one(&root, 5).text(), "p1");
    assert_eq!(one(&root, 6), &Wire::Varint(2048));
    let extra = one(&spec, 9).message();
    assert_eq!(one(&extra, 3).text(), "/models");

    let iface = one(&spec, 10).message();
    assert_eq!(
        iface.keys().copied().collect::<Vec<_>>(),
        [1, 2, 4, 5, 6],
        "number 3 is unused"
    );
    assert_eq!(one(&iface, 1).text(), "eth0");
    assert_eq!(one(&iface, 2), &Wire::Varint(1), "TAP = 1");
    assert_eq!(one(&iface, 4).text(), "AA:FF:00:00:00:02");
    let address = one(&iface, 5).message();
    assert_eq!(one(&address, 1).text(), "10.0.0.5/24");
    assert_eq!(one(&address, 2).text(), "10.0.0.1/32");
    assert_eq!(one(&address, 3).text(), "10.0.0.1");
    assert_eq!(one(&one(&iface, 6).message(), 1).text(), "br0");
}

#[test]
fn allow_guest_agent_is_field_17_on_the_wire() {
    let spec = MicroVmSpec {
        allow_guest_agent: true,
        ..Default::default()
    };
    // Key (17 << 3 | 0) = 136 as a varint is 0x88 0x01; the value true is 0x01.
    assert_eq!(spec.encode_to_vec(), [0x88, 0x01, 0x01]);
}

#[test]
fn microvm_status_encodes_every_field_at_its_upstream_number() {
    let mount = |t: MountType, src: &str| {
        Some(Mount {
            r#type: t as i32,
            source: s(src),
        })
    };
    let vm = MicroVm {
        version: 3,
        spec: Some(MicroVmSpec {
            id: s("a"),
            ..Default::default()
        }),
        status: Some(MicroVmStatus {
            state: MicroVmState::Deleting as i32,
            volumes: [(
                s("root"),
                VolumeStatus {
                    mount: mount(MountType::Dev, "/dev/mapper/x"),
                },
            )]
            .into(),
            kernel_mount: mount(MountType::Hostpath, "/k"),
            initrd_mount: mount(MountType::Hostpath, "/i"),
            network_interfaces: [(
                s("eth0"),
                NetworkInterfaceStatus {
                    host_device_name: s("tap0"),
                    index: 4,
                    mac_address: s("aa"),
                },
            )]
            .into(),
            retry: 5,
            vsock_path: s("/run/vm.vsock"),
        }),
    };
    let top = decode(&vm.encode_to_vec());
    assert_eq!(one(&top, 1), &Wire::Varint(3));
    assert_eq!(one(&one(&top, 2).message(), 1).text(), "a");
    let status = one(&top, 3).message();
    assert_eq!(
        status.keys().copied().collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    assert_eq!(one(&status, 1), &Wire::Varint(3), "DELETING = 3");
    let (id, volume) = entry(one(&status, 2));
    assert_eq!(id, "root");
    let volume_mount = one(&volume.message(), 1).message();
    assert!(
        !volume_mount.contains_key(&1),
        "DEV = 0 is the default and not sent"
    );
    assert_eq!(one(&volume_mount, 2).text(), "/dev/mapper/x");
    assert_eq!(
        one(&one(&status, 3).message(), 1),
        &Wire::Varint(1),
        "HOSTPATH = 1"
    );
    assert_eq!(one(&one(&status, 4).message(), 2).text(), "/i");
    let (name, iface) = entry(one(&status, 5));
    assert_eq!(name, "eth0");
    let iface = iface.message();
    assert_eq!(
        (one(&iface, 1).text(), one(&iface, 2), one(&iface, 3).text()),
        ("tap0", &Wire::Varint(4), "aa")
    );
    assert_eq!(one(&status, 6), &Wire::Varint(5));
    assert_eq!(one(&status, 7).text(), "/run/vm.vsock");
}

#[test]
fn request_messages_carry_uid_namespace_and_name_at_their_numbers() {
    assert_eq!(
        decode(&DeleteMicroVmRequest { uid: s("u1") }.encode_to_vec())[&1],
        [Wire::Bytes(b"u1".to_vec())]
    );
    assert_eq!(
        decode(&GetMicroVmRequest { uid: s("u2") }.encode_to_vec())[&1],
        [Wire::Bytes(b"u2".to_vec())]
    );
    let list = decode(
        &ListMicroVMsRequest {
            namespace: s("far"),
            name: Some(s("vm")),
        }
        .encode_to_vec(),
    );
    assert_eq!((one(&list, 1).text(), one(&list, 2).text()), ("far", "vm"));
    // proto3 `optional`: an empty name is still sent when present, and absent when None.
    let present = decode(
        &ListMicroVMsRequest {
            namespace: s("far"),
            name: Some(s("")),
        }
        .encode_to_vec(),
    );
    assert_eq!(one(&present, 2), &Wire::Bytes(vec![]));
    let absent = decode(
        &ListMicroVMsRequest {
            namespace: s("far"),
            name: None,
        }
        .encode_to_vec(),
    );
    assert!(!absent.contains_key(&2));
}
