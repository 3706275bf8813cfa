//! The soak's counters, in one shared anonymous mapping ([`crate::proc::Shared`]) created
//! before the first fork: every worker thread of every process adds to the same totals, and the
//! parent reads them once a second without any message passing.

use crate::proc::Shared;

/// A counter's index in the shared mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctr(pub usize);

/// Requests submitted (each sync call, iocb or SQE that reached the kernel).
pub const REQUESTS: Ctr = Ctr(0);
/// Of which reads, writes, flushes.
pub const READS: Ctr = Ctr(1);
/// Writes submitted.
pub const WRITES: Ctr = Ctr(2);
/// Flushes (fsync, fdatasync, IOCB_CMD_FDSYNC, IORING_OP_FSYNC) submitted.
pub const FLUSHES: Ctr = Ctr(3);
/// Completions with the full count (or 0 for a flush).
pub const OK: Ctr = Ctr(4);
/// Reads that returned fewer bytes than asked (the returned ones are checked).
pub const SHORT: Ctr = Ctr(5);
/// Completions with an error (by errno below).
pub const ERRORS: Ctr = Ctr(6);
/// Bytes compared with the shadow.
pub const VERIFIED: Ctr = Ctr(7);
/// Cancels attempted (io_cancel, IORING_OP_ASYNC_CANCEL).
pub const CANCEL_TRIED: Ctr = Ctr(8);
/// Cancels the kernel took (io_cancel 0/EINPROGRESS, ASYNC_CANCEL result 0).
pub const CANCEL_TAKEN: Ctr = Ctr(9);
/// Submissions that never completed by the deadline.
pub const LOST: Ctr = Ctr(10);
/// Completions beyond the first of a submission, or naming none of ours.
pub const DUPLICATED: Ctr = Ctr(11);
/// Reads whose data matched no write the shadow remembers (or came back longer than asked).
pub const CORRUPT: Ctr = Ctr(12);
/// Reads that returned an older write's data over a newer acknowledged one.
pub const STALE: Ctr = Ctr(13);
/// Calls (sync I/O, io_destroy, close, a process exit) that did not return by the deadline.
pub const HANGS: Ctr = Ctr(14);
/// Writes whose outcome is unknown (failed, cancelled, short, or never reaped).
pub const UNKNOWN_WRITES: Ctr = Ctr(15);
/// Batches whose fd was closed with their requests in flight.
pub const CLOSES: Ctr = Ctr(16);
/// Batches whose libaio context was destroyed with their requests in flight.
pub const DESTROYS: Ctr = Ctr(17);
/// Processes that exited with requests in flight.
pub const EXITS: Ctr = Ctr(18);
/// Processes SIGKILLed with requests in flight.
pub const KILLS: Ctr = Ctr(19);
/// Workers or leavers that failed to run at all (setup errors).
pub const FAILED_WORKERS: Ctr = Ctr(20);
/// Set by the parent: stop starting new work.
pub const STOP: Ctr = Ctr(21);
/// Requests by engine.
pub const SYNC: Ctr = Ctr(22);
/// libaio requests.
pub const LIBAIO: Ctr = Ctr(23);
/// io_uring requests.
pub const URING: Ctr = Ctr(24);
/// io_uring requests on registered buffers.
pub const FIXED: Ctr = Ctr(25);
/// Vectored requests.
pub const VECTORED: Ctr = Ctr(26);
/// Requests with an unaligned offset, length or buffer.
pub const UNALIGNED: Ctr = Ctr(27);
/// Writes with RWF_DSYNC or on an O_DSYNC file (the driver adds a FLUSH).
pub const DSYNC: Ctr = Ctr(28);
/// Bytes transferred by successful reads and writes.
pub const BYTES: Ctr = Ctr(29);
/// A leaver has its requests in flight and waits to be killed.
pub const LEAVER_READY: Ctr = Ctr(30);

