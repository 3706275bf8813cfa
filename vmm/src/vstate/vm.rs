//! The KVM VM: guest memory, the in-kernel irqchip (PIC + IOAPIC + LAPICs) and the PIT.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{KvmContext, KvmError};

/// The TSS needs three pages below 4 GiB that the guest never uses (Intel VMX requirement).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// A created VM with its memory registered.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
}

impl Vm {
    /// Create a VM over `memory`, with an in-kernel irqchip and PIT.
    pub fn new(kvm: Kvm, memory: GuestMemoryMmap) -> Result<Self, KvmError> {
        let fd = kvm.create_vm().kvm("KVM_CREATE_VM")?;
        for (slot, region) in memory.iter().enumerate() {
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `memory`, which this struct keeps
            // alive (and mapped) for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(mem_region) }.kvm("KVM_SET_USER_MEMORY_REGION")?;
        }
        fd.set_tss_address(TSS_ADDRESS).kvm("KVM_SET_TSS_ADDR")?;
        fd.create_irq_chip().kvm("KVM_CREATE_IRQCHIP")?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).kvm("KVM_CREATE_PIT2")?;
        Ok(Self {
            kvm,
            fd: Arc::new(fd),
            memory,
        })
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The VM file descriptor, shared with devices that change interrupt routes and
    /// ioeventfds while the VM runs.
    pub fn shared_fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Bytes of guest RAM currently resident in host memory (pages the guest has touched).
    pub fn guest_resident_bytes(&self) -> std::io::Result<u64> {
        resident_bytes(&self.memory)
    }

    /// Make writes to `event` raise interrupt line `gsi` in the in-kernel irqchip.
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.fd.register_irqfd(event, gsi).kvm("KVM_IRQFD")
    }
}

/// Bytes of `memory` currently resident in host memory.
pub fn resident_bytes(memory: &GuestMemoryMmap) -> std::io::Result<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = usize::try_from(page).map_err(|_| std::io::Error::last_os_error())?;
    let mut resident = 0u64;
    for region in memory.iter() {
        let len = region.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: the range is one live mapping owned by `memory`; `vec` has one byte per page
        // of it, as mincore requires.
        let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        resident += vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page as u64;
    }
    Ok(resident)
}
