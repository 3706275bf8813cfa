// SPDX-License-Identifier: GPL-2.0
//! The per-device engine: queues, request bookkeeping, submission, completion, timeouts,
//! cancellation and device reset.
//!
//! A *request* (one kiocb, or one synchronous call) covers the caller's pinned buffer and is
//! split into *parts*, one descriptor chain each, within the device's limits. A request keeps
//! at most half the ring's descriptors busy: a larger one goes to the device in waves, its next
//! parts published from the completion path as earlier ones come back.
//!
//! Locking: each queue has one `SpinLockIrq` around its ring, part table and request table,
//! taken by submitters (process context), the queue's threaded interrupt handler, the
//! watchdog and the aio cancel callback (which runs under aio's context lock: lock order is
//! aio ctx_lock → queue lock). Nothing sleeps under it; pinning, unpinning and `ki_complete`
//! happen outside it. A condition variable on the same lock wakes synchronous waiters and
//! submitters waiting for ring space or for a reset to finish.

use core::ffi::c_int;

use kernel::{
    bindings, device, pci,
    prelude::*,
    sync::{
        aref::ARef,
        atomic::{Acquire, Atomic, Relaxed, Release},
        new_condvar, new_spinlock_irq, Arc, CondVar, SpinLockIrq,
    },
    time::{msecs_to_jiffies, Instant, Monotonic},
    types::ForeignOwnable,
    workqueue::{self, impl_has_delayed_work, new_delayed_work, DelayedWork, WorkItem},
};

use crate::{
    abi,
    chardev::OpenFile,
    hw::{self, BAR0_SIZE},
    iocb::PendingIocb,
    kdebug,
    mapping::Mapping,
    ring::Ring,
};

/// Watchdog period: timeouts and cancellations are noticed within this.
const WATCHDOG_MS: u32 = 100;

/// Most bytes one request pins; a larger read or write ends short there (a caller of plain
/// read/write never sees it: the synchronous path continues with further requests).
const MAX_REQUEST_BYTES: usize = 8 << 20;
const PAGE_SIZE: usize = bindings::PAGE_SIZE as usize;

/// Who waits for a request.
enum Waiter {
    /// An asynchronous kiocb, completed from the interrupt path (or by cancel/timeout/reset).
    Async(PendingIocb),
    /// A synchronous caller sleeping in `read_iter`/`write_iter`/`fsync`.
    Sync(SyncState),
    /// An asynchronous request between entering the table and getting its kiocb (aio's cancel
    /// hook is armed outside our lock meanwhile): not yet published, not to be reaped.
    Arming,
    /// Nobody: the kiocb was already completed (cancelled) or the sync caller left; the
    /// request lingers until the device returns its buffers.
    Gone,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SyncState {
    Waiting,
    /// The device finished; the buffers are being released outside the lock.
    Releasing,
    Done(isize),
}

/// One part of a request before it is published: a run of the mapping's segments.
#[derive(Clone, Copy)]
struct Cut {
    first: usize,
    count: usize,
    bytes: usize,
}

struct Request {
    id: u64,
    /// Bumped per use of the slot, so a stale cancel cookie cannot hit a newer request.
    generation: u32,
    op: u32,
    len: usize,
    /// Every part of the request, in device order; `cuts[next_cut..]` are not yet published.
    cuts: KVec<Cut>,
    next_cut: usize,
    /// Device offset of `cuts[next_cut]`.
    next_offset: u64,
    /// Parts on the device now.
    in_flight: u16,
    /// Device-side results folded together: the first error wins.
    error: Option<isize>,
    short: bool,
    mapping: Option<Mapping>,
    waiter: Waiter,
    /// When the request last made progress (a part published): the timeout counts from here.
    started: Instant<Monotonic>,
    cancel_requested: bool,
}

impl Request {
    /// Whether more parts should go to the device: nobody waits for a cancelled or abandoned
    /// request, and a failed one has its answer already.
    fn wants_more(&self) -> bool {
        self.next_cut < self.cuts.len()
            && self.error.is_none()
            && matches!(self.waiter, Waiter::Async(_) | Waiter::Sync(SyncState::Waiting))
    }

    /// Nothing on the device and nothing more to send: the request can finish.
    fn settled(&self) -> bool {
        self.in_flight == 0 && !self.wants_more()
    }
}

/// One descriptor chain of a request.
#[derive(Clone, Copy)]
struct Part {
    request: u16,
    len: usize,
    op: u32,
}

struct QueueState {
    ring: Option<Ring>,
    /// Indexed by chain head.
    parts: KVec<Option<Part>>,
    /// Request slots.
    requests: KVec<Option<Request>>,
    generations: KVec<u32>,
    /// Descriptor indices of the chain being published (capacity: the ring size, so no
    /// allocation under the lock).
    chain: KVec<u16>,
    /// At most this many parts of one request on the device (half the ring's descriptors).
    part_limit: u16,
}

impl QueueState {
    fn free_request_slot(&self) -> Option<usize> {
        self.requests.iter().position(Option::is_none)
    }

