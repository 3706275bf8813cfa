// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The aiodma guest/host ABI: the one place where the guest (kernel module, `/init` tools) and the
//! host (VMM, device) agree on numbers.
//!
//! This file must stay dependency-free and `no_std`-clean: the guest kernel module and the guest
//! tools include it by path (`#[path = ".../device/src/abi.rs"] mod abi;`), the device crate as a
//! regular module. Everything here is plain `pub const` items and `#[repr(C)]` types; the layout
//! of every struct is asserted by tests in the device crate.
//!
//! `device/SPEC.md` is the prose contract for the DMA device; this file is its machine form.

#![allow(dead_code)]

/// Version of this ABI. Bumped on any incompatible change; the driver logs it at load.
pub const ABI_VERSION: u32 = 1;

/// PCI identity of the aiodma DMA device. Vendor 0x1234 is the ID QEMU's experimental devices
/// use (edu, bochs-display); no in-tree Linux driver claims device 0xa10d, and Linux's virtio-pci
/// (vendor 0x1af4) never sees it.
pub mod pci_id {
    /// PCI vendor ID.
    pub const VENDOR: u16 = 0x1234;
    /// PCI device ID.
    pub const DEVICE: u16 = 0xa10d;
}

/// Platform ports through which the guest's `/init` talks to the VMM.
///
/// Both are one-byte `out` instructions, so each costs exactly one VM exit and needs no driver.
/// The exit port sits where QEMU's `isa-debug-exit` device is usually placed
/// (`-device isa-debug-exit,iobase=0xf4,iosize=1`), so the same image also reports its exit
/// status under QEMU (which exits with `(status << 1) | 1`).
pub mod platform {
    /// Write the guest command's exit status (0..=255); the VMM stops and exits with it.
    pub const EXIT_PORT: u16 = 0xf4;
    /// Write one of the `PHASE_*` markers; the VMM logs the time since its own start.
    pub const PHASE_PORT: u16 = 0xf5;
    /// `/init` started: guest userspace reached (the boot-time measurement point).
    pub const PHASE_USERSPACE: u8 = 1;
    /// The driver module is loaded and the guest command is about to start.
    pub const PHASE_COMMAND: u8 = 2;
    /// Kernel command-line parameter (read by `/init`) asking it to skip loading the module.
    pub const NO_MODULE_PARAM: &str = "aiodma.nomodule";
}
