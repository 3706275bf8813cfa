// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The aiodma guest/host ABI: the one place where the guest (kernel module, `/init` tools) and the
//! host (VMM, device) agree on numbers.
//!
//! This file must stay dependency-free and `no_std`-clean: the guest kernel module and the guest
//! tools include it by path (`#[path = ".../device/src/abi.rs"] mod abi;`), the device crate as a
//! regular module. Everything here is plain `pub const` items, `const fn`s and `#[repr(C)]`
//! types; the layout of every struct is asserted at compile time below and by tests in the device
//! crate. All multi-byte fields are little-endian (x86 only).
//!
//! `device/SPEC.md` is the prose contract for the DMA device; this file is its machine form.

#![allow(dead_code)]

/// Version of this ABI. Bumped on any incompatible change; the driver logs it at load.
pub const ABI_VERSION: u32 = 2;

/// PCI identity of the aiodma DMA device. Vendor 0x1234 is the ID QEMU's experimental devices
/// use (edu, bochs-display); no in-tree Linux driver claims device 0xa10d, and Linux's virtio-pci
/// (vendor 0x1af4) never sees it.
pub mod pci_id {
    /// PCI vendor ID.
    pub const VENDOR: u16 = 0x1234;
    /// PCI device ID.
    pub const DEVICE: u16 = 0xa10d;
    /// Subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR: u16 = 0x1234;
    /// Subsystem ID.
    pub const SUBSYSTEM: u16 = 0x0001;
    /// Class code: mass storage (0x01), other (0x80), programming interface 0.
    pub const CLASS: u32 = 0x01_80_00;
    /// Revision: the ABI version.
    pub const REVISION: u8 = super::ABI_VERSION as u8;
}

/// BAR0: one 32-bit, non-prefetchable memory BAR holding every register.
pub mod bar0 {
    /// Size of BAR0 in bytes.
    pub const SIZE: u64 = 0x4000;
    /// Common configuration ([`super::common`]).
    pub const COMMON: u64 = 0x0000;
    /// Device configuration ([`super::DeviceConfig`]), read-only.
    pub const CONFIG: u64 = 0x1000;
    /// Doorbells: queue `q` is kicked by writing `q` (16 or 32 bits) at `NOTIFY + q * NOTIFY_STRIDE`.
    pub const NOTIFY: u64 = 0x2000;
    /// Distance between two queues' doorbells.
    pub const NOTIFY_STRIDE: u64 = 4;
    /// MSI-X table (16 bytes per vector).
    pub const MSIX_TABLE: u64 = 0x3000;
    /// MSI-X pending-bit array.
    pub const MSIX_PBA: u64 = 0x3800;
    /// Most MSI-X vectors the table holds (one per queue plus the config vector).
    pub const MSIX_MAX_VECTORS: u16 = 64;
    /// Most queues a device can have.
    pub const MAX_QUEUES: u16 = MSIX_MAX_VECTORS - 1;
}

/// Common configuration registers at [`bar0::COMMON`]: the virtio 1.x `virtio_pci_common_cfg`
/// layout, so a virtio driver author finds every register where expected. Access each register
/// with its own width.
pub mod common {
    /// u32 RW: which 32-bit half of the device features `DEVICE_FEATURE` shows (0 or 1).
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// u32 RO: device features, half selected by `DEVICE_FEATURE_SELECT`.
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// u32 RW: which half `DRIVER_FEATURE` writes.
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// u32 RW: features the driver accepts, half selected by `DRIVER_FEATURE_SELECT`.
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// u16 RW: MSI-X vector for configuration changes (NEEDS_RESET), or [`super::NO_VECTOR`].
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// u16 RO: number of queues.
    pub const NUM_QUEUES: u64 = 0x12;
    /// u8 RW: device status ([`super::status`]); writing 0 resets the device.
    pub const DEVICE_STATUS: u64 = 0x14;
    /// u8 RO: changes whenever the device configuration changes.
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// u16 RW: which queue the `QUEUE_*` registers address.
    pub const QUEUE_SELECT: u64 = 0x16;
    /// u16 RW: queue size; reads the maximum until written; a power of two.
    pub const QUEUE_SIZE: u64 = 0x18;
    /// u16 RW: MSI-X vector of the selected queue, or [`super::NO_VECTOR`].
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// u16 RW: 1 enables the selected queue (after its addresses and size are set).
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// u16 RO: doorbell index of the selected queue (its doorbell is at
    /// `NOTIFY + QUEUE_NOTIFY_OFF * NOTIFY_STRIDE`).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// u64 RW: guest-physical address of the descriptor table.
    pub const QUEUE_DESC: u64 = 0x20;
    /// u64 RW: guest-physical address of the available ring.
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// u64 RW: guest-physical address of the used ring.
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Size of the common configuration block.
    pub const LEN: u64 = 0x38;
}