/// The errnos counted one by one; everything else goes to "other".
pub const ERRNOS: [i32; 12] = [
    libc::EIO,
    libc::ETIMEDOUT,
    libc::ECANCELED,
    libc::EINTR,
    libc::EAGAIN,
    libc::ENOMEM,
    libc::EINVAL,
    libc::EFAULT,
    libc::EBADF,
    libc::ENODEV,
    libc::ENOSPC,
    libc::EBUSY,
];
const ERRNO_BASE: usize = 32;
/// Errors with an errno not in [`ERRNOS`].
pub const ERRNO_OTHER: Ctr = Ctr(ERRNO_BASE + ERRNOS.len());
const SLOT_BASE: usize = 48;
/// Per-worker slots: when its current blocking call started (ms, 0: none), and whether a hang
/// was already counted for that call.
const SLOT_WIDTH: usize = 2;
/// Workers the mapping has slots for (the leaver takes the last).
pub const MAX_WORKERS: usize = 256;
/// Counters in the mapping.
pub const LEN: usize = SLOT_BASE + SLOT_WIDTH * MAX_WORKERS;

const _: () = assert!(LEAVER_READY.0 < ERRNO_BASE && ERRNO_OTHER.0 < SLOT_BASE);

/// The counter of errors with `errno`.
pub fn errno_ctr(errno: i32) -> Ctr {
    ERRNOS
        .iter()
        .position(|&e| e == errno)
        .map_or(ERRNO_OTHER, |i| Ctr(ERRNO_BASE + i))
}

/// When worker `w`'s current blocking call started.
pub fn busy_since(w: usize) -> Ctr {
    Ctr(SLOT_BASE + SLOT_WIDTH * w.min(MAX_WORKERS - 1))
}

/// Whether a hang was counted for worker `w`'s current call.
pub fn hang_counted(w: usize) -> Ctr {
    Ctr(SLOT_BASE + SLOT_WIDTH * w.min(MAX_WORKERS - 1) + 1)
}

/// The shared counters.
#[derive(Debug)]
pub struct Counters(Shared);

// SAFETY: the mapping holds only atomics, lives as long as the value, and every access goes
// through `AtomicI64`, so sharing `&Counters` between threads is sound.
unsafe impl Sync for Counters {}

impl Counters {
    /// All zero.
    pub fn new() -> Result<Self, String> {
        Shared::new(LEN).map(Self)
    }

    /// Read.
    pub fn get(&self, c: Ctr) -> i64 {
        self.0.get(c.0)
    }

    /// Add.
    pub fn add(&self, c: Ctr, v: i64) {
        self.0.add(c.0, v)
    }

    /// Set.
    pub fn set(&self, c: Ctr, v: i64) {
        self.0.set(c.0, v)
    }

    /// Errors by errno, `EIO:3,ETIMEDOUT:1` (or `none`).
    pub fn errnos(&self) -> String {
        let mut parts: Vec<String> = ERRNOS
            .iter()
            .filter_map(|&e| {
                let n = self.get(errno_ctr(e));
                (n > 0).then(|| format!("{}:{n}", crate::util::errno_name(e)))
            })
            .collect();
        let other = self.get(ERRNO_OTHER);
        if other > 0 {
            parts.push(format!("other:{other}"));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(",")
        }
    }

    /// The counts that fail a soak.
    pub fn failures(&self) -> i64 {
        [LOST, DUPLICATED, CORRUPT, STALE, HANGS, FAILED_WORKERS]
            .iter()
            .map(|&c| self.get(c))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_do_not_overlap() {
        assert_eq!(errno_ctr(libc::EIO), Ctr(ERRNO_BASE));
        assert_eq!(errno_ctr(9999), ERRNO_OTHER);
        assert_eq!(hang_counted(MAX_WORKERS + 5).0, LEN - 1);
        let c = Counters::new().unwrap();
        c.add(errno_ctr(libc::ETIMEDOUT), 2);
        c.add(ERRNO_OTHER, 1);
        assert_eq!(c.errnos(), "ETIMEDOUT:2,other:1");
    }
}
