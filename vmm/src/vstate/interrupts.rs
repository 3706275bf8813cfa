//! KVM side of PCI interrupts and doorbells: the GSI routing table with one MSI route per
//! MSI-X vector, one irqfd per vector, and MMIO ioeventfds.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so every update writes KVM's default routes
//! for GSIs 0–23 (PIC + IOAPIC, as `kvm_setup_default_irq_routing` installs them: COM1 and the
//! PIT keep working) followed by the MSI routes installed so far, vector `v` on GSI
//! [`MSI_GSI_BASE`] + `v`. Each vector's irqfd is registered once at start; a trigger is one
//! eventfd write, which KVM turns into the MSI without a trip through this process.
//!
//! One [`MsiRouting`] owns the whole table, so a VM has one MSI-X function (the DMA device);
//! a second function would need the table shared between them.

use std::io;
use std::sync::{Arc, Mutex};

use aiodma_device::pci::msix::{MsiController, MsiError, MsiMessage};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{KvmContext, KvmError};
use crate::devices::pci::IoEventRegistrar;

/// Pins of KVM's in-kernel IOAPIC (GSIs 0..24).
pub const IOAPIC_PINS: u32 = 24;
/// GSIs 0..16 are also wired to the two 8259 PICs.
pub const PIC_PINS: u32 = 16;
/// GSI of MSI-X vector 0; vector `v` uses `MSI_GSI_BASE + v`.
pub const MSI_GSI_BASE: u32 = IOAPIC_PINS;

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.addr as u32;
    e.u.msi.address_hi = (msg.addr >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

/// KVM's default x86 routes: GSI `n` to IOAPIC pin `n` for n < 24, and for n < 16 also to
/// the master (n < 8) or slave PIC, pin n % 8.
pub fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::with_capacity((IOAPIC_PINS + PIC_PINS) as usize);
    for gsi in 0..IOAPIC_PINS {
        routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < PIC_PINS {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(irqchip_route(gsi, chip, gsi % 8));
        }
    }
    routes
}

/// The full table: the default routes, then vector `v`'s MSI route on `MSI_GSI_BASE + v` for
/// every vector that has one.
pub fn routing_table(msi: &[Option<MsiMessage>]) -> Vec<kvm_irq_routing_entry> {
    let mut table = default_routes();
    table.extend(
        msi.iter()
            .enumerate()
            .filter_map(|(v, m)| m.map(|m| msi_route(MSI_GSI_BASE + v as u32, m))),
    );
    table
}

/// Write `table` into KVM.
fn install(vm: &VmFd, table: &[kvm_irq_routing_entry]) -> Result<(), KvmError> {
    let routing = KvmIrqRouting::from_entries(table).map_err(|_| KvmError {
        ioctl: "KVM_SET_GSI_ROUTING (table too large)",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    vm.set_gsi_routing(&routing).kvm("KVM_SET_GSI_ROUTING")
}

/// MSI-X delivery for one PCI function: the GSI routes of its vectors and their irqfds.
pub struct MsiRouting {
    vm: Arc<VmFd>,
    irqfds: Vec<EventFd>,
    /// Routes installed in KVM, per vector.
    routes: Mutex<Vec<Option<MsiMessage>>>,
}

impl std::fmt::Debug for MsiRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiRouting")
            .field("vectors", &self.irqfds.len())
            .finish_non_exhaustive()
    }
}

