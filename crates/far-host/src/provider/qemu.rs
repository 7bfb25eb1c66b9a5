//! The `qemu` provider: each VM is a `qemu-system-x86_64 -M microvm` process.
//!
//! KVM is used where a probe guest really runs under it, software emulation (TCG) elsewhere
//! ([`super::accel`]).
//! Each VM gets: its vCPUs and memory; the kernel and initrd from their images; a private copy
//! of its root volume and its additional volumes read-only (virtio-blk); a user-mode network on
//! 169.254.0.0/16 where the host is 169.254.0.2; a metadata endpoint on host loopback, reached
//! by the guest at 169.254.169.254 (as under Firecracker) through a relay, and named to far-init
//! on the kernel command line (`far.metadata=`) as the host's address and port, which needs no
//! relay; its serial console in
//! `console.log`. QEMU runs in its own process group, so VMs outlive a far-host restart and are
//! adopted again by pid and process start time.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flintlock_proto::types::MicroVmSpec;
use rustix::process::{Pid, Signal, kill_process};
use tokio::sync::watch;
use tracing::{info, warn};

pub use super::accel::Accel;
use super::accel::{Probe, Verdict};
use super::mmds::{self, MetadataServer};
use super::{Provider, ProviderError, Started};
use far_oci::OciError;

use crate::host::HostError;
use crate::images::{Fetch, ImageError, Images};
use crate::record::{ProcessIdentity, VmRecord};
use crate::validate::cidr;

/// How long a VM waits for a first KVM verdict before booting under TCG: a working KVM answers
/// the probe in well under this.
const PROBE_WAIT: Duration = Duration::from_millis(500);

/// The host as guests see it on the user-mode network.
pub const HOST_ADDRESS: &str = "169.254.0.2";

/// Where guests find the metadata service, as under Firecracker's MMDS.
pub const METADATA_ADDRESS: &str = "169.254.169.254";
/// The address QEMU's DHCP server leases to the guest: far-init's link-local default, so a
/// guest has the same address whether it asks by DHCP or not.
pub const GUEST_ADDRESS: &str = "169.254.0.15";

/// The user-mode network's DNS relay, set on the network so that the lease above and the
/// static configuration a guest is given agree.
pub const DNS_ADDRESS: &str = "169.254.0.3";

/// Settings of the qemu provider.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The QEMU binary.
    pub binary: PathBuf,
    /// Accelerator choice.
    pub accel: Accel,
    /// Where [`Accel::Auto`] keeps its verdict (far-host's state directory), so only the
    /// first start on a machine probes.
    pub accel_verdict: Option<PathBuf>,
    /// Where images are found.
    pub images: Images,
    /// Per-VM working directories (volume copies, console logs).
    pub run_dir: PathBuf,
    /// Kernel arguments under the spec's own.
    pub kernel_args: BTreeMap<String, String>,
}

impl QemuConfig {
    /// Defaults for a dev host: `console=ttyS0 quiet panic=-1` (with `-no-reboot`, a panic
    /// ends the VM as flintlockd's `reboot=k panic=1` does) and flintlockd's cloud-init
    /// datasource, so a stock cloud-init guest finds its metadata.
    pub fn new(images: Images, run_dir: PathBuf) -> Self {
        let kernel_args = [
            ("console", "ttyS0"),
            ("quiet", ""),
            ("panic", "-1"),
            ("ds", "nocloud-net;s=http://169.254.169.254/latest/"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        Self {
            binary: "qemu-system-x86_64".into(),
            accel: Accel::Auto,
            accel_verdict: None,
            images,
            run_dir,
            kernel_args,
        }
    }
}

struct Running {
    exited: Arc<AtomicBool>,
    _metadata: MetadataServer,
}

/// The qemu provider.
pub struct Qemu {
    config: QemuConfig,
    /// The accelerator, once known; `None` while [`Accel::Auto`] has no verdict.
    accel: Arc<watch::Sender<Option<Verdict>>>,
    probing: AtomicBool,
    vms: Mutex<HashMap<String, Running>>,
}

impl std::fmt::Debug for Qemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qemu")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Reads a process's start time (clock ticks since boot, `/proc/PID/stat` field 22).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count fields after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

fn alive(identity: &ProcessIdentity) -> bool {
    start_ticks(identity.pid) == Some(identity.start_ticks)
}

/// The host's TSC frequency in kHz, from `/proc/cpuinfo`.
fn host_tsc_khz() -> Option<u64> {
    let info = fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// Kernel arguments that software emulation needs: the guest's TSC calibration against the PIT
/// fails whenever the host is busy (QEMU's thread is preempted mid-measurement), and the kernel
/// then stalls at boot. Telling it the frequency skips the calibration.
fn tcg_args(tsc_khz: Option<u64>) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "tsc_early_khz".to_owned(),
            tsc_khz.unwrap_or(2_000_000).to_string(),
        ),
        ("tsc".to_owned(), "reliable".to_owned()),
    ])
}

