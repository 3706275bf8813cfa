//! The seam between the PCI transport (registers, MSI-X: `transport`) and the queue engine
//! (virtqueues, requests, backing store, faults: `core`). The transport owns a
//! `Box<dyn QueueEngine>` and never touches rings; the engine never sees a register.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::abi;

/// One queue as the driver configured it through the common configuration registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue size (a power of two ≤ the device maximum).
    pub size: u16,
    /// Guest-physical address of the descriptor table.
    pub desc: u64,
    /// Guest-physical address of the available ring.
    pub driver: u64,
    /// Guest-physical address of the used ring.
    pub device: u64,
    /// Whether the driver enabled it.
    pub enabled: bool,
}

/// How the engine raises interrupts; the transport maps queues to MSI-X vectors.
pub trait InterruptSink: Send + Sync {
    /// Signal "used buffers in queue `queue`" (after the engine decided the driver wants it).
    fn signal_queue(&self, queue: u16);
    /// Signal a configuration change (the engine set NEEDS_RESET).
    fn signal_config(&self);
}

/// Why the engine refused to start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    /// A queue's configuration is unusable (size, alignment, addresses outside guest RAM).
    #[error("queue {queue}: {reason}")]
    BadQueue {
        /// Queue index.
        queue: u16,
        /// What is wrong.
        reason: String,
    },
    /// The engine could not start its thread or backing.
    #[error("engine start failed: {0}")]
    Start(String),
}

/// The device's work: everything behind the registers.
pub trait QueueEngine: Send {
    /// The read-only device configuration (BAR0 + `abi::bar0::CONFIG`).
    fn config(&self) -> abi::DeviceConfig;

    /// Features the device offers (`abi::feature`).
    fn device_features(&self) -> u64;

    /// One doorbell eventfd per queue, index = queue. The VMM registers each as an ioeventfd on
    /// the queue's doorbell address; the engine waits on them.
    fn doorbells(&self) -> Vec<Arc<EventFd>>;

    /// DRIVER_OK: start processing the enabled queues with the negotiated `features`.
    /// `interrupts` is how completions reach the guest.
    fn activate(
        &mut self,
        features: u64,
        queues: &[QueueConfig],
        interrupts: Arc<dyn InterruptSink>,
    ) -> Result<(), ActivateError>;

    /// Start a reset: stop taking requests, discard fault-held ones, and let the backing finish
    /// what it already has. Idempotent.
    fn begin_reset(&mut self);

    /// Whether the reset begun by `begin_reset` is complete: no pre-reset request can touch
    /// guest memory or a used ring any more. The transport reports DEVICE_STATUS = 0 only then.
    fn reset_complete(&mut self) -> bool;

    /// Whether the engine stopped trusting a queue (NEEDS_RESET).
    fn needs_reset(&self) -> bool;

    /// The guest set or cleared Bus Master Enable in the command register (SPEC 1). While it is
    /// clear the engine starts no guest-memory access: it pops nothing, starts no backend job
    /// and writes no used ring; work already copying finishes.
    fn set_bus_master(&mut self, on: bool);
}
