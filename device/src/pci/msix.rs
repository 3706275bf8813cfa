//! MSI-X: the capability's configuration bytes, the vector table and the pending-bit array.
//!
//! The table and the PBA live in a BAR; the enable and function-mask bits live in the
//! capability's message control word in configuration space, and the owner of both forwards
//! changes of that word to [`Msix::set_control`]. Delivery goes through an
//! [`MsiController`] the platform provides (under KVM: a GSI route and an irqfd per vector).
//!
//! Table accesses of any width at any offset are handled byte by byte, so a guest that writes
//! a whole entry with one 16-byte access, a QWORD, DWORDs or single bytes gets the same result.

use std::sync::Arc;

use super::cap_id;

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Vector control bit 0: the vector is masked.
pub const VECTOR_MASKED: u32 = 1;
/// Message control bit 14: every vector of the function is masked.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Message control bit 15: MSI-X is enabled.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Most vectors a function can have (table size field is 11 bits).
pub const MAX_VECTORS: u16 = 2048;
/// Offset of the message control word inside the capability.
pub const CAP_CONTROL: u64 = 2;

/// An MSI message as the guest programmed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (on x86: 0xfeeX_XXXX, destination in bits 19:12).
    pub addr: u64,
    /// Message data (vector, delivery mode).
    pub data: u32,
}

/// Why the platform could not install a route.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsiError {
    /// The vector is past the platform's table.
    #[error("MSI-X vector {0} has no route slot")]
    NoSuchVector(u16),
    /// The platform refused the route.
    #[error("MSI-X vector {vector}: cannot install route: {reason}")]
    Route {
        /// Vector.
        vector: u16,
        /// Why.
        reason: String,
    },
}

/// The platform side of MSI-X: installs routes and raises vectors. Implemented by the VMM (GSI
/// routing + irqfds); the device crate never sees KVM.
pub trait MsiController: Send + Sync {
    /// The guest (re)programmed `vector`: deliver later triggers with `addr`/`data`.
    /// `masked` tells whether the vector is masked now (the device never triggers a masked
    /// vector; the platform may defer installing its route).
    fn set_route(&self, vector: u16, addr: u64, data: u32, masked: bool) -> Result<(), MsiError>;
    /// Deliver `vector`'s message now.
    fn trigger(&self, vector: u16);
}

/// What [`Msix::signal`] did with an interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Delivered.
    Sent,
    /// Masked: its pending bit is set; it fires when unmasked.
    Pending,
    /// Dropped: MSI-X disabled, or no such vector.
    Dropped,
}

