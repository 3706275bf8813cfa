//! One soak worker: a thread that owns a region of the device, drives it through the sync,
//! libaio and io_uring paths with a seeded mix of requests, and checks every result against its
//! [`Shadow`] of that region. Nothing else writes the region, so the shadow needs no locking
//! and no cross-process coordination.
//!
//! Requests in flight at the same time never overlap (SPEC 10 would allow the device any order
//! for overlapping ones, and the checker would have to accept every order); byte-disjoint
//! requests may still share a 512-byte block, which the device serialises, so a driver that
//! read-modify-writes blocks would show up.
//!
//! All buffers of a batch come from one arena per worker, registered with the worker's ring so
//! that any of them can also be used as a fixed buffer; the arena is refilled only once nothing
//! is in flight, and the ring and the libaio context are dropped before it.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

use super::counters::{self as c, Counters};
use super::shadow::{self, Shadow, Verdict};
use crate::aio;
use crate::proc::now_ms;
use crate::util::{open_dev, res_name, AlignedBuf, Rng};

/// `IOCB_CMD_FSYNC` (aio.rs has the others).
const CMD_FSYNC: u16 = 2;
/// io_uring user_data bit of our cancel requests (the others carry a request id).
const CANCEL_BIT: u64 = 1 << 63;
/// Most requests in one batch; the ring and the context are sized for it.
pub const MAX_QD: usize = 32;
/// Failure details printed per worker before going quiet (the counts go on).
const MAX_REPORTS: u32 = 8;

/// What a worker works on.
#[derive(Debug, Clone)]
pub struct WorkerCfg {
    /// Slot in the shared counters (hang watch) and tag prefix.
    pub id: usize,
    /// For messages: `w3`, `leaver7`.
    pub name: String,
    /// Device path.
    pub dev: String,
    /// The region `[lo, hi)` this worker owns.
    pub lo: u64,
    /// End of the region.
    pub hi: u64,
    /// Seed of this worker's choices.
    pub seed: u64,
    /// Largest request.
    pub max_bs: usize,
    /// Longest wait for a completion or a blocking call.
    pub deadline: Duration,
    /// Stop once the shared request count reaches this.
    pub target: i64,
    /// Tags of this worker's writes start here (unique per worker and leaver).
    pub tag_base: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Sync,
    Libaio,
    Uring,
}

/// One request of a batch.
#[derive(Debug)]
struct Req {
    id: u64,
    op: Op,
    off: u64,
    len: usize,
    /// Buffer pieces (arena offset, bytes); more than one only when vectored.
    pieces: Vec<(usize, usize)>,
    /// The pieces as iovecs (kept alive here while the request is in flight).
    iov: Vec<libc::iovec>,
    vectored: bool,
    fixed: bool,
    dsync: bool,
    unaligned: bool,
    /// A write's data tag.
    tag: u64,
    submitted: bool,
    /// Completions seen.
    seen: u32,
    res: i64,
}

impl Req {
    fn describe(&self, engine: Engine) -> String {
        let mut s = format!(
            "id={} engine={engine:?} op={:?} off={} len={}",
            self.id, self.op, self.off, self.len
        );
        for (on, word) in [
            (self.vectored, " vectored"),
            (self.fixed, " fixed"),
            (self.dsync, " dsync"),
            (self.unaligned, " unaligned"),
        ] {
            if on {
                s += word;
            }
        }
        if self.vectored {
            s += &format!(" iovecs={}", self.pieces.len());
        }
        s.to_lowercase()
    }
}

/// A worker and everything it holds. Field order is drop order: the ring and the libaio
/// context go (waiting for anything in flight) before the file and the arena.
pub struct Worker<'a> {
    ring: IoUring,
    ctx: aio::Context,
    file: File,
    arena: AlignedBuf,
    /// Arena bytes handed out to the current batch.
    bump: usize,
    cfg: WorkerCfg,
    ctrs: &'a Counters,
    rng: Rng,
    shadow: Shadow,
    next_id: u64,
    next_tag: u64,
    reports: u32,
    /// A completion was lost: requests may still own arena memory, so this worker must stop
    /// and never free it.
    pub poisoned: bool,
}

