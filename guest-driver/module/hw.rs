// SPDX-License-Identifier: GPL-2.0
//! Register-level access to BAR0 (layout in `abi::bar0` / `abi::common`): the status handshake,
//! feature negotiation and queue programming. Only probe, reset and the doorbell touch registers;
//! the per-request path uses ring memory and the doorbell alone (each access is a VM exit).

use kernel::{io::Io, pci, prelude::*};

use crate::abi;

/// BAR0 size as the sized-BAR type parameter.
pub(crate) const BAR0_SIZE: usize = abi::bar0::SIZE as usize;
/// The mapped BAR0 for the device's bound lifetime.
pub(crate) type Bar0<'a> = pci::Bar<'a, BAR0_SIZE>;

const COMMON: usize = abi::bar0::COMMON as usize;
const CONFIG: usize = abi::bar0::CONFIG as usize;

/// Reset the device and wait until it reports the reset complete (status reads 0).
pub(crate) fn reset(bar: &Bar0<'_>) -> Result {
    bar.write8(0, COMMON + abi::common::DEVICE_STATUS as usize);
    // The device completes a reset once its backing has finished in-flight work: bounded by the
    // slowest backing operation, so poll with a generous limit.
    for _ in 0..5000 {
        if bar.read8(COMMON + abi::common::DEVICE_STATUS as usize) == 0 {
            return Ok(());
        }
        kernel::time::delay::fsleep(kernel::time::Delta::from_micros(200));
    }
    Err(ETIMEDOUT)
}

/// Add `bits` to the device status.
pub(crate) fn set_status(bar: &Bar0<'_>, bits: u8) {
    let off = COMMON + abi::common::DEVICE_STATUS as usize;
    let now = bar.read8(off);
    bar.write8(now | bits, off);
}

/// Current device status.
pub(crate) fn status(bar: &Bar0<'_>) -> u8 {
    bar.read8(COMMON + abi::common::DEVICE_STATUS as usize)
}

/// The device's 64-bit feature word.
pub(crate) fn device_features(bar: &Bar0<'_>) -> u64 {
    let mut features = 0u64;
    for half in 0..2u32 {
        bar.write32(half, COMMON + abi::common::DEVICE_FEATURE_SELECT as usize);
        let v = bar.read32(COMMON + abi::common::DEVICE_FEATURE as usize);
        features |= u64::from(v) << (32 * half);
    }
    features
}

/// Offer `features` to the device, set FEATURES_OK and check it stuck.
pub(crate) fn negotiate(bar: &Bar0<'_>, features: u64) -> Result {
    for half in 0..2u32 {
        bar.write32(half, COMMON + abi::common::DRIVER_FEATURE_SELECT as usize);
        // CAST: taking one 32-bit half of the feature word.
        bar.write32((features >> (32 * half)) as u32, COMMON + abi::common::DRIVER_FEATURE as usize);
    }
    set_status(bar, abi::status::FEATURES_OK);
    if status(bar) & abi::status::FEATURES_OK == 0 {
        return Err(ENODEV);
    }
    Ok(())
}

/// Read the device configuration block.
pub(crate) fn config(bar: &Bar0<'_>) -> abi::DeviceConfig {
    let lo = bar.read32(CONFIG + abi::config::CAPACITY as usize);
    let hi = bar.read32(CONFIG + abi::config::CAPACITY as usize + 4);
    abi::DeviceConfig {
        capacity: u64::from(lo) | (u64::from(hi) << 32),
        max_segments: bar.read32(CONFIG + abi::config::MAX_SEGMENTS as usize),
        max_transfer: bar.read32(CONFIG + abi::config::MAX_TRANSFER as usize),
        num_queues: bar.read16(CONFIG + abi::config::NUM_QUEUES as usize),
        queue_size_max: bar.read16(CONFIG + abi::config::QUEUE_SIZE_MAX as usize),
        alignment: bar.read32(CONFIG + abi::config::ALIGNMENT as usize),
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

fn write_u64(bar: &Bar0<'_>, value: u64, off: usize) -> Result {
    // CAST: the two 32-bit halves of a 64-bit register.
    bar.try_write32(value as u32, off)?;
    bar.try_write32((value >> 32) as u32, off + 4)
}

/// Program and enable queue `index`.
pub(crate) fn setup_queue(bar: &Bar0<'_>, index: u16, q: &QueueAddrs) -> Result {
    bar.write16(index, COMMON + abi::common::QUEUE_SELECT as usize);
    let max = bar.read16(COMMON + abi::common::QUEUE_SIZE as usize);
    if max == 0 || q.size > max {
        return Err(EINVAL);
    }
    bar.write16(q.size, COMMON + abi::common::QUEUE_SIZE as usize);
    bar.write16(q.vector, COMMON + abi::common::QUEUE_MSIX_VECTOR as usize);
    if bar.read16(COMMON + abi::common::QUEUE_MSIX_VECTOR as usize) != q.vector {
        return Err(EBUSY);
    }
    write_u64(bar, q.desc, COMMON + abi::common::QUEUE_DESC as usize)?;
    write_u64(bar, q.driver, COMMON + abi::common::QUEUE_DRIVER as usize)?;
    write_u64(bar, q.device, COMMON + abi::common::QUEUE_DEVICE as usize)?;
    bar.write16(1, COMMON + abi::common::QUEUE_ENABLE as usize);
    Ok(())
}

/// Bring the device from reset (or from ACKNOWLEDGE|DRIVER) to DRIVER_OK with `features` and
/// `queues` (queue *i* is `queues[i]`). Probe and the watchdog's re-initialisation both use it.
pub(crate) fn bring_up(bar: &Bar0<'_>, features: u64, queues: &[QueueAddrs]) -> Result {
    set_status(bar, abi::status::ACKNOWLEDGE | abi::status::DRIVER);
    negotiate(bar, features)?;
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
