// SPDX-License-Identifier: GPL-2.0
//! A wait queue whose sleepers only a fatal signal interrupts (`TASK_KILLABLE`).
//!
//! A synchronous transfer must not leave while the device may still read or write the caller's
//! pages (an abandoned write could land after the restarted one), yet a killed process must not
//! hang on a dead device. Linux 7.3's Rust `CondVar` sleeps either uninterruptibly or
//! interruptibly, so this is the `wait_event_killable()` loop written against the exported wait
//! primitives. The condition takes whatever lock it needs itself: checking it after
//! `prepare_to_wait_event` (the task is already queued) loses no wake-up.

use core::{ffi::c_int, marker::PhantomPinned};

use kernel::{bindings, prelude::*, sync::LockClassKey, types::Opaque};

/// A wait queue head with killable sleeps.
#[pin_data]
pub(crate) struct KillableWait {
    #[pin]
    head: Opaque<bindings::wait_queue_head>,
    #[pin]
    _pin: PhantomPinned,
}

// SAFETY: a `wait_queue_head` is used from any thread under its own spinlock.
unsafe impl Send for KillableWait {}
// SAFETY: as above; every method takes `&self` and the C side serialises.
unsafe impl Sync for KillableWait {}

impl KillableWait {
    /// A new wait queue (lockdep class `key`).
    pub(crate) fn new(name: &'static CStr, key: Pin<&'static LockClassKey>) -> impl PinInit<Self> {
        pin_init!(Self {
            _pin: PhantomPinned,
            // SAFETY: `slot` is valid while the closure runs; `name` and `key` are static.
            head <- Opaque::ffi_init(|slot| unsafe {
                bindings::__init_waitqueue_head(slot, name.as_char_ptr(), key.as_ptr())
            }),
        })
    }

    /// Sleep until `ready` returns `Some`, or fail with `ERESTARTSYS` on a fatal signal.
    /// `ready` runs with the task queued and not running: it may take spinlocks, never sleep.
    pub(crate) fn wait_until<R>(&self, mut ready: impl FnMut() -> Option<R>) -> Result<R> {
        let entry = Opaque::<bindings::wait_queue_entry>::uninit();
        // SAFETY: `entry` is valid, on our stack until `finish_wait` below unlinks it.
        unsafe { bindings::init_wait_entry(entry.get(), 0) };
        let result = loop {
            // SAFETY: `head` is initialised and pinned; `entry` was initialised above. Returns
            // non-zero (and leaves the task running, unqueued) when a fatal signal is pending.
            let interrupted = unsafe {
                bindings::prepare_to_wait_event(
                    self.head.get(),
                    entry.get(),
                    bindings::TASK_KILLABLE as c_int,
                )
            } != 0;
            if let Some(r) = ready() {
                break Ok(r);
            }
            if interrupted {
                break Err(ERESTARTSYS);
            }
            // SAFETY: process context, no lock held (`ready` released its own).
            unsafe { bindings::schedule() };
        };
        // SAFETY: `entry` may or may not still be queued on `head`; `finish_wait` handles both.
        unsafe { bindings::finish_wait(self.head.get(), entry.get()) };
        result
    }

    /// Wake every sleeper.
    pub(crate) fn wake_all(&self) {
        // SAFETY: `head` is initialised; a null key wakes every (non-exclusive) entry.
        unsafe {
            bindings::__wake_up(
                self.head.get(),
                bindings::TASK_NORMAL,
                0,
                core::ptr::null_mut(),
            )
        };
    }
}