/// As flintlockd does with `add_network_config`: cloud-init network-config v2 (JSON, which is
/// YAML), base64 for the kernel command line: the interface's static address, else what QEMU's
/// user-mode network would lease by DHCP (169.254.0.15/16, router 169.254.0.2, DNS
/// 169.254.0.3), given statically: the same configuration, without a DHCP exchange at boot
/// (~180 ms under emulation). flintlockd says `dhcp4: true` there (docs/far-host.md).
fn network_config(spec: &MicroVmSpec) -> Option<String> {
    use base64::Engine as _;
    if !spec.kernel.as_ref().is_some_and(|k| k.add_network_config) {
        return None;
    }
    let interface = spec.interfaces.first()?;
    let mut ethernet = match &interface.address {
        Some(address) => {
            let mut ethernet = serde_json::json!({"addresses": [address.address]});
            // Sent as a CIDR (flintlockd's rule); cloud-init wants the bare address.
            if let Some(gateway) = address.gateway.as_deref().and_then(|g| cidr(g).ok()) {
                ethernet["gateway4"] = serde_json::json!(gateway.to_string());
            }
            if !address.nameservers.is_empty() {
                ethernet["nameservers"] = serde_json::json!({"addresses": address.nameservers});
            }
            ethernet
        }
        None => serde_json::json!({
            "addresses": [format!("{GUEST_ADDRESS}/16")],
            "gateway4": HOST_ADDRESS,
            "nameservers": {"addresses": [DNS_ADDRESS]},
        }),
    };
    if let Some(mac) = &interface.guest_mac {
        ethernet["match"] = serde_json::json!({"macaddress": mac});
    }
    let config = serde_json::json!({"version": 2, "ethernets": {"eth0": ethernet}});
    Some(base64::engine::general_purpose::STANDARD.encode(config.to_string()))
}

/// Whether `program` is an executable file in a `PATH` directory.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

