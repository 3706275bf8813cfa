//! A type-0 PCI configuration space: 256 bytes with per-bit write masks, BAR registers that
//! follow the sizing protocol, and a capability list.
//!
//! Every byte has a write mask (bits the guest may change) and a write-1-to-clear mask, so
//! accesses of any width at any offset work the same way real hardware decodes them. BAR sizing
//! falls out of the masks: the address bits below the BAR's size are read-only zeros, so writing
//! all ones reads back the size mask.

use super::{command, reg, status, BarRegion, PciError, CONFIG_SPACE_SIZE, NUM_BARS};

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space (32-bit).
    Io,
    /// Memory space.
    Memory {
        /// 64-bit BAR (takes two registers).
        is_64: bool,
        /// Prefetchable.
        prefetchable: bool,
    },
}

impl BarKind {
    /// A 32-bit non-prefetchable memory BAR.
    pub const MEMORY32: BarKind = BarKind::Memory {
        is_64: false,
        prefetchable: false,
    };

    /// The read-only low bits of the BAR register that identify the kind.
    fn flag_bits(self) -> u32 {
        match self {
            BarKind::Io => 0x1,
            BarKind::Memory {
                is_64,
                prefetchable,
            } => (if is_64 { 0x4 } else { 0 }) | (if prefetchable { 0x8 } else { 0 }),
        }
    }

    /// Bits of the register below the address.
    fn low_mask(self) -> u64 {
        match self {
            BarKind::Io => 0x3,
            BarKind::Memory { .. } => 0xf,
        }
    }

    fn min_size(self) -> u64 {
        match self {
            BarKind::Io => 4,
            BarKind::Memory { .. } => 16,
        }
    }
}

/// The identity fields of a type-0 header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// 24-bit class code: class, subclass, programming interface.
    pub class: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Interrupt pin (0: none).
    pub interrupt_pin: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BarSlot {
    Unused,
    Bar {
        size: u64,
        kind: BarKind,
    },
    /// The upper register of the 64-bit BAR below.
    Upper,
}

/// A type-0 configuration space.
#[derive(Clone)]
pub struct ConfigSpace {
    regs: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
    w1c: [u8; CONFIG_SPACE_SIZE],
    bars: [BarSlot; NUM_BARS],
    last_cap: Option<u8>,
    next_cap: usize,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor_id", &self.read_u16(reg::VENDOR_ID))
            .field("device_id", &self.read_u16(reg::DEVICE_ID))
            .field("command", &self.command())
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

fn bar_reg(index: usize) -> usize {
    reg::BAR0 as usize + 4 * index
}

impl ConfigSpace {
    /// A header with `header`'s identity, no BARs, no capabilities, all decoding disabled.
    pub fn new(header: &Header) -> Self {
        let mut cs = Self {
            regs: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
            w1c: [0; CONFIG_SPACE_SIZE],
            bars: [BarSlot::Unused; NUM_BARS],
            last_cap: None,
            next_cap: reg::CAPS_START as usize,
        };
        cs.set_raw(reg::VENDOR_ID, &header.vendor_id.to_le_bytes());
        cs.set_raw(reg::DEVICE_ID, &header.device_id.to_le_bytes());
        cs.set_raw(reg::REVISION, &[header.revision]);
        cs.set_raw(reg::CLASS_PROG, &header.class.to_le_bytes()[..3]);
        cs.set_raw(
            reg::SUBSYSTEM_VENDOR_ID,
            &header.subsystem_vendor_id.to_le_bytes(),
        );
        cs.set_raw(reg::SUBSYSTEM_ID, &header.subsystem_id.to_le_bytes());
        cs.set_raw(reg::INTERRUPT_PIN, &[header.interrupt_pin]);
        cs.set_wmask(reg::COMMAND, &command::WRITABLE.to_le_bytes());
        cs.set_w1c(reg::STATUS, &status::ERRORS_W1C.to_le_bytes());
        cs.set_wmask(reg::CACHE_LINE_SIZE, &[0xff, 0xff]);
        cs.set_wmask(reg::INTERRUPT_LINE, &[0xff]);
        cs
    }

