//! Per-vCPU CPUID fix-ups.
//!
//! KVM_GET_SUPPORTED_CPUID describes what the host can virtualise, not a machine: topology
//! leaves are zeroed and every vCPU would claim APIC ID 0. [`filter_cpuid`] turns it into a
//! coherent flat topology (one package, `cpu_count` single-threaded cores, APIC ID = vCPU
//! index, matching the MP table) and can hide XSAVE and everything built on it.
//!
//! Why XSAVE can be hidden: when this VMM runs inside a guest of an emulated host (QEMU TCG
//! emulating AMD SVM), TCG does not honour the XSETBV intercept, so an XSETBV executed by our
//! guest lands directly in the level-1 kernel's XCR0 and corrupts it. A guest that never sees
//! XSAVE never executes XSETBV.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Errors adjusting CPUID.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A machine needs at least one vCPU.
    #[error("the vCPU count must be at least 1")]
    NoVcpus,
    /// The vCPU index does not exist in a machine of the given size.
    #[error("vCPU id {vcpu_id} is out of range for {cpu_count} vCPUs")]
    VcpuIdOutOfRange {
        /// The offending vCPU index.
        vcpu_id: u8,
        /// The number of vCPUs in the machine.
        cpu_count: u8,
    },
    /// Adding the topology sub-leaves exceeded KVM's CPUID entry limit.
    #[error("too many CPUID entries: {0}")]
    TooManyEntries(#[source] vmm_sys_util::fam::Error),
}

/// Leaf 1 ECX: FMA (VEX-encoded, needs AVX state).
pub const LEAF1_ECX_FMA: u32 = 1 << 12;
/// Leaf 1 ECX: TSC-deadline timer mode of the local APIC.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: XSAVE/XRSTOR/XSETBV/XGETBV.
pub const LEAF1_ECX_XSAVE: u32 = 1 << 26;
/// Leaf 1 ECX: CR4.OSXSAVE mirror.
pub const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
/// Leaf 1 ECX: AVX.
pub const LEAF1_ECX_AVX: u32 = 1 << 28;
/// Leaf 1 ECX: F16C (VEX-encoded, needs AVX state).
pub const LEAF1_ECX_F16C: u32 = 1 << 29;
/// Leaf 1 ECX: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: EBX[23:16] holds a valid logical processor count.
pub const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Leaf 1 ECX bits that must go when XSAVE is hidden.
const LEAF1_ECX_XSAVE_DEPS: u32 =
    LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE | LEAF1_ECX_AVX | LEAF1_ECX_FMA | LEAF1_ECX_F16C;

const fn bits(list: &[u32]) -> u32 {
    let mut mask = 0;
    let mut i = 0;
    while i < list.len() {
        mask |= 1 << list[i];
        i += 1;
    }
    mask
}

/// Leaf 7.0 EBX: AVX2, MPX, AVX512F/DQ/IFMA/PF/ER/CD/BW/VL; all need XSAVE-managed state.
pub const LEAF7_0_EBX_XSAVE_DEPS: u32 = bits(&[5, 14, 16, 17, 21, 26, 27, 28, 30, 31]);
/// Leaf 7.0 ECX: AVX512_VBMI, PKU, OSPKE, AVX512_VBMI2, CET_SS, VAES, VPCLMULQDQ,
/// AVX512_VNNI, AVX512_BITALG, AVX512_VPOPCNTDQ.
pub const LEAF7_0_ECX_XSAVE_DEPS: u32 = bits(&[1, 3, 4, 6, 7, 9, 10, 11, 12, 14]);
/// Leaf 7.0 EDX: AVX512_4VNNIW, AVX512_4FMAPS, AVX512_VP2INTERSECT, CET_IBT, AMX_BF16,
/// AVX512_FP16, AMX_TILE, AMX_INT8.
pub const LEAF7_0_EDX_XSAVE_DEPS: u32 = bits(&[2, 3, 8, 20, 22, 23, 24, 25]);
/// Leaf 7.1 EAX: AVX_VNNI, AVX512_BF16, AMX_FP16, AVX_IFMA.
pub const LEAF7_1_EAX_XSAVE_DEPS: u32 = bits(&[4, 5, 21, 23]);
/// Leaf 7.1 EDX: AVX_VNNI_INT8, AVX_NE_CONVERT, AMX_COMPLEX, AVX_VNNI_INT16, AVX10, APX.
pub const LEAF7_1_EDX_XSAVE_DEPS: u32 = bits(&[4, 5, 8, 10, 19, 21]);
/// Leaf 1 ECX bit 5 and leaf 0x8000_0001 ECX bit 2: VMX and SVM. The test guest is never a
/// hypervisor itself; offering nested virtualization would only slow its boot and, inside the
/// emulated host, ask for a third level of nesting.
const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF_8000_0001_ECX_SVM: u32 = 1 << 2;

