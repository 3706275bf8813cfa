//! PCI bus 0: up to 32 single-function devices, their BAR placement, and the mapping of each
//! decoded memory BAR onto the MMIO bus together with its ioeventfds.

use std::sync::{Arc, Mutex};

use aiodma_device::pci::{command, BarKind, BarRegion, NUM_BARS};
use vmm_sys_util::eventfd::EventFd;

use super::{lock_function, IoEventRegistrar, SharedFunction};
use crate::devices::bus::{Bus, BusDevice, BusError};

/// Devices on one bus.
pub const DEVICES_PER_BUS: usize = 32;

/// Errors building the PCI bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciBusError {
    /// The device number is taken or out of range.
    #[error("PCI device slot {0} is taken or out of range")]
    Slot(u8),
    /// The BARs do not fit in the PCI MMIO window.
    #[error("PCI device {device} BAR {bar} ({size:#x} bytes) does not fit in the MMIO window")]
    WindowFull {
        /// Device number.
        device: u8,
        /// BAR index.
        bar: u8,
        /// BAR size.
        size: u64,
    },
    /// A BAR could not be placed on the MMIO bus.
    #[error("PCI device {device} BAR {bar}: {source}")]
    Map {
        /// Device number.
        device: u8,
        /// BAR index.
        bar: u8,
        /// The bus error.
        #[source]
        source: BusError,
    },
}

/// One BAR of one function, as an MMIO bus device.
struct BarDevice {
    function: SharedFunction,
    bar: u8,
}

impl BusDevice for BarDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock_function(&self.function).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock_function(&self.function).bar_write(self.bar, offset, data);
    }
}

/// Ioeventfds of one BAR: absolute (or BAR-relative) address and eventfd.
type IoEventList = Vec<(u64, Arc<EventFd>)>;

/// A BAR currently on the MMIO bus.
struct Mapping {
    region: BarRegion,
    ioevents: IoEventList,
}

struct Slot {
    function: SharedFunction,
    mapped: Vec<Mapping>,
}

/// PCI bus 0.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    mmio: Arc<Bus>,
    ioevents: Arc<dyn IoEventRegistrar>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let present: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|_| i))
            .collect();
        f.debug_struct("PciRoot")
            .field("devices", &present)
            .finish_non_exhaustive()
    }
}

impl PciRoot {
    /// An empty bus whose BARs go on `mmio`, with ioeventfds registered through `ioevents`.
    pub fn new(mmio: Arc<Bus>, ioevents: Arc<dyn IoEventRegistrar>) -> Self {
        Self {
            slots: (0..DEVICES_PER_BUS).map(|_| None).collect(),
            mmio,
            ioevents,
        }
    }

    /// Plug `function` in as function 0 of device `device`.
    pub fn add(&mut self, device: u8, function: SharedFunction) -> Result<(), PciBusError> {
        let slot = self
            .slots
            .get_mut(usize::from(device))
            .filter(|s| s.is_none())
            .ok_or(PciBusError::Slot(device))?;
        *slot = Some(Slot {
            function,
            mapped: Vec::new(),
        });
        Ok(())
    }

    /// Do what firmware does before the OS runs: place every memory BAR, naturally aligned,
    /// from `window_start` on (at most `window_size` bytes), enable memory decoding of the
    /// functions that have one, and map them.
    pub fn assign_bars(&mut self, window_start: u64, window_size: u64) -> Result<(), PciBusError> {
        let window_end = window_start.saturating_add(window_size);
        let mut next = window_start;
        for device in 0..self.slots.len() {
            let Some(slot) = &self.slots[device] else {
                continue;
            };
            let mut f = lock_function(&slot.function);
            let mut any = false;
            for bar in 0..NUM_BARS {
                let Some((size, BarKind::Memory { .. })) = f.config_space().bar(bar) else {
                    continue;
                };
                let addr = next.next_multiple_of(size);
                let full = || PciBusError::WindowFull {
                    device: device as u8,
                    bar: bar as u8,
                    size,
                };
                let end = addr.checked_add(size).ok_or_else(full)?;
                if end > window_end {
                    return Err(full());
                }
                // Only fails for an undeclared BAR, which `bar()` just ruled out.
                if f.config_space_mut().set_bar_address(bar, addr).is_ok() {
                    log::debug!("PCI 00:{device:02x}.0 BAR{bar}: {addr:#x} ({size:#x} bytes)");
                    any = true;
                    next = end;
                }
            }
            if any {
                let cmd = f.config_space().command() | command::MEMORY;
                f.config_space_mut().set_command(cmd);
            }
            drop(f);
            self.sync(device)?;
        }
        Ok(())
    }

