//! What far-host accepts in a `MicroVMSpec`, with upstream's defaults applied, and what it
//! adds to a spec at create as upstream does (the `instance_id` of `meta-data`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use flintlock_proto::types::network_interface::IfaceType;
use flintlock_proto::types::{MicroVmSpec, StaticAddress};

/// The metadata key of cloud-init's instance data, to which flintlockd adds the VM's uid.
pub const META_DATA_KEY: &str = "meta-data";
/// The key flintlockd sets in `meta-data`.
pub const INSTANCE_ID_KEY: &str = "instance_id";

/// VM size bounds of this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most vCPUs in one VM.
    pub max_vcpu: i32,
    /// Smallest VM memory, MiB.
    pub min_memory_mib: i32,
    /// Largest VM memory, MiB.
    pub max_memory_mib: i32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_vcpu: 4,
            min_memory_mib: 64,
            max_memory_mib: 8192,
        }
    }
}

/// Applies upstream's defaults (namespace `default`, 2 vCPUs, 1024 MiB), drops what upstream
/// never keeps (labels, client-sent times), and checks the spec.
///
/// # Errors
/// A sentence naming the field and what it must be.
pub fn validate(spec: &mut MicroVmSpec, limits: &Limits, provider: &str) -> Result<(), String> {
    if spec.id.is_empty() {
        return Err("id is required".into());
    }
    if spec.id.len() > 200 || spec.id.contains(['/', '\0']) || spec.id.starts_with('.') {
        return Err(format!(
            "id {:?} must be at most 200 bytes, without '/' or a leading '.'",
            spec.id
        ));
    }
    if spec.namespace.is_empty() {
        spec.namespace = "default".into();
    }
    if spec.namespace.contains(['/', '\0']) || spec.namespace.starts_with('.') {
        return Err(format!(
            "namespace {:?} must not contain '/' or start with '.'",
            spec.namespace
        ));
    }
    // flintlockd's model has no labels and fills no times: a client must not come to rely on
    // far-host keeping them.
    spec.labels.clear();
    (spec.created_at, spec.updated_at, spec.deleted_at) = (None, None, None);
    if spec.vcpu == 0 {
        spec.vcpu = 2;
    }
    if spec.memory_in_mb == 0 {
        spec.memory_in_mb = 1024;
    }
    if !(1..=limits.max_vcpu).contains(&spec.vcpu) {
        return Err(format!(
            "vcpu {} is outside this host's bounds 1..={}",
            spec.vcpu, limits.max_vcpu
        ));
    }
    if !(limits.min_memory_mib..=limits.max_memory_mib).contains(&spec.memory_in_mb) {
        return Err(format!(
            "memory_in_mb {} is outside this host's bounds {}..={}",
            spec.memory_in_mb, limits.min_memory_mib, limits.max_memory_mib
        ));
    }
    if let Some(asked) = &spec.provider
        && asked != provider
    {
        return Err(format!(
            "provider {asked:?} is not available: this host runs {provider:?}"
        ));
    }
    let kernel = spec.kernel.as_ref().ok_or("kernel is required")?;
    if kernel.image.is_empty() {
        return Err("kernel.image is required".into());
    }
    if kernel.filename.as_deref().is_none_or(str::is_empty) {
        return Err("kernel.filename is required".into());
    }
    let root = spec.root_volume.as_ref().ok_or("root_volume is required")?;
    let has_source = |v: &flintlock_proto::types::Volume| {
        v.source
            .as_ref()
            .and_then(|s| s.container_source.as_deref())
            .is_some_and(|s| !s.is_empty())
    };
    if !has_source(root) {
        return Err("root_volume.source.container_source is required".into());
    }
    for (i, volume) in spec.additional_volumes.iter().enumerate() {
        if volume.id.is_empty() || !has_source(volume) {
            return Err(format!(
                "additional_volumes[{i}] needs an id and source.container_source"
            ));
        }
    }
    if spec.interfaces.is_empty() {
        return Err("interfaces: at least one network interface is required".into());
    }
    if spec.interfaces.len() > 1 {
        return Err(format!(
            "interfaces: far-host gives a VM one network interface; {} were asked",
            spec.interfaces.len()
        ));
    }
    if spec.allow_guest_agent {
        return Err(
            "allow_guest_agent: far-host attaches no guest agent (vsock) device; leave it false"
                .into(),
        );
    }
    for (i, iface) in spec.interfaces.iter().enumerate() {
        let id_ok = iface
            .device_id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase())
            && iface
                .device_id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !id_ok {
            return Err(format!(
                "interfaces[{i}].device_id {:?} must match ^[a-z][a-z0-9_]*$",
                iface.device_id
            ));
        }
        if iface
            .overrides
            .as_ref()
            .is_some_and(|o| o.bridge_name.is_none())
        {
            return Err(format!("interfaces[{i}].overrides needs bridge_name"));
        }
        if iface.r#type != IfaceType::Tap as i32 {
            return Err(format!(
                "interfaces[{i}].type: only TAP is supported (as by flintlockd's Firecracker provider)"
            ));
        }
        if let Some(address) = &iface.address {
            check_address(address).map_err(|e| format!("interfaces[{i}].address.{e}"))?;
        }
    }
    for (key, value) in &spec.metadata {
        if STANDARD.decode(value).is_err() {
            return Err(format!(
                "metadata[{key:?}]: the value must be base64, as flintlockd requires"
            ));
        }
    }
    Ok(())
}

