//! Intel MultiProcessor Specification 1.4 table.
//!
//! The guest boots without ACPI, so this table is how Linux learns about the vCPUs, the IOAPIC
//! and how interrupt lines reach it. The floating pointer structure sits at
//! [`MPTABLE_START`] (the last KiB of conventional memory, which Linux scans) and is followed
//! directly by the configuration table.
//!
//! Interrupt routing, chosen to match KVM's default GSI routing so no KVM_SET_GSI_ROUTING
//! entry is needed for these lines:
//! - ISA IRQ n (0..=15) goes to IOAPIC pin n, edge/active-high ("conforming"). Real boards
//!   put the timer on pin 2, but KVM's in-kernel PIT raises GSI 0, which the default routing
//!   delivers to pin 0; Linux's timer check accepts either wiring.
//! - PCI bus 0, device d in `1..=8`, INTA# goes to IOAPIC pin `15 + d` (pins 16..=23),
//!   level/active-low, one pin per slot so no line is shared (see [`pci_inta_gsi`]). Only
//!   INTA# is described: the devices are single-function and prefer MSI-X anyway.
//! - LINT0 of every local APIC is ExtINT (the 8259 virtual wire) and LINT1 is NMI.

use std::mem::size_of;

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{APIC_START, IOAPIC_START, MPTABLE_LIMIT, MPTABLE_START};

/// Errors building or writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A machine needs at least one CPU.
    #[error("the MP table needs at least one CPU")]
    NoCpus,
    /// APIC ID 0xff is the broadcast ID and the IOAPIC takes the ID after the last CPU.
    #[error("{0} CPUs do not fit the MP table's 8-bit APIC IDs (maximum 254)")]
    TooManyCpus(u8),
    /// The table would run past the end of conventional memory.
    #[error(
        "the MP table for {cpu_count} CPUs needs {size} bytes but only {room} fit below 0xa0000"
    )]
    TooLarge {
        /// Requested CPU count.
        cpu_count: u8,
        /// Size of the table in bytes.
        size: usize,
        /// Bytes available at the table's address.
        room: usize,
    },
    /// The table could not be written into guest memory.
    #[error("failed to write the MP table to guest memory: {0}")]
    Write(#[source] GuestMemoryError),
}

const SMP_MAGIC_IDENT: [u8; 4] = *b"_MP_";
const MPC_SIGNATURE: [u8; 4] = *b"PCMP";
const MPC_OEM: [u8; 8] = *b"AIODMA  ";
const MPC_PRODUCT_ID: [u8; 12] = *b"AIODMA VMM  ";
const MPC_SPEC: u8 = 4;

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Integrated local APIC version (xAPIC).
const APIC_VERSION: u8 = 0x14;
/// Family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const IOAPIC_VERSION: u8 = 0x11;
const MPC_APIC_USABLE: u8 = 1;

const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// Polarity and trigger as the source bus defines them (ISA: edge, active high).
const MP_IRQFLAG_CONFORMING: u16 = 0;
/// Active low (bits 1:0 = 3), level triggered (bits 3:2 = 3), as PCI INTx lines are.
const MP_IRQFLAG_LEVEL_LOW: u16 = 0xf;
/// Destination APIC ID meaning "all local APICs".
const MP_APIC_ALL: u8 = 0xff;

/// Bus ID of the PCI root bus.
pub const BUS_ID_PCI: u8 = 0;
/// Bus ID of the ISA bus.
pub const BUS_ID_ISA: u8 = 1;
const BUS_TYPE_PCI: [u8; 6] = *b"PCI   ";
const BUS_TYPE_ISA: [u8; 6] = *b"ISA   ";

/// Number of ISA IRQs described, routed 1:1 to IOAPIC pins.
pub const ISA_IRQS: u8 = 16;
/// First PCI device number whose INTA# is routed.
pub const PCI_INTX_FIRST_DEVICE: u8 = 1;
/// Number of PCI devices (starting at [`PCI_INTX_FIRST_DEVICE`]) whose INTA# is routed.
pub const PCI_INTX_DEVICES: u8 = 8;
/// IOAPIC pin of the first routed PCI device; KVM's IOAPIC has 24 pins.
pub const PCI_INTX_FIRST_PIN: u8 = 16;

