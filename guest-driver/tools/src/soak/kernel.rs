//! What the soak reads from the guest kernel: the log (for splats), the driver's debugfs
//! statistics, and the driver's request timeout from the kernel command line.

/// Substrings of a kernel-log line that mean one of the kernel's checkers fired (the same
/// families `/bin/aiodma-checked` fails a run on).
const SPLATS: [&str; 10] = [
    "WARNING:",
    "BUG:",
    "] BUG ",
    "KASAN:",
    "UBSAN:",
    "Oops",
    "circular locking",
    "inconsistent lock state",
    "invalid context",
    "kernel BUG",
];

/// The kernel log as it is now (`klogctl` READ_ALL), or `None` if it cannot be read.
pub fn log() -> Option<String> {
    // SAFETY: SIZE_BUFFER (10) takes no buffer.
    let size = unsafe { libc::klogctl(10, std::ptr::null_mut(), 0) };
    if size <= 0 {
        return None;
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: READ_ALL (3) writes at most `size` bytes into `buf`.
    let n = unsafe { libc::klogctl(3, buf.as_mut_ptr().cast(), size) };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// The lines of `log` that are checker reports.
pub fn splat_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| SPLATS.iter().any(|p| l.contains(p)))
        .collect()
}

/// The driver's debugfs statistics (`name: value` lines), empty without debugfs.
pub fn driver_stats(dev: &str) -> Vec<(String, u64)> {
    let name = dev.rsplit('/').next().unwrap_or(dev);
    let Ok(text) = std::fs::read_to_string(format!("/sys/kernel/debug/{name}/stats")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// What the driver did about the device's misbehaviour, from its statistics: the non-zero
/// counters among those that say so, `resets=3 timeouts=1` (or `-`).
pub fn driver_line(stats: &[(String, u64)]) -> String {
    const SHOWN: [&str; 16] = [
        "errors",
        "timeouts",
        "cancels",
        "resets",
        "resets_lie",
        "resets_needs_reset",
        "resets_timeout",
        "used_bad_index",
        "used_bad_id",
        "used_dup",
        "used_no_status",
        "used_bad_len",
        "bad_status",
        "short_reads",
        "watchdog_reaped",
        "empty_irqs",
    ];
    let parts: Vec<String> = stats
        .iter()
        .filter(|(k, v)| *v > 0 && (SHOWN.contains(&k.as_str()) || k == "config_irqs"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// The driver's per-request timeout: `aiodma.timeout_ms=` on the kernel command line, else the
/// module's default (10 s).
pub fn driver_timeout_ms() -> u64 {
    std::fs::read_to_string("/proc/cmdline")
        .ok()
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("aiodma.timeout_ms=")?.parse().ok())
        })
        .unwrap_or(10_000)
        .max(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splats_and_stats_lines() {
        let log = "<6>[    1.0] aiodma 0000:00:01.0: ready\n\
                   <4>[    2.0] WARNING: CPU: 0 PID: 1 at x.rs:1\n\
                   <3>[    3.0] BUG kmalloc-64 (Not tainted): Poison overwritten\n\
                   <6>[    4.0] Command line: console=ttyS0 aiodma.timeout_ms=100\n";
        assert_eq!(splat_lines(log).len(), 2);
        let stats = vec![
            ("submitted".to_string(), 9),
            ("resets".to_string(), 2),
            ("timeouts".to_string(), 0),
            ("config_irqs".to_string(), 1),
        ];
        assert_eq!(driver_line(&stats), "resets=2 config_irqs=1");
        assert_eq!(driver_line(&[]), "-");
    }
}
