// SPDX-License-Identifier: GPL-2.0
//! Submission: *prepare* (pin, map and cut the caller's buffer; the kiocb is not taken yet, so
//! any failure is simply returned), then *enqueue* (take a slot, attach the waiter, publish the
//! first wave), then, for a synchronous caller, wait for the outcome.

use core::ffi::c_int;

use kernel::{
    alloc::Flags,
    bindings,
    prelude::*,
    sync::atomic::{Acquire, Relaxed},
    time::Instant,
};

use crate::{
    abi,
    dev::{part_limits, AioDev},
    iocb::{KiocbRef, PendingIocb},
    kdebug,
    mapping::Mapping,
    queue::Queue,
    request::{Cut, Request, Waiter},
};

/// Most bytes one request pins; a larger read or write ends short there (a caller of plain
/// read/write never sees it: the synchronous path continues with further requests).
const MAX_REQUEST_BYTES: usize = 8 << 20;
const PAGE_SIZE: usize = bindings::PAGE_SIZE;
/// Most pages `MAX_REQUEST_BYTES` can touch at any alignment.
const MAX_REQUEST_PAGES: usize = MAX_REQUEST_BYTES / PAGE_SIZE + 1;

/// How a caller submits.
#[derive(Clone, Copy, Default)]
pub(crate) struct SubmitFlags {
    /// Never sleep: not for ring room, not in the allocator (`IOCB_NOWAIT`).
    pub(crate) nowait: bool,
    /// The data must be durable before completion (`IOCB_DSYNC`): a FLUSH ends the request.
    pub(crate) dsync: bool,
}

/// What a submission turned into.
pub(crate) enum Submitted {
    /// Finished synchronously with this many bytes.
    Done(usize),
    /// Queued; the kiocb completes later (`-EIOCBQUEUED`).
    Queued,
}

/// A transfer pinned, mapped and cut, not yet on the device.
struct Prepared {
    op: u32,
    start: u64,
    len: usize,
    mapping: Option<Mapping>,
    cuts: KVec<Cut>,
    /// Descriptors of the first wave: what the request may have on the device at once.
    first_wave: usize,
}

/// Bytes left in a live iterator of either direction.
///
/// # Safety
/// `it` is the live iterator of the running file operation.
pub(crate) unsafe fn iter_len(it: *mut bindings::iov_iter) -> usize {
    // SAFETY: the caller's contract; the view types assert the direction, so pick the one
    // matching `data_source`.
    unsafe {
        if (*it).data_source {
            kernel::iov::IovIterSource::from_raw(it).len()
        } else {
            kernel::iov::IovIterDest::from_raw(it).len()
        }
    }
}

impl AioDev {
    /// Submit one request on `iter` (None for FLUSH) at `pos`. `kiocb` is an asynchronous
    /// caller's kiocb: its completion obligation is taken only once the request is prepared.
    ///
    /// Returns `Done(n)` (the caller returns `n`), `Queued` (the caller returns `-EIOCBQUEUED`;
    /// the kiocb completes later), or an error for the caller to return; in both of those
    /// cases an asynchronous kiocb is left to aio/io_uring.
    ///
    /// # Safety
    /// `iter` is the live iterator, and `kiocb` the kiocb, of the running file operation.
    pub(crate) unsafe fn submit(
        &self,
        op: u32,
        pos: i64,
        iter: Option<*mut bindings::iov_iter>,
        kiocb: Option<KiocbRef>,
        flags: SubmitFlags,
    ) -> Result<Submitted> {
        let _gate = self.gate.read_lock();
        if self.dead.load(Acquire) {
            return Err(ENODEV);
        }
        let q = self.pick_queue();
        // SAFETY: the caller's contract; the device is bound inside the gate while not dead.
        let prepared = match unsafe { self.prepare(q, op, pos, iter, flags) } {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(Submitted::Done(0)),
            // io_uring retries -EAGAIN from a worker that may sleep in the allocator.
            Err(e) if flags.nowait && e == ENOMEM => return Err(EAGAIN),
            Err(e) => return Err(e),
        };
        // SAFETY: from here the request reaches the device: `enqueue` queues the kiocb (the
        // caller returns -EIOCBQUEUED) or disowns it before returning anything else.
        let pending = kiocb.and_then(|k| unsafe { k.into_pending() });
        self.enqueue(q, prepared, pending, flags.nowait)
    }

