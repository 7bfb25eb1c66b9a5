//! Getting from the kernel to a root filesystem an agent can run in, and powering off.

use std::ffi::CStr;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use far_agent_protocol::{Mount, Secrets};
use rustix::mount::{MountFlags, mount, mount_move};

use crate::say;

fn mkdir(path: &Path, mode: u32) -> Result<(), String> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(format!("creating {}: {e}", path.display())),
    }
}

/// Mounts a filesystem, treating "already mounted there" as done.
fn mount_once(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: &CStr,
) -> Result<(), String> {
    mkdir(Path::new(target), 0o755)?;
    match mount(source, target, fstype, flags, data) {
        Ok(()) | Err(rustix::io::Errno::BUSY) => Ok(()),
        Err(e) => Err(format!("mounting {fstype} on {target}: {e}")),
    }
}

/// `/dev`, `/proc` and `/sys`.
pub fn mount_pseudo_filesystems() -> Result<(), String> {
    let nosuid = MountFlags::NOSUID | MountFlags::NOEXEC;
    mount_once(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MountFlags::NOSUID,
        c"mode=0755",
    )?;
    mount_once("proc", "/proc", "proc", nosuid | MountFlags::NODEV, c"")?;
    mount_once("sysfs", "/sys", "sysfs", nosuid | MountFlags::NODEV, c"")
}

/// The writable filesystems every VM starts with, memory-backed, and their modes: a reused
/// VM gets fresh ones after each task ([`crate::reset`]).
pub const WRITABLE: [(&str, &CStr); 3] = [
    ("/tmp", c"mode=1777"),
    ("/run", c"mode=0755"),
    ("/dev/shm", c"mode=1777"),
];

/// Mounts a fresh [`WRITABLE`] filesystem.
pub fn mount_writable(target: &str, mode: &CStr) -> Result<(), String> {
    mount_once(
        "tmpfs",
        target,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        mode,
    )
}

/// The [`WRITABLE`] filesystems and `/dev/pts`, fresh in every VM.
pub fn mount_runtime_filesystems() -> Result<(), String> {
    for (target, mode) in WRITABLE {
        mount_writable(target, mode)?;
    }
    mount_once(
        "devpts",
        "/dev/pts",
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        c"mode=0620,ptmxmode=0666",
    )
}

/// Loads the kernel modules listed (one path per line, in load order) with `finit_module`:
/// those built for the running kernel, under `/lib/modules/<release>/`. Any other kernel (FAR's
/// own has every driver built in) loads none. Answers how many were loaded.
pub fn load_modules(list: &Path, release: &str) -> Result<usize, String> {
    let text = fs::read_to_string(list).map_err(|e| format!("reading {}: {e}", list.display()))?;
    let ours = format!("/lib/modules/{release}/");
    let mut loaded = 0;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (module, needed) = module_line(line);
        if !module.starts_with(&ours)
            || needed.is_some_and(|id| !virtio_device_present(Path::new(VIRTIO_DEVICES), id))
        {
            continue;
        }
        let file = fs::File::open(module).map_err(|e| format!("opening module {module}: {e}"))?;
        match rustix::system::finit_module(&file, c"", 0) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => loaded += 1,
            Err(e) => return Err(format!("loading module {module}: {e}")),
        }
    }
    Ok(loaded)
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

/// Where the virtio bus lists its devices (once `virtio_mmio` has found them).
const VIRTIO_DEVICES: &str = "/sys/bus/virtio/devices";

/// A module list line: `PATH`, or `PATH if-virtio-device=ID` for a module only worth loading
/// (and its boot time) when the VM has such a device, e.g. vsock (`0x0013`), which FAR never
/// asks for.
fn module_line(line: &str) -> (&str, Option<&str>) {
    let mut words = line.split_whitespace();
    let module = words.next().unwrap_or_default();
    let needed = words.find_map(|w| w.strip_prefix("if-virtio-device="));
    (module, needed)
}

/// Whether a virtio device of this id (`0x0013`) is on the bus.
fn virtio_device_present(devices: &Path, id: &str) -> bool {
    fs::read_dir(devices).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| fs::read_to_string(e.path().join("device")).is_ok_and(|d| d.trim() == id))
    })
}

