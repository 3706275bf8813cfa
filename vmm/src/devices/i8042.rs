//! Just enough of the i8042 keyboard controller for a guest reboot through port 0x64 (reset
//! command 0xfe, Linux's `reboot=k`) to stop the VMM.

use std::sync::Arc;

use super::bus::BusDevice;
use crate::exit::{StopReason, StopSignal};

/// Data port 0x60 and command port 0x64, as one range.
pub const BASE: u16 = 0x60;
/// 0x60..=0x64.
pub const LEN: u16 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The controller: reads see an idle controller; a CPU reset stops the VM.
#[derive(Debug)]
pub struct I8042 {
    stop: Arc<StopSignal>,
}

impl I8042 {
    /// A controller that reports resets to `stop`.
    pub fn new(stop: Arc<StopSignal>) -> Self {
        Self { stop }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty (ready for commands).
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            log::info!("guest requested a reset through the i8042");
            self.stop.stop(StopReason::GuestReset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_vm() {
        let stop = Arc::new(StopSignal::new().unwrap());
        let mut dev = I8042::new(stop.clone());
        dev.write(0, &[CMD_RESET_CPU]);
        assert_eq!(stop.reason(), None);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(stop.reason(), Some(StopReason::GuestReset));
    }
}