    /// Configuration read: all ones for an absent device, bus or function.
    pub fn config_read(&mut self, bus: u8, device: u8, function: u8, offset: u64, data: &mut [u8]) {
        match self.function(bus, device, function) {
            Some(f) => lock_function(&f).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Configuration write; then the function's BAR mappings follow what it now decodes.
    pub fn config_write(&mut self, bus: u8, device: u8, function: u8, offset: u64, data: &[u8]) {
        if let Some(f) = self.function(bus, device, function) {
            lock_function(&f).config_write(offset, data);
            if let Err(e) = self.sync(usize::from(device)) {
                log::warn!("{e}");
            }
        }
    }

    fn function(&self, bus: u8, device: u8, function: u8) -> Option<SharedFunction> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots
            .get(usize::from(device))?
            .as_ref()
            .map(|s| s.function.clone())
    }

    /// The MMIO address of `device`'s BAR `bar`, while it is mapped.
    pub fn bar_address(&self, device: u8, bar: u8) -> Option<u64> {
        self.slots
            .get(usize::from(device))?
            .as_ref()?
            .mapped
            .iter()
            .find(|m| m.region.index == bar)
            .map(|m| m.region.addr)
    }

    /// Make the MMIO bus and the ioeventfds match the BARs `device` decodes now.
    fn sync(&mut self, device: usize) -> Result<(), PciBusError> {
        let Some(slot) = self.slots.get_mut(device).and_then(Option::as_mut) else {
            return Ok(());
        };
        let (wanted, ioevents): (Vec<BarRegion>, Vec<IoEventList>) = {
            let f = lock_function(&slot.function);
            let wanted: Vec<BarRegion> = f
                .decoded_bars()
                .into_iter()
                .filter(|r| matches!(r.kind, BarKind::Memory { .. }))
                .collect();
            let fds = wanted.iter().map(|r| f.ioeventfds(r.index)).collect();
            (wanted, fds)
        };
        // Unmap what moved or stopped decoding.
        let mut kept = Vec::with_capacity(slot.mapped.len());
        for m in slot.mapped.drain(..) {
            if wanted.contains(&m.region) {
                kept.push(m);
                continue;
            }
            for (addr, fd) in &m.ioevents {
                if let Err(e) = self.ioevents.unregister(*addr, fd) {
                    log::warn!("PCI {device:02x}: ioeventfd at {addr:#x}: unregister: {e}");
                }
            }
            self.mmio.remove(m.region.addr);
            log::debug!(
                "PCI 00:{device:02x}.0 BAR{} unmapped from {:#x}",
                m.region.index,
                m.region.addr
            );
        }
        slot.mapped = kept;
        // Map what is new.
        let mut result = Ok(());
        for (region, fds) in wanted.into_iter().zip(ioevents) {
            if slot.mapped.iter().any(|m| m.region == region) {
                continue;
            }
            let dev = Arc::new(Mutex::new(BarDevice {
                function: slot.function.clone(),
                bar: region.index,
            }));
            if let Err(source) = self.mmio.insert(dev, region.addr, region.size) {
                // Leave it unmapped: the guest put it on top of another BAR.
                result = Err(PciBusError::Map {
                    device: device as u8,
                    bar: region.index,
                    source,
                });
                continue;
            }
            let mut registered = Vec::with_capacity(fds.len());
            for (offset, fd) in fds {
                let Some(addr) = region.addr.checked_add(offset) else {
                    continue;
                };
                match self.ioevents.register(addr, &fd) {
                    Ok(()) => registered.push((addr, fd)),
                    // The write then reaches the function, which signals the same eventfd.
                    Err(e) => log::warn!("PCI {device:02x}: ioeventfd at {addr:#x}: {e}"),
                }
            }
            log::debug!(
                "PCI 00:{device:02x}.0 BAR{} mapped at {:#x} with {} ioeventfd(s)",
                region.index,
                region.addr,
                registered.len()
            );
            slot.mapped.push(Mapping {
                region,
                ioevents: registered,
            });
        }
        result
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use aiodma_device::pci::{reg, ConfigSpace, Header, PciFunction};
    use std::io;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// Accepts every ioeventfd and remembers nothing.
    pub(crate) struct NoIoEvents;

    impl IoEventRegistrar for NoIoEvents {
        fn register(&self, _addr: u64, _fd: &EventFd) -> io::Result<()> {
            Ok(())
        }
        fn unregister(&self, _addr: u64, _fd: &EventFd) -> io::Result<()> {
            Ok(())
        }
    }

    /// Records the registered ioeventfd addresses.
    #[derive(Default)]
    struct IoEventLog(Mutex<Vec<u64>>);

    impl IoEventRegistrar for IoEventLog {
        fn register(&self, addr: u64, _fd: &EventFd) -> io::Result<()> {
            let mut v = self.0.lock().unwrap();
            if v.contains(&addr) {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            v.push(addr);
            Ok(())
        }
        fn unregister(&self, addr: u64, _fd: &EventFd) -> io::Result<()> {
            let mut v = self.0.lock().unwrap();
            let i = v
                .iter()
                .position(|&a| a == addr)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
            v.remove(i);
            Ok(())
        }
    }

    /// A function with one 16 KiB memory BAR whose first byte is a register, and one doorbell at
    /// BAR offset 0x2000.
    struct Fake {
        config: ConfigSpace,
        reg: u8,
        doorbell: Arc<EventFd>,
    }

    impl Fake {
        fn new() -> Self {
            let mut config = ConfigSpace::new(&Header {
                vendor_id: 0x1234,
                device_id: 0x5678,
                ..Default::default()
            });
            config
                .add_bar(0, 0x4000, aiodma_device::pci::BarKind::MEMORY32)
                .unwrap();
            Self {
                config,
                reg: 0x5a,
                doorbell: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            }
        }
    }

    impl PciFunction for Fake {
        fn config_space(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_space_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
            data.fill(if offset == 0 { self.reg } else { 0 });
        }
        fn bar_write(&mut self, _bar: u8, offset: u64, data: &[u8]) {
            if offset == 0 {
                self.reg = data[0];
            }
        }
        fn ioeventfds(&self, _bar: u8) -> Vec<(u64, Arc<EventFd>)> {
            vec![(0x2000, self.doorbell.clone())]
        }
    }

    fn rig() -> (PciRoot, Arc<Bus>, Arc<IoEventLog>) {
        let mmio = Arc::new(Bus::new());
        let log = Arc::new(IoEventLog::default());
        let mut root = PciRoot::new(mmio.clone(), log.clone());
        root.add(0, Arc::new(Mutex::new(super::super::HostBridge::new())))
            .unwrap();
        root.add(1, Arc::new(Mutex::new(Fake::new()))).unwrap();
        root.add(3, Arc::new(Mutex::new(Fake::new()))).unwrap();
        (root, mmio, log)
    }

    fn read_byte(bus: &Bus, addr: u64) -> Option<u8> {
        let mut b = [0u8];
        bus.read(addr, &mut b).then_some(b[0])
    }

    #[test]
    fn slots_are_checked() {
        let (mut root, ..) = rig();
        assert_eq!(
            root.add(1, Arc::new(Mutex::new(Fake::new()))),
            Err(PciBusError::Slot(1))
        );
        assert_eq!(
            root.add(32, Arc::new(Mutex::new(Fake::new()))),
            Err(PciBusError::Slot(32))
        );
    }

    #[test]
    fn firmware_places_bars_in_the_window() {
        let (mut root, mmio, log) = rig();
        root.assign_bars(0xc000_0000, 0x1000_0000).unwrap();
        assert_eq!(root.bar_address(1, 0), Some(0xc000_0000));
        assert_eq!(root.bar_address(3, 0), Some(0xc000_4000));
        assert_eq!(read_byte(&mmio, 0xc000_0000), Some(0x5a));
        assert_eq!(read_byte(&mmio, 0xc000_8000), None);
        assert_eq!(*log.0.lock().unwrap(), vec![0xc000_2000, 0xc000_6000]);
        let mut cmd = [0u8; 2];
        root.config_read(0, 1, 0, reg::COMMAND, &mut cmd);
        assert_eq!(u16::from_le_bytes(cmd) & command::MEMORY, command::MEMORY);
        // The host bridge has no BARs and keeps decoding off.
        root.config_read(0, 0, 0, reg::COMMAND, &mut cmd);
        assert_eq!(u16::from_le_bytes(cmd), 0);

        let (mut small, ..) = rig();
        assert_eq!(
            small.assign_bars(0xc000_0000, 0x6000),
            Err(PciBusError::WindowFull {
                device: 3,
                bar: 0,
                size: 0x4000
            })
        );
    }

    #[test]
    fn bar_relocation_moves_bus_range_and_ioeventfds() {
        let (mut root, mmio, log) = rig();
        root.assign_bars(0xc000_0000, 0x1000_0000).unwrap();
        // Linux sizing: decoding off, all ones, read, restore, decoding on.
        root.config_write(0, 1, 0, reg::COMMAND, &[0, 0]);
        assert_eq!(read_byte(&mmio, 0xc000_0000), None);
        assert_eq!(*log.0.lock().unwrap(), vec![0xc000_6000]);
        root.config_write(0, 1, 0, reg::BAR0, &[0xff; 4]);
        let mut b = [0u8; 4];
        root.config_read(0, 1, 0, reg::BAR0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xffff_c000);
        root.config_write(0, 1, 0, reg::BAR0, &0xc000_0000u32.to_le_bytes());
        assert_eq!(root.bar_address(1, 0), None);
        root.config_write(0, 1, 0, reg::COMMAND, &command::MEMORY.to_le_bytes());
        assert_eq!(root.bar_address(1, 0), Some(0xc000_0000));
        assert_eq!(read_byte(&mmio, 0xc000_0000), Some(0x5a));
        // Relocation while decoding: written as two 16-bit halves.
        root.config_write(0, 1, 0, reg::BAR0, &0x0000u16.to_le_bytes());
        root.config_write(0, 1, 0, reg::BAR0 + 2, &0xd000u16.to_le_bytes());
        assert_eq!(root.bar_address(1, 0), Some(0xd000_0000));
        assert_eq!(read_byte(&mmio, 0xc000_0000), None);
        assert!(mmio.write(0xd000_0000, &[0x77]));
        assert_eq!(read_byte(&mmio, 0xd000_0000), Some(0x77));
        let mut fds = log.0.lock().unwrap().clone();
        fds.sort();
        assert_eq!(fds, vec![0xc000_6000, 0xd000_2000]);
        // A move on top of the other device's BAR is refused: the BAR stays unmapped.
        root.config_write(0, 1, 0, reg::BAR0, &0xc000_4000u32.to_le_bytes());
        assert_eq!(root.bar_address(1, 0), None);
        assert_eq!(
            read_byte(&mmio, 0xc000_4000),
            Some(0x5a),
            "device 3 still there"
        );
        assert_eq!(*log.0.lock().unwrap(), vec![0xc000_6000]);
        // Moving away again maps it.
        root.config_write(0, 1, 0, reg::BAR0, &0xc100_0000u32.to_le_bytes());
        assert_eq!(root.bar_address(1, 0), Some(0xc100_0000));
    }
}
