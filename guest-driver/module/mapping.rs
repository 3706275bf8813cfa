// SPDX-License-Identifier: GPL-2.0
//! Zero-copy data path: the caller's buffer pages are pinned and DMA-mapped at submit, and
//! unmapped and unpinned (dirtied for reads) when the device has finished with them. The device
//! reads or writes user memory directly; no copy happens on either side.

use kernel::{alloc::Flags, bindings, prelude::*};

/// One contiguous DMA segment.
#[derive(Clone, Copy)]
pub(crate) struct Segment {
    pub(crate) addr: u64,
    pub(crate) len: u32,
}

/// A pinned and mapped user (or kernel) buffer.
pub(crate) struct Mapping {
    dev: *mut bindings::device,
    pages: KVec<*mut bindings::page>,
    segments: KVec<Segment>,
    /// Whether `iov_iter_extract_pages` pinned the pages (user-backed iterators only; bvec and
    /// kvec iterators point at memory their owner keeps alive).
    pinned: bool,
    /// Whether the device writes the memory (a read).
    from_device: bool,
    bytes: usize,
}

// SAFETY: the raw pointers are a device that outlives the mapping (the mapping is released
// before unbind completes) and pinned pages; both may be used from any thread.
unsafe impl Send for Mapping {}

const PAGE_SIZE: usize = bindings::PAGE_SIZE;

fn direction(from_device: bool) -> bindings::dma_data_direction {
    if from_device {
        bindings::dma_data_direction::DMA_FROM_DEVICE
    } else {
        bindings::dma_data_direction::DMA_TO_DEVICE
    }
}

impl Mapping {
    /// Pin and map up to `max_bytes` of `iter` in at most `max_segments` pages, allocating the
    /// page and segment arrays (sized for `max_segments`) with `gfp`. Advances `iter` past what
    /// was taken. The result may be shorter than asked (a short transfer).
    ///
    /// # Safety
    /// `iter` is a live iterator of the running `read_iter`/`write_iter`, and `dev` the bound
    /// device doing the DMA.
    pub(crate) unsafe fn new(
        dev: *mut bindings::device,
        iter: *mut bindings::iov_iter,
        max_bytes: usize,
        max_segments: usize,
        from_device: bool,
        gfp: Flags,
    ) -> Result<Self> {
        // SAFETY: the caller guarantees `iter` is live.
        let iter_type = u32::from(unsafe { (*iter).iter_type });
        let pinned = iter_type == bindings::iter_type_ITER_UBUF
            || iter_type == bindings::iter_type_ITER_IOVEC;
        let mut m = Mapping {
            dev,
            pages: KVec::with_capacity(max_segments, gfp)?,
            segments: KVec::with_capacity(max_segments, gfp)?,
            pinned,
            from_device,
            bytes: 0,
        };
        // One extraction covers one contiguous run of the iterator (one iovec of several), so
        // extract until the request is full, the page budget is spent or the buffer ends.
        while m.bytes < max_bytes && m.pages.len() < max_segments {
            let room = max_segments - m.pages.len();
            let mut first_offset = 0usize;
            // SAFETY: `pages` has capacity `max_segments`, so the spare tail holds `room`
            // pointers.
            let mut buf = unsafe { m.pages.as_mut_ptr().add(m.pages.len()) };
            // SAFETY: `buf` has room for `room` page pointers; the call fills at most that many
            // and advances `iter` by the returned byte count.
            let got = unsafe {
                bindings::iov_iter_extract_pages(
                    iter,
                    &mut buf,
                    max_bytes - m.bytes,
                    room as u32,
                    0,
                    &mut first_offset,
                )
            };
            if got < 0 {
                if m.bytes > 0 {
                    break;
                }
                return Err(Error::from_errno(got as i32));
            }
            if got == 0 {
                break;
            }
            let got = got as usize;
            let npages = (first_offset + got).div_ceil(PAGE_SIZE);
            let first = m.pages.len();
            // SAFETY: the call initialised `npages` entries after the current length.
            unsafe { m.pages.inc_len(npages) };
            let mut left = got;
            let mut offset = first_offset;
            for i in first..first + npages {
                let len = (PAGE_SIZE - offset).min(left);
                // SAFETY: the page is pinned (or owned by the iterator's owner) and `dev` is
                // bound.
                let addr = unsafe {
                    bindings::dma_map_page_attrs(
                        dev,
                        m.pages[i],
                        offset,
                        len,
                        direction(from_device),
                        0,
                    )
                };
                if addr == u64::MAX {
                    // `m` drops: unmaps what was mapped, unpins every extracted page.
                    return Err(ENOMEM);
                }
                // CAST: len <= PAGE_SIZE. One segment per page: within the reserved capacity.
                m.segments.push(
                    Segment {
                        addr,
                        len: len as u32,
                    },
                    gfp,
                )?;
                m.bytes += len;
                left -= len;
                offset = 0;
            }
        }
        Ok(m)
    }

    /// Bytes covered.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The DMA segments.
    pub(crate) fn segments(&self) -> &[Segment] {
        &self.segments
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        for s in self.segments.iter() {
            // SAFETY: each segment was mapped by `new` with this device and direction.
            unsafe {
                bindings::dma_unmap_page_attrs(
                    self.dev,
                    s.addr,
                    s.len as usize,
                    direction(self.from_device),
                    0,
                )
            };
        }
        if self.pinned && !self.pages.is_empty() {
            // SAFETY: the pages were pinned by iov_iter_extract_pages; reads dirtied them.
            unsafe {
                bindings::unpin_user_pages_dirty_lock(
                    self.pages.as_mut_ptr(),
                    self.pages.len(),
                    self.from_device,
                )
            };
        }
    }
}