const _: () = assert!(PCI_INTX_FIRST_PIN as u32 + PCI_INTX_DEVICES as u32 <= 24);

/// IOAPIC pin (and, with KVM's default routing, GSI) that INTA# of PCI device `device` on bus
/// 0 is wired to, or `None` if the table does not route that device.
pub fn pci_inta_gsi(device: u8) -> Option<u32> {
    let slot = device.checked_sub(PCI_INTX_FIRST_DEVICE)?;
    (slot < PCI_INTX_DEVICES).then(|| u32::from(PCI_INTX_FIRST_PIN) + u32::from(slot))
}

/// MP floating pointer structure.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpFloatingPointer {
    /// `_MP_`.
    pub signature: [u8; 4],
    /// Physical address of the configuration table.
    pub physptr: u32,
    /// Length in 16-byte units.
    pub length: u8,
    /// Specification revision.
    pub specification: u8,
    /// Makes the structure's bytes sum to zero.
    pub checksum: u8,
    /// 0: a configuration table is present.
    pub feature1: u8,
    /// Bit 7 clear: virtual wire mode, no IMCR.
    pub feature2: u8,
    /// Reserved.
    pub feature3: [u8; 3],
}

/// MP configuration table header.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpConfigHeader {
    /// `PCMP`.
    pub signature: [u8; 4],
    /// Length of the base table, header included.
    pub length: u16,
    /// Specification revision.
    pub spec: u8,
    /// Makes the base table's bytes sum to zero.
    pub checksum: u8,
    /// OEM ID, space padded.
    pub oem: [u8; 8],
    /// Product ID, space padded.
    pub productid: [u8; 12],
    /// OEM table pointer (none).
    pub oemptr: u32,
    /// OEM table size (none).
    pub oemsize: u16,
    /// Number of entries following the header.
    pub oemcount: u16,
    /// Local APIC MMIO address.
    pub lapic: u32,
    /// Extended table length/checksum and reserved byte (no extended table).
    pub reserved: u32,
}

/// Processor entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpProcessor {
    /// [`MP_PROCESSOR`].
    pub type_: u8,
    /// Local APIC ID.
    pub apicid: u8,
    /// Local APIC version.
    pub apicver: u8,
    /// Enabled / bootstrap processor flags.
    pub cpuflag: u8,
    /// CPUID signature.
    pub cpufeature: u32,
    /// CPUID.1:EDX feature flags.
    pub featureflag: u32,
    /// Reserved.
    pub reserved: [u32; 2],
}

/// Bus entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpBus {
    /// [`MP_BUS`].
    pub type_: u8,
    /// Bus ID.
    pub busid: u8,
    /// Space-padded bus type string.
    pub bustype: [u8; 6],
}

/// I/O APIC entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpIoApic {
    /// [`MP_IOAPIC`].
    pub type_: u8,
    /// I/O APIC ID.
    pub apicid: u8,
    /// I/O APIC version.
    pub apicver: u8,
    /// Usable flag.
    pub flags: u8,
    /// MMIO address.
    pub apicaddr: u32,
}

/// I/O interrupt assignment entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpIntSrc {
    /// [`MP_INTSRC`].
    pub type_: u8,
    /// Interrupt type (INT, NMI, SMI, ExtINT).
    pub irqtype: u8,
    /// Polarity (bits 1:0) and trigger mode (bits 3:2).
    pub irqflag: u16,
    /// Source bus ID.
    pub srcbus: u8,
    /// Source bus IRQ; for PCI `(device << 2) | pin`.
    pub srcbusirq: u8,
    /// Destination I/O APIC ID.
    pub dstapic: u8,
    /// Destination I/O APIC pin.
    pub dstirq: u8,
}