/// "No MSI-X vector": the device raises no interrupt for this source.
pub const NO_VECTOR: u16 = 0xffff;

/// Device status bits (virtio 1.x values).
pub mod status {
    /// The driver noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The driver knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: the device starts processing enabled queues.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete (the device clears it if it rejects the features).
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset (e.g. a broken ring).
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Feature bits (64-bit feature word).
pub mod feature {
    /// `OP_FLUSH` is supported (a durable-write barrier for file backings).
    pub const FLUSH: u64 = 1 << 0;
    /// `OP_GET_ID` is supported.
    pub const GET_ID: u64 = 1 << 1;
    /// End-to-end integrity: every valid request's status descriptor is an 8-byte
    /// [`super::integrity`] block carrying the CRC32C of the data as it is in the store.
    pub const INTEGRITY: u64 = 1 << 2;
    /// Ring event index: `used_event` / `avail_event` suppress interrupts and doorbells
    /// (virtio's VIRTIO_RING_F_EVENT_IDX, same bit).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// This is a virtio 1.x-style device (virtio's VIRTIO_F_VERSION_1, same bit); the driver
    /// must accept it.
    pub const VERSION_1: u64 = 1 << 32;
}

/// The status block of a request when [`feature::INTEGRITY`] is negotiated: the status
/// descriptor holds at least [`integrity::STATUS_LEN`] bytes; the device writes the status byte
/// at offset 0, zeros at 1..4 and, at [`integrity::CRC`], the CRC32C (Castagnoli, the iSCSI and
/// ext4 checksum; little-endian) of the request's data as it is in the store: what a READ read
/// from it, what a WRITE stored, the ID a GET_ID wrote, nothing (CRC 0) for FLUSH or an error.
/// The used element's `len` counts the 8 bytes. A driver that computes the CRC of its own
/// buffers and compares detects corruption anywhere on the way between store and guest memory.
pub mod integrity {
    /// Bytes of the status block.
    pub const STATUS_LEN: u32 = 8;
    /// Offset of the little-endian CRC32C in the block.
    pub const CRC: usize = 4;
}

/// Read-only device configuration at [`bar0::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Store size in bytes.
    pub capacity: u64,
    /// Most data descriptors in one request.
    pub max_segments: u32,
    /// Most data bytes in one request.
    pub max_transfer: u32,
    /// Number of queues (same as `common::NUM_QUEUES`).
    pub num_queues: u16,
    /// Largest queue size the device accepts.
    pub queue_size_max: u16,
    /// Preferred alignment of offsets, lengths and buffer addresses, in bytes: aligned
    /// requests take the backing's direct path (O_DIRECT for files).
    pub alignment: u32,
}

/// Offsets inside [`DeviceConfig`].
pub mod config {
    /// u64.
    pub const CAPACITY: u64 = 0x00;
    /// u32.
    pub const MAX_SEGMENTS: u64 = 0x08;
    /// u32.
    pub const MAX_TRANSFER: u64 = 0x0c;
    /// u16.
    pub const NUM_QUEUES: u64 = 0x10;
    /// u16.
    pub const QUEUE_SIZE_MAX: u64 = 0x12;
    /// u32.
    pub const ALIGNMENT: u64 = 0x14;
    /// Size.
    pub const LEN: u64 = 0x18;
}

