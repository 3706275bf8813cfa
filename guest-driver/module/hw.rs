// SPDX-License-Identifier: GPL-2.0
//! Register-level access to BAR0 (layout in `abi::bar0` / `abi::common`): the status handshake,
//! feature negotiation and queue programming. Only probe, reset and the doorbell touch registers;
//! the per-request path uses ring memory and the doorbell alone (each access is a VM exit).

use core::marker::PhantomData;

use kernel::{
    io::{poll::read_poll_timeout, Io},
    pci,
    prelude::*,
    time::Delta,
};

use crate::abi;

/// BAR0 size as the sized-BAR type parameter.
pub(crate) const BAR0_SIZE: usize = abi::bar0::SIZE as usize;
/// The mapped BAR0 for the device's bound lifetime.
pub(crate) type Bar0<'a> = pci::Bar<'a, BAR0_SIZE>;

/// A BAR0 register: its width is its type `T`, its offset `OFF` comes from the shared ABI (the
/// kernel's `register!` takes literal offsets, which would be a second copy of `abi.rs`). The
/// offset is a constant of each use, so the sized BAR checks it at build time.
#[derive(Clone, Copy)]
struct Reg<T, const OFF: usize>(PhantomData<T>);

const fn common_off(reg: u64) -> usize {
    (abi::bar0::COMMON + reg) as usize
}

const fn config_off(reg: u64) -> usize {
    (abi::bar0::CONFIG + reg) as usize
}