impl std::fmt::Debug for Worker<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("cfg", &self.cfg)
            .field("next_id", &self.next_id)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl<'a> Worker<'a> {
    /// Open the device, set up a libaio context and a ring with the arena registered.
    pub fn new(cfg: WorkerCfg, ctrs: &'a Counters) -> Result<Self, String> {
        let file = open_dev(&cfg.dev, 0)?;
        let arena = AlignedBuf::new(2 * cfg.max_bs + (256 << 10))?;
        let ctx = aio::Context::new(4 * MAX_QD as u32)
            .map_err(|e| format!("{}: io_setup: {e}", cfg.name))?;
        let ring = IoUring::builder()
            .setup_cqsize(8 * MAX_QD as u32)
            .build(4 * MAX_QD as u32)
            .map_err(|e| format!("{}: io_uring_setup: {e}", cfg.name))?;
        let iov = [libc::iovec {
            iov_base: arena.ptr().cast(),
            iov_len: arena.len(),
        }];
        // SAFETY: the arena outlives the ring (declared after it in the struct, so dropped
        // after it), and the ring unregisters the buffer when it goes.
        unsafe { ring.submitter().register_buffers(&iov) }
            .map_err(|e| format!("{}: io_uring register_buffers: {e}", cfg.name))?;
        Ok(Self {
            ring,
            ctx,
            file,
            arena,
            bump: 0,
            rng: Rng(cfg.seed),
            shadow: Shadow::new(cfg.lo, cfg.hi),
            next_id: 1,
            next_tag: cfg.tag_base + 1,
            reports: 0,
            poisoned: false,
            cfg,
            ctrs,
        })
    }

    /// Whether to stop starting new work.
    pub fn should_stop(&self) -> bool {
        self.poisoned
            || self.ctrs.get(c::STOP) != 0
            || self.ctrs.get(c::REQUESTS) >= self.cfg.target
    }

    /// Write the whole region once (sync, 1 MiB at a time), so reads have data to check from
    /// the start. Failed writes leave their range unknown, as anywhere else.
    pub fn fill_region(&mut self) {
        let chunk = (1 << 20).min(self.cfg.max_bs) as u64;
        let mut off = self.cfg.lo;
        while off < self.cfg.hi && !self.should_stop() {
            let len = chunk.min(self.cfg.hi - off) as usize;
            self.bump = 0;
            let Some(at) = self.alloc(len, 4096, 0) else {
                return;
            };
            let mut r = self.new_req(Op::Write, off, len, vec![(at, len)]);
            r.submitted = true;
            self.prepare(&r);
            self.count_submit(&r, Engine::Sync);
            let fd = self.file.as_raw_fd();
            let res = self.blocking(|| {
                // SAFETY: the arena holds `len` bytes at `at`.
                sys_res(unsafe { libc::pwrite(fd, r_ptr(&self.arena, at), len, off as i64) })
            });
            self.settle(&r, res, Engine::Sync);
            off += len as u64;
        }
    }

    /// One step: a sync request, or a libaio or io_uring batch.
    pub fn step(&mut self) -> Result<(), String> {
        match self.rng.below(100) {
            0..=14 => self.sync_one(),
            15..=57 => self.libaio_batch(false),
            _ => self.uring_batch(false),
        }
    }

    /// Listen a little for completions nobody is waiting for (late duplicates), before the
    /// worker goes.
    pub fn settle_strays(&mut self) {
        std::thread::sleep(Duration::from_millis(100));
        let mut events = [aio::IoEvent::default(); 16];
        if let Ok(n) = self
            .ctx
            .get_events(0, &mut events, Some(Duration::from_millis(1)))
        {
            for ev in &events[..n] {
                self.stray(Engine::Libaio, ev.data, ev.res);
            }
        }
        let _ = self.ring.submit();
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|q| (q.user_data(), q.result()))
            .collect();
        for (ud, res) in cqes {
            if ud & CANCEL_BIT == 0 {
                self.stray(Engine::Uring, ud, i64::from(res));
            }
        }
    }

    // ---- planning ----

    fn new_req(&mut self, op: Op, off: u64, len: usize, pieces: Vec<(usize, usize)>) -> Req {
        let id = self.next_id;
        self.next_id += 1;
        let tag = if op == Op::Write {
            self.next_tag += 1;
            self.next_tag
        } else {
            shadow::UNKNOWN
        };
        let base = self.arena.ptr();
        let iov = pieces
            .iter()
            .map(|&(at, n)| libc::iovec {
                // SAFETY: `at + n` is within the arena (alloc checked it).
                iov_base: unsafe { base.add(at) }.cast(),
                iov_len: n,
            })
            .collect();
        Req {
            id,
            op,
            off,
            len,
            pieces,
            iov,
            vectored: false,
            fixed: false,
            dsync: false,
            unaligned: false,
            tag,
            submitted: false,
            seen: 0,
            res: 0,
        }
    }

    /// `len` arena bytes at an offset that is `align`-aligned plus `skew` (unaligned buffers).
    fn alloc(&mut self, len: usize, align: usize, skew: usize) -> Option<usize> {
        let at = self.bump.next_multiple_of(align) + skew;
        if at + len > self.arena.len() {
            return None;
        }
        self.bump = at + len;
        Some(at)
    }

    /// A request size: mostly small, now and then up to `max_bs`. The large ones are rare
    /// because bytes, not requests, are what a slow (emulated) guest pays for: at these weights
    /// a request averages about 40 KiB, and one in 500 is 2..4 MiB.
    fn size(&mut self, unaligned: bool) -> usize {
        let r = self.rng.below(1000);
        let (lo, hi) = match r {
            _ if unaligned && r < 30 => (1, 511),
            0..=749 => (512, 8 << 10),
            750..=929 => (8 << 10, 64 << 10),
            930..=989 => (64 << 10, 512 << 10),
            990..=997 => (512 << 10, 2 << 20),
            _ => (2 << 20, 4 << 20),
        };
        let hi = hi.min(self.cfg.max_bs);
        let lo = lo.min(hi);
        let len = lo + self.rng.below((hi - lo + 1) as u64) as usize;
        if unaligned {
            len.max(1)
        } else {
            (len / 512 * 512).max(512)
        }
    }

    /// Plan one request that overlaps none of `taken`; `None` when the arena is full or no
    /// free place was found.
    fn plan(&mut self, engine: Engine, taken: &[(u64, u64)]) -> Option<Req> {
        let op = match self.rng.below(100) {
            0..=49 => Op::Read,
            50..=95 => Op::Write,
            _ => Op::Flush,
        };
        if op == Op::Flush {
            let mut r = self.new_req(Op::Flush, 0, 0, Vec::new());
            // Flush flavour: dsync here means fdatasync (else fsync).
            r.dsync = self.rng.below(100) < 70;
            return Some(r);
        }
        let unaligned = self.rng.below(100) < 40;
        let len = self.size(unaligned);
        let room = self.cfg.hi - self.cfg.lo;
        if len as u64 > room {
            return None;
        }
        let mut off = None;
        for _ in 0..8 {
            let slack = room - len as u64;
            let o = if unaligned {
                self.cfg.lo + self.rng.below(slack + 1)
            } else {
                self.cfg.lo + self.rng.below(slack / 512 + 1) * 512
            };
            if taken.iter().all(|&(a, b)| o + len as u64 <= a || o >= b) {
                off = Some(o);
                break;
            }
        }
        let off = off?;
        let vectored = self.rng.below(100) < 25;
        let fixed = engine == Engine::Uring && !vectored && self.rng.below(100) < 35;
        // Vectored: 2..=8 pieces, now and then up to 64, cut at random points; each piece gets
        // its own place in the arena (their own alignment, their own pages).
        let mut cuts = vec![0, len];
        if vectored && len > 1 {
            let most = if self.rng.below(10) == 0 { 64 } else { 8 };
            let n = 1 + self.rng.below(most.min(len as u64 - 1)) as usize;
            for _ in 0..n {
                cuts.push(1 + self.rng.below(len as u64 - 1) as usize);
            }
            cuts.sort_unstable();
            cuts.dedup();
        }
        let mut pieces = Vec::with_capacity(cuts.len() - 1);
        for (k, w) in cuts.windows(2).enumerate() {
            let n = w[1] - w[0];
            let (align, skew) = match (unaligned, k) {
                (true, _) => (512, 1 + self.rng.below(511) as usize),
                (false, 0) => (4096, 0),
                (false, _) => (512, 0),
            };
            pieces.push((self.alloc(n, align, skew)?, n));
        }
        let mut r = self.new_req(op, off, len, pieces);
        r.vectored = vectored && r.pieces.len() > 1;
        r.fixed = fixed;
        r.unaligned = unaligned;
        r.dsync = op == Op::Write && self.rng.below(100) < 6;
        Some(r)
    }

    /// Up to `n` requests that fit the arena together.
    fn plan_batch(&mut self, engine: Engine, n: usize) -> Vec<Req> {
        self.bump = 0;
        let mut reqs: Vec<Req> = Vec::with_capacity(n);
        let mut taken: Vec<(u64, u64)> = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(r) = self.plan(engine, &taken) else {
                break;
            };
            if r.op != Op::Flush {
                taken.push((r.off, r.off + r.len as u64));
            }
            reqs.push(r);
        }
        reqs
    }

    /// A queue depth: shallow, medium or the most a batch takes (deep batches are what keeps
    /// the device busy: one doorbell and one interrupt serve many requests).
    fn qd(&mut self) -> usize {
        match self.rng.below(100) {
            0..=19 => 1 + self.rng.below(4) as usize,
            20..=64 => 5 + self.rng.below(12) as usize,
            _ => 17 + self.rng.below(16) as usize,
        }
        .min(MAX_QD)
    }

    /// Write data into a write's buffers, poison a read's (so bytes a read did not transfer
    /// cannot pass for right by accident).
    fn prepare(&mut self, r: &Req) {
        let mut pos = r.off;
        for &(at, n) in &r.pieces {
            let buf = &mut self.arena.bytes_mut()[at..at + n];
            match r.op {
                Op::Write => shadow::fill(r.tag, pos, buf),
                Op::Read => buf.fill(0xa5),
                Op::Flush => {}
            }
            pos += n as u64;
        }
    }

    fn count_submit(&self, r: &Req, engine: Engine) {
        let k = &self.ctrs;
        k.add(c::REQUESTS, 1);
        k.add(
            match r.op {
                Op::Read => c::READS,
                Op::Write => c::WRITES,
                Op::Flush => c::FLUSHES,
            },
            1,
        );
        k.add(
            match engine {
                Engine::Sync => c::SYNC,
                Engine::Libaio => c::LIBAIO,
                Engine::Uring => c::URING,
            },
            1,
        );
        for (on, ctr) in [
            (r.fixed, c::FIXED),
            (r.vectored, c::VECTORED),
            (r.unaligned, c::UNALIGNED),
            (r.dsync && r.op == Op::Write, c::DSYNC),
        ] {
            if on {
                k.add(ctr, 1);
            }
        }
    }

    // ---- results ----

    fn report(&mut self, what: &str, detail: &str) {
        if self.reports < MAX_REPORTS {
            self.reports += 1;
            println!("soak: {what} {}: {detail}", self.cfg.name);
        }
    }

    /// A completion that names no request we are waiting for: a duplicate (ours are numbered
    /// once for the worker's life, so an old id is a second completion).
    fn stray(&mut self, engine: Engine, id: u64, res: i64) {
        self.ctrs.add(c::DUPLICATED, 1);
        let kind = if id < self.next_id {
            "completed again"
        } else {
            "never submitted"
        };
        self.report(
            "DUPLICATE",
            &format!(
                "engine={engine:?} completion for request id={id} ({kind}), result {}",
                res_name(res)
            ),
        );
    }

    /// Record completion `(id, res)` for the batch `reqs`.
    fn complete(&mut self, reqs: &mut [Req], engine: Engine, id: u64, res: i64) {
        let first = reqs.first().map_or(0, |r| r.id);
        let hit = id
            .checked_sub(first)
            .and_then(|i| reqs.get_mut(i as usize))
            .filter(|r| r.submitted);
        let Some(r) = hit else {
            self.stray(engine, id, res);
            return;
        };
        r.seen += 1;
        if r.seen == 1 {
            r.res = res;
            return;
        }
        self.ctrs.add(c::DUPLICATED, 1);
        let d = format!(
            "{}: completion {} (result {}, first {})",
            r.describe(engine),
            r.seen,
            res_name(res),
            res_name(r.res)
        );
        self.report("DUPLICATE", &d);
    }

    fn error(&mut self, res: i64, r: &Req, engine: Engine) {
        self.ctrs.add(c::ERRORS, 1);
        let ctr = c::errno_ctr(i32::try_from(-res).unwrap_or(0));
        self.ctrs.add(ctr, 1);
        if ctr == c::ERRNO_OTHER {
            // Allowed, but say which: the per-second line only counts it as "other".
            let d = format!("{}: failed with {}", r.describe(engine), res_name(res));
            self.report("note: unusual errno", &d);
        }
    }

    /// Whatever a write did is unknown: its range is until rewritten.
    fn forget(&mut self, r: &Req) {
        if r.op == Op::Write {
            self.shadow.unknown(r.off, r.len as u64, r.tag);
            self.ctrs.add(c::UNKNOWN_WRITES, 1);
        }
    }

    /// Account a completed request and check a read's data.
    fn settle(&mut self, r: &Req, res: i64, engine: Engine) {
        if res < 0 {
            self.error(res, r, engine);
            self.forget(r);
            return;
        }
        match r.op {
            Op::Flush => self.ctrs.add(c::OK, 1),
            Op::Write if res == r.len as i64 => {
                self.ctrs.add(c::OK, 1);
                self.ctrs.add(c::BYTES, res);
                self.shadow.wrote(r.off, r.len as u64, r.tag);
            }
            Op::Write => {
                // The device never shortens a write; a short or long count is the driver's.
                if res > r.len as i64 {
                    self.ctrs.add(c::CORRUPT, 1);
                    let d = format!("{}: returned {res}, more than asked", r.describe(engine));
                    self.report("CORRUPTION", &d);
                } else {
                    self.ctrs.add(c::SHORT, 1);
                }
                self.forget(r);
            }
            Op::Read => {
                let mut got = res as usize;
                if got > r.len {
                    self.ctrs.add(c::CORRUPT, 1);
                    let d = format!("{}: returned {res}, more than asked", r.describe(engine));
                    self.report("CORRUPTION", &d);
                    got = r.len;
                } else if got < r.len {
                    self.ctrs.add(c::SHORT, 1);
                } else {
                    self.ctrs.add(c::OK, 1);
                }
                self.ctrs.add(c::BYTES, got as i64);
                self.verify(r, got, engine);
            }
        }
    }

    /// Compare the first `got` bytes a read returned with the shadow.
    fn verify(&mut self, r: &Req, got: usize, engine: Engine) {
        let mut pos = r.off;
        let mut left = got;
        let mut verdict = Verdict::Good { checked: 0 };
        let mut checked = 0;
        for &(at, n) in &r.pieces {
            if left == 0 {
                break;
            }
            let n = n.min(left);
            match self.shadow.check(pos, &self.arena.bytes()[at..at + n]) {
                Verdict::Good { checked: k } => checked += k,
                bad => {
                    verdict = bad;
                    break;
                }
            }
            pos += n as u64;
            left -= n;
        }
        self.ctrs.add(c::VERIFIED, checked as i64);
        let (what, m, ctr) = match verdict {
            Verdict::Good { .. } => return,
            Verdict::Stale(m) => ("STALE READ", m, c::STALE),
            Verdict::Corrupt(m) => ("UNDETECTED CORRUPTION", m, c::CORRUPT),
        };
        self.ctrs.add(ctr, 1);
        let d =
            format!(
            "{}: returned {got}; byte at device offset {} (+{}) is {:#04x}, the last acknowledged \
             write (tag {:#x}) put {:#04x} there{}",
            r.describe(engine),
            m.pos,
            m.pos - r.off,
            m.got,
            m.tag,
            m.want,
            if m.matched_old != shadow::UNKNOWN {
                format!("; the read matches the earlier write tag {:#x}", m.matched_old)
            } else {
                String::new()
            }
        );
        self.report(what, &d);
        // Count one incident once: the range is unknown until rewritten.
        self.shadow.unknown(r.off, got as u64, shadow::UNKNOWN);
    }

    /// Run a blocking call with the hang watch on: the parent counts a hang if it is still
    /// running after the deadline.
    fn blocking<T>(&self, f: impl FnOnce() -> T) -> T {
        self.ctrs.set(c::hang_counted(self.cfg.id), 0);
        self.ctrs.set(c::busy_since(self.cfg.id), now_ms().max(1));
        let out = f();
        self.ctrs.set(c::busy_since(self.cfg.id), 0);
        out
    }

    fn lost(&mut self, reqs: &[Req], engine: Engine, extra: &str) {
        let lost: Vec<&Req> = reqs.iter().filter(|r| r.submitted && r.seen == 0).collect();
        if lost.is_empty() {
            return;
        }
        self.ctrs.add(c::LOST, lost.len() as i64);
        self.poisoned = true;
        let list: Vec<String> = lost.iter().take(4).map(|r| r.describe(engine)).collect();
        let d = format!(
            "{} of {} requests got no completion within {} s{extra}: {}",
            lost.len(),
            reqs.len(),
            self.cfg.deadline.as_secs(),
            list.join("; ")
        );
        self.report("LOST", &d);
    }

    // ---- engines ----

    fn sync_one(&mut self) -> Result<(), String> {
        self.bump = 0;
        let Some(mut r) = self.plan(Engine::Sync, &[]) else {
            return Ok(());
        };
        self.prepare(&r);
        r.submitted = true;
        self.count_submit(&r, Engine::Sync);
        let fd = self.file.as_raw_fd();
        let iov = r.iov.as_ptr();
        let cnt = r.iov.len() as i32;
        let off = r.off as i64;
        let flags = if r.dsync { libc::RWF_DSYNC } else { 0 };
        let (op, dsync, vectored) = (r.op, r.dsync, r.vectored || r.dsync);
        let res = self.blocking(|| {
            // SAFETY: the iovecs describe arena memory that outlives the call; fd is ours.
            let rc = unsafe {
                match (op, vectored) {
                    (Op::Flush, _) if dsync => libc::fdatasync(fd) as isize,
                    (Op::Flush, _) => libc::fsync(fd) as isize,
                    (Op::Read, false) => libc::pread(fd, (*iov).iov_base, (*iov).iov_len, off),
                    (Op::Write, false) => libc::pwrite(fd, (*iov).iov_base, (*iov).iov_len, off),
                    (Op::Read, true) => libc::preadv(fd, iov, cnt, off),
                    (Op::Write, true) => libc::pwritev2(fd, iov, cnt, off, flags),
                }
            };
            sys_res(rc)
        });
        r.seen = 1;
        self.settle(&r, res, Engine::Sync);
        Ok(())
    }

    /// Open a second file for one batch, closed with the batch in flight (O_DSYNC now and then:
    /// every write on it then ends with a FLUSH).
    fn side_file(&mut self) -> Result<File, String> {
        let flags = if self.rng.below(3) == 0 {
            libc::O_DSYNC
        } else {
            0
        };
        open_dev(&self.cfg.dev, flags)
    }

    /// A libaio batch. `leave`: submit and return at once, never reaping (the caller is about
    /// to exit; the requests and their memory are left to the kernel).
    pub fn libaio_batch(&mut self, leave: bool) -> Result<(), String> {
        let n = self.qd();
        let mut reqs = self.plan_batch(Engine::Libaio, n);
        if reqs.is_empty() {
            return Ok(());
        }
        let episode = self.rng.below(100);
        let close_fd = !leave && episode < 4;
        let destroy = !leave && (4..7).contains(&episode);
        let side = if close_fd {
            Some(self.side_file()?)
        } else {
            None
        };
        let fd = side
            .as_ref()
            .map_or(self.file.as_raw_fd(), |f| f.as_raw_fd());
        let fresh_ctx = if destroy {
            Some(aio::Context::new(2 * MAX_QD as u32).map_err(|e| format!("io_setup: {e}"))?)
        } else {
            None
        };
        for r in &reqs {
            self.prepare(r);
        }
        let mut iocbs: Vec<aio::Iocb> = reqs
            .iter()
            .map(|r| {
                let (opcode, buf, nbytes) = match (r.op, r.vectored) {
                    (Op::Flush, _) => (if r.dsync { aio::CMD_FDSYNC } else { CMD_FSYNC }, 0, 0),
                    (Op::Read, true) => {
                        (aio::CMD_PREADV, r.iov.as_ptr() as u64, r.iov.len() as u64)
                    }
                    (Op::Write, true) => {
                        (aio::CMD_PWRITEV, r.iov.as_ptr() as u64, r.iov.len() as u64)
                    }
                    (Op::Read, false) => (aio::CMD_PREAD, r.iov[0].iov_base as u64, r.len as u64),
                    (Op::Write, false) => (aio::CMD_PWRITE, r.iov[0].iov_base as u64, r.len as u64),
                };
                let mut cb = aio::Context::iocb(fd, opcode, buf, nbytes, r.off as i64, r.id);
                if r.dsync && r.op == Op::Write {
                    cb.rw_flags = libc::RWF_DSYNC as u32;
                }
                cb
            })
            .collect();
        let mut ptrs: Vec<*mut aio::Iocb> = iocbs.iter_mut().map(|c| c as *mut aio::Iocb).collect();
        let ctx = fresh_ctx.as_ref().unwrap_or(&self.ctx);
        let mut done = 0;
        while done < ptrs.len() {
            // SAFETY: the iocbs, iovecs and arena stay alive and untouched until every event is
            // reaped, the context is destroyed (io_destroy waits), or the process exits.
            match unsafe { ctx.submit(&mut ptrs[done..]) } {
                Ok(0) | Err(_) => break,
                Ok(k) => done += k,
            }
        }
        for r in reqs.iter_mut().take(done) {
            r.submitted = true;
        }
        for r in &reqs {
            if r.submitted {
                self.count_submit(r, Engine::Libaio);
            }
        }
        if leave {
            for r in reqs.iter().skip(done) {
                self.forget(r);
            }
            std::mem::forget(iocbs);
            std::mem::forget(reqs);
            return Ok(());
        }
        if self.rng.below(100) < 12 {
            for p in ptrs.iter().take(done) {
                if self.rng.below(100) >= 40 {
                    continue;
                }
                self.ctrs.add(c::CANCEL_TRIED, 1);
                // SAFETY: `p` was submitted on `ctx` and its iocb is alive.
                let rc = unsafe { ctx.cancel(*p) };
                let taken = match rc {
                    Ok(()) => true,
                    Err(e) => e.raw_os_error() == Some(libc::EINPROGRESS),
                };
                if taken {
                    self.ctrs.add(c::CANCEL_TAKEN, 1);
                }
            }
        }
        for r in reqs.iter().skip(done) {
            // Never reached the kernel: nothing changed, but be conservative.
            self.forget(r);
        }
        if let Some(f) = side {
            self.ctrs.add(c::CLOSES, 1);
            self.blocking(|| drop(f));
        }
        if let Some(fresh) = fresh_ctx {
            // io_destroy cancels what it can and waits for the rest; the events are gone with
            // the context, so every write's outcome is unknown.
            self.ctrs.add(c::DESTROYS, 1);
            self.blocking(|| drop(fresh));
            for r in reqs.iter().filter(|r| r.submitted) {
                self.forget(r);
            }
            return Ok(());
        }
        let deadline = Instant::now() + self.cfg.deadline;
        let mut events = [aio::IoEvent::default(); 2 * MAX_QD];
        while reqs.iter().any(|r| r.submitted && r.seen == 0) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            let got = match self.ctx.get_events(1, &mut events, Some(left)) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => 0,
                Err(e) => return Err(format!("{}: io_getevents: {e}", self.cfg.name)),
            };
            for ev in &events[..got] {
                self.complete(&mut reqs, Engine::Libaio, ev.data, ev.res);
            }
        }
        self.lost(&reqs, Engine::Libaio, "");
        if self.poisoned {
            // The kernel may still write into the arena: never free it.
            std::mem::forget(iocbs);
            std::mem::forget(reqs);
            return Ok(());
        }
        for r in reqs.iter().filter(|r| r.submitted) {
            self.settle(r, r.res, Engine::Libaio);
        }
        Ok(())
    }

    /// An io_uring batch (`leave`: as for [`Self::libaio_batch`]).
    pub fn uring_batch(&mut self, leave: bool) -> Result<(), String> {
        let n = self.qd();
        let mut reqs = self.plan_batch(Engine::Uring, n);
        if reqs.is_empty() {
            return Ok(());
        }
        let close_fd = !leave && self.rng.below(100) < 4;
        let side = if close_fd {
            Some(self.side_file()?)
        } else {
            None
        };
        let fd = side
            .as_ref()
            .map_or(self.file.as_raw_fd(), |f| f.as_raw_fd());
        for r in &reqs {
            self.prepare(r);
        }
        for r in reqs.iter_mut() {
            let e = uring_entry(r, fd).user_data(r.id);
            // SAFETY: buffers, iovecs and the registered arena live until every CQE is reaped
            // (or, when leaving, until the process exits).
            if unsafe { self.ring.submission().push(&e) }.is_err() {
                break;
            }
            r.submitted = true;
        }
        self.submit_all()?;
        for r in &reqs {
            if r.submitted {
                self.count_submit(r, Engine::Uring);
            } else {
                self.forget(r);
            }
        }
        if leave {
            std::mem::forget(reqs);
            return Ok(());
        }
        let mut cancels = 0usize;
        if self.rng.below(100) < 12 {
            for r in reqs.iter().filter(|r| r.submitted) {
                if self.rng.below(100) >= 40 {
                    continue;
                }
                let e = opcode::AsyncCancel::new(r.id)
                    .build()
                    .user_data(CANCEL_BIT | r.id);
                // SAFETY: a cancel carries no buffer.
                if unsafe { self.ring.submission().push(&e) }.is_ok() {
                    cancels += 1;
                }
            }
            self.ctrs.add(c::CANCEL_TRIED, cancels as i64);
            self.submit_all()?;
        }
        if let Some(f) = side {
            self.ctrs.add(c::CLOSES, 1);
            self.blocking(|| drop(f));
        }
        let deadline = Instant::now() + self.cfg.deadline;
        loop {
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|q| (q.user_data(), q.result()))
                .collect();
            for (ud, res) in cqes {
                if ud & CANCEL_BIT != 0 {
                    cancels = cancels.saturating_sub(1);
                    if res == 0 {
                        self.ctrs.add(c::CANCEL_TAKEN, 1);
                    }
                } else {
                    self.complete(&mut reqs, Engine::Uring, ud, i64::from(res));
                }
            }
            if cancels == 0 && !reqs.iter().any(|r| r.submitted && r.seen == 0) {
                break;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            let ts = types::Timespec::from(left);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => return Err(format!("{}: io_uring_enter: {e}", self.cfg.name)),
            }
        }
        let extra = if cancels > 0 {
            format!(" ({cancels} cancel requests unanswered too)")
        } else {
            String::new()
        };
        self.lost(&reqs, Engine::Uring, &extra);
        if self.poisoned {
            std::mem::forget(reqs);
            return Ok(());
        }
        for r in reqs.iter().filter(|r| r.submitted) {
            self.settle(r, r.res, Engine::Uring);
        }
        Ok(())
    }

    /// Hand every queued SQE to the kernel (retrying while it is busy).
    fn submit_all(&mut self) -> Result<(), String> {
        for _ in 0..1000 {
            if self.ring.submission().is_empty() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(format!("{}: io_uring_enter: {e}", self.cfg.name)),
            }
        }
        Err(format!(
            "{}: io_uring_enter did not take the batch",
            self.cfg.name
        ))
    }

    /// The device file, for a leaver that closes it before exiting.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// A libc call's return as the kernel's result: bytes, or a negative errno (not -1).
