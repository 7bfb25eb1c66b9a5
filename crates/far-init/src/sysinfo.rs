//! What the guest reports about itself: the boot clock, and figures read from `/proc` (a
//! parameter, so tests use files).

use std::path::Path;

use far_agent_protocol::Heartbeat;

/// Milliseconds since the kernel started (`/proc/uptime`'s clock, to the millisecond rather
/// than its hundredth of a second, and readable before `/proc` is mounted).
pub fn uptime_ms() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    u64::try_from(now.tv_sec).unwrap_or(0) * 1000
        + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000_000
}

/// Memory in use and in total, bytes, from `meminfo`.
fn memory(proc_root: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(proc_root.join("meminfo")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kib| kib * 1024)
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:")?;
    Some((total.saturating_sub(available), total))
}

/// CPU time used by the guest (user + nice + system), ms, from `stat` (USER_HZ = 100).
fn cpu_ms(proc_root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(proc_root.join("stat")).ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: u64 = line
        .split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    Some(ticks * 10)
}

/// A heartbeat describing the guest now.
pub fn heartbeat(proc_root: &Path, boot_to_entrypoint_ms: Option<u64>) -> Heartbeat {
    let (memory_used_bytes, memory_total_bytes) = memory(proc_root).unwrap_or((0, 0));
    Heartbeat {
        boot_to_entrypoint_ms,
        memory_used_bytes,
        memory_total_bytes,
        cpu_used_ms: cpu_ms(proc_root).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_is_the_kernel_s_own() {
        let text = std::fs::read_to_string("/proc/uptime").unwrap();
        let seconds: f64 = text.split_whitespace().next().unwrap().parse().unwrap();
        let ours = uptime_ms();
        assert!(
            ours.abs_diff((seconds * 1000.0) as u64) < 1000,
            "{ours} ms, {seconds} s"
        );
    }

    #[test]
    fn heartbeat_figures_come_from_proc() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("meminfo"),
            "MemTotal:  1000 kB\nMemFree: 10 kB\nMemAvailable:  400 kB\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("stat"),
            "cpu  10 2 3 400 0 0 0\ncpu0 10 2 3 400\n",
        )
        .unwrap();
        let beat = heartbeat(dir.path(), Some(900));
        assert_eq!(
            (beat.memory_used_bytes, beat.memory_total_bytes),
            (600 * 1024, 1000 * 1024)
        );
        assert_eq!(beat.cpu_used_ms, 150);
        assert_eq!(beat.boot_to_entrypoint_ms, Some(900));
        assert_eq!(
            heartbeat(Path::new("/nonexistent"), None).memory_total_bytes,
            0
        );
    }
}
