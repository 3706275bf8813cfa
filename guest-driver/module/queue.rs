// SPDX-License-Identifier: GPL-2.0
//! One queue's lock-held bookkeeping: the ring, the part table (by chain head) and the request
//! table (by slot). Every function here runs under the queue's `SpinLockIrq` and neither sleeps
//! nor allocates (capacities are reserved at probe); finished requests leave as `Finished`.

use kernel::{
    prelude::*,
    sync::SpinLockIrq,
    time::{Instant, Monotonic},
};

use crate::{
    abi,
    request::{Finished, Request, Waiter},
    ring::Ring,
    wait::KillableWait,
};

/// One descriptor chain of a request on the device.
#[derive(Clone, Copy)]
struct Part {
    request: u16,
    /// The request's generation: a late part of a failed request cannot touch its successor.
    generation: u32,
    len: usize,
    op: u32,
}

pub(crate) struct QueueState {
    pub(crate) ring: Option<Ring>,
    /// Indexed by chain head.
    parts: KVec<Option<Part>>,
    /// Request slots.
    pub(crate) requests: KVec<Option<Request>>,
    generations: KVec<u32>,
    /// Descriptor indices of the chain being published (capacity: the ring size).
    chain: KVec<u16>,
    /// At most this many parts of one request on the device (half the ring's descriptors).
    part_limit: u16,
    /// Submitters sleeping for ring room or a free slot.
    pub(crate) room_waiters: u32,
    /// When a part was last published or returned on this queue.
    pub(crate) last_progress: Instant<Monotonic>,
}

/// One queue: its state and the sleepers waiting on it.
#[pin_data]
pub(crate) struct Queue {
    pub(crate) index: u16,
    #[pin]
    pub(crate) state: SpinLockIrq<QueueState>,
    /// Submitters waiting for room, synchronous callers waiting for their outcome.
    #[pin]
    pub(crate) wait: KillableWait,
}

impl QueueState {
    /// Bookkeeping for `ring` (of `ring.size()` entries).
    pub(crate) fn new(ring: Ring, part_limit: u16) -> Result<Self> {
        let size = usize::from(ring.size());
        let mut parts = KVec::with_capacity(size, GFP_KERNEL)?;
        let mut requests = KVec::with_capacity(size, GFP_KERNEL)?;
        let mut generations = KVec::with_capacity(size, GFP_KERNEL)?;
        for _ in 0..size {
            parts.push(None, GFP_KERNEL)?;
            requests.push(None, GFP_KERNEL)?;
            generations.push(0, GFP_KERNEL)?;
        }
        Ok(QueueState {
            ring: Some(ring),
            parts,
            requests,
            generations,
            chain: KVec::with_capacity(size, GFP_KERNEL)?,
            part_limit,
            room_waiters: 0,
            last_progress: Instant::now(),
        })
    }

    /// A free slot, if the ring has room for `first_wave` descriptors.
    pub(crate) fn slot_with_room(&self, first_wave: usize) -> Option<usize> {
        let room = self
            .ring
            .as_ref()
            .is_some_and(|r| usize::from(r.num_free()) >= first_wave);
        if room {
            self.requests.iter().position(Option::is_none)
        } else {
            None
        }
    }

    /// Put `req` in free slot `slot` under a new generation, which it returns.
    pub(crate) fn insert(&mut self, slot: usize, mut req: Request) -> u32 {
        let generation = self.generations[slot].wrapping_add(1);
        self.generations[slot] = generation;
        req.generation = generation;
        self.requests[slot] = Some(req);
        generation
    }

    /// Request `slot`, if it is still generation `generation`.
    pub(crate) fn request_mut(&mut self, slot: usize, generation: u32) -> Option<&mut Request> {
        self.requests
            .get_mut(slot)
            .and_then(Option::as_mut)
            .filter(|r| r.generation == generation)
    }

    /// Publish request `slot`'s next parts while the ring has room and the request stays
    /// within `part_limit` parts on the device. Returns whether the device needs a kick.
    pub(crate) fn publish_parts(&mut self, slot: usize) -> bool {
        let QueueState {
            ring,
            parts,
            requests,
            chain,
            part_limit,
            last_progress,
            ..
        } = self;
        let (Some(ring), Some(Some(req))) = (ring.as_mut(), requests.get_mut(slot)) else {
            return false;
        };
        let mut kick = false;
        while req.wants_more() && req.next_is_ready() && req.in_flight < *part_limit {
            let cut = req.cuts[req.next_cut];
            if ring.alloc_chain(cut.count + 2, chain).is_err() {
                // Parts on the device (this request's or others') return descriptors; the
                // completion path then publishes the rest.
                break;
            }
            let op = if cut.flush { abi::op::FLUSH } else { req.op };
            let head = chain[0];
            let header = abi::RequestHeader {
                op,
                flags: 0,
                id: req.id,
                offset: if cut.flush { 0 } else { req.next_offset },
                // CAST: bytes <= max_transfer, a u32.
                length: cut.bytes as u32,
                reserved: 0,
            };
            let haddr = ring.put_header(head, &header);
            ring.set_desc(
                chain,
                0,
                haddr,
                core::mem::size_of::<abi::RequestHeader>() as u32,
                false,
            );
            if let Some(m) = req.mapping.as_ref() {
                for (k, s) in m.segments()[cut.first..cut.first + cut.count]
                    .iter()
                    .enumerate()
                {
                    ring.set_desc(chain, k + 1, s.addr, s.len, op != abi::op::WRITE);
                }
            }
            let status_addr = ring.status_addr(head);
            ring.set_desc(chain, cut.count + 1, status_addr, 1, true);
            // CAST: slot < ring size.
            parts[usize::from(head)] = Some(Part {
                request: slot as u16,
                generation: req.generation,
                len: cut.bytes,
                op,
            });
            kick |= ring.publish(head);
            req.next_cut += 1;
            req.next_offset += cut.bytes as u64;
            req.in_flight += 1;
            req.progress = Instant::now();
            *last_progress = req.progress;
        }
        if req.next_cut > 1 && req.next_cut < req.cuts.len() {
            crate::kdebug!(
                "req {}: {} of {} parts published\n",
                req.id,
                req.next_cut,
                req.cuts.len()
            );
        }
        kick
    }

