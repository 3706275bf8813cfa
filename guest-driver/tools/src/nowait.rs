//! `aiodma-aio nowait`: io_uring reads and writes with `RWF_NOWAIT` at a fixed queue depth for
//! a bounded time, meant to run while the kernel injects allocation failures into this process
//! (failslab / fail_page_alloc with `task-filter`; `--make-it-fail` marks the process after its
//! set-up, so the set-up itself is not hit).
//!
//! Errors are allowed and counted (`EAGAIN`, `ENOMEM`, `EIO`, `EINTR`, `ECANCELED`,
//! `ETIMEDOUT`): the point is what must not happen:
//! - a hang: requests outstanding and no completion for `--stall` seconds;
//! - a lost completion (still outstanding after the drain) or a duplicate one;
//! - a partial count, or data that differs: the area is filled with a seeded pattern first and
//!   every write writes the same pattern back, so every successful read must see it, and the
//!   area must still hold it at the end.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::util::{errno_name, open_dev, AlignedBuf, Rng};

/// What `nowait` was asked to do.
#[derive(Debug, Clone)]
pub struct NowaitOpts {
    /// Device path.
    pub dev: String,
    /// Requests in flight.
    pub qd: usize,
    /// Bytes per request.
    pub bs: usize,
    /// How long to submit.
    pub secs: Duration,
    /// Device area used.
    pub span: u64,
    /// Its offset.
    pub base: u64,
    /// Longest time without a completion while requests are outstanding.
    pub stall: Duration,
    /// Percentage of writes.
    pub write_pct: u64,
    /// Write 1 to /proc/self/make-it-fail after the set-up (0 again before the final check).
    pub make_it_fail: bool,
    /// Pattern seed.
    pub seed: u64,
}

/// Mark (or unmark) this process for fault injection. Unmarking is itself a write that an
/// injected allocation failure can fail, so it is retried.
fn set_make_it_fail(on: bool) -> Result<(), String> {
    let mut tries = 0;
    loop {
        match std::fs::write("/proc/self/make-it-fail", if on { "1" } else { "0" }) {
            Ok(()) => return Ok(()),
            Err(_) if !on && tries < 10_000 => tries += 1,
            Err(e) => {
                return Err(format!(
                    "/proc/self/make-it-fail: {e} (kernel without CONFIG_FAULT_INJECTION?)"
                ))
            }
        }
    }
}

/// Allowed error results, in the order they are reported.
const ALLOWED: [i32; 6] = [
    libc::EAGAIN,
    libc::ENOMEM,
    libc::EIO,
    libc::EINTR,
    libc::ECANCELED,
    libc::ETIMEDOUT,
];

#[derive(Debug, Default)]
struct Tally {
    submitted: u64,
    ok: u64,
    allowed: [u64; ALLOWED.len()],
    /// Unexpected results: (result, count).
    unexpected: Vec<(i32, u64)>,
    short: u64,
    bad_data: u64,
    duplicates: u64,
    /// io_uring_enter errors by errno.
    enter_errors: Vec<(i32, u64)>,
    longest_gap: Duration,
}

fn bump(v: &mut Vec<(i32, u64)>, key: i32) {
    match v.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => v.push((key, 1)),
    }
}

fn fill_area(fd: RawFd, o: &NowaitOpts) -> Result<(), String> {
    let chunk = 1 << 20;
    let mut buf = AlignedBuf::new(chunk)?;
    let mut off = 0;
    while off < o.span {
        let n = chunk.min((o.span - off) as usize);
        buf.fill_pattern(o.seed, o.base + off);
        // SAFETY: `buf` holds at least `n` readable bytes.
        let r = unsafe { libc::pwrite(fd, buf.ptr().cast(), n, (o.base + off) as i64) };
        if r != n as isize {
            return Err(format!(
                "filling the area: pwrite at {} returned {r} ({})",
                o.base + off,
                std::io::Error::last_os_error()
            ));
        }
        off += n as u64;
    }
    Ok(())
}

