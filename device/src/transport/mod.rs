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
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::abi::{self, bar0, common, NO_VECTOR};
use crate::engine::QueueEngine;
use crate::pci::config::{BarKind, ConfigSpace, Header};
use crate::pci::msix::{self, Msix};
use crate::pci::{command, BarRegion, PciError, PciFunction};
use crate::ratelimit::RateLimit;

pub use crate::pci::msix::{MsiController, MsiError};

use interrupts::Interrupts;

mod common_config;
mod interrupts;
#[cfg(test)]
mod tests;

/// At most this many guest-provoked warnings are logged per [`GUEST_WARNING_PERIOD`].
const GUEST_WARNING_BURST: u32 = 5;
/// See [`GUEST_WARNING_BURST`].
const GUEST_WARNING_PERIOD: Duration = Duration::from_secs(60);

/// The BAR holding every register.
pub const BAR0_INDEX: u8 = 0;

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
    /// Warnings the guest can provoke in a loop (bad negotiation, failed activation).
    guest_warnings: RateLimit,
    /// The command register's Bus Master Enable, shared with the interrupt sink.
    bus_master: Arc<AtomicBool>,
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
        if !max.is_power_of_two() || max > abi::ring::MAX_QUEUE_SIZE {
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
        // The command register starts with Bus Master Enable clear: no DMA until the driver
        // sets it (Linux: pci_set_master in probe).
        let mut engine = engine;
        let bus_master = config.command() & command::BUS_MASTER != 0;
        engine.set_bus_master(bus_master);
        Ok(Self {
            engine,
            config,
            msix_cap: u64::from(msix_cap),
            msix: Arc::new(Mutex::new({
                let mut msix = Msix::new(vectors, msi);
                msix.set_bus_master(bus_master);
                msix
            })),
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
            guest_warnings: RateLimit::new(GUEST_WARNING_BURST, GUEST_WARNING_PERIOD),
            bus_master: Arc::new(AtomicBool::new(bus_master)),
        })
    }

    /// Number of MSI-X vectors: one per queue plus the configuration vector.
    pub fn msix_vectors(&self) -> u16 {
        self.num_queues + 1
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
        let bus_master = self.config.command() & command::BUS_MASTER != 0;
        self.config.write(offset, data);
        let now = self.config.command() & command::BUS_MASTER != 0;
        if now != bus_master {
            log::debug!("bus mastering {}", if now { "enabled" } else { "disabled" });
            // Setting: the sink first, so the completions the engine was holding can signal.
            // Clearing: the engine first (it returns once no used-ring write is in progress),
            // then the sink, which drops any interrupt still on its way.
            if now {
                self.bus_master.store(true, Ordering::Release);
                lock(&self.msix).set_bus_master(true);
                self.engine.set_bus_master(true);
            } else {
                self.engine.set_bus_master(false);
                self.bus_master.store(false, Ordering::Release);
                lock(&self.msix).set_bus_master(false);
            }
        }
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