/// Request operations ([`RequestHeader::op`]).
pub mod op {
    /// Read `length` bytes at `offset` into the data buffers.
    pub const READ: u32 = 0;
    /// Write the data buffers' `length` bytes at `offset`.
    pub const WRITE: u32 = 1;
    /// Make every completed write durable (fdatasync for a file backing); no data buffers.
    pub const FLUSH: u32 = 4;
    /// Write the device's ID string (up to [`super::ID_LEN`] bytes, NUL-padded) into the data
    /// buffers.
    pub const GET_ID: u32 = 8;
}

/// Length of the `GET_ID` string.
pub const ID_LEN: usize = 20;

/// Request status, the last byte the device writes for every request.
pub mod req_status {
    /// Done.
    pub const OK: u8 = 0;
    /// The backing store failed (or an `error` fault was injected).
    pub const IOERR: u8 = 1;
    /// Unknown operation, or one the negotiated features exclude.
    pub const UNSUPP: u8 = 2;
    /// The device rejected the request as malformed (bad header, lengths, directions,
    /// addresses, or a range past the capacity); nothing was transferred.
    pub const MALFORMED: u8 = 3;
}

/// The first descriptor of every request: device-readable, exactly this size.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    /// One of [`op`].
    pub op: u32,
    /// Must be 0.
    pub flags: u32,
    /// Driver's request id, opaque to the device (for logs and tracing).
    pub id: u64,
    /// Byte offset into the store (READ/WRITE; 0 otherwise).
    pub offset: u64,
    /// Data length: must equal the sum of the data descriptors' lengths.
    pub length: u32,
    /// Must be 0.
    pub reserved: u32,
}

/// Split virtqueue descriptor (virtio 1.x layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// [`desc_flags`].
    pub flags: u16,
    /// Next descriptor index when `NEXT` is set.
    pub next: u16,
}

/// Descriptor flags.
pub mod desc_flags {
    /// The chain continues at `next`.
    pub const NEXT: u16 = 1;
    /// The device writes this buffer (otherwise it reads it).
    pub const WRITE: u16 = 2;
    /// Indirect descriptors are not supported: a descriptor with this flag is malformed.
    pub const INDIRECT: u16 = 4;
}

/// Used ring element.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index of the completed chain.
    pub id: u32,
    /// Bytes the device wrote into the chain's device-writable buffers (data + status).
    pub len: u32,
}

/// Split-ring sizes and alignments for a queue of `n` entries.
pub mod ring {
    /// Descriptor table bytes (alignment 16).
    pub const fn desc_table_size(n: u16) -> usize {
        16 * n as usize
    }
    /// Available ring bytes: flags, idx, ring[n], used_event (alignment 2).
    pub const fn avail_size(n: u16) -> usize {
        6 + 2 * n as usize
    }
    /// Used ring bytes: flags, idx, ring[n] of 8 bytes, avail_event (alignment 4).
    pub const fn used_size(n: u16) -> usize {
        6 + 8 * n as usize
    }
    /// Available-ring flag: the driver asks for no interrupts (without EVENT_IDX).
    pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
    /// Used-ring flag: the device asks for no doorbells (without EVENT_IDX).
    pub const USED_F_NO_NOTIFY: u16 = 1;
    /// Largest queue size of a split virtqueue (virtio 1.x); a queue size is a power of two up
    /// to this.
    pub const MAX_QUEUE_SIZE: u16 = 32768;
}

