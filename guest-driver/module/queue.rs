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
    dev::Stats,
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
    /// Where the part's data starts in the request (bytes).
    at: usize,
    len: usize,
    op: u32,
}

/// How the device lied in its used ring. Any of these means the ring cannot be trusted any
/// more: the queue stops being served and the device is reset (`recovery.rs`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lie {
    /// The used index moved more than the queue size past the last element seen.
    IndexJump { seen: u16, now: u16 },
    /// A used element names a head index outside the ring.
    IdOutOfRange(u32),
    /// A used element names a descriptor that heads no chain on the device.
    NotInFlight(u16),
    /// A used element names a head whose chain already came back (and was not published again).
    Duplicate(u16),
    /// A used element names a chain whose status byte the device never wrote (it still holds
    /// the poison written at publication): the chain is not finished, whatever the element says.
    NoStatus(u16),
    /// A used element claims more bytes than the chain's device-writable buffers hold.
    Overlong { head: u16, len: u32, max: usize },
    /// A chain on the device belongs to no live request (driver bookkeeping out of step).
    Stale(u16),
}

impl kernel::fmt::Display for Lie {
    fn fmt(&self, f: &mut kernel::fmt::Formatter<'_>) -> kernel::fmt::Result {
        match *self {
            Lie::IndexJump { seen, now } => write!(
                f,
                "used index jumped from {seen} to {now}, more than the ring holds"
            ),
            Lie::IdOutOfRange(id) => write!(f, "id {id} is outside the ring"),
            Lie::NotInFlight(h) => write!(f, "id {h} heads no chain on the device"),
            Lie::Duplicate(h) => write!(f, "id {h} came back twice"),
            Lie::NoStatus(h) => write!(
                f,
                "id {h} is not finished: its status byte was never written"
            ),
            Lie::Overlong { head, len, max } => write!(
                f,
                "id {head} claims {len} bytes written, its chain holds {max}"
            ),
            Lie::Stale(h) => write!(f, "id {h} belongs to no live request"),
        }
    }
}

/// Poison in a chain's status byte until the device writes it (`Ring::put_header`). A device
/// status of 0xff is not one the device defines, so it is taken for a missing status.
pub(crate) const STATUS_POISON: u8 = 0xff;

pub(crate) struct QueueState {
    pub(crate) ring: Option<Ring>,
    /// Indexed by chain head.
    parts: KVec<Option<Part>>,
    /// Request slots.
    pub(crate) requests: KVec<Option<Request>>,
    generations: KVec<u32>,
    /// Indexed by descriptor: the descriptor headed a chain that came back and has not been part
    /// of a published chain since (tells a duplicate used element from an unknown one).
    returned: KVec<bool>,
    /// The device lied in this queue's used ring: nothing more is taken from it or published on
    /// it until the device is reset (`forget_device`).
    pub(crate) broken: bool,
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
        let mut returned = KVec::with_capacity(size, GFP_KERNEL)?;
        for _ in 0..size {
            parts.push(None, GFP_KERNEL)?;
            requests.push(None, GFP_KERNEL)?;
            generations.push(0, GFP_KERNEL)?;
            returned.push(false, GFP_KERNEL)?;
        }
        Ok(QueueState {
            ring: Some(ring),
            parts,
            requests,
            generations,
            returned,
            broken: false,
            chain: KVec::with_capacity(size, GFP_KERNEL)?,
            part_limit,
            room_waiters: 0,
            last_progress: Instant::now(),
        })
    }

    /// A free slot, if the ring has room for `first_wave` descriptors (never on a queue whose
    /// device lied: the request would only fail at the reset).
    pub(crate) fn slot_with_room(&self, first_wave: usize) -> Option<usize> {
        let room = !self.broken
            && self
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
        if self.broken {
            return false;
        }
        let QueueState {
            ring,
            parts,
            requests,
            returned,
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
            for d in chain.iter() {
                if let Some(r) = returned.get_mut(usize::from(*d)) {
                    *r = false;
                }
            }
            // CAST: slot < ring size.
            parts[usize::from(head)] = Some(Part {
                request: slot as u16,
                generation: req.generation,
                // CAST: the device offset of a part never precedes its request's start.
                at: (req.next_offset - req.start) as usize,
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

    /// A used element came back for chain `id` with `used_len`: check it against what is on
    /// the device, fold its result into its request, publish the request's next parts, or take
    /// it apart once settled. Returns whether the device needs a kick and a finished request to
    /// release outside the lock, or how the element lies (then nothing was touched).
    pub(crate) fn part_done(
        &mut self,
        id: u32,
        used_len: u32,
        stats: &Stats,
    ) -> Result<(bool, Option<Finished>), Lie> {
        let Some(size) = self.ring.as_ref().map(Ring::size) else {
            return Ok((false, None));
        };
        let head = match u16::try_from(id) {
            Ok(h) if h < size => h,
            _ => return Err(Lie::IdOutOfRange(id)),
        };
        let i = usize::from(head);
        let Some(part) = self.parts.get(i).copied().flatten() else {
            return Err(if self.returned.get(i).copied().unwrap_or(false) {
                Lie::Duplicate(head)
            } else {
                Lie::NotInFlight(head)
            });
        };
        let status = self.ring.as_ref().map_or(STATUS_POISON, |r| r.status(head));
        if status == STATUS_POISON {
            return Err(Lie::NoStatus(head));
        }
        // The chain's device-writable bytes: the data of a READ, and the status byte.
        let max = if part.op == abi::op::READ {
            part.len + 1
        } else {
            1
        };
        if used_len as usize > max {
            return Err(Lie::Overlong {
                head,
                len: used_len,
                max,
            });
        }
        let slot = usize::from(part.request);
        if self.request_mut(slot, part.generation).is_none() {
            return Err(Lie::Stale(head));
        }
        self.parts[i] = None;
        self.returned[i] = true;
        if let Some(ring) = self.ring.as_mut() {
            ring.free_chain(head);
        }
        self.last_progress = Instant::now();
        let Some(req) = self.request_mut(slot, part.generation) else {
            return Ok((false, None));
        };
        req.part_returned(part.op, part.at, part.len, status, used_len, stats);
        if req.wants_more() {
            return Ok((self.publish_parts(slot), None));
        }
        if !req.settled() {
            return Ok((false, None));
        }
        let result = req.result();
        Ok((false, Finished::take(&mut self.requests, slot, result)))
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
        for r in self.returned.iter_mut() {
            *r = false;
        }
        self.broken = false;
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
