//! The PCI transport of the DMA device: its configuration space (SPEC section 1) and the BAR0
//! register model (SPEC sections 2–5): common configuration with feature negotiation, the
//! status handshake and reset, queue registers, the read-only device configuration, the
//! doorbells, and the MSI-X table and PBA.
//!
//! The transport owns the [`QueueEngine`] and never touches a ring; the engine never sees a
//! register. Completion interrupts travel engine → [`InterruptSink`] (queue → its MSI-X vector)
//! → [`Msix`] (mask and pending bits) → the platform's [`MsiController`].
//!
//! Locking: the platform serializes register accesses (one lock around the transport). The
//! MSI-X state has its own lock, shared with the interrupt sink the engine's threads call, and
//! is always taken after the transport's, so there is no lock cycle. The engine is called with
//! the transport's lock held and must not call back into the transport (the sink is fine).

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use crate::abi::{self, bar0, common, status, NO_VECTOR};
use crate::engine::{InterruptSink, QueueConfig, QueueEngine};
use crate::pci::config::{BarKind, ConfigSpace, Header};
use crate::pci::msix::{self, Msix};
use crate::pci::{command, BarRegion, PciError, PciFunction};

pub use crate::pci::msix::{MsiController, MsiError};

/// The BAR holding every register.
pub const BAR0_INDEX: u8 = 0;
/// Largest queue size a split virtqueue can have.
pub const QUEUE_SIZE_LIMIT: u16 = 32768;

/// Why a transport could not be built around an engine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    /// The engine's queue count is outside what the ABI allows.
    #[error("{0} queues: the device supports 1..={max}", max = bar0::MAX_QUEUES)]
    QueueCount(u16),
    /// The engine does not have one doorbell per queue.
    #[error("the engine has {doorbells} doorbells for {queues} queues")]
    Doorbells {
        /// Doorbells the engine returned.
        doorbells: usize,
        /// Queues it reports.
        queues: u16,
    },
    /// The engine's largest queue size is not a power of two in 1..=32768.
    #[error("queue size maximum {0} is not a power of two in 1..=32768")]
    QueueSizeMax(u16),
    /// The configuration space could not be built.
    #[error(transparent)]
    Pci(#[from] PciError),
}