/// Platform ports through which the guest's `/init` talks to the VMM.
///
/// Both are one-byte `out` instructions, so each costs exactly one VM exit and needs no driver.
/// The exit port sits where QEMU's `isa-debug-exit` device is usually placed
/// (`-device isa-debug-exit,iobase=0xf4,iosize=1`), so the same image also reports its exit
/// status under QEMU (which exits with `(status << 1) | 1`).
pub mod platform {
    /// Write the guest command's exit status (0..=255); the VMM stops and exits with it.
    pub const EXIT_PORT: u16 = 0xf4;
    /// Write one of the `PHASE_*` markers; the VMM logs the time since its own start.
    pub const PHASE_PORT: u16 = 0xf5;
    /// `/init` started: guest userspace reached (the boot-time measurement point).
    pub const PHASE_USERSPACE: u8 = 1;
    /// The driver module is loaded and the guest command is about to start.
    pub const PHASE_COMMAND: u8 = 2;
    /// Kernel command-line parameter (read by `/init`) asking it to skip loading the module.
    pub const NO_MODULE_PARAM: &str = "aiodma.nomodule";
}

// Layout checks, evaluated wherever this file is compiled (host and guest alike).
const _: () = assert!(core::mem::size_of::<DeviceConfig>() == config::LEN as usize);
const _: () = assert!(core::mem::offset_of!(DeviceConfig, capacity) == config::CAPACITY as usize);
const _: () =
    assert!(core::mem::offset_of!(DeviceConfig, max_segments) == config::MAX_SEGMENTS as usize);
const _: () =
    assert!(core::mem::offset_of!(DeviceConfig, max_transfer) == config::MAX_TRANSFER as usize);
const _: () =
    assert!(core::mem::offset_of!(DeviceConfig, num_queues) == config::NUM_QUEUES as usize);
const _: () =
    assert!(core::mem::offset_of!(DeviceConfig, queue_size_max) == config::QUEUE_SIZE_MAX as usize);
const _: () = assert!(core::mem::offset_of!(DeviceConfig, alignment) == config::ALIGNMENT as usize);
const _: () = assert!(core::mem::size_of::<RequestHeader>() == 32);
const _: () = assert!(core::mem::size_of::<Descriptor>() == 16);
const _: () = assert!(core::mem::size_of::<UsedElem>() == 8);
const _: () = assert!(bar0::COMMON + common::LEN <= bar0::CONFIG);
const _: () = assert!(bar0::CONFIG + config::LEN <= bar0::NOTIFY);
const _: () =
    assert!(bar0::NOTIFY + bar0::MAX_QUEUES as u64 * bar0::NOTIFY_STRIDE <= bar0::MSIX_TABLE);
const _: () = assert!(bar0::MSIX_TABLE + 16 * bar0::MSIX_MAX_VECTORS as u64 <= bar0::MSIX_PBA);
const _: () = assert!(bar0::MSIX_PBA + 8 <= bar0::SIZE);

/// `/dev/aiodmaN` ioctls (the driver's userspace ABI).
pub mod ioctl {
    /// `_IOR('A', 1, DeviceInfo)`: device and driver information.
    pub const INFO: u32 = (2 << 30)
        | ((core::mem::size_of::<super::DeviceInfo>() as u32) << 16)
        | ((b'A' as u32) << 8)
        | 1;
}

/// What `ioctl::INFO` returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// [`ABI_VERSION`] the driver was built with.
    pub abi_version: u32,
    /// Queues in use.
    pub num_queues: u32,
    /// Device capacity in bytes.
    pub capacity: u64,
    /// Negotiated features.
    pub features: u64,
    /// Most bytes per device request.
    pub max_transfer: u32,
    /// Most data segments per device request.
    pub max_segments: u32,
    /// Requests submitted to the device.
    pub submitted: u64,
    /// Asynchronous kiocbs completed through `ki_complete`.
    pub async_completions: u64,
    /// Synchronous requests completed.
    pub sync_completions: u64,
    /// Requests that ended with an error.
    pub errors: u64,
    /// Bytes transferred.
    pub bytes: u64,
    /// Requests failed with -ETIMEDOUT by the driver's watchdog.
    pub timeouts: u64,
    /// Requests cancelled through `io_cancel`.
    pub cancels: u64,
    /// Device resets the driver performed to recover.
    pub resets: u64,
}

const _: () = assert!(core::mem::size_of::<DeviceInfo>() == 96);