/// Leaf 0x8000_0001 ECX: XOP, LWP, FMA4 (AMD extensions built on AVX/XSAVE state).
pub const LEAF_8000_0001_ECX_XSAVE_DEPS: u32 = bits(&[11, 15, 16]);

/// Leaf 6 ECX: energy-performance bias MSR, which KVM does not emulate.
const LEAF6_ECX_EPB: u32 = 1 << 3;

/// Leaves that only describe XSAVE-managed state (XSAVE layout, AMX tiles, AVX10).
const XSAVE_STATE_LEAVES: [u32; 4] = [0xd, 0x1d, 0x1e, 0x24];

/// Topology level types in leaves 0xB/0x1F ECX[15:8].
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Number of APIC ID bits needed to number `count` items.
fn id_bits(count: u8) -> u32 {
    u32::BITS - (u32::from(count).saturating_sub(1)).leading_zeros()
}

fn topology_entries(function: u32, vcpu_id: u8, cpu_count: u8) -> [kvm_cpuid_entry2; 3] {
    let apic_id = u32::from(vcpu_id);
    let entry = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    [
        // One thread per core: no SMT bits in the APIC ID.
        entry(0, 0, 1, LEVEL_TYPE_SMT),
        // All vCPUs are cores of one package; shifting past the core bits yields package 0.
        entry(1, id_bits(cpu_count), u32::from(cpu_count), LEVEL_TYPE_CORE),
        // An invalid level type ends the enumeration.
        entry(2, 0, 0, 0),
    ]
}

/// Replaces leaf 0xB/0x1F (KVM reports only a zeroed sub-leaf 0) with a full enumeration,
/// but only for leaves the CPUID already has, i.e. that are within the reported max leaf.
fn fix_topology_leaves(cpuid: &mut CpuId, vcpu_id: u8, cpu_count: u8) -> Result<(), Error> {
    for function in [0xb, 0x1f] {
        if !cpuid.as_slice().iter().any(|e| e.function == function) {
            continue;
        }
        cpuid.retain(|e| e.function != function);
        for entry in topology_entries(function, vcpu_id, cpu_count) {
            cpuid.push(entry).map_err(Error::TooManyEntries)?;
        }
    }
    Ok(())
}

/// Rewrites the "logical processors sharing this cache" field (EAX[25:14]) of a leaf 4 or
/// 0x8000_001D entry: L1/L2 belong to one single-threaded core, L3 is shared by the package.
fn cache_sharing(eax: u32, cpu_count: u8) -> u32 {
    let cache_type = eax & 0x1f;
    if cache_type == 0 {
        return eax;
    }
    let level = (eax >> 5) & 0x7;
    let sharing = if level >= 3 { u32::from(cpu_count) } else { 1 };
    (eax & !(0xfff << 14)) | ((sharing - 1) << 14)
}