fn sys_res(rc: isize) -> i64 {
    if rc < 0 {
        -i64::from(crate::proc::errno())
    } else {
        rc as i64
    }
}

fn r_ptr(arena: &AlignedBuf, at: usize) -> *const libc::c_void {
    // SAFETY: callers pass an offset inside the arena.
    unsafe { arena.ptr().add(at) }.cast()
}

/// The SQE of `r` on `fd`.
fn uring_entry(r: &Req, fd: RawFd) -> io_uring::squeue::Entry {
    let f = types::Fd(fd);
    let off = r.off;
    let flags = if r.dsync && r.op == Op::Write {
        libc::RWF_DSYNC
    } else {
        0
    };
    let base = r
        .iov
        .first()
        .map_or(std::ptr::null_mut(), |v| v.iov_base.cast::<u8>());
    match (r.op, r.vectored, r.fixed) {
        (Op::Flush, _, _) => opcode::Fsync::new(f)
            .flags(if r.dsync {
                types::FsyncFlags::DATASYNC
            } else {
                types::FsyncFlags::empty()
            })
            .build(),
        (Op::Read, true, _) => opcode::Readv::new(f, r.iov.as_ptr(), r.iov.len() as u32)
            .offset(off)
            .build(),
        (Op::Write, true, _) => opcode::Writev::new(f, r.iov.as_ptr(), r.iov.len() as u32)
            .offset(off)
            .rw_flags(flags)
            .build(),
        (Op::Read, false, true) => opcode::ReadFixed::new(f, base, r.len as u32, 0)
            .offset(off)
            .build(),
        (Op::Write, false, true) => opcode::WriteFixed::new(f, base, r.len as u32, 0)
            .offset(off)
            .rw_flags(flags)
            .build(),
        (Op::Read, false, false) => opcode::Read::new(f, base, r.len as u32).offset(off).build(),
        (Op::Write, false, false) => opcode::Write::new(f, base, r.len as u32)
            .offset(off)
            .rw_flags(flags)
            .build(),
    }
}
