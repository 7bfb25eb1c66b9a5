//! Returning a reused VM (`reuse: Reset`) to the state it first waited for a claim in: no
//! process of the last task left, `/tmp`, `/run` and `/dev/shm` fresh (the secret files with
//! them), nothing new in `/dev`, the same mounts, the root read-only throughout. Whatever
//! cannot be put back is an error, and far-init powers the VM off instead: the pool replaces it.
//!
//! This removes what an ordinary task leaves behind. It is no defence against a hostile task
//! running as root in the guest (which could write the root volume's device, or change kernel
//! settings): agents that must not trust each other use `reuse: Never`, a new VM each.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::mount::{MountFlags, UnmountFlags, mount_remount, unmount};
use rustix::process::{Pid, Signal, WaitOptions, kill_process, wait};

use crate::boot::{WRITABLE, mount_writable};

/// How long killed processes get to be gone.
const KILL_WITHIN: Duration = Duration::from_secs(5);
/// `PF_KTHREAD` in `/proc/<pid>/stat`'s flags: a kernel thread, not a process of the task.
const PF_KTHREAD: u64 = 0x0020_0000;

/// What a clean VM looks like, taken before its first claim.
pub struct Baseline {
    /// The mount table, sorted (no mount ids: they change as the writable filesystems are
    /// renewed, and so does their order).
    mounts: Vec<MountEntry>,
    /// Every path under `/dev`, outside the filesystems mounted below it.
    dev: BTreeSet<PathBuf>,
}

/// One line of `/proc/self/mountinfo`, less what changes from one mount to the next.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct MountEntry {
    point: String,
    /// Root within the filesystem, options, type, source and superblock options.
    rest: String,
}

/// Makes the root read-only (the task writes only in the [`WRITABLE`] filesystems, which are
/// renewed after it) and records the clean state.
///
/// # Errors
/// The root cannot be made read-only, or the state cannot be read.
pub fn prepare() -> Result<Baseline, String> {
    mount_remount("/", MountFlags::RDONLY, c"")
        .map_err(|e| format!("remounting / read-only: {e}"))?;
    let mut mounts = mount_table()?;
    let dev = dev_tree(&mounts)?;
    mounts.sort();
    Ok(Baseline { mounts, dev })
}

/// Puts the VM back as [`prepare`] found it.
///
/// # Errors
/// What could not be put back (a process that outlived SIGKILL, a mount that stays, a path
/// in `/dev` that cannot be removed, a mount table that differs): the VM must not be reused.
pub fn reset(baseline: &Baseline) -> Result<(), String> {
    kill_all()?;
    for point in to_unmount(&baseline.mounts, &mount_table()?) {
        unmount(point.as_str(), UnmountFlags::DETACH)
            .map_err(|e| format!("unmounting {point}: {e}"))?;
    }
    for (target, mode) in WRITABLE {
        mount_writable(target, mode)?;
    }
    let mut mounts = mount_table()?;
    let dev = dev_tree(&mounts)?;
    mounts.sort();
    if mounts != baseline.mounts {
        return Err(format!(
            "the mount table differs from the clean VM's: {}",
            differences(&baseline.mounts, &mounts)
        ));
    }
    for path in dev.difference(&baseline.dev) {
        let removed = match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
            Ok(_) => fs::remove_file(path),
            Err(_) => Ok(()), // Gone with a directory removed before it.
        };
        removed.map_err(|e| format!("removing {} (left by the task): {e}", path.display()))?;
    }
    Ok(())
}

/// SIGKILLs every process but PID 1 until none is left, reaping them.
fn kill_all() -> Result<(), String> {
    let until = Instant::now() + KILL_WITHIN;
    loop {
        while let Ok(Some(_)) = wait(WaitOptions::NOHANG) {}
        let left = task_processes()?;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(format!(
                "{} process(es) of the task outlived SIGKILL: {left:?}",
                left.len()
            ));
        }
        for pid in left.iter().filter_map(|&pid| Pid::from_raw(pid)) {
            let _ = kill_process(pid, Signal::KILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pids of every process but PID 1 and the kernel's threads.
fn task_processes() -> Result<Vec<i32>, String> {
    let entries = fs::read_dir("/proc").map_err(|e| format!("reading /proc: {e}"))?;
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != 1)
        .filter(|pid| {
            // A process gone since the listing is no longer in the way.
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !is_kernel_thread(&stat).unwrap_or(false))
        })
        .collect())
}

/// Whether a `/proc/<pid>/stat` line is a kernel thread's; `None` when it cannot be read.
fn is_kernel_thread(stat: &str) -> Option<bool> {
    // The command name is in parentheses and may hold any character: fields follow the last ')'.
    let (_, fields) = stat.rsplit_once(')')?;
    let flags: u64 = fields.split_whitespace().nth(6)?.parse().ok()?;
    Some(flags & PF_KTHREAD != 0)
}

fn mount_table() -> Result<Vec<MountEntry>, String> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    Ok(parse_mountinfo(&text))
}

/// The entries of `/proc/self/mountinfo`, in mount order.
fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let mut fields = head.split(' ');
            let (_id, _parent, _device) = (fields.next()?, fields.next()?, fields.next()?);
            let root = fields.next()?;
            let point = unescape(fields.next()?);
            let options = fields.next()?;
            Some(MountEntry {
                point,
                rest: format!("{root} {options} - {tail}"),
            })
        })
        .collect()
}

/// Mount points are written with `\ooo` octal escapes for space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `point` is `dir` or below it.
fn under(point: &str, dir: &str) -> bool {
    Path::new(point).starts_with(dir)
}

