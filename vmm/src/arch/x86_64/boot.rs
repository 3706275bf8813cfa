//! Zero page (`boot_params`) and memory map for the Linux x86 boot protocol.
//!
//! With the 64-bit entry the kernel's real-mode setup code never runs, so everything it would
//! have collected from the BIOS — above all the e820 memory map — has to be handed over here.

use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE, LOADED_HIGH,
};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
};

use super::layout::{CMDLINE_MAX_SIZE, EBDA_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START};
use super::mptable;

/// Errors configuring the boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MP table could not be set up.
    #[error(transparent)]
    Mptable(#[from] mptable::Error),
    /// The command line is longer than the reserved area.
    #[error("command line of {0} bytes exceeds the {max} byte limit", max = CMDLINE_MAX_SIZE)]
    CmdlineTooLong(usize),
    /// Guest memory does not cover the first MiB plus the kernel area.
    #[error("guest memory has no RAM at the kernel load address {HIMEM_START:#x}")]
    NoHighMemory,
    /// The memory layout needs more e820 entries than the zero page holds.
    #[error("{0} e820 entries do not fit in the zero page")]
    TooManyE820Entries(usize),
    /// The initrd is larger than the RAM between the kernel and the MMIO hole.
    #[error("initrd of {size} bytes does not fit in {room} bytes of low RAM")]
    InitrdTooLarge {
        /// Initrd size in bytes.
        size: usize,
        /// RAM available above [`HIMEM_START`] and below the MMIO hole.
        room: u64,
    },
    /// The zero page could not be written.
    #[error("failed to write the zero page to guest memory: {0}")]
    WriteZeroPage(#[source] GuestMemoryError),
}

/// `boot_flag` magic.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` magic, "HdrS".
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a loader without an assigned ID.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Alignment used when no bzImage header supplies one (16 MiB, the largest
/// CONFIG_PHYSICAL_ALIGN a default x86_64 kernel uses).
pub const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

const PAGE_SIZE: u64 = 0x1000;

fn e820_ram(addr: u64, size: u64) -> boot_e820_entry {
    boot_e820_entry {
        addr,
        size,
        r#type: E820_RAM,
    }
}

/// The e820 RAM map for RAM regions given as `(start, length)`: conventional memory below the
/// EBDA, then everything from [`HIMEM_START`] on. The EBDA/MP table, VGA and BIOS area in
/// between is left out, which makes the guest treat it as reserved.
pub fn e820_map(regions: impl IntoIterator<Item = (u64, u64)>) -> Vec<boot_e820_entry> {
    let mut map = Vec::new();
    for (start, len) in regions {
        let end = start.saturating_add(len);
        if start < EBDA_START {
            let low_end = end.min(EBDA_START);
            if low_end > start {
                map.push(e820_ram(start, low_end - start));
            }
        }
        let high_start = start.max(HIMEM_START);
        if end > high_start {
            map.push(e820_ram(high_start, end - high_start));
        }
    }
    map
}

fn mem_regions(mem: &GuestMemoryMmap) -> impl Iterator<Item = (u64, u64)> + '_ {
    mem.iter().map(|r| (r.start_addr().0, r.len()))
}

/// End of the RAM that contains [`HIMEM_START`], capped at the MMIO hole: the 32-bit
/// addressable RAM the kernel and initrd are placed in.
fn low_ram_end(mem: &GuestMemoryMmap) -> Result<u64, Error> {
    mem_regions(mem)
        .find(|&(start, len)| start <= HIMEM_START && HIMEM_START < start.saturating_add(len))
        .map(|(start, len)| start.saturating_add(len).min(MMIO_GAP_START))
        .ok_or(Error::NoHighMemory)
}

/// Highest page-aligned address at which an initrd of `initrd_size` bytes fits below the end
/// of low RAM (and above the kernel load address).
pub fn initrd_load_addr(mem: &GuestMemoryMmap, initrd_size: usize) -> Result<GuestAddress, Error> {
    let end = low_ram_end(mem)?;
    let room = end.saturating_sub(HIMEM_START);
    let too_large = || Error::InitrdTooLarge {
        size: initrd_size,
        room,
    };
    let size = u64::try_from(initrd_size).map_err(|_| too_large())?;
    let addr = end.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < HIMEM_START {
        return Err(too_large());
    }
    Ok(GuestAddress(addr))
}

fn split_u64(value: u64) -> (u32, u32) {
    (value as u32, (value >> 32) as u32)
}

/// Builds the zero page. `setup_header` is the header the bzImage loader returned; its
/// kernel-provided fields (`init_size`, `kernel_alignment`, ...) are needed by the
/// decompressor.
pub fn build_boot_params(
    mem: &GuestMemoryMmap,
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initrd: Option<(GuestAddress, usize)>,
    setup_header: Option<setup_header>,
) -> Result<boot_params, Error> {
    if cmdline_size > CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong(cmdline_size));
    }
    // The kernel is loaded at HIMEM_START; without RAM there the map would be meaningless.
    low_ram_end(mem)?;

    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    // The decompressor aligns its run address with this; zero would wreck the computation.
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    // CAN_USE_HEAP is deliberately not set: it describes the real-mode setup heap, which the
    // 64-bit entry skips.
    params.hdr.loadflags |= LOADED_HIGH;

    let (cmd_lo, cmd_hi) = split_u64(cmdline_addr.0);
    params.hdr.cmd_line_ptr = cmd_lo;
    params.ext_cmd_line_ptr = cmd_hi;
    // Bounded by CMDLINE_MAX_SIZE above.
    params.hdr.cmdline_size = cmdline_size as u32;

    if let Some((addr, size)) = initrd {
        let (img_lo, img_hi) = split_u64(addr.0);
        let (size_lo, size_hi) = split_u64(size as u64);
        params.hdr.ramdisk_image = img_lo;
        params.ext_ramdisk_image = img_hi;
        params.hdr.ramdisk_size = size_lo;
        params.ext_ramdisk_size = size_hi;
    }

    let map = e820_map(mem_regions(mem));
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(Error::TooManyE820Entries(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    // At most E820_MAX_ENTRIES_ZEROPAGE (128), checked above.
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the MP table for `cpu_count` vCPUs and the zero page at [`ZERO_PAGE_START`].
/// The command line (and initrd, if any) must already be in guest memory.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initrd: Option<(GuestAddress, usize)>,
    cpu_count: u8,
    setup_header: Option<setup_header>,
) -> Result<(), Error> {
    mptable::setup_mptable(mem, cpu_count)?;
    let params = build_boot_params(mem, cmdline_addr, cmdline_size, initrd, setup_header)?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(Error::WriteZeroPage)
}

#[cfg(test)]
mod tests {
    use super::super::layout::{ram_regions, CMDLINE_START, MMIO_GAP_END, MPTABLE_START};
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn guest_mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_regions(size)).unwrap()
    }

    fn entries(params: &boot_params) -> Vec<(u64, u64, u32)> {
        params.e820_table[..usize::from(params.e820_entries)]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect()
    }

    fn params_for(size: u64) -> boot_params {
        build_boot_params(
            &guest_mem(size),
            GuestAddress(CMDLINE_START),
            10,
            None,
            None,
        )
        .unwrap()
    }

    #[test]
    fn e820_128m() {
        assert_eq!(
            entries(&params_for(128 * MIB)),
            vec![
                (0, EBDA_START, E820_RAM),
                (HIMEM_START, 128 * MIB - HIMEM_START, E820_RAM)
            ]
        );
    }

    #[test]
    fn e820_3g_ends_at_the_gap() {
        assert_eq!(
            entries(&params_for(3 * GIB)),
            vec![
                (0, EBDA_START, E820_RAM),
                (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM)
            ]
        );
    }

    #[test]
    fn e820_4g_puts_the_last_gib_above_4g() {
        assert_eq!(
            entries(&params_for(4 * GIB)),
            vec![
                (0, EBDA_START, E820_RAM),
                (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM),
                (MMIO_GAP_END, GIB, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_5g() {
        assert_eq!(
            entries(&params_for(5 * GIB)),
            vec![
                (0, EBDA_START, E820_RAM),
                (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM),
                (MMIO_GAP_END, 2 * GIB, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_map_skips_the_legacy_hole_in_any_region_shape() {
        let map: Vec<_> = e820_map([(0, 0x8_0000), (0x8_0000, 0x10_0000)])
            .iter()
            .map(|e| (e.addr, e.size))
            .collect();
        assert_eq!(
            map,
            vec![
                (0, 0x8_0000),
                (0x8_0000, EBDA_START - 0x8_0000),
                (HIMEM_START, 0x8_0000)
            ]
        );
        assert!(e820_map([(0xa_0000, 0x1_0000)]).is_empty());
    }

    #[test]
    fn header_fields_without_bzimage_header() {
        let mem = guest_mem(128 * MIB);
        let initrd = (GuestAddress(0x700_0000), 0x12_3456);
        let p =
            build_boot_params(&mem, GuestAddress(CMDLINE_START), 42, Some(initrd), None).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.kernel_alignment }, KERNEL_MIN_ALIGNMENT_BYTES);
        assert_ne!(p.hdr.loadflags & LOADED_HIGH, 0);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.ext_cmd_line_ptr }, 0);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x12_3456);
        assert_eq!({ p.ext_ramdisk_image }, 0);
    }

    #[test]
    fn bzimage_header_is_preserved() {
        let mem = guest_mem(128 * MIB);
        let hdr = setup_header {
            setup_sects: 0x1f,
            version: 0x20f,
            kernel_alignment: 0x20_0000,
            init_size: 0x1234_0000,
            loadflags: LOADED_HIGH,
            xloadflags: 0x7f,
            ..Default::default()
        };
        let p = build_boot_params(&mem, GuestAddress(CMDLINE_START), 1, None, Some(hdr)).unwrap();
        assert_eq!(p.hdr.setup_sects, 0x1f);
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.init_size }, 0x1234_0000);
        assert_eq!({ p.hdr.xloadflags }, 0x7f);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn addresses_above_4g_use_the_ext_fields() {
        let mem = guest_mem(5 * GIB);
        let p = build_boot_params(
            &mem,
            GuestAddress(0x1_2345_6000),
            1,
            Some((GuestAddress(0x1_4000_0000), 0x1000)),
            None,
        )
        .unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x2345_6000);
        assert_eq!({ p.ext_cmd_line_ptr }, 1);
        assert_eq!({ p.hdr.ramdisk_image }, 0x4000_0000);
        assert_eq!({ p.ext_ramdisk_image }, 1);
    }

    #[test]
    fn cmdline_limit() {
        let mem = guest_mem(128 * MIB);
        assert!(build_boot_params(&mem, GuestAddress(CMDLINE_START), 2048, None, None).is_ok());
        assert!(matches!(
            build_boot_params(&mem, GuestAddress(CMDLINE_START), 2049, None, None),
            Err(Error::CmdlineTooLong(2049))
        ));
    }

    #[test]
    fn memory_without_the_kernel_area_is_rejected() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        assert!(matches!(
            build_boot_params(&mem, GuestAddress(CMDLINE_START), 1, None, None),
            Err(Error::NoHighMemory)
        ));
        assert!(matches!(
            initrd_load_addr(&mem, 1),
            Err(Error::NoHighMemory)
        ));
    }

    #[test]
    fn configure_system_writes_zero_page_and_mptable() {
        let mem = guest_mem(128 * MIB);
        configure_system(&mem, GuestAddress(CMDLINE_START), 5, None, 2, None).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!(p.e820_entries, 2);
        let signature: [u8; 4] = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&signature, b"_MP_");
    }

    #[test]
    fn configure_system_propagates_mptable_errors() {
        let mem = guest_mem(128 * MIB);
        assert!(matches!(
            configure_system(&mem, GuestAddress(CMDLINE_START), 5, None, 0, None),
            Err(Error::Mptable(mptable::Error::NoCpus))
        ));
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram() {
        let mem = guest_mem(128 * MIB);
        assert_eq!(
            initrd_load_addr(&mem, 0x1000).unwrap(),
            GuestAddress(128 * MIB - 0x1000)
        );
        // Unaligned sizes round the start down to a page.
        assert_eq!(
            initrd_load_addr(&mem, 0x1001).unwrap(),
            GuestAddress(128 * MIB - 0x2000)
        );
    }

    #[test]
    fn initrd_stays_below_the_gap() {
        for size in [3 * GIB, 5 * GIB] {
            let mem = guest_mem(size);
            assert_eq!(
                initrd_load_addr(&mem, 0x10_0000).unwrap(),
                GuestAddress(MMIO_GAP_START - 0x10_0000)
            );
        }
    }

    #[test]
    fn initrd_too_large() {
        let mem = guest_mem(128 * MIB);
        // Exactly the room above the kernel address still fits.
        assert_eq!(
            initrd_load_addr(&mem, (128 * MIB - HIMEM_START) as usize).unwrap(),
            GuestAddress(HIMEM_START)
        );
        let err = initrd_load_addr(&mem, (128 * MIB - HIMEM_START) as usize + 1).unwrap_err();
        assert!(matches!(err, Error::InitrdTooLarge { room, .. } if room == 127 * MIB));
        assert!(matches!(
            initrd_load_addr(&mem, 256 * MIB as usize),
            Err(Error::InitrdTooLarge { .. })
        ));
    }
}