    /// Pin, map and cut. `None`: nothing to transfer (end of the device, zero length).
    ///
    /// # Safety
    /// `iter` is the live iterator of the running file operation; the device is bound.
    unsafe fn prepare(
        &self,
        q: &Queue,
        op: u32,
        pos: i64,
        iter: Option<*mut bindings::iov_iter>,
        flags: SubmitFlags,
    ) -> Result<Option<Prepared>> {
        let gfp: Flags = if flags.nowait { GFP_NOWAIT } else { GFP_KERNEL };
        let ring_size = q
            .state
            .lock()
            .ring
            .as_ref()
            .map(|r| r.size())
            .ok_or(ENODEV)?;
        let (seg_limit, byte_limit, part_limit) = part_limits(&self.config, ring_size);
        let mut cuts: KVec<Cut> = KVec::new();
        let (mapping, start) = match iter {
            Some(it) => {
                if pos < 0 {
                    return Err(EINVAL);
                }
                let start = pos as u64;
                let cap = self.config.capacity;
                if start >= cap {
                    return if op == abi::op::WRITE {
                        Err(ENOSPC)
                    } else {
                        Ok(None)
                    };
                }
                // SAFETY: `it` is live (caller contract).
                let want = unsafe { iter_len(it) };
                // Larger transfers end short (legal for a file; callers continue).
                let len = (want as u64).min(cap - start).min(MAX_REQUEST_BYTES as u64) as usize;
                if len == 0 {
                    return Ok(None);
                }
                // Room for the pages this iterator can touch, not for the largest request.
                // SAFETY: `it` is live.
                let pages = unsafe { bindings::iov_iter_npages(it, MAX_REQUEST_PAGES as c_int) };
                let pages = usize::try_from(pages)
                    .unwrap_or(0)
                    .clamp(1, MAX_REQUEST_PAGES);
                // SAFETY: `it` is live (caller contract); the device is bound.
                let m = unsafe {
                    Mapping::new(self.raw_dev(), it, len, pages, op == abi::op::READ, gfp)?
                };
                (Some(m), start)
            }
            None => (None, 0),
        };
        if let Some(m) = mapping.as_ref() {
            if m.bytes() == 0 {
                return Ok(None);
            }
            let segs = m.segments();
            // Every part is full but the last, except where the byte limit cuts earlier.
            let estimate = segs.len().div_ceil(seg_limit) + 1;
            cuts.reserve(estimate, gfp)?;
            let mut first = 0;
            while first < segs.len() {
                let mut count = 0;
                let mut bytes = 0usize;
                while first + count < segs.len()
                    && count < seg_limit
                    && bytes + segs[first + count].len as usize <= byte_limit
                {
                    bytes += segs[first + count].len as usize;
                    count += 1;
                }
                if count == 0 {
                    return Err(EINVAL);
                }
                cuts.push(
                    Cut {
                        first,
                        count,
                        bytes,
                        flush: false,
                    },
                    gfp,
                )?;
                first += count;
            }
        }
        let wants_flush = op == abi::op::FLUSH
            || (op == abi::op::WRITE && flags.dsync && self.features & abi::feature::FLUSH != 0);
        if wants_flush {
            cuts.push(Cut::FLUSH, gfp)?;
        }
        let first_wave = cuts.iter().take(part_limit).map(|c| c.count + 2).sum();
        Ok(Some(Prepared {
            op,
            start,
            len: mapping.as_ref().map_or(0, Mapping::bytes),
            mapping,
            cuts,
            first_wave,
        }))
    }

