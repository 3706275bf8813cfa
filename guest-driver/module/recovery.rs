// SPDX-License-Identifier: GPL-2.0
//! Everything that is not the normal path: the watchdog (completions whose interrupt was lost,
//! cancelled kiocbs, overdue parts, stalled queues, NEEDS_RESET, used-ring lies), device reset
//! and re-initialisation, failing what the device held, and removal.
//!
//! A *recovery pass* (`watchdog_tick`) runs every `WATCHDOG_MS` from the watchdog, and at once
//! from the `urgent` work when the completion path caught the device lying in a used ring or
//! the configuration interrupt fired (`schedule_recovery`). Passes hold `recovery`, so one at a
//! time touches the device; unbind disables both works before it resets the device itself.

use core::ffi::c_int;

use kernel::{
    bindings,
    prelude::*,
    sync::{
        atomic::{Acquire, Full, Relaxed, Release},
        Arc,
    },
    time::msecs_to_jiffies,
    types::ForeignOwnable,
    workqueue::{self, WorkItem},
};

use crate::{
    abi,
    chardev::OpenFile,
    dev::{AioDev, Reaper},
    hw, kdebug,
    request::Waiter,
};

/// Watchdog period: timeouts and cancellations are noticed within this.
const WATCHDOG_MS: u32 = 100;

/// The cancel cookie of request `slot` (generation `generation`) on queue `queue`.
pub(crate) fn cookie(queue: u16, slot: usize, generation: u32) -> usize {
    (generation as usize) << 32 | usize::from(queue) << 16 | slot
}

/// The queue the watchdog runs on: 7.3 deprecates `system_unbound_wq` (the kernel warns once
/// when it is used) in favour of `system_dfl_wq`, for which the Rust abstractions have no
/// accessor yet.
fn watchdog_queue() -> &'static workqueue::Queue {
    // SAFETY: `system_dfl_wq` is a C global, set up at boot before any module loads and never
    // freed.
    unsafe { workqueue::Queue::from_raw(bindings::system_dfl_wq) }
}

impl AioDev {
    /// Start the watchdog. Probe calls it last, once nothing can fail any more.
    pub(crate) fn start_watchdog(self: &Arc<Self>) {
        let _ = watchdog_queue().enqueue_delayed(self.clone(), msecs_to_jiffies(WATCHDOG_MS));
    }

    /// Ask for a recovery pass now (any context, hard interrupts included): the `urgent` work
    /// runs one unless it is queued already, or disabled by unbind.
    pub(crate) fn schedule_recovery(self: &Arc<Self>) {
        // An `Err` gives the reference back (already queued, or disabled): dropping it is all.
        let _ = watchdog_queue().enqueue::<Arc<AioDev>, 1>(self.clone());
    }

    /// Stop the watchdog and the urgent recovery work for good: a running pass finishes, a
    /// pending one is cancelled, and neither can be queued again (a re-arm or
    /// `schedule_recovery` fails and drops its reference).
    pub(crate) fn stop_watchdog(&self) {
        // SAFETY: `Work` is `#[repr(transparent)]` over the C `work_struct`, which lives as long
        // as `self`.
        let urgent_pending = unsafe {
            bindings::disable_work_sync(
                core::ptr::from_ref(&self.urgent)
                    .cast::<bindings::work_struct>()
                    .cast_mut(),
            )
        };
        if urgent_pending {
            // SAFETY: a pending work owned the reference `schedule_recovery` handed to the
            // workqueue through `Arc::into_raw`; cancelling it makes it ours.
            drop(unsafe { Arc::from_raw(core::ptr::from_ref(self)) });
        }
        // SAFETY: `DelayedWork` is `#[repr(transparent)]` over the C `delayed_work`, which lives
        // as long as `self`.
        let was_pending = unsafe {
            bindings::disable_delayed_work_sync(
                core::ptr::from_ref(&self.watchdog)
                    .cast::<bindings::delayed_work>()
                    .cast_mut(),
            )
        };
        if was_pending {
            // SAFETY: a pending watchdog owned the reference `start_watchdog` (or the last tick)
            // handed to the workqueue through `Arc::into_raw`; cancelling it makes it ours.
            drop(unsafe { Arc::from_raw(core::ptr::from_ref(self)) });
        }
    }

