//! Devices the VMM wires into the guest. Devices know buses and eventfds, never KVM.

pub mod bus;
pub mod i8042;
pub mod pci;
pub mod platform;
pub mod serial;
