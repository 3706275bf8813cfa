//! Address buses: map a guest address range (port I/O or MMIO) to a device.
//!
//! Devices see offsets inside their own range, never absolute addresses, so the same device can
//! sit at any address (the rust-vmm / Firecracker convention).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a bus.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` inside the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` inside the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A zero-length range.
    #[error("bus range at {0:#x} has zero length")]
    ZeroLength(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

/// Shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A set of non-overlapping address ranges, each served by a device.
///
/// Ranges can be added and removed while vCPUs dispatch through the bus (a PCI BAR moves when
/// the guest rewrites it): the map sits behind a read-write lock that is held only to find the
/// device, never while the device handles the access.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<Range, SharedDevice>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.map().keys().map(|r| (r.base, r.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Range, SharedDevice>> {
        self.devices.read().unwrap_or_else(|p| p.into_inner())
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<Range, SharedDevice>> {
        self.devices.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Place `device` at `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let mut map = self.map_mut();
        let overlaps = map
            .keys()
            .any(|r| base < r.base.saturating_add(r.len) && r.base < end);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        map.insert(Range { base, len }, device);
        Ok(())
    }

    /// Remove the range that starts at `base`; returns its device.
    pub fn remove(&self, base: u64) -> Option<SharedDevice> {
        let mut map = self.map_mut();
        let key = *map.keys().find(|r| r.base == base)?;
        map.remove(&key)
    }

    fn resolve(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let map = self.map();
        let (range, dev) = map
            .range(
                ..=Range {
                    base: addr,
                    len: u64::MAX,
                },
            )
            .next_back()?;
        let offset = addr - range.base;
        (offset < range.len).then(|| (offset, dev.clone()))
    }

    /// Dispatch a guest read. Returns false when no device claims `addr` (the caller decides
    /// what an unclaimed read returns; real hardware floats the bus to all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                lock(&dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a guest write. Returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                lock(&dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Lock a device, surviving a poisoned mutex: a device whose handler panicked on another thread
/// keeps its last state; the VMM does not cascade the panic into every vCPU.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_offset() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fa, &mut buf));
        assert_eq!(buf, [2]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().unwrap().last_write, Some((7, vec![7])));
        assert!(!bus.read(0x400, &mut buf));
        assert!(!bus.read(0x3f7, &mut buf));
    }

    #[test]
    fn rejects_overlap_and_empty() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x10, 0x10)
            .unwrap();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        assert_eq!(
            bus.insert(dev.clone(), 0x1f, 2),
            Err(BusError::Overlap { base: 0x1f, len: 2 })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0x8, 0x9),
            Err(BusError::Overlap {
                base: 0x8,
                len: 0x9
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0x30, 0),
            Err(BusError::ZeroLength(0x30))
        );
        bus.insert(dev, 0x20, 1).unwrap();
    }

    #[test]
    fn ranges_can_move() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        assert!(bus.remove(0x1001).is_none());
        assert!(bus.remove(0x1000).is_some());
        assert!(!bus.write(0x1000, &[1]));
        bus.insert(dev.clone(), 0x2000, 0x100).unwrap();
        assert!(bus.write(0x2010, &[1]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0x10, vec![1])));
        assert!(bus.remove(0x1000).is_none());
    }
}
