// SPDX-License-Identifier: GPL-2.0
//! The per-device state shared by the PCI binding, every open file, the interrupt threads and
//! the watchdog, and the completion path. Submission is in `submit.rs`; watchdog, cancel, reset
//! and removal in `recovery.rs`; the lock-held bookkeeping in `queue.rs`; one request's state
//! machine in `request.rs`.
//!
//! Locking: each queue has one `SpinLockIrq` around its ring, part table and request table,
//! taken by submitters (process context), the queue's threaded interrupt handler, the watchdog
//! and the aio cancel callback (which runs under aio's context lock: lock order is aio ctx_lock
//! → queue lock). Nothing sleeps under it; unpinning and `ki_complete` happen outside it.
//!
//! Removal: submitters and interrupt threads run inside `gate` (SRCU). Unbind marks the device
//! dead, stops it, fails what it held and waits for the gate to empty before the rings go, so
//! nobody maps, unmaps or touches a ring of an unbound device.

use kernel::{
    bindings, device, pci,
    prelude::*,
    sync::{
        aref::ARef,
        atomic::{Acquire, Atomic, Relaxed},
        new_spinlock_irq, Arc, Srcu,
    },
    workqueue::{impl_has_delayed_work, new_delayed_work, DelayedWork},
};

use crate::{
    abi,
    hw::{self, BAR0_SIZE},
    mapping::Mapping,
    queue::{Queue, QueueState},
    request::Finished,
    ring::Ring,
    wait::KillableWait,
};

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
    pub(crate) dev: ARef<device::Device>,
    pub(crate) bar: pci::DevresBar<BAR0_SIZE>,
    pub(crate) config: abi::DeviceConfig,
    pub(crate) features: u64,
    pub(crate) queues: KVec<Pin<KBox<Queue>>>,
    /// Unbound (or given up on): nothing new is submitted.
    pub(crate) dead: Atomic<bool>,
    /// The watchdog is resetting the device: submitters wait.
    pub(crate) resetting: Atomic<bool>,
    /// A reset did not complete, so the device may still DMA: buffers and rings are leaked
    /// rather than freed from then on.
    pub(crate) quarantined: Atomic<bool>,
    pub(crate) next_id: Atomic<u64>,
    pub(crate) timeout_ms: u32,
    pub(crate) stats: Stats,
    /// Submitters and interrupt threads read-hold it; unbind waits for it to empty.
    #[pin]
    pub(crate) gate: Srcu,
    #[pin]
    pub(crate) watchdog: DelayedWork<AioDev>,
}

impl_has_delayed_work! {
    impl HasDelayedWork<Self> for AioDev { self.watchdog }
}

/// Data descriptors and bytes per part, and parts of one request on the device at once:
/// bounded by the device and by the ring, so that a request's parts in flight fit in half the
/// ring together. A part takes at most a quarter of that half, so a large request keeps about
/// four parts on the device, which the backend serves in parallel.
pub(crate) fn part_limits(config: &abi::DeviceConfig, ring_size: u16) -> (usize, usize, usize) {
    let half = usize::from(ring_size) / 2;
    let segs = (config.max_segments as usize)
        .min((half / 4).saturating_sub(2))
        .max(1);
    let bytes = config.max_transfer as usize;
    let parts = (half / (segs + 2)).max(1);
    (segs, bytes, parts)
}

