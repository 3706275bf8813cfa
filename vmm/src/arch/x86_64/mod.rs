//! x86_64 boot support: guest memory layout, boot tables and initial vCPU state for booting a
//! Linux bzImage through the 64-bit boot protocol without firmware or ACPI.
//!
//! Typical order of use:
//! 1. [`layout::ram_regions`] to build guest memory, then load the kernel at
//!    [`layout::HIMEM_START`] (linux-loader's `BzImage`), the command line at
//!    [`layout::CMDLINE_START`] and the initrd at [`boot::initrd_load_addr`].
//! 2. [`boot::configure_system`] writes the MP table and the zero page.
//! 3. Per vCPU: [`cpuid::filter_cpuid`] on a copy of KVM's supported CPUID, then
//!    [`configure_vcpu`]. The BSP enters at `kernel_load + `[`layout::BZIMAGE_64BIT_ENTRY_OFFSET`].

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;

use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_SET_CPUID2 failed.
    #[error("failed to set CPUID: {0}")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// The boot MSRs could not be set.
    #[error(transparent)]
    Msr(#[from] msr::Error),
    /// Registers could not be set.
    #[error(transparent)]
    Regs(#[from] regs::Error),
    /// The local APIC could not be configured.
    #[error(transparent)]
    Lapic(#[from] lapic::Error),
}

/// Prepares `vcpu` to run the guest.
///
/// Every vCPU gets `kvm_cpuid` (already passed through [`cpuid::filter_cpuid`] for this vCPU),
/// the boot MSRs, a clean FPU and LINT0/LINT1 wiring; the in-kernel irqchip must exist.
///
/// Only the bootstrap processor (`is_bsp`, which must be KVM vCPU 0 — KVM's default BSP) is put
/// into 64-bit mode at `entry` with the boot GDT, page tables in `mem` and `%rsi` pointing at
/// the zero page. Application processors keep their architectural reset state: KVM leaves
/// them waiting for INIT/SIPI, and the guest kernel starts them through its own real-mode
/// trampoline, so 64-bit register state would be wrong for them.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    kvm_cpuid: &CpuId,
    entry: GuestAddress,
    mem: &GuestMemoryMmap,
    is_bsp: bool,
) -> Result<(), Error> {
    // CPUID first: KVM validates some MSR writes and register bits against it.
    vcpu.set_cpuid2(kvm_cpuid).map_err(Error::SetCpuid)?;
    msr::setup_msrs(vcpu)?;
    regs::setup_fpu(vcpu)?;
    if is_bsp {
        regs::setup_regs(vcpu, entry)?;
        regs::setup_sregs(mem, vcpu)?;
    }
    lapic::set_lint(vcpu)?;
    Ok(())
}
