// SPDX-License-Identifier: GPL-2.0
//! One request (one kiocb, one synchronous call, or an fsync) and its state machine.
//!
//! A request covers the caller's pinned buffer and is cut into *parts*, one descriptor chain
//! each. Who waits for it (`Waiter`) decides who takes it apart once it is *settled* (nothing on
//! the device, nothing more to send):
//!
//! ```text
//!  Arming ──kiocb attached──▶ Async (io_cancel: nothing more is sent; -ECANCELED once the
//!                                     device has returned every part)
//!  Sync ──fatal signal──▶ Gone
//!  settled: Async, Gone, Arming ─▶ taken out of the table by whoever saw it settle (Finished)
//!           Sync ─▶ `outcome` set; the sleeping caller takes it out itself
//! ```
//!
//! Everything here runs under the queue lock, so nothing here may sleep or drop a `Mapping` or
//! a `PendingIocb`: those leave the lock inside a `Finished` and are released after unlocking.

use kernel::{prelude::*, sync::atomic::Relaxed, time::Instant, time::Monotonic};

use crate::{
    abi,
    dev::{AioDev, Stats},
    iocb::PendingIocb,
    mapping::Mapping,
};

/// Who waits for a request.
pub(crate) enum Waiter {
    /// An asynchronous request between entering the table and getting its kiocb (aio's cancel
    /// hook is armed outside our lock meanwhile): not yet published.
    Arming,
    /// An asynchronous kiocb, completed from the interrupt path (or by cancel/timeout/reset).
    Async(PendingIocb),
    /// A synchronous caller sleeping in `submit`; it collects `outcome` and frees the slot.
    Sync,
    /// Nobody: the sync caller was killed. The request lingers until the device returns its
    /// buffers, or a reset makes it forget them.
    Gone,
}

/// One part of a request before it is published: a run of the mapping's segments, or the
/// FLUSH that ends a request.
#[derive(Clone, Copy)]
pub(crate) struct Cut {
    pub(crate) first: usize,
    pub(crate) count: usize,
    pub(crate) bytes: usize,
    pub(crate) flush: bool,
}

impl Cut {
    /// A FLUSH part: no data; published only once every earlier part has returned.
    pub(crate) const FLUSH: Cut = Cut {
        first: 0,
        count: 0,
        bytes: 0,
        flush: true,
    };
}

pub(crate) struct Request {
    pub(crate) id: u64,
    /// Bumped per use of the slot: stale cancel cookies and sleepers cannot touch a newer request.
    pub(crate) generation: u32,
    pub(crate) op: u32,
    pub(crate) len: usize,
    /// Device offset of the request's first byte.
    pub(crate) start: u64,
    /// Every part of the request, in device order; `cuts[next_cut..]` are not yet published.
    pub(crate) cuts: KVec<Cut>,
    pub(crate) next_cut: usize,
    /// Device offset of `cuts[next_cut]`.
    pub(crate) next_offset: u64,
    /// Parts on the device now.
    pub(crate) in_flight: u16,
    /// Device-side results folded together: the first error wins.
    pub(crate) error: Option<isize>,
    /// A READ part came back short: the request's data ends here (bytes from its start; the
    /// least such end wins, so the caller only ever sees a prefix the device filled).
    pub(crate) short_at: Option<usize>,
    pub(crate) mapping: Option<Mapping>,
    pub(crate) waiter: Waiter,
    /// When the request last made progress (a part published or returned): a part on the
    /// device times out counted from here, whoever waits for it.
    pub(crate) progress: Instant<Monotonic>,
    pub(crate) cancel_requested: bool,
    /// A synchronous request's result, once settled; its caller takes it from here.
    pub(crate) outcome: Option<isize>,
}

impl Request {
    /// Whether more parts should go to the device: nobody waits for a cancelled or abandoned
    /// request, and a failed one has its answer already.
    pub(crate) fn wants_more(&self) -> bool {
        self.next_cut < self.cuts.len()
            && self.error.is_none()
            && self.short_at.is_none()
            && self.outcome.is_none()
            && !self.cancel_requested
            && matches!(self.waiter, Waiter::Async(_) | Waiter::Sync)
    }

    /// Nothing on the device and nothing more to send: the request can finish.
    pub(crate) fn settled(&self) -> bool {
        self.in_flight == 0 && !self.wants_more()
    }

    /// The next part may go out now: a FLUSH waits until everything before it has returned.
    pub(crate) fn next_is_ready(&self) -> bool {
        self.cuts
            .get(self.next_cut)
            .is_some_and(|c| !c.flush || self.in_flight == 0)
    }