fn check_area(fd: RawFd, o: &NowaitOpts) -> Result<Option<String>, String> {
    let chunk = 1 << 20;
    let buf = AlignedBuf::new(chunk)?;
    let mut off = 0;
    while off < o.span {
        let n = chunk.min((o.span - off) as usize);
        // SAFETY: `buf` holds at least `n` writable bytes.
        let r = unsafe { libc::pread(fd, buf.ptr().cast(), n, (o.base + off) as i64) };
        if r != n as isize {
            return Ok(Some(format!(
                "read at {} returned {r} ({})",
                o.base + off,
                std::io::Error::last_os_error()
            )));
        }
        if let Some(k) = buf.pattern_mismatch(n, o.seed, o.base + off) {
            return Ok(Some(format!(
                "byte {} differs from the pattern",
                o.base + off + k as u64
            )));
        }
        off += n as u64;
    }
    Ok(None)
}

/// Run it; returns whether it passed.
pub fn run(o: &NowaitOpts) -> Result<bool, String> {
    use io_uring::{opcode, types, IoUring};
    let file = open_dev(&o.dev, 0)?;
    let fd = file.as_raw_fd();
    let blocks = o.span / o.bs as u64;
    if blocks == 0 {
        return Err("--span is smaller than --bs".into());
    }
    fill_area(fd, o)?;
    // Everything the loop touches exists before the faults start: buffers (touched), the ring,
    // the bookkeeping.
    let mut bufs: Vec<AlignedBuf> = Vec::with_capacity(o.qd);
    for _ in 0..o.qd {
        let mut b = AlignedBuf::new(o.bs)?;
        b.bytes_mut().fill(1);
        bufs.push(b);
    }
    let mut ring = IoUring::new((2 * o.qd).next_power_of_two() as u32)
        .map_err(|e| format!("io_uring_setup: {e}"))?;
    // Per slot: outstanding?, generation, offset, is-write.
    let mut busy = vec![false; o.qd];
    let mut gen = vec![0u32; o.qd];
    let mut offs = vec![0u64; o.qd];
    let mut writes = vec![false; o.qd];
    let mut t = Tally {
        unexpected: Vec::with_capacity(16),
        enter_errors: Vec::with_capacity(16),
        ..Default::default()
    };
    let mut rng = Rng(o.seed);
    let mut stall_at: Option<usize> = None;
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(4 * o.qd);
    // SAFETY: locking our pages in is harmless; a failure (limits) only means they may fault.
    unsafe { libc::mlockall(libc::MCL_CURRENT) };
    if o.make_it_fail {
        set_make_it_fail(true)?;
    }
    let started = Instant::now();
    let mut last_cqe = Instant::now();
    let mut outstanding = 0usize;
    loop {
        let submitting = started.elapsed() < o.secs;
        if !submitting && outstanding == 0 {
            break;
        }
        if submitting {
            for slot in 0..o.qd {
                if busy[slot] {
                    continue;
                }
                let write = rng.below(100) < o.write_pct;
                let off = o.base + rng.below(blocks) * o.bs as u64;
                gen[slot] = gen[slot].wrapping_add(1);
                let ud = u64::from(gen[slot]) << 32 | slot as u64;
                let b = &mut bufs[slot];
                let sqe = if write {
                    b.fill_pattern(o.seed, off);
                    opcode::Write::new(types::Fd(fd), b.ptr(), o.bs as u32)
                        .offset(off)
                        .rw_flags(libc::RWF_NOWAIT)
                        .build()
                } else {
                    opcode::Read::new(types::Fd(fd), b.ptr(), o.bs as u32)
                        .offset(off)
                        .rw_flags(libc::RWF_NOWAIT)
                        .build()
                };
                // SAFETY: the buffer is not touched again until this slot's CQE arrives.
                if unsafe { ring.submission().push(&sqe.user_data(ud)) }.is_err() {
                    break;
                }
                busy[slot] = true;
                offs[slot] = off;
                writes[slot] = write;
                outstanding += 1;
                t.submitted += 1;
            }
        }
        let ts = types::Timespec::new().nsec(50_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) => match e.raw_os_error() {
                Some(libc::ETIME) => {}
                Some(x) => {
                    bump(&mut t.enter_errors, x);
                    std::thread::sleep(Duration::from_millis(1));
                }
                None => bump(&mut t.enter_errors, -1),
            },
        }
        cqes.clear();
        cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        if cqes.is_empty() {
            let gap = last_cqe.elapsed();
            t.longest_gap = t.longest_gap.max(gap);
            if outstanding > 0 && gap > o.stall {
                stall_at = Some(outstanding);
                break;
            }
            continue;
        }
        t.longest_gap = t.longest_gap.max(last_cqe.elapsed());
        last_cqe = Instant::now();
        for &(ud, res) in &cqes {
            let slot = (ud & 0xffff_ffff) as usize;
            if slot >= o.qd || !busy[slot] || (ud >> 32) as u32 != gen[slot] {
                t.duplicates += 1;
                continue;
            }
            busy[slot] = false;
            outstanding -= 1;
            if res == o.bs as i32 {
                t.ok += 1;
                if !writes[slot]
                    && bufs[slot]
                        .pattern_mismatch(o.bs, o.seed, offs[slot])
                        .is_some()
                {
                    t.bad_data += 1;
                }
            } else if res >= 0 {
                t.short += 1;
            } else if let Some(i) = ALLOWED.iter().position(|&e| e == -res) {
                t.allowed[i] += 1;
            } else {
                bump(&mut t.unexpected, -res);
            }
        }
    }
    let elapsed = started.elapsed();
    if o.make_it_fail {
        set_make_it_fail(false)?;
    }
    let errs: Vec<String> = ALLOWED
        .iter()
        .zip(t.allowed.iter())
        .filter(|(_, &n)| n > 0)
        .map(|(&e, n)| format!("{} x{n}", errno_name(e)))
        .collect();
    let show = |v: &[(i32, u64)]| {
        v.iter()
            .map(|(e, n)| format!("{} x{n}", errno_name(*e)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "nowait: qd {} bs {} for {} ms{}: {} submitted, {} ok, errors [{}], unexpected [{}], \
         short {}, bad data {}, duplicates {}, io_uring_enter errors [{}], longest wait for a \
         completion {} ms",
        o.qd,
        o.bs,
        elapsed.as_millis(),
        if o.make_it_fail {
            " (make-it-fail)"
        } else {
            ""
        },
        t.submitted,
        t.ok,
        errs.join(", "),
        show(&t.unexpected),
        t.short,
        t.bad_data,
        t.duplicates,
        show(&t.enter_errors),
        t.longest_gap.as_millis()
    );
    let mut ok = true;
    let mut fail = |what: String| {
        println!("nowait: FAIL: {what}");
        ok = false;
    };
    if let Some(n) = stall_at {
        fail(format!(
            "HANG: {n} request(s) outstanding and no completion for {} ms",
            o.stall.as_millis()
        ));
    }
    if t.duplicates > 0 {
        fail(format!("{} duplicate or stray completion(s)", t.duplicates));
    }
    if !t.unexpected.is_empty() {
        fail(format!("unexpected results: {}", show(&t.unexpected)));
    }
    if t.short > 0 {
        fail(format!("{} partial transfer(s)", t.short));
    }
    if t.bad_data > 0 {
        fail(format!("{} read(s) returned data that differs", t.bad_data));
    }
    if t.ok == 0 {
        fail("no request succeeded".into());
    }
    if stall_at.is_none() {
        match check_area(fd, o)? {
            None => println!("nowait: the area still holds the pattern"),
            Some(p) => fail(format!("after the run: {p}")),
        }
    } else {
        // The ring still owns buffers the device may write: keep them (and it) alive.
        std::mem::forget(ring);
        std::mem::forget(bufs);
    }
    println!("nowait: {}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}