fn wait_for(path: &Path, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not appear within {within:?}",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Mounts the root volume and makes it `/`, keeping `/dev`, `/proc` and `/sys`.
pub fn mount_root_and_switch(device: &Path, target: &Path) -> Result<(), String> {
    wait_for(device, Duration::from_secs(10))?;
    mkdir(target, 0o755)?;
    mount(device, target, "ext4", MountFlags::empty(), None)
        .map_err(|e| format!("mounting root volume {} as ext4: {e}", device.display()))?;
    for pseudo in ["/dev", "/proc", "/sys"] {
        let inside = target.join(pseudo.trim_start_matches('/'));
        mkdir(&inside, 0o755)?;
        mount_move(pseudo, &inside)
            .map_err(|e| format!("moving {pseudo} into the root volume: {e}"))?;
    }
    rustix::process::chdir(target).map_err(|e| format!("entering the root volume: {e}"))?;
    mount_move(".", "/").map_err(|e| format!("moving the root volume to /: {e}"))?;
    rustix::process::chroot(".").map_err(|e| format!("chroot into the root volume: {e}"))?;
    rustix::process::chdir("/").map_err(|e| format!("chdir /: {e}"))
}

/// The block device of the `index`th additional volume (the root volume is `/dev/vda`).
fn volume_device(index: u32) -> Option<PathBuf> {
    let letter = char::from_u32(u32::from(b'b') + index).filter(|c| c.is_ascii_lowercase())?;
    Some(PathBuf::from(format!("/dev/vd{letter}")))
}

/// Mounts the read-only volumes.
pub fn mount_volumes(mounts: &[Mount]) -> Result<(), String> {
    for m in mounts {
        let device = volume_device(m.index)
            .ok_or_else(|| format!("volume index {} has no device", m.index))?;
        wait_for(&device, Duration::from_secs(10))?;
        mkdir(Path::new(&m.mount_path), 0o755)?;
        mount(
            &device,
            m.mount_path.as_str(),
            "ext4",
            MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID,
            None,
        )
        .map_err(|e| format!("mounting {} on {}: {e}", device.display(), m.mount_path))?;
    }
    Ok(())
}

/// Writes secret files on memory-backed filesystems (one tmpfs per directory), mode 0400, so
/// no secret ever touches the VM's disk.
pub fn write_secret_files(secrets: &Secrets) -> Result<(), String> {
    let mut mounted: Vec<PathBuf> = Vec::new();
    for file in &secrets.files {
        let path = Path::new(&file.path);
        if !path.is_absolute()
            || path
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(format!(
                "secret file path {:?} must be absolute, without '..'",
                file.path
            ));
        }
        let dir = path.parent().unwrap_or(Path::new("/")).to_owned();
        if !mounted.contains(&dir) {
            mount_once(
                "tmpfs",
                &dir.to_string_lossy(),
                "tmpfs",
                MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                c"mode=0700",
            )?;
            mounted.push(dir);
        }
        let content = base64::engine::general_purpose::STANDARD
            .decode(&file.content)
            .map_err(|_| format!("secret file {:?} is not base64", file.path))?;
        fs::write(path, content).map_err(|e| format!("writing secret file {}: {e}", file.path))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o400))
            .map_err(|e| format!("chmod 0400 {}: {e}", file.path))?;
    }
    Ok(())
}

/// The kernel command line (empty when unreadable).
pub fn kernel_cmdline() -> String {
    fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

/// Syncs disks and powers the VM off. As PID 1 this is a reboot: with Firecracker (and QEMU's
/// `-no-reboot`) the hypervisor then exits. Outside PID 1 (tests) it exits the process.
pub fn power_off(code: i32) -> ! {
    rustix::fs::sync();
    if rustix::process::getpid().is_init() {
        if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::Restart) {
            say!("reboot failed: {e}");
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn additional_volumes_follow_the_root_device() {
        assert_eq!(volume_device(0), Some(PathBuf::from("/dev/vdb")));
        assert_eq!(volume_device(24), Some(PathBuf::from("/dev/vdz")));
        assert_eq!(volume_device(25), None);
    }

    #[test]
    fn secret_paths_that_climb_out_are_refused() {
        let secrets = Secrets {
            env: vec![],
            files: vec![far_agent_protocol::SecretFile {
                path: "/run/s/../../etc/shadow".into(),
                content: String::new(),
            }],
        };
        assert!(
            write_secret_files(&secrets)
                .unwrap_err()
                .contains("without '..'")
        );
    }

    #[test]
    fn modules_for_devices_the_vm_lacks_are_skipped() {
        assert_eq!(module_line("/lib/m/virtio.ko"), ("/lib/m/virtio.ko", None));
        assert_eq!(
            module_line("/lib/m/vsock.ko if-virtio-device=0x0013"),
            ("/lib/m/vsock.ko", Some("0x0013"))
        );
        let bus = tempfile::tempdir().unwrap();
        let device = bus.path().join("virtio0");
        fs::create_dir(&device).unwrap();
        fs::write(device.join("device"), "0x0002\n").unwrap();
        assert!(
            virtio_device_present(bus.path(), "0x0002"),
            "a block device"
        );
        assert!(!virtio_device_present(bus.path(), "0x0013"), "no vsock");
        assert!(!virtio_device_present(Path::new("/nonexistent"), "0x0002"));
    }

    #[test]
    fn missing_module_lists_name_the_file() {
        let err = load_modules(Path::new("/nonexistent/modules"), "6.1.0").unwrap_err();
        assert!(err.starts_with("reading /nonexistent/modules"), "{err}");
    }

    #[test]
    fn modules_of_another_kernel_are_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("modules");
        // Not opened: a module of another release is skipped before its file is read.
        fs::write(
            &list,
            "/lib/modules/6.1.0-57-cloud-amd64/kernel/virtio.ko\n",
        )
        .unwrap();
        assert_eq!(load_modules(&list, "6.1.192-far"), Ok(0));
        let err = load_modules(&list, "6.1.0-57-cloud-amd64").unwrap_err();
        assert!(err.starts_with("opening module"), "{err}");
    }

    #[test]
    fn errors_from_wait_name_the_device() {
        let err =
            wait_for(Path::new("/dev/nonexistent-vdq"), Duration::from_millis(30)).unwrap_err();
        assert!(err.contains("/dev/nonexistent-vdq"));
    }
}
