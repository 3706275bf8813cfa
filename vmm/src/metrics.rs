//! What a run measured, written as JSON by `aiodma run --metrics PATH` when the VM stops.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use aiodma_device::metrics::DeviceMetrics;
use serde::Serialize;

use crate::exit::StopReason;

/// One run's metrics. Times are milliseconds since the VMM process started.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RunMetrics {
    /// `guest_exited`, `guest_panicked`, `guest_reset`, `timeout` or `vcpu_failed`.
    pub stop_reason: String,
    /// The process exit code.
    pub exit_code: u8,
    /// The guest command's status, when it reported one.
    pub guest_status: Option<u8>,
    /// Whether this VMM ran inside the emulated host (timings include emulation).
    pub emulated_host: bool,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// When guest userspace (`/init`) started.
    pub userspace_reached_ms: Option<u64>,
    /// When the guest command started.
    pub command_started_ms: Option<u64>,
    /// When the VM stopped.
    pub stopped_ms: u64,
    /// The VMM's resident set size at stop, KiB.
    pub vmm_rss_kib: Option<u64>,
    /// Guest RAM resident in host memory at stop, KiB.
    pub guest_resident_kib: Option<u64>,
    /// The VMM's own memory: RSS minus resident guest RAM, KiB.
    pub vmm_overhead_kib: Option<u64>,
    /// The DMA device's counters (none with `--no-device`).
    pub device: Option<DeviceMetrics>,
}

impl RunMetrics {
    /// Record the stop reason and exit code.
    pub fn set_stop(&mut self, reason: &StopReason) {
        self.stop_reason = match reason {
            StopReason::GuestExited(_) => "guest_exited",
            StopReason::GuestPanicked => "guest_panicked",
            StopReason::GuestReset => "guest_reset",
            StopReason::Timeout => "timeout",
            StopReason::VcpuFailed(_) => "vcpu_failed",
            StopReason::SeccompFailed(_) => "seccomp_failed",
        }
        .to_string();
        self.exit_code = reason.exit_code();
        self.guest_status = match reason {
            StopReason::GuestExited(status) => Some(*status),
            _ => None,
        };
    }

    /// Write as pretty JSON, atomically: a new temporary file in the same directory, renamed
    /// over `path` (which replaces a symlink at `path` rather than writing through it).
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        let (tmp, mut file) = create_temp(path)?;
        let result = file
            .write_all(json.as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            // Durable before it replaces the old file, so a crash leaves one or the other.
            .and_then(|()| file.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Creates a file next to `path` under a name not in use. A fixed name (`path.tmp`) could be a
/// symlink someone planted to make the VMM overwrite another file: `O_CREAT|O_EXCL|O_NOFOLLOW`
/// never opens an existing file and never follows a link, and a taken name just moves on to
/// the next one.
fn create_temp(path: &Path) -> io::Result<(PathBuf, File)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("metrics path '{}' has no file name", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for _ in 0..64 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.{n}.{nanos:x}.tmp", std::process::id()));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("no free temporary name next to '{}'", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_stop_and_times() {
        let mut m = RunMetrics {
            vcpus: 2,
            userspace_reached_ms: Some(812),
            ..Default::default()
        };
        m.set_stop(&StopReason::GuestExited(7));
        let dir = std::env::temp_dir().join(format!("aiodma-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.json");
        m.write(&path).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["stop_reason"], "guest_exited");
        assert_eq!(v["exit_code"], 7);
        assert_eq!(v["guest_status"], 7);
        assert_eq!(v["userspace_reached_ms"], 812);
        assert_eq!(v["command_started_ms"], serde_json::Value::Null);
        assert_eq!(v["device"], serde_json::Value::Null);
        m.device = Some(DeviceMetrics {
            doorbells: 3,
            ..Default::default()
        });
        m.write(&path).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["device"]["doorbells"], 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn symlinks_at_the_temporary_or_the_target_name_are_not_followed() {
        use std::os::unix::fs::symlink;
        let dir = std::env::temp_dir().join(format!("aiodma-metrics-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // The name the old code wrote to, and the target itself, both link to the victim.
        symlink(&victim, dir.join("m.tmp")).unwrap();
        let path = dir.join("m.json");
        symlink(&victim, &path).unwrap();
        let m = RunMetrics {
            vcpus: 1,
            ..Default::default()
        };
        m.write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(std::fs::symlink_metadata(dir.join("m.tmp"))
            .unwrap()
            .file_type()
            .is_symlink());
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(
            meta.file_type().is_file(),
            "the link was replaced, not followed"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["vcpus"], 1);
        // No temporary file left behind.
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["m.json", "m.tmp", "victim"]);
        // A path without a file name has no place for a temporary file.
        assert!(create_temp(Path::new("/")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