fn cmdline(base: &BTreeMap<String, String>, spec: &BTreeMap<String, String>) -> String {
    let mut args = base.clone();
    args.extend(spec.iter().map(|(k, v)| (k.clone(), v.clone())));
    args.iter()
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Qemu {
    /// A qemu provider.
    pub fn new(config: QemuConfig) -> Self {
        let fixed = match config.accel {
            Accel::Kvm => Some(Verdict::Kvm),
            Accel::Tcg => Some(Verdict::Tcg),
            Accel::Auto => None,
        };
        Self {
            config,
            accel: Arc::new(watch::Sender::new(fixed)),
            probing: AtomicBool::new(false),
            vms: Mutex::default(),
        }
    }

    fn vm_dir(&self, uid: &str) -> PathBuf {
        self.config.run_dir.join(uid)
    }

    /// The console log of a VM.
    pub fn console_log(&self, uid: &str) -> PathBuf {
        self.vm_dir(uid).join("console.log")
    }

    /// The accelerator for the next VM. Without a verdict yet, the kept one is read or the
    /// probe started; a VM waits for it at most [`PROBE_WAIT`], then boots under TCG while the
    /// probe goes on, and later VMs use its verdict.
    async fn accel(&self) -> Verdict {
        if let Some(verdict) = *self.accel.borrow() {
            return verdict;
        }
        if !self.probing.swap(true, Ordering::SeqCst) {
            let probe = Probe::new(&self.config.binary, self.config.accel_verdict.clone());
            if let Some(kept) = probe.kept() {
                self.accel.send_replace(Some(kept));
                return kept;
            }
            let verdict = Arc::clone(&self.accel);
            tokio::spawn(async move {
                verdict.send_replace(Some(probe.run().await));
            });
        }
        let mut known = self.accel.subscribe();
        match tokio::time::timeout(PROBE_WAIT, known.wait_for(Option::is_some)).await {
            Ok(Ok(verdict)) => verdict.unwrap_or(Verdict::Tcg),
            _ => {
                info!("the KVM probe has no verdict yet: this VM uses software emulation");
                Verdict::Tcg
            }
        }
    }

    /// The files a VM boots from. With [`Fetch::Check`], paths of images not yet pulled are
    /// absent; with [`Fetch::Pull`] all are present.
    async fn resolve(&self, spec: &MicroVmSpec, fetch: Fetch) -> Result<Resolved, HostError> {
        let images = &self.config.images;
        let kernel = spec
            .kernel
            .as_ref()
            .ok_or_else(|| HostError::Invalid("kernel is required".into()))?;
        let kernel_path = images
            .file(
                &kernel.image,
                kernel.filename.as_deref().unwrap_or_default(),
                fetch,
            )
            .await
            .map_err(|e| image_error("kernel", e))?;
        let initrd = match &spec.initrd {
            Some(i) => images
                .file(
                    &i.image,
                    i.filename.as_deref().unwrap_or("initrd.cpio"),
                    fetch,
                )
                .await
                .map_err(|e| image_error("initrd", e))?,
            None => None,
        };
        let source = |v: &flintlock_proto::types::Volume| {
            v.source
                .as_ref()
                .and_then(|s| s.container_source.clone())
                .unwrap_or_default()
        };
        let root = spec
            .root_volume
            .as_ref()
            .ok_or_else(|| HostError::Invalid("root_volume is required".into()))?;
        let root = images
            .volume(&source(root), fetch)
            .await
            .map_err(|e| image_error("root_volume", e))?;
        let mut extra = Vec::new();
        for v in &spec.additional_volumes {
            extra.push(
                images
                    .volume(&source(v), fetch)
                    .await
                    .map_err(|e| image_error(&format!("additional volume {}", v.id), e))?,
            );
        }
        Ok(Resolved {
            kernel: kernel_path,
            initrd,
            root,
            extra,
        })
    }

    fn watch(
        &self,
        uid: &str,
        identity: ProcessIdentity,
        child: Option<std::process::Child>,
        metadata: MetadataServer,
    ) {
        let exited = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&exited);
        let id = uid.to_owned();
        std::thread::spawn(move || {
            match child {
                Some(mut child) => {
                    let status = child.wait();
                    info!(uid = %id, ?status, "VM process exited");
                }
                None => {
                    while alive(&identity) {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    info!(uid = %id, "adopted VM process exited");
                }
            }
            flag.store(true, Ordering::Relaxed);
        });
        self.vms.lock().unwrap_or_else(|e| e.into_inner()).insert(
            uid.to_owned(),
            Running {
                exited,
                _metadata: metadata,
            },
        );
    }
}

struct Resolved {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    root: Option<PathBuf>,
    extra: Vec<Option<PathBuf>>,
}

/// An image failure as far-host reports it, naming the field it came from.
fn image_error(field: &str, error: ImageError) -> HostError {
    let text = format!("{field}: {error}");
    match error {
        _ if error.is_transient() => HostError::Unavailable(text),
        ImageError::BadFilename(_) | ImageError::Oci(OciError::BadReference { .. }) => {
            HostError::Invalid(text)
        }
        _ => HostError::Image(text),
    }
}

impl Provider for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn check(&self, spec: &MicroVmSpec) -> Result<(), HostError> {
        self.resolve(spec, Fetch::Check).await.map(|_| ())
    }

    async fn start(&self, record: &VmRecord, spec: &MicroVmSpec) -> Result<Started, ProviderError> {
        let resolved = self
            .resolve(spec, Fetch::Pull)
            .await
            .map_err(|e| ProviderError(e.to_string()))?;
        let pulled = |path: Option<PathBuf>| {
            path.ok_or_else(|| ProviderError("an image was not pulled".into()))
        };
        let (kernel, root_image) = (pulled(resolved.kernel)?, pulled(resolved.root)?);
        let extra = resolved
            .extra
            .into_iter()
            .map(pulled)
            .collect::<Result<Vec<_>, _>>()?;
        let dir = self.vm_dir(&record.uid);
        fs::create_dir_all(&dir)
            .map_err(|e| ProviderError(format!("creating {}: {e}", dir.display())))?;
        let root = dir.join("root.ext4");
        fs::copy(&root_image, &root).map_err(|e| {
            ProviderError(format!("copying root volume {}: {e}", root_image.display()))
        })?;
        let metadata = mmds::serve(0, mmds::decode(&spec.metadata))
            .await
            .map_err(|e| ProviderError(format!("metadata endpoint: {e}")))?;
        fs::write(dir.join("metadata.port"), metadata.port().to_string())
            .map_err(|e| ProviderError(format!("writing metadata.port: {e}")))?;
        if !on_path("socat") {
            return Err(ProviderError(
                "the qemu provider relays guests' metadata requests with socat, which is not installed (apt-get install socat)".into(),
            ));
        }
        let accel = self.accel().await.as_str();
        let console = fs::File::create(dir.join("console.log"))
            .map_err(|e| ProviderError(format!("creating console.log: {e}")))?;
        let mut kernel_args = if accel == "tcg" {
            tcg_args(host_tsc_khz())
        } else {
            BTreeMap::new()
        };
        // far-init reads its configuration straight from host loopback through the host's
        // address: no relay process spawned per connection (10 to 20 ms each under software
        // emulation). Other guests still find the service at 169.254.169.254.
        kernel_args.insert(
            "far.metadata".into(),
            format!("http://{HOST_ADDRESS}:{}", metadata.port()),
        );
        kernel_args.extend(
            spec.kernel
                .as_ref()
                .map(|k| k.cmdline.clone())
                .unwrap_or_default(),
        );
        if let Some(config) = network_config(spec) {
            kernel_args.insert("network-config".into(), config);
        }

        let mut qemu = Command::new(&self.config.binary);
        qemu.args([
            "-M",
            "microvm",
            "-accel",
            accel,
            "-cpu",
            if accel == "kvm" { "host" } else { "max" },
        ])
        .args([
            "-smp",
            &spec.vcpu.to_string(),
            "-m",
            &spec.memory_in_mb.to_string(),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .args(["-append", &cmdline(&self.config.kernel_args, &kernel_args)]);
        if let Some(initrd) = &resolved.initrd {
            qemu.arg("-initrd").arg(initrd);
        }
        let mut drive = |id: String, file: &Path, readonly: bool| {
            let ro = if readonly { ",readonly=on" } else { "" };
            qemu.arg("-drive")
                .arg(format!(
                    "id={id},file={},format=raw,if=none{ro}",
                    file.display()
                ))
                .args(["-device", &format!("virtio-blk-device,drive={id}")]);
        };
        drive("root".into(), &root, false);
        for (i, volume) in extra.iter().enumerate() {
            drive(format!("vol{i}"), volume, true);
        }
        let mac = spec.interfaces.first().and_then(|i| i.guest_mac.clone());
        // Each guest connection to 169.254.169.254:80 spawns a relay to this VM's metadata
        // endpoint: QEMU's guestfwd to a socket would carry one stream for all requests.
        qemu.args([
            "-netdev",
            &format!(
                "user,id=n0,net=169.254.0.0/16,host={HOST_ADDRESS},dns={DNS_ADDRESS},dhcpstart={GUEST_ADDRESS},guestfwd=tcp:{METADATA_ADDRESS}:80-cmd:socat - TCP:127.0.0.1:{}",
                metadata.port()
            ),
        ]);
        qemu.args([
            "-device",
            &match mac {
                Some(mac) => format!("virtio-net-device,netdev=n0,mac={mac}"),
                None => "virtio-net-device,netdev=n0".into(),
            },
        ]);
        let stderr = console
            .try_clone()
            .map_err(|e| ProviderError(format!("console.log: {e}")))?;
        qemu.stdin(Stdio::null())
            .stdout(console)
            .stderr(stderr)
            .process_group(0);

        let child = qemu.spawn().map_err(|e| {
            ProviderError(format!("starting {}: {e}", self.config.binary.display()))
        })?;
        let pid = child.id();
        let identity = ProcessIdentity {
            pid,
            start_ticks: start_ticks(pid).unwrap_or(0),
        };
        info!(uid = %record.uid, pid, accel, "VM process started");
        self.watch(&record.uid, identity.clone(), Some(child), metadata);
        Ok(Started {
            process: Some(identity),
        })
    }

    async fn stop(&self, record: &VmRecord) -> Result<(), ProviderError> {
        if let Some(identity) = record.process.as_ref().filter(|p| alive(p)) {
            let pid = Pid::from_raw(i32::try_from(identity.pid).unwrap_or(0))
                .ok_or_else(|| ProviderError("bad pid".into()))?;
            let _ = kill_process(pid, Signal::TERM);
            for _ in 0..100 {
                if !alive(identity) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if alive(identity) {
                let _ = kill_process(pid, Signal::KILL);
            }
        }
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&record.uid);
        let dir = self.vm_dir(&record.uid);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(ProviderError(format!("removing {}: {e}", dir.display())))
            }
            _ => Ok(()),
        }
    }

    async fn adopt(&self, record: &VmRecord, spec: &MicroVmSpec) -> bool {
        let Some(identity) = record.process.clone().filter(alive) else {
            return false;
        };
        let port = fs::read_to_string(self.vm_dir(&record.uid).join("metadata.port"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        match mmds::serve(port, mmds::decode(&spec.metadata)).await {
            Ok(metadata) => {
                self.watch(&record.uid, identity, None, metadata);
                true
            }
            Err(e) => {
                warn!(uid = %record.uid, port, error = %e, "cannot serve the adopted VM's metadata again");
                false
            }
        }
    }

    fn has_exited(&self, record: &VmRecord) -> bool {
        match self
            .vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&record.uid)
        {
            Some(running) => running.exited.load(Ordering::Relaxed),
            None => record.process.as_ref().is_none_or(|p| !alive(p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_command_line_merges_spec_over_defaults() {
        let base = QemuConfig::new(Images::default(), PathBuf::new()).kernel_args;
        let spec = [
            ("quiet".to_owned(), String::new()),
            ("panic".to_owned(), "0".to_owned()),
        ]
        .into();
        assert_eq!(
            cmdline(&base, &spec),
            "console=ttyS0 ds=nocloud-net;s=http://169.254.169.254/latest/ panic=0 quiet"
        );
    }

    #[test]
    fn software_emulation_is_told_the_tsc_frequency() {
        let args = tcg_args(Some(2_596_122));
        assert_eq!(args["tsc_early_khz"], "2596122");
        assert_eq!(args["tsc"], "reliable");
        assert!(
            host_tsc_khz().is_some_and(|k| k > 100_000),
            "this machine's /proc/cpuinfo has cpu MHz"
        );
    }

    #[test]
    fn a_process_is_known_by_pid_and_start_time() {
        let me = std::process::id();
        let ticks = start_ticks(me).unwrap();
        assert!(alive(&ProcessIdentity {
            pid: me,
            start_ticks: ticks
        }));
        assert!(
            !alive(&ProcessIdentity {
                pid: me,
                start_ticks: ticks + 1
            }),
            "a reused pid is not the same process"
        );
    }
}
