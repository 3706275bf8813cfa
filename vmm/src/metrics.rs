//! What a run measured, written as JSON by `aiodma run --metrics PATH` when the VM stops.

use std::io;
use std::path::Path;

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

    /// Write as pretty JSON, atomically (a temporary file renamed into place).
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json + "\n")?;
        std::fs::rename(&tmp, path)
    }
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
}