    fn set_raw(&mut self, offset: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            if let Some(r) = self.regs.get_mut(offset as usize + i) {
                *r = b;
            }
        }
    }

    fn set_wmask(&mut self, offset: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            if let Some(r) = self.wmask.get_mut(offset as usize + i) {
                *r = b;
            }
        }
    }

    fn set_w1c(&mut self, offset: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            if let Some(r) = self.w1c.get_mut(offset as usize + i) {
                *r = b;
            }
        }
    }

    /// Guest read: bytes past the end of the configuration space read as 0.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.regs.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Guest write: only writable bits change; write-1-to-clear bits clear.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .filter(|&o| o < CONFIG_SPACE_SIZE)
            else {
                break;
            };
            let (w, c) = (self.wmask[o], self.w1c[o]);
            self.regs[o] = ((self.regs[o] & !w) | (v & w)) & !(v & c);
        }
    }

    /// Little-endian u16 at `offset` (0 past the end).
    pub fn read_u16(&self, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Little-endian u32 at `offset` (0 past the end).
    pub fn read_u32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(reg::COMMAND)
    }

    /// Set command-register bits as platform firmware would (e.g. enable decoding of the BARs it
    /// assigned).
    pub fn set_command(&mut self, value: u16) {
        self.set_raw(reg::COMMAND, &(value & command::WRITABLE).to_le_bytes());
    }

    /// Whether memory BARs are decoded.
    pub fn memory_enabled(&self) -> bool {
        self.command() & command::MEMORY != 0
    }

    /// Declare BAR `index` of `size` bytes (a power of two) and `kind`; address 0 until
    /// assigned. A 64-bit memory BAR also takes register `index + 1`.
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) -> Result<(), PciError> {
        let is_64 = matches!(kind, BarKind::Memory { is_64: true, .. });
        let needed = if is_64 { 2 } else { 1 };
        let free = |i: usize| self.bars.get(i) == Some(&BarSlot::Unused);
        if !(index..index + needed).all(free) {
            return Err(PciError::BarSlot(index));
        }
        let max = if is_64 { u64::MAX } else { 1 << 31 };
        if !size.is_power_of_two() || size < kind.min_size() || size > max {
            return Err(PciError::BarSize(size));
        }
        self.bars[index] = BarSlot::Bar { size, kind };
        let addr_mask = !(size - 1) & !kind.low_mask();
        self.set_raw(
            reg::BAR0 + 4 * index as u64,
            &kind.flag_bits().to_le_bytes(),
        );
        self.set_wmask(
            reg::BAR0 + 4 * index as u64,
            &(addr_mask as u32).to_le_bytes(),
        );
        if is_64 {
            self.bars[index + 1] = BarSlot::Upper;
            self.set_wmask(
                reg::BAR0 + 4 * (index as u64 + 1),
                &((addr_mask >> 32) as u32).to_le_bytes(),
            );
        }
        Ok(())
    }

    /// Size and kind of BAR `index`, if it is declared (not for the upper half of a 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<(u64, BarKind)> {
        match self.bars.get(index) {
            Some(&BarSlot::Bar { size, kind }) => Some((size, kind)),
            _ => None,
        }
    }

    /// The address BAR `index` holds now (whatever the guest wrote, decoded or not).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let (_, kind) = self.bar(index)?;
        let low = u64::from(self.read_u32(bar_reg(index) as u64)) & !kind.low_mask();
        let high = match kind {
            BarKind::Memory { is_64: true, .. } => {
                u64::from(self.read_u32(bar_reg(index + 1) as u64))
            }
            _ => 0,
        };
        Some(high << 32 | low)
    }

    /// Place BAR `index` at `addr` (rounded down to its size), as firmware does.
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let (size, kind) = self.bar(index).ok_or(PciError::BarSlot(index))?;
        let addr = addr & !(size - 1);
        let low = (addr as u32 & !(kind.low_mask() as u32)) | kind.flag_bits();
        self.set_raw(bar_reg(index) as u64, &low.to_le_bytes());
        if let BarKind::Memory { is_64: true, .. } = kind {
            self.set_raw(
                bar_reg(index + 1) as u64,
                &((addr >> 32) as u32).to_le_bytes(),
            );
        }
        Ok(())
    }

    /// The BARs decoded now: declared, enabled in the command register, and at a non-zero
    /// address whose range does not wrap.
    pub fn decoded_bars(&self) -> Vec<BarRegion> {
        let cmd = self.command();
        (0..NUM_BARS)
            .filter_map(|index| {
                let (size, kind) = self.bar(index)?;
                let enabled = match kind {
                    BarKind::Io => cmd & command::IO != 0,
                    BarKind::Memory { .. } => cmd & command::MEMORY != 0,
                };
                let addr = self.bar_address(index)?;
                (enabled && addr != 0 && addr.checked_add(size).is_some()).then_some(BarRegion {
                    index: index as u8,
                    addr,
                    size,
                    kind,
                })
            })
            .collect()
    }

    /// Append a capability: `body` follows the ID and next-pointer bytes; `body_wmask` (same
    /// length or shorter; missing bytes read-only) says which body bits the guest may write.
    /// Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        body_wmask: &[u8],
    ) -> Result<u8, PciError> {
        let len = 2 + body.len();
        let start = self.next_cap;
        if start + len > CONFIG_SPACE_SIZE {
            return Err(PciError::CapabilityFull { id, len });
        }
        let off = start as u8;
        self.set_raw(start as u64, &[id, 0]);
        self.set_raw(start as u64 + 2, body);
        self.set_wmask(
            start as u64 + 2,
            &body_wmask[..body_wmask.len().min(body.len())],
        );
        match self.last_cap {
            Some(prev) => self.set_raw(u64::from(prev) + 1, &[off]),
            None => self.set_raw(reg::CAP_PTR, &[off]),
        }
        let st = self.read_u16(reg::STATUS) | status::CAP_LIST;
        self.set_raw(reg::STATUS, &st.to_le_bytes());
        self.last_cap = Some(off);
        self.next_cap = (start + len).next_multiple_of(4);
        Ok(off)
    }

    /// Walk the capability list as a guest does: `(id, offset)` pairs, stopping at a loop or
    /// a pointer outside the header.
    pub fn capabilities(&self) -> Vec<(u8, u8)> {
        walk_capabilities(&self.regs)
    }
}