/// The MSI-X capability body (after the ID and next bytes) and its write mask.
///
/// `vectors` entries; the table at `table_offset` in BAR `table_bar`, the PBA at `pba_offset` in
/// BAR `pba_bar` (offsets 8-byte aligned).
pub fn capability(
    vectors: u16,
    table_bar: u8,
    table_offset: u32,
    pba_bar: u8,
    pba_offset: u32,
) -> ([u8; 10], [u8; 10]) {
    let size_field = vectors.clamp(1, MAX_VECTORS) - 1;
    let mut body = [0u8; 10];
    body[0..2].copy_from_slice(&size_field.to_le_bytes());
    body[2..6].copy_from_slice(&((table_offset & !7) | u32::from(table_bar & 7)).to_le_bytes());
    body[6..10].copy_from_slice(&((pba_offset & !7) | u32::from(pba_bar & 7)).to_le_bytes());
    let mut wmask = [0u8; 10];
    wmask[0..2].copy_from_slice(&(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes());
    (body, wmask)
}

/// The MSI-X capability ID, for [`super::ConfigSpace::add_capability`].
pub const CAP_ID: u8 = cap_id::MSIX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    const RESET: Entry = Entry {
        addr_lo: 0,
        addr_hi: 0,
        data: 0,
        control: VECTOR_MASKED,
    };

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.addr_lo.to_le_bytes());
        b[4..8].copy_from_slice(&self.addr_hi.to_le_bytes());
        b[8..12].copy_from_slice(&self.data.to_le_bytes());
        b[12..16].copy_from_slice(&self.control.to_le_bytes());
        b
    }

    fn from_bytes(b: [u8; 16]) -> Self {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Entry {
            addr_lo: word(0),
            addr_hi: word(4),
            data: word(8),
            // Only the mask bit is implemented; the other bits are reserved (read 0).
            control: word(12) & VECTOR_MASKED,
        }
    }

    fn message(self) -> MsiMessage {
        MsiMessage {
            addr: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }

    fn masked(self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

/// MSI-X table, PBA and control state of one function.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// The function's Bus Master Enable: an MSI is a memory write, so none leaves while it is
    /// clear (pending ones wait for it).
    bus_master: bool,
    controller: Arc<dyn MsiController>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl Msix {
    /// `vectors` entries (clamped to 1..=2048), all masked, MSI-X disabled.
    pub fn new(vectors: u16, controller: Arc<dyn MsiController>) -> Self {
        let n = usize::from(vectors.clamp(1, MAX_VECTORS));
        Self {
            entries: vec![Entry::RESET; n],
            pending: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
            bus_master: true,
            controller,
        }
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Size of the table in bytes.
    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Size of the PBA in bytes.
    pub fn pba_len(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the function mask is set.
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// Whether `vector`'s entry is masked (true for vectors past the table).
    pub fn vector_masked(&self, vector: u16) -> bool {
        self.entries
            .get(usize::from(vector))
            .is_none_or(|e| e.masked())
    }

    /// The message `vector` holds.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        self.entries.get(usize::from(vector)).map(|e| e.message())
    }

    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pending
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    fn set_pending(&mut self, vector: u16, on: bool) {
        let v = usize::from(vector);
        if let Some(w) = self.pending.get_mut(v / 64) {
            if on {
                *w |= 1 << (v % 64);
            } else {
                *w &= !(1 << (v % 64));
            }
        }
    }

    fn deliverable(&self, vector: u16) -> bool {
        self.bus_master && self.enabled && !self.function_masked && !self.vector_masked(vector)
    }

    /// The function's Bus Master Enable changed: while it is clear nothing is delivered (an
    /// unmask or enable leaves pending vectors pending); setting it fires what is pending.
    pub fn set_bus_master(&mut self, on: bool) {
        self.bus_master = on;
        if on {
            self.flush_pending();
        }
    }

    /// Fire every pending vector that is no longer masked.
    fn flush_pending(&mut self) {
        for vector in 0..self.vectors() {
            if self.is_pending(vector) && self.deliverable(vector) {
                self.set_pending(vector, false);
                self.controller.trigger(vector);
            }
        }
    }

    /// The message control word changed (configuration-space write).
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let function_masked = control & CONTROL_FUNCTION_MASK != 0;
        if (enabled, function_masked) == (self.enabled, self.function_masked) {
            return;
        }
        log::debug!("MSI-X: enabled {enabled}, function mask {function_masked}");
        self.enabled = enabled;
        self.function_masked = function_masked;
        self.flush_pending();
    }

    /// Guest read inside the table (bytes past it read 0).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| {
                    let entry = self.entries.get(usize::try_from(o / ENTRY_SIZE).ok()?)?;
                    entry.to_bytes().get((o % ENTRY_SIZE) as usize).copied()
                })
                .unwrap_or(0);
        }
    }

    /// Guest write inside the table: updates routes of reprogrammed vectors and fires pending
    /// vectors that became unmasked. Bytes past the table are ignored.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let mut i = 0usize;
        while i < data.len() {
            let Some(o) = offset.checked_add(i as u64) else {
                break;
            };
            let Some(index) = usize::try_from(o / ENTRY_SIZE)
                .ok()
                .filter(|&x| x < self.entries.len())
            else {
                break;
            };
            // All bytes of this write that fall in this entry.
            let start = (o % ENTRY_SIZE) as usize;
            let n = (16 - start).min(data.len() - i);
            let old = self.entries[index];
            let mut bytes = old.to_bytes();
            bytes[start..start + n].copy_from_slice(&data[i..i + n]);
            let new = Entry::from_bytes(bytes);
            self.entries[index] = new;
            self.entry_changed(index as u16, old, new);
            i += n;
        }
    }

    fn entry_changed(&mut self, vector: u16, old: Entry, new: Entry) {
        if old == new {
            return;
        }
        let msg = new.message();
        if let Err(e) = self
            .controller
            .set_route(vector, msg.addr, msg.data, new.masked())
        {
            log::warn!("{e}");
        }
        if old.masked() && !new.masked() && self.is_pending(vector) && self.deliverable(vector) {
            self.set_pending(vector, false);
            self.controller.trigger(vector);
        }
    }

    /// Guest read inside the PBA (read-only; bytes past it read 0).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| {
                    let word = self.pending.get(usize::try_from(o / 8).ok()?)?;
                    word.to_le_bytes().get((o % 8) as usize).copied()
                })
                .unwrap_or(0);
        }
    }

    /// Raise `vector`: deliver it, or set its pending bit if it is masked.
    pub fn signal(&mut self, vector: u16) -> Signal {
        if !self.enabled || usize::from(vector) >= self.entries.len() {
            return Signal::Dropped;
        }
        if self.deliverable(vector) {
            self.controller.trigger(vector);
            Signal::Sent
        } else {
            self.set_pending(vector, true);
            Signal::Pending
        }
    }

    /// Clear every pending bit (device reset: interrupts of the old session are void).
    pub fn clear_pending(&mut self) {
        self.pending.fill(0);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what the device asked of the platform.
    #[derive(Debug, Default)]
    pub(crate) struct FakeController {
        pub routes: Mutex<Vec<(u16, u64, u32, bool)>>,
        pub fired: Mutex<Vec<u16>>,
    }

    impl FakeController {
        pub fn take_fired(&self) -> Vec<u16> {
            std::mem::take(&mut *self.fired.lock().unwrap())
        }
    }

    impl MsiController for FakeController {
        fn set_route(
            &self,
            vector: u16,
            addr: u64,
            data: u32,
            masked: bool,
        ) -> Result<(), MsiError> {
            self.routes
                .lock()
                .unwrap()
                .push((vector, addr, data, masked));
            Ok(())
        }
        fn trigger(&self, vector: u16) {
            self.fired.lock().unwrap().push(vector);
        }
    }

    fn msix(n: u16) -> (Msix, Arc<FakeController>) {
        let ctl = Arc::new(FakeController::default());
        (Msix::new(n, ctl.clone()), ctl)
    }

    fn program(m: &mut Msix, vector: u16, addr: u64, data: u32, masked: bool) {
        let base = u64::from(vector) * ENTRY_SIZE;
        m.table_write(base, &addr.to_le_bytes());
        m.table_write(base + 8, &data.to_le_bytes());
        m.table_write(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn capability_bytes() {
        let (body, wmask) = capability(5, 0, 0x3000, 0, 0x3800);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 4);
        assert_eq!(
            u32::from_le_bytes([body[2], body[3], body[4], body[5]]),
            0x3000
        );
        assert_eq!(
            u32::from_le_bytes([body[6], body[7], body[8], body[9]]),
            0x3800
        );
        assert_eq!(wmask[..2], [0, 0xc0]);
        assert!(wmask[2..].iter().all(|&b| b == 0));
    }

    #[test]
    fn entries_start_masked_and_table_reads_back() {
        let (mut m, ctl) = msix(3);
        assert_eq!(m.table_len(), 48);
        assert_eq!(m.pba_len(), 8);
        for v in 0..3 {
            assert!(m.vector_masked(v));
        }
        program(&mut m, 1, 0xfee0_1000, 0x4041, true);
        let mut buf = [0u8; 16];
        m.table_read(16, &mut buf);
        assert_eq!(
            u64::from_le_bytes(buf[..8].try_into().unwrap()),
            0xfee0_1000
        );
        assert_eq!(u32::from_le_bytes(buf[8..12].try_into().unwrap()), 0x4041);
        assert_eq!(u32::from_le_bytes(buf[12..].try_into().unwrap()), 1);
        assert_eq!(
            ctl.routes.lock().unwrap().last(),
            Some(&(1, 0xfee0_1000, 0x4041, true))
        );
        // Reserved control bits read 0.
        m.table_write(16 + 12, &[0xff, 0xff, 0xff, 0xff]);
        m.table_read(16 + 12, &mut buf[..4]);
        assert_eq!(buf[..4], [1, 0, 0, 0]);
    }

    #[test]
    fn masked_vector_sets_pending_and_fires_on_unmask() {
        let (mut m, ctl) = msix(2);
        assert_eq!(m.signal(0), Signal::Dropped, "MSI-X disabled");
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 0x30, true);
        assert_eq!(m.signal(0), Signal::Pending);
        assert!(m.is_pending(0));
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 1);
        assert!(ctl.take_fired().is_empty());
        // Unmask with a single byte write of the control word.
        m.table_write(12, &[0]);
        assert_eq!(ctl.take_fired(), vec![0]);
        assert!(!m.is_pending(0));
        assert_eq!(m.signal(0), Signal::Sent);
        assert_eq!(ctl.take_fired(), vec![0]);
        assert_eq!(m.signal(7), Signal::Dropped);
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let (mut m, ctl) = msix(2);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut m, 0, 0xfee0_0000, 0x30, false);
        program(&mut m, 1, 0xfee0_0000, 0x31, false);
        assert_eq!(m.signal(1), Signal::Pending);
        assert_eq!(m.signal(0), Signal::Pending);
        assert!(ctl.take_fired().is_empty());
        m.set_control(CONTROL_ENABLE);
        assert_eq!(ctl.take_fired(), vec![0, 1]);
        // Pending bits of a still-masked vector survive the function unmask.
        m.table_write(ENTRY_SIZE + 12, &1u32.to_le_bytes());
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.signal(1);
        m.set_control(CONTROL_ENABLE);
        assert!(ctl.take_fired().is_empty());
        assert!(m.is_pending(1));
        m.clear_pending();
        assert!(!m.is_pending(1));
    }

    #[test]
    fn odd_sized_and_straddling_table_writes() {
        let (mut m, ctl) = msix(2);
        // One 16-byte write of a whole entry, then a 32-byte write across both entries.
        let mut entry = [0u8; 16];
        entry[..8].copy_from_slice(&0xfee0_2000u64.to_le_bytes());
        entry[8..12].copy_from_slice(&0x55u32.to_le_bytes());
        m.table_write(0, &entry);
        assert_eq!(
            m.message(0),
            Some(MsiMessage {
                addr: 0xfee0_2000,
                data: 0x55
            })
        );
        assert!(!m.vector_masked(0));
        let both = [entry, entry].concat();
        m.table_write(0, &both);
        assert!(!m.vector_masked(1));
        // 3 bytes at an odd offset, and writes past the table.
        m.table_write(9, &[0xaa, 0xbb, 0xcc]);
        assert_eq!(m.message(0).unwrap().data, 0xccbb_aa55);
        m.table_write(30, &[0; 8]);
        m.table_write(32, &[0; 8]);
        m.table_write(u64::MAX - 1, &[0; 8]);
        let mut buf = [0xffu8; 8];
        m.table_read(28, &mut buf);
        assert_eq!(buf[4..], [0, 0, 0, 0]);
        m.table_read(u64::MAX, &mut buf);
        assert_eq!(buf, [0; 8]);
        m.pba_read(u64::MAX - 3, &mut buf);
        assert_eq!(buf, [0; 8]);
        // An unchanged rewrite installs no route.
        let before = ctl.routes.lock().unwrap().len();
        m.table_write(0, &m.message(0).unwrap().addr.to_le_bytes());
        assert_eq!(ctl.routes.lock().unwrap().len(), before);
    }
}
