//! The guest/VMM signalling ports (`abi::platform`): boot-phase markers and the exit status.
//!
//! Like Firecracker's boot timer, a phase write is timestamped against the VMM's start, so
//! "guest userspace reached in N ms" measures the whole boot as the user sees it.

use std::sync::Arc;
use std::time::Instant;

use aiodma_device::abi::platform;

use super::bus::BusDevice;
use crate::exit::{StopReason, StopSignal};

/// Serves `EXIT_PORT` (offset 0) and `PHASE_PORT` (offset 1).
#[derive(Debug)]
pub struct PlatformPorts {
    vmm_start: Instant,
    stop: Arc<StopSignal>,
    userspace_ms: Option<u64>,
    command_ms: Option<u64>,
}

/// First port of the device; it spans `EXIT_PORT..=PHASE_PORT`.
pub const BASE: u16 = platform::EXIT_PORT;
/// Number of ports.
pub const LEN: u16 = platform::PHASE_PORT - platform::EXIT_PORT + 1;

impl PlatformPorts {
    /// A device that reports to `stop` and measures from `vmm_start`.
    pub fn new(vmm_start: Instant, stop: Arc<StopSignal>) -> Self {
        Self {
            vmm_start,
            stop,
            userspace_ms: None,
            command_ms: None,
        }
    }

    /// Milliseconds from VMM start to guest userspace, once reached.
    pub fn userspace_ms(&self) -> Option<u64> {
        self.userspace_ms
    }

    /// Milliseconds from VMM start to the guest command's start, once reported.
    pub fn command_ms(&self) -> Option<u64> {
        self.command_ms
    }
}

impl BusDevice for PlatformPorts {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let port = BASE + offset as u16;
        match port {
            platform::EXIT_PORT => self.stop.stop(StopReason::GuestExited(value)),
            platform::PHASE_PORT => {
                let ms = u64::try_from(self.vmm_start.elapsed().as_millis()).unwrap_or(u64::MAX);
                match value {
                    platform::PHASE_USERSPACE => {
                        self.userspace_ms = Some(ms);
                        log::info!("guest userspace reached in {ms} ms");
                    }
                    platform::PHASE_COMMAND => {
                        self.command_ms = Some(ms);
                        log::info!("guest command started at {ms} ms");
                    }
                    other => log::debug!("guest phase {other} at {ms} ms"),
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_port_stops_with_status() {
        let stop = Arc::new(StopSignal::new().unwrap());
        let mut dev = PlatformPorts::new(Instant::now(), stop.clone());
        dev.write(
            u64::from(platform::PHASE_PORT - BASE),
            &[platform::PHASE_USERSPACE],
        );
        assert!(dev.userspace_ms().is_some());
        assert_eq!(stop.reason(), None);
        dev.write(0, &[42]);
        assert_eq!(stop.reason(), Some(StopReason::GuestExited(42)));
    }
}