    /// A part came back: fold its result into its request, publish the request's next parts,
    /// or take it apart once settled. Returns whether the device needs a kick, and a finished
    /// request to release outside the lock.
    pub(crate) fn part_done(
        &mut self,
        head: u16,
        status: u8,
        used_len: u32,
    ) -> (bool, Option<Finished>) {
        let Some(part) = self.parts.get_mut(usize::from(head)).and_then(Option::take) else {
            // A head we never published (or already saw): the device lies; ignore it, the
            // request it might belong to times out.
            return (false, None);
        };
        if let Some(ring) = self.ring.as_mut() {
            ring.free_chain(head);
        }
        self.last_progress = Instant::now();
        let slot = usize::from(part.request);
        let Some(req) = self.request_mut(slot, part.generation) else {
            return (false, None);
        };
        req.part_returned(part.op, part.len, status, used_len);
        if req.wants_more() {
            return (self.publish_parts(slot), None);
        }
        if !req.settled() {
            return (false, None);
        }
        let result = req.result();
        (false, Finished::take(&mut self.requests, slot, result))
    }

    /// After descriptors came back (or a request was abandoned): publish waiting parts of every
    /// request and take apart requests that settled without a part on the device. Returns
    /// whether the device needs a kick, and one finished request (call again until none).
    pub(crate) fn progress(&mut self) -> (bool, Option<Finished>) {
        let mut kick = false;
        for slot in 0..self.requests.len() {
            let Some(req) = self.requests[slot].as_ref() else {
                continue;
            };
            if req.wants_more() {
                kick |= self.publish_parts(slot);
            } else if req.settled()
                && req.outcome.is_none()
                && !matches!(req.waiter, Waiter::Arming)
            {
                let result = req.result();
                if let Some(f) = Finished::take(&mut self.requests, slot, result) {
                    return (kick, Some(f));
                }
            }
        }
        (kick, None)
    }

    /// The device was reset: forget every chain (the device starts over at index 0) and fail
    /// every request still owned here, in one critical section so that nothing is published in
    /// between: `late_res` for a request with a part older than `timeout_ms`, `other_res` for
    /// the rest. Their buffers are released afterwards (`take_failed`). Returns how many
    /// requests timed out.
    pub(crate) fn forget_device(
        &mut self,
        timeout_ms: u32,
        late_res: isize,
        other_res: isize,
    ) -> u64 {
        for p in self.parts.iter_mut() {
            *p = None;
        }
        if let Some(ring) = self.ring.as_mut() {
            ring.reset();
        }
        self.last_progress = Instant::now();
        let mut late_count = 0;
        for r in self
            .requests
            .iter_mut()
            .flatten()
            .filter(|r| r.outcome.is_none())
        {
            let late = r.overdue(timeout_ms);
            if late {
                late_count += 1;
                crate::kdebug!("req {}: timed out\n", r.id);
            }
            r.forget_parts(if late { late_res } else { other_res });
        }
        late_count
    }

    /// After `forget_device`: take the next failed request apart. Returns `None` once none is
    /// left, else what to release outside the lock (nothing for a synchronous request: its
    /// caller is woken and collects its outcome).
    pub(crate) fn take_failed(&mut self) -> Option<Option<Finished>> {
        let slot = self.requests.iter().position(|r| {
            r.as_ref()
                .is_some_and(|r| r.outcome.is_none() && r.error.is_some() && r.settled())
        })?;
        let result = self.requests[slot].as_ref()?.result();
        Some(Finished::take(&mut self.requests, slot, result))
    }

    /// Whether the queue is stuck: a part overdue, or submitters waiting for room while nothing
    /// moved for `timeout_ms`.
    pub(crate) fn stalled(&self, timeout_ms: u32) -> bool {
        (self.room_waiters > 0 && self.last_progress.elapsed().as_millis() > i64::from(timeout_ms))
            || self
                .requests
                .iter()
                .flatten()
                .any(|r| r.overdue(timeout_ms))
    }
}
