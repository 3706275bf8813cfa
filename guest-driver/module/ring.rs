// SPDX-License-Identifier: GPL-2.0
//! One split virtqueue in DMA-coherent memory (layout in `abi::ring`), plus a per-descriptor
//! request area holding each request's header and status byte.
//!
//! The ring is driven under its queue's lock; the device reads and writes the same memory
//! concurrently, so every access is volatile and ordered with DMA barriers as virtio requires.

use kernel::{
    device::{Bound, Device},
    dma::Coherent,
    prelude::*,
    sync::barrier::{self, dma_mb, smp_mb},
    transmute::{AsBytes, FromBytes},
};

use crate::{abi, queue::Lie};

/// Bytes per request slot: the 32-byte header, then the status byte.
const SLOT_BYTES: usize = 64;
const STATUS_OFFSET: usize = core::mem::size_of::<abi::RequestHeader>();

/// A split virtqueue owned by the driver.
pub(crate) struct Ring {
    mem: Coherent<[u8]>,
    size: u16,
    avail: usize,
    used: usize,
    slots: usize,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
    event_idx: bool,
}

const fn align_up(v: usize, a: usize) -> usize {
    (v + a - 1) & !(a - 1)
}

impl Ring {
    /// Allocate a zeroed ring of `size` entries (a power of two).
    pub(crate) fn new(dev: &Device<Bound>, size: u16, event_idx: bool) -> Result<Self> {
        if size == 0 || !size.is_power_of_two() {
            return Err(EINVAL);
        }
        let avail = abi::ring::desc_table_size(size);
        let used = align_up(avail + abi::ring::avail_size(size), 4);
        let slots = align_up(used + abi::ring::used_size(size), SLOT_BYTES);
        let total = slots + usize::from(size) * SLOT_BYTES;
        let mem = Coherent::<u8>::zeroed_slice(dev, total, GFP_KERNEL)?;
        let mut ring = Ring {
            mem,
            size,
            avail,
            used,
            slots,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
            event_idx,
        };
        for i in 0..size {
            // The free list threads through `next`; the last entry's `next` is never followed.
            ring.write_desc(i, 0, 0, 0, i.wrapping_add(1));
        }
        Ok(ring)
    }

    fn base(&self) -> *mut u8 {
        self.mem.as_mut_ptr().cast::<u8>()
    }

    fn write<T: AsBytes>(&self, off: usize, v: T) {
        debug_assert!(off + core::mem::size_of::<T>() <= self.mem.size());
        // SAFETY: every caller passes an offset computed from the layout fixed in `new`, which
        // lies inside the allocation and is aligned for `T` (the virtqueue layout aligns every
        // field naturally; the allocation is page aligned); `T: AsBytes` has no padding. The
        // memory lives as long as `self`. Volatile because the device accesses it concurrently.
        unsafe { core::ptr::write_volatile(self.base().add(off).cast::<T>(), v) }
    }

    fn read<T: FromBytes>(&self, off: usize) -> T {
        debug_assert!(off + core::mem::size_of::<T>() <= self.mem.size());
        // SAFETY: as in `write`; any bit pattern the device left is a valid `T: FromBytes`.
        unsafe { core::ptr::read_volatile(self.base().add(off).cast::<T>()) }
    }

    /// Forget every chain and index after a device reset: the device starts over at index 0.
    pub(crate) fn reset(&mut self) {
        // The allocation is a whole number of 64-byte request slots past the rings.
        for off in (0..self.mem.size()).step_by(8) {
            self.write::<u64>(off, 0);
        }
        self.free_head = 0;
        self.num_free = self.size;
        self.avail_idx = 0;
        self.last_used = 0;
        for i in 0..self.size {
            self.write_desc(i, 0, 0, 0, i.wrapping_add(1));
        }
    }

    /// Number of entries.
    pub(crate) fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors.
    pub(crate) fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Bus addresses of (descriptor table, available ring, used ring).
    pub(crate) fn addrs(&self) -> (u64, u64, u64) {
        let base = self.mem.dma_address();
        (base, base + self.avail as u64, base + self.used as u64)
    }

