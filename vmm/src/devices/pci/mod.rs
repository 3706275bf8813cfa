//! The PCI platform: configuration mechanism #1 (ports 0xCF8–0xCFF), a single PCI bus of
//! single-function devices, a host bridge at 00:00.0, and BAR placement on the MMIO bus.
//!
//! Functions implement `aiodma_device::pci::PciFunction`; this module never looks inside one.
//! After every configuration write the bus re-reads the function's decoded BARs and moves its
//! MMIO bus range and its ioeventfds to match (BAR relocation, decoding switched off and on
//! during sizing). Only memory BARs are mapped (no function here has an I/O BAR).

pub mod conf1;
pub mod host_bridge;
pub mod root;

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use aiodma_device::pci::PciFunction;
use vmm_sys_util::eventfd::EventFd;

pub use conf1::PciConfigIo;
pub use host_bridge::HostBridge;
pub use root::{PciBusError, PciRoot};

/// A PCI function shared between the configuration mechanism and its BAR mappings.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// Device number of the host bridge.
pub const HOST_BRIDGE_DEVICE: u8 = 0;
/// Device number of the aiodma DMA device.
pub const DMA_DEVICE: u8 = 1;

/// Lock a function, surviving poisoning (see `bus::lock`).
pub fn lock_function(f: &SharedFunction) -> MutexGuard<'_, dyn PciFunction + 'static> {
    f.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers eventfds that the hypervisor signals on guest MMIO writes, without a VM exit to
/// userspace (KVM ioeventfds). Implemented in `vstate`, so devices never see KVM.
pub trait IoEventRegistrar: Send + Sync {
    /// Signal `fd` on every write (any width, any value) at MMIO address `addr`.
    fn register(&self, addr: u64, fd: &EventFd) -> io::Result<()>;
    /// Undo `register`.
    fn unregister(&self, addr: u64, fd: &EventFd) -> io::Result<()>;
}
