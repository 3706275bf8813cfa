//! The common configuration registers (SPEC 3): feature negotiation, the status handshake,
//! reset, and the queue registers, as a state machine over `Transport`'s fields.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{lock, Interrupts, QueueRegs, Transport};
use crate::abi::{self, common, status, NO_VECTOR};
use crate::engine::QueueConfig;
use crate::ratelimit::warn_limited;

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

impl Transport {
    pub(super) fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    pub(super) fn common_read(&mut self, off: u64, len: usize) -> Option<u64> {
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

    pub(super) fn common_write(&mut self, off: u64, len: usize, value: u64) {
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
    pub(super) fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix_vectors() {
            vector
        } else {
            NO_VECTOR
        }
    }

    /// The selected queue, if its registers may be written now.
    pub(super) fn writable_queue(&mut self) -> Option<&mut QueueRegs> {
        let driver_ok = self.status & status::DRIVER_OK != 0;
        self.queues
            .get_mut(usize::from(self.queue_select))
            .filter(|q| !q.enabled && !driver_ok)
    }

    pub(super) fn read_status(&mut self) -> u8 {
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

    pub(super) fn features_acceptable(&mut self) -> bool {
        let unknown = self.driver_features & !self.device_features;
        if unknown != 0 {
            warn_limited!(
                self.guest_warnings,
                "driver accepted features {unknown:#x} the device does not offer"
            );
            return false;
        }
        if self.driver_features & abi::feature::VERSION_1 == 0 {
            warn_limited!(self.guest_warnings, "driver did not accept VERSION_1");
            return false;
        }
        true
    }

    pub(super) fn write_status(&mut self, value: u8) {
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
            warn_limited!(self.guest_warnings, "DRIVER_OK without FEATURES_OK ignored");
            new &= !status::DRIVER_OK;
        }
        self.status = new;
        if activate && new & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    pub(super) fn activate(&mut self) {
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
            bus_master: self.bus_master.clone(),
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
                warn_limited!(self.guest_warnings, "device activation failed: {e}");
                sink.live.store(false, Ordering::Release);
                self.activation_failed = true;
                let vector = self.config_vector.load(Ordering::Acquire);
                // An MSI is a memory write: none while bus mastering is off (SPEC 1).
                if vector != NO_VECTOR && self.bus_master.load(Ordering::Acquire) {
                    lock(&self.msix).signal(vector);
                }
            }
        }
    }

    /// Writing 0 to DEVICE_STATUS. An engine that was started must finish first: until then
    /// the status reads the old value without DRIVER_OK, never 0 (FEATURES_OK stays set, as
    /// DRIVER_OK needs it). An engine never started has nothing in flight, so the reset is
    /// immediate and the engine is not involved.
    pub(super) fn begin_reset(&mut self) {
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
    pub(super) fn finish_reset(&mut self) {
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
