//! `aiodma-aio cancel`: requests that leave before they finish.
//!
//! Scenarios, each with requests in flight (run it under a delay fault so they stay there):
//!
//! - `io_cancel`: libaio `io_cancel` on every in-flight request. The driver may cancel
//!   (`EINPROGRESS`: the event follows, typically `-ECANCELED`) or refuse (`EINVAL`/`EAGAIN`:
//!   the request completes normally).
//! - `uring-cancel`: `IORING_OP_ASYNC_CANCEL` on every in-flight io_uring request.
//! - `exit`: a forked child submits libaio requests and exits at once; its exit waits for them.
//! - `close`: the fd is closed with requests in flight; their events still arrive.
//! - `close-destroy`: the fd is closed, then `io_destroy` at once (which waits for them).
//!
//! Every request must get exactly one completion and every wait is bounded; a scenario fails
//! only on a hang, a lost completion or a duplicate one. Afterwards the device must still
//! round-trip data.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::aio;
use crate::util::{bounded, device_info, errno_name, open_dev, res_name, AlignedBuf};

/// What `cancel` was asked to do.
#[derive(Debug, Clone)]
pub struct CancelOpts {
    /// Device path.
    pub dev: String,
    /// Requests per scenario.
    pub requests: usize,
    /// Bytes per request.
    pub bs: usize,
    /// Longest wait for anything.
    pub timeout: Duration,
    /// How long to keep listening for duplicate completions after the last expected one.
    pub settle: Duration,
    /// Device offset of the scratch area.
    pub base: u64,
}

/// How a scenario went.
#[derive(Debug, Default)]
struct Tally {
    /// Completions per request.
    per: Vec<u32>,
    /// Results in words, counted.
    results: BTreeMap<String, u32>,
    /// Events naming no request of ours.
    strays: u32,
    /// The wait for completions timed out.
    timed_out: bool,
}

impl Tally {
    fn new(n: usize) -> Self {
        Self {
            per: vec![0; n],
            ..Default::default()
        }
    }

    fn record(&mut self, data: u64, res: i64) {
        match self.per.get_mut(data as usize) {
            Some(c) => *c += 1,
            None => self.strays += 1,
        }
        *self.results.entry(res_name(res)).or_default() += 1;
    }

    fn complete(&self) -> bool {
        self.per.iter().all(|&c| c > 0)
    }

    fn lost(&self) -> usize {
        self.per.iter().filter(|&&c| c == 0).count()
    }

    fn duplicates(&self) -> usize {
        self.per.iter().filter(|&&c| c > 1).count()
    }

    fn ok(&self) -> bool {
        self.lost() == 0 && self.duplicates() == 0 && self.strays == 0
    }

    fn summary(&self) -> String {
        let results: Vec<String> = self
            .results
            .iter()
            .map(|(r, n)| format!("{r} x{n}"))
            .collect();
        let mut s = format!(
            "completions: {} of {} [{}]",
            self.per.iter().filter(|&&c| c > 0).count(),
            self.per.len(),
            results.join(", ")
        );
        if self.lost() > 0 {
            s += &format!(", LOST {}", self.lost());
        }
        if self.duplicates() > 0 {
            s += &format!(", DUPLICATE {}", self.duplicates());
        }
        if self.strays > 0 {
            s += &format!(", STRAY {}", self.strays);
        }
        if self.timed_out {
            s += ", timed out waiting";
        }
        s
    }
}

/// Buffers and iocbs for `n` requests alternating reads and writes over the scratch area.
struct Batch {
    /// Owned for as long as the requests may use them; only the kernel touches them.
    _bufs: Vec<AlignedBuf>,
    iocbs: Vec<aio::Iocb>,
}

