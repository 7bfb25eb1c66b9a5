//! What the guest reports about itself, read from `/proc` (a parameter, so tests use files).

use std::path::Path;

use far_agent_protocol::Heartbeat;

/// Milliseconds since the kernel started.
pub fn uptime_ms(proc_root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(proc_root.join("uptime")).ok()?;
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((seconds * 1000.0) as u64)
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
    fn heartbeat_figures_come_from_proc() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("uptime"), "1.25 0.50\n").unwrap();
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
        assert_eq!(uptime_ms(dir.path()), Some(1250));
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