impl MsiRouting {
    /// `vectors` irqfds on GSIs `MSI_GSI_BASE..`, and the routing table with the default
    /// routes only (a vector gets its route when the guest unmasks it).
    pub fn new(vm: Arc<VmFd>, vectors: u16) -> Result<Self, KvmError> {
        install(&vm, &default_routes())?;
        let mut irqfds = Vec::with_capacity(usize::from(vectors));
        for v in 0..u32::from(vectors) {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| KvmError {
                ioctl: "eventfd for an MSI-X irqfd",
                source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
            vm.register_irqfd(&fd, MSI_GSI_BASE + v)
                .kvm("KVM_IRQFD (MSI-X vector)")?;
            irqfds.push(fd);
        }
        Ok(Self {
            vm,
            irqfds,
            routes: Mutex::new(vec![None; usize::from(vectors)]),
        })
    }
}

impl MsiController for MsiRouting {
    fn set_route(&self, vector: u16, addr: u64, data: u32, masked: bool) -> Result<(), MsiError> {
        // A masked vector is never triggered: its route is installed when it is unmasked
        // (the device calls again then), so programming a masked entry costs no ioctl.
        if masked {
            return Ok(());
        }
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let msg = MsiMessage { addr, data };
        let slot = routes
            .get_mut(usize::from(vector))
            .ok_or(MsiError::NoSuchVector(vector))?;
        if *slot == Some(msg) {
            return Ok(());
        }
        let old = slot.replace(msg);
        if let Err(e) = install(&self.vm, &routing_table(&routes)) {
            routes[usize::from(vector)] = old;
            return Err(MsiError::Route {
                vector,
                reason: e.to_string(),
            });
        }
        log::debug!("MSI-X vector {vector}: route {addr:#x}/{data:#x}");
        Ok(())
    }

    fn trigger(&self, vector: u16) {
        match self.irqfds.get(usize::from(vector)) {
            Some(fd) => {
                if let Err(e) = fd.write(1) {
                    log::warn!("MSI-X vector {vector}: irqfd write: {e}");
                }
            }
            None => log::warn!("MSI-X vector {vector} has no irqfd"),
        }
    }
}

/// MMIO ioeventfds through `KVM_IOEVENTFD`, matching writes of any length and value.
#[derive(Debug)]
pub struct KvmIoEvents {
    vm: Arc<VmFd>,
}

impl KvmIoEvents {
    /// Ioeventfds of `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

impl IoEventRegistrar for KvmIoEvents {
    fn register(&self, addr: u64, fd: &EventFd) -> io::Result<()> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }

    fn unregister(&self, addr: u64, fd: &EventFd) -> io::Result<()> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chip(e: &kvm_irq_routing_entry) -> (u32, u32, u32) {
        assert_eq!(e.type_, KVM_IRQ_ROUTING_IRQCHIP);
        // SAFETY: `type_` says the irqchip member is the one in use.
        let c = unsafe { e.u.irqchip };
        (e.gsi, c.irqchip, c.pin)
    }

    #[test]
    fn default_routes_match_kvm() {
        let routes = default_routes();
        assert_eq!(routes.len(), 40);
        let all: Vec<_> = routes.iter().map(chip).collect();
        assert!(all.contains(&(0, KVM_IRQCHIP_IOAPIC, 0)));
        assert!(all.contains(&(0, KVM_IRQCHIP_PIC_MASTER, 0)));
        assert!(all.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(all.contains(&(4, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(all.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(all.contains(&(15, KVM_IRQCHIP_PIC_SLAVE, 7)));
        assert!(all.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        for gsi in 16..24 {
            assert_eq!(all.iter().filter(|r| r.0 == gsi).count(), 1, "GSI {gsi}");
        }
        for gsi in 0..16 {
            assert_eq!(all.iter().filter(|r| r.0 == gsi).count(), 2, "GSI {gsi}");
        }
    }

    #[test]
    fn routing_table_appends_installed_msi_routes() {
        let msg = |addr, data| Some(MsiMessage { addr, data });
        let table = routing_table(&[msg(0xfee0_0000, 0x41), None, msg(0x1_fee0_1000, 0x4022)]);
        assert_eq!(table.len(), 42);
        let msi: Vec<_> = table
            .iter()
            .filter(|e| e.type_ == KVM_IRQ_ROUTING_MSI)
            .map(|e| {
                // SAFETY: `type_` says the msi member is the one in use.
                let m = unsafe { e.u.msi };
                (e.gsi, m.address_lo, m.address_hi, m.data)
            })
            .collect();
        assert_eq!(
            msi,
            vec![(24, 0xfee0_0000, 0, 0x41), (26, 0xfee0_1000, 1, 0x4022)]
        );
        assert!(table[..40]
            .iter()
            .all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        assert_eq!(routing_table(&[]).len(), 40);
    }
}
