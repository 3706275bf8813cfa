// SPDX-License-Identifier: GPL-2.0
//! The per-device engine: queues, request bookkeeping, submission and completion.
//!
//! Locking: each queue has one `SpinLockIrq` around its ring and request table, taken by
//! submitters (process context) and by the queue's threaded interrupt handler. Nothing sleeps
//! under it; pinning, mapping, unpinning and `ki_complete` happen outside it. A condition
//! variable on the same lock wakes synchronous waiters and submitters waiting for ring space.

use kernel::{
    bindings,
    device,
    pci,
    prelude::*,
    sync::{aref::ARef, atomic::Atomic, atomic::Relaxed, new_condvar, new_spinlock_irq, Arc, CondVar, SpinLockIrq},
};

use crate::{
    abi,
    hw::{self, BAR0_SIZE},
    iocb::PendingIocb,
    mapping::Mapping,
    ring::Ring,
};

/// Who waits for a request.
enum Waiter {
    /// An asynchronous kiocb, completed from the interrupt path.
    Async(PendingIocb),
    /// A synchronous caller sleeping in `read_iter`/`write_iter`/`fsync`.
    Sync(SyncState),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SyncState {
    Waiting,
    /// The device finished; the completion path is releasing the buffers.
    Releasing,
    Done(isize),
    /// The caller gave up (fatal signal); the completion path cleans up alone.
    Orphaned,
}

struct Request {
    id: u64,
    op: u32,
    len: usize,
    mapping: Option<Mapping>,
    waiter: Waiter,
}

struct QueueState {
    ring: Option<Ring>,
    /// Indexed by head descriptor.
    requests: KVec<Option<Request>>,
    chain: KVec<u16>,
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
}

/// Shared by the PCI binding and every open file.
pub(crate) struct AioDev {
    dev: ARef<device::Device>,
    bar: pci::DevresBar<BAR0_SIZE>,
    pub(crate) config: abi::DeviceConfig,
    pub(crate) features: u64,
    queues: KVec<Pin<KBox<Queue>>>,
    dead: Atomic<bool>,
    next_id: Atomic<u64>,
    pub(crate) stats: Stats,
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
fn iter_len(it: *mut bindings::iov_iter) -> usize {
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

impl AioDev {
    /// Set up `num_queues` rings of `size` entries and a shared device.
    pub(crate) fn new(
        pdev: &pci::Device<device::Bound>,
        bar: pci::DevresBar<BAR0_SIZE>,
        config: abi::DeviceConfig,
        features: u64,
        size: u16,
    ) -> Result<Arc<Self>> {
        let event_idx = features & abi::feature::RING_EVENT_IDX != 0;
        let mut queues = KVec::with_capacity(usize::from(config.num_queues), GFP_KERNEL)?;
        for index in 0..config.num_queues {
            let ring = Ring::new(pdev.as_ref(), size, event_idx)?;
            let mut requests = KVec::with_capacity(usize::from(size), GFP_KERNEL)?;
            for _ in 0..size {
                requests.push(None, GFP_KERNEL)?;
            }
            let chain = KVec::with_capacity(usize::from(size), GFP_KERNEL)?;
            let q = KBox::pin_init(
                pin_init!(Queue {
                    index,
                    state <- new_spinlock_irq!(QueueState { ring: Some(ring), requests, chain }),
                    wait <- new_condvar!(),
                }),
                GFP_KERNEL,
            )?;
            queues.push(q, GFP_KERNEL)?;
        }
        Ok(Arc::new(
            AioDev {
                dev: ARef::from(pdev.as_ref()),
                bar,
                config,
                features,
                queues,
                dead: Atomic::new(false),
                next_id: Atomic::new(1),
                stats: Stats {
                    submitted: Atomic::new(0),
                    async_completions: Atomic::new(0),
                    sync_completions: Atomic::new(0),
                    errors: Atomic::new(0),
                    bytes: Atomic::new(0),
                },
            },
            GFP_KERNEL,
        )?)
    }

    /// BAR0 while the device is bound.
    pub(crate) fn bar_access<'a>(&'a self, pdev: &'a pci::Device<device::Bound>) -> Result<&'a hw::Bar0<'a>> {
        self.bar.access(pdev.as_ref())
    }

    /// Queues, for programming the device at probe.
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
        core::ptr::from_ref::<device::Device>(&self.dev).cast::<bindings::device>().cast_mut()
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
        mut pending: Option<PendingIocb>,
        nowait: bool,
    ) -> Result<Submitted> {
        // Before the request reaches the device, failures go back to the caller directly: an
        // async kiocb is disowned, so aio/io_uring complete it (and io_uring retries -EAGAIN
        // from a worker without IOCB_NOWAIT).
        let fail = |pending: Option<PendingIocb>, e: Error| -> Result<Submitted> {
            if let Some(p) = pending {
                p.disown();
            }
            Err(e)
        };
        let done_now = |pending: Option<PendingIocb>, n: usize| -> Result<Submitted> {
            if let Some(p) = pending {
                p.disown();
            }
            Ok(Submitted::Done(n))
        };
        if self.dead.load(Relaxed) {
            return fail(pending, ENODEV);
        }
        let cap = self.config.capacity;
        let mapping = match iter {
            Some(it) => {
                let want = iter_len(it);
                if pos < 0 {
                    return fail(pending, EINVAL);
                }
                let pos = pos as u64;
                if pos >= cap {
                    return if op == abi::op::WRITE {
                        fail(pending, ENOSPC)
                    } else {
                        done_now(pending, 0)
                    };
                }
                let len = (want as u64).min(cap - pos).min(u64::from(self.config.max_transfer)) as usize;
                if len == 0 {
                    return done_now(pending, 0);
                }
                let segs = (self.config.max_segments as usize).min(64);
                // SAFETY: `it` is live (caller contract) and the device is bound while not dead.
                match unsafe { Mapping::new(self.raw_dev(), it, len, segs, op == abi::op::READ) } {
                    Ok(m) => Some(m),
                    Err(e) => return fail(pending, e),
                }
            }
            None => None,
        };
        let len = mapping.as_ref().map_or(0, Mapping::bytes);
        let id = self.next_id.fetch_add(1, Relaxed);
        let q = self.pick_queue();
        let ndesc = 2 + mapping.as_ref().map_or(0, |m| m.segments().len());

        let mut st = q.state.lock();
        loop {
            let Some(ring) = st.ring.as_ref() else {
                drop(st);
                return fail(pending, ENODEV);
            };
            if usize::from(ring.num_free()) >= ndesc {
                break;
            }
            if usize::from(ring.size()) < ndesc || nowait {
                drop(st);
                return fail(pending, EAGAIN);
            }
            if q.wait.wait_interruptible(&mut st) {
                drop(st);
                return fail(pending, ERESTARTSYS);
            }
        }
        let QueueState { ring, requests, chain } = &mut *st;
        let Some(ring) = ring.as_mut() else { return fail(pending, ENODEV) };
        if let Err(e) = ring.alloc_chain(ndesc, chain) {
            drop(st);
            return fail(pending, e);
        }
        let head = chain[0];
        let header = abi::RequestHeader {
            op,
            flags: 0,
            id,
            offset: if iter.is_some() { pos as u64 } else { 0 },
            // CAST: len <= max_transfer, a u32.
            length: len as u32,
            reserved: 0,
        };
        let haddr = ring.put_header(head, &header);
        ring.set_desc(chain, 0, haddr, core::mem::size_of::<abi::RequestHeader>() as u32, false);
        if let Some(m) = mapping.as_ref() {
            for (k, s) in m.segments().iter().enumerate() {
                ring.set_desc(chain, k + 1, s.addr, s.len, op != abi::op::WRITE);
            }
        }
        let status_addr = ring.status_addr(head);
        ring.set_desc(chain, ndesc - 1, status_addr, 1, true);
        let is_async = pending.is_some();
        requests[usize::from(head)] = Some(Request {
            id,
            op,
            len,
            mapping,
            waiter: match pending.take() {
                Some(p) => Waiter::Async(p),
                None => Waiter::Sync(SyncState::Waiting),
            },
        });
        let kick = ring.publish(head);
        crate::kdebug!("req {}: queued on q{} head {} op {} len {} pos {}\n", id, q.index, head, op, len, pos);
        self.stats.submitted.fetch_add(1, Relaxed);
        drop(st);
        if kick {
            if let Some(bar) = self.bar.try_access() {
                hw::kick(&bar, q.index);
            }
        }
        if is_async {
            crate::kdebug!("req {}: async kiocb, returning -EIOCBQUEUED\n", id);
            return Ok(Submitted::Queued);
        }
        // Synchronous: wait for the completion path to finish the request.
        let mut st = q.state.lock();
        loop {
            let state = match st.requests[usize::from(head)].as_ref().map(|r| &r.waiter) {
                Some(Waiter::Sync(s)) => *s,
                _ => return Err(EIO),
            };
            if let SyncState::Done(res) = state {
                st.requests[usize::from(head)] = None;
                if let Some(ring) = st.ring.as_mut() {
                    ring.free_chain(head);
                }
                drop(st);
                q.wait.notify_all();
                crate::kdebug!("req {}: sync completion {}\n", id, res);
                self.stats.sync_completions.fetch_add(1, Relaxed);
                return if res < 0 { Err(Error::from_errno(res as i32)) } else { Ok(Submitted::Done(res as usize)) };
            }
            if q.wait.wait_interruptible(&mut st) && kernel::current!().signal_pending() {
                // Only a fatal signal stops a sync transfer half-way; the completion path
                // releases the buffers once the device returns them.
                if let Some(Some(r)) = st.requests.get_mut(usize::from(head)) {
                    r.waiter = Waiter::Sync(SyncState::Orphaned);
                }
                crate::kdebug!("req {}: sync waiter interrupted, request orphaned\n", id);
                return Err(ERESTARTSYS);
            }
        }
    }

