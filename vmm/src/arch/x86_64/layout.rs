//! Guest physical address map for x86_64 guests.
//!
//! Everything the VMM places in guest memory before the first instruction runs lives in the
//! first MiB, below the kernel (which the bzImage loader puts at [`HIMEM_START`]). The 32-bit
//! MMIO hole below 4 GiB is never backed by RAM: RAM that would fall into it is moved above
//! 4 GiB instead, the same way PC firmware reports it.

use vm_memory::GuestAddress;

/// Global descriptor table used for the 64-bit entry (4 entries, 32 bytes).
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table: a single null entry, so any early exception triple-faults
/// instead of jumping through garbage.
pub const BOOT_IDT_START: u64 = 0x520;

/// `boot_params` ("zero page") handed to the kernel in `%rsi`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the BSP; the stack grows down towards the zero page.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Level 4 page map of the boot identity mapping.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the boot identity mapping.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot identity mapping (512 x 2 MiB pages = first 1 GiB).
pub const PDE_START: u64 = 0xb000;

/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the extended BIOS data area; conventional RAM reported to the guest ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Intel MP table. Linux scans the last KiB of conventional memory (639 KiB) for the floating
/// pointer structure, so placing it at [`EBDA_START`] makes it discoverable without a BIOS.
pub const MPTABLE_START: u64 = EBDA_START;
/// End of conventional memory (start of the legacy VGA/ROM area).
pub const MPTABLE_LIMIT: u64 = 0xa0000;

/// Where the kernel is loaded and where usable RAM resumes after the legacy hole.
pub const HIMEM_START: u64 = 0x10_0000;

/// Offset of the 64-bit entry point (`startup_64`) from the start of the protected-mode kernel
/// in a bzImage. The boot protocol fixes it as ABI.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Start of the 32-bit MMIO hole (3 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole; it extends up to 4 GiB.
pub const MMIO_GAP_SIZE: u64 = 0x4000_0000;
/// First address after the MMIO hole; RAM beyond [`MMIO_GAP_START`] bytes continues here.
pub const MMIO_GAP_END: u64 = MMIO_GAP_START + MMIO_GAP_SIZE;

/// Window inside the MMIO hole from which PCI BARs are allocated.
pub const PCI_MMIO_START: u64 = MMIO_GAP_START;
/// Size of the PCI BAR window (256 MiB), well clear of the IOAPIC and LAPIC pages.
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;

/// Default IOAPIC MMIO base, as emulated by KVM's in-kernel irqchip.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Default local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;

// The fixed boot structures must not overlap each other, the MP table or the kernel; checking
// it at compile time keeps later edits of the constants honest.
const _: () = {
    // GDT (4 x 8 bytes) ends where the IDT starts.
    assert!(BOOT_GDT_START + 4 * 8 == BOOT_IDT_START);
    assert!(BOOT_IDT_START + 8 <= ZERO_PAGE_START);
    // boot_params is one page.
    assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PML4_START + 0x1000 == PDPTE_START);
    assert!(PDPTE_START + 0x1000 == PDE_START);
    assert!(PDE_START + 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START);
    assert!(MPTABLE_LIMIT <= HIMEM_START);
    assert!(PCI_MMIO_START >= MMIO_GAP_START);
    assert!(PCI_MMIO_START + PCI_MMIO_SIZE <= IOAPIC_START);
    assert!(IOAPIC_START < APIC_START);
    assert!(APIC_START + 0x1000 <= MMIO_GAP_END);
    assert!(MMIO_GAP_END == 1 << 32);
};

/// Splits `mem_size` bytes of RAM into guest regions that avoid the 32-bit MMIO hole, suitable
/// for `GuestMemoryMmap::from_ranges`.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    // This module is only built for x86_64, where usize is 64 bits wide, so the casts below
    // are lossless.
    if mem_size == 0 {
        Vec::new()
    } else if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(MMIO_GAP_END),
                (mem_size - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(
            ram_regions(128 * MIB),
            vec![(GuestAddress(0), (128 * MIB) as usize)]
        );
    }

    #[test]
    fn memory_up_to_the_gap_is_one_region() {
        assert_eq!(
            ram_regions(3 * GIB),
            vec![(GuestAddress(0), (3 * GIB) as usize)]
        );
    }

    #[test]
    fn memory_beyond_the_gap_moves_above_4g() {
        assert_eq!(
            ram_regions(5 * GIB),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (2 * GIB) as usize),
            ]
        );
    }

    #[test]
    fn zero_memory_has_no_regions() {
        assert!(ram_regions(0).is_empty());
    }
}