impl Batch {
    fn new(o: &CancelOpts, fd: RawFd) -> Result<Self, String> {
        let mut bufs = Vec::with_capacity(o.requests);
        let mut iocbs = Vec::with_capacity(o.requests);
        for i in 0..o.requests {
            let off = o.base + (i * o.bs) as u64;
            let mut b = AlignedBuf::new(o.bs)?;
            let op = if i % 2 == 0 {
                aio::CMD_PREAD
            } else {
                b.fill_pattern(0xca9c, off);
                aio::CMD_PWRITE
            };
            iocbs.push(aio::Context::iocb(
                fd,
                op,
                b.ptr() as u64,
                o.bs as u64,
                off as i64,
                i as u64,
            ));
            bufs.push(b);
        }
        Ok(Self { _bufs: bufs, iocbs })
    }

    fn ptrs(&mut self) -> Vec<*mut aio::Iocb> {
        self.iocbs.iter_mut().map(|c| c as *mut aio::Iocb).collect()
    }
}

/// Submit every iocb of `batch` on `ctx`; returns how many were queued.
///
/// # Safety
/// `batch` outlives every request (it is dropped only after `ctx` or after every event).
unsafe fn submit_all(ctx: &aio::Context, ptrs: &mut [*mut aio::Iocb]) -> Result<usize, String> {
    let mut done = 0;
    while done < ptrs.len() {
        // SAFETY: the caller's contract.
        let n = unsafe { ctx.submit(&mut ptrs[done..]) }
            .map_err(|e| format!("io_submit (after {done}): {e}"))?;
        if n == 0 {
            return Err(format!("io_submit queued nothing after {done}"));
        }
        done += n;
    }
    Ok(done)
}

/// Reap libaio events until every request has one (or `timeout`), then listen `settle` more
/// for duplicates.
fn collect_aio(ctx: &aio::Context, t: &mut Tally, timeout: Duration, settle: Duration) {
    let mut events = vec![aio::IoEvent::default(); t.per.len().max(1) * 2];
    let deadline = Instant::now() + timeout;
    // `min` None: as many as the array holds (a wait that only the timeout ends).
    let mut listen = |t: &mut Tally, min: Option<usize>, wait: Duration| -> Result<usize, String> {
        let min = min.unwrap_or(events.len());
        let got = ctx
            .get_events(min, &mut events, Some(wait))
            .map_err(|e| format!("io_getevents: {e}"))?;
        for ev in &events[..got] {
            t.record(ev.data, ev.res);
        }
        Ok(got)
    };
    while !t.complete() {
        let now = Instant::now();
        if now >= deadline {
            t.timed_out = true;
            return;
        }
        if let Err(e) = listen(t, Some(1), deadline - now) {
            println!("    {e}");
            t.timed_out = true;
            return;
        }
    }
    let until = Instant::now() + settle;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if left.is_zero() || listen(t, None, left).is_err() {
            break;
        }
    }
}

fn verdict(name: &str, ok: bool, detail: &str) -> bool {
    println!(
        "cancel {name}: {detail}: {}",
        if ok { "ok" } else { "FAILED" }
    );
    ok
}

