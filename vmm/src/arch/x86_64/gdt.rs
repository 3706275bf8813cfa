//! Global descriptor table for the 64-bit boot entry.
//!
//! The Linux 64-bit boot protocol requires flat code/data segments to be loaded when the kernel
//! is entered. The kernel's decompressor installs its own GDT immediately, so this table only
//! has to be valid for the first few instructions; it also gives KVM a well-formed TSS, which
//! VMX insists on when entering long mode.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{BOOT_GDT_START, BOOT_IDT_START};

/// Errors writing the descriptor tables into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The GDT could not be written.
    #[error("failed to write the GDT to guest memory: {0}")]
    WriteGdt(#[source] GuestMemoryError),
    /// The IDT could not be written.
    #[error("failed to write the IDT to guest memory: {0}")]
    WriteIdt(#[source] GuestMemoryError),
}

/// Access/flags word of a 64-bit code segment: present, DPL 0, execute/read, accessed, L=1, G=1.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Access/flags word of a data segment: present, DPL 0, read/write, accessed, D/B=1, G=1.
pub const DATA_FLAGS: u16 = 0xc093;
/// Access/flags word of a 64-bit busy TSS: present, DPL 0, type 0xb, G=1.
pub const TSS_FLAGS: u16 = 0x808b;

/// GDT index of the code segment (selector 0x08).
pub const CODE_INDEX: u8 = 1;
/// GDT index of the data segment (selector 0x10).
pub const DATA_INDEX: u8 = 2;
/// GDT index of the TSS (selector 0x18).
pub const TSS_INDEX: u8 = 3;

/// The boot GDT: null, code, data and TSS descriptors, all flat over 4 GiB.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(CODE64_FLAGS, 0, 0xfffff),
    gdt_entry(DATA_FLAGS, 0, 0xfffff),
    gdt_entry(TSS_FLAGS, 0, 0xfffff),
];

/// Encodes a segment descriptor. `flags` packs the access byte in bits 7:0 and the
/// granularity/size nibble in bits 15:12, as in the descriptor's bytes 5 and 6.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn entry_base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

/// KVM wants the limit in bytes, so a page-granular limit is expanded the way the CPU would
/// interpret it; VMX rejects segments whose limit and G bit disagree.
fn entry_limit(entry: u64) -> u32 {
    let raw = (((entry >> 32) & 0x000f_0000) | (entry & 0x0000_ffff)) as u32;
    if entry_bit(entry, 55) == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

fn entry_bit(entry: u64, bit: u32) -> u8 {
    ((entry >> bit) & 1) as u8
}

/// Converts the descriptor at GDT index `table_index` into the form KVM_SET_SREGS expects.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let present = entry_bit(entry, 47);
    kvm_segment {
        base: entry_base(entry),
        limit: entry_limit(entry),
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: entry_bit(entry, 54),
        s: entry_bit(entry, 44),
        l: entry_bit(entry, 53),
        g: entry_bit(entry, 55),
        avl: entry_bit(entry, 52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes `table` at [`BOOT_GDT_START`].
pub fn write_gdt_table(table: &[u64], mem: &GuestMemoryMmap) -> Result<(), Error> {
    let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))
        .map_err(Error::WriteGdt)
}

/// Writes a single IDT entry at [`BOOT_IDT_START`].
pub fn write_idt_value(val: u64, mem: &GuestMemoryMmap) -> Result<(), Error> {
    mem.write_obj(val, GuestAddress(BOOT_IDT_START))
        .map_err(Error::WriteIdt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_known_descriptors() {
        // Reference values from the kernel's GDT_ENTRY_INIT for flat 4 GiB segments.
        assert_eq!(BOOT_GDT[0], 0);
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn code_segment_fields() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[1], CODE_INDEX);
        assert_eq!(seg.selector, 0x08);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.dpl, 0);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.s, 1);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.g, 1);
        assert_eq!(seg.avl, 0);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn data_segment_fields() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[2], DATA_INDEX);
        assert_eq!(seg.selector, 0x10);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.type_, 0x3);
        assert_eq!(seg.db, 1);
        assert_eq!(seg.l, 0);
        assert_eq!(seg.s, 1);
    }

    #[test]
    fn tss_segment_fields() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[3], TSS_INDEX);
        assert_eq!(seg.selector, 0x18);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.s, 0);
        assert_eq!(seg.present, 1);
    }

    #[test]
    fn null_segment_is_unusable() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(seg.present, 0);
        assert_eq!(seg.unusable, 1);
    }

    #[test]
    fn base_and_byte_granular_limit_round_trip() {
        let entry = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from_gdt(entry, 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.g, 0);
        assert_eq!(seg.selector, 40);
    }

    #[test]
    fn tables_land_at_their_addresses() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        write_gdt_table(&BOOT_GDT, &mem).unwrap();
        write_idt_value(0, &mem).unwrap();
        for (i, want) in BOOT_GDT.iter().enumerate() {
            let got: u64 = mem
                .read_obj(GuestAddress(BOOT_GDT_START + 8 * i as u64))
                .unwrap();
            assert_eq!(got, *want);
        }
        let idt: u64 = mem.read_obj(GuestAddress(BOOT_IDT_START)).unwrap();
        assert_eq!(idt, 0);
    }

    #[test]
    fn writing_outside_memory_fails() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10000), 0x1000)]).unwrap();
        assert!(matches!(
            write_gdt_table(&BOOT_GDT, &mem),
            Err(Error::WriteGdt(_))
        ));
        assert!(matches!(write_idt_value(0, &mem), Err(Error::WriteIdt(_))));
    }
}
