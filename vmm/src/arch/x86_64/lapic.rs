//! Local APIC LINT0/LINT1 wiring.
//!
//! On a PC the 8259 PIC output reaches the BSP through LINT0 in ExtINT mode ("virtual wire")
//! and the NMI line is LINT1. KVM resets both LVTs with delivery mode Fixed, so they are set
//! to match what the MP table advertises and what Linux expects before it reprograms the APIC.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

/// Errors configuring the local APIC.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_GET_LAPIC failed.
    #[error("failed to get the local APIC state: {0}")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// KVM_SET_LAPIC failed.
    #[error("failed to set the local APIC state: {0}")]
    SetLapic(#[source] kvm_ioctls::Error),
}

/// Offset of the LVT LINT0 register in the APIC register page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the APIC register page.
pub const APIC_LVT1: usize = 0x360;

/// Delivery mode field (bits 10:8) of an LVT entry.
const DELIVERY_MODE_MASK: u32 = 0x700;
/// LVT delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// LVT delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;

const REGS_LEN: usize = std::mem::size_of::<kvm_lapic_state>();
const _: () = assert!(APIC_LVT0 + 4 <= REGS_LEN && APIC_LVT1 + 4 <= REGS_LEN);

/// Reads the 32-bit APIC register at `offset`; registers are little-endian in the page.
pub fn get_klapic_reg(klapic: &kvm_lapic_state, offset: usize) -> Option<u32> {
    let bytes = klapic.regs.get(offset..offset.checked_add(4)?)?;
    let mut raw = [0u8; 4];
    for (dst, src) in raw.iter_mut().zip(bytes) {
        // `regs` is declared as C chars; reinterpret each as a raw byte.
        *dst = src.to_ne_bytes()[0];
    }
    Some(u32::from_le_bytes(raw))
}

/// Writes the 32-bit APIC register at `offset`; returns `None` if it is outside the page.
pub fn set_klapic_reg(klapic: &mut kvm_lapic_state, offset: usize, value: u32) -> Option<()> {
    let bytes = klapic.regs.get_mut(offset..offset.checked_add(4)?)?;
    for (dst, src) in bytes.iter_mut().zip(value.to_le_bytes()) {
        *dst = std::os::raw::c_char::from_ne_bytes([src]);
    }
    Some(())
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !DELIVERY_MODE_MASK) | ((mode << 8) & DELIVERY_MODE_MASK)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI, leaving the mask and other LVT bits untouched.
pub fn set_lint_modes(klapic: &mut kvm_lapic_state) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        // Both offsets are checked against the page size at compile time above, so the
        // accessors cannot miss.
        if let Some(reg) = get_klapic_reg(klapic, offset) {
            let _ = set_klapic_reg(klapic, offset, with_delivery_mode(reg, mode));
        }
    }
}

/// Configures LINT0/LINT1 of `vcpu`'s in-kernel local APIC (requires KVM_CREATE_IRQCHIP).
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut klapic = vcpu.get_lapic().map_err(Error::GetLapic)?;
    set_lint_modes(&mut klapic);
    vcpu.set_lapic(&klapic).map_err(Error::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_round_trip_is_little_endian() {
        let mut klapic = kvm_lapic_state::default();
        set_klapic_reg(&mut klapic, 0x20, 0x1234_5678).unwrap();
        assert_eq!(klapic.regs[0x20] as u8, 0x78);
        assert_eq!(klapic.regs[0x23] as u8, 0x12);
        assert_eq!(get_klapic_reg(&klapic, 0x20), Some(0x1234_5678));
    }

    #[test]
    fn out_of_page_access_is_refused() {
        let mut klapic = kvm_lapic_state::default();
        assert_eq!(get_klapic_reg(&klapic, 1022), None);
        assert_eq!(set_klapic_reg(&mut klapic, 1021, 1), None);
        assert_eq!(get_klapic_reg(&klapic, usize::MAX), None);
    }

    #[test]
    fn lints_get_extint_and_nmi() {
        let mut klapic = kvm_lapic_state::default();
        // Reset value: masked, Fixed delivery, vector 0.
        set_klapic_reg(&mut klapic, APIC_LVT0, 0x1_0000).unwrap();
        set_klapic_reg(&mut klapic, APIC_LVT1, 0x1_0000).unwrap();
        set_lint_modes(&mut klapic);
        assert_eq!(get_klapic_reg(&klapic, APIC_LVT0), Some(0x1_0700));
        assert_eq!(get_klapic_reg(&klapic, APIC_LVT1), Some(0x1_0400));
    }

    #[test]
    fn only_delivery_mode_bits_change() {
        let mut klapic = kvm_lapic_state::default();
        set_klapic_reg(&mut klapic, APIC_LVT0, 0xffff_ffff).unwrap();
        set_klapic_reg(&mut klapic, APIC_LVT1, 0xffff_f8ff).unwrap();
        set_klapic_reg(&mut klapic, 0x340, 0xdead_beef).unwrap();
        set_lint_modes(&mut klapic);
        assert_eq!(get_klapic_reg(&klapic, APIC_LVT0), Some(0xffff_ffff));
        assert_eq!(get_klapic_reg(&klapic, APIC_LVT1), Some(0xffff_fcff));
        assert_eq!(get_klapic_reg(&klapic, 0x340), Some(0xdead_beef));
    }
}
