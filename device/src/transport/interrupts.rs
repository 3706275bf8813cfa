//! The interrupt sink the engine signals through: queue → its MSI-X vector, dead after a reset.

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use super::lock;
use crate::abi::NO_VECTOR;
use crate::engine::InterruptSink;
use crate::pci::msix::Msix;

/// The interrupt sink handed to the engine at DRIVER_OK. It dies (drops every signal) when the
/// device resets, so a late completion of the old session never raises a vector.
pub(super) struct Interrupts {
    pub(super) msix: Arc<Mutex<Msix>>,
    pub(super) queue_vectors: Vec<u16>,
    pub(super) config_vector: Arc<AtomicU16>,
    pub(super) live: AtomicBool,
    /// Bus Master Enable: an MSI is a memory write, so none is sent while it is clear.
    pub(super) bus_master: Arc<AtomicBool>,
}

impl std::fmt::Debug for Interrupts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupts")
            .field("queue_vectors", &self.queue_vectors)
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

impl Interrupts {
    fn raise(&self, vector: u16) {
        if vector == NO_VECTOR {
            return;
        }
        let mut msix = lock(&self.msix);
        // Checked under the MSI-X lock, which the reset also takes to kill the sink.
        if self.live.load(Ordering::Acquire) && self.bus_master.load(Ordering::Acquire) {
            msix.signal(vector);
        }
    }
}

impl InterruptSink for Interrupts {
    fn signal_queue(&self, queue: u16) {
        if let Some(&vector) = self.queue_vectors.get(usize::from(queue)) {
            self.raise(vector);
        }
    }

    fn signal_config(&self) {
        self.raise(self.config_vector.load(Ordering::Acquire));
    }
}