    /// Handle completions on queue `index` (threaded interrupt context: may sleep).
    pub(crate) fn complete_queue(&self, index: usize) {
        let Some(q) = self.queues.get(index) else { return };
        loop {
            // Take up to a batch of finished requests under the lock.
            let mut batch: [Option<(u16, isize, Option<Mapping>, Option<PendingIocb>, u64, bool)>; 16] =
                Default::default();
            let mut n = 0;
            {
                let mut st = q.state.lock();
                let QueueState { ring, requests, .. } = &mut *st;
                let Some(ring) = ring.as_mut() else { return };
                while n < batch.len() {
                    let Some((head, used_len)) = ring.pop_used() else {
                        if ring.arm_interrupt() {
                            continue;
                        }
                        break;
                    };
                    let status = ring.status(head);
                    let Some(req) = requests[usize::from(head)].as_mut() else {
                        pr_warn!("q{}: completion for idle head {}\n", index, head);
                        continue;
                    };
                    let mut res = status_to_result(status, req.len);
                    if res >= 0 && req.op == abi::op::READ && (used_len as usize) < req.len + 1 {
                        res = EIO.to_errno() as isize;
                    }
                    let mapping = req.mapping.take();
                    let id = req.id;
                    match &mut req.waiter {
                        Waiter::Sync(s @ SyncState::Waiting) => {
                            *s = SyncState::Releasing;
                            batch[n] = Some((head, res, mapping, None, id, true));
                        }
                        Waiter::Sync(_) => {
                            // Orphaned: nobody waits; free everything here.
                            requests[usize::from(head)] = None;
                            ring.free_chain(head);
                            batch[n] = Some((head, res, mapping, None, id, false));
                        }
                        Waiter::Async(_) => {
                            let Some(Request { waiter: Waiter::Async(p), .. }) =
                                requests[usize::from(head)].take()
                            else {
                                continue;
                            };
                            ring.free_chain(head);
                            batch[n] = Some((head, res, mapping, Some(p), id, false));
                        }
                    }
                    n += 1;
                }
            }
            if n == 0 {
                return;
            }
            let mut wake = false;
            for entry in batch.iter_mut().take(n) {
                let Some((head, res, mapping, pending, id, sync)) = entry.take() else { continue };
                // Unmap and unpin before anyone learns the request is done.
                drop(mapping);
                if res < 0 {
                    self.stats.errors.fetch_add(1, Relaxed);
                } else {
                    self.stats.bytes.fetch_add(res as u64, Relaxed);
                }
                if let Some(p) = pending {
                    crate::kdebug!("req {}: completed, ki_complete({})\n", id, res);
                    self.stats.async_completions.fetch_add(1, Relaxed);
                    p.complete(res);
                } else if sync {
                    let mut st = q.state.lock();
                    let QueueState { ring, requests, .. } = &mut *st;
                    if let Some(req) = requests[usize::from(head)].as_mut() {
                        match req.waiter {
                            Waiter::Sync(SyncState::Orphaned) => {
                                requests[usize::from(head)] = None;
                                if let Some(r) = ring.as_mut() {
                                    r.free_chain(head);
                                }
                            }
                            _ => req.waiter = Waiter::Sync(SyncState::Done(res)),
                        }
                    }
                }
                wake = true;
            }
            if wake {
                q.wait.notify_all();
            }
        }
    }