/// Local interrupt assignment entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpLocalIntSrc {
    /// [`MP_LINTSRC`].
    pub type_: u8,
    /// Interrupt type (INT, NMI, SMI, ExtINT).
    pub irqtype: u8,
    /// Polarity (bits 1:0) and trigger mode (bits 3:2).
    pub irqflag: u16,
    /// Source bus ID.
    pub srcbusid: u8,
    /// Source bus IRQ.
    pub srcbusirq: u8,
    /// Destination local APIC ID (0xff: all).
    pub destapic: u8,
    /// Destination LINT pin.
    pub destapiclint: u8,
}

// The MP specification fixes these sizes; packing guarantees there is no padding.
const _: () = assert!(size_of::<MpFloatingPointer>() == 16);
const _: () = assert!(size_of::<MpConfigHeader>() == 44);
const _: () = assert!(size_of::<MpProcessor>() == 20);
const _: () = assert!(size_of::<MpBus>() == 8);
const _: () = assert!(size_of::<MpIoApic>() == 8);
const _: () = assert!(size_of::<MpIntSrc>() == 8);
const _: () = assert!(size_of::<MpLocalIntSrc>() == 8);

// SAFETY: all of these are `repr(C, packed)` structs made only of integers and integer arrays,
// so they have no padding and every bit pattern is a valid value.
unsafe impl ByteValued for MpFloatingPointer {}
// SAFETY: see `MpFloatingPointer`.
unsafe impl ByteValued for MpConfigHeader {}
// SAFETY: see `MpFloatingPointer`.
unsafe impl ByteValued for MpProcessor {}
// SAFETY: see `MpFloatingPointer`.
unsafe impl ByteValued for MpBus {}
// SAFETY: see `MpFloatingPointer`.
unsafe impl ByteValued for MpIoApic {}
// SAFETY: see `MpFloatingPointer`.
unsafe impl ByteValued for MpIntSrc {}
// SAFETY: see `MpFloatingPointer`.
unsafe impl ByteValued for MpLocalIntSrc {}

const NUM_BUSES: usize = 2;
const NUM_LOCAL_INTS: usize = 2;

/// Number of entries (after the header) in the table for `cpu_count` CPUs.
const fn entry_count(cpu_count: usize) -> usize {
    cpu_count + NUM_BUSES + 1 + ISA_IRQS as usize + PCI_INTX_DEVICES as usize + NUM_LOCAL_INTS
}

/// Total size in bytes of the floating pointer plus the configuration table.
pub const fn mptable_size(cpu_count: u8) -> usize {
    let cpus = cpu_count as usize;
    size_of::<MpFloatingPointer>()
        + size_of::<MpConfigHeader>()
        + cpus * size_of::<MpProcessor>()
        // Every entry type except the processor entry is 8 bytes long.
        + (entry_count(cpus) - cpus) * size_of::<MpBus>()
}

/// Most CPUs whose table still fits below [`MPTABLE_LIMIT`].
pub const MAX_CPUS: u8 = {
    let room = (MPTABLE_LIMIT - MPTABLE_START) as usize;
    let fixed = mptable_size(0);
    let n = (room - fixed) / size_of::<MpProcessor>();
    if n > 254 {
        254
    } else {
        n as u8
    }
};

/// Value that makes the byte sum of `bytes` plus itself zero (the checksum field is zero
/// while this is computed).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

fn ensure_fits(cpu_count: u8) -> Result<(), Error> {
    if cpu_count == 0 {
        return Err(Error::NoCpus);
    }
    if cpu_count > 254 {
        return Err(Error::TooManyCpus(cpu_count));
    }
    let size = mptable_size(cpu_count);
    let room = (MPTABLE_LIMIT - MPTABLE_START) as usize;
    if size > room {
        return Err(Error::TooLarge {
            cpu_count,
            size,
            room,
        });
    }
    Ok(())
}