fn fix_entry(entry: &mut kvm_cpuid_entry2, vcpu_id: u8, cpu_count: u8, hide_xsave: bool) {
    let count = u32::from(cpu_count);
    match entry.function {
        1 => {
            entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(vcpu_id) << 24) | (count << 16);
            if cpu_count > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
            // TSC-deadline (bit 24) is left as the caller provided it: KVM reports it through
            // KVM_CAP_TSC_DEADLINE_TIMER, not through the supported CPUID.
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            entry.ecx &= !LEAF1_ECX_VMX;
            if hide_xsave {
                entry.ecx &= !LEAF1_ECX_XSAVE_DEPS;
            }
        }
        4 => {
            let eax = cache_sharing(entry.eax, cpu_count);
            if eax & 0x1f != 0 {
                // Cores per package minus one; the field is six bits wide.
                let cores = count.min(64) - 1;
                entry.eax = (eax & !(0x3f << 26)) | (cores << 26);
            }
        }
        6 => entry.ecx &= !LEAF6_ECX_EPB,
        7 if hide_xsave => match entry.index {
            0 => {
                entry.ebx &= !LEAF7_0_EBX_XSAVE_DEPS;
                entry.ecx &= !LEAF7_0_ECX_XSAVE_DEPS;
                entry.edx &= !LEAF7_0_EDX_XSAVE_DEPS;
            }
            1 => {
                entry.eax &= !LEAF7_1_EAX_XSAVE_DEPS;
                entry.edx &= !LEAF7_1_EDX_XSAVE_DEPS;
            }
            _ => {}
        },
        f if hide_xsave && XSAVE_STATE_LEAVES.contains(&f) => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        0x8000_0001 => {
            entry.ecx &= !LEAF_8000_0001_ECX_SVM;
            if hide_xsave {
                entry.ecx &= !LEAF_8000_0001_ECX_XSAVE_DEPS;
            }
        }
        0x8000_0008 => {
            // AMD: ECX[7:0] = threads in the package - 1, ECX[15:12] = APIC ID bits for them.
            entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(cpu_count) << 12) | (count - 1);
        }
        0x8000_001d => entry.eax = cache_sharing(entry.eax, cpu_count),
        0x8000_001e => {
            // AMD TOPOEXT: extended APIC ID, core ID with one thread per core, a single node.
            entry.eax = u32::from(vcpu_id);
            entry.ebx = u32::from(vcpu_id);
            entry.ecx = 0;
            entry.edx = 0;
        }
        _ => {}
    }
}