    /// Publish request `slot`'s next parts while the ring has room and the request stays
    /// within `part_limit` parts on the device. Returns whether the device needs a kick.
    fn publish_parts(&mut self, slot: usize) -> bool {
        let QueueState {
            ring,
            parts,
            requests,
            chain,
            part_limit,
            ..
        } = self;
        let (Some(ring), Some(Some(req))) = (ring.as_mut(), requests.get_mut(slot)) else {
            return false;
        };
        let mut kick = false;
        while req.wants_more() && req.in_flight < *part_limit {
            let cut = req.cuts[req.next_cut];
            if ring.alloc_chain(cut.count + 2, chain).is_err() {
                // Parts on the device (this request's or others') return descriptors; the
                // completion path then publishes the rest.
                break;
            }
            let head = chain[0];
            let header = abi::RequestHeader {
                op: req.op,
                flags: 0,
                id: req.id,
                offset: req.next_offset,
                // CAST: bytes <= max_transfer, a u32.
                length: cut.bytes as u32,
                reserved: 0,
            };
            let haddr = ring.put_header(head, &header);
            ring.set_desc(chain, 0, haddr, core::mem::size_of::<abi::RequestHeader>() as u32, false);
            if let Some(m) = req.mapping.as_ref() {
                for (k, s) in m.segments()[cut.first..cut.first + cut.count].iter().enumerate() {
                    ring.set_desc(chain, k + 1, s.addr, s.len, req.op != abi::op::WRITE);
                }
            }
            let status_addr = ring.status_addr(head);
            ring.set_desc(chain, cut.count + 1, status_addr, 1, true);
            // CAST: slot < ring size.
            parts[usize::from(head)] = Some(Part {
                request: slot as u16,
                len: cut.bytes,
                op: req.op,
            });
            kick |= ring.publish(head);
            req.next_cut += 1;
            req.next_offset += cut.bytes as u64;
            req.in_flight += 1;
            req.started = Instant::now();
        }
        if req.next_cut > 1 && req.next_cut < req.cuts.len() {
            kdebug!("req {}: {} of {} parts published\n", req.id, req.next_cut, req.cuts.len());
        }
        kick
    }

    /// After descriptors came back: publish waiting parts of every request, and take apart
    /// requests that are settled without a part on the device (cancelled or failed while
    /// waiting for room). Returns whether the device needs a kick, and one finished request.
    fn progress(&mut self) -> (bool, Option<Finished>) {
        let mut kick = false;
        for slot in 0..self.requests.len() {
            let Some(req) = self.requests[slot].as_ref() else {
                continue;
            };
            if req.wants_more() {
                kick |= self.publish_parts(slot);
            } else if matches!(req.waiter, Waiter::Gone) && req.settled() {
                let result = ECANCELED.to_errno() as isize;
                return (kick, Finished::take(&mut self.requests, slot, result));
            }
        }
        (kick, None)
    }
}

/// One queue: ring, in-flight requests, and the wait queue for space and sync completions.
#[pin_data]
pub(crate) struct Queue {
    index: u16,
    #[pin]
    state: SpinLockIrq<QueueState>,
    #[pin]
    wait: CondVar,
}

/// Driver statistics (also reported by the info ioctl).
pub(crate) struct Stats {
    pub(crate) submitted: Atomic<u64>,
    pub(crate) async_completions: Atomic<u64>,
    pub(crate) sync_completions: Atomic<u64>,
    pub(crate) errors: Atomic<u64>,
    pub(crate) bytes: Atomic<u64>,
    pub(crate) timeouts: Atomic<u64>,
    pub(crate) cancels: Atomic<u64>,
    pub(crate) resets: Atomic<u64>,
}

/// Shared by the PCI binding, every open file and the watchdog.
#[pin_data]
pub(crate) struct AioDev {
    dev: ARef<device::Device>,
    bar: pci::DevresBar<BAR0_SIZE>,
    pub(crate) config: abi::DeviceConfig,
    pub(crate) features: u64,
    queues: KVec<Pin<KBox<Queue>>>,
    dead: Atomic<bool>,
    resetting: Atomic<bool>,
    next_id: Atomic<u64>,
    timeout_ms: u32,
    pub(crate) stats: Stats,
    #[pin]
    watchdog: DelayedWork<AioDev>,
}

impl_has_delayed_work! {
    impl HasDelayedWork<Self> for AioDev { self.watchdog }
}

/// What a submission turned into.
pub(crate) enum Submitted {
    /// Finished synchronously with this many bytes.
    Done(usize),
    /// Queued; the kiocb completes later (`-EIOCBQUEUED`).
    Queued,
}

fn status_to_result(status: u8, len: usize) -> isize {
    match status {
        abi::req_status::OK => len as isize,
        abi::req_status::IOERR => EIO.to_errno() as isize,
        abi::req_status::UNSUPP => EOPNOTSUPP.to_errno() as isize,
        abi::req_status::MALFORMED => EINVAL.to_errno() as isize,
        _ => EIO.to_errno() as isize,
    }
}

/// Bytes left in a live iterator of either direction.
pub(crate) fn iter_len(it: *mut bindings::iov_iter) -> usize {
    // SAFETY: callers pass the live iterator of the running file operation; the view types
    // below assert the direction, so pick the one matching `data_source`.
    unsafe {
        if (*it).data_source {
            kernel::iov::IovIterSource::from_raw(it).len()
        } else {
            kernel::iov::IovIterDest::from_raw(it).len()
        }
    }
}

/// The queue the watchdog runs on: the unbound system queue. 7.3 deprecates
/// `system_unbound_wq` (the kernel warns once when it is used) in favour of `system_dfl_wq`,
/// for which the Rust abstractions have no accessor yet.
fn watchdog_queue() -> &'static workqueue::Queue {
    // SAFETY: `system_dfl_wq` is a C global, set up at boot before any module loads and never
    // freed.
    unsafe { workqueue::Queue::from_raw(bindings::system_dfl_wq) }
}