/// The mount points to unmount, topmost first: everything on or below a [`WRITABLE`] path
/// (renewed after), and every mount the clean VM did not have (counted per mount point, so a
/// filesystem mounted over one of the clean VM's goes too).
fn to_unmount(baseline: &[MountEntry], now: &[MountEntry]) -> Vec<String> {
    let mut allowed: BTreeMap<&str, usize> = BTreeMap::new();
    for entry in baseline {
        if !WRITABLE.iter().any(|(dir, _)| under(&entry.point, dir)) {
            *allowed.entry(&entry.point).or_default() += 1;
        }
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut extra = Vec::new();
    for entry in now {
        let count = seen.entry(&entry.point).or_default();
        *count += 1;
        if *count > allowed.get(entry.point.as_str()).copied().unwrap_or(0) {
            extra.push(entry.point.clone());
        }
    }
    extra.reverse();
    extra
}

/// The entries only one side has, for the error message.
fn differences(baseline: &[MountEntry], now: &[MountEntry]) -> String {
    let count = |entries: &[MountEntry]| {
        let mut counts: BTreeMap<MountEntry, usize> = BTreeMap::new();
        for e in entries {
            *counts.entry(e.clone()).or_default() += 1;
        }
        counts
    };
    let (before, after) = (count(baseline), count(now));
    let mut said = Vec::new();
    for (entry, n) in &after {
        if before.get(entry) != Some(n) {
            said.push(format!("now {} {}", entry.point, entry.rest));
        }
    }
    for (entry, n) in &before {
        if after.get(entry) != Some(n) {
            said.push(format!("was {} {}", entry.point, entry.rest));
        }
    }
    said.join("; ")
}

/// Every path under `/dev`, not descending into filesystems mounted below it.
fn dev_tree(mounts: &[MountEntry]) -> Result<BTreeSet<PathBuf>, String> {
    let skip: BTreeSet<PathBuf> = mounts
        .iter()
        .map(|m| PathBuf::from(&m.point))
        .filter(|p| p.starts_with("/dev") && p != Path::new("/dev"))
        .collect();
    let mut found = BTreeSet::new();
    let mut todo = vec![PathBuf::from("/dev")];
    while let Some(dir) = todo.pop() {
        let entries = fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if skip.contains(&path) {
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(path.clone());
            }
            found.insert(path);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = "\
22 1 254:0 / / ro,relatime - ext4 /dev/vda ro
23 22 0:5 / /dev rw,nosuid,relatime - devtmpfs devtmpfs rw,size=250000k,mode=755
24 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
26 22 0:23 / /tmp rw,nosuid,nodev,relatime - tmpfs tmpfs rw
27 22 0:24 / /run rw,nosuid,nodev,relatime - tmpfs tmpfs rw,mode=755
28 23 0:25 / /dev/shm rw,nosuid,nodev,relatime - tmpfs tmpfs rw
29 23 0:26 / /dev/pts rw,nosuid,noexec,relatime - devpts devpts rw,mode=620,ptmxmode=666
30 22 254:16 / /models ro,nosuid,nodev,relatime - ext4 /dev/vdb ro
";

    #[test]
    fn mount_entries_ignore_mount_ids_and_unescape_points() {
        let clean = parse_mountinfo(CLEAN);
        assert_eq!(clean.len(), 8);
        assert_eq!(clean[0].point, "/");
        assert_eq!(clean[0].rest, "/ ro,relatime - ext4 /dev/vda ro");
        let renewed = CLEAN.replace("26 22 0:23", "41 22 0:31");
        assert_eq!(parse_mountinfo(&renewed), clean);
        let odd = parse_mountinfo("40 22 0:30 / /run/my\\040secrets rw - tmpfs tmpfs rw\n");
        assert_eq!(odd[0].point, "/run/my secrets");
    }

    #[test]
    fn after_a_task_the_writable_filesystems_and_every_new_mount_go_topmost_first() {
        let clean = parse_mountinfo(CLEAN);
        let after = parse_mountinfo(&format!(
            "{CLEAN}\
40 27 0:30 / /run/creds rw,nosuid,nodev,noexec - tmpfs tmpfs rw,mode=700
41 22 0:31 / /etc/agent rw,nosuid,nodev,noexec - tmpfs tmpfs rw,mode=700
42 30 0:32 / /models rw - tmpfs tmpfs rw
"
        ));
        assert_eq!(
            to_unmount(&clean, &after),
            [
                "/models",
                "/etc/agent",
                "/run/creds",
                "/dev/shm",
                "/run",
                "/tmp"
            ],
            "the volume stays, the filesystem over it goes"
        );
        // Nothing the clean VM had is unmounted but the writable filesystems.
        assert_eq!(to_unmount(&clean, &clean), ["/dev/shm", "/run", "/tmp"]);
    }

    #[test]
    fn a_root_remounted_writable_is_a_difference_named_in_the_error() {
        let clean = parse_mountinfo(CLEAN);
        let tampered = parse_mountinfo(&CLEAN.replace(
            "/ / ro,relatime - ext4 /dev/vda ro",
            "/ / rw,relatime - ext4 /dev/vda rw",
        ));
        assert_ne!(clean, tampered);
        let said = differences(&clean, &tampered);
        assert!(said.contains("now / / rw,relatime"), "{said}");
        assert!(said.contains("was / / ro,relatime"), "{said}");
    }

    #[test]
    fn kernel_threads_are_told_from_processes_by_their_flags() {
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0";
        let process = "57 (sleep (x) 1) S 1 57 57 0 -1 4194560 100 0 0 0";
        assert_eq!(is_kernel_thread(kthread), Some(true));
        assert_eq!(is_kernel_thread(process), Some(false));
        assert_eq!(is_kernel_thread("garbage"), None);
    }
}
