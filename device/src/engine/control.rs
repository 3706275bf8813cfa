//! Runtime control of a running device (the VMM's `--api-sock`): fault rules added and removed
//! while the guest runs, a reset request or a hang injected now, processing paused and resumed.
//! A [`DeviceControl`] is a cheap handle; every call is a message to the device thread, which
//! applies it between two events, so it never races a request in flight.

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::Command;
use crate::fault::FaultRule;
use crate::metrics::{DeviceMetrics, Metrics};

/// Why a control request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No rule at that index.
    #[error("no fault rule {index} (there are {count})")]
    NoSuchRule {
        /// The index given.
        index: usize,
        /// Rules there are.
        count: usize,
    },
    /// The device thread has exited.
    #[error("the device has stopped")]
    Stopped,
}

/// A handle on a running device.
#[derive(Debug, Clone)]
pub struct DeviceControl {
    commands: Sender<Command>,
    wake: Arc<EventFd>,
    /// The rules the device thread runs with (the thread gets a copy on every change).
    rules: Arc<Mutex<Vec<FaultRule>>>,
    metrics: Arc<Metrics>,
}

impl DeviceControl {
    pub(crate) fn new(
        commands: Sender<Command>,
        wake: Arc<EventFd>,
        rules: Vec<FaultRule>,
        metrics: Arc<Metrics>,
    ) -> DeviceControl {
        DeviceControl {
            commands,
            wake,
            rules: Arc::new(Mutex::new(rules)),
            metrics,
        }
    }

    fn send(&self, cmd: Command) -> Result<(), ControlError> {
        self.commands.send(cmd).map_err(|_| ControlError::Stopped)?;
        self.wake.write(1).map_err(|_| ControlError::Stopped)
    }

    fn update<T>(
        &self,
        f: impl FnOnce(&mut Vec<FaultRule>) -> Result<T, ControlError>,
    ) -> Result<T, ControlError> {
        let mut rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        let out = f(&mut rules)?;
        // Sent under the lock, so the thread sees the changes in the order they were made.
        self.send(Command::SetFaults(rules.clone()))?;
        Ok(out)
    }

    /// The fault rules in force, in the order they apply.
    pub fn faults(&self) -> Vec<FaultRule> {
        self.rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Appends a rule; returns its index. Every rule's counters restart (like a reset's).
    pub fn add_fault(&self, rule: FaultRule) -> Result<usize, ControlError> {
        self.update(|rules| {
            rules.push(rule);
            Ok(rules.len() - 1)
        })
    }

    /// Removes the rule at `index` (later rules move up).
    pub fn remove_fault(&self, index: usize) -> Result<FaultRule, ControlError> {
        self.update(|rules| {
            if index >= rules.len() {
                return Err(ControlError::NoSuchRule {
                    index,
                    count: rules.len(),
                });
            }
            Ok(rules.remove(index))
        })
    }

    /// Removes every rule.
    pub fn clear_faults(&self) -> Result<(), ControlError> {
        self.update(|rules| {
            rules.clear();
            Ok(())
        })
    }

    /// The device sets NEEDS_RESET and raises the configuration interrupt now (if a driver has
    /// it running).
    pub fn request_reset(&self) -> Result<(), ControlError> {
        self.send(Command::InjectReset)
    }

    /// The device hangs now: nothing is popped or published until the driver resets it.
    pub fn hang(&self) -> Result<(), ControlError> {
        self.send(Command::InjectHang)
    }

    /// Stops (`true`) or resumes (`false`) taking requests and publishing completions; the
    /// backend finishes what it has. Unlike a hang, resuming needs no reset.
    pub fn pause(&self, paused: bool) -> Result<(), ControlError> {
        self.send(Command::Pause(paused))
    }

    /// The device's counters now.
    pub fn metrics(&self) -> DeviceMetrics {
        self.metrics.snapshot()
    }

    /// Ends the fault log (`--fault-log`) with its summary line, waiting up to `timeout` for the
    /// device thread to do it. For a VMM about to exit without tearing the device down.
    pub fn close_fault_log(&self, timeout: Duration) -> Result<(), ControlError> {
        let (done, wait) = mpsc::sync_channel(1);
        self.send(Command::CloseFaultLog(done))?;
        wait.recv_timeout(timeout)
            .map_err(|_| ControlError::Stopped)
    }
}