/// Data descriptors and bytes per part, and parts of one request on the device at once:
/// bounded by the device and by the ring, so that a request's parts in flight fit in half the
/// ring together. A part takes at most a quarter of that half, so a large request keeps about
/// four parts on the device, which the backend serves in parallel.
fn part_limits(config: &abi::DeviceConfig, ring_size: u16) -> (usize, usize, usize) {
    let half = usize::from(ring_size) / 2;
    let segs = (config.max_segments as usize)
        .min((half / 4).saturating_sub(2))
        .max(1);
    let bytes = config.max_transfer as usize;
    let parts = (half / (segs + 2)).max(1);
    (segs, bytes, parts)
}

fn cookie(queue: u16, slot: usize, generation: u32) -> usize {
    (generation as usize) << 32 | usize::from(queue) << 16 | slot
}

/// Finished requests leave the lock through this, to be released and completed outside it.
struct Finished {
    mapping: Option<Mapping>,
    pending: Option<PendingIocb>,
    /// A synchronous request, still in the table as `Releasing`, to mark done afterwards.
    sync_slot: Option<usize>,
    result: isize,
    id: u64,
}

impl Finished {
    /// Take request `slot` apart under the queue lock. Async and abandoned requests leave the
    /// table; a synchronous one stays (`Releasing`) until its buffers are released.
    fn take(requests: &mut KVec<Option<Request>>, slot: usize, result: isize) -> Option<Self> {
        let req = requests.get_mut(slot)?.as_mut()?;
        let mapping = req.mapping.take();
        let id = req.id;
        let (pending, sync_slot) = match core::mem::replace(&mut req.waiter, Waiter::Gone) {
            Waiter::Async(p) => {
                requests[slot] = None;
                (Some(p), None)
            }
            Waiter::Sync(_) => {
                req.waiter = Waiter::Sync(SyncState::Releasing);
                (None, Some(slot))
            }
            Waiter::Gone | Waiter::Arming => {
                requests[slot] = None;
                (None, None)
            }
        };
        Some(Finished {
            mapping,
            pending,
            sync_slot,
            result,
            id,
        })
    }

    /// Unmap and unpin first, then tell the waiter.
    fn finish(self, q: &Queue, stats: &Stats) {
        drop(self.mapping);
        if let Some(p) = self.pending {
            if self.result < 0 {
                stats.errors.fetch_add(1, Relaxed);
            } else {
                stats.bytes.fetch_add(self.result as u64, Relaxed);
            }
            stats.async_completions.fetch_add(1, Relaxed);
            kdebug!("req {}: completed, ki_complete({})\n", self.id, self.result);
            p.complete(self.result);
        }
        if let Some(slot) = self.sync_slot {
            let mut st = q.state.lock();
            if let Some(r) = st.requests.get_mut(slot).and_then(Option::as_mut) {
                match r.waiter {
                    // The caller left (fatal signal): nobody collects the result.
                    Waiter::Gone => st.requests[slot] = None,
                    _ => r.waiter = Waiter::Sync(SyncState::Done(self.result)),
                }
            }
        }
    }
}

