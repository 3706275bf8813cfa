// SPDX-License-Identifier: GPL-2.0
//! The kiocb shim: the only code that reads or completes a `struct kiocb` behind the kernel's
//! back. Linux 7.3's `fs::Kiocb` is a borrowed view with no asynchronous completion, so an
//! owned completion obligation lives here.

use core::ptr::NonNull;

use kernel::{bindings, prelude::*};

/// `FMODE_NOWAIT` (include/linux/fs.h): a `__force` cast bindgen does not export.
pub(crate) const FMODE_NOWAIT: u32 = 1 << 27;
/// `FMODE_CAN_ODIRECT` (include/linux/fs.h), likewise.
pub(crate) const FMODE_CAN_ODIRECT: u32 = 1 << 22;
/// `IOCB_NOWAIT` = `RWF_NOWAIT` (include/linux/fs.h, include/uapi/linux/fs.h).
pub(crate) const IOCB_NOWAIT: i32 = 0x8;
/// `IOCB_DSYNC` = `RWF_DSYNC`: set for `O_DSYNC`/`O_SYNC` files and `RWF_DSYNC`/`RWF_SYNC`.
pub(crate) const IOCB_DSYNC: i32 = 0x2;

type CancelFn = unsafe extern "C" fn(*mut bindings::kiocb) -> core::ffi::c_int;

// fs/aio.c (CONFIG_AIO=y); linux/aio.h is not among the Rust bindings' headers. Only a pointer
// to the kiocb crosses, so the (bindgen-opaque) field types inside it do not matter.
#[allow(improper_ctypes)]
extern "C" {
    fn kiocb_set_cancel_fn(req: *mut bindings::kiocb, cancel: Option<CancelFn>);
}

/// A kiocb handed to `read_iter`/`write_iter`, valid for the duration of that call.
#[derive(Clone, Copy)]
pub(crate) struct KiocbRef(NonNull<bindings::kiocb>);

impl KiocbRef {
    /// # Safety
    /// `k` is the kiocb of a `read_iter`/`write_iter` call that is still running.
    pub(crate) unsafe fn new(k: *mut bindings::kiocb) -> Option<Self> {
        NonNull::new(k).map(Self)
    }

    /// A synchronous kiocb (plain read/write): the caller waits for our return value.
    pub(crate) fn is_sync(self) -> bool {
        // SAFETY: valid for the call (type invariant of `new`'s caller contract).
        unsafe { (*self.0.as_ptr()).ki_complete.is_none() }
    }

    /// The caller must not sleep for resources (io_uring inline issue, RWF_NOWAIT).
    pub(crate) fn nowait(self) -> bool {
        // SAFETY: as above.
        unsafe { (*self.0.as_ptr()).ki_flags & IOCB_NOWAIT != 0 }
    }

    /// The write must be durable before it completes.
    pub(crate) fn dsync(self) -> bool {
        // SAFETY: as above.
        unsafe { (*self.0.as_ptr()).ki_flags & IOCB_DSYNC != 0 }
    }

    /// The file position of this request.
    pub(crate) fn pos(self) -> i64 {
        // SAFETY: as above.
        unsafe { (*self.0.as_ptr()).ki_pos }
    }

    /// Advance the position (synchronous requests, after a transfer).
    pub(crate) fn advance(self, bytes: usize) {
        // SAFETY: as above; only the thread running the call touches ki_pos of a sync kiocb.
        unsafe { (*self.0.as_ptr()).ki_pos += bytes as i64 }
    }

    /// The file's private data (our `OpenFile`).
    pub(crate) fn private_data(self) -> *mut core::ffi::c_void {
        // SAFETY: as above; the kiocb holds a reference on its file.
        unsafe { (*(*self.0.as_ptr()).ki_filp).private_data }
    }

