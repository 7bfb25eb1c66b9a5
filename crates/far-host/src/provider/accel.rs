//! Which accelerator the qemu provider's VMs use: KVM where a probe guest really runs under it,
//! software emulation (TCG) elsewhere.
//!
//! `/dev/kvm` existing proves nothing: in nested setups it opens and then fails or hangs every
//! guest. The probe runs QEMU as a VM is run (`-M microvm -accel kvm -cpu host`) with a 64 KiB
//! firmware whose reset vector writes to an `isa-debug-exit` port: a working KVM exits with the
//! port's code in the time QEMU takes to start (tens of milliseconds), a broken one aborts or
//! hangs. The verdict is kept in a file, valid while the QEMU binary, the host kernel and the
//! `/dev/kvm` device are the ones it was made with, so a machine probes once, not per start.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Which accelerator QEMU uses (also the `--accel` flag of `far host` and `far run`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM if a probe guest runs under it (the verdict kept), else software emulation.
    #[default]
    Auto,
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// What a probe decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// KVM runs guests.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Verdict {
    /// QEMU's name for it (`-accel`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// The probe firmware writes this to the exit port; QEMU exits with `(code << 1) | 1`.
const EXIT_CODE: u8 = 0x31;
const EXIT_PORT: u16 = 0xf4;

/// What a verdict was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Machine {
    qemu: PathBuf,
    qemu_bytes: u64,
    qemu_modified_ns: i128,
    host_kernel: String,
    kvm_device: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    machine: Machine,
    verdict: Verdict,
    reason: String,
}

/// A KVM probe for one QEMU binary, keeping its verdict in `file`.
#[derive(Debug, Clone)]
pub struct Probe {
    binary: PathBuf,
    device: PathBuf,
    file: Option<PathBuf>,
    timeout: Duration,
}

impl Probe {
    /// Probes `binary` against `/dev/kvm`, keeping the verdict in `file` when given. Two
    /// seconds without an answer is a hang: a working KVM answers in well under one.
    pub fn new(binary: &Path, file: Option<PathBuf>) -> Self {
        Self {
            binary: binary.to_owned(),
            device: "/dev/kvm".into(),
            file,
            timeout: Duration::from_secs(2),
        }
    }

    /// The same probe against another device node and with another timeout (for tests).
    #[must_use]
    pub fn with_device(mut self, device: &Path, timeout: Duration) -> Self {
        self.device = device.to_owned();
        self.timeout = timeout;
        self
    }

    /// The kept verdict, if it was made for this machine as it is now.
    pub fn kept(&self) -> Option<Verdict> {
        let file = self.file.as_ref()?;
        let kept: Kept = serde_json::from_slice(&fs::read(file).ok()?).ok()?;
        (Some(&kept.machine) == self.machine().as_ref()).then_some(kept.verdict)
    }

    /// Runs the probe and keeps its verdict.
    pub async fn run(&self) -> Verdict {
        let (verdict, reason) = self.decide().await;
        match verdict {
            Verdict::Kvm => info!("a probe guest runs under KVM: VMs use KVM"),
            Verdict::Tcg => warn!(
                "KVM cannot run guests here ({reason}): VMs use software emulation (slower); --accel kvm or tcg overrides this"
            ),
        }
        if let (Some(file), Some(machine)) = (&self.file, self.machine()) {
            let kept = Kept {
                machine,
                verdict,
                reason,
            };
            let written = serde_json::to_vec_pretty(&kept)
                .map_err(std::io::Error::from)
                .and_then(|bytes| write_atomically(file, &bytes));
            if let Err(e) = written {
                warn!(file = %file.display(), "the KVM verdict could not be kept: {e}");
            }
        }
        verdict
    }

    async fn decide(&self) -> (Verdict, String) {
        if let Err(e) = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.device)
        {
            return (Verdict::Tcg, format!("{}: {e}", self.device.display()));
        }
        match run_guest(
            &self.binary,
            ["-accel", "kvm", "-cpu", "host"],
            self.timeout,
        )
        .await
        {
            Ok(()) => (Verdict::Kvm, "a probe guest ran under KVM".into()),
            Err(reason) => (Verdict::Tcg, reason),
        }
    }

    /// What the verdict depends on, when it can all be read.
    fn machine(&self) -> Option<Machine> {
        let qemu = fs::canonicalize(on_path(&self.binary)?).ok()?;
        let meta = fs::metadata(&qemu).ok()?;
        let kernel = |f: &str| fs::read_to_string(format!("/proc/sys/kernel/{f}")).ok();
        Some(Machine {
            qemu_bytes: meta.len(),
            qemu_modified_ns: i128::from(meta.mtime()) * 1_000_000_000
                + i128::from(meta.mtime_nsec()),
            qemu,
            host_kernel: format!(
                "{} {}",
                kernel("osrelease")?.trim(),
                kernel("version")?.trim()
            ),
            kvm_device: fs::metadata(&self.device).ok()?.rdev(),
        })
    }
}