macro_rules! regs {
    ($($(#[$doc:meta])* $name:ident: $t:ty = $off:expr;)*) => {
        $($(#[$doc])* const $name: Reg<$t, { $off }> = Reg(PhantomData);)*
    };
}

regs! {
    DEVICE_FEATURE_SELECT: u32 = common_off(abi::common::DEVICE_FEATURE_SELECT);
    DEVICE_FEATURE: u32 = common_off(abi::common::DEVICE_FEATURE);
    DRIVER_FEATURE_SELECT: u32 = common_off(abi::common::DRIVER_FEATURE_SELECT);
    DRIVER_FEATURE: u32 = common_off(abi::common::DRIVER_FEATURE);
    /// Writing 0 resets the device.
    DEVICE_STATUS: u8 = common_off(abi::common::DEVICE_STATUS);
    CONFIG_MSIX_VECTOR: u16 = common_off(abi::common::CONFIG_MSIX_VECTOR);
    QUEUE_SELECT: u16 = common_off(abi::common::QUEUE_SELECT);
    QUEUE_SIZE: u16 = common_off(abi::common::QUEUE_SIZE);
    QUEUE_MSIX_VECTOR: u16 = common_off(abi::common::QUEUE_MSIX_VECTOR);
    QUEUE_ENABLE: u16 = common_off(abi::common::QUEUE_ENABLE);
    /// 64-bit registers are written as two 32-bit halves, low first.
    QUEUE_DESC_LO: u32 = common_off(abi::common::QUEUE_DESC);
    QUEUE_DESC_HI: u32 = common_off(abi::common::QUEUE_DESC) + 4;
    QUEUE_DRIVER_LO: u32 = common_off(abi::common::QUEUE_DRIVER);
    QUEUE_DRIVER_HI: u32 = common_off(abi::common::QUEUE_DRIVER) + 4;
    QUEUE_DEVICE_LO: u32 = common_off(abi::common::QUEUE_DEVICE);
    QUEUE_DEVICE_HI: u32 = common_off(abi::common::QUEUE_DEVICE) + 4;
    CAPACITY_LO: u32 = config_off(abi::config::CAPACITY);
    CAPACITY_HI: u32 = config_off(abi::config::CAPACITY) + 4;
    MAX_SEGMENTS: u32 = config_off(abi::config::MAX_SEGMENTS);
    MAX_TRANSFER: u32 = config_off(abi::config::MAX_TRANSFER);
    NUM_QUEUES: u16 = config_off(abi::config::NUM_QUEUES);
    QUEUE_SIZE_MAX: u16 = config_off(abi::config::QUEUE_SIZE_MAX);
    ALIGNMENT: u32 = config_off(abi::config::ALIGNMENT);
}

impl<const OFF: usize> Reg<u8, OFF> {
    fn read(self, bar: &Bar0<'_>) -> u8 {
        bar.read8(OFF)
    }
    fn write(self, bar: &Bar0<'_>, v: u8) {
        bar.write8(v, OFF)
    }
}

impl<const OFF: usize> Reg<u16, OFF> {
    fn read(self, bar: &Bar0<'_>) -> u16 {
        bar.read16(OFF)
    }
    fn write(self, bar: &Bar0<'_>, v: u16) {
        bar.write16(v, OFF)
    }
}

impl<const OFF: usize> Reg<u32, OFF> {
    fn read(self, bar: &Bar0<'_>) -> u32 {
        bar.read32(OFF)
    }
    fn write(self, bar: &Bar0<'_>, v: u32) {
        bar.write32(v, OFF)
    }
}

/// Reset the device and wait until it reports the reset complete (status reads 0).
pub(crate) fn reset(bar: &Bar0<'_>) -> Result {
    DEVICE_STATUS.write(bar, 0);
    // The device completes a reset once its backing has finished in-flight work: bounded by the
    // slowest backing operation, so poll with a generous limit.
    read_poll_timeout(
        || Ok(DEVICE_STATUS.read(bar)),
        |status| *status == 0,
        Delta::from_micros(200),
        Delta::from_secs(1),
    )
    .map(|_| ())
}

/// Add `bits` to the device status.
pub(crate) fn set_status(bar: &Bar0<'_>, bits: u8) {
    let now = DEVICE_STATUS.read(bar);
    DEVICE_STATUS.write(bar, now | bits);
}

/// Current device status.
pub(crate) fn status(bar: &Bar0<'_>) -> u8 {
    DEVICE_STATUS.read(bar)
}

/// The device's 64-bit feature word.
pub(crate) fn device_features(bar: &Bar0<'_>) -> u64 {
    let mut features = 0u64;
    for half in 0..2u32 {
        DEVICE_FEATURE_SELECT.write(bar, half);
        features |= u64::from(DEVICE_FEATURE.read(bar)) << (32 * half);
    }
    features
}

/// Offer `features` to the device, set FEATURES_OK and check it stuck.
pub(crate) fn negotiate(bar: &Bar0<'_>, features: u64) -> Result {
    for half in 0..2u32 {
        DRIVER_FEATURE_SELECT.write(bar, half);
        // CAST: taking one 32-bit half of the feature word.
        DRIVER_FEATURE.write(bar, (features >> (32 * half)) as u32);
    }
    set_status(bar, abi::status::FEATURES_OK);
    if status(bar) & abi::status::FEATURES_OK == 0 {
        return Err(ENODEV);
    }
    Ok(())
}

/// Read the device configuration block.
pub(crate) fn config(bar: &Bar0<'_>) -> abi::DeviceConfig {
    abi::DeviceConfig {
        capacity: u64::from(CAPACITY_LO.read(bar)) | (u64::from(CAPACITY_HI.read(bar)) << 32),
        max_segments: MAX_SEGMENTS.read(bar),
        max_transfer: MAX_TRANSFER.read(bar),
        num_queues: NUM_QUEUES.read(bar),
        queue_size_max: QUEUE_SIZE_MAX.read(bar),
        alignment: ALIGNMENT.read(bar),
    }
}

/// Addresses of one queue's rings, as programmed into the device.
pub(crate) struct QueueAddrs {
    pub(crate) size: u16,
    pub(crate) desc: u64,
    pub(crate) driver: u64,
    pub(crate) device: u64,
    pub(crate) vector: u16,
}

/// Program and enable queue `index`.
pub(crate) fn setup_queue(bar: &Bar0<'_>, index: u16, q: &QueueAddrs) -> Result {
    QUEUE_SELECT.write(bar, index);
    let max = QUEUE_SIZE.read(bar);
    if max == 0 || q.size > max {
        return Err(EINVAL);
    }
    QUEUE_SIZE.write(bar, q.size);
    QUEUE_MSIX_VECTOR.write(bar, q.vector);
    if QUEUE_MSIX_VECTOR.read(bar) != q.vector {
        return Err(EBUSY);
    }
    // CAST (each pair): the two 32-bit halves of a 64-bit address.
    QUEUE_DESC_LO.write(bar, q.desc as u32);
    QUEUE_DESC_HI.write(bar, (q.desc >> 32) as u32);
    QUEUE_DRIVER_LO.write(bar, q.driver as u32);
    QUEUE_DRIVER_HI.write(bar, (q.driver >> 32) as u32);
    QUEUE_DEVICE_LO.write(bar, q.device as u32);
    QUEUE_DEVICE_HI.write(bar, (q.device >> 32) as u32);
    QUEUE_ENABLE.write(bar, 1);
    Ok(())
}

/// Bring the device from reset (or from ACKNOWLEDGE|DRIVER) to DRIVER_OK with `features`,
/// `queues` (queue *i* is `queues[i]`) and the configuration-change vector `config_vector`.
/// Probe and the watchdog's re-initialisation both use it. A device that refuses the
/// configuration vector still works: the watchdog polls for NEEDS_RESET.
pub(crate) fn bring_up(
    bar: &Bar0<'_>,
    features: u64,
    queues: &[QueueAddrs],
    config_vector: Option<u16>,
) -> Result {
    set_status(bar, abi::status::ACKNOWLEDGE | abi::status::DRIVER);
    negotiate(bar, features)?;
    if let Some(v) = config_vector {
        CONFIG_MSIX_VECTOR.write(bar, v);
        if CONFIG_MSIX_VECTOR.read(bar) != v {
            pr_info!(
                "the device refused configuration vector {}: polling for NEEDS_RESET\n",
                v
            );
        }
    }
    for (i, q) in queues.iter().enumerate() {
        // CAST: the driver uses at most MAX_QUEUES (8) queues.
        setup_queue(bar, i as u16, q)?;
    }
    set_status(bar, abi::status::DRIVER_OK);
    Ok(())
}

/// Ring queue `index`'s doorbell.
pub(crate) fn kick(bar: &Bar0<'_>, index: u16) {
    let off = abi::bar0::NOTIFY as usize + usize::from(index) * abi::bar0::NOTIFY_STRIDE as usize;
    // A run-time offset: checked against the BAR size here rather than at build time.
    if bar.try_write32(u32::from(index), off).is_err() {
        pr_warn!("doorbell offset {:#x} outside BAR0\n", off);
    }
}