fn config_entries(cpu_count: u8) -> Vec<u8> {
    let ioapic_id = cpu_count;
    let mut out = Vec::new();

    for apicid in 0..cpu_count {
        let bsp = if apicid == 0 { CPU_BOOTPROCESSOR } else { 0 };
        out.extend_from_slice(
            MpProcessor {
                type_: MP_PROCESSOR,
                apicid,
                apicver: APIC_VERSION,
                cpuflag: CPU_ENABLED | bsp,
                cpufeature: CPU_SIGNATURE,
                featureflag: CPU_FEATURES,
                reserved: [0; 2],
            }
            .as_slice(),
        );
    }

    for (busid, bustype) in [(BUS_ID_PCI, BUS_TYPE_PCI), (BUS_ID_ISA, BUS_TYPE_ISA)] {
        out.extend_from_slice(
            MpBus {
                type_: MP_BUS,
                busid,
                bustype,
            }
            .as_slice(),
        );
    }

    out.extend_from_slice(
        MpIoApic {
            type_: MP_IOAPIC,
            apicid: ioapic_id,
            apicver: IOAPIC_VERSION,
            flags: MPC_APIC_USABLE,
            apicaddr: IOAPIC_START as u32,
        }
        .as_slice(),
    );

    let intsrc = |irqflag, srcbus, srcbusirq, dstirq| MpIntSrc {
        type_: MP_INTSRC,
        irqtype: MP_IRQ_INT,
        irqflag,
        srcbus,
        srcbusirq,
        dstapic: ioapic_id,
        dstirq,
    };
    for irq in 0..ISA_IRQS {
        out.extend_from_slice(intsrc(MP_IRQFLAG_CONFORMING, BUS_ID_ISA, irq, irq).as_slice());
    }
    for slot in 0..PCI_INTX_DEVICES {
        let device = PCI_INTX_FIRST_DEVICE + slot;
        // Source IRQ encoding for PCI: device number in bits 6:2, pin (0 = INTA#) in 1:0.
        let srcbusirq = device << 2;
        let pin = PCI_INTX_FIRST_PIN + slot;
        out.extend_from_slice(intsrc(MP_IRQFLAG_LEVEL_LOW, BUS_ID_PCI, srcbusirq, pin).as_slice());
    }

    for (irqtype, lint) in [(MP_IRQ_EXTINT, 0), (MP_IRQ_NMI, 1)] {
        out.extend_from_slice(
            MpLocalIntSrc {
                type_: MP_LINTSRC,
                irqtype,
                irqflag: MP_IRQFLAG_CONFORMING,
                srcbusid: BUS_ID_ISA,
                srcbusirq: 0,
                destapic: MP_APIC_ALL,
                destapiclint: lint,
            }
            .as_slice(),
        );
    }
    out
}

/// Builds the floating pointer and configuration table as they must appear at
/// [`MPTABLE_START`].
pub fn build_mptable(cpu_count: u8) -> Result<Vec<u8>, Error> {
    ensure_fits(cpu_count)?;

    let entries = config_entries(cpu_count);
    let config_len = size_of::<MpConfigHeader>() + entries.len();
    let mut header = MpConfigHeader {
        signature: MPC_SIGNATURE,
        // `ensure_fits` bounded the whole table by 1 KiB, so these narrowings are lossless.
        length: config_len as u16,
        spec: MPC_SPEC,
        checksum: 0,
        oem: MPC_OEM,
        productid: MPC_PRODUCT_ID,
        oemptr: 0,
        oemsize: 0,
        oemcount: entry_count(usize::from(cpu_count)) as u16,
        lapic: APIC_START as u32,
        reserved: 0,
    };
    header.checksum = checksum(&[header.as_slice(), &entries].concat());

    let mut fp = MpFloatingPointer {
        signature: SMP_MAGIC_IDENT,
        physptr: (MPTABLE_START as usize + size_of::<MpFloatingPointer>()) as u32,
        length: 1,
        specification: MPC_SPEC,
        ..Default::default()
    };
    fp.checksum = checksum(fp.as_slice());

    let mut table = Vec::with_capacity(size_of::<MpFloatingPointer>() + config_len);
    table.extend_from_slice(fp.as_slice());
    table.extend_from_slice(header.as_slice());
    table.extend_from_slice(&entries);
    Ok(table)
}

