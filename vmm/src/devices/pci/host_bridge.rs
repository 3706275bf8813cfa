//! The host bridge at 00:00.0: a bare type-0 header of class 0x060000. Without ACPI or DMI,
//! Linux's conf1 probe (`pci_sanity_check`) accepts the mechanism only when bus 0 holds a host
//! bridge (or a VGA device, or an Intel/Compaq function).

use aiodma_device::pci::{ConfigSpace, Header, PciFunction};

/// PCI vendor of the bridge: Intel, as Firecracker and Cloud Hypervisor present theirs.
pub const VENDOR_ID: u16 = 0x8086;
/// "Virtual PCIe host bridge" device ID used by Firecracker and Cloud Hypervisor; no Linux quirk
/// matches it.
pub const DEVICE_ID: u16 = 0x0d57;
/// Class: bridge (0x06), host bridge (0x00).
pub const CLASS: u32 = 0x06_00_00;

/// The host bridge function.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// A host bridge with no BARs and no capabilities.
    pub fn new() -> Self {
        Self {
            config: ConfigSpace::new(&Header {
                vendor_id: VENDOR_ID,
                device_id: DEVICE_ID,
                class: CLASS,
                ..Default::default()
            }),
        }
    }
}

impl PciFunction for HostBridge {
    fn config_space(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_space_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_host_bridge_without_bars() {
        let mut hb = HostBridge::new();
        let mut b = [0u8; 12];
        hb.config_read(0, &mut b);
        assert_eq!(&b[..4], &[0x86, 0x80, 0x57, 0x0d]);
        assert_eq!(&b[9..12], &[0x00, 0x00, 0x06]);
        hb.config_write(0x10, &[0xff; 4]);
        let mut bar = [0u8; 4];
        hb.config_read(0x10, &mut bar);
        assert_eq!(bar, [0; 4]);
        assert!(hb.decoded_bars().is_empty());
    }
}