impl AioDev {
    /// Set up `num_queues` rings of `size` entries and start the watchdog.
    pub(crate) fn new(
        pdev: &pci::Device<device::Bound>,
        bar: pci::DevresBar<BAR0_SIZE>,
        config: abi::DeviceConfig,
        features: u64,
        size: u16,
        timeout_ms: u32,
    ) -> Result<Arc<Self>> {
        let event_idx = features & abi::feature::RING_EVENT_IDX != 0;
        let mut queues = KVec::with_capacity(usize::from(config.num_queues), GFP_KERNEL)?;
        for index in 0..config.num_queues {
            let ring = Ring::new(pdev.as_ref(), size, event_idx)?;
            let chain = KVec::with_capacity(usize::from(size), GFP_KERNEL)?;
            // CAST: at most half the ring's entries, a u16.
            let part_limit = part_limits(&config, size).2 as u16;
            let mut parts = KVec::with_capacity(usize::from(size), GFP_KERNEL)?;
            let mut requests = KVec::with_capacity(usize::from(size), GFP_KERNEL)?;
            let mut generations = KVec::with_capacity(usize::from(size), GFP_KERNEL)?;
            for _ in 0..size {
                parts.push(None, GFP_KERNEL)?;
                requests.push(None, GFP_KERNEL)?;
                generations.push(0, GFP_KERNEL)?;
            }
            let q = KBox::pin_init(
                pin_init!(Queue {
                    index,
                    state <- new_spinlock_irq!(QueueState {
                        ring: Some(ring), parts, requests, generations, chain, part_limit
                    }),
                    wait <- new_condvar!(),
                }),
                GFP_KERNEL,
            )?;
            queues.push(q, GFP_KERNEL)?;
        }
        let dev = Arc::pin_init(
            pin_init!(AioDev {
                dev: ARef::from(pdev.as_ref()),
                bar,
                config,
                features,
                queues,
                dead: Atomic::new(false),
                resetting: Atomic::new(false),
                next_id: Atomic::new(1),
                timeout_ms,
                stats: Stats {
                    submitted: Atomic::new(0),
                    async_completions: Atomic::new(0),
                    sync_completions: Atomic::new(0),
                    errors: Atomic::new(0),
                    bytes: Atomic::new(0),
                    timeouts: Atomic::new(0),
                    cancels: Atomic::new(0),
                    resets: Atomic::new(0),
                },
                watchdog <- new_delayed_work!("aiodma::watchdog"),
            }),
            GFP_KERNEL,
        )?;
        let _ =
            watchdog_queue().enqueue_delayed(dev.clone(), msecs_to_jiffies(WATCHDOG_MS));
        Ok(dev)
    }