    /// The result of a settled request: -ECANCELED once cancelled or abandoned, else what the
    /// device said: an error, the bytes up to the first short READ part, or the whole length.
    /// Never more than the request's length.
    pub(crate) fn result(&self) -> isize {
        if self.cancel_requested || matches!(self.waiter, Waiter::Gone) {
            return ECANCELED.to_errno() as isize;
        }
        match (self.error, self.short_at) {
            (Some(e), _) => e,
            // CAST: at most `len`, the size of a pinned buffer, which fits an isize.
            (None, Some(at)) => at.min(self.len) as isize,
            (None, None) => self.len as isize,
        }
    }

    /// Fold in one returned part (`at`: where its `len` bytes start in the request). A READ
    /// part whose used length (data + status byte) is shorter than asked ends the request's
    /// data there; `part_done` has already refused lengths longer than the chain.
    pub(crate) fn part_returned(
        &mut self,
        op: u32,
        at: usize,
        len: usize,
        status: u8,
        used_len: u32,
        stats: &Stats,
    ) {
        match status_to_result(status) {
            Err(e) => {
                if status_is_unknown(status) {
                    stats.bad_status.fetch_add(1, Relaxed);
                    crate::kdebug!("req {}: unknown status {:#x}, -EIO\n", self.id, status);
                }
                self.error.get_or_insert(e);
            }
            Ok(()) if op == abi::op::READ && (used_len as usize) < len + 1 => {
                stats.short_reads.fetch_add(1, Relaxed);
                let got = (used_len as usize).saturating_sub(1);
                crate::kdebug!(
                    "req {}: short read part: {} of {} bytes at {}\n",
                    self.id,
                    got,
                    len,
                    at
                );
                let end = at + got;
                self.short_at = Some(self.short_at.map_or(end, |s| s.min(end)));
            }
            Ok(()) => {}
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        self.progress = Instant::now();
    }

    /// The device was reset: it forgot every part, and nothing more goes out.
    pub(crate) fn forget_parts(&mut self, res: isize) {
        self.in_flight = 0;
        self.error.get_or_insert(res);
    }

    /// Whether a part on the device is older than `timeout_ms`.
    pub(crate) fn overdue(&self, timeout_ms: u32) -> bool {
        self.in_flight > 0 && self.progress.elapsed().as_millis() > i64::from(timeout_ms)
    }
}

/// A part's status byte as a result: OK, or the error its request fails with. A status the
/// device does not define is an I/O error.
fn status_to_result(status: u8) -> core::result::Result<(), isize> {
    let e = match status {
        abi::req_status::OK => return Ok(()),
        abi::req_status::IOERR => EIO,
        abi::req_status::UNSUPP => EOPNOTSUPP,
        abi::req_status::MALFORMED => EINVAL,
        _ => EIO,
    };
    Err(e.to_errno() as isize)
}

/// Whether `status` is none of the codes the device defines (SPEC 6.1).
fn status_is_unknown(status: u8) -> bool {
    !matches!(
        status,
        abi::req_status::OK
            | abi::req_status::IOERR
            | abi::req_status::UNSUPP
            | abi::req_status::MALFORMED
    )
}

/// A finished request on its way out of the lock, to be released and completed outside it.
pub(crate) struct Finished {
    mapping: Option<Mapping>,
    pending: Option<PendingIocb>,
    result: isize,
    id: u64,
    cancelled: bool,
}

impl Finished {
    /// Take settled request `slot` apart (under the queue lock) with `result`. An asynchronous,
    /// abandoned or arming request leaves the table; a synchronous one stays, with its outcome,
    /// for its caller (who is woken by the caller of this), and yields nothing here.
    pub(crate) fn take(
        requests: &mut KVec<Option<Request>>,
        slot: usize,
        result: isize,
    ) -> Option<Self> {
        let entry = requests.get_mut(slot)?;
        if let Some(req) = entry.as_mut() {
            if matches!(req.waiter, Waiter::Sync) {
                req.outcome.get_or_insert(result);
                return None;
            }
        }
        let req = entry.take()?;
        let pending = match req.waiter {
            Waiter::Async(p) => Some(p),
            Waiter::Gone => {
                crate::kdebug!("req {}: abandoned request reaped ({})\n", req.id, result);
                None
            }
            Waiter::Arming | Waiter::Sync => None,
        };
        let cancelled = req.cancel_requested && pending.is_some();
        Some(Finished {
            mapping: req.mapping,
            pending,
            result,
            id: req.id,
            cancelled,
        })
    }

    /// Unmap and unpin first, then tell the waiter. Outside every queue lock.
    pub(crate) fn finish(self, dev: &AioDev) {
        dev.release_mapping(self.mapping);
        if let Some(p) = self.pending {
            dev.count_async(self.result, self.cancelled);
            if self.cancelled {
                crate::kdebug!("req {}: cancelled, ki_complete({})\n", self.id, self.result);
            } else {
                crate::kdebug!("req {}: completed, ki_complete({})\n", self.id, self.result);
            }
            p.complete(self.result);
        }
    }
}