/// Adjusts the KVM-supported CPUID for vCPU `vcpu_id` of a `cpu_count`-vCPU machine.
///
/// The result must be set with KVM_SET_CPUID2 on that vCPU only: the APIC IDs differ per vCPU.
pub fn filter_cpuid(
    cpuid: &mut CpuId,
    vcpu_id: u8,
    cpu_count: u8,
    hide_xsave: bool,
) -> Result<(), Error> {
    if cpu_count == 0 {
        return Err(Error::NoVcpus);
    }
    if vcpu_id >= cpu_count {
        return Err(Error::VcpuIdOutOfRange { vcpu_id, cpu_count });
    }
    for entry in cpuid.as_mut_slice() {
        fix_entry(entry, vcpu_id, cpu_count, hide_xsave);
    }
    fix_topology_leaves(cpuid, vcpu_id, cpu_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 0,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// Cache descriptor EAX for leaf 4 / 0x8000_001D with host-like sharing values.
    fn cache_eax(cache_type: u32, level: u32) -> u32 {
        cache_type | (level << 5) | (15 << 14) | (7 << 26)
    }

    /// A CPUID shaped like KVM_GET_SUPPORTED_CPUID on a host with AVX-512 and AMX.
    fn host_cpuid() -> CpuId {
        CpuId::from_entries(&[
            leaf(0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            leaf(
                1,
                0,
                [
                    0x000a_06a4,
                    0x0f10_0800,
                    // SSE3, XSAVE, OSXSAVE, AVX, FMA, F16C, TSC-deadline, x2APIC.
                    0x0000_0001
                        | LEAF1_ECX_XSAVE
                        | LEAF1_ECX_OSXSAVE
                        | LEAF1_ECX_AVX
                        | LEAF1_ECX_FMA
                        | LEAF1_ECX_F16C
                        | LEAF1_ECX_TSC_DEADLINE
                        | (1 << 21),
                    0x078b_fbff,
                ],
            ),
            leaf(4, 0, [cache_eax(1, 1), 0, 0, 0]),
            leaf(4, 1, [cache_eax(2, 1), 0, 0, 0]),
            leaf(4, 2, [cache_eax(3, 2), 0, 0, 0]),
            leaf(4, 3, [cache_eax(3, 3), 0, 0, 0]),
            leaf(4, 4, [0, 0, 0, 0]),
            leaf(6, 0, [0x4, 0, 0x9, 0]),
            leaf(7, 0, [1, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff]),
            leaf(7, 1, [0xffff_ffff, 0, 0, 0xffff_ffff]),
            leaf(0xb, 0, [0, 0, 0, 0]),
            leaf(0xd, 0, [0x2e7, 0x2988, 0x2988, 0]),
            leaf(0xd, 1, [0xf, 0, 0, 0]),
            leaf(0xd, 2, [0x100, 0x240, 0, 0]),
            leaf(0x1d, 0, [1, 0, 0, 0]),
            leaf(0x1f, 0, [0, 0, 0, 0]),
            leaf(0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            leaf(0x8000_0001, 0, [0, 0, 0xffff_ffff, 0]),
            leaf(0x8000_0008, 0, [0x3030, 0, 0x0000_700f, 0]),
            leaf(0x8000_001d, 0, [cache_eax(1, 1), 0, 0, 0]),
            leaf(0x8000_001d, 1, [cache_eax(3, 3), 0, 0, 0]),
            leaf(0x8000_001e, 0, [0, 0, 0, 0]),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("missing leaf {function:#x}.{index}"))
    }

    fn filtered(vcpu_id: u8, cpu_count: u8, hide_xsave: bool) -> CpuId {
        let mut cpuid = host_cpuid();
        filter_cpuid(&mut cpuid, vcpu_id, cpu_count, hide_xsave).unwrap();
        cpuid
    }

    #[test]
    fn leaf1_apic_id_count_and_hypervisor() {
        let cpuid = filtered(3, 4, false);
        let l1 = find(&cpuid, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        // CLFLUSH size and brand index are kept.
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        // Given as supported, so kept.
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_XSAVE, 0);
    }

    #[test]
    fn leaf1_single_vcpu_has_no_htt() {
        let l1 = find(&filtered(0, 1, false), 1, 0);
        assert_eq!(l1.ebx >> 24, 0);
        assert_eq!((l1.ebx >> 16) & 0xff, 1);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn tsc_deadline_is_not_invented() {
        let mut cpuid = host_cpuid();
        for e in cpuid.as_mut_slice() {
            if e.function == 1 {
                e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
            }
        }
        filter_cpuid(&mut cpuid, 0, 2, false).unwrap();
        assert_eq!(find(&cpuid, 1, 0).ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn extended_topology_leaves_describe_flat_package() {
        for function in [0xb, 0x1f] {
            let cpuid = filtered(5, 6, false);
            let entries: Vec<_> = cpuid
                .as_slice()
                .iter()
                .filter(|e| e.function == function)
                .copied()
                .collect();
            assert_eq!(entries.len(), 3);
            for e in &entries {
                assert_eq!(e.edx, 5, "x2APIC id in {function:#x}.{}", e.index);
                assert_eq!(e.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            }
            let smt = find(&cpuid, function, 0);
            assert_eq!((smt.eax & 0x1f, smt.ebx, smt.ecx), (0, 1, 0x100));
            let core = find(&cpuid, function, 1);
            // 6 vCPUs need 3 APIC ID bits.
            assert_eq!((core.eax & 0x1f, core.ebx, core.ecx), (3, 6, 0x201));
            let end = find(&cpuid, function, 2);
            assert_eq!((end.eax, end.ebx, end.ecx), (0, 0, 2));
        }
    }

    #[test]
    fn topology_leaves_are_not_added_when_absent() {
        let mut cpuid = CpuId::from_entries(&[leaf(1, 0, [0; 4])]).unwrap();
        filter_cpuid(&mut cpuid, 0, 2, false).unwrap();
        assert_eq!(cpuid.as_slice().len(), 1);
    }

    #[test]
    fn filtering_twice_is_stable() {
        let mut cpuid = filtered(1, 2, true);
        let once = cpuid.clone();
        filter_cpuid(&mut cpuid, 1, 2, true).unwrap();
        assert_eq!(cpuid, once);
    }

    #[test]
    fn shift_values_for_various_counts() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(128), 7);
        assert_eq!(id_bits(254), 8);
    }

    #[test]
    fn leaf4_cache_topology() {
        let cpuid = filtered(0, 4, false);
        for index in 0..3 {
            let e = find(&cpuid, 4, index);
            assert_eq!(e.eax >> 26, 3, "cores per package in 4.{index}");
            assert_eq!((e.eax >> 14) & 0xfff, 0, "L1/L2 sharing in 4.{index}");
            // Cache type and level untouched.
            assert_eq!(e.eax & 0x3fff, host_eax(index) & 0x3fff);
        }
        let l3 = find(&cpuid, 4, 3);
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        // The terminating null entry stays null.
        assert_eq!(find(&cpuid, 4, 4).eax, 0);
    }

    fn host_eax(index: u32) -> u32 {
        find(&host_cpuid(), 4, index).eax
    }

    #[test]
    fn leaf6_hides_epb() {
        let l6 = find(&filtered(0, 1, false), 6, 0);
        assert_eq!(l6.ecx, 0x1);
        assert_eq!(l6.eax, 0x4);
    }

    #[test]
    fn amd_leaves() {
        let cpuid = filtered(2, 3, false);
        let l8 = find(&cpuid, 0x8000_0008, 0);
        assert_eq!(l8.ecx & 0xff, 2);
        assert_eq!((l8.ecx >> 12) & 0xf, 2);
        let l1e = find(&cpuid, 0x8000_001e, 0);
        assert_eq!(l1e.eax, 2);
        assert_eq!(l1e.ebx & 0xff, 2);
        assert_eq!((l1e.ebx >> 8) & 0xff, 0);
        assert_eq!(l1e.ecx, 0);
        assert_eq!((find(&cpuid, 0x8000_001d, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&cpuid, 0x8000_001d, 1).eax >> 14) & 0xfff, 2);
    }

    #[test]
    fn xsave_is_kept_by_default() {
        let cpuid = filtered(0, 2, false);
        let l1 = find(&cpuid, 1, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_XSAVE_DEPS, LEAF1_ECX_XSAVE_DEPS);
        assert_eq!(find(&cpuid, 7, 0).ebx, 0xffff_ffff);
        assert_eq!(find(&cpuid, 0xd, 0).eax, 0x2e7);
        assert_eq!(find(&cpuid, 0x8000_0001, 0).ecx, !LEAF_8000_0001_ECX_SVM);
    }

    #[test]
    fn nested_virtualization_is_hidden() {
        let cpuid = filtered(0, 1, false);
        assert_eq!(find(&cpuid, 1, 0).ecx & LEAF1_ECX_VMX, 0);
        assert_eq!(find(&cpuid, 0x8000_0001, 0).ecx & LEAF_8000_0001_ECX_SVM, 0);
    }

    #[test]
    fn hide_xsave_clears_xsave_and_dependents() {
        let cpuid = filtered(1, 2, true);

        let l1 = find(&cpuid, 1, 0);
        for bit in [12, 26, 27, 28, 29] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ECX bit {bit}");
        }
        // Unrelated bits survive.
        assert_ne!(l1.ecx & 1, 0);
        assert_ne!(l1.ecx & (1 << 21), 0);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);

        let l7 = find(&cpuid, 7, 0);
        assert_eq!(l7.eax, 1, "max sub-leaf untouched");
        for bit in [5, 16, 17, 21, 26, 27, 28, 30, 31] {
            assert_eq!(l7.ebx & (1 << bit), 0, "leaf 7 EBX bit {bit}");
        }
        assert_ne!(l7.ebx & 1, 0, "FSGSBASE survives");
        assert_eq!(l7.ebx, !LEAF7_0_EBX_XSAVE_DEPS);
        assert_eq!(l7.ecx, !LEAF7_0_ECX_XSAVE_DEPS);
        assert_eq!(l7.edx, !LEAF7_0_EDX_XSAVE_DEPS);
        let l7_1 = find(&cpuid, 7, 1);
        assert_eq!(l7_1.eax, !LEAF7_1_EAX_XSAVE_DEPS);
        assert_eq!(l7_1.edx, !LEAF7_1_EDX_XSAVE_DEPS);

        for index in 0..3 {
            let d = find(&cpuid, 0xd, index);
            assert_eq!(
                (d.eax, d.ebx, d.ecx, d.edx),
                (0, 0, 0, 0),
                "leaf 0xd.{index}"
            );
        }
        assert_eq!(find(&cpuid, 0x1d, 0).eax, 0);
        assert_eq!(
            find(&cpuid, 0x8000_0001, 0).ecx,
            !(LEAF_8000_0001_ECX_XSAVE_DEPS | LEAF_8000_0001_ECX_SVM)
        );
    }

    #[test]
    fn rejects_bad_counts() {
        let mut cpuid = host_cpuid();
        assert!(matches!(
            filter_cpuid(&mut cpuid, 0, 0, false),
            Err(Error::NoVcpus)
        ));
        assert!(matches!(
            filter_cpuid(&mut cpuid, 2, 2, false),
            Err(Error::VcpuIdOutOfRange {
                vcpu_id: 2,
                cpu_count: 2
            })
        ));
        assert_eq!(cpuid, host_cpuid(), "nothing changed on error");
    }
}
