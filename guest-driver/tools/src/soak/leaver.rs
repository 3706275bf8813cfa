//! Leavers: short-lived processes, forked by the soak's parent, that run a few verified steps
//! like any worker and then go away with requests in flight — libaio and io_uring batches
//! never reaped, and a thread blocked in a sync transfer — by exiting, by closing the device
//! file and exiting, or by being SIGKILLed by the parent. The driver must complete or fail
//! everything they left (the exit waits for libaio; io_uring and abandoned sync requests finish
//! behind it), and the parent counts a hang if the process is not gone by the deadline.
//!
//! A leaver's slot may still be written by what the previous user left in flight, so the
//! parent hands a slot out again only after a quarantine longer than the driver's timeout, and
//! each leaver starts with a shadow that knows nothing.

use std::os::fd::RawFd;
use std::time::Duration;

use super::counters::{self as c, Counters};
use super::worker::{Worker, WorkerCfg};
use crate::util::{AlignedBuf, Rng};

/// How a leaver goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    /// `_exit` with everything in flight.
    Exit,
    /// Close the device file, then `_exit`.
    CloseExit,
    /// Wait for the parent's SIGKILL.
    Killed,
}

impl Leave {
    /// Pick one.
    pub fn pick(rng: &mut Rng) -> Self {
        match rng.below(3) {
            0 => Leave::Exit,
            1 => Leave::CloseExit,
            _ => Leave::Killed,
        }
    }
}

/// Sync reads and writes on `[lo, lo + len)` for ever (until the process goes): the transfer
/// in progress when it does is abandoned inside the driver.
fn sync_forever(fd: RawFd, lo: u64, len: usize, seed: u64) {
    let Ok(mut buf) = AlignedBuf::new(len) else {
        return;
    };
    buf.fill_pattern(seed, lo);
    let mut rng = Rng(seed);
    loop {
        let n = 1 + rng.below(len as u64) as usize;
        // SAFETY: `buf` holds `len` >= `n` bytes and lives as long as this thread.
        unsafe {
            if rng.below(2) == 0 {
                libc::pwrite(fd, buf.ptr().cast(), n, lo as i64);
            } else {
                libc::pread(fd, buf.ptr().cast(), n, lo as i64);
            }
        }
    }
}

/// The leaver's life (in the forked child). Returns only on a setup failure (exit code);
/// otherwise the process ends in `_exit` or by the parent's SIGKILL.
pub fn run(cfg: WorkerCfg, ctrs: &Counters, steps: u64, how: Leave) -> i32 {
    let name = cfg.name.clone();
    let (lo, seed) = (cfg.lo, cfg.seed);
    let mut w = match Worker::new(cfg, ctrs) {
        Ok(w) => w,
        Err(e) => {
            println!("soak: {name}: {e}");
            ctrs.add(c::FAILED_WORKERS, 1);
            return 1;
        }
    };
    for _ in 0..steps {
        if w.should_stop() {
            break;
        }
        if let Err(e) = w.step() {
            println!("soak: {name}: {e}");
            ctrs.add(c::FAILED_WORKERS, 1);
            return 1;
        }
    }
    if w.poisoned {
        // Lost completions were counted; leave the rest to the parent's hang watch.
        // SAFETY: ending the process without destructors (the kernel may own our memory).
        unsafe { libc::_exit(0) };
    }
    let fd = w.raw_fd();
    let sync = std::thread::Builder::new()
        .name("soak-sync".into())
        .spawn(move || sync_forever(fd, lo, 64 << 10, seed ^ 0x5e7c));
    // A setup error now still leaves: the batches go in, whatever else happens.
    let _ = w.libaio_batch(true);
    let _ = w.uring_batch(true);
    // Let the sync thread get into the driver.
    std::thread::sleep(Duration::from_millis(2));
    drop(sync);
    match how {
        Leave::Exit | Leave::CloseExit => {
            if how == Leave::CloseExit {
                // SAFETY: closing our own descriptor; nothing uses it after the exit below
                // but the sync thread, which then fails with EBADF.
                unsafe { libc::close(fd) };
            }
            ctrs.add(c::EXITS, 1);
            // SAFETY: leaving without running destructors: the requests own their memory.
            unsafe { libc::_exit(0) }
        }
        Leave::Killed => {
            ctrs.set(c::LEAVER_READY, 1);
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
