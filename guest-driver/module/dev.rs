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
    bindings, device, fmt, new_mutex, pci,
    prelude::*,
    sync::{
        aref::ARef,
        atomic::{Acquire, Atomic, Relaxed, Release},
        new_spinlock_irq, Arc, Mutex, Srcu,
    },
    workqueue::{
        impl_has_delayed_work, impl_has_work, new_delayed_work, new_work, DelayedWork, Work,
    },
};

use crate::{
    abi,
    hw::{self, BAR0_SIZE},
    mapping::Mapping,
    queue::{Lie, Queue, QueueState},
    request::Finished,
    ring::Ring,
    wait::KillableWait,
};

/// Driver statistics. The first group is what the info ioctl reports (`abi::DeviceInfo`); the
/// rest, the device's misbehaviour the driver saw and what it did about it, are in debugfs
/// (`/sys/kernel/debug/aiodmaN/stats`, `write_stats`).
pub(crate) struct Stats {
    pub(crate) submitted: Atomic<u64>,
    pub(crate) async_completions: Atomic<u64>,
    pub(crate) sync_completions: Atomic<u64>,
    pub(crate) errors: Atomic<u64>,
    pub(crate) bytes: Atomic<u64>,
    pub(crate) timeouts: Atomic<u64>,
    pub(crate) cancels: Atomic<u64>,
    pub(crate) resets: Atomic<u64>,
    /// Used-ring lies (`queue::Lie`), by kind: each one makes the driver reset the device.
    pub(crate) used_bad_index: Atomic<u64>,
    pub(crate) used_bad_id: Atomic<u64>,
    pub(crate) used_dup: Atomic<u64>,
    pub(crate) used_no_status: Atomic<u64>,
    pub(crate) used_bad_len: Atomic<u64>,
    /// Parts that came back with a status code the device does not define (-EIO).
    pub(crate) bad_status: Atomic<u64>,
    /// READ parts that came back with fewer bytes than asked.
    pub(crate) short_reads: Atomic<u64>,
    /// Used elements the watchdog found (their interrupt was lost, or not yet handled).
    pub(crate) watchdog_reaped: Atomic<u64>,
    /// Queue interrupts that found nothing new in the used ring.
    pub(crate) empty_irqs: Atomic<u64>,
    /// Configuration-change interrupts (the device's NEEDS_RESET signal).
    pub(crate) config_irqs: Atomic<u64>,
    /// Resets by cause.
    pub(crate) resets_lie: Atomic<u64>,
    pub(crate) resets_needs_reset: Atomic<u64>,
    pub(crate) resets_timeout: Atomic<u64>,
}

impl Stats {
    const fn new() -> Self {
        Stats {
            submitted: Atomic::new(0),
            async_completions: Atomic::new(0),
            sync_completions: Atomic::new(0),
            errors: Atomic::new(0),
            bytes: Atomic::new(0),
            timeouts: Atomic::new(0),
            cancels: Atomic::new(0),
            resets: Atomic::new(0),
            used_bad_index: Atomic::new(0),
            used_bad_id: Atomic::new(0),
            used_dup: Atomic::new(0),
            used_no_status: Atomic::new(0),
            used_bad_len: Atomic::new(0),
            bad_status: Atomic::new(0),
            short_reads: Atomic::new(0),
            watchdog_reaped: Atomic::new(0),
            empty_irqs: Atomic::new(0),
            config_irqs: Atomic::new(0),
            resets_lie: Atomic::new(0),
            resets_needs_reset: Atomic::new(0),
            resets_timeout: Atomic::new(0),
        }
    }

