//! `aiodma-aio churn`: unbind/bind and `rmmod`/`insmod` of the driver, over and over, while
//! worker processes keep I/O going: one by libaio, one by io_uring (each with a queue of reads
//! and writes in flight), and sync readers/writers.
//!
//! While the device is gone the workers see `ENODEV` (or `EIO`, `ENXIO`, `ETIMEDOUT`,
//! `ECANCELED`: all tolerated and counted), drain what they had in flight, close the file and
//! open `/dev/aiodma0` again once it is back. What must hold:
//! - every submitted request completes exactly once (a lost one leaves a worker waiting past
//!   `--stall`; a duplicate or stray completion is counted);
//! - nothing hangs: not unbind, bind, `rmmod`, `insmod`, nor any worker's call;
//! - data stays right: the area is filled with a seeded pattern first and the writes write the
//!   same pattern back, so every successful read must see it;
//! - the device works afterwards.
//!
//! An iteration is, by `--mode`: `unbind` (unbind, bind), `rmmod` (unbind, `rmmod`, `insmod`),
//! or `both` (unbind, bind, then unbind, `rmmod`, `insmod`), each step only once every worker
//! has I/O going on the current device and after `--hold` more. `rmmod` is retried while the
//! module is still in use (workers close their files as soon as they notice the unbind).
//! The parent forks the workers and only then runs the loop, holding no file of the device.

use std::os::fd::RawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::aio;
use crate::proc::{self, fork, now_ms, run_bounded, status_name, Child, Shared};
use crate::util::{errno_name, AlignedBuf, Rng};

/// Which steps an iteration takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// unbind, bind.
    Unbind,
    /// unbind, rmmod, insmod.
    Rmmod,
    /// Both of the above.
    Both,
}

impl Mode {
    /// Parse `unbind|rmmod|both`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "unbind" => Ok(Mode::Unbind),
            "rmmod" => Ok(Mode::Rmmod),
            "both" => Ok(Mode::Both),
            other => Err(format!("unknown mode '{other}' (unbind|rmmod|both)")),
        }
    }
}

/// What `churn` was asked to do.
#[derive(Debug, Clone)]
pub struct ChurnOpts {
    /// Device path.
    pub dev: String,
    /// Iterations.
    pub iterations: usize,
    /// Steps per iteration.
    pub mode: Mode,
    /// The PCI function.
    pub bdf: String,
    /// The driver's sysfs directory.
    pub driver_dir: String,
    /// The module file for insmod.
    pub module: String,
    /// Module parameters for insmod (None: the `aiodma.*` words of /proc/cmdline).
    pub params: Option<Vec<String>>,
    /// Sync worker processes.
    pub sync_workers: usize,
    /// Requests in flight per async worker.
    pub qd: usize,
    /// Bytes per request.
    pub bs: usize,
    /// Device area.
    pub base: u64,
    /// Its size.
    pub span: u64,
    /// I/O time on the current device before each unbind.
    pub hold: Duration,
    /// The longest any step or call may take.
    pub stall: Duration,
    /// Pattern seed.
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Libaio,
    Uring,
    Sync,
}

// Per-worker counters (index `w * FIELDS + field`).
const FIELDS: usize = 16;
const SUBMITTED: usize = 0;
const OK: usize = 1;
const TOLERATED: usize = 2;
const UNEXPECTED: usize = 3;
const DUPLICATES: usize = 4;
const LOST: usize = 5;
const OPENS: usize = 6;
const ON_FD: usize = 7;
const BUSY_SINCE: usize = 8;
const LAST_UNEXPECTED: usize = 9;
const BAD_DATA: usize = 10;
const SHORT: usize = 11;
const REFUSED: usize = 12;
const REPORTS: usize = 13;

/// Errors a request may end with while the device goes away or comes back.
const TOLERATED_ERRS: [i32; 5] = [
    libc::ENODEV,
    libc::EIO,
    libc::ENXIO,
    libc::ETIMEDOUT,
    libc::ECANCELED,
];

fn gone_errno(e: i32) -> bool {
    e == libc::ENODEV || e == libc::ENXIO
}

struct Worker<'a> {
    o: &'a ChurnOpts,
    w: usize,
    kind: Kind,
    sh: &'a Shared,
    stop: usize,
}

