//! `aiodma-aio abandon`: the wedge. Requests whose waiter is gone while the device drops them
//! must still time out, so that the queue recovers.
//!
//! Run it under a drop fault on reads only (`--fault drop:every=1,op=read`) with a short
//! driver timeout (`--append aiodma.timeout_ms=1000`, given here as `--timeout-ms`):
//!
//! 1. `uring-exit`: a child submits io_uring reads and exits without waiting. Its waiter is
//!    still a kiocb, so the driver must time the reads out and reset the device (the statistic
//!    `resets` moves) before the next phase starts.
//! 2. `gone`: requests nobody waits for any more, in groups by kind, until a submission can no
//!    longer reach the device (the ring is full, which this phase must see): sync readers
//!    killed with SIGKILL once their 4 KiB reads are on the device, libaio reads `io_cancel`ed
//!    (the driver completes the kiocb with -ECANCELED while the device keeps the read), libaio
//!    reads abandoned by a child's exit (aio's exit cancels them). Every step is fast, so no
//!    request still waited for is on the device as long as the timeout, and the ring fills
//!    faster than abandoned requests time out.
//! 3. `recovery`: writes (not dropped) by sync `pwrite`, libaio and io_uring, in a child. Each
//!    must complete within 2 x timeout (retries after an error allowed); the time is printed.
//!    A driver that leaves abandoned requests out of the timeout is wedged here: the ring is
//!    full of dropped reads, the write waits for room forever; the child is killed at
//!    2 x timeout + slack and the scenario FAILs.
//! 4. `stats`: the driver's INFO counters must show timeouts and resets after phase 1.
//!
//! Nothing here blocks the tool itself: every call that can wait on the driver runs in a
//! forked child with a bounded wait, killed when the bound passes.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::abi::DeviceInfo;
use crate::aio;
use crate::proc::{self, fork, now_ms, status_name, Shared};
use crate::util::{device_info, errno_name, open_dev, AlignedBuf};

/// What `abandon` was asked to do.
#[derive(Debug, Clone)]
pub struct AbandonOpts {
    /// Device path.
    pub dev: String,
    /// The driver's `timeout_ms` for this boot.
    pub timeout_ms: u64,
    /// Sync readers to kill.
    pub sync: usize,
    /// libaio reads to `io_cancel`.
    pub cancel: usize,
    /// libaio reads to abandon by exit.
    pub exit: usize,
    /// io_uring reads to abandon by exit (phase 1).
    pub uring: usize,
    /// libaio reads per child.
    pub batch: usize,
    /// Bytes per request.
    pub bs: usize,
    /// Device offset of the scratch area.
    pub base: u64,
    /// Descriptors per queue (the default queue size).
    pub ring: usize,
    /// How long one submission may take to reach the device before it counts as blocked.
    pub wait: Duration,
    /// Extra time beyond 2 x timeout before a recovery step is declared wedged.
    pub slack: Duration,
}

fn line(name: &str, ok: bool, detail: &str) -> bool {
    println!(
        "abandon {name}: {detail}: {}",
        if ok { "PASS" } else { "FAIL" }
    );
    ok
}

fn info(fd: RawFd) -> Result<DeviceInfo, String> {
    device_info(fd)
}

fn delta(a: &DeviceInfo, b: &DeviceInfo) -> String {
    format!(
        "submitted +{}, timeouts +{}, resets +{}, cancels +{}, errors +{}",
        b.submitted - a.submitted,
        b.timeouts - a.timeouts,
        b.resets - a.resets,
        b.cancels - a.cancels,
        b.errors - a.errors
    )
}