    /// aio `io_cancel` (under aio's context lock, IRQs off): flag the request; the watchdog
    /// completes it with -ECANCELED within `WATCHDOG_MS`. A request still being armed counts:
    /// the watchdog completes it once its kiocb is attached.
    pub(crate) fn request_cancel(&self, cookie: usize) -> bool {
        let queue = (cookie >> 16) & 0xffff;
        let slot = cookie & 0xffff;
        let generation = (cookie >> 32) as u32;
        let Some(q) = self.queues.get(queue) else {
            return false;
        };
        let mut st = q.state.lock();
        match st.request_mut(slot, generation) {
            Some(r) if matches!(r.waiter, Waiter::Async(_) | Waiter::Arming) => {
                r.cancel_requested = true;
                kdebug!("req {}: cancel requested\n", r.id);
                true
            }
            _ => false,
        }
    }

    /// One recovery pass (`recovery` held): take what the device published (a completion whose
    /// interrupt was lost costs at most one period, never a timeout), reap cancelled and
    /// abandoned requests that have nothing on the device, publish parts waiting for room, and
    /// reset the device when it lied in a used ring, asks for a reset (NEEDS_RESET: polled
    /// while requests are out, read at once after a configuration interrupt), or a part is
    /// overdue (whoever waits for it) or a queue with waiters stopped moving.
    fn watchdog_tick(self: &Arc<Self>) {
        for i in 0..self.queues.len() {
            self.complete_queue(i, Reaper::Watchdog);
        }
        let mut stalled = false;
        let mut busy = false;
        for q in self.queues.iter() {
            loop {
                let (kick, finished) = q.state.lock().progress();
                if kick {
                    self.kick(q);
                }
                let Some(f) = finished else { break };
                f.finish(self);
            }
            // Freed slots, and synchronous outcomes `progress` may have set.
            q.wait.wake_all();
            let st = q.state.lock();
            busy |= st.requests.iter().any(Option::is_some);
            stalled |= st.stalled(self.timeout_ms);
        }
        let config_changed = self.config_changed.xchg(false, Full);
        // SAFETY: this is a recovery pass.
        let needs_reset = (busy || config_changed)
            && unsafe { self.bar_sleepable() }
                .is_some_and(|bar| hw::status(bar) & abi::status::NEEDS_RESET != 0);
        if self.lied.load(Acquire) {
            self.stats.resets_lie.fetch_add(1, Relaxed);
            self.reset("a lie in a used ring");
        } else if needs_reset {
            self.stats.resets_needs_reset.fetch_add(1, Relaxed);
            self.reset("device NEEDS_RESET");
        } else if stalled {
            self.stats.resets_timeout.fetch_add(1, Relaxed);
            self.reset("request timeout");
        }
    }

    /// The device did not reset, so it may still DMA: stop its bus mastering and never free
    /// what it may touch (buffers stay pinned and mapped, rings stay allocated).
    fn quarantine(&self) {
        if self.quarantined.xchg(true, Full) {
            return;
        }
        pr_err!("device did not complete its reset: bus mastering off, its buffers and rings are leaked\n");
        // SAFETY: `self.dev` is the `dev` field of a `struct pci_dev`, bound (we are called by
        // the watchdog or unbind).
        unsafe {
            let pdev = kernel::container_of!(self.raw_dev(), bindings::pci_dev, dev);
            bindings::pci_clear_master(pdev);
        }
    }

    /// Fail every request still owned by the driver (`late_res` for those with a part older
    /// than the timeout, `other_res` for the rest) and forget every chain. The device must be
    /// stopped. Returns how many requests failed.
    fn fail_all(&self, late_res: isize, other_res: isize) -> usize {
        let mut failed = 0;
        for q in self.queues.iter() {
            let late = q
                .state
                .lock()
                .forget_device(self.timeout_ms, late_res, other_res);
            self.stats.timeouts.fetch_add(late, Relaxed);
            // Synchronous callers collect their own; the rest leave the table here.
            q.wait.wake_all();
            loop {
                // Its own statement: the guard must go before `finish` (a `while let` would
                // keep it for the whole body).
                let next = q.state.lock().take_failed();
                let Some(finished) = next else { break };
                failed += 1;
                if let Some(f) = finished {
                    f.finish(self);
                }
            }
            q.wait.wake_all();
        }
        failed
    }