    /// The device is going away: stop it, fail everything in flight, free the rings.
    pub(crate) fn shutdown(&self) {
        self.dead.store(true, kernel::sync::atomic::Release);
        if let Some(bar) = self.bar.try_access() {
            if hw::reset(&bar).is_err() {
                pr_err!("device did not complete its reset; DMA may still be in flight\n");
            }
        }
        for q in self.queues.iter() {
            loop {
                let mut victims: [Option<(Option<Mapping>, Option<PendingIocb>)>; 16] = Default::default();
                let mut n = 0;
                {
                    let mut st = q.state.lock();
                    let QueueState { requests, .. } = &mut *st;
                    for slot in requests.iter_mut() {
                        if n == victims.len() {
                            break;
                        }
                        let Some(req) = slot.as_mut() else { continue };
                        match &req.waiter {
                            Waiter::Async(_) => {
                                if let Some(Request { mapping, waiter: Waiter::Async(p), .. }) = slot.take() {
                                    victims[n] = Some((mapping, Some(p)));
                                    n += 1;
                                }
                            }
                            Waiter::Sync(SyncState::Waiting) | Waiter::Sync(SyncState::Orphaned) => {
                                let m = req.mapping.take();
                                req.waiter = Waiter::Sync(SyncState::Done(ENODEV.to_errno() as isize));
                                victims[n] = Some((m, None));
                                n += 1;
                            }
                            _ => {}
                        }
                    }
                }
                if n == 0 {
                    break;
                }
                for v in victims.iter_mut().take(n) {
                    if let Some((m, p)) = v.take() {
                        drop(m);
                        if let Some(p) = p {
                            p.complete(ENODEV.to_errno() as isize);
                        }
                    }
                }
                q.wait.notify_all();
            }
            // The rings go with the binding (DMA memory must be freed before unbind returns).
            let ring = q.state.lock().ring.take();
            drop(ring);
            q.wait.notify_all();
        }
    }
}