    /// Take a slot once the ring has room for the first wave, attach the waiter and publish.
    fn enqueue(
        &self,
        q: &Queue,
        prepared: Prepared,
        pending: Option<PendingIocb>,
        nowait: bool,
    ) -> Result<Submitted> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let is_async = pending.is_some();
        let (op, len, start, nparts) = (
            prepared.op,
            prepared.len,
            prepared.start,
            prepared.cuts.len(),
        );
        let first_wave = prepared.first_wave;
        let mut prepared = Some(prepared);
        let mut sleeping = false;
        // Returns the slot and generation, or why not. A synchronous request is published in
        // the same critical section; an asynchronous one enters as `Arming`.
        let claimed = q.wait.wait_until(|| {
            let mut st = q.state.lock();
            let verdict = if self.dead.load(Acquire) || st.ring.is_none() {
                Some(Err(ENODEV))
            } else if let Some(slot) = st
                .slot_with_room(first_wave)
                .filter(|_| !self.resetting.load(Acquire))
            {
                let p = prepared.take()?;
                let generation = st.insert(
                    slot,
                    Request {
                        id,
                        generation: 0,
                        op: p.op,
                        len: p.len,
                        start: p.start,
                        cuts: p.cuts,
                        next_cut: 0,
                        next_offset: p.start,
                        in_flight: 0,
                        error: None,
                        short_at: None,
                        mapping: p.mapping,
                        waiter: if is_async {
                            Waiter::Arming
                        } else {
                            Waiter::Sync
                        },
                        progress: Instant::now(),
                        cancel_requested: false,
                        outcome: None,
                    },
                );
                let kick = !is_async && st.publish_parts(slot);
                Some(Ok((slot, generation, kick)))
            } else if nowait {
                Some(Err(EAGAIN))
            } else {
                if !sleeping {
                    sleeping = true;
                    st.room_waiters += 1;
                }
                None
            };
            if verdict.is_some() && sleeping {
                sleeping = false;
                st.room_waiters -= 1;
            }
            verdict
        });
        if sleeping {
            // A fatal signal ended the wait.
            q.state.lock().room_waiters -= 1;
        }
        let (slot, generation, mut kick) = match claimed.and_then(|c| c) {
            Ok(c) => c,
            Err(e) => {
                // `prepared` (its mapping) is released here, outside the lock.
                drop(prepared);
                if let Some(p) = pending {
                    p.disown();
                }
                return Err(e);
            }
        };
        if let Some(p) = pending {
            // aio's cancel hook is armed outside our lock (aio's lock nests outside ours),
            // while the kiocb is not yet reachable from the table.
            p.arm_cancel(crate::recovery::cookie(q.index, slot, generation));
            let mut st = q.state.lock();
            let Some(r) = st.request_mut(slot, generation) else {
                // A reset or unbind failed the request meanwhile (and released its buffer).
                drop(st);
                p.disown();
                return Err(if self.dead.load(Acquire) { ENODEV } else { EIO });
            };
            r.waiter = Waiter::Async(p);
            kick = st.publish_parts(slot);
        }
        self.stats.submitted.fetch_add(1, Relaxed);
        kdebug!(
            "req {}: queued on q{} op {} len {} pos {} in {} part(s)\n",
            id,
            q.index,
            op,
            len,
            start,
            nparts
        );
        if kick {
            self.kick(q);
        }
        if is_async {
            kdebug!("req {}: async kiocb, returning -EIOCBQUEUED\n", id);
            return Ok(Submitted::Queued);
        }
        self.wait_sync(q, slot, generation, id)
    }

    /// Wait for a synchronous request's outcome. Only a fatal signal leaves early: the request
    /// is then abandoned to the completion path, still pinned, while the device may use it.
    fn wait_sync(&self, q: &Queue, slot: usize, generation: u32, id: u64) -> Result<Submitted> {
        let collected = q.wait.wait_until(|| {
            let mut st = q.state.lock();
            match st.request_mut(slot, generation) {
                Some(r) if r.outcome.is_none() => None,
                Some(_) => Some(st.requests[slot].take()),
                // Only this caller frees a synchronous request's slot.
                None => Some(None),
            }
        });
        let req = match collected {
            Ok(Some(req)) => req,
            Ok(None) => return Err(EIO),
            Err(e) => {
                let abandoned = {
                    let mut st = q.state.lock();
                    match st.request_mut(slot, generation) {
                        Some(r) if r.outcome.is_some() || r.in_flight == 0 => {
                            st.requests[slot].take()
                        }
                        Some(r) => {
                            r.waiter = Waiter::Gone;
                            None
                        }
                        None => None,
                    }
                };
                if let Some(mut req) = abandoned {
                    self.release_mapping(req.mapping.take());
                }
                q.wait.wake_all();
                kdebug!("req {}: sync caller killed, request abandoned\n", id);
                return Err(e);
            }
        };
        let mut req = req;
        self.release_mapping(req.mapping.take());
        q.wait.wake_all();
        let res = req.outcome.unwrap_or(EIO.to_errno() as isize);
        kdebug!("req {}: sync completion {}\n", id, res);
        self.stats.sync_completions.fetch_add(1, Relaxed);
        if res < 0 {
            self.stats.errors.fetch_add(1, Relaxed);
            return Err(Error::from_errno(res as i32));
        }
        self.stats.bytes.fetch_add(res as u64, Relaxed);
        Ok(Submitted::Done(res as usize))
    }
}