/// A static address and its gateway, both CIDRs as flintlockd parses them.
fn check_address(address: &StaticAddress) -> Result<(), String> {
    cidr(&address.address).map_err(|e| format!("address: {e}"))?;
    if let Some(gateway) = &address.gateway {
        cidr(gateway).map_err(|e| format!("gateway: {e}"))?;
    }
    Ok(())
}

/// The address of a CIDR (`10.0.0.1/32`): flintlockd parses gateways as CIDRs too.
///
/// # Errors
/// A sentence saying what the text should look like.
pub fn cidr(text: &str) -> Result<IpAddr, String> {
    let fail = || format!("{text:?} is not a CIDR such as 10.0.0.2/24");
    let (ip, prefix) = text.split_once('/').ok_or_else(fail)?;
    let ip: IpAddr = ip.parse().map_err(|_| fail())?;
    let most = if ip.is_ipv4() { 32 } else { 128 };
    match prefix.parse::<u8>() {
        Ok(p) if p <= most => Ok(ip),
        _ => Err(fail()),
    }
}

/// Adds `instance_id: <uid>` to the spec's `meta-data` (cloud-init instance data, base64 YAML),
/// creating it if absent and keeping an id the client set, as flintlockd does at create.
///
/// # Errors
/// When `meta-data` is not base64 YAML mapping keys to strings.
pub fn add_instance_id(spec: &mut MicroVmSpec, uid: &str) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| {
        format!("metadata[{META_DATA_KEY:?}]: must be base64 YAML of string keys and values: {e}")
    };
    let mut data: BTreeMap<String, String> = match spec.metadata.get(META_DATA_KEY) {
        Some(value) => {
            let bytes = STANDARD.decode(value).map_err(|e| fail(&e))?;
            let text = String::from_utf8(bytes).map_err(|e| fail(&e))?;
            if text.trim().is_empty() {
                BTreeMap::new()
            } else {
                serde_saphyr::from_str(&text).map_err(|e| fail(&e))?
            }
        }
        None => BTreeMap::new(),
    };
    if data.get(INSTANCE_ID_KEY).is_some_and(|id| !id.is_empty()) {
        return Ok(());
    }
    data.insert(INSTANCE_ID_KEY.to_owned(), uid.to_owned());
    let text = serde_saphyr::to_string(&data).map_err(|e| fail(&e))?;
    spec.metadata
        .insert(META_DATA_KEY.to_owned(), STANDARD.encode(text));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flintlock_proto::types::{Kernel, NetworkInterface, Volume, VolumeSource};

    fn spec() -> MicroVmSpec {
        MicroVmSpec {
            id: "vm".into(),
            kernel: Some(Kernel {
                image: "k".into(),
                filename: Some("vmlinuz".into()),
                ..Default::default()
            }),
            root_volume: Some(Volume {
                id: "root".into(),
                source: Some(VolumeSource {
                    container_source: Some("r".into()),
                    virtiofs_source: None,
                }),
                ..Default::default()
            }),
            interfaces: vec![NetworkInterface {
                device_id: "eth0".into(),
                r#type: IfaceType::Tap as i32,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn check(spec: &mut MicroVmSpec) -> Result<(), String> {
        validate(spec, &Limits::default(), "sim")
    }

    fn meta_data(spec: &MicroVmSpec) -> String {
        String::from_utf8(STANDARD.decode(&spec.metadata[META_DATA_KEY]).unwrap()).unwrap()
    }

    #[test]
    fn upstream_defaults_apply_and_what_it_never_keeps_is_dropped() {
        let mut s = spec();
        s.labels.insert("a".into(), "b".into());
        s.created_at = Some(prost_types::Timestamp::default());
        check(&mut s).unwrap();
        assert_eq!(
            (s.namespace.as_str(), s.vcpu, s.memory_in_mb),
            ("default", 2, 1024)
        );
        assert!(s.labels.is_empty() && s.created_at.is_none());
    }

    #[test]
    fn each_refusal_names_its_field() {
        type Break = fn(&mut MicroVmSpec);
        let cases: [(&str, Break); 6] = [
            ("interfaces[0].type", |s| {
                s.interfaces[0].r#type = IfaceType::Macvtap as i32
            }),
            ("interfaces: far-host gives a VM one", |s| {
                s.interfaces.push(s.interfaces[0].clone());
            }),
            ("allow_guest_agent", |s| s.allow_guest_agent = true),
            ("interfaces[0].address.gateway", |s| {
                s.interfaces[0].address = Some(StaticAddress {
                    address: "10.0.0.2/24".into(),
                    gateway: Some("10.0.0.1".into()),
                    nameservers: vec![],
                });
            }),
            ("interfaces[0].address.address", |s| {
                s.interfaces[0].address = Some(StaticAddress {
                    address: "10.0.0.2".into(),
                    ..Default::default()
                });
            }),
            ("metadata[\"x\"]", |s| {
                s.metadata.insert("x".into(), "not base64!".into());
            }),
        ];
        for (field, break_it) in cases {
            let mut s = spec();
            break_it(&mut s);
            let err = check(&mut s).unwrap_err();
            assert!(err.starts_with(field), "{field}: {err}");
        }
    }

    #[test]
    fn cidrs_are_read_as_flintlockd_reads_gateways() {
        assert_eq!(cidr("10.0.0.1/32").unwrap().to_string(), "10.0.0.1");
        assert_eq!(cidr("fd00::1/64").unwrap().to_string(), "fd00::1");
        for bad in ["10.0.0.1", "10.0.0.1/33", "x/24", "10.0.0.1/"] {
            assert!(cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn instance_id_is_added_to_meta_data_keeping_what_is_there() {
        let mut s = spec();
        add_instance_id(&mut s, "01UID").unwrap();
        assert_eq!(meta_data(&s).trim(), "instance_id: 01UID");

        let mut s = spec();
        s.metadata.insert(
            META_DATA_KEY.into(),
            STANDARD.encode("local_hostname: agent-1\n"),
        );
        add_instance_id(&mut s, "01UID").unwrap();
        let data: BTreeMap<String, String> = serde_saphyr::from_str(&meta_data(&s)).unwrap();
        assert_eq!(data["local_hostname"], "agent-1");
        assert_eq!(data[INSTANCE_ID_KEY], "01UID");

        // An id the client set is kept, as flintlockd keeps it.
        add_instance_id(&mut s, "01OTHER").unwrap();
        let data: BTreeMap<String, String> = serde_saphyr::from_str(&meta_data(&s)).unwrap();
        assert_eq!(data[INSTANCE_ID_KEY], "01UID");

        let mut s = spec();
        s.metadata
            .insert(META_DATA_KEY.into(), STANDARD.encode("- a list\n"));
        let err = add_instance_id(&mut s, "01UID").unwrap_err();
        assert!(err.starts_with("metadata[\"meta-data\"]"), "{err}");
    }
}