    fn write_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let off = usize::from(i) * 16;
        self.write(off, addr);
        self.write(off + 8, len);
        self.write(off + 12, flags);
        self.write(off + 14, next);
    }

    fn desc_next(&self, i: u16) -> u16 {
        self.read(usize::from(i) * 16 + 14)
    }

    /// Take `n` descriptors for one chain; returns their indices, head first.
    pub(crate) fn alloc_chain(&mut self, n: usize, out: &mut KVec<u16>) -> Result<()> {
        if n == 0 || n > usize::from(self.num_free) {
            return Err(ENOSPC);
        }
        out.clear();
        let mut i = self.free_head;
        for _ in 0..n {
            out.push(i, GFP_ATOMIC)?;
            i = self.desc_next(i);
        }
        self.free_head = i;
        // CAST: n <= num_free <= size, a u16.
        self.num_free -= n as u16;
        Ok(())
    }

    /// Fill descriptor `chain[k]` (linking it to `chain[k + 1]` if there is one).
    pub(crate) fn set_desc(
        &mut self,
        chain: &[u16],
        k: usize,
        addr: u64,
        len: u32,
        writable: bool,
    ) {
        let last = k + 1 == chain.len();
        let mut flags = if writable { abi::desc_flags::WRITE } else { 0 };
        let next = if last { 0 } else { chain[k + 1] };
        if !last {
            flags |= abi::desc_flags::NEXT;
        }
        self.write_desc(chain[k], addr, len, flags, next);
    }

    /// Return a chain's descriptors (walking `NEXT`) to the free list.
    pub(crate) fn free_chain(&mut self, head: u16) {
        let mut i = head;
        let mut count = 0u16;
        loop {
            let flags: u16 = self.read(usize::from(i) * 16 + 12);
            count += 1;
            if flags & abi::desc_flags::NEXT == 0 || count >= self.size {
                break;
            }
            i = self.desc_next(i);
        }
        // The chain's tail now points at the old free list.
        let tail = i;
        self.write(usize::from(tail) * 16 + 14, self.free_head);
        self.write::<u16>(usize::from(tail) * 16 + 12, 0);
        self.free_head = head;
        self.num_free += count;
    }

    /// Write the request header into `head`'s slot; returns the slot's bus address.
    pub(crate) fn put_header(&mut self, head: u16, h: &abi::RequestHeader) -> u64 {
        let off = self.slots + usize::from(head) * SLOT_BYTES;
        self.write(off, h.op);
        self.write(off + 4, h.flags);
        self.write(off + 8, h.id);
        self.write(off + 16, h.offset);
        self.write(off + 24, h.length);
        self.write(off + 28, h.reserved);
        // Poison the status so a completion without a status byte is visible.
        self.write::<u8>(off + STATUS_OFFSET, crate::queue::STATUS_POISON);
        self.mem.dma_address() + off as u64
    }

    /// Bus address of `head`'s status byte.
    pub(crate) fn status_addr(&self, head: u16) -> u64 {
        self.mem.dma_address()
            + (self.slots + usize::from(head) * SLOT_BYTES + STATUS_OFFSET) as u64
    }

    /// The status byte the device wrote for `head`.
    pub(crate) fn status(&self, head: u16) -> u8 {
        self.read(self.slots + usize::from(head) * SLOT_BYTES + STATUS_OFFSET)
    }

    /// Make `head` available to the device. Returns whether the device wants a doorbell.
    pub(crate) fn publish(&mut self, head: u16) -> bool {
        let slot = usize::from(self.avail_idx & (self.size - 1));
        self.write(self.avail + 4 + 2 * slot, head);
        let old = self.avail_idx;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The entry must be visible before the index that publishes it.
        dma_mb(barrier::Write);
        self.write(self.avail + 2, self.avail_idx);
        // The index store must be visible before we read the device's avail_event / flags.
        smp_mb(barrier::Full);
        if self.event_idx {
            let event: u16 = self.read(self.used + 4 + 8 * usize::from(self.size));
            // virtio's vring_need_event: did the index move past the event the device asked for?
            self.avail_idx.wrapping_sub(event).wrapping_sub(1) < self.avail_idx.wrapping_sub(old)
        } else {
            let flags: u16 = self.read(self.used);
            flags & abi::ring::USED_F_NO_NOTIFY == 0
        }
    }

    /// The next completion: (head id as the device wrote it, bytes written by the device), or
    /// `IndexJump` when the used index claims more new elements than the ring holds. The caller
    /// checks the id and length against what it has on the device (`QueueState::part_done`).
    pub(crate) fn pop_used(&mut self) -> Result<Option<(u32, u32)>, Lie> {
        let idx: u16 = self.read(self.used + 2);
        if idx == self.last_used {
            return Ok(None);
        }
        if idx.wrapping_sub(self.last_used) > self.size {
            return Err(Lie::IndexJump {
                seen: self.last_used,
                now: idx,
            });
        }
        // The element must be read after the index that published it.
        dma_mb(barrier::Read);
        let slot = usize::from(self.last_used & (self.size - 1));
        let id: u32 = self.read(self.used + 4 + 8 * slot);
        let len: u32 = self.read(self.used + 4 + 8 * slot + 4);
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some((id, len)))
    }

    /// Ask for an interrupt at the next completion. Returns true if completions arrived
    /// meanwhile (the caller must poll again instead of waiting).
    pub(crate) fn arm_interrupt(&mut self) -> bool {
        if self.event_idx {
            self.write(self.avail + 4 + 2 * usize::from(self.size), self.last_used);
        }
        smp_mb(barrier::Full);
        let idx: u16 = self.read(self.used + 2);
        idx != self.last_used
    }
}