/// Runs the probe firmware in a microvm with these accelerator arguments: `Ok` when the guest
/// reached the exit port, else why not.
async fn run_guest(binary: &Path, accel: [&str; 4], timeout: Duration) -> Result<(), String> {
    let firmware = firmware().map_err(|e| format!("writing the probe firmware: {e}"))?;
    let probe = tokio::process::Command::new(binary)
        .args(["-M", "microvm", "-m", "16"])
        .args(accel)
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args([
            "-device",
            &format!("isa-debug-exit,iobase={EXIT_PORT:#x},iosize=1"),
            "-bios",
        ])
        .arg(firmware.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, probe)
        .await
        .map_err(|_| {
            format!(
                "a probe guest did not run within {} ms",
                timeout.as_millis()
            )
        })?
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    if out.status.code() == Some(i32::from(EXIT_CODE) << 1 | 1) {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said = stderr.lines().rev().find(|l| !l.trim().is_empty());
    Err(format!(
        "a probe guest under {} ended with {}{}",
        accel[1],
        out.status,
        said.map_or(String::new(), |l| format!(": {}", l.trim()))
    ))
}

/// A binary named without a directory is looked up on `PATH`, as a spawn would.
fn on_path(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        return Some(binary.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

/// 64 KiB of `hlt` whose reset vector (16 bytes below 4 GiB, the firmware's last 16 bytes) runs
/// `mov al, EXIT_CODE; out EXIT_PORT, al; hlt`.
fn firmware() -> std::io::Result<tempfile::NamedTempFile> {
    const HLT: u8 = 0xf4;
    let mut image = vec![HLT; 64 * 1024];
    let [port, ..] = EXIT_PORT.to_le_bytes();
    let reset = image.len() - 16;
    image[reset..reset + 5].copy_from_slice(&[0xb0, EXIT_CODE, 0xe6, port, HLT]);
    let mut file = tempfile::Builder::new()
        .prefix("far-kvm-probe-")
        .tempfile()?;
    file.write_all(&image)?;
    file.flush()?;
    Ok(file)
}

fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(file).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A stand-in QEMU that records each start in `starts` and runs `body`.
    fn fake_qemu(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("qemu");
        let starts = dir.join("starts");
        fs::write(
            &path,
            format!("#!/bin/sh\necho >> {}\n{body}\n", starts.display()),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn starts(dir: &Path) -> usize {
        fs::read_to_string(dir.join("starts")).map_or(0, |s| s.lines().count())
    }

    fn probe(dir: &Path, qemu: &Path) -> Probe {
        let device = dir.join("kvm");
        fs::write(&device, "").unwrap();
        Probe::new(qemu, Some(dir.join("accel.json")))
            .with_device(&device, Duration::from_millis(500))
    }

    #[tokio::test]
    async fn the_exit_code_of_the_probe_guest_means_kvm_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = fake_qemu(dir.path(), "exit 99");
        let probe = probe(dir.path(), &qemu);
        assert_eq!(probe.kept(), None);
        assert_eq!(probe.run().await, Verdict::Kvm);
        assert_eq!(probe.kept(), Some(Verdict::Kvm));
        assert_eq!(starts(dir.path()), 1);
    }

    #[tokio::test]
    async fn a_hang_or_a_crash_means_tcg() {
        for body in ["sleep 30", "echo 'failed to set MSR' >&2; exit 134"] {
            let dir = tempfile::tempdir().unwrap();
            let qemu = fake_qemu(dir.path(), body);
            let started = std::time::Instant::now();
            assert_eq!(probe(dir.path(), &qemu).run().await, Verdict::Tcg, "{body}");
            assert!(started.elapsed() < Duration::from_secs(5), "{body}");
        }
    }

    #[tokio::test]
    async fn a_kept_verdict_holds_until_qemu_changes() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = fake_qemu(dir.path(), "exit 99");
        probe(dir.path(), &qemu).run().await;
        assert_eq!(probe(dir.path(), &qemu).kept(), Some(Verdict::Kvm));
        fake_qemu(dir.path(), "# a new build\nexit 99");
        assert_eq!(probe(dir.path(), &qemu).kept(), None);
    }

    #[tokio::test]
    async fn no_device_means_tcg_without_starting_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = fake_qemu(dir.path(), "exit 99");
        let probe = Probe::new(&qemu, None)
            .with_device(&dir.path().join("absent"), Duration::from_millis(500));
        assert_eq!(probe.run().await, Verdict::Tcg);
        assert_eq!(starts(dir.path()), 0);
    }

    #[tokio::test]
    async fn the_probe_guest_reaches_the_exit_port_under_real_qemu() {
        // Under TCG, which runs everywhere: the same firmware and machine the KVM probe uses.
        let tcg = ["-accel", "tcg", "-cpu", "max"];
        let ran = run_guest(
            Path::new("qemu-system-x86_64"),
            tcg,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(ran, Ok(()));
    }

    #[test]
    fn the_firmware_jumps_straight_to_the_exit_port() {
        let image = fs::read(firmware().unwrap().path()).unwrap();
        assert_eq!(image.len(), 65_536);
        assert_eq!(&image[0xfff0..0xfff5], &[0xb0, 0x31, 0xe6, 0xf4, 0xf4]);
    }
}