fn scenario_io_cancel(o: &CancelOpts, file: &File) -> Result<bool, String> {
    let fd = file.as_raw_fd();
    // Declared before the context so that it is dropped after it (io_destroy waits).
    let mut batch = Batch::new(o, fd)?;
    let ctx = aio::Context::new(2 * o.requests as u32).map_err(|e| format!("io_setup: {e}"))?;
    let mut ptrs = batch.ptrs();
    // SAFETY: `batch` outlives `ctx`.
    let n = unsafe { submit_all(&ctx, &mut ptrs) }?;
    let mut outcomes: BTreeMap<String, u32> = BTreeMap::new();
    for p in &ptrs[..n] {
        // SAFETY: `p` was submitted on `ctx` and its iocb and buffer are alive.
        let r = unsafe { ctx.cancel(*p) };
        let word = match r {
            Ok(()) => "0 (cancelled)".to_string(),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINPROGRESS) => "EINPROGRESS (cancelling)".to_string(),
                Some(libc::EINVAL) => "EINVAL (not cancellable)".to_string(),
                Some(libc::EAGAIN) => "EAGAIN (busy)".to_string(),
                Some(x) => errno_name(x),
                None => e.to_string(),
            },
        };
        *outcomes.entry(word).or_default() += 1;
    }
    let mut t = Tally::new(n);
    collect_aio(&ctx, &mut t, o.timeout, o.settle);
    let calls: Vec<String> = outcomes.iter().map(|(w, c)| format!("{w} x{c}")).collect();
    let ok = t.ok() && !t.timed_out;
    if !ok {
        // A lost completion would make io_destroy (and process exit) wait forever: say so first.
        verdict(
            "io_cancel",
            false,
            &format!("io_cancel: [{}]; {}", calls.join(", "), t.summary()),
        );
        return Ok(false);
    }
    drop(ctx);
    drop(batch);
    Ok(verdict(
        "io_cancel",
        true,
        &format!(
            "{n} submitted; io_cancel: [{}]; {}",
            calls.join(", "),
            t.summary()
        ),
    ))
}

fn scenario_uring_cancel(o: &CancelOpts, file: &File) -> Result<bool, String> {
    use io_uring::{opcode, types, IoUring};
    let fd = file.as_raw_fd();
    let n = o.requests;
    // Declared before the ring so that it is dropped after it.
    let batch = Batch::new(o, fd)?;
    let mut ring = IoUring::new((2 * n).next_power_of_two() as u32)
        .map_err(|e| format!("io_uring_setup: {e}"))?;
    for (i, c) in batch.iocbs.iter().enumerate() {
        let entry = if c.opcode == aio::CMD_PREAD {
            opcode::Read::new(types::Fd(fd), c.buf as *mut u8, c.nbytes as u32)
                .offset(c.offset as u64)
                .build()
        } else {
            opcode::Write::new(types::Fd(fd), c.buf as *const u8, c.nbytes as u32)
                .offset(c.offset as u64)
                .build()
        };
        // SAFETY: the buffers live in `batch` until every CQE is reaped (or the ring is gone).
        unsafe { ring.submission().push(&entry.user_data(i as u64)) }
            .map_err(|_| "SQ full".to_string())?;
    }
    ring.submit().map_err(|e| format!("io_uring_enter: {e}"))?;
    for i in 0..n {
        let entry = opcode::AsyncCancel::new(i as u64)
            .build()
            .user_data((n + i) as u64);
        // SAFETY: a cancel carries no buffer.
        unsafe { ring.submission().push(&entry) }.map_err(|_| "SQ full".to_string())?;
    }
    ring.submit().map_err(|e| format!("io_uring_enter: {e}"))?;
    let mut t = Tally::new(n);
    let mut cancels = Tally::new(0);
    let take = |ring: &mut IoUring, t: &mut Tally, cancels: &mut Tally| {
        for c in ring.completion() {
            let ud = c.user_data();
            if ud >= n as u64 && ud < 2 * n as u64 {
                cancels.per.push(1);
                *cancels
                    .results
                    .entry(res_name(i64::from(c.result())))
                    .or_default() += 1;
            } else {
                t.record(ud, i64::from(c.result()));
            }
        }
    };
    let deadline = Instant::now() + o.timeout;
    loop {
        take(&mut ring, &mut t, &mut cancels);
        if t.complete() && cancels.per.len() >= n {
            break;
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            t.timed_out = true;
            break;
        };
        let ts = types::Timespec::from(left);
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(format!("io_uring_enter: {e}")),
        }
    }
    if !t.timed_out {
        std::thread::sleep(o.settle);
        take(&mut ring, &mut t, &mut cancels);
    }
    let cancel_cqes = cancels.per.len();
    let calls: Vec<String> = cancels
        .results
        .iter()
        .map(|(w, c)| format!("{w} x{c}"))
        .collect();
    let ok = t.ok() && !t.timed_out && cancel_cqes == n;
    let detail = format!(
        "{n} submitted; ASYNC_CANCEL results: [{}] ({cancel_cqes} of {n}); {}",
        calls.join(", "),
        t.summary()
    );
    if !ok {
        verdict("uring-cancel", false, &detail);
        return Ok(false);
    }
    drop(ring);
    drop(batch);
    Ok(verdict("uring-cancel", true, &detail))
}