/// Phase 1: io_uring reads abandoned by exit; they must be timed out and the device reset.
fn uring_exit(o: &AbandonOpts, file: &File) -> Result<bool, String> {
    use io_uring::{opcode, types, IoUring};
    if o.uring == 0 {
        return Ok(true);
    }
    let fd = file.as_raw_fd();
    let before = info(fd)?;
    let sh = Shared::new(1)?;
    let bufs = AlignedBuf::new(o.bs * o.uring)?;
    let started = Instant::now();
    let mut child = fork(|| {
        let Ok(mut ring) = IoUring::new(o.uring.next_power_of_two() as u32) else {
            return 3;
        };
        for i in 0..o.uring {
            // SAFETY: inside `bufs`, which stays mapped until this process exits.
            let buf = unsafe { bufs.ptr().add(i * o.bs) };
            let e = opcode::Read::new(types::Fd(fd), buf, o.bs as u32)
                .offset(o.base + (i * o.bs) as u64)
                .build()
                .user_data(i as u64);
            // SAFETY: as above; the ring goes with the process.
            if unsafe { ring.submission().push(&e) }.is_err() {
                return 4;
            }
        }
        match ring.submit() {
            Ok(n) => sh.set(0, n as i64),
            Err(_) => return 5,
        }
        // Leave with the reads in flight; the kernel cleans the ring up at exit.
        0
    })?;
    let limit = Duration::from_millis(3 * o.timeout_ms) + Duration::from_secs(5);
    let status = child.wait_for(limit);
    let reaped_ms = started.elapsed().as_millis();
    let submitted = sh.get(0);
    let Some(st) = status else {
        child.kill(Duration::from_secs(1));
        return Ok(line(
            "uring-exit",
            false,
            &format!(
                "the child that submitted {submitted} reads did not exit within {} ms",
                limit.as_millis()
            ),
        ));
    };
    if st != 0 || submitted as usize != o.uring {
        return Ok(line(
            "uring-exit",
            false,
            &format!(
                "child {}: submitted {submitted} of {}",
                status_name(st),
                o.uring
            ),
        ));
    }
    // The reads were dropped by the device: only a timeout and reset can end them.
    let mut after = info(fd)?;
    while after.resets == before.resets && started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(20));
        after = info(fd)?;
    }
    let reset_ms = started.elapsed().as_millis();
    let ok = after.resets > before.resets;
    Ok(line(
        "uring-exit",
        ok,
        &format!(
            "{submitted} reads submitted by a child that exited; child reaped after {reaped_ms} ms; \
             {} after {reset_ms} ms",
            if ok {
                delta(&before, &after)
            } else {
                format!("no reset within {} ms ({})", limit.as_millis(), delta(&before, &after))
            }
        ),
    ))
}

/// How the `gone` phase went, per kind.
#[derive(Debug, Default)]
struct Gone {
    /// Requests that reached the device and were then abandoned.
    on_device: [usize; 3],
    /// Submissions that could not reach the device within `wait` (ring full).
    blocked: [usize; 3],
    /// Oddities, in words.
    notes: Vec<String>,
    /// `io_cancel` answers: cancelling (0/EINPROGRESS), refused (EINVAL), other.
    cancel_calls: [i64; 3],
    /// Events the cancelling children got: -ECANCELED, other.
    cancel_events: [i64; 2],
}

const SYNC: usize = 0;
const CANCEL: usize = 1;
const EXIT: usize = 2;
const KINDS: [&str; 3] = [
    "killed sync reads",
    "io_cancel'ed libaio reads",
    "libaio reads abandoned by exit",
];

