//! Generic PCI function model: a type-0 configuration space with BARs and a capability list
//! (`config`), MSI-X state (`msix`), and the [`PciFunction`] trait a platform's PCI bus drives.
//!
//! Nothing here knows KVM: the platform (the VMM) maps BARs onto its buses and turns MSI-X
//! messages into interrupts through [`msix::MsiController`]. The guest is untrusted, so every
//! access of any width at any offset is accepted without panicking: bytes outside a register
//! file read as 0 (or all ones where hardware floats) and are ignored on write.

pub mod config;
pub mod msix;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use config::{BarKind, ConfigSpace, Header};
pub use msix::{MsiController, MsiError, Msix, Signal};

/// Size of a conventional PCI configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Offsets of the type-0 header registers.
pub mod reg {
    /// u16 vendor ID.
    pub const VENDOR_ID: u64 = 0x00;
    /// u16 device ID.
    pub const DEVICE_ID: u64 = 0x02;
    /// u16 command register ([`super::command`]).
    pub const COMMAND: u64 = 0x04;
    /// u16 status register ([`super::status`]).
    pub const STATUS: u64 = 0x06;
    /// u8 revision ID.
    pub const REVISION: u64 = 0x08;
    /// u8 programming interface (the class code is the 24 bits from here).
    pub const CLASS_PROG: u64 = 0x09;
    /// u8 cache line size.
    pub const CACHE_LINE_SIZE: u64 = 0x0c;
    /// u8 latency timer.
    pub const LATENCY_TIMER: u64 = 0x0d;
    /// u8 header type (bit 7: multi-function).
    pub const HEADER_TYPE: u64 = 0x0e;
    /// First BAR (six u32 registers).
    pub const BAR0: u64 = 0x10;
    /// u16 subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR_ID: u64 = 0x2c;
    /// u16 subsystem ID.
    pub const SUBSYSTEM_ID: u64 = 0x2e;
    /// u32 expansion ROM BAR (not implemented: reads 0).
    pub const ROM: u64 = 0x30;
    /// u8 capabilities pointer.
    pub const CAP_PTR: u64 = 0x34;
    /// u8 interrupt line (scratch register for the OS).
    pub const INTERRUPT_LINE: u64 = 0x3c;
    /// u8 interrupt pin (0: none, 1..=4: INTA#..INTD#).
    pub const INTERRUPT_PIN: u64 = 0x3d;
    /// First byte available to capabilities.
    pub const CAPS_START: u64 = 0x40;
}

/// Command register bits.
pub mod command {
    /// Decode I/O-space BARs.
    pub const IO: u16 = 1 << 0;
    /// Decode memory-space BARs.
    pub const MEMORY: u16 = 1 << 1;
    /// The function may master the bus (DMA).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Parity error response.
    pub const PARITY: u16 = 1 << 6;
    /// SERR# enable.
    pub const SERR: u16 = 1 << 8;
    /// INTx emulation disabled.
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// Bits a guest may change.
    pub const WRITABLE: u16 = IO | MEMORY | BUS_MASTER | PARITY | SERR | INTX_DISABLE;
}

/// Status register bits.
pub mod status {
    /// The capabilities pointer is valid.
    pub const CAP_LIST: u16 = 1 << 4;
    /// Error bits, cleared by writing 1.
    pub const ERRORS_W1C: u16 = 0xf900;
}

/// Capability IDs.
pub mod cap_id {
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// A BAR as the function currently decodes it: assigned (non-zero address) and enabled in the
/// command register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRegion {
    /// BAR index (0..=5; a 64-bit BAR is named by its lower register).
    pub index: u8,
    /// Guest-physical (or port) address.
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Memory or I/O, width, prefetchable.
    pub kind: BarKind,
}

/// One PCI function as a platform's PCI bus sees it.
///
/// Offsets are relative to the configuration space or to the BAR; widths are whatever the
/// guest used (1, 2, 4 or 8 bytes, possibly unaligned). Implementations never panic on any
/// offset or width.
pub trait PciFunction: Send {
    /// Configuration read of `data.len()` bytes at `offset`.
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        self.config_space_mut().read(offset, data);
    }
    /// Configuration write of `data` at `offset`. Functions whose capabilities react to
    /// writes (MSI-X enable/mask) override this and call the configuration space themselves.
    fn config_write(&mut self, offset: u64, data: &[u8]) {
        self.config_space_mut().write(offset, data);
    }
    /// The configuration space, for the platform's setup (BAR sizes and placement, command
    /// register) as firmware would do it before the guest runs.
    fn config_space(&self) -> &ConfigSpace;
    /// Mutable access for the same platform setup.
    fn config_space_mut(&mut self) -> &mut ConfigSpace;
    /// The BARs the function decodes right now. The platform re-reads this after every
    /// configuration write and moves its bus mappings (and ioeventfds) to match.
    fn decoded_bars(&self) -> Vec<BarRegion> {
        self.config_space().decoded_bars()
    }
    /// Read inside BAR `bar`.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// Write inside BAR `bar`.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
    /// Eventfds the platform should signal directly on a write at `offset` inside BAR `bar`
    /// (ioeventfds: the write then never reaches `bar_write`).
    fn ioeventfds(&self, _bar: u8) -> Vec<(u64, Arc<EventFd>)> {
        Vec::new()
    }
}

/// Errors building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// BAR index out of range or already taken (a 64-bit BAR takes two registers).
    #[error("BAR {0} is out of range or already in use")]
    BarSlot(usize),
    /// A BAR size that is not a power of two, or too small for its kind.
    #[error("BAR size {0:#x} is not a valid power of two for its kind")]
    BarSize(u64),
    /// The capability does not fit in the configuration space.
    #[error("capability {id:#x} of {len} bytes does not fit in the configuration space")]
    CapabilityFull {
        /// Capability ID.
        id: u8,
        /// Its length including ID and next pointer.
        len: usize,
    },
}