/// Writes the MP table for `cpu_count` CPUs (APIC IDs `0..cpu_count`, CPU 0 the BSP) into
/// guest memory at [`MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, cpu_count: u8) -> Result<(), Error> {
    let table = build_mptable(cpu_count)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn byte_sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    struct Parsed {
        header: MpConfigHeader,
        processors: Vec<MpProcessor>,
        buses: Vec<MpBus>,
        ioapics: Vec<MpIoApic>,
        intsrcs: Vec<MpIntSrc>,
        lintsrcs: Vec<MpLocalIntSrc>,
    }

    /// Reads the table back from guest memory the way a guest would, checking both checksums.
    fn parse(mem: &GuestMemoryMmap) -> Parsed {
        let fp: MpFloatingPointer = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(fp.signature, *b"_MP_");
        assert_eq!(byte_sum(fp.as_slice()), 0, "floating pointer checksum");
        assert_eq!({ fp.length }, 1);
        assert_eq!({ fp.specification }, 4);
        assert_eq!({ fp.feature1 }, 0);
        // Linux only scans 16-byte aligned addresses.
        assert_eq!(MPTABLE_START % 16, 0);

        let base = u64::from(fp.physptr);
        let header: MpConfigHeader = mem.read_obj(GuestAddress(base)).unwrap();
        assert_eq!(header.signature, *b"PCMP");
        assert_eq!({ header.spec }, 4);
        assert_eq!({ header.lapic }, 0xfee0_0000);
        assert_eq!(header.oem, *b"AIODMA  ");

        let mut config = vec![0u8; usize::from(header.length)];
        mem.read_slice(&mut config, GuestAddress(base)).unwrap();
        assert_eq!(byte_sum(&config), 0, "configuration table checksum");
        assert!(base + u64::from(header.length) <= MPTABLE_LIMIT);

        let mut parsed = Parsed {
            header,
            processors: Vec::new(),
            buses: Vec::new(),
            ioapics: Vec::new(),
            intsrcs: Vec::new(),
            lintsrcs: Vec::new(),
        };
        let mut addr = base + size_of::<MpConfigHeader>() as u64;
        let mut last_type = 0;
        for _ in 0..header.oemcount {
            let type_: u8 = mem.read_obj(GuestAddress(addr)).unwrap();
            assert!(type_ >= last_type, "entries sorted by type");
            last_type = type_;
            let a = GuestAddress(addr);
            addr += match type_ {
                MP_PROCESSOR => {
                    parsed.processors.push(mem.read_obj(a).unwrap());
                    20
                }
                MP_BUS => {
                    parsed.buses.push(mem.read_obj(a).unwrap());
                    8
                }
                MP_IOAPIC => {
                    parsed.ioapics.push(mem.read_obj(a).unwrap());
                    8
                }
                MP_INTSRC => {
                    parsed.intsrcs.push(mem.read_obj(a).unwrap());
                    8
                }
                MP_LINTSRC => {
                    parsed.lintsrcs.push(mem.read_obj(a).unwrap());
                    8
                }
                other => panic!("unknown entry type {other}"),
            };
        }
        assert_eq!(
            addr,
            base + u64::from(header.length),
            "entries fill the table"
        );
        parsed
    }

    #[test]
    fn single_cpu_table() {
        let mem = mem();
        setup_mptable(&mem, 1).unwrap();
        let p = parse(&mem);
        assert_eq!(p.processors.len(), 1);
        assert_eq!({ p.processors[0].cpuflag }, CPU_ENABLED | CPU_BOOTPROCESSOR);
        assert_eq!(p.ioapics.len(), 1);
        assert_eq!(p.ioapics[0].apicid, 1);
    }

    #[test]
    fn processors_buses_and_ioapic() {
        let mem = mem();
        setup_mptable(&mem, 4).unwrap();
        let p = parse(&mem);

        assert_eq!(p.processors.len(), 4);
        for (i, cpu) in p.processors.iter().enumerate() {
            assert_eq!(usize::from(cpu.apicid), i);
            assert_eq!(cpu.apicver, 0x14);
            assert_ne!(cpu.cpuflag & CPU_ENABLED, 0);
            assert_eq!(cpu.cpuflag & CPU_BOOTPROCESSOR != 0, i == 0);
        }

        assert_eq!(p.buses.len(), 2);
        assert_eq!((p.buses[0].busid, p.buses[0].bustype), (0, *b"PCI   "));
        assert_eq!((p.buses[1].busid, p.buses[1].bustype), (1, *b"ISA   "));

        assert_eq!(p.ioapics.len(), 1);
        let ioapic = p.ioapics[0];
        assert_eq!(ioapic.apicid, 4);
        assert_eq!(ioapic.apicver, 0x11);
        assert_eq!(ioapic.flags, MPC_APIC_USABLE);
        assert_eq!({ ioapic.apicaddr }, 0xfec0_0000);

        assert_eq!(
            usize::from(p.header.oemcount),
            4 + 2 + 1 + 16 + 8 + 2,
            "entry count"
        );
    }

    #[test]
    fn interrupt_routing() {
        let mem = mem();
        setup_mptable(&mem, 2).unwrap();
        let p = parse(&mem);

        let isa: Vec<_> = p
            .intsrcs
            .iter()
            .filter(|i| i.srcbus == BUS_ID_ISA)
            .collect();
        assert_eq!(isa.len(), 16);
        for (irq, e) in isa.iter().enumerate() {
            assert_eq!(usize::from(e.srcbusirq), irq);
            assert_eq!(usize::from(e.dstirq), irq);
            assert_eq!(e.dstapic, 2);
            assert_eq!(e.irqtype, MP_IRQ_INT);
            assert_eq!({ e.irqflag }, 0);
        }

        let pci: Vec<_> = p
            .intsrcs
            .iter()
            .filter(|i| i.srcbus == BUS_ID_PCI)
            .collect();
        assert_eq!(pci.len(), 8);
        for e in pci {
            let device = e.srcbusirq >> 2;
            assert_eq!(e.srcbusirq & 3, 0, "INTA#");
            assert_eq!(Some(u32::from(e.dstirq)), pci_inta_gsi(device));
            assert_eq!({ e.irqflag }, 0xf);
        }

        assert_eq!(p.lintsrcs.len(), 2);
        assert_eq!(
            (
                p.lintsrcs[0].irqtype,
                p.lintsrcs[0].destapic,
                p.lintsrcs[0].destapiclint
            ),
            (MP_IRQ_EXTINT, 0xff, 0)
        );
        assert_eq!(
            (
                p.lintsrcs[1].irqtype,
                p.lintsrcs[1].destapic,
                p.lintsrcs[1].destapiclint
            ),
            (MP_IRQ_NMI, 0xff, 1)
        );
    }

    #[test]
    fn pci_gsi_mapping() {
        assert_eq!(pci_inta_gsi(0), None);
        assert_eq!(pci_inta_gsi(1), Some(16));
        assert_eq!(pci_inta_gsi(8), Some(23));
        assert_eq!(pci_inta_gsi(9), None);
    }

    #[test]
    fn largest_table_fits_exactly() {
        let mem = mem();
        setup_mptable(&mem, MAX_CPUS).unwrap();
        let p = parse(&mem);
        assert_eq!(p.processors.len(), usize::from(MAX_CPUS));
        assert!(MPTABLE_START as usize + mptable_size(MAX_CPUS) <= MPTABLE_LIMIT as usize);
        assert!(MPTABLE_START as usize + mptable_size(MAX_CPUS + 1) > MPTABLE_LIMIT as usize);
    }

    #[test]
    fn size_matches_built_table() {
        for n in [1, 2, 8, MAX_CPUS] {
            assert_eq!(build_mptable(n).unwrap().len(), mptable_size(n));
        }
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert!(matches!(build_mptable(0), Err(Error::NoCpus)));
        assert!(matches!(
            build_mptable(MAX_CPUS + 1),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(build_mptable(255), Err(Error::TooManyCpus(255))));
    }

    #[test]
    fn write_fails_without_low_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(setup_mptable(&mem, 1), Err(Error::Write(_))));
    }
}