    /// Reset the device, fail what it held, program it again and resume service. Recovery
    /// passes only.
    fn reset(&self, why: &str) {
        self.resetting.store(true, Release);
        // SAFETY: only a recovery pass resets the device.
        if let Some(bar) = unsafe { self.bar_sleepable() } {
            if hw::reset(bar).is_err() {
                self.dead.store(true, Release);
                self.quarantine();
            }
            let failed = self.fail_all(ETIMEDOUT.to_errno() as isize, EIO.to_errno() as isize);
            // Every ring is forgotten (and no queue `broken`): a lie seen before this point was
            // about the old rings.
            self.lied.store(false, Release);
            self.stats.resets.fetch_add(1, Relaxed);
            if !self.dead.load(Acquire) {
                if let Err(e) = self.reprogram(bar) {
                    pr_err!("device reinitialisation failed: {:?}\n", e);
                    self.dead.store(true, Release);
                }
            }
            pr_warn!("device reset after {}: {} request(s) failed\n", why, failed);
        }
        self.resetting.store(false, Release);
        for q in self.queues.iter() {
            q.wait.wake_all();
        }
    }

    /// Negotiate and program the queues again after a reset.
    fn reprogram(&self, bar: &hw::Bar0<'_>) -> Result {
        hw::bring_up(
            bar,
            self.features,
            &self.queue_addrs()?,
            self.config_vector(),
        )
    }

    /// The device is going away (unbind): stop the watchdog and the device, fail everything in
    /// flight, wait for every submitter and completion thread to leave, free the rings.
    pub(crate) fn shutdown(&self) {
        self.dead.store(true, Release);
        self.stop_watchdog();
        // SAFETY: this is `shutdown`, called from unbind, with the watchdog stopped.
        if let Some(bar) = unsafe { self.bar_sleepable() } {
            if hw::reset(bar).is_err() {
                self.quarantine();
            }
        }
        self.fail_all(ENODEV.to_errno() as isize, ENODEV.to_errno() as isize);
        // Submitters see `dead` or their failed request and leave; interrupt threads finish.
        self.gate.synchronize();
        self.fail_all(ENODEV.to_errno() as isize, ENODEV.to_errno() as isize);
        for q in self.queues.iter() {
            // DMA memory must be freed before unbind returns (unless the device may use it).
            let ring = q.state.lock().ring.take();
            if let Some(ring) = ring {
                if self.quarantined.load(Acquire) {
                    core::mem::forget(ring);
                } else {
                    drop(ring);
                }
            }
            q.wait.wake_all();
        }
    }
}

impl WorkItem for AioDev {
    type Pointer = Arc<AioDev>;

    fn run(this: Arc<AioDev>) {
        if this.dead.load(Acquire) {
            return;
        }
        {
            let _pass = this.recovery.lock();
            this.watchdog_tick();
        }
        if !this.dead.load(Acquire) {
            // Fails (and drops the reference) once `stop_watchdog` disabled the work.
            let _ = watchdog_queue().enqueue_delayed(this, msecs_to_jiffies(WATCHDOG_MS));
        }
    }
}

/// The urgent recovery pass (`schedule_recovery`).
impl WorkItem<1> for AioDev {
    type Pointer = Arc<AioDev>;

    fn run(this: Arc<AioDev>) {
        if this.dead.load(Acquire) {
            return;
        }
        let _pass = this.recovery.lock();
        this.watchdog_tick();
    }
}

/// aio's cancel callback (see `PendingIocb::arm_cancel`).
///
/// # Safety
/// Called by aio under its context lock with a kiocb of one of our files whose `private` holds
/// the cookie we stored.
pub(crate) unsafe extern "C" fn aio_cancel(k: *mut bindings::kiocb) -> c_int {
    // SAFETY: the aio request holds a reference on its file, whose private data is our
    // `Arc<OpenFile>`; `private` is the cookie written by `arm_cancel`.
    let (of, cookie) = unsafe { crate::iocb::cancel_target(k) };
    // SAFETY: as above: the file, and so its private data, outlives this call.
    let of = unsafe { Arc::<OpenFile>::borrow(of) };
    if of.dev().request_cancel(cookie) {
        0
    } else {
        EINVAL.to_errno()
    }
}