    /// BAR0 while the device is bound.
    pub(crate) fn bar_access<'a>(
        &'a self,
        pdev: &'a pci::Device<device::Bound>,
    ) -> Result<&'a hw::Bar0<'a>> {
        self.bar.access(pdev.as_ref())
    }

    /// BAR0 for code that may sleep while using it: the watchdog and `shutdown` only.
    ///
    /// # Safety
    /// The caller is the watchdog work or `shutdown` (called from unbind): `shutdown` flushes
    /// the watchdog before unbind returns, so in both places the device is bound for the whole
    /// borrow.
    unsafe fn bar_sleepable(&self) -> Option<&hw::Bar0<'_>> {
        // SAFETY: the caller's contract: the device stays bound while the result lives.
        let bound = unsafe { self.dev.as_bound() };
        self.bar.access(bound).ok()
    }

    /// Ring addresses of queue `index`, for programming the device.
    pub(crate) fn queue_addrs(&self, index: usize) -> Option<(u16, u64, u64, u64)> {
        let q = self.queues.get(index)?;
        let st = q.state.lock();
        let ring = st.ring.as_ref()?;
        let (d, a, u) = ring.addrs();
        Some((ring.size(), d, a, u))
    }

    fn raw_dev(&self) -> *mut bindings::device {
        // CAST: `device::Device` is `#[repr(transparent)]` over the C `struct device` (its
        // `as_raw` is crate-private).
        core::ptr::from_ref::<device::Device>(&self.dev)
            .cast::<bindings::device>()
            .cast_mut()
    }

    fn pick_queue(&self) -> &Queue {
        // SAFETY: reading the current CPU number has no preconditions; a stale value only picks
        // a different (still valid) queue.
        let cpu = unsafe { bindings::raw_smp_processor_id() } as usize;
        &self.queues[cpu % self.queues.len()]
    }

    /// Submit one request. `iter` is the caller's buffer (None for FLUSH).
    ///
    /// Returns `Done(n)` (the caller returns `n`; an async kiocb was disowned), `Queued` (the
    /// caller returns `-EIOCBQUEUED`; the kiocb completes later), or an error for the caller
    /// to return (an async kiocb was disowned).
    ///
    /// # Safety
    /// `iter` is the live iterator of the running file operation; `pending` is its kiocb's
    /// completion obligation, if asynchronous.
    pub(crate) unsafe fn submit(
        &self,
        op: u32,
        pos: i64,
        iter: Option<*mut bindings::iov_iter>,
        pending: Option<PendingIocb>,
        nowait: bool,
    ) -> Result<Submitted> {
        // Before the request reaches the device, failures go back to the caller directly: an
        // async kiocb is disowned, so aio/io_uring complete it (and io_uring retries -EAGAIN
        // from a worker without IOCB_NOWAIT).
        let give_back = |pending: Option<PendingIocb>| {
            if let Some(p) = pending {
                p.disown();
            }
        };
        if self.dead.load(Acquire) {
            give_back(pending);
            return Err(ENODEV);
        }
        let q = self.pick_queue();
        let ring_size = match q.state.lock().ring.as_ref() {
            Some(r) => r.size(),
            None => {
                give_back(pending);
                return Err(ENODEV);
            }
        };
        let (seg_limit, byte_limit, part_limit) = part_limits(&self.config, ring_size);
        let cap = self.config.capacity;
        let (mapping, start) = match iter {
            Some(it) => {
                let want = iter_len(it);
                if pos < 0 {
                    give_back(pending);
                    return Err(EINVAL);
                }
                let start = pos as u64;
                if start >= cap {
                    give_back(pending);
                    return if op == abi::op::WRITE {
                        Err(ENOSPC)
                    } else {
                        Ok(Submitted::Done(0))
                    };
                }
                let len = (want as u64).min(cap - start) as usize;
                if len == 0 {
                    give_back(pending);
                    return Ok(Submitted::Done(0));
                }
                // Larger transfers end short (legal for a file; callers continue).
                let len = len.min(MAX_REQUEST_BYTES);
                let max_pages = MAX_REQUEST_BYTES / PAGE_SIZE + 1;
                // SAFETY: `it` is live (caller contract); the device is bound while not dead.
                match unsafe {
                    Mapping::new(self.raw_dev(), it, len, max_pages, op == abi::op::READ)
                } {
                    Ok(m) => (Some(m), start),
                    Err(e) => {
                        give_back(pending);
                        return Err(e);
                    }
                }
            }
            None => (None, 0),
        };

        // Cut the mapping into parts within the device's limits.
        let mut cuts: KVec<Cut> = KVec::new();
        if let Some(m) = mapping.as_ref() {
            let segs = m.segments();
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
                    give_back(pending);
                    return Err(EINVAL);
                }
                if let Err(e) = cuts.push(Cut { first, count, bytes }, GFP_KERNEL) {
                    give_back(pending);
                    return Err(e.into());
                }
                first += count;
            }
        } else if let Err(e) = cuts.push(Cut { first: 0, count: 0, bytes: 0 }, GFP_KERNEL) {
            give_back(pending);
            return Err(e.into());
        }
        let len = mapping.as_ref().map_or(0, Mapping::bytes);
        let nparts = cuts.len();
        // The first wave: what one request may have on the device at once.
        let first_wave: usize = cuts.iter().take(part_limit).map(|c| c.count + 2).sum();
        let id = self.next_id.fetch_add(1, Relaxed);

        // Take a request slot once the ring has room for the first wave (publishing, below,
        // takes whatever room is left then; the completion path publishes the rest).
        let mut st = q.state.lock();
        let slot = loop {
            if self.dead.load(Acquire) || st.ring.is_none() {
                drop(st);
                give_back(pending);
                return Err(ENODEV);
            }
            let ready = !self.resetting.load(Acquire)
                && st
                    .ring
                    .as_ref()
                    .is_some_and(|r| usize::from(r.num_free()) >= first_wave);
            if ready {
                if let Some(slot) = st.free_request_slot() {
                    break slot;
                }
            }
            if nowait {
                drop(st);
                give_back(pending);
                return Err(EAGAIN);
            }
            if q.wait.wait_interruptible(&mut st) {
                drop(st);
                give_back(pending);
                return Err(ERESTARTSYS);
            }
        };
        st.generations[slot] = st.generations[slot].wrapping_add(1);
        let generation = st.generations[slot];
        let is_async = pending.is_some();
        // An async request enters the table without its kiocb: aio's cancel hook must be armed
        // first, outside our lock (aio's lock nests outside ours), while nobody else can reach
        // the kiocb.
        st.requests[slot] = Some(Request {
            id,
            generation,
            op,
            len,
            cuts,
            next_cut: 0,
            next_offset: start,
            in_flight: 0,
            error: None,
            short: false,
            mapping,
            waiter: if is_async {
                Waiter::Arming
            } else {
                Waiter::Sync(SyncState::Waiting)
            },
            started: Instant::now(),
            cancel_requested: false,
        });
        drop(st);
        if let Some(p) = pending.as_ref() {
            p.arm_cancel(cookie(q.index, slot, generation), aio_cancel);
        }

        // Publish the first wave. A reset (or unbind) in between failed the request: an async
        // one left the table (its slot is empty or someone else's now), a sync one waits
        // there, finished, for the loop below; `publish_parts` sends nothing for either.
        let mut st = q.state.lock();
        let ours = st
            .requests
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|r| r.generation == generation);
        if !ours {
            drop(st);
            if let Some(p) = pending {
                p.disown();
            }
            return Err(EIO);
        }
        if let (Some(p), Some(Some(r))) = (pending, st.requests.get_mut(slot)) {
            r.waiter = Waiter::Async(p);
        }
        let kick = st.publish_parts(slot);
        kdebug!(
            "req {}: queued on q{} op {} len {} pos {} in {} part(s)\n",
            id,
            q.index,
            op,
            len,
            pos,
            nparts
        );
        self.stats.submitted.fetch_add(1, Relaxed);
        drop(st);
        if kick {
            self.kick(q);
        }
        if is_async {
            kdebug!("req {}: async kiocb, returning -EIOCBQUEUED\n", id);
            return Ok(Submitted::Queued);
        }

        // Synchronous: wait for the completion path to finish the request.
        let mut st = q.state.lock();
        loop {
            let done = match st.requests.get(slot).and_then(Option::as_ref) {
                Some(r) if r.generation == generation => match r.waiter {
                    Waiter::Sync(SyncState::Done(res)) => Some(res),
                    _ => None,
                },
                _ => Some(EIO.to_errno() as isize),
            };
            if let Some(res) = done {
                st.requests[slot] = None;
                drop(st);
                q.wait.notify_all();
                kdebug!("req {}: sync completion {}\n", id, res);
                self.stats.sync_completions.fetch_add(1, Relaxed);
                if res < 0 {
                    self.stats.errors.fetch_add(1, Relaxed);
                    return Err(Error::from_errno(res as i32));
                }
                self.stats.bytes.fetch_add(res as u64, Relaxed);
                return Ok(Submitted::Done(res as usize));
            }
            if q.wait.wait_interruptible(&mut st) && kernel::current!().signal_pending() {
                // The buffers stay pinned until the device returns them; the completion path
                // (or, with nothing on the device, the watchdog) then frees the slot.
                if let Some(Some(r)) = st.requests.get_mut(slot) {
                    r.waiter = Waiter::Gone;
                }
                kdebug!("req {}: sync waiter interrupted, request orphaned\n", id);
                return Err(ERESTARTSYS);
            }
        }
    }

    /// Notify the device of new chains on `q` (a register write: only when the ring asks).
    fn kick(&self, q: &Queue) {
        if let Some(bar) = self.bar.try_access() {
            hw::kick(&bar, q.index);
        }
    }

    /// A part finished (under the queue lock): fold its result into its request; publish the
    /// request's next parts, or, once it is settled, take it apart for completion outside the
    /// lock. Returns whether the device needs a kick, and the finished request.
    fn part_done(st: &mut QueueState, head: u16, status: u8, used_len: u32) -> (bool, Option<Finished>) {
        let Some(part) = st.parts.get_mut(usize::from(head)).and_then(Option::take) else {
            return (false, None);
        };
        if let Some(ring) = st.ring.as_mut() {
            ring.free_chain(head);
        }
        let slot = usize::from(part.request);
        let Some(req) = st.requests.get_mut(slot).and_then(Option::as_mut) else {
            return (false, None);
        };
        let res = status_to_result(status, part.len);
        if res < 0 {
            req.error.get_or_insert(res);
        } else if part.op == abi::op::READ && (used_len as usize) < part.len + 1 {
            req.short = true;
        }
        req.in_flight = req.in_flight.saturating_sub(1);
        if req.wants_more() {
            return (st.publish_parts(slot), None);
        }
        if !req.settled() {
            return (false, None);
        }
        let result = match (req.error, req.short) {
            (Some(e), _) => e,
            (None, true) => EIO.to_errno() as isize,
            (None, false) => req.len as isize,
        };
        (false, Finished::take(&mut st.requests, slot, result))
    }

    /// Handle completions on queue `index` (threaded interrupt context: may sleep).
    pub(crate) fn complete_queue(&self, index: usize) {
        let Some(q) = self.queues.get(index) else {
            return;
        };
        loop {
            let mut batch: [Option<Finished>; 16] = Default::default();
            let mut n = 0;
            let mut kick = false;
            {
                let mut st = q.state.lock();
                while n < batch.len() {
                    let Some(ring) = st.ring.as_mut() else { break };
                    let Some((head, used_len)) = ring.pop_used() else {
                        if ring.arm_interrupt() {
                            continue;
                        }
                        break;
                    };
                    let status = ring.status(head);
                    let (more, finished) = Self::part_done(&mut st, head, status, used_len);
                    kick |= more;
                    if let Some(f) = finished {
                        batch[n] = Some(f);
                        n += 1;
                    }
                }
                // Room came back: parts of other requests waiting for it go out now.
                while n < batch.len() {
                    let (more, finished) = st.progress();
                    kick |= more;
                    let Some(f) = finished else { break };
                    batch[n] = Some(f);
                    n += 1;
                }
            }
            if kick {
                self.kick(q);
            }
            if n == 0 {
                q.wait.notify_all();
                return;
            }
            for f in batch.iter_mut().take(n).filter_map(Option::take) {
                f.finish(q, &self.stats);
            }
            q.wait.notify_all();
        }
    }

    /// aio `io_cancel` (under aio's context lock, IRQs off): flag the request; the watchdog
    /// completes it with -ECANCELED within `WATCHDOG_MS`.
    fn request_cancel(&self, cookie: usize) -> bool {
        let queue = (cookie >> 16) & 0xffff;
        let slot = cookie & 0xffff;
        let generation = (cookie >> 32) as u32;
        let Some(q) = self.queues.get(queue) else {
            return false;
        };
        let mut st = q.state.lock();
        match st.requests.get_mut(slot).and_then(Option::as_mut) {
            Some(r) if r.generation == generation && matches!(r.waiter, Waiter::Async(_)) => {
                r.cancel_requested = true;
                true
            }
            _ => false,
        }
    }

    /// Periodic work: complete cancelled kiocbs, and reset the device when a request is
    /// older than the timeout or the device asks for a reset.
    fn watchdog_tick(&self) {
        let mut expired = false;
        let mut busy = false;
        for q in self.queues.iter() {
            let mut cancelled: [Option<(PendingIocb, u64)>; 16] = Default::default();
            let mut n = 0;
            {
                let mut st = q.state.lock();
                for r in st.requests.iter_mut().flatten() {
                    busy = true;
                    if r.cancel_requested && n < cancelled.len() {
                        if let Waiter::Async(p) = core::mem::replace(&mut r.waiter, Waiter::Gone) {
                            cancelled[n] = Some((p, r.id));
                            n += 1;
                        }
                    }
                    // Only a request with parts on the device can be the device's fault (one
                    // waiting for ring room is waiting for other requests).
                    if !matches!(r.waiter, Waiter::Gone)
                        && r.in_flight > 0
                        && r.started.elapsed().as_millis() > i64::from(self.timeout_ms)
                    {
                        expired = true;
                    }
                }
            }
            for (p, id) in cancelled.iter_mut().take(n).filter_map(Option::take) {
                kdebug!("req {}: cancelled, ki_complete(-ECANCELED)\n", id);
                self.stats.cancels.fetch_add(1, Relaxed);
                p.complete(ECANCELED.to_errno() as isize);
            }
            // Requests abandoned while waiting for ring room have no part to bring them back.
            loop {
                let (kick, finished) = q.state.lock().progress();
                if kick {
                    self.kick(q);
                }
                let Some(f) = finished else { break };
                f.finish(q, &self.stats);
            }
        }
        // SAFETY: this is the watchdog.
        let needs_reset = busy
            && unsafe { self.bar_sleepable() }
                .is_some_and(|bar| hw::status(bar) & abi::status::NEEDS_RESET != 0);
        if expired || needs_reset {
            self.reset(if expired {
                "request timeout"
            } else {
                "device NEEDS_RESET"
            });
        }
    }

    /// Fail every request still owned by the driver (`timed_out_res` for those older than the
    /// timeout, `other_res` for the rest) and forget every chain. The device must be stopped.
    fn fail_all(&self, timed_out_res: isize, other_res: isize) -> usize {
        let mut failed = 0;
        for q in self.queues.iter() {
            loop {
                let mut batch: [Option<Finished>; 16] = Default::default();
                let mut n = 0;
                {
                    let mut st = q.state.lock();
                    for p in st.parts.iter_mut() {
                        *p = None;
                    }
                    if let Some(ring) = st.ring.as_mut() {
                        ring.reset();
                    }
                    for slot in 0..st.requests.len() {
                        if n == batch.len() {
                            break;
                        }
                        let Some(r) = st.requests[slot].as_mut() else {
                            continue;
                        };
                        if matches!(
                            r.waiter,
                            Waiter::Sync(SyncState::Done(_) | SyncState::Releasing)
                        ) {
                            continue;
                        }
                        let late = r.started.elapsed().as_millis() > i64::from(self.timeout_ms);
                        let result = if late { timed_out_res } else { other_res };
                        if late {
                            self.stats.timeouts.fetch_add(1, Relaxed);
                            kdebug!("req {}: timed out\n", r.id);
                        }
                        let Some(f) = Finished::take(&mut st.requests, slot, result) else {
                            continue;
                        };
                        batch[n] = Some(f);
                        n += 1;
                    }
                }
                if n == 0 {
                    break;
                }
                failed += n;
                for f in batch.iter_mut().take(n).filter_map(Option::take) {
                    f.finish(q, &self.stats);
                }
                q.wait.notify_all();
            }
        }
        failed
    }

    /// Reset the device, fail what it held, program it again and resume service. Watchdog only.
    fn reset(&self, why: &str) {
        self.resetting.store(true, Release);
        // SAFETY: only the watchdog resets the device.
        let Some(bar) = (unsafe { self.bar_sleepable() }) else {
            return;
        };
        if hw::reset(bar).is_err() {
            pr_err!(
                "device did not complete its reset ({}); giving up on it\n",
                why
            );
            self.dead.store(true, Release);
        }
        let failed = self.fail_all(ETIMEDOUT.to_errno() as isize, EIO.to_errno() as isize);
        self.stats.resets.fetch_add(1, Relaxed);
        if !self.dead.load(Acquire) {
            if let Err(e) = self.reprogram() {
                pr_err!("device reinitialisation failed: {:?}\n", e);
                self.dead.store(true, Release);
            }
        }
        pr_warn!("device reset after {}: {} request(s) failed\n", why, failed);
        self.resetting.store(false, Release);
        for q in self.queues.iter() {
            q.wait.notify_all();
        }
    }

    /// Negotiate and program the queues again after a reset. Watchdog only.
    fn reprogram(&self) -> Result {
        // SAFETY: called from `reset`, i.e. by the watchdog.
        let bar = unsafe { self.bar_sleepable() }.ok_or(ENODEV)?;
        hw::set_status(bar, abi::status::ACKNOWLEDGE | abi::status::DRIVER);
        hw::negotiate(bar, self.features)?;
        for (i, q) in self.queues.iter().enumerate() {
            let (size, desc, driver, device) = {
                let st = q.state.lock();
                let ring = st.ring.as_ref().ok_or(ENODEV)?;
                let (d, a, u) = ring.addrs();
                (ring.size(), d, a, u)
            };
            // CAST: at most MAX_QUEUES queues.
            let index = i as u16;
            hw::setup_queue(
                bar,
                index,
                &hw::QueueAddrs {
                    size,
                    desc,
                    driver,
                    device,
                    vector: index,
                },
            )?;
        }
        hw::set_status(bar, abi::status::DRIVER_OK);
        Ok(())
    }

    /// The device is going away: stop the watchdog and the device, fail everything in flight,
    /// free the rings.
    pub(crate) fn shutdown(&self) {
        self.dead.store(true, Release);
        // The watchdog re-arms itself only while not dead; run any pending tick now and wait.
        // SAFETY: `DelayedWork` is `#[repr(transparent)]` over the C `delayed_work`, which lives
        // as long as `self`.
        unsafe {
            bindings::flush_delayed_work(
                core::ptr::from_ref(&self.watchdog)
                    .cast::<bindings::delayed_work>()
                    .cast_mut(),
            )
        };
        // SAFETY: this is `shutdown`, called from unbind.
        if let Some(bar) = unsafe { self.bar_sleepable() } {
            if hw::reset(bar).is_err() {
                pr_err!("device did not complete its reset; DMA may still be in flight\n");
            }
        }
        self.fail_all(ENODEV.to_errno() as isize, ENODEV.to_errno() as isize);
        for q in self.queues.iter() {
            // The rings go with the binding (DMA memory must be freed before unbind returns).
            let ring = q.state.lock().ring.take();
            drop(ring);
            q.wait.notify_all();
        }
    }
}

impl WorkItem for AioDev {
    type Pointer = Arc<AioDev>;

    fn run(this: Arc<AioDev>) {
        if this.dead.load(Acquire) {
            return;
        }
        this.watchdog_tick();
        if !this.dead.load(Acquire) {
            let _ =
                watchdog_queue().enqueue_delayed(this, msecs_to_jiffies(WATCHDOG_MS));
        }
    }
}

/// aio's cancel callback (see `PendingIocb::arm_cancel`).
///
/// # Safety
/// Called by aio under its context lock with a kiocb of one of our files whose `private` holds
/// the cookie we stored.
unsafe extern "C" fn aio_cancel(k: *mut bindings::kiocb) -> c_int {
    // SAFETY: the aio request holds a reference on its file, whose private data is our
    // `Arc<OpenFile>`; `private` is the cookie written by `arm_cancel`.
    let (of, cookie) = unsafe {
        (
            Arc::<OpenFile>::borrow((*(*k).ki_filp).private_data),
            (*k).private as usize,
        )
    };
    if of.dev().request_cancel(cookie) {
        0
    } else {
        EINVAL.to_errno()
    }
}
