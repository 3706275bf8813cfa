//! PCI configuration mechanism #1: the address register at 0xCF8 and the data window at
//! 0xCFC–0xCFF, as one port-bus device.
//!
//! Address register: bit 31 enable, bits 27:24 extended register number (AMD's extension, so
//! offsets up to 4 KiB are expressible), 23:16 bus, 15:11 device, 10:8 function, 7:2 register.
//! Only 32-bit accesses at 0xCF8 reach the address register (byte accesses there belong to other
//! chipset registers on real hardware: they read all ones and are ignored). A data access of
//! width W at port 0xCFC + k reaches configuration bytes `register + k .. + W`, clipped at 0xCFF.

use super::root::PciRoot;
use crate::devices::bus::BusDevice;

/// First port (the address register).
pub const BASE: u16 = 0xcf8;
/// Address register (4 ports) + data window (4 ports).
pub const LEN: u16 = 8;
const DATA: u64 = 4;
const ENABLE: u32 = 1 << 31;

/// A decoded configuration address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigAddress {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
    /// Register offset (dword aligned, 0..4096).
    pub register: u64,
}

/// Decode an address-register value; `None` when the enable bit is clear.
pub fn decode(address: u32) -> Option<ConfigAddress> {
    (address & ENABLE != 0).then(|| ConfigAddress {
        bus: (address >> 16) as u8,
        device: ((address >> 11) & 0x1f) as u8,
        function: ((address >> 8) & 0x7) as u8,
        register: u64::from(((address >> 16) & 0xf00) | (address & 0xfc)),
    })
}

/// The configuration mechanism, owning the PCI bus behind it.
#[derive(Debug)]
pub struct PciConfigIo {
    address: u32,
    root: PciRoot,
}

impl PciConfigIo {
    /// Mechanism #1 in front of `root`.
    pub fn new(root: PciRoot) -> Self {
        Self { address: 0, root }
    }

    /// The bus behind the mechanism.
    pub fn root(&self) -> &PciRoot {
        &self.root
    }

    /// The data-window bytes an access at `offset` of `len` bytes reaches: the target and the
    /// number of bytes that stay inside the window.
    fn target(&self, offset: u64, len: usize) -> Option<(ConfigAddress, usize)> {
        let addr = decode(self.address)?;
        let within = offset.checked_sub(DATA)?;
        let n = len.min((LEN as u64).saturating_sub(offset) as usize);
        Some((
            ConfigAddress {
                register: addr.register + within,
                ..addr
            },
            n,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset < DATA {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.address.to_le_bytes());
            }
            return;
        }
        if let Some((a, n)) = self.target(offset, data.len()) {
            if let Some(bytes) = data.get_mut(..n) {
                self.root
                    .config_read(a.bus, a.device, a.function, a.register, bytes);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < DATA {
            if let (0, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) {
                self.address = u32::from_le_bytes(bytes);
            }
            return;
        }
        if let Some((a, n)) = self.target(offset, data.len()) {
            if let Some(bytes) = data.get(..n) {
                self.root
                    .config_write(a.bus, a.device, a.function, a.register, bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::Bus;
    use crate::devices::pci::root::tests::NoIoEvents;
    use crate::devices::pci::HostBridge;
    use std::sync::{Arc, Mutex};

    fn conf1() -> PciConfigIo {
        let mut root = PciRoot::new(Arc::new(Bus::new()), Arc::new(NoIoEvents));
        root.add(0, Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        PciConfigIo::new(root)
    }

    fn addr(bus: u32, dev: u32, func: u32, reg: u32) -> u32 {
        ENABLE | (reg & 0xf00) << 16 | bus << 16 | dev << 11 | func << 8 | (reg & 0xfc)
    }

    #[test]
    fn decodes_addresses() {
        assert_eq!(decode(0x0000_0000), None);
        assert_eq!(decode(0x7fff_ffff), None);
        assert_eq!(
            decode(addr(3, 31, 7, 0xfc)),
            Some(ConfigAddress {
                bus: 3,
                device: 31,
                function: 7,
                register: 0xfc
            })
        );
        assert_eq!(
            decode(addr(0, 1, 0, 0x40) | 0x3),
            Some(ConfigAddress {
                bus: 0,
                device: 1,
                function: 0,
                register: 0x40
            }),
            "low two bits are not part of the register"
        );
        assert_eq!(decode(addr(0, 0, 0, 0x104)).unwrap().register, 0x104);
    }

    #[test]
    fn linux_type1_probe_sequence() {
        // arch/x86/pci/direct.c: pci_check_type1.
        let mut c = conf1();
        c.write(3, &[0x01]);
        let mut b = [0u8; 4];
        c.read(0, &mut b);
        c.write(0, &0x8000_0000u32.to_le_bytes());
        c.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        // Byte reads of the address register float.
        let mut one = [0u8; 1];
        c.read(0, &mut one);
        assert_eq!(one, [0xff]);
    }

    #[test]
    fn data_window_reads_the_selected_function() {
        let mut c = conf1();
        c.write(0, &addr(0, 0, 0, 0x08).to_le_bytes());
        let mut b = [0u8; 4];
        c.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b) >> 8, 0x06_00_00, "host bridge class");
        // Byte and word accesses at 0xCFD..0xCFF reach the following bytes.
        let mut w = [0u8; 2];
        c.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0600);
        let mut one = [0u8; 1];
        c.read(7, &mut one);
        assert_eq!(one, [0x06]);
        // A 4-byte access at 0xCFE is clipped at 0xCFF.
        c.read(6, &mut b);
        assert_eq!(b, [0x00, 0x06, 0xff, 0xff]);
        // Empty slot, other bus, other function, disabled: all ones.
        for a in [
            addr(0, 2, 0, 0),
            addr(1, 0, 0, 0),
            addr(0, 0, 1, 0),
            addr(0, 0, 0, 0) & !ENABLE,
        ] {
            c.write(0, &a.to_le_bytes());
            c.read(4, &mut b);
            assert_eq!(b, [0xff; 4], "{a:#x}");
            c.write(4, &[0; 4]);
        }
        // Writes reach the function (interrupt line is a scratch register).
        c.write(0, &addr(0, 0, 0, 0x3c).to_le_bytes());
        c.write(4, &[0x0b]);
        c.read(4, &mut one);
        assert_eq!(one, [0x0b]);
        // Extended registers of a conventional function read 0.
        c.write(0, &addr(0, 0, 0, 0x100).to_le_bytes());
        c.read(4, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn odd_accesses_are_safe() {
        let mut c = conf1();
        for a in [0u32, 0xffff_ffff, 0x8000_00ff, addr(0, 0, 0, 0xff)] {
            c.write(0, &a.to_le_bytes());
            for offset in 0..10u64 {
                for len in [0usize, 1, 2, 3, 4, 8] {
                    let mut buf = vec![0u8; len];
                    c.read(offset, &mut buf);
                    c.write(offset, &buf);
                }
            }
        }
    }
}