/// A group of `k` sync readers: fork them all, wait until their reads are on the device (the
/// driver's `submitted` counter; at most `wait` without progress), SIGKILL them all. Returns
/// how many reached the device and whether some could not (ring full).
fn sync_group(
    o: &AbandonOpts,
    fd: RawFd,
    buf: &AlignedBuf,
    first: usize,
    k: usize,
    g: &mut Gone,
) -> Result<(usize, bool), String> {
    let before = info(fd)?.submitted;
    let mut children = Vec::with_capacity(k);
    for i in 0..k {
        let off = o.base + ((first + i) * o.bs) as u64;
        children.push(fork(|| {
            // SAFETY: `buf` holds `bs` writable bytes in this process.
            let r = unsafe { libc::pread(fd, buf.ptr().cast(), o.bs, off as i64) };
            if r == o.bs as isize {
                0
            } else {
                1
            }
        })?);
    }
    let mut last = 0;
    let mut since = Instant::now();
    let on_device = loop {
        let now = info(fd)?.submitted - before;
        if now as usize >= k || since.elapsed() > o.wait {
            break now as usize;
        }
        if now != last {
            last = now;
            since = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    for c in &children {
        c.signal(libc::SIGKILL);
    }
    for c in children.iter_mut() {
        match c.wait_for(Duration::from_secs(2)) {
            Some(st) if libc::WIFSIGNALED(st) => {}
            Some(st) => g.notes.push(format!(
                "a sync read returned by itself ({})",
                status_name(st)
            )),
            None => g
                .notes
                .push("a sync reader did not die within 2 s of SIGKILL".to_string()),
        }
    }
    let on_device = on_device.min(k);
    Ok((on_device, on_device < k))
}

/// Child side of a libaio batch: submit one at a time (counting in `sh[0]`), then either
/// cancel and collect (`cancel`) or leave at once.
fn aio_child(
    o: &AbandonOpts,
    fd: RawFd,
    bufs: &AlignedBuf,
    first: usize,
    n: usize,
    cancel: bool,
    sh: &Shared,
) -> i32 {
    let Ok(ctx) = aio::Context::new((2 * n) as u32) else {
        return 3;
    };
    let mut iocbs: Vec<aio::Iocb> = (0..n)
        .map(|i| {
            aio::Context::iocb(
                fd,
                aio::CMD_PREAD,
                // SAFETY: inside `bufs`.
                unsafe { bufs.ptr().add(i * o.bs) } as u64,
                o.bs as u64,
                (o.base + ((first + i) * o.bs) as u64) as i64,
                i as u64,
            )
        })
        .collect();
    for c in iocbs.iter_mut() {
        let mut p = [c as *mut aio::Iocb];
        // SAFETY: the iocb and its buffer live until this process exits.
        match unsafe { ctx.submit(&mut p) } {
            Ok(1) => sh.add(0, 1),
            _ => return 4,
        }
    }
    if !cancel {
        // Exit with the reads in flight: aio's exit path cancels them.
        std::mem::forget(ctx);
        return 0;
    }
    for c in iocbs.iter_mut() {
        // SAFETY: submitted on `ctx`, alive.
        match unsafe { ctx.cancel(c) } {
            Ok(()) => sh.add(1, 1),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINPROGRESS) => sh.add(1, 1),
                Some(libc::EINVAL) => sh.add(2, 1),
                _ => sh.add(3, 1),
            },
        }
    }
    let mut events = vec![aio::IoEvent::default(); n];
    let limit = Duration::from_millis(2 * o.timeout_ms) + Duration::from_secs(1);
    let deadline = Instant::now() + limit;
    let mut got = 0;
    while got < n {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        match ctx.get_events(1, &mut events[got..], Some(left)) {
            Ok(k) => {
                for ev in &events[got..got + k] {
                    if ev.res == -i64::from(libc::ECANCELED) {
                        sh.add(4, 1);
                    } else {
                        sh.add(5, 1);
                    }
                }
                got += k;
            }
            Err(_) => break,
        }
    }
    if got < n {
        // io_destroy would wait for the missing events: leave them to the exit path.
        std::mem::forget(ctx);
        return 6;
    }
    0
}

/// A libaio child that has submitted (or was killed while blocked submitting), to be
/// collected at the end of the phase.
struct AioChild {
    child: proc::Child,
    sh: Shared,
    cancel: bool,
    blocked: bool,
}