impl AioDev {
    /// Set up `num_queues` rings of `size` entries. The watchdog starts later
    /// (`start_watchdog`), once probe can no longer fail.
    pub(crate) fn new(
        pdev: &pci::Device<device::Bound>,
        bar: pci::DevresBar<BAR0_SIZE>,
        config: abi::DeviceConfig,
        features: u64,
        size: u16,
        timeout_ms: u32,
    ) -> Result<Arc<Self>> {
        let event_idx = features & abi::feature::RING_EVENT_IDX != 0;
        // CAST: at most half the ring's entries, a u16.
        let part_limit = part_limits(&config, size).2 as u16;
        let mut queues = KVec::with_capacity(usize::from(config.num_queues), GFP_KERNEL)?;
        for index in 0..config.num_queues {
            let state = QueueState::new(Ring::new(pdev.as_ref(), size, event_idx)?, part_limit)?;
            let q = KBox::pin_init(
                pin_init!(Queue {
                    index,
                    state <- new_spinlock_irq!(state),
                    wait <- KillableWait::new(c"aiodma::queue_wait", kernel::static_lock_class!()),
                }),
                GFP_KERNEL,
            )?;
            queues.push(q, GFP_KERNEL)?;
        }
        Arc::pin_init(
            try_pin_init!(AioDev {
                dev: ARef::from(pdev.as_ref()),
                bar,
                config,
                features,
                queues,
                dead: Atomic::new(false),
                resetting: Atomic::new(false),
                quarantined: Atomic::new(false),
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
                gate <- kernel::new_srcu!(),
                watchdog <- new_delayed_work!("aiodma::watchdog"),
            }? Error),
            GFP_KERNEL,
        )
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
    /// The caller is the watchdog work or `shutdown` (called from unbind): `shutdown` stops the
    /// watchdog (disable and wait) before unbind returns, so in both places the device is bound
    /// for the whole borrow.
    pub(crate) unsafe fn bar_sleepable(&self) -> Option<&hw::Bar0<'_>> {
        // SAFETY: the caller's contract: the device stays bound while the result lives.
        let bound = unsafe { self.dev.as_bound() };
        self.bar.access(bound).ok()
    }

    /// Ring addresses of every queue, for programming the device.
    pub(crate) fn queue_addrs(&self) -> Result<KVec<hw::QueueAddrs>> {
        let mut addrs = KVec::with_capacity(self.queues.len(), GFP_KERNEL)?;
        for (i, q) in self.queues.iter().enumerate() {
            let a = {
                let st = q.state.lock();
                let ring = st.ring.as_ref().ok_or(ENODEV)?;
                let (desc, driver, device) = ring.addrs();
                // CAST: at most MAX_QUEUES queues.
                hw::QueueAddrs {
                    size: ring.size(),
                    desc,
                    driver,
                    device,
                    vector: i as u16,
                }
            };
            addrs.push(a, GFP_KERNEL)?;
        }
        Ok(addrs)
    }

    pub(crate) fn raw_dev(&self) -> *mut bindings::device {
        // CAST: `device::Device` is `#[repr(transparent)]` over the C `struct device` (its
        // `as_raw` is crate-private).
        core::ptr::from_ref::<device::Device>(&self.dev)
            .cast::<bindings::device>()
            .cast_mut()
    }

    /// The queue for the current CPU.
    pub(crate) fn pick_queue(&self) -> &Queue {
        // SAFETY: reading the current CPU number has no preconditions; a stale value only picks
        // a different (still valid) queue.
        let cpu = unsafe { bindings::raw_smp_processor_id() } as usize;
        &self.queues[cpu % self.queues.len()]
    }

    /// Notify the device of new chains on `q` (a register write: only when the ring asks).
    pub(crate) fn kick(&self, q: &Queue) {
        if let Some(bar) = self.bar.try_access() {
            hw::kick(&bar, q.index);
        }
    }

    /// Unmap and unpin a finished request's buffer, outside every queue lock. Once a reset has
    /// failed the device may still be writing into it: then it stays mapped and pinned.
    pub(crate) fn release_mapping(&self, mapping: Option<Mapping>) {
        if let Some(m) = mapping {
            if self.quarantined.load(Acquire) {
                core::mem::forget(m);
            } else {
                drop(m);
            }
        }
    }

    /// Count an asynchronous completion with `result`.
    pub(crate) fn count_async(&self, result: isize, cancelled: bool) {
        if cancelled {
            self.stats.cancels.fetch_add(1, Relaxed);
        }
        if result < 0 {
            self.stats.errors.fetch_add(1, Relaxed);
        } else {
            self.stats.bytes.fetch_add(result as u64, Relaxed);
        }
        self.stats.async_completions.fetch_add(1, Relaxed);
    }

    /// Handle completions on queue `index` (threaded interrupt context: may sleep).
    pub(crate) fn complete_queue(&self, index: usize) {
        let Some(q) = self.queues.get(index) else {
            return;
        };
        let _gate = self.gate.read_lock();
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
                    let (more, finished) = st.part_done(head, status, used_len);
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
            for f in batch.iter_mut().take(n).filter_map(Option::take) {
                f.finish(self);
            }
            // Synchronous callers whose outcome is in, and submitters waiting for room.
            q.wait.wake_all();
            if n == 0 {
                return;
            }
        }
    }
}
