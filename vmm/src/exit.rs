//! Why the VM stopped, and the process exit code that reports it.
//!
//! | code | meaning |
//! |------|---------|
//! | 0..=255 | the guest command's own exit status (reported through `abi::platform::EXIT_PORT`) |
//! | 2   | bad input: flags, missing or invalid kernel/initrd files |
//! | 3   | KVM failure: a failing ioctl, an unexpected exit reason, an emulation failure; a seccomp filter that could not be installed |
//! | 101 | the guest kernel panicked |
//! | 102 | the guest reset or shut down without reporting an exit status |
//! | 124 | `--timeout` expired (as coreutils `timeout`) |
//! | 159 | a thread made a system call its seccomp filter forbids (128 + SIGSYS, as a shell reports a process SIGSYS killed) |

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Exit code for invalid user input.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit code for a KVM failure.
pub const EXIT_KVM_FAILURE: u8 = 3;
/// Exit code for a guest kernel panic.
pub const EXIT_GUEST_PANIC: u8 = 101;
/// Exit code for a guest that stopped without reporting a status.
pub const EXIT_GUEST_RESET: u8 = 102;
/// Exit code for an expired `--timeout`.
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit code for a system call forbidden by a seccomp filter (`--seccomp on`).
pub const EXIT_SECCOMP: u8 = 159;

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// `/init` reported the guest command's exit status.
    GuestExited(u8),
    /// The guest kernel panicked.
    GuestPanicked,
    /// The guest reset (reboot, triple fault) or shut down without reporting a status.
    GuestReset,
    /// `--timeout` expired.
    Timeout,
    /// A vCPU failed: the message names the ioctl or exit reason.
    VcpuFailed(String),
    /// A thread could not install its seccomp filter: the message says which and why.
    SeccompFailed(String),
}

impl StopReason {
    /// The process exit code for this reason.
    pub fn exit_code(&self) -> u8 {
        match self {
            StopReason::GuestExited(status) => *status,
            StopReason::GuestPanicked => EXIT_GUEST_PANIC,
            StopReason::GuestReset => EXIT_GUEST_RESET,
            StopReason::Timeout => EXIT_TIMEOUT,
            StopReason::VcpuFailed(_) | StopReason::SeccompFailed(_) => EXIT_KVM_FAILURE,
        }
    }
}

/// The one place every thread reports "the VM must stop": the first reason wins, and the event
/// loop wakes up through `event_fd`.
#[derive(Debug)]
pub struct StopSignal {
    reason: Mutex<Option<StopReason>>,
    event_fd: EventFd,
}

impl StopSignal {
    /// A signal that has not fired.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event_fd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Report a reason to stop. Later reports are ignored: the first cause is the real one.
    pub fn stop(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            log::debug!("stop requested: {reason:?}");
            *slot = Some(reason);
        }
        drop(slot);
        if let Err(e) = self.event_fd.write(1) {
            log::error!("cannot wake the event loop: {e}");
        }
    }

    /// The reason, once one was reported.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable when `stop` is called.
    pub fn event_fd(&self) -> &EventFd {
        &self.event_fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let sig = StopSignal::new().unwrap();
        assert_eq!(sig.reason(), None);
        sig.stop(StopReason::GuestExited(7));
        sig.stop(StopReason::Timeout);
        assert_eq!(sig.reason(), Some(StopReason::GuestExited(7)));
        assert_eq!(sig.event_fd().read().unwrap(), 2);
    }

    #[test]
    fn exit_codes_are_distinct() {
        assert_eq!(StopReason::GuestExited(7).exit_code(), 7);
        assert_eq!(StopReason::Timeout.exit_code(), 124);
        assert_eq!(StopReason::GuestPanicked.exit_code(), 101);
        assert_eq!(StopReason::GuestReset.exit_code(), 102);
        assert_eq!(StopReason::VcpuFailed("KVM_RUN".into()).exit_code(), 3);
        assert_eq!(StopReason::SeccompFailed("x".into()).exit_code(), 3);
    }
}
