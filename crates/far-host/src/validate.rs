//! What far-host accepts in a `MicroVMSpec`, with upstream's defaults applied.

use flintlock_proto::types::MicroVmSpec;

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

/// Applies upstream's defaults (namespace `default`, 2 vCPUs, 1024 MiB) and checks the spec.
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
    }
    Ok(())
}