/// One libaio child of `n` reads: returns once its reads reached the device, or once it has
/// made no progress submitting for `wait` (killed then: the ring is full). The child goes on
/// (cancelling and collecting, or exiting) while the phase continues.
fn one_aio(
    o: &AbandonOpts,
    fd: RawFd,
    bufs: &AlignedBuf,
    first: usize,
    n: usize,
    cancel: bool,
) -> Result<(usize, AioChild), String> {
    let sh = Shared::new(6)?;
    let mut child = fork(|| aio_child(o, fd, bufs, first, n, cancel, &sh))?;
    let mut last = 0;
    let mut since = Instant::now();
    let blocked = loop {
        let now = sh.get(0);
        if now as usize >= n || child.try_wait().is_some() {
            break false;
        }
        if now != last {
            last = now;
            since = Instant::now();
        }
        if since.elapsed() > o.wait {
            break true;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    if blocked {
        child.signal(libc::SIGKILL);
    }
    let k = sh.get(0) as usize;
    Ok((
        k,
        AioChild {
            child,
            sh,
            cancel,
            blocked,
        },
    ))
}

/// Collect the libaio children: each must finish within 2 x timeout + 3 s.
fn collect_aio(o: &AbandonOpts, children: Vec<AioChild>, g: &mut Gone) {
    let limit = Duration::from_millis(2 * o.timeout_ms) + Duration::from_secs(3);
    let deadline = Instant::now() + limit;
    for mut c in children {
        let what = if c.cancel { "io_cancel" } else { "exit" };
        let left = deadline.saturating_duration_since(Instant::now());
        match c.child.wait_for(left) {
            Some(_) if c.blocked => {}
            Some(0) => {}
            Some(st) => g
                .notes
                .push(format!("an {what} child ended with {}", status_name(st))),
            None => {
                g.notes.push(format!(
                    "an {what} child did not finish within {} ms",
                    limit.as_millis()
                ));
                if c.child.kill(Duration::from_secs(2)).is_none() {
                    g.notes
                        .push(format!("an {what} child did not die within 2 s of SIGKILL"));
                }
            }
        }
        if c.cancel {
            g.cancel_calls[0] += c.sh.get(1);
            g.cancel_calls[1] += c.sh.get(2);
            g.cancel_calls[2] += c.sh.get(3);
            g.cancel_events[0] += c.sh.get(4);
            g.cancel_events[1] += c.sh.get(5);
        }
    }
}

/// Phase 2: abandoned requests, interleaved by kind, until a submission cannot reach the
/// device any more (the ring is full) or all are made.
fn gone(o: &AbandonOpts, file: &File) -> Result<Gone, String> {
    let fd = file.as_raw_fd();
    let mut g = Gone::default();
    let sync_buf = AlignedBuf::new(o.bs)?;
    let aio_bufs = AlignedBuf::new(o.bs * o.batch)?;
    let (mut made, mut next_off) = ([0usize; 3], 0usize);
    let wants = [o.sync, o.cancel, o.exit];
    let mut pending = Vec::new();
    while (0..3).any(|k| made[k] < wants[k]) && g.blocked.iter().all(|&b| b == 0) {
        for kind in [SYNC, CANCEL, EXIT] {
            if made[kind] >= wants[kind] || g.blocked.iter().any(|&b| b > 0) {
                continue;
            }
            let n = o.batch.min(wants[kind] - made[kind]);
            made[kind] += n;
            let (k, blocked) = match kind {
                SYNC => sync_group(o, fd, &sync_buf, next_off, n, &mut g)?,
                _ => {
                    let (k, c) = one_aio(o, fd, &aio_bufs, next_off, n, kind == CANCEL)?;
                    let blocked = c.blocked;
                    pending.push(c);
                    (k, blocked)
                }
            };
            next_off += n;
            g.on_device[kind] += k;
            if blocked {
                g.blocked[kind] += n - k;
            }
        }
    }
    collect_aio(o, pending, &mut g);
    Ok(g)
}

/// Phase 3, child side: sync pwrite, then libaio and io_uring writes, each retried until it
/// succeeds or 2 x timeout passed. `sh[3k]` = ms to success (-1 failed), `sh[3k+1]` =
/// attempts, `sh[3k+2]` = last error (-errno or short count); `sh[9]` = stage (1..3, 4 done),
/// `sh[10]` = stage start (monotonic ms).
fn recovery_child(o: &AbandonOpts, fd: RawFd, buf: &AlignedBuf, sh: &Shared) -> i32 {
    use io_uring::{opcode, types, IoUring};
    let window = Duration::from_millis(2 * o.timeout_ms);
    let bs = o.bs;
    let off = o.base;
    for stage in 0..3usize {
        sh.set(10, now_ms());
        sh.set(9, stage as i64 + 1);
        sh.set(3 * stage, -1);
        let start = Instant::now();
        while start.elapsed() <= window {
            sh.add(3 * stage + 1, 1);
            let left = window
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(1));
            let res: i64 = match stage {
                0 => {
                    // SAFETY: `buf` holds `bs` readable bytes.
                    let r = unsafe { libc::pwrite(fd, buf.ptr().cast(), bs, off as i64) };
                    if r < 0 {
                        -i64::from(proc::errno())
                    } else {
                        r as i64
                    }
                }
                1 => {
                    let Ok(ctx) = aio::Context::new(1) else {
                        return 3;
                    };
                    let mut c = aio::Context::iocb(
                        fd,
                        aio::CMD_PWRITE,
                        buf.ptr() as u64,
                        bs as u64,
                        off as i64,
                        0,
                    );
                    let mut p = [&mut c as *mut aio::Iocb];
                    // SAFETY: `c` and `buf` outlive the request (the context is forgotten, not
                    // destroyed, if the event does not come).
                    match unsafe { ctx.submit(&mut p) } {
                        Ok(1) => {
                            let mut ev = [aio::IoEvent::default()];
                            match ctx.get_events(1, &mut ev, Some(left)) {
                                Ok(1) => ev[0].res,
                                _ => {
                                    std::mem::forget(ctx);
                                    -i64::from(libc::ETIME)
                                }
                            }
                        }
                        Ok(_) => -i64::from(libc::EAGAIN),
                        Err(e) => -i64::from(e.raw_os_error().unwrap_or(libc::EIO)),
                    }
                }
                _ => {
                    let Ok(mut ring) = IoUring::new(2) else {
                        return 4;
                    };
                    let e = opcode::Write::new(types::Fd(fd), buf.ptr(), bs as u32)
                        .offset(off)
                        .build();
                    // SAFETY: `buf` outlives the request (the ring is forgotten if it does not
                    // complete).
                    if unsafe { ring.submission().push(&e) }.is_err() {
                        return 5;
                    }
                    let ts = types::Timespec::from(left);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    let _ = ring.submitter().submit_with_args(1, &args);
                    let r = ring.completion().next().map(|c| i64::from(c.result()));
                    match r {
                        Some(r) => r,
                        None => {
                            std::mem::forget(ring);
                            -i64::from(libc::ETIME)
                        }
                    }
                }
            };
            if res == bs as i64 {
                sh.set(3 * stage, start.elapsed().as_millis() as i64);
                break;
            }
            sh.set(3 * stage + 2, if res < 0 { res } else { res + 1_000_000 });
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    sh.set(9, 4);
    0
}

/// Phase 3, parent side.
fn recovery(o: &AbandonOpts, file: &File) -> Result<bool, String> {
    let fd = file.as_raw_fd();
    let mut buf = AlignedBuf::new(o.bs)?;
    buf.fill_pattern(0xab4d, o.base);
    let sh = Shared::new(11)?;
    let window_ms = 2 * o.timeout_ms;
    let mut child = fork(|| recovery_child(o, fd, &buf, &sh))?;
    let stage_limit = (window_ms + o.slack.as_millis() as u64) as i64;
    let mut wedged = None;
    loop {
        if child.try_wait().is_some() {
            break;
        }
        let stage = sh.get(9);
        if stage >= 1 && now_ms() - sh.get(10) > stage_limit {
            wedged = Some(stage);
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if wedged.is_some() && child.kill(Duration::from_secs(2)).is_none() {
        println!("abandon recovery: the writer did not die within 2 s of SIGKILL");
    }
    let names = ["sync pwrite", "libaio write", "io_uring write"];
    let mut all = true;
    for (k, name) in names.iter().enumerate() {
        let ms = sh.get(3 * k);
        let attempts = sh.get(3 * k + 1);
        let last = sh.get(3 * k + 2);
        let last = match last {
            0 => String::new(),
            l if l < 0 => format!("; last error {}", errno_name((-l) as i32)),
            l => format!("; last short count {}", l - 1_000_000),
        };
        let stage = k as i64 + 1;
        let ok = ms >= 0 && attempts > 0 && ms as u64 <= window_ms;
        let detail = if attempts == 0 {
            "not reached".to_string()
        } else if wedged == Some(stage) {
            format!(
                "no completion within {window_ms} ms, still blocked after {stage_limit} ms \
                 ({attempts} attempt(s){last}): the queue is wedged"
            )
        } else if ok {
            format!("completed {ms} ms after it started ({attempts} attempt(s){last}; limit {window_ms} ms)")
        } else {
            format!("did not complete within {window_ms} ms ({attempts} attempt(s){last})")
        };
        all &= line(&format!("recovery {name}"), ok, &detail);
    }
    Ok(all)
}

/// Run the scenario; returns whether it passed.
pub fn run(o: &AbandonOpts) -> Result<bool, String> {
    let file = open_dev(&o.dev, 0)?;
    let fd = file.as_raw_fd();
    let start = info(fd)?;
    let span = (o.sync + o.cancel + o.exit + o.uring + 2 * o.batch) * o.bs;
    if o.base + span as u64 > start.capacity {
        return Err(format!(
            "--base {} + {span} bytes passes the capacity {}",
            o.base, start.capacity
        ));
    }
    let fit = o.ring / (o.bs.div_ceil(4096).min(start.max_segments as usize) + 2);
    println!(
        "abandon: timeout_ms {}, {} B requests, about {fit} fit in a ring of {}; \
         abandoning {} uring (exit), {} sync (SIGKILL), {} libaio (io_cancel), {} libaio (exit)",
        o.timeout_ms, o.bs, o.ring, o.uring, o.sync, o.cancel, o.exit
    );
    let mut all = uring_exit(o, &file)?;

    let before = info(fd)?;
    let t_gone = Instant::now();
    let g = gone(o, &file)?;
    let total: usize = g.on_device.iter().sum();
    let blocked: usize = g.blocked.iter().sum();
    let parts: Vec<String> = (0..3)
        .map(|k| {
            let b = if g.blocked[k] > 0 {
                format!(" ({} blocked)", g.blocked[k])
            } else {
                String::new()
            };
            format!("{} {}{b}", g.on_device[k], KINDS[k])
        })
        .collect();
    let mid = info(fd)?;
    // The ring must have been full: a submission could not reach the device.
    let filled = blocked > 0;
    let mut detail = format!(
        "{total} abandoned on the device in {} ms: {}; io_cancel: {} cancelling, {} refused, {} other; \
         their events: {} -ECANCELED, {} other; driver: {}",
        t_gone.elapsed().as_millis(),
        parts.join(", "),
        g.cancel_calls[0],
        g.cancel_calls[1],
        g.cancel_calls[2],
        g.cancel_events[0],
        g.cancel_events[1],
        delta(&before, &mid)
    );
    for n in &g.notes {
        detail += &format!("; {n}");
    }
    if !filled {
        detail += &format!(
            "; the ring never filled (every submission reached the device; about {fit} fit)"
        );
    }
    all &= line("gone", filled, &detail);

    let t1 = Instant::now();
    all &= recovery(o, &file)?;
    let end = info(fd)?;
    let stats_ok = end.timeouts > before.timeouts && end.resets > before.resets;
    all &= line(
        "stats",
        stats_ok,
        &format!(
            "since the abandoning began: {}; totals: timeouts {}, resets {}, cancels {} \
             (recovery phase {} ms)",
            delta(&before, &end),
            end.timeouts,
            end.resets,
            end.cancels,
            t1.elapsed().as_millis()
        ),
    );
    println!("abandon: {}", if all { "PASS" } else { "FAIL" });
    Ok(all)
}