/// A request's outcome as the worker classifies it.
enum Outcome {
    Ok,
    Tolerated { gone: bool },
    Bad,
}

impl Worker<'_> {
    fn f(&self, field: usize) -> usize {
        self.w * FIELDS + field
    }

    fn stopping(&self) -> bool {
        self.sh.get(self.stop) != 0
    }

    fn report(&self, what: String) {
        if self.sh.get(self.f(REPORTS)) < 3 {
            self.sh.add(self.f(REPORTS), 1);
            println!("churn worker {} ({:?}): {what}", self.w, self.kind);
        }
    }

    fn open(&self) -> Option<RawFd> {
        let path = std::ffi::CString::new(self.o.dev.as_str()).ok()?;
        // SAFETY: a NUL-terminated path.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        self.sh.add(self.f(OPENS), 1);
        self.sh.set(self.f(ON_FD), 0);
        Some(fd)
    }

    fn close(fd: RawFd) {
        // SAFETY: closing a descriptor this worker opened and no longer uses.
        unsafe { libc::close(fd) };
    }

    /// Classify a result (bytes or -errno) of a request at `off`; reads are checked against
    /// the pattern in `buf`.
    fn outcome(&self, res: i64, write: bool, buf: &AlignedBuf, off: u64) -> Outcome {
        if res == self.o.bs as i64 {
            self.sh.add(self.f(OK), 1);
            if !write && buf.pattern_mismatch(self.o.bs, self.o.seed, off).is_some() {
                self.sh.add(self.f(BAD_DATA), 1);
                self.report(format!(
                    "read at {off} returned data that differs from the pattern"
                ));
                return Outcome::Bad;
            }
            return Outcome::Ok;
        }
        if res >= 0 {
            self.sh.add(self.f(SHORT), 1);
            self.report(format!("request at {off} returned {res} of {}", self.o.bs));
            return Outcome::Bad;
        }
        let e = (-res) as i32;
        if TOLERATED_ERRS.contains(&e) {
            self.sh.add(self.f(TOLERATED), 1);
            return Outcome::Tolerated {
                gone: gone_errno(e),
            };
        }
        self.sh.add(self.f(UNEXPECTED), 1);
        self.sh.set(self.f(LAST_UNEXPECTED), i64::from(e));
        self.report(format!("request at {off} failed with {}", errno_name(e)));
        Outcome::Bad
    }

    fn pick(&self, rng: &mut Rng) -> (bool, u64) {
        let blocks = self.o.span / self.o.bs as u64;
        let write = rng.below(4) == 0;
        (write, self.o.base + rng.below(blocks) * self.o.bs as u64)
    }

    fn run(&self) -> i32 {
        let r = match self.kind {
            Kind::Libaio => self.run_libaio(),
            Kind::Uring => self.run_uring(),
            Kind::Sync => self.run_sync(),
        };
        match r {
            Ok(()) => 0,
            Err(e) => {
                self.report(e);
                1
            }
        }
    }

    /// Wait until the device file can be opened (or we are told to stop). After the first
    /// open, back off a little first: while an unbind is under way the old node can still be
    /// opened, and a worker spinning on open/ENODEV/close only slows the unbind down.
    fn reopen(&self) -> Option<RawFd> {
        if self.sh.get(self.f(OPENS)) > 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        loop {
            if self.stopping() {
                return None;
            }
            if let Some(fd) = self.open() {
                return Some(fd);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn run_sync(&self) -> Result<(), String> {
        let mut buf = AlignedBuf::new(self.o.bs)?;
        let mut rng = Rng(self.o.seed ^ self.w as u64);
        while let Some(fd) = self.reopen() {
            while !self.stopping() {
                let (write, off) = self.pick(&mut rng);
                if write {
                    buf.fill_pattern(self.o.seed, off);
                }
                self.sh.add(self.f(SUBMITTED), 1);
                self.sh.add(self.f(ON_FD), 1);
                self.sh.set(self.f(BUSY_SINCE), now_ms());
                let r = if write {
                    // SAFETY: `buf` holds `bs` readable bytes.
                    unsafe { libc::pwrite(fd, buf.ptr().cast(), self.o.bs, off as i64) }
                } else {
                    // SAFETY: `buf` holds `bs` writable bytes.
                    unsafe { libc::pread(fd, buf.ptr().cast(), self.o.bs, off as i64) }
                };
                let res = if r < 0 {
                    -i64::from(proc::errno())
                } else {
                    r as i64
                };
                self.sh.set(self.f(BUSY_SINCE), 0);
                if let Outcome::Tolerated { gone: true } = self.outcome(res, write, &buf, off) {
                    break;
                }
            }
            Self::close(fd);
        }
        Ok(())
    }

    fn run_libaio(&self) -> Result<(), String> {
        let qd = self.o.qd;
        let mut bufs = Vec::with_capacity(qd);
        for _ in 0..qd {
            bufs.push(AlignedBuf::new(self.o.bs)?);
        }
        let mut iocbs = vec![aio::Iocb::default(); qd];
        let mut busy: Vec<Option<(u64, bool, i64)>> = vec![None; qd];
        let mut gen = vec![0u32; qd];
        let mut events = vec![aio::IoEvent::default(); qd];
        let mut rng = Rng(self.o.seed ^ self.w as u64);
        let ctx = aio::Context::new((2 * qd) as u32).map_err(|e| format!("io_setup: {e}"))?;
        while let Some(fd) = self.reopen() {
            let mut dead = false;
            loop {
                if !dead && !self.stopping() {
                    for slot in 0..qd {
                        if busy[slot].is_some() || dead {
                            continue;
                        }
                        let (write, off) = self.pick(&mut rng);
                        if write {
                            bufs[slot].fill_pattern(self.o.seed, off);
                        }
                        gen[slot] = gen[slot].wrapping_add(1);
                        let op = if write {
                            aio::CMD_PWRITE
                        } else {
                            aio::CMD_PREAD
                        };
                        iocbs[slot] = aio::Context::iocb(
                            fd,
                            op,
                            bufs[slot].ptr() as u64,
                            self.o.bs as u64,
                            off as i64,
                            u64::from(gen[slot]) << 32 | slot as u64,
                        );
                        let mut p = [&mut iocbs[slot] as *mut aio::Iocb];
                        // SAFETY: the iocb and its buffer stay untouched until its event is
                        // reaped; the context is forgotten (never destroyed) if one is lost.
                        match unsafe { ctx.submit(&mut p) } {
                            Ok(1) => {
                                busy[slot] = Some((off, write, now_ms()));
                                self.sh.add(self.f(SUBMITTED), 1);
                                self.sh.add(self.f(ON_FD), 1);
                            }
                            Ok(_) => {}
                            Err(e) => {
                                let e = e.raw_os_error().unwrap_or(libc::EIO);
                                if TOLERATED_ERRS.contains(&e) || e == libc::EAGAIN {
                                    self.sh.add(self.f(REFUSED), 1);
                                    dead |= gone_errno(e);
                                } else {
                                    self.sh.add(self.f(UNEXPECTED), 1);
                                    self.sh.set(self.f(LAST_UNEXPECTED), i64::from(e));
                                    self.report(format!("io_submit: {}", errno_name(e)));
                                }
                                break;
                            }
                        }
                    }
                }
                let oldest = busy.iter().flatten().map(|b| b.2).min();
                self.sh.set(self.f(BUSY_SINCE), oldest.unwrap_or(0));
                let Some(oldest) = oldest else {
                    if dead || self.stopping() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                if now_ms() - oldest > self.o.stall.as_millis() as i64 {
                    let lost = busy.iter().flatten().count();
                    self.sh.add(self.f(LOST), lost as i64);
                    std::mem::forget(ctx);
                    return Err(format!(
                        "{lost} request(s) without a completion for {} ms (LOST)",
                        self.o.stall.as_millis()
                    ));
                }
                let got = ctx
                    .get_events(1, &mut events, Some(Duration::from_millis(100)))
                    .unwrap_or(0);
                for ev in &events[..got] {
                    let slot = (ev.data & 0xffff_ffff) as usize;
                    let Some((off, write, _)) = busy
                        .get(slot)
                        .copied()
                        .flatten()
                        .filter(|_| (ev.data >> 32) as u32 == gen[slot])
                    else {
                        self.sh.add(self.f(DUPLICATES), 1);
                        self.report(format!("stray or duplicate event {:#x}", ev.data));
                        continue;
                    };
                    busy[slot] = None;
                    if let Outcome::Tolerated { gone: true } =
                        self.outcome(ev.res, write, &bufs[slot], off)
                    {
                        dead = true;
                    }
                }
            }
            Self::close(fd);
        }
        Ok(())
    }

    fn run_uring(&self) -> Result<(), String> {
        use io_uring::{opcode, types, IoUring};
        let qd = self.o.qd;
        let mut bufs = Vec::with_capacity(qd);
        for _ in 0..qd {
            bufs.push(AlignedBuf::new(self.o.bs)?);
        }
        let mut busy: Vec<Option<(u64, bool, i64)>> = vec![None; qd];
        let mut gen = vec![0u32; qd];
        let mut rng = Rng(self.o.seed ^ self.w as u64);
        let mut ring = IoUring::new((2 * qd).next_power_of_two() as u32)
            .map_err(|e| format!("io_uring_setup: {e}"))?;
        let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(4 * qd);
        while let Some(fd) = self.reopen() {
            let mut dead = false;
            loop {
                if !dead && !self.stopping() {
                    for slot in 0..qd {
                        if busy[slot].is_some() {
                            continue;
                        }
                        let (write, off) = self.pick(&mut rng);
                        gen[slot] = gen[slot].wrapping_add(1);
                        let ud = u64::from(gen[slot]) << 32 | slot as u64;
                        let b = &mut bufs[slot];
                        let sqe = if write {
                            b.fill_pattern(self.o.seed, off);
                            opcode::Write::new(types::Fd(fd), b.ptr(), self.o.bs as u32)
                                .offset(off)
                                .build()
                        } else {
                            opcode::Read::new(types::Fd(fd), b.ptr(), self.o.bs as u32)
                                .offset(off)
                                .build()
                        };
                        // SAFETY: the buffer stays untouched until the slot's CQE; the ring is
                        // forgotten (never dropped) if one is lost.
                        if unsafe { ring.submission().push(&sqe.user_data(ud)) }.is_err() {
                            break;
                        }
                        busy[slot] = Some((off, write, now_ms()));
                        self.sh.add(self.f(SUBMITTED), 1);
                        self.sh.add(self.f(ON_FD), 1);
                    }
                }
                let oldest = busy.iter().flatten().map(|b| b.2).min();
                self.sh.set(self.f(BUSY_SINCE), oldest.unwrap_or(0));
                let Some(oldest) = oldest else {
                    if dead || self.stopping() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                if now_ms() - oldest > self.o.stall.as_millis() as i64 {
                    let lost = busy.iter().flatten().count();
                    self.sh.add(self.f(LOST), lost as i64);
                    std::mem::forget(ring);
                    return Err(format!(
                        "{lost} request(s) without a completion for {} ms (LOST)",
                        self.o.stall.as_millis()
                    ));
                }
                let ts = types::Timespec::new().nsec(100_000_000);
                let args = types::SubmitArgs::new().timespec(&ts);
                if let Err(e) = ring.submitter().submit_with_args(1, &args) {
                    match e.raw_os_error() {
                        Some(libc::ETIME) | Some(libc::EINTR) => {}
                        Some(libc::EAGAIN) | Some(libc::EBUSY) => {
                            self.sh.add(self.f(REFUSED), 1);
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        x => {
                            self.sh.add(self.f(UNEXPECTED), 1);
                            self.report(format!("io_uring_enter: {e} ({x:?})"));
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                cqes.clear();
                cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
                for &(ud, res) in &cqes {
                    let slot = (ud & 0xffff_ffff) as usize;
                    let Some((off, write, _)) = busy
                        .get(slot)
                        .copied()
                        .flatten()
                        .filter(|_| (ud >> 32) as u32 == gen[slot])
                    else {
                        self.sh.add(self.f(DUPLICATES), 1);
                        self.report(format!("stray or duplicate completion {ud:#x}"));
                        continue;
                    };
                    busy[slot] = None;
                    if let Outcome::Tolerated { gone: true } =
                        self.outcome(i64::from(res), write, &bufs[slot], off)
                    {
                        dead = true;
                    }
                }
            }
            Self::close(fd);
        }
        Ok(())
    }
}

/// Parameters for insmod: the `aiodma.NAME=VALUE` words of the kernel command line, as /init
/// passes them.
fn cmdline_params() -> Vec<String> {
    std::fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("aiodma."))
        .filter(|w| w.contains('='))
        .map(str::to_string)
        .collect()
}

/// Step timings.
#[derive(Debug, Default)]
struct Times {
    count: u32,
    total_ms: u128,
    max_ms: u128,
}

impl Times {
    fn add(&mut self, d: Duration) {
        self.count += 1;
        self.total_ms += d.as_millis();
        self.max_ms = self.max_ms.max(d.as_millis());
    }

    fn show(&self, name: &str) -> String {
        if self.count == 0 {
            return format!("{name} -");
        }
        format!(
            "{name} {}x avg {} ms max {} ms",
            self.count,
            self.total_ms / u128::from(self.count),
            self.max_ms
        )
    }
}

/// Write `value` to a sysfs file from a child process, bounded by `limit`.
fn sysfs_write(path: &str, value: &str, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut child = fork(|| match std::fs::write(path, value) {
        Ok(()) => 0,
        Err(e) => {
            println!("churn: writing {value} to {path}: {e}");
            1
        }
    })?;
    match child.wait_for(limit) {
        Some(0) => Ok(started.elapsed()),
        Some(st) => Err(format!("writing {value} to {path}: {}", status_name(st))),
        None => Err(format!(
            "writing {value} to {path} did not return within {} ms (HANG)",
            limit.as_millis()
        )),
    }
}

struct Loop<'a> {
    o: &'a ChurnOpts,
    sh: &'a Shared,
    workers: &'a mut [Child],
    params: Vec<String>,
    unbind: Times,
    bind: Times,
    rmmod: Times,
    insmod: Times,
    rmmod_retries: u32,
}

impl Loop<'_> {
    /// Wait until every worker has opened the current device and submitted on it, then hold.
    fn io_going(&mut self, opens_before: &[i64]) -> Result<(), String> {
        let deadline = Instant::now() + self.o.stall;
        loop {
            let waiting: Vec<usize> = (0..self.workers.len())
                .filter(|&w| {
                    self.sh.get(w * FIELDS + OPENS) <= opens_before[w]
                        || self.sh.get(w * FIELDS + ON_FD) == 0
                })
                .collect();
            if waiting.is_empty() {
                break;
            }
            self.check_workers()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "worker(s) {waiting:?} did not get I/O going on the device within {} ms",
                    self.o.stall.as_millis()
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(self.o.hold);
        self.check_workers()
    }

    /// A worker that died or is stuck in one call is a failure.
    fn check_workers(&mut self) -> Result<(), String> {
        let now = now_ms();
        for (w, c) in self.workers.iter_mut().enumerate() {
            if let Some(st) = c.try_wait() {
                return Err(format!("worker {w} ended early with {}", status_name(st)));
            }
            let since = self.sh.get(w * FIELDS + BUSY_SINCE);
            if since != 0 && now - since > self.o.stall.as_millis() as i64 {
                return Err(format!(
                    "worker {w} has waited {} ms for a request (HANG)",
                    now - since
                ));
            }
        }
        Ok(())
    }

    fn opens(&self) -> Vec<i64> {
        (0..self.workers.len())
            .map(|w| self.sh.get(w * FIELDS + OPENS))
            .collect()
    }

    fn wait_dev(&self, present: bool) -> Result<(), String> {
        let deadline = Instant::now() + self.o.stall;
        while Path::new(&self.o.dev).exists() != present {
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not {} within {} ms",
                    self.o.dev,
                    if present { "appear" } else { "go away" },
                    self.o.stall.as_millis()
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    fn unbind(&mut self) -> Result<(), String> {
        let path = format!("{}/unbind", self.o.driver_dir);
        let d = sysfs_write(&path, &self.o.bdf, self.o.stall)?;
        self.unbind.add(d);
        self.wait_dev(false)
    }

    fn bind(&mut self) -> Result<(), String> {
        let path = format!("{}/bind", self.o.driver_dir);
        let d = sysfs_write(&path, &self.o.bdf, self.o.stall)?;
        self.bind.add(d);
        self.wait_dev(true)
    }

    fn rmmod(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let (code, out) = run_bounded(&["rmmod", "aiodma"], self.o.stall)?;
            if code == 0 {
                self.rmmod.add(started.elapsed());
                return Ok(());
            }
            if started.elapsed() > self.o.stall {
                return Err(format!(
                    "rmmod kept failing for {} ms: {out}",
                    self.o.stall.as_millis()
                ));
            }
            // Still in use: workers close their files once they notice the unbind.
            self.rmmod_retries += 1;
            self.check_workers()?;
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn insmod(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let mut argv = vec!["insmod", self.o.module.as_str()];
        argv.extend(self.params.iter().map(String::as_str));
        let (code, out) = run_bounded(&argv, self.o.stall)?;
        if code != 0 {
            return Err(format!("{}: exit {code}: {out}", argv.join(" ")));
        }
        self.insmod.add(started.elapsed());
        self.wait_dev(true)
    }

    fn iteration(&mut self) -> Result<(), String> {
        if matches!(self.o.mode, Mode::Unbind | Mode::Both) {
            let before = self.opens();
            self.unbind()?;
            self.bind()?;
            self.io_going(&before)?;
        }
        if matches!(self.o.mode, Mode::Rmmod | Mode::Both) {
            let before = self.opens();
            self.unbind()?;
            self.rmmod()?;
            self.insmod()?;
            self.io_going(&before)?;
        }
        Ok(())
    }
}

fn fill_area(o: &ChurnOpts) -> Result<(), String> {
    let file = crate::util::open_dev(&o.dev, 0)?;
    let chunk = 1 << 20;
    let mut buf = AlignedBuf::new(chunk)?;
    let mut off = 0;
    while off < o.span {
        let n = chunk.min((o.span - off) as usize);
        buf.fill_pattern(o.seed, o.base + off);
        let r = std::os::unix::fs::FileExt::write_at(&file, &buf.bytes()[..n], o.base + off)
            .map_err(|e| format!("filling the area at {}: {e}", o.base + off))?;
        if r != n {
            return Err(format!(
                "filling the area at {}: short write {r}",
                o.base + off
            ));
        }
        off += n as u64;
    }
    Ok(())
}

/// After the loop: a write and a read-back through a fresh file.
fn still_works(o: &ChurnOpts) -> Result<String, String> {
    use std::os::unix::fs::FileExt;
    let file = crate::util::open_dev(&o.dev, 0)?;
    let mut w = AlignedBuf::new(o.bs)?;
    w.fill_pattern(o.seed, o.base);
    file.write_all_at(w.bytes(), o.base)
        .map_err(|e| format!("final write: {e}"))?;
    let mut r = AlignedBuf::new(o.bs)?;
    file.read_exact_at(r.bytes_mut(), o.base)
        .map_err(|e| format!("final read: {e}"))?;
    match r.pattern_mismatch(o.bs, o.seed, o.base) {
        None => Ok("write and read-back after the loop: data matches".into()),
        Some(k) => Err(format!("final read-back differs at byte {k}")),
    }
}

/// Run it; returns whether it passed.
pub fn run(o: &ChurnOpts) -> Result<bool, String> {
    let unbind_path = format!("{}/unbind", o.driver_dir);
    if !Path::new(&unbind_path).exists() {
        return Err(format!("{unbind_path} is missing (driver not loaded?)"));
    }
    if o.span / o.bs as u64 == 0 {
        return Err("--span is smaller than --bs".into());
    }
    fill_area(o)?;
    let params = o.params.clone().unwrap_or_else(cmdline_params);
    let mut kinds = vec![Kind::Libaio, Kind::Uring];
    kinds.extend(std::iter::repeat_n(Kind::Sync, o.sync_workers));
    let stop = kinds.len() * FIELDS;
    let sh = Shared::new(stop + 1)?;
    println!(
        "churn: {} iteration(s) of {:?} with {} worker(s) ({kinds:?}), qd {}, {} B requests, \
         insmod parameters [{}]",
        o.iterations,
        o.mode,
        kinds.len(),
        o.qd,
        o.bs,
        params.join(" ")
    );
    let mut workers = Vec::new();
    for (w, &kind) in kinds.iter().enumerate() {
        let sh = &sh;
        workers.push(fork(move || {
            Worker {
                o,
                w,
                kind,
                sh,
                stop,
            }
            .run()
        })?);
    }
    let started = Instant::now();
    let mut lp = Loop {
        o,
        sh: &sh,
        workers: &mut workers,
        params,
        unbind: Times::default(),
        bind: Times::default(),
        rmmod: Times::default(),
        insmod: Times::default(),
        rmmod_retries: 0,
    };
    let zero = vec![0i64; kinds.len()];
    let mut failure = lp.io_going(&zero).err();
    let mut done = 0;
    while failure.is_none() && done < o.iterations {
        match lp.iteration() {
            Ok(()) => {
                done += 1;
                if done % 10 == 0 && done < o.iterations {
                    println!(
                        "churn: {done} iteration(s) done after {} ms",
                        started.elapsed().as_millis()
                    );
                }
            }
            Err(e) => failure = Some(format!("iteration {}: {e}", done + 1)),
        }
    }
    let loop_ms = started.elapsed().as_millis();
    let steps = format!(
        "{}, {}, {}, {}; rmmod retried {} time(s) while in use",
        lp.unbind.show("unbind"),
        lp.bind.show("bind"),
        lp.rmmod.show("rmmod"),
        lp.insmod.show("insmod"),
        lp.rmmod_retries
    );
    sh.set(stop, 1);
    let mut problems: Vec<String> = failure.into_iter().collect();
    for (w, c) in workers.iter_mut().enumerate() {
        match c.wait_for(o.stall + Duration::from_secs(1)) {
            Some(0) => {}
            Some(st) => problems.push(format!("worker {w} ended with {}", status_name(st))),
            None => {
                problems.push(format!("worker {w} did not stop (HANG)"));
                if c.kill(Duration::from_secs(2)).is_none() {
                    problems.push(format!("worker {w} did not die within 2 s of SIGKILL"));
                }
            }
        }
    }
    let g = |w: usize, f: usize| sh.get(w * FIELDS + f);
    for (w, kind) in kinds.iter().enumerate() {
        let last = g(w, LAST_UNEXPECTED);
        println!(
            "churn worker {w} ({kind:?}): submitted {}, ok {}, tolerated errors {}, refused {}, \
             unexpected {}{}, short {}, bad data {}, duplicates {}, lost {}, opens {}",
            g(w, SUBMITTED),
            g(w, OK),
            g(w, TOLERATED),
            g(w, REFUSED),
            g(w, UNEXPECTED),
            if last != 0 {
                format!(" (last {})", errno_name(last as i32))
            } else {
                String::new()
            },
            g(w, SHORT),
            g(w, BAD_DATA),
            g(w, DUPLICATES),
            g(w, LOST),
            g(w, OPENS)
        );
        for (f, what) in [
            (UNEXPECTED, "unexpected errors"),
            (SHORT, "partial transfers"),
            (BAD_DATA, "reads with wrong data"),
            (DUPLICATES, "duplicate or stray completions"),
            (LOST, "lost requests"),
        ] {
            if g(w, f) > 0 {
                problems.push(format!("worker {w}: {} {what}", g(w, f)));
            }
        }
    }
    println!(
        "churn: {done} of {} iteration(s) in {loop_ms} ms; {steps}",
        o.iterations
    );
    if problems.is_empty() {
        // In a child: a wedged device must not hang the tool.
        let mut child = fork(|| match still_works(o) {
            Ok(s) => {
                println!("churn: {s}");
                0
            }
            Err(e) => {
                println!("churn: {e}");
                1
            }
        })?;
        match child.wait_for(o.stall) {
            Some(0) => {}
            Some(_) => problems.push("the device does not work after the loop".into()),
            None => problems.push(format!(
                "a write and read-back after the loop did not finish within {} ms (HANG)",
                o.stall.as_millis()
            )),
        }
    }
    for p in &problems {
        println!("churn: FAIL: {p}");
    }
    let ok = problems.is_empty();
    println!("churn: {}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}