/// Walk the capability list of a raw configuration space dump (at least 64 bytes): `(id,
/// offset)` pairs. Stops at pointers below 0x40, past the end, or after 48 entries (a loop).
pub fn walk_capabilities(config: &[u8]) -> Vec<(u8, u8)> {
    let mut caps = Vec::new();
    let status = config
        .get(reg::STATUS as usize)
        .copied()
        .unwrap_or_default();
    if u16::from(status) & status::CAP_LIST == 0 {
        return caps;
    }
    let mut ptr = config
        .get(reg::CAP_PTR as usize)
        .copied()
        .unwrap_or_default()
        & !3;
    while ptr >= reg::CAPS_START as u8 && caps.len() < 48 {
        let (Some(&id), Some(&next)) = (
            config.get(usize::from(ptr)),
            config.get(usize::from(ptr) + 1),
        ) else {
            break;
        };
        caps.push((id, ptr));
        ptr = next & !3;
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::cap_id;

    fn header() -> Header {
        Header {
            vendor_id: 0x1234,
            device_id: 0xa10d,
            class: 0x01_80_00,
            revision: 2,
            subsystem_vendor_id: 0x1234,
            subsystem_id: 1,
            interrupt_pin: 0,
        }
    }

    #[test]
    fn header_identity_is_read_only() {
        let mut cs = ConfigSpace::new(&header());
        assert_eq!(cs.read_u32(0), 0xa10d_1234);
        assert_eq!(cs.read_u32(0x08), 0x0180_0002);
        assert_eq!(cs.read_u32(0x2c), 0x0001_1234);
        cs.write(0, &[0xff; 4]);
        cs.write(0x08, &[0xff; 4]);
        assert_eq!(cs.read_u32(0), 0xa10d_1234);
        assert_eq!(cs.read_u32(0x08), 0x0180_0002);
        // Scratch registers are writable.
        cs.write(reg::INTERRUPT_LINE, &[11]);
        assert_eq!(cs.read_u16(reg::INTERRUPT_LINE), 11);
        // No capability list without capabilities.
        assert_eq!(cs.read_u16(reg::STATUS) & status::CAP_LIST, 0);
        assert!(cs.capabilities().is_empty());
    }

    #[test]
    fn command_register_keeps_only_writable_bits() {
        let mut cs = ConfigSpace::new(&header());
        cs.write(reg::COMMAND, &[0xff, 0xff]);
        assert_eq!(cs.command(), command::WRITABLE);
        assert!(cs.memory_enabled());
        cs.write(reg::COMMAND, &[0, 0]);
        assert!(!cs.memory_enabled());
    }

    #[test]
    fn status_error_bits_are_write_one_to_clear() {
        let mut cs = ConfigSpace::new(&header());
        cs.set_raw(reg::STATUS, &0x8010u16.to_le_bytes());
        cs.write(reg::STATUS, &0x0010u16.to_le_bytes());
        assert_eq!(cs.read_u16(reg::STATUS), 0x8010, "CAP_LIST is read-only");
        cs.write(reg::STATUS, &0x8000u16.to_le_bytes());
        assert_eq!(cs.read_u16(reg::STATUS), 0x0010);
    }

    #[test]
    fn bar32_sizing_protocol() {
        let mut cs = ConfigSpace::new(&header());
        cs.add_bar(0, 0x4000, BarKind::MEMORY32).unwrap();
        cs.set_bar_address(0, 0xc000_0000).unwrap();
        assert_eq!(cs.read_u32(reg::BAR0), 0xc000_0000);
        cs.write(reg::BAR0, &[0xff; 4]);
        assert_eq!(cs.read_u32(reg::BAR0), 0xffff_c000);
        let size = !(cs.read_u32(reg::BAR0) & !0xf) + 1;
        assert_eq!(size, 0x4000);
        cs.write(reg::BAR0, &0xc010_0000u32.to_le_bytes());
        assert_eq!(cs.bar_address(0), Some(0xc010_0000));
        // Unaligned addresses lose their low bits; flag bits stay.
        cs.write(reg::BAR0, &0xc010_1234u32.to_le_bytes());
        assert_eq!(cs.read_u32(reg::BAR0), 0xc010_0000);
        // Unused BARs read 0 whatever is written.
        cs.write(reg::BAR0 + 4, &[0xff; 4]);
        assert_eq!(cs.read_u32(reg::BAR0 + 4), 0);
        // Byte-wise writes work too.
        cs.write(reg::BAR0 + 3, &[0xd0]);
        assert_eq!(cs.bar_address(0), Some(0xd010_0000));
    }

    #[test]
    fn bar64_written_as_two_halves() {
        let mut cs = ConfigSpace::new(&header());
        let kind = BarKind::Memory {
            is_64: true,
            prefetchable: true,
        };
        cs.add_bar(2, 0x10_0000, kind).unwrap();
        assert_eq!(cs.read_u32(reg::BAR0 + 8), 0xc);
        cs.write(reg::BAR0 + 8, &[0xff; 4]);
        cs.write(reg::BAR0 + 12, &[0xff; 4]);
        assert_eq!(cs.read_u32(reg::BAR0 + 8), 0xfff0_000c);
        assert_eq!(cs.read_u32(reg::BAR0 + 12), 0xffff_ffff);
        cs.write(reg::BAR0 + 8, &0x8000_0000u32.to_le_bytes());
        cs.write(reg::BAR0 + 12, &0x1u32.to_le_bytes());
        assert_eq!(cs.bar_address(2), Some(0x1_8000_0000));
        assert_eq!(cs.bar(3), None);
        assert_eq!(cs.add_bar(3, 16, BarKind::Io), Err(PciError::BarSlot(3)));
        assert_eq!(cs.add_bar(5, 16, kind), Err(PciError::BarSlot(5)));
        assert_eq!(cs.add_bar(6, 16, BarKind::Io), Err(PciError::BarSlot(6)));
        assert_eq!(
            cs.add_bar(0, 0x3000, BarKind::MEMORY32),
            Err(PciError::BarSize(0x3000))
        );
        assert_eq!(
            cs.add_bar(0, 8, BarKind::MEMORY32),
            Err(PciError::BarSize(8))
        );
    }

    #[test]
    fn decoded_bars_follow_command_and_address() {
        let mut cs = ConfigSpace::new(&header());
        cs.add_bar(0, 0x4000, BarKind::MEMORY32).unwrap();
        cs.add_bar(1, 0x20, BarKind::Io).unwrap();
        assert!(cs.decoded_bars().is_empty());
        cs.set_bar_address(0, 0xc000_0000).unwrap();
        assert!(cs.decoded_bars().is_empty(), "memory decoding off");
        cs.write(reg::COMMAND, &command::MEMORY.to_le_bytes());
        assert_eq!(
            cs.decoded_bars(),
            vec![BarRegion {
                index: 0,
                addr: 0xc000_0000,
                size: 0x4000,
                kind: BarKind::MEMORY32
            }]
        );
        cs.write(reg::BAR0 + 4, &0x1000u32.to_le_bytes());
        assert_eq!(cs.read_u32(reg::BAR0 + 4), 0x1001);
        cs.write(reg::COMMAND, &(command::MEMORY | command::IO).to_le_bytes());
        assert_eq!(cs.decoded_bars().len(), 2);
        assert_eq!(cs.decoded_bars()[1].addr, 0x1000);
    }

    #[test]
    fn capability_list_walks() {
        let mut cs = ConfigSpace::new(&header());
        let a = cs.add_capability(0x09, &[1, 2, 3], &[]).unwrap();
        let b = cs
            .add_capability(cap_id::MSIX, &[0; 10], &[0, 0xc0])
            .unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_eq!(
            cs.read_u16(reg::STATUS) & status::CAP_LIST,
            status::CAP_LIST
        );
        assert_eq!(cs.capabilities(), vec![(0x09, 0x40), (cap_id::MSIX, 0x48)]);
        // Only the masked bits of a body are writable, and the list pointers are read-only.
        cs.write(u64::from(b), &[0xff; 12]);
        assert_eq!(cs.read_u32(u64::from(b)), 0xc000_0011);
        assert_eq!(cs.read_u32(u64::from(b) + 4), 0);
        cs.write(reg::CAP_PTR, &[0x80]);
        assert_eq!(cs.capabilities().len(), 2);
        // The space fills up.
        assert!(matches!(
            cs.add_capability(0x05, &[0; 250], &[]),
            Err(PciError::CapabilityFull { .. })
        ));
    }

    #[test]
    fn walk_survives_loops_and_bad_pointers() {
        let mut raw = [0u8; 256];
        raw[reg::STATUS as usize] = status::CAP_LIST as u8;
        raw[reg::CAP_PTR as usize] = 0x40;
        raw[0x40] = 0x11;
        raw[0x41] = 0x40; // points at itself
        assert_eq!(walk_capabilities(&raw).len(), 48);
        raw[0x41] = 0xfe;
        raw[0xfc] = 0x05;
        raw[0xfd] = 0x10; // below 0x40: end of list
        assert_eq!(walk_capabilities(&raw), vec![(0x11, 0x40), (0x05, 0xfc)]);
        assert!(walk_capabilities(&raw[..0x41]).len() <= 1);
        assert!(walk_capabilities(&[]).is_empty());
    }

    #[test]
    fn any_width_and_offset_is_safe() {
        let mut cs = ConfigSpace::new(&header());
        cs.add_bar(0, 0x4000, BarKind::MEMORY32).unwrap();
        cs.add_capability(cap_id::MSIX, &[0; 10], &[0, 0xc0])
            .unwrap();
        for offset in [
            0u64,
            1,
            3,
            0xfd,
            0xfe,
            0xff,
            0x100,
            0x1000,
            u64::MAX - 2,
            u64::MAX,
        ] {
            for len in [1usize, 2, 3, 4, 8, 16] {
                let mut buf = vec![0xaa; len];
                cs.read(offset, &mut buf);
                cs.write(offset, &buf);
            }
        }
        let mut buf = [0xaa; 4];
        cs.read(0xfe, &mut buf);
        assert_eq!(&buf[2..], &[0, 0]);
    }
}