    /// Count one used-ring lie under its kind.
    pub(crate) fn count_lie(&self, lie: &Lie) {
        let counter = match lie {
            Lie::IndexJump { .. } => &self.used_bad_index,
            Lie::IdOutOfRange(_) | Lie::NotInFlight(_) | Lie::Stale(_) => &self.used_bad_id,
            Lie::Duplicate(_) => &self.used_dup,
            Lie::NoStatus(_) => &self.used_no_status,
            Lie::Overlong { .. } => &self.used_bad_len,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// Where `complete_queue` runs: a queue interrupt's thread, or the watchdog reaping completions
/// whose interrupt may have been lost.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reaper {
    Irq,
    Watchdog,
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
    /// The device lied in a used ring (that queue is `broken`): the next recovery pass
    /// resets it.
    pub(crate) lied: Atomic<bool>,
    /// The configuration interrupt fired: the next recovery pass reads DEVICE_STATUS.
    pub(crate) config_changed: Atomic<bool>,
    /// MSI-X vector for configuration changes (`abi::NO_VECTOR` without one), programmed at
    /// every bring-up.
    pub(crate) config_vector: Atomic<u32>,
    pub(crate) next_id: Atomic<u64>,
    pub(crate) timeout_ms: u32,
    pub(crate) stats: Stats,
    /// Submitters and interrupt threads read-hold it; unbind waits for it to empty.
    #[pin]
    pub(crate) gate: Srcu,
    /// Held by a recovery pass (the periodic watchdog or the one `schedule_recovery` queues):
    /// one pass at a time resets the device.
    #[pin]
    pub(crate) recovery: Mutex<()>,
    #[pin]
    pub(crate) watchdog: DelayedWork<AioDev>,
    /// A recovery pass now rather than at the next watchdog period: a lie in a used ring, or
    /// the configuration interrupt.
    #[pin]
    pub(crate) urgent: Work<AioDev, 1>,
}

impl_has_delayed_work! {
    impl HasDelayedWork<Self> for AioDev { self.watchdog }
}

impl_has_work! {
    impl HasWork<Self, 1> for AioDev { self.urgent }
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
                lied: Atomic::new(false),
                config_changed: Atomic::new(false),
                config_vector: Atomic::new(u32::from(abi::NO_VECTOR)),
                next_id: Atomic::new(1),
                timeout_ms,
                stats: Stats::new(),
                gate <- kernel::new_srcu!(),
                recovery <- new_mutex!(()),
                watchdog <- new_delayed_work!("aiodma::watchdog"),
                urgent <- new_work!("aiodma::recovery"),
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

    /// BAR0 for code that may sleep while using it: recovery passes and `shutdown` only.
    ///
    /// # Safety
    /// The caller is a recovery pass (the watchdog or the urgent work) or `shutdown` (called
    /// from unbind): `shutdown` disables both works and waits for them before unbind returns,
    /// so in both places the device is bound for the whole borrow.
    pub(crate) unsafe fn bar_sleepable(&self) -> Option<&hw::Bar0<'_>> {
        // SAFETY: the caller's contract: the device stays bound while the result lives.
        let bound = unsafe { self.dev.as_bound() };
        self.bar.access(bound).ok()
    }

    /// The configuration-change MSI-X vector to program, if the driver has one.
    pub(crate) fn config_vector(&self) -> Option<u16> {
        u16::try_from(self.config_vector.load(Relaxed))
            .ok()
            .filter(|v| *v != abi::NO_VECTOR)
    }

    /// The configuration interrupt (hard interrupt context): the device changed its status,
    /// which for this device means NEEDS_RESET. A recovery pass reads it at once.
    pub(crate) fn config_interrupt(self: &Arc<Self>) {
        self.stats.config_irqs.fetch_add(1, Relaxed);
        self.config_changed.store(true, Release);
        self.schedule_recovery();
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

    /// Handle completions on queue `index`: from its threaded interrupt (may sleep), or from
    /// the watchdog, which reaps what a lost interrupt left behind. Every used element is
    /// checked against what the driver has on the device (`QueueState::part_done`); the first
    /// lie stops the queue (`broken`: nothing more is taken from or published on it) and asks
    /// for a reset, which fails or finishes what was in flight.
    pub(crate) fn complete_queue(self: &Arc<Self>, index: usize, reaper: Reaper) {
        let Some(q) = self.queues.get(index) else {
            return;
        };
        let _gate = self.gate.read_lock();
        let mut first = true;
        loop {
            let mut batch: [Option<Finished>; 16] = Default::default();
            let mut n = 0;
            let mut kick = false;
            let mut reaped = 0u64;
            let mut lie = None;
            {
                let mut st = q.state.lock();
                if st.broken {
                    return;
                }
                while n < batch.len() {
                    let Some(ring) = st.ring.as_mut() else { break };
                    let (id, used_len) = match ring.pop_used() {
                        Ok(Some(e)) => e,
                        Ok(None) => {
                            if ring.arm_interrupt() {
                                continue;
                            }
                            break;
                        }
                        Err(l) => {
                            lie = Some(l);
                            break;
                        }
                    };
                    reaped += 1;
                    match st.part_done(id, used_len, &self.stats) {
                        Ok((more, finished)) => {
                            kick |= more;
                            if let Some(f) = finished {
                                batch[n] = Some(f);
                                n += 1;
                            }
                        }
                        Err(l) => {
                            lie = Some(l);
                            break;
                        }
                    }
                }
                if lie.is_some() {
                    st.broken = true;
                } else {
                    // Room came back: parts of other requests waiting for it go out now.
                    while n < batch.len() {
                        let (more, finished) = st.progress();
                        kick |= more;
                        let Some(f) = finished else { break };
                        batch[n] = Some(f);
                        n += 1;
                    }
                }
            }
            match reaper {
                Reaper::Watchdog => {
                    if reaped > 0 {
                        self.stats.watchdog_reaped.fetch_add(reaped, Relaxed);
                    }
                }
                Reaper::Irq if first && reaped == 0 && lie.is_none() => {
                    self.stats.empty_irqs.fetch_add(1, Relaxed);
                }
                Reaper::Irq => {}
            }
            first = false;
            if kick {
                self.kick(q);
            }
            for f in batch.iter_mut().take(n).filter_map(Option::take) {
                f.finish(self);
            }
            // Synchronous callers whose outcome is in, and submitters waiting for room.
            q.wait.wake_all();
            if let Some(l) = lie {
                self.stats.count_lie(&l);
                pr_warn!(
                    "queue {}: the device lied in its used ring ({}): resetting it\n",
                    q.index,
                    l
                );
                self.lied.store(true, Release);
                self.schedule_recovery();
                return;
            }
            if n == 0 {
                return;
            }
        }
    }

    /// The statistics as `name: value` lines (the debugfs `stats` file).
    pub(crate) fn write_stats(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        let rows: [(&str, &Atomic<u64>); 21] = [
            ("submitted", &s.submitted),
            ("async_completions", &s.async_completions),
            ("sync_completions", &s.sync_completions),
            ("errors", &s.errors),
            ("bytes", &s.bytes),
            ("timeouts", &s.timeouts),
            ("cancels", &s.cancels),
            ("resets", &s.resets),
            ("resets_lie", &s.resets_lie),
            ("resets_needs_reset", &s.resets_needs_reset),
            ("resets_timeout", &s.resets_timeout),
            ("used_bad_index", &s.used_bad_index),
            ("used_bad_id", &s.used_bad_id),
            ("used_dup", &s.used_dup),
            ("used_no_status", &s.used_no_status),
            ("used_bad_len", &s.used_bad_len),
            ("bad_status", &s.bad_status),
            ("short_reads", &s.short_reads),
            ("watchdog_reaped", &s.watchdog_reaped),
            ("empty_irqs", &s.empty_irqs),
            ("config_irqs", &s.config_irqs),
        ];
        for (name, v) in rows {
            writeln!(f, "{}: {}", name, v.load(Relaxed))?;
        }
        Ok(())
    }
}
