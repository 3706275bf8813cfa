// SPDX-License-Identifier: GPL-2.0
//! aiodma: guest driver for the aiodma PCI DMA device.
//!
//! This is the module skeleton that the image build and the boot tests rely on; the PCI driver
//! and the asynchronous `/dev/aiodma0` grow here.

use kernel::prelude::*;

// The ABI is shared with host code, where its items are public API.
#[allow(unreachable_pub, dead_code)]
#[path = "../../device/src/abi.rs"]
mod abi;

module! {
    type: Aiodma,
    name: "aiodma",
    authors: ["aiodma developers"],
    description: "Asynchronous I/O driver for the aiodma PCI DMA device",
    license: "GPL",
}

struct Aiodma;

impl kernel::Module for Aiodma {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        pr_info!(
            "loaded (ABI v{}, device {:04x}:{:04x})\n",
            abi::ABI_VERSION,
            abi::pci_id::VENDOR,
            abi::pci_id::DEVICE
        );
        Ok(Aiodma)
    }
}

impl Drop for Aiodma {
    fn drop(&mut self) {
        pr_info!("unloaded\n");
    }
}