fn scenario_exit(o: &CancelOpts, file: &File) -> Result<bool, String> {
    let fd = file.as_raw_fd();
    let mut batch = Batch::new(o, fd)?;
    let mut ptrs = batch.ptrs();
    let mut pipe = [0i32; 2];
    // SAFETY: `pipe` has room for two descriptors.
    if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    let nr = o.requests as libc::c_long;
    // SAFETY: the child only makes raw system calls on memory prepared before the fork (no
    // allocation, no locks) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // Child.
        // SAFETY: raw syscalls on prepared memory; `ptrs` points at iocbs whose buffers stay
        // mapped in this process until it exits (exit waits for the requests).
        unsafe {
            let mut ctx: libc::c_ulong = 0;
            if libc::syscall(libc::SYS_io_setup, nr * 2, &mut ctx) != 0 {
                libc::_exit(3);
            }
            let n = libc::syscall(libc::SYS_io_submit, ctx, nr, ptrs.as_mut_ptr());
            let byte = if n < 0 { 255u8 } else { n as u8 };
            libc::write(pipe[1], (&byte as *const u8).cast(), 1);
            libc::_exit(0);
        }
    }
    // Parent.
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(pipe[1]) };
    let started = Instant::now();
    let mut byte = 0u8;
    let mut pfd = libc::pollfd {
        fd: pipe[0],
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, o.timeout.as_millis() as i32) };
    let submitted = if ready == 1 {
        // SAFETY: reading one byte into `byte`.
        let r = unsafe { libc::read(pipe[0], (&mut byte as *mut u8).cast(), 1) };
        if r == 1 {
            Some(byte)
        } else {
            None
        }
    } else {
        None
    };
    // SAFETY: closing our read end.
    unsafe { libc::close(pipe[0]) };
    let mut status = 0;
    let deadline = started + o.timeout;
    let reaped = loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break true;
        }
        if r < 0 || Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    drop(batch);
    if !reaped {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        return Ok(verdict(
            "exit",
            false,
            &format!(
                "child with requests in flight did not exit within {} s (HANG)",
                o.timeout.as_secs()
            ),
        ));
    }
    let submitted = match submitted {
        Some(255) => "io_submit failed in the child".to_string(),
        Some(b) => format!("child submitted {b} and exited"),
        None => "child reported nothing".to_string(),
    };
    let exit = if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else {
        format!("wait status {status:#x}")
    };
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok(verdict(
        "exit",
        ok,
        &format!("{submitted}; reaped after {ms:.1} ms, {exit}"),
    ))
}

