//! Model-specific registers every vCPU gets before it first runs.
//!
//! Without firmware nobody initialises the MTRRs or IA32_MISC_ENABLE, and Linux reads both
//! early: an MTRR default type of UC makes all of memory uncached, and a clear FAST_STRING bit
//! disables the fast `rep movs` paths.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// Errors setting the boot MSRs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MSR list could not be wrapped for the ioctl.
    #[error("failed to build the MSR list: {0}")]
    Build(#[source] vmm_sys_util::fam::Error),
    /// KVM_SET_MSRS failed outright.
    #[error("failed to set MSRs: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS stopped at the first MSR it refused.
    #[error("KVM set only {set} of {expected} boot MSRs")]
    Incomplete {
        /// How many MSRs KVM accepted.
        set: usize,
        /// How many MSRs were requested.
        expected: usize,
    },
}

/// IA32_TIME_STAMP_COUNTER.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_STAR.
pub const MSR_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// IA32_CSTAR.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// IA32_FMASK.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// IA32_KERNEL_GS_BASE.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE: fast-string operations enabled.
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// IA32_MTRR_DEF_TYPE: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The MSR values a freshly reset vCPU needs before Linux runs on it.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        // Default type WB with no variable ranges: all RAM cacheable, while the MMIO hole is
        // still treated as uncached because KVM maps device memory UC regardless.
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// [`boot_msr_entries`] in the form KVM_SET_MSRS takes.
pub fn boot_msrs() -> Result<Msrs, Error> {
    Msrs::from_entries(&boot_msr_entries()).map_err(Error::Build)
}

/// Compares the count KVM_SET_MSRS returned with the number requested; KVM stops at the
/// first MSR it rejects and reports how far it got instead of failing.
fn check_all_set(set: usize, expected: usize) -> Result<(), Error> {
    if set == expected {
        Ok(())
    } else {
        Err(Error::Incomplete { set, expected })
    }
}

/// Writes the boot MSRs and fails unless KVM accepted every one.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), Error> {
    let msrs = boot_msrs()?;
    let set = vcpu.set_msrs(&msrs).map_err(Error::SetMsrs)?;
    check_all_set(set, msrs.as_slice().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of(index: u32) -> Option<u64> {
        boot_msr_entries()
            .iter()
            .find(|e| e.index == index)
            .map(|e| e.data)
    }

    #[test]
    fn syscall_msrs_are_zero() {
        for index in [
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_CSTAR,
            MSR_LSTAR,
            MSR_KERNEL_GS_BASE,
            MSR_SYSCALL_MASK,
            MSR_IA32_TSC,
        ] {
            assert_eq!(value_of(index), Some(0), "MSR {index:#x}");
        }
    }

    #[test]
    fn misc_enable_has_fast_string() {
        assert_eq!(value_of(MSR_IA32_MISC_ENABLE), Some(1));
    }

    #[test]
    fn mtrr_default_is_enabled_write_back() {
        assert_eq!(value_of(MSR_MTRR_DEF_TYPE), Some(0x806));
    }

    #[test]
    fn no_duplicates() {
        let entries = boot_msr_entries();
        let mut indices: Vec<u32> = entries.iter().map(|e| e.index).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), entries.len());
    }

    #[test]
    fn fam_wrapper_holds_every_entry() {
        let msrs = boot_msrs().unwrap();
        assert_eq!(msrs.as_slice(), boot_msr_entries().as_slice());
    }

    #[test]
    fn partial_set_names_the_count() {
        assert!(check_all_set(11, 11).is_ok());
        let err = check_all_set(4, 11).unwrap_err();
        assert!(matches!(
            err,
            Error::Incomplete {
                set: 4,
                expected: 11
            }
        ));
        assert_eq!(err.to_string(), "KVM set only 4 of 11 boot MSRs");
    }
}