    /// Take on the obligation to complete this asynchronous kiocb.
    ///
    /// # Safety
    /// If this returns `Some`, the running `read_iter`/`write_iter` must return `-EIOCBQUEUED`
    /// unless it first gives the obligation back with [`PendingIocb::disown`].
    pub(crate) unsafe fn into_pending(self) -> Option<PendingIocb> {
        if self.is_sync() {
            None
        } else {
            Some(PendingIocb(self.0))
        }
    }
}

/// The obligation to complete one asynchronous kiocb exactly once.
///
/// # Invariants
/// The kiocb is asynchronous (`ki_complete` is set), not yet completed, and its submitter
/// returned `-EIOCBQUEUED`, so aio / io_uring keep it alive until `ki_complete`.
pub(crate) struct PendingIocb(NonNull<bindings::kiocb>);

// SAFETY: `ki_complete` may run on any CPU and in any context, hard IRQ included (aio and
// io_uring both defer their own work from it).
unsafe impl Send for PendingIocb {}

impl PendingIocb {
    /// Make the request cancellable with `io_cancel` (aio only; io_uring kiocbs are left alone)
    /// and remember `cookie` for the cancel callback. Must not be called under a lock the
    /// cancel callback takes: aio calls it under its own context lock, which this takes too.
    pub(crate) fn arm_cancel(&self, cookie: usize) {
        let cancel: CancelFn = crate::recovery::aio_cancel;
        let k = self.0.as_ptr();
        // SAFETY: by the type invariant the kiocb is live. `private` is unused by aio
        // (aio_prep_rw sets it to NULL) and only aio kiocbs carry IOCB_AIO_RW.
        unsafe {
            if (*k).ki_flags & bindings::IOCB_AIO_RW as i32 != 0 {
                (*k).private = cookie as *mut core::ffi::c_void;
                kiocb_set_cancel_fn(k, Some(cancel));
            }
        }
    }

    /// Give the obligation back: the submitter returns an error (not `-EIOCBQUEUED`), and aio
    /// or io_uring complete the request themselves (io_uring retries `-EAGAIN` from a worker).
    pub(crate) fn disown(self) {
        core::mem::forget(self);
    }

    /// Complete with `res`: a byte count, or a negative errno. The position moves past what
    /// was transferred first (io_uring reads it back for requests at the file position).
    pub(crate) fn complete(self, res: isize) {
        let k = self.0.as_ptr();
        core::mem::forget(self);
        if res > 0 {
            // SAFETY: by the type invariant the kiocb is live until `ki_complete` below.
            unsafe { (*k).ki_pos += res as i64 };
        }
        // SAFETY: by the type invariant the kiocb is live and `ki_complete` is set; after this
        // call it may be freed, and `self` was consumed so it is never touched again.
        unsafe {
            if let Some(done) = (*k).ki_complete {
                done(k, res);
            }
        }
    }
}

impl Drop for PendingIocb {
    fn drop(&mut self) {
        // A driver bug (every path completes or disowns explicitly), reported loudly once; the
        // kiocb is still completed, or aio's exit path and io_uring teardown would wait forever.
        static WARNED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, core::sync::atomic::Ordering::Relaxed) {
            kernel::warn_on!(true);
        }
        pr_err!("pending kiocb dropped without completion; completing with -EIO\n");
        let k = self.0.as_ptr();
        // SAFETY: as in `complete`; `drop` runs at most once.
        unsafe {
            if let Some(done) = (*k).ki_complete {
                done(k, EIO.to_errno() as isize);
            }
        }
    }
}

/// What aio's cancel callback needs of the kiocb: its file's private data and our cookie.
///
/// # Safety
/// `k` is a live aio kiocb of one of our files (aio's cancel callback contract).
pub(crate) unsafe fn cancel_target(k: *mut bindings::kiocb) -> (*mut core::ffi::c_void, usize) {
    // SAFETY: the caller's contract; aio holds a reference on the file while the request lives.
    unsafe { ((*(*k).ki_filp).private_data, (*k).private as usize) }
}