fn scenario_close(o: &CancelOpts, destroy_at_once: bool) -> Result<bool, String> {
    let name = if destroy_at_once {
        "close-destroy"
    } else {
        "close"
    };
    let file = open_dev(&o.dev, 0)?;
    let fd = file.as_raw_fd();
    let mut batch = Batch::new(o, fd)?;
    let ctx = aio::Context::new(2 * o.requests as u32).map_err(|e| format!("io_setup: {e}"))?;
    let mut ptrs = batch.ptrs();
    // SAFETY: `batch` is dropped only after every event or after io_destroy returned.
    let n = unsafe { submit_all(&ctx, &mut ptrs) }?;
    let t0 = Instant::now();
    drop(file);
    let close_ms = t0.elapsed().as_secs_f64() * 1000.0;
    if destroy_at_once {
        let t1 = Instant::now();
        // io_destroy waits for (or cancels) what is in flight; the buffers go with it.
        let done = bounded(o.timeout, move || {
            drop(ctx);
            drop(batch);
        });
        let ms = t1.elapsed().as_secs_f64() * 1000.0;
        return Ok(match done {
            Some(()) => verdict(
                name,
                true,
                &format!(
                    "{n} submitted; close() returned in {close_ms:.1} ms; io_destroy returned in {ms:.1} ms"
                ),
            ),
            None => verdict(
                name,
                false,
                &format!(
                    "{n} submitted; io_destroy did not return within {} s (HANG)",
                    o.timeout.as_secs()
                ),
            ),
        });
    }
    let mut t = Tally::new(n);
    collect_aio(&ctx, &mut t, o.timeout, o.settle);
    let ok = t.ok() && !t.timed_out;
    let detail = format!(
        "{n} submitted; close() returned in {close_ms:.1} ms; {}",
        t.summary()
    );
    if !ok {
        verdict(name, false, &detail);
        return Ok(false);
    }
    drop(ctx);
    drop(batch);
    Ok(verdict(name, true, &detail))
}

/// After everything: a write and a read-back through the sync and libaio paths.
fn still_works(o: &CancelOpts, file: &File) -> Result<bool, String> {
    let fd = file.as_raw_fd();
    let off = o.base;
    let mut w = AlignedBuf::new(o.bs)?;
    w.fill_pattern(0x600d, off);
    // SAFETY: `w` holds `bs` readable bytes.
    let wr = unsafe { libc::pwrite(fd, w.ptr().cast(), o.bs, off as i64) };
    let r = AlignedBuf::new(o.bs)?;
    let ctx = aio::Context::new(1).map_err(|e| format!("io_setup: {e}"))?;
    let mut iocb = aio::Context::iocb(
        fd,
        aio::CMD_PREAD,
        r.ptr() as u64,
        o.bs as u64,
        off as i64,
        0,
    );
    let mut ptrs = [&mut iocb as *mut aio::Iocb];
    let mut t = Tally::new(1);
    // SAFETY: `r` was declared before `ctx`, so it outlives it.
    if let Err(e) = unsafe { submit_all(&ctx, &mut ptrs) } {
        return Ok(verdict("after", false, &e));
    }
    collect_aio(&ctx, &mut t, o.timeout, Duration::ZERO);
    let res = t.results.keys().next().cloned().unwrap_or_default();
    let ok = wr == o.bs as isize
        && t.ok()
        && !t.timed_out
        && res == o.bs.to_string()
        && r.pattern_mismatch(o.bs, 0x600d, off).is_none();
    Ok(verdict(
        "after",
        ok,
        &format!(
            "sync pwrite = {wr}, libaio pread = {res}, data {}",
            if ok { "matches" } else { "checked" }
        ),
    ))
}

/// Run every scenario; returns whether none hung, lost or duplicated a completion.
pub fn run(o: &CancelOpts) -> Result<bool, String> {
    let file = open_dev(&o.dev, 0)?;
    let cap = device_info(file.as_raw_fd())?.capacity;
    let end = o.base + (o.requests * o.bs) as u64;
    if end > cap {
        return Err(format!(
            "--base {} + {} requests of {} bytes passes the capacity {cap}",
            o.base, o.requests, o.bs
        ));
    }
    println!(
        "cancel: {} requests of {} bytes per scenario, timeout {} s",
        o.requests,
        o.bs,
        o.timeout.as_secs()
    );
    // Order matters: `exit` forks, so it runs before anything leaves threads behind.
    let mut all = true;
    all &= scenario_io_cancel(o, &file)?;
    all &= scenario_uring_cancel(o, &file)?;
    all &= scenario_exit(o, &file)?;
    all &= scenario_close(o, false)?;
    all &= scenario_close(o, true)?;
    all &= still_works(o, &file)?;
    println!("cancel: {}", if all { "ok" } else { "FAILED" });
    Ok(all)
}