/// Lock `m`, surviving poisoning: a panicked holder leaves the MSI-X state consistent enough
/// (every update is a plain field store), and the VMM must not cascade panics across vCPUs.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One queue's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QueueRegs {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn initial(max: u16) -> Self {
        Self {
            size: max,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// The interrupt sink handed to the engine at DRIVER_OK. It dies (drops every signal) when the
/// device resets, so a late completion of the old session never raises a vector.
struct Interrupts {
    msix: Arc<Mutex<Msix>>,
    queue_vectors: Vec<u16>,
    config_vector: Arc<AtomicU16>,
    live: AtomicBool,
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
        if self.live.load(Ordering::Acquire) {
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

/// Which 64-bit queue address register, and which part of it an access covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddrReg {
    Desc,
    Driver,
    Device,
}

/// `(register, shift, width mask)` for a 64-bit register accessed as a whole or as halves.
fn addr_reg(off: u64, len: usize) -> Option<(AddrReg, u32, u64)> {
    let (reg, base) = match off {
        common::QUEUE_DESC..=0x27 => (AddrReg::Desc, common::QUEUE_DESC),
        common::QUEUE_DRIVER..=0x2f => (AddrReg::Driver, common::QUEUE_DRIVER),
        common::QUEUE_DEVICE..=0x37 => (AddrReg::Device, common::QUEUE_DEVICE),
        _ => return None,
    };
    match (off - base, len) {
        (0, 8) => Some((reg, 0, u64::MAX)),
        (0, 4) => Some((reg, 0, 0xffff_ffff)),
        (4, 4) => Some((reg, 32, 0xffff_ffff)),
        _ => None,
    }
}

/// The DMA device's PCI function: configuration space + BAR0 registers around a queue engine.
pub struct Transport {
    engine: Box<dyn QueueEngine>,
    config: ConfigSpace,
    msix_cap: u64,
    msix: Arc<Mutex<Msix>>,
    doorbells: Vec<Arc<EventFd>>,
    num_queues: u16,
    queue_size_max: u16,
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: Arc<AtomicU16>,
    status: u8,
    activation_failed: bool,
    /// The engine was activated (or tried) since the last completed reset.
    engine_started: bool,
    resetting: bool,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    interrupts: Option<Arc<Interrupts>>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("num_queues", &self.num_queues)
            .field("status", &self.status)
            .field("resetting", &self.resetting)
            .field("driver_features", &self.driver_features)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// The device around `engine`, raising interrupts through `msi`. BAR0 is declared but not
    /// placed: the platform assigns it (`config_space_mut().set_bar_address`) and enables
    /// memory decoding as firmware would.
    pub fn new(
        engine: Box<dyn QueueEngine>,
        msi: Arc<dyn MsiController>,
    ) -> Result<Self, TransportError> {
        let dev_cfg = engine.config();
        let num_queues = dev_cfg.num_queues;
        if num_queues == 0 || num_queues > bar0::MAX_QUEUES {
            return Err(TransportError::QueueCount(num_queues));
        }
        let doorbells = engine.doorbells();
        if doorbells.len() != usize::from(num_queues) {
            return Err(TransportError::Doorbells {
                doorbells: doorbells.len(),
                queues: num_queues,
            });
        }
        let max = dev_cfg.queue_size_max;
        if !max.is_power_of_two() || max > QUEUE_SIZE_LIMIT {
            return Err(TransportError::QueueSizeMax(max));
        }
        let device_features = engine.device_features();
        if device_features & abi::feature::VERSION_1 == 0 {
            log::warn!("the engine does not offer VERSION_1: every driver will fail negotiation");
        }
        let vectors = num_queues + 1;
        let mut config = ConfigSpace::new(&Header {
            vendor_id: abi::pci_id::VENDOR,
            device_id: abi::pci_id::DEVICE,
            class: abi::pci_id::CLASS,
            revision: abi::pci_id::REVISION,
            subsystem_vendor_id: abi::pci_id::SUBSYSTEM_VENDOR,
            subsystem_id: abi::pci_id::SUBSYSTEM,
            interrupt_pin: 0,
        });
        config.add_bar(usize::from(BAR0_INDEX), bar0::SIZE, BarKind::MEMORY32)?;
        let (body, wmask) = msix::capability(
            vectors,
            BAR0_INDEX,
            bar0::MSIX_TABLE as u32,
            BAR0_INDEX,
            bar0::MSIX_PBA as u32,
        );
        let msix_cap = config.add_capability(msix::CAP_ID, &body, &wmask)?;
        Ok(Self {
            engine,
            config,
            msix_cap: u64::from(msix_cap),
            msix: Arc::new(Mutex::new(Msix::new(vectors, msi))),
            doorbells,
            num_queues,
            queue_size_max: max,
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: Arc::new(AtomicU16::new(NO_VECTOR)),
            status: 0,
            activation_failed: false,
            engine_started: false,
            resetting: false,
            queue_select: 0,
            queues: vec![QueueRegs::initial(max); usize::from(num_queues)],
            interrupts: None,
        })
    }

    /// Number of MSI-X vectors: one per queue plus the configuration vector.
    pub fn msix_vectors(&self) -> u16 {
        self.num_queues + 1
    }

    /// Number of queues.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// The engine (for the platform's metrics and shutdown).
    pub fn engine(&self) -> &dyn QueueEngine {
        self.engine.as_ref()
    }

    /// Read inside BAR0. Unknown offsets, and registers accessed with the wrong width, read 0.
    pub fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len();
        match offset {
            o if o < bar0::COMMON + common::LEN => {
                if let Some(v) = self.common_read(o, len) {
                    let bytes = v.to_le_bytes();
                    data.copy_from_slice(&bytes[..len]);
                }
            }
            o if (bar0::CONFIG..bar0::NOTIFY).contains(&o) => {
                let cfg = device_config_bytes(&self.engine.config());
                for (i, b) in data.iter_mut().enumerate() {
                    let at = (o - bar0::CONFIG) as usize + i;
                    *b = cfg.get(at).copied().unwrap_or(0);
                }
            }
            o if (bar0::MSIX_TABLE..bar0::MSIX_PBA).contains(&o) => {
                lock(&self.msix).table_read(o - bar0::MSIX_TABLE, data);
            }
            o if (bar0::MSIX_PBA..bar0::SIZE).contains(&o) => {
                lock(&self.msix).pba_read(o - bar0::MSIX_PBA, data);
            }
            _ => {}
        }
    }

    /// Write inside BAR0. Read-only and unknown registers, and wrong widths, are ignored.
    pub fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len();
        match offset {
            o if o < bar0::COMMON + common::LEN => {
                if (1..=8).contains(&len) {
                    let mut bytes = [0u8; 8];
                    bytes[..len].copy_from_slice(data);
                    self.common_write(o, len, u64::from_le_bytes(bytes));
                }
            }
            o if (bar0::NOTIFY..bar0::MSIX_TABLE).contains(&o) => self.doorbell(o, len),
            o if (bar0::MSIX_TABLE..bar0::MSIX_PBA).contains(&o) => {
                lock(&self.msix).table_write(o - bar0::MSIX_TABLE, data);
            }
            _ => log::trace!("BAR0 write to read-only/unknown offset {offset:#x} ignored"),
        }
    }

    /// A doorbell write that reached userspace (normally an ioeventfd absorbs it).
    fn doorbell(&mut self, offset: u64, len: usize) {
        let rel = offset - bar0::NOTIFY;
        if !rel.is_multiple_of(bar0::NOTIFY_STRIDE) || !(len == 2 || len == 4) {
            log::debug!("doorbell write of {len} bytes at BAR0+{offset:#x} ignored");
            return;
        }
        let queue = rel / bar0::NOTIFY_STRIDE;
        if let Some(fd) = usize::try_from(queue)
            .ok()
            .and_then(|q| self.doorbells.get(q))
        {
            if let Err(e) = fd.write(1) {
                log::warn!("queue {queue} doorbell: {e}");
            }
        }
    }

    fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn common_read(&mut self, off: u64, len: usize) -> Option<u64> {
        if let Some((reg, shift, mask)) = addr_reg(off, len) {
            let q = self.selected().copied();
            let v = q.map_or(0, |q| match reg {
                AddrReg::Desc => q.desc,
                AddrReg::Driver => q.driver,
                AddrReg::Device => q.device,
            });
            return Some((v >> shift) & mask);
        }
        let q = self.selected().copied();
        let v = match (off, len) {
            (common::DEVICE_FEATURE_SELECT, 4) => u64::from(self.device_feature_select),
            (common::DEVICE_FEATURE, 4) => match self.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            (common::DRIVER_FEATURE_SELECT, 4) => u64::from(self.driver_feature_select),
            (common::DRIVER_FEATURE, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (common::CONFIG_MSIX_VECTOR, 2) => {
                u64::from(self.config_vector.load(Ordering::Acquire))
            }
            (common::NUM_QUEUES, 2) => u64::from(self.num_queues),
            (common::DEVICE_STATUS, 1) => u64::from(self.read_status()),
            (common::CONFIG_GENERATION, 1) => 0,
            (common::QUEUE_SELECT, 2) => u64::from(self.queue_select),
            (common::QUEUE_SIZE, 2) => q.map_or(0, |q| u64::from(q.size)),
            (common::QUEUE_MSIX_VECTOR, 2) => q.map_or(0, |q| u64::from(q.vector)),
            (common::QUEUE_ENABLE, 2) => q.map_or(0, |q| u64::from(q.enabled)),
            (common::QUEUE_NOTIFY_OFF, 2) => q.map_or(0, |_| u64::from(self.queue_select)),
            _ => return None,
        };
        Some(v)
    }

    fn common_write(&mut self, off: u64, len: usize, value: u64) {
        if (off, len) == (common::DEVICE_STATUS, 1) {
            self.write_status(value as u8);
            return;
        }
        if self.resetting {
            log::debug!("common config write at {off:#x} during reset ignored");
            return;
        }
        if let Some((reg, shift, mask)) = addr_reg(off, len) {
            if let Some(q) = self.writable_queue() {
                let field = match reg {
                    AddrReg::Desc => &mut q.desc,
                    AddrReg::Driver => &mut q.driver,
                    AddrReg::Device => &mut q.device,
                };
                *field = (*field & !(mask << shift)) | ((value & mask) << shift);
            }
            return;
        }
        let features_locked = self.status & (status::FEATURES_OK | status::DRIVER_OK) != 0;
        match (off, len) {
            (common::DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (common::DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (common::DRIVER_FEATURE, 4) if !features_locked => {
                let v = value & 0xffff_ffff;
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | v << 32,
                    _ => {}
                }
            }
            (common::CONFIG_MSIX_VECTOR, 2) => {
                let v = self.checked_vector(value as u16);
                self.config_vector.store(v, Ordering::Release);
            }
            (common::QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (common::QUEUE_SIZE, 2) => {
                let size = value as u16;
                let max = self.queue_size_max;
                if let Some(q) = self.writable_queue() {
                    if size.is_power_of_two() && size <= max {
                        q.size = size;
                    } else {
                        log::debug!("queue size {size} rejected (max {max})");
                    }
                }
            }
            (common::QUEUE_MSIX_VECTOR, 2) => {
                let v = self.checked_vector(value as u16);
                if let Some(q) = self.writable_queue() {
                    q.vector = v;
                }
            }
            (common::QUEUE_ENABLE, 2) => {
                if let Some(q) = self.writable_queue() {
                    // Drivers never disable a queue; only a reset does.
                    if value & 1 == 1 {
                        q.enabled = true;
                    }
                }
            }
            _ => log::trace!("common config write at {off:#x} ({len} bytes) ignored"),
        }
    }

    /// A vector the table has, or NO_VECTOR (virtio: the driver reads back to check).
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix_vectors() {
            vector
        } else {
            NO_VECTOR
        }
    }

    /// The selected queue, if its registers may be written now.
    fn writable_queue(&mut self) -> Option<&mut QueueRegs> {
        let driver_ok = self.status & status::DRIVER_OK != 0;
        self.queues
            .get_mut(usize::from(self.queue_select))
            .filter(|q| !q.enabled && !driver_ok)
    }

    fn read_status(&mut self) -> u8 {
        if self.resetting {
            if self.engine.reset_complete() {
                self.finish_reset();
                return 0;
            }
            return self.status & !status::DRIVER_OK;
        }
        let mut s = self.status;
        if self.activation_failed || (s & status::DRIVER_OK != 0 && self.engine.needs_reset()) {
            s |= status::NEEDS_RESET;
        }
        s
    }

    fn features_acceptable(&self) -> bool {
        let unknown = self.driver_features & !self.device_features;
        if unknown != 0 {
            log::warn!("driver accepted features {unknown:#x} the device does not offer");
            return false;
        }
        if self.driver_features & abi::feature::VERSION_1 == 0 {
            log::warn!("driver did not accept VERSION_1");
            return false;
        }
        true
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.begin_reset();
            return;
        }
        if self.resetting {
            log::debug!("status write {value:#x} during reset ignored");
            return;
        }
        let old = self.status;
        // The driver never clears a bit (only a reset does); NEEDS_RESET is the device's.
        let mut new = old | (value & !status::NEEDS_RESET);
        let newly = |new: u8, bit: u8| new & bit != 0 && old & bit == 0;
        if newly(new, status::FEATURES_OK) && !self.features_acceptable() {
            new &= !status::FEATURES_OK;
        }
        let activate = newly(new, status::DRIVER_OK);
        if activate && new & status::FEATURES_OK == 0 {
            log::warn!("DRIVER_OK without FEATURES_OK ignored");
            new &= !status::DRIVER_OK;
        }
        self.status = new;
        if activate && new & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let queues: Vec<QueueConfig> = self
            .queues
            .iter()
            .map(|q| QueueConfig {
                size: q.size,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
                enabled: q.enabled,
            })
            .collect();
        self.engine_started = true;
        let sink = Arc::new(Interrupts {
            msix: self.msix.clone(),
            queue_vectors: self.queues.iter().map(|q| q.vector).collect(),
            config_vector: self.config_vector.clone(),
            live: AtomicBool::new(true),
        });
        match self
            .engine
            .activate(self.driver_features, &queues, sink.clone())
        {
            Ok(()) => {
                log::debug!(
                    "device activated: features {:#x}, {} queue(s) enabled",
                    self.driver_features,
                    queues.iter().filter(|q| q.enabled).count()
                );
                self.interrupts = Some(sink);
            }
            Err(e) => {
                log::warn!("device activation failed: {e}");
                sink.live.store(false, Ordering::Release);
                self.activation_failed = true;
                let vector = self.config_vector.load(Ordering::Acquire);
                if vector != NO_VECTOR {
                    lock(&self.msix).signal(vector);
                }
            }
        }
    }

    /// Writing 0 to DEVICE_STATUS. An engine that was started must finish first: until then
    /// the status reads the old value without DRIVER_OK, never 0 (FEATURES_OK stays set, as
    /// DRIVER_OK needs it). An engine never started has nothing in flight, so the reset is
    /// immediate and the engine is not involved.
    fn begin_reset(&mut self) {
        if let Some(sink) = self.interrupts.take() {
            let _msix = lock(&self.msix);
            sink.live.store(false, Ordering::Release);
        }
        if !self.engine_started {
            self.finish_reset();
            return;
        }
        if !self.resetting {
            self.engine.begin_reset();
            self.resetting = true;
        }
        if self.engine.reset_complete() {
            self.finish_reset();
        } else {
            log::debug!("reset: waiting for the engine");
        }
    }

    /// Registers back to their initial values. The MSI-X table keeps its contents (SPEC 4);
    /// the pending bits are cleared, as they belong to the old session's interrupts.
    fn finish_reset(&mut self) {
        self.resetting = false;
        self.engine_started = false;
        self.status = 0;
        self.activation_failed = false;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        self.queue_select = 0;
        self.queues.fill(QueueRegs::initial(self.queue_size_max));
        lock(&self.msix).clear_pending();
    }
}

/// `abi::DeviceConfig` as the bytes BAR0 shows.
fn device_config_bytes(cfg: &abi::DeviceConfig) -> [u8; abi::config::LEN as usize] {
    let mut b = [0u8; abi::config::LEN as usize];
    let mut put = |off: u64, bytes: &[u8]| {
        let off = off as usize;
        b[off..off + bytes.len()].copy_from_slice(bytes);
    };
    put(abi::config::CAPACITY, &cfg.capacity.to_le_bytes());
    put(abi::config::MAX_SEGMENTS, &cfg.max_segments.to_le_bytes());
    put(abi::config::MAX_TRANSFER, &cfg.max_transfer.to_le_bytes());
    put(abi::config::NUM_QUEUES, &cfg.num_queues.to_le_bytes());
    put(
        abi::config::QUEUE_SIZE_MAX,
        &cfg.queue_size_max.to_le_bytes(),
    );
    put(abi::config::ALIGNMENT, &cfg.alignment.to_le_bytes());
    b
}

impl PciFunction for Transport {
    fn config_write(&mut self, offset: u64, data: &[u8]) {
        self.config.write(offset, data);
        let control = self.msix_cap + msix::CAP_CONTROL;
        let end = offset.saturating_add(data.len() as u64);
        if offset < control + 2 && end > control {
            let value = self.config.read_u16(control);
            lock(&self.msix).set_control(value);
        }
    }

    fn config_space(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_space_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != BAR0_INDEX || self.config.command() & command::MEMORY == 0 {
            data.fill(0xff);
            return;
        }
        self.bar0_read(offset, data);
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == BAR0_INDEX && self.config.command() & command::MEMORY != 0 {
            self.bar0_write(offset, data);
        }
    }

    fn ioeventfds(&self, bar: u8) -> Vec<(u64, Arc<EventFd>)> {
        if bar != BAR0_INDEX {
            return Vec::new();
        }
        self.doorbells
            .iter()
            .enumerate()
            .map(|(q, fd)| (bar0::NOTIFY + bar0::NOTIFY_STRIDE * q as u64, fd.clone()))
            .collect()
    }

    fn decoded_bars(&self) -> Vec<BarRegion> {
        self.config.decoded_bars()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::feature;
    use crate::engine::ActivateError;
    use crate::pci::config::walk_capabilities;
    use crate::pci::msix::tests::FakeController;
    use crate::pci::{cap_id, reg};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const ALL_FEATURES: u64 =
        feature::FLUSH | feature::GET_ID | feature::RING_EVENT_IDX | feature::VERSION_1;

    #[derive(Default)]
    struct FakeState {
        activated: Option<(u64, Vec<QueueConfig>)>,
        sink: Option<Arc<dyn InterruptSink>>,
        resets_begun: u32,
        reset_polls_left: u32,
        needs_reset: bool,
        fail_activate: bool,
    }

    struct FakeEngine {
        state: Arc<Mutex<FakeState>>,
        doorbells: Vec<Arc<EventFd>>,
        cfg: abi::DeviceConfig,
    }

    impl QueueEngine for FakeEngine {
        fn config(&self) -> abi::DeviceConfig {
            self.cfg
        }
        fn device_features(&self) -> u64 {
            ALL_FEATURES
        }
        fn doorbells(&self) -> Vec<Arc<EventFd>> {
            self.doorbells.clone()
        }
        fn activate(
            &mut self,
            features: u64,
            queues: &[QueueConfig],
            interrupts: Arc<dyn InterruptSink>,
        ) -> Result<(), ActivateError> {
            let mut s = self.state.lock().unwrap();
            if s.fail_activate {
                return Err(ActivateError::BadQueue {
                    queue: 0,
                    reason: "test".into(),
                });
            }
            s.activated = Some((features, queues.to_vec()));
            s.sink = Some(interrupts);
            Ok(())
        }
        fn begin_reset(&mut self) {
            let mut s = self.state.lock().unwrap();
            s.resets_begun += 1;
            s.activated = None;
        }
        fn reset_complete(&mut self) -> bool {
            let mut s = self.state.lock().unwrap();
            if s.reset_polls_left == 0 {
                true
            } else {
                s.reset_polls_left -= 1;
                false
            }
        }
        fn needs_reset(&self) -> bool {
            self.state.lock().unwrap().needs_reset
        }
    }

    struct Rig {
        t: Transport,
        state: Arc<Mutex<FakeState>>,
        ctl: Arc<FakeController>,
        doorbells: Vec<Arc<EventFd>>,
    }

    fn rig(queues: u16) -> Rig {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let doorbells: Vec<_> = (0..queues)
            .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
            .collect();
        let engine = FakeEngine {
            state: state.clone(),
            doorbells: doorbells.clone(),
            cfg: abi::DeviceConfig {
                capacity: 64 << 20,
                max_segments: 32,
                max_transfer: 1 << 20,
                num_queues: queues,
                queue_size_max: 256,
                alignment: 512,
            },
        };
        let ctl = Arc::new(FakeController::default());
        let mut t = Transport::new(Box::new(engine), ctl.clone()).unwrap();
        t.config_space_mut()
            .set_bar_address(0, 0xc000_0000)
            .unwrap();
        t.config_space_mut().set_command(command::MEMORY);
        Rig {
            t,
            state,
            ctl,
            doorbells,
        }
    }

    impl Rig {
        fn r(&mut self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.t.bar_read(0, off, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn w(&mut self, off: u64, len: usize, v: u64) {
            self.t.bar_write(0, off, &v.to_le_bytes()[..len]);
        }
        fn status(&mut self) -> u8 {
            self.r(common::DEVICE_STATUS, 1) as u8
        }
        fn set_status(&mut self, s: u8) {
            self.w(common::DEVICE_STATUS, 1, u64::from(s));
        }
        fn negotiate(&mut self, features: u64) -> u8 {
            self.set_status(status::ACKNOWLEDGE);
            self.set_status(status::ACKNOWLEDGE | status::DRIVER);
            self.w(common::DRIVER_FEATURE_SELECT, 4, 0);
            self.w(common::DRIVER_FEATURE, 4, features & 0xffff_ffff);
            self.w(common::DRIVER_FEATURE_SELECT, 4, 1);
            self.w(common::DRIVER_FEATURE, 4, features >> 32);
            self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
            self.status()
        }
        fn setup_queue(&mut self, q: u16, vector: u16) {
            self.w(common::QUEUE_SELECT, 2, u64::from(q));
            self.w(common::QUEUE_SIZE, 2, 128);
            self.w(common::QUEUE_MSIX_VECTOR, 2, u64::from(vector));
            self.w(common::QUEUE_DESC, 8, 0x1_0000 * (u64::from(q) + 1));
            self.w(common::QUEUE_DRIVER, 4, 0x2000);
            self.w(common::QUEUE_DRIVER + 4, 4, 0x1);
            self.w(common::QUEUE_DEVICE, 8, 0x3000);
            self.w(common::QUEUE_ENABLE, 2, 1);
        }
        fn config_u16(&mut self, off: u64) -> u16 {
            let mut b = [0u8; 2];
            self.t.config_read(off, &mut b);
            u16::from_le_bytes(b)
        }
        fn enable_msix(&mut self, function_mask: bool) {
            let cap = self.t.msix_cap;
            let mut v = msix::CONTROL_ENABLE;
            if function_mask {
                v |= msix::CONTROL_FUNCTION_MASK;
            }
            self.t.config_write(cap + 2, &v.to_le_bytes());
        }
        fn program_vector(&mut self, vector: u16, masked: bool) {
            let base = bar0::MSIX_TABLE + 16 * u64::from(vector);
            self.w(base, 8, 0xfee0_0000);
            self.w(base + 8, 4, 0x40 + u64::from(vector));
            self.w(base + 12, 4, u64::from(masked));
        }
    }

    #[test]
    fn config_space_identity_bar_and_msix_capability() {
        let mut rig = rig(3);
        let mut cfg = [0u8; 256];
        rig.t.config_read(0, &mut cfg);
        assert_eq!(u16::from_le_bytes([cfg[0], cfg[1]]), 0x1234);
        assert_eq!(u16::from_le_bytes([cfg[2], cfg[3]]), 0xa10d);
        assert_eq!(cfg[8], abi::ABI_VERSION as u8);
        assert_eq!([cfg[9], cfg[10], cfg[11]], [0x00, 0x80, 0x01]);
        assert_eq!(u16::from_le_bytes([cfg[0x2c], cfg[0x2d]]), 0x1234);
        assert_eq!(u16::from_le_bytes([cfg[0x2e], cfg[0x2f]]), 0x0001);
        assert_eq!(cfg[reg::INTERRUPT_PIN as usize], 0);
        assert_eq!(cfg[reg::HEADER_TYPE as usize], 0);
        let caps = walk_capabilities(&cfg);
        assert_eq!(caps.len(), 1);
        let (id, off) = caps[0];
        assert_eq!(id, cap_id::MSIX);
        let off = usize::from(off);
        let control = u16::from_le_bytes([cfg[off + 2], cfg[off + 3]]);
        assert_eq!(control & 0x7ff, 3, "4 vectors: 3 queues + config");
        let table = u32::from_le_bytes(cfg[off + 4..off + 8].try_into().unwrap());
        let pba = u32::from_le_bytes(cfg[off + 8..off + 12].try_into().unwrap());
        assert_eq!(table, bar0::MSIX_TABLE as u32, "BIR 0");
        assert_eq!(pba, bar0::MSIX_PBA as u32, "BIR 0");
        // BAR0 sizing: 16 KiB, 32-bit, non-prefetchable.
        rig.t.config_write(reg::BAR0, &[0xff; 4]);
        let mut bar = [0u8; 4];
        rig.t.config_read(reg::BAR0, &mut bar);
        assert_eq!(u32::from_le_bytes(bar), !(bar0::SIZE as u32 - 1));
        rig.t.config_write(reg::BAR0, &0xc000_4000u32.to_le_bytes());
        assert_eq!(
            rig.t.decoded_bars(),
            vec![BarRegion {
                index: 0,
                addr: 0xc000_4000,
                size: bar0::SIZE,
                kind: BarKind::MEMORY32
            }]
        );
        let fds = rig.t.ioeventfds(0);
        assert_eq!(
            fds.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            vec![0x2000, 0x2004, 0x2008]
        );
        assert!(rig.t.ioeventfds(1).is_empty());
    }

    #[test]
    fn memory_decoding_off_hides_bar0() {
        let mut rig = rig(1);
        assert_eq!(rig.r(common::NUM_QUEUES, 2), 1);
        rig.t.config_write(reg::COMMAND, &[0, 0]);
        assert!(rig.t.decoded_bars().is_empty());
        assert_eq!(rig.r(common::NUM_QUEUES, 2), 0xffff);
        rig.w(common::QUEUE_SELECT, 2, 5);
        rig.t
            .config_write(reg::COMMAND, &command::MEMORY.to_le_bytes());
        assert_eq!(rig.r(common::QUEUE_SELECT, 2), 0);
    }

    #[test]
    fn feature_negotiation_accepts_offered_features() {
        let mut rig = rig(1);
        rig.w(common::DEVICE_FEATURE_SELECT, 4, 0);
        assert_eq!(rig.r(common::DEVICE_FEATURE, 4), ALL_FEATURES & 0xffff_ffff);
        rig.w(common::DEVICE_FEATURE_SELECT, 4, 1);
        assert_eq!(rig.r(common::DEVICE_FEATURE, 4), 1);
        rig.w(common::DEVICE_FEATURE_SELECT, 4, 2);
        assert_eq!(rig.r(common::DEVICE_FEATURE, 4), 0);
        // Wrong widths read 0.
        rig.w(common::DEVICE_FEATURE_SELECT, 4, 0);
        assert_eq!(rig.r(common::DEVICE_FEATURE, 2), 0);
        let s = rig.negotiate(feature::VERSION_1 | feature::FLUSH);
        assert_eq!(
            s,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        );
        rig.w(common::DRIVER_FEATURE_SELECT, 4, 1);
        assert_eq!(rig.r(common::DRIVER_FEATURE, 4), 1);
        // Features are frozen after FEATURES_OK.
        rig.w(common::DRIVER_FEATURE_SELECT, 4, 0);
        rig.w(common::DRIVER_FEATURE, 4, 0);
        assert_eq!(rig.r(common::DRIVER_FEATURE, 4), feature::FLUSH);
    }

    #[test]
    fn features_ok_rejected_without_version_1_or_with_unknown_bits() {
        let mut rig = rig(1);
        let s = rig.negotiate(feature::FLUSH);
        assert_eq!(s & status::FEATURES_OK, 0, "VERSION_1 missing");
        assert_eq!(s, status::ACKNOWLEDGE | status::DRIVER);
        // DRIVER_OK without FEATURES_OK does nothing.
        rig.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
        assert_eq!(rig.status() & status::DRIVER_OK, 0);
        assert!(rig.state.lock().unwrap().activated.is_none());

        let mut rig = super::tests::rig(1);
        let s = rig.negotiate(feature::VERSION_1 | 1 << 5);
        assert_eq!(s & status::FEATURES_OK, 0, "unknown bit 5");
        let mut rig = super::tests::rig(1);
        let s = rig.negotiate(feature::VERSION_1 | 1 << 40);
        assert_eq!(s & status::FEATURES_OK, 0, "unknown bit 40");
    }

    #[test]
    fn queue_register_rules() {
        let mut rig = rig(2);
        assert_eq!(rig.r(common::NUM_QUEUES, 2), 2);
        rig.w(common::QUEUE_SELECT, 2, 1);
        assert_eq!(rig.r(common::QUEUE_SIZE, 2), 256, "reads the maximum");
        assert_eq!(rig.r(common::QUEUE_NOTIFY_OFF, 2), 1);
        assert_eq!(rig.r(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        for bad in [0u64, 3, 100, 512] {
            rig.w(common::QUEUE_SIZE, 2, bad);
            assert_eq!(rig.r(common::QUEUE_SIZE, 2), 256, "size {bad}");
        }
        rig.w(common::QUEUE_SIZE, 2, 64);
        assert_eq!(rig.r(common::QUEUE_SIZE, 2), 64);
        rig.w(common::QUEUE_SIZE, 4, 32);
        assert_eq!(rig.r(common::QUEUE_SIZE, 2), 64, "wrong width ignored");
        // Vectors past the table read back NO_VECTOR.
        rig.w(common::QUEUE_MSIX_VECTOR, 2, 2);
        assert_eq!(rig.r(common::QUEUE_MSIX_VECTOR, 2), 2);
        rig.w(common::QUEUE_MSIX_VECTOR, 2, 3);
        assert_eq!(rig.r(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        // 64-bit registers: whole, or as two halves in either order.
        rig.w(common::QUEUE_DESC, 8, 0x1234_5678_9abc_def0);
        assert_eq!(rig.r(common::QUEUE_DESC, 8), 0x1234_5678_9abc_def0);
        rig.w(common::QUEUE_DRIVER + 4, 4, 0xaaaa_bbbb);
        rig.w(common::QUEUE_DRIVER, 4, 0xcccc_dddd);
        assert_eq!(rig.r(common::QUEUE_DRIVER, 8), 0xaaaa_bbbb_cccc_dddd);
        assert_eq!(rig.r(common::QUEUE_DRIVER + 4, 4), 0xaaaa_bbbb);
        assert_eq!(rig.r(common::QUEUE_DRIVER, 4), 0xcccc_dddd);
        rig.w(common::QUEUE_DEVICE + 2, 4, 0xffff_ffff);
        rig.w(common::QUEUE_DEVICE, 2, 0xffff);
        assert_eq!(rig.r(common::QUEUE_DEVICE, 8), 0, "odd widths ignored");
        assert_eq!(rig.r(common::QUEUE_DEVICE + 2, 4), 0);
        // Once enabled, the queue's registers are frozen.
        rig.w(common::QUEUE_ENABLE, 2, 1);
        assert_eq!(rig.r(common::QUEUE_ENABLE, 2), 1);
        rig.w(common::QUEUE_SIZE, 2, 16);
        rig.w(common::QUEUE_DESC, 4, 0);
        rig.w(common::QUEUE_ENABLE, 2, 0);
        assert_eq!(rig.r(common::QUEUE_SIZE, 2), 64);
        assert_eq!(rig.r(common::QUEUE_DESC, 8), 0x1234_5678_9abc_def0);
        assert_eq!(rig.r(common::QUEUE_ENABLE, 2), 1);
        // Queue 0 is still writable.
        rig.w(common::QUEUE_SELECT, 2, 0);
        rig.w(common::QUEUE_SIZE, 2, 16);
        assert_eq!(rig.r(common::QUEUE_SIZE, 2), 16);
        // A select past the last queue reads 0 and ignores writes.
        rig.w(common::QUEUE_SELECT, 2, 2);
        assert_eq!(rig.r(common::QUEUE_SELECT, 2), 2);
        rig.w(common::QUEUE_SIZE, 2, 16);
        rig.w(common::QUEUE_DESC, 8, 0x1000);
        for (off, len) in [
            (common::QUEUE_SIZE, 2),
            (common::QUEUE_MSIX_VECTOR, 2),
            (common::QUEUE_ENABLE, 2),
            (common::QUEUE_NOTIFY_OFF, 2),
            (common::QUEUE_DESC, 8),
        ] {
            assert_eq!(rig.r(off, len), 0, "{off:#x}");
        }
        rig.w(common::QUEUE_SELECT, 2, 0xffff);
        assert_eq!(rig.r(common::QUEUE_SIZE, 2), 0);
    }

    #[test]
    fn driver_ok_activates_the_engine_and_freezes_queues() {
        let mut rig = rig(2);
        rig.negotiate(feature::VERSION_1 | feature::RING_EVENT_IDX);
        rig.setup_queue(0, 1);
        rig.w(common::QUEUE_SELECT, 2, 1);
        rig.w(common::QUEUE_SIZE, 2, 32);
        rig.w(common::CONFIG_MSIX_VECTOR, 2, 0);
        assert_eq!(rig.r(common::CONFIG_MSIX_VECTOR, 2), 0);
        rig.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(rig.status() & status::DRIVER_OK, status::DRIVER_OK);
        let (features, queues) = rig.state.lock().unwrap().activated.clone().unwrap();
        assert_eq!(features, feature::VERSION_1 | feature::RING_EVENT_IDX);
        assert_eq!(
            queues,
            vec![
                QueueConfig {
                    size: 128,
                    desc: 0x1_0000,
                    driver: 0x1_0000_2000,
                    device: 0x3000,
                    enabled: true
                },
                QueueConfig {
                    size: 32,
                    desc: 0,
                    driver: 0,
                    device: 0,
                    enabled: false
                }
            ]
        );
        // After DRIVER_OK even disabled queues are frozen.
        rig.w(common::QUEUE_SIZE, 2, 64);
        assert_eq!(rig.r(common::QUEUE_SIZE, 2), 32);
        // NEEDS_RESET from the engine shows in the status; the driver cannot set it.
        assert_eq!(rig.status() & status::NEEDS_RESET, 0);
        rig.state.lock().unwrap().needs_reset = true;
        assert_ne!(rig.status() & status::NEEDS_RESET, 0);
    }

    #[test]
    fn failed_activation_sets_needs_reset_and_raises_the_config_vector() {
        let mut rig = rig(1);
        rig.state.lock().unwrap().fail_activate = true;
        rig.enable_msix(false);
        rig.program_vector(0, false);
        rig.negotiate(feature::VERSION_1);
        rig.w(common::CONFIG_MSIX_VECTOR, 2, 0);
        rig.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_ne!(rig.status() & status::NEEDS_RESET, 0);
        assert_eq!(rig.ctl.take_fired(), vec![0]);
        rig.set_status(0);
        assert_eq!(rig.status(), 0);
    }

    #[test]
    fn reset_waits_for_the_engine() {
        let mut rig = rig(1);
        rig.negotiate(feature::VERSION_1);
        rig.setup_queue(0, 0);
        rig.program_vector(0, false);
        rig.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        rig.state.lock().unwrap().reset_polls_left = 2;
        rig.set_status(0);
        assert_eq!(rig.state.lock().unwrap().resets_begun, 1);
        let old = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        // `begin_reset` polled once already; the engine needs one more poll.
        assert_eq!(rig.status(), old, "old value without DRIVER_OK");
        // Writes during the reset are ignored.
        rig.w(common::QUEUE_SELECT, 2, 0);
        rig.w(common::CONFIG_MSIX_VECTOR, 2, 0);
        rig.set_status(status::ACKNOWLEDGE);
        assert_eq!(rig.status(), 0, "engine done: reset complete");
        // Every register is back at its initial value...
        assert_eq!(rig.r(common::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        assert_eq!(rig.r(common::QUEUE_SIZE, 2), 256);
        assert_eq!(rig.r(common::QUEUE_ENABLE, 2), 0);
        assert_eq!(rig.r(common::QUEUE_DESC, 8), 0);
        assert_eq!(rig.r(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        rig.w(common::DRIVER_FEATURE_SELECT, 4, 1);
        assert_eq!(rig.r(common::DRIVER_FEATURE, 4), 0);
        // ...but the MSI-X table keeps its contents.
        assert_eq!(rig.r(bar0::MSIX_TABLE, 8), 0xfee0_0000);
        // The queues are writable again.
        rig.w(common::QUEUE_SIZE, 2, 8);
        assert_eq!(rig.r(common::QUEUE_SIZE, 2), 8);
    }

    #[test]
    fn reset_of_an_idle_device_is_immediate() {
        let mut rig = rig(1);
        rig.state.lock().unwrap().reset_polls_left = 5;
        rig.negotiate(feature::VERSION_1);
        rig.w(common::QUEUE_SIZE, 2, 64);
        rig.set_status(0);
        assert_eq!(rig.status(), 0);
        assert_eq!(
            rig.state.lock().unwrap().resets_begun,
            0,
            "engine never started"
        );
        assert_eq!(rig.r(common::QUEUE_SIZE, 2), 256);
        // Registers are writable at once.
        rig.w(common::QUEUE_SIZE, 2, 32);
        assert_eq!(rig.r(common::QUEUE_SIZE, 2), 32);
        assert_eq!(
            rig.negotiate(feature::VERSION_1) & status::FEATURES_OK,
            status::FEATURES_OK
        );
        // A failed activation started the engine: its reset waits.
        rig.state.lock().unwrap().fail_activate = true;
        rig.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        rig.set_status(0);
        assert_eq!(rig.state.lock().unwrap().resets_begun, 1);
        assert_ne!(rig.status(), 0, "engine still resetting");
        // Writing 0 again while resetting does not begin another engine reset.
        rig.set_status(0);
        assert_eq!(rig.state.lock().unwrap().resets_begun, 1);
        while rig.status() != 0 {}
        assert_eq!(rig.state.lock().unwrap().reset_polls_left, 0);
    }

    #[test]
    fn queue_interrupts_follow_msix_masking() {
        let mut rig = rig(2);
        rig.negotiate(feature::VERSION_1);
        rig.setup_queue(0, 1);
        rig.setup_queue(1, 2);
        rig.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        let sink = rig.state.lock().unwrap().sink.clone().unwrap();
        // MSI-X disabled: dropped.
        sink.signal_queue(0);
        assert!(rig.ctl.take_fired().is_empty());
        rig.enable_msix(false);
        assert_eq!(
            rig.config_u16(rig.t.msix_cap + 2) & msix::CONTROL_ENABLE,
            msix::CONTROL_ENABLE
        );
        rig.program_vector(1, false);
        rig.program_vector(2, true);
        sink.signal_queue(0);
        sink.signal_queue(1);
        sink.signal_queue(7);
        sink.signal_config(); // NO_VECTOR
        assert_eq!(rig.ctl.take_fired(), vec![1]);
        assert_eq!(rig.r(bar0::MSIX_PBA, 8), 1 << 2);
        rig.w(bar0::MSIX_TABLE + 2 * 16 + 12, 4, 0);
        assert_eq!(rig.ctl.take_fired(), vec![2]);
        assert_eq!(rig.r(bar0::MSIX_PBA, 8), 0);
        // Function mask.
        rig.enable_msix(true);
        sink.signal_queue(0);
        assert!(rig.ctl.take_fired().is_empty());
        rig.enable_msix(false);
        assert_eq!(rig.ctl.take_fired(), vec![1]);
        // The routes the platform saw.
        let routes = rig.ctl.routes.lock().unwrap().clone();
        assert!(routes.contains(&(1, 0xfee0_0000, 0x41, false)));
        assert!(routes.contains(&(2, 0xfee0_0000, 0x42, false)));
        // After a reset the old session's sink is dead.
        rig.set_status(0);
        sink.signal_queue(0);
        assert!(rig.ctl.take_fired().is_empty());
    }

    #[test]
    fn doorbells_and_device_config() {
        let mut rig = rig(2);
        rig.w(bar0::NOTIFY + 4, 2, 1);
        assert_eq!(rig.doorbells[1].read().unwrap(), 1);
        rig.w(bar0::NOTIFY, 4, 0);
        assert_eq!(rig.doorbells[0].read().unwrap(), 1);
        // Wrong width, misaligned, or past the last queue: nothing.
        rig.w(bar0::NOTIFY, 1, 0);
        rig.w(bar0::NOTIFY + 2, 2, 0);
        rig.w(bar0::NOTIFY + 8, 4, 2);
        assert!(rig.doorbells[0].read().is_err());
        assert!(rig.doorbells[1].read().is_err());
        assert_eq!(rig.r(bar0::NOTIFY, 4), 0);
        // Device configuration, any width.
        assert_eq!(rig.r(bar0::CONFIG + abi::config::CAPACITY, 8), 64 << 20);
        assert_eq!(rig.r(bar0::CONFIG + abi::config::CAPACITY + 2, 2), 0x400);
        assert_eq!(rig.r(bar0::CONFIG + abi::config::MAX_SEGMENTS, 4), 32);
        assert_eq!(rig.r(bar0::CONFIG + abi::config::MAX_TRANSFER, 4), 1 << 20);
        assert_eq!(rig.r(bar0::CONFIG + abi::config::NUM_QUEUES, 2), 2);
        assert_eq!(rig.r(bar0::CONFIG + abi::config::QUEUE_SIZE_MAX, 2), 256);
        assert_eq!(rig.r(bar0::CONFIG + abi::config::ALIGNMENT, 4), 512);
        assert_eq!(rig.r(bar0::CONFIG + abi::config::ALIGNMENT + 2, 8), 0);
        rig.w(bar0::CONFIG, 8, 0);
        assert_eq!(rig.r(bar0::CONFIG, 8), 64 << 20, "read-only");
        assert_eq!(rig.r(bar0::CONFIG + 0x100, 4), 0);
    }

    #[test]
    fn rejects_bad_engines() {
        for (queues, doorbells, max, want) in [
            (0u16, 0usize, 256u16, TransportError::QueueCount(0)),
            (64, 64, 256, TransportError::QueueCount(64)),
            (
                2,
                1,
                256,
                TransportError::Doorbells {
                    doorbells: 1,
                    queues: 2,
                },
            ),
            (1, 1, 100, TransportError::QueueSizeMax(100)),
            (1, 1, 0, TransportError::QueueSizeMax(0)),
        ] {
            let engine = FakeEngine {
                state: Arc::default(),
                doorbells: (0..doorbells)
                    .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
                    .collect(),
                cfg: abi::DeviceConfig {
                    num_queues: queues,
                    queue_size_max: max,
                    ..Default::default()
                },
            };
            let err =
                Transport::new(Box::new(engine), Arc::new(FakeController::default())).unwrap_err();
            assert_eq!(err, want);
        }
    }

    #[test]
    fn arbitrary_accesses_never_panic() {
        let mut rig = rig(abi::bar0::MAX_QUEUES);
        // A deterministic xorshift stream of offsets, widths and values.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200_000 {
            let r = next();
            let offset = match r % 4 {
                0 => r >> 40 & 0x3f,
                1 => r >> 32 & 0x7fff,
                2 => (r >> 32 & 0xfff) | 0x3000,
                _ => r >> 8,
            };
            let len = [1usize, 2, 3, 4, 5, 8, 16, 0][(r >> 4) as usize % 8];
            let mut buf = vec![0u8; len];
            let value = next().to_le_bytes();
            for (i, b) in buf.iter_mut().enumerate() {
                *b = value[i % 8];
            }
            if r & 8 == 0 {
                rig.t.bar_read(0, offset, &mut buf);
            } else {
                rig.t.bar_write((r >> 20) as u8 % 2, offset, &buf);
            }
            let cfg_off = r >> 48 & 0x1ff;
            if r & 0x10 == 0 {
                rig.t.config_read(cfg_off, &mut buf);
            } else if cfg_off != reg::COMMAND {
                rig.t.config_write(cfg_off, &buf);
            }
        }
    }
}
