//! Register state for entering the kernel through the 64-bit boot protocol.
//!
//! The `boot_*`/`configure_*` functions only compute state (and write the tables it points to
//! into guest memory) so they can be tested without `/dev/kvm`; the `setup_*` functions are
//! the thin ioctl wrappers.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::gdt::{self, kvm_segment_from_gdt, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

/// Errors setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_SET_REGS failed.
    #[error("failed to set general purpose registers: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("failed to set FPU registers: {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS failed.
    #[error("failed to get special registers: {0}")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("failed to set special registers: {0}")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// The descriptor tables could not be written.
    #[error(transparent)]
    Gdt(#[from] gdt::Error),
    /// The boot page tables could not be written.
    #[error("failed to write the boot page tables to guest memory: {0}")]
    WritePageTables(#[source] GuestMemoryError),
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NW: u64 = 1 << 29;
const X86_CR0_CD: u64 = 1 << 30;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Bit 1 of RFLAGS is reserved and must be set; interrupts stay disabled as the protocol
/// demands.
const RFLAGS_RESERVED: u64 = 0x2;

const PAGE_PRESENT: u64 = 1 << 0;
const PAGE_RW: u64 = 1 << 1;
const PAGE_PS: u64 = 1 << 7;
const ENTRIES_PER_TABLE: u64 = 512;
const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// x87 control word after FNINIT: all exceptions masked, 64-bit precision, round to nearest.
const FPU_FCW: u16 = 0x37f;
/// MXCSR power-on value: all SIMD exceptions masked.
const FPU_MXCSR: u32 = 0x1f80;

/// General purpose registers at the 64-bit entry: `%rsi` points at `boot_params`.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU state matching what FNINIT and the SSE power-on defaults would produce.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_FCW,
        mxcsr: FPU_MXCSR,
        ..Default::default()
    }
}

/// Writes a 1 GiB identity mapping built from 2 MiB pages and returns the value for CR3.
/// The decompressor needs its image, the zero page and the command line mapped 1:1 before
/// it builds its own tables; the first GiB covers all of them.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<u64, Error> {
    let mut pml4 = [0u64; ENTRIES_PER_TABLE as usize];
    pml4[0] = PDPTE_START | PAGE_PRESENT | PAGE_RW;
    let mut pdpte = [0u64; ENTRIES_PER_TABLE as usize];
    pdpte[0] = PDE_START | PAGE_PRESENT | PAGE_RW;
    let mut pde = [0u64; ENTRIES_PER_TABLE as usize];
    for (i, entry) in (0u64..).zip(pde.iter_mut()) {
        *entry = (i * HUGE_PAGE_SIZE) | PAGE_PRESENT | PAGE_RW | PAGE_PS;
    }

    for (table, addr) in [(pml4, PML4_START), (pdpte, PDPTE_START), (pde, PDE_START)] {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(Error::WritePageTables)?;
    }
    Ok(PML4_START)
}

/// Writes the GDT, IDT and page tables into `mem` and updates `sregs` for long mode with
/// paging on, flat segments loaded and CR3 pointing at the identity map.
pub fn configure_sregs(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), Error> {
    gdt::write_gdt_table(&BOOT_GDT, mem)?;
    gdt::write_idt_value(0, mem)?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    let code = kvm_segment_from_gdt(BOOT_GDT[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = kvm_segment_from_gdt(BOOT_GDT[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = kvm_segment_from_gdt(BOOT_GDT[usize::from(TSS_INDEX)], TSS_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr3 = write_page_tables(mem)?;
    sregs.cr4 |= X86_CR4_PAE;
    // The reset value of CR0 has caching disabled (CD|NW); leaving it would make the
    // decompressor crawl wherever the hypervisor honours guest CD, so clear it like firmware
    // does before handing over.
    sregs.cr0 &= !(X86_CR0_CD | X86_CR0_NW);
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// Loads the boot general purpose registers; only meaningful for the BSP.
pub fn setup_regs(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), Error> {
    vcpu.set_regs(&boot_regs(entry)).map_err(Error::SetRegs)
}

/// Loads the boot FPU state.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    vcpu.set_fpu(&boot_fpu()).map_err(Error::SetFpu)
}

/// Puts the vCPU in 64-bit mode with the boot GDT and identity page tables; only meaningful
/// for the BSP. Starts from KVM's current special registers so fields not touched here (APIC
/// base, LDT, CR8) keep their reset values.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs().map_err(Error::GetSregs)?;
    configure_sregs(mem, &mut sregs)?;
    vcpu.set_sregs(&sregs).map_err(Error::SetSregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn regs_point_at_entry_stack_and_zero_page() {
        let regs = boot_regs(GuestAddress(0x10_0200));
        assert_eq!(regs.rip, 0x10_0200);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
        assert_eq!(regs.rbp, BOOT_STACK_POINTER);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(regs.rflags, 0x2);
        assert_eq!(regs.rax, 0);
    }

    #[test]
    fn fpu_defaults() {
        let fpu = boot_fpu();
        assert_eq!(fpu.fcw, 0x37f);
        assert_eq!(fpu.mxcsr, 0x1f80);
        assert_eq!(fpu.fsw, 0);
    }

    #[test]
    fn sregs_enter_long_mode() {
        let mem = mem();
        let mut sregs = kvm_sregs {
            // KVM's reset CR0.
            cr0: 0x6000_0010,
            ..Default::default()
        };
        configure_sregs(&mem, &mut sregs).unwrap();

        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG);
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);

        assert_eq!(sregs.gdt.base, BOOT_GDT_START);
        assert_eq!(sregs.gdt.limit, 31);
        assert_eq!(sregs.idt.base, BOOT_IDT_START);
        assert_eq!(sregs.idt.limit, 7);

        assert_eq!(sregs.cs.selector, 0x08);
        assert_eq!(sregs.cs.l, 1);
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(seg.selector, 0x10);
            assert_eq!(seg.present, 1);
        }
        assert_eq!(sregs.tr.selector, 0x18);

        let gdt1: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, BOOT_GDT[1]);
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = mem();
        assert_eq!(write_page_tables(&mem).unwrap(), PML4_START);

        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 0x3);
        let pml4_1: u64 = mem.read_obj(GuestAddress(PML4_START + 8)).unwrap();
        assert_eq!(pml4_1, 0);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, PDE_START | 0x3);
        for i in 0..512u64 {
            let pde: u64 = mem.read_obj(GuestAddress(PDE_START + i * 8)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83, "PDE {i}");
        }
    }

    #[test]
    fn sregs_fail_without_low_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 0x1000)]).unwrap();
        let mut sregs = kvm_sregs::default();
        assert!(matches!(
            configure_sregs(&mem, &mut sregs),
            Err(Error::Gdt(gdt::Error::WriteGdt(_)))
        ));
        assert!(matches!(
            write_page_tables(&mem),
            Err(Error::WritePageTables(_))
        ));
    }
}
