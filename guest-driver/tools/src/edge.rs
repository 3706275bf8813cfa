//! `aiodma-aio edge`: the file-semantics contract of `/dev/aiodmaN`, one PASS/FAIL line per
//! check and a total.
//!
//! The device behaves like a fixed-size file of `capacity` bytes (the size a block device
//! would have): reads at or after the end return 0, transfers crossing the end are shortened
//! to it, writes starting at or after it fail with `ENOSPC`, `lseek` works against the
//! capacity, bad buffers (unmapped, inaccessible, read-only for a read) give `EFAULT`,
//! zero-length transfers return 0, short transfers report exactly what moved, `O_DIRECT` opens
//! and round-trips, `fsync`/`fdatasync` succeed, and `RWF_NOWAIT` either transfers or gives
//! `EAGAIN` (never sleeping for ring space). Each check runs on its own thread with a time
//! limit, so a driver that blocks shows up as a FAIL line.
//!
//! The checks overwrite the last 4 KiB of the device and data from 1 MiB to 4 MiB.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aio;
use crate::util::{bounded, device_info, errno_name, open_dev, res_name, sys_result, AlignedBuf};

/// Seed of the patterns the checks write.
const SEED: u64 = 0xed6e;
/// How long one check may take before it counts as blocked.
const LIMIT: Duration = Duration::from_secs(15);

/// What `edge` was asked to do.
#[derive(Debug, Clone)]
pub struct EdgeOpts {
    /// Device path.
    pub dev: String,
    /// Also require `EAGAIN` from `RWF_NOWAIT` while the queue is saturated (needs a delay
    /// fault so requests stay in flight).
    pub expect_eagain: bool,
}

type CheckResult = Result<String, String>;

struct Checks {
    passed: u32,
    failed: u32,
}

impl Checks {
    fn run<F>(&mut self, name: &str, f: F)
    where
        F: FnOnce() -> CheckResult + Send + 'static,
    {
        let (ok, detail) = match bounded(LIMIT, f) {
            Some(Ok(d)) => (true, d),
            Some(Err(d)) => (false, d),
            None => (
                false,
                format!("blocked for more than {} s", LIMIT.as_secs()),
            ),
        };
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        println!("{} {name:<22} {detail}", if ok { "PASS" } else { "FAIL" });
    }
}

fn pread(fd: RawFd, buf: *mut u8, len: usize, off: u64) -> Result<i64, i32> {
    // SAFETY: callers pass a pointer to `len` writable bytes, or a deliberately bad pointer
    // the kernel must reject without touching our memory.
    sys_result(unsafe { libc::pread(fd, buf.cast(), len, off as i64) } as i64)
}

fn pwrite(fd: RawFd, buf: *const u8, len: usize, off: u64) -> Result<i64, i32> {
    // SAFETY: callers pass a pointer to `len` readable bytes, or a deliberately bad pointer.
    sys_result(unsafe { libc::pwrite(fd, buf.cast(), len, off as i64) } as i64)
}

fn lseek(fd: RawFd, off: i64, whence: i32) -> Result<i64, i32> {
    // SAFETY: plain syscall on our descriptor.
    sys_result(unsafe { libc::lseek(fd, off, whence) })
}

/// `preadv2`/`pwritev2` with `flags`, through the raw syscalls (one iovec).
fn rw2(fd: RawFd, write: bool, buf: *mut u8, len: usize, off: u64, flags: i32) -> Result<i64, i32> {
    let iov = libc::iovec {
        iov_base: buf.cast(),
        iov_len: len,
    };
    let nr = if write {
        libc::SYS_pwritev2
    } else {
        libc::SYS_preadv2
    };
    // SAFETY: `iov` describes `len` bytes at `buf` that live across the call; pos_h is 0 on
    // x86_64.
    sys_result(unsafe {
        libc::syscall(
            nr,
            fd,
            &iov as *const libc::iovec,
            1 as libc::c_long,
            off as libc::c_long,
            0 as libc::c_long,
            flags as libc::c_long,
        )
    })
}

fn show(r: Result<i64, i32>) -> String {
    match r {
        Ok(v) => v.to_string(),
        Err(e) => format!("-1 {}", errno_name(e)),
    }
}

/// One libaio request, waited for at most `LIMIT`: the event's result, or `-errno` when
/// `io_submit` refused it.
fn aio_one(fd: RawFd, opcode: u16, buf: *mut u8, len: usize, off: u64) -> Result<i64, String> {
    let ctx = aio::Context::new(1).map_err(|e| format!("io_setup: {e}"))?;
    let mut iocb = aio::Context::iocb(fd, opcode, buf as u64, len as u64, off as i64, 7);
    let mut ptrs = [&mut iocb as *mut aio::Iocb];
    // SAFETY: the buffer outlives `ctx`, whose drop waits for the request.
    match unsafe { ctx.submit(&mut ptrs) } {
        Ok(1) => {}
        Ok(n) => return Err(format!("io_submit queued {n} of 1")),
        Err(e) => return Ok(-i64::from(e.raw_os_error().unwrap_or(0))),
    }
    let mut ev = [aio::IoEvent::default()];
    match ctx.get_events(1, &mut ev, Some(LIMIT)) {
        Ok(1) => Ok(ev[0].res),
        Ok(_) => Err("no completion event".into()),
        Err(e) => Err(format!("io_getevents: {e}")),
    }
}

/// One io_uring read or write: the CQE's result.
fn uring_one(fd: RawFd, write: bool, buf: *mut u8, len: usize, off: u64) -> Result<i64, String> {
    use io_uring::{opcode, types, IoUring};
    let mut ring = IoUring::new(2).map_err(|e| format!("io_uring_setup: {e}"))?;
    let sqe = if write {
        opcode::Write::new(types::Fd(fd), buf, len as u32)
            .offset(off)
            .build()
    } else {
        opcode::Read::new(types::Fd(fd), buf, len as u32)
            .offset(off)
            .build()
    };
    // SAFETY: the buffer outlives the ring (dropping the ring waits for the request).
    unsafe { ring.submission().push(&sqe.user_data(7)) }.map_err(|_| "SQ full".to_string())?;
    let ts = types::Timespec::from(LIMIT);
    let args = types::SubmitArgs::new().timespec(&ts);
    ring.submitter()
        .submit_with_args(1, &args)
        .map_err(|e| format!("io_uring_enter: {e}"))?;
    let cqe = ring.completion().next().ok_or("no CQE")?;
    Ok(i64::from(cqe.result()))
}

/// An address with nothing mapped (a page mapped and unmapped again).
fn unmapped_addr() -> Result<usize, String> {
    // SAFETY: a fresh anonymous mapping, unmapped right away; only its address is kept.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        libc::munmap(p, 8192);
        Ok(p as usize)
    }
}

/// An anonymous private mapping with the given protection, unmapped on drop.
struct Mapping(*mut libc::c_void, usize);

impl Mapping {
    fn new(len: usize, prot: i32) -> Result<Self, String> {
        // SAFETY: a fresh anonymous mapping owned by the returned value.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Self(p, len))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our mapping; the requests using it have finished (their helpers wait).
        unsafe { libc::munmap(self.0, self.1) };
    }
}

fn expect_val(what: &str, got: Result<i64, i32>, want: i64) -> CheckResult {
    match got {
        Ok(v) if v == want => Ok(format!("{what} = {v}")),
        other => Err(format!("{what} = {} (expected {want})", show(other))),
    }
}

fn expect_errno(what: &str, got: Result<i64, i32>, want: i32) -> CheckResult {
    match got {
        Err(e) if e == want => Ok(format!("{what} = -1 {}", errno_name(e))),
        other => Err(format!(
            "{what} = {} (expected -1 {})",
            show(other),
            errno_name(want)
        )),
    }
}

/// Write `len` pattern bytes at `off` in full (looping over short writes).
fn write_pattern(fd: RawFd, off: u64, len: usize) -> Result<(), String> {
    let mut buf = AlignedBuf::new(len)?;
    buf.fill_pattern(SEED, off);
    let mut done = 0usize;
    while done < len {
        // SAFETY: in bounds of `buf`.
        let p = unsafe { buf.ptr().add(done) };
        match pwrite(fd, p, len - done, off + done as u64) {
            Ok(n) if n > 0 => done += n as usize,
            other => {
                return Err(format!(
                    "preparing: pwrite {} @ {} = {}",
                    len - done,
                    off + done as u64,
                    show(other)
                ))
            }
        }
    }
    Ok(())
}

/// Transfer all of `buf` at `off`, continuing after short transfers; returns the calls made.
fn full_io(fd: RawFd, write: bool, buf: &AlignedBuf, off: u64) -> Result<usize, String> {
    let (mut done, mut calls) = (0usize, 0usize);
    while done < buf.len() {
        // SAFETY: in bounds of `buf`.
        let p = unsafe { buf.ptr().add(done) };
        let left = buf.len() - done;
        let at = off + done as u64;
        let r = if write {
            pwrite(fd, p, left, at)
        } else {
            pread(fd, p, left, at)
        };
        calls += 1;
        match r {
            Ok(n) if n > 0 => done += n as usize,
            other => {
                let op = if write { "pwrite" } else { "pread" };
                return Err(format!("{op} {left} @ {at} = {}", show(other)));
            }
        }
    }
    Ok(calls)
}

/// Run every check; prints the lines and returns whether all passed.
pub fn run(o: &EdgeOpts) -> Result<bool, String> {
    let file = open_dev(&o.dev, 0)?;
    let fd = file.as_raw_fd();
    let info = device_info(fd)?;
    let cap = info.capacity;
    if cap < 4 << 20 {
        return Err(format!(
            "capacity {cap} is too small for the checks (at least 4 MiB)"
        ));
    }
    let max_transfer = u64::from(info.max_transfer).max(4096);
    println!(
        "edge: {} capacity={cap} max_transfer={} max_segments={}",
        o.dev, info.max_transfer, info.max_segments
    );
    let mut c = Checks {
        passed: 0,
        failed: 0,
    };

    c.run("info-capacity", move || {
        let end = lseek(fd, 0, libc::SEEK_END).map_err(|e| format!("lseek: {}", errno_name(e)))?;
        if end as u64 == cap {
            Ok(format!("INFO capacity {cap} = SEEK_END {end}"))
        } else {
            Err(format!("INFO capacity {cap} != SEEK_END {end}"))
        }
    });

    // Reads at and after the end.
    c.run("read-at-eof", move || {
        let mut b = AlignedBuf::new(4096)?;
        expect_val("pread 4096 @ capacity", pread(fd, b.ptr(), 4096, cap), 0)?;
        b.bytes_mut()[0] = 0;
        expect_val(
            "pread 4096 @ capacity+4096",
            pread(fd, b.ptr(), 4096, cap + 4096),
            0,
        )?;
        expect_val("pread 1 @ capacity", pread(fd, b.ptr(), 1, cap), 0)
            .map(|_| "pread @ capacity, capacity+4096 = 0".to_string())
    });
    c.run("read-at-eof-async", move || {
        let b = AlignedBuf::new(4096)?;
        let a = aio_one(fd, aio::CMD_PREAD, b.ptr(), 4096, cap)?;
        let u = uring_one(fd, false, b.ptr(), 4096, cap + 4096)?;
        if a == 0 && u == 0 {
            Ok("libaio @ capacity = 0, io_uring @ capacity+4096 = 0".into())
        } else {
            Err(format!(
                "libaio @ capacity = {}, io_uring @ capacity+4096 = {} (expected 0, 0)",
                res_name(a),
                res_name(u)
            ))
        }
    });

    // Transfers crossing the end are shortened to it.
    c.run("write-crossing-end", move || {
        let off = cap - 4096;
        let mut b = AlignedBuf::new(8192)?;
        b.fill_pattern(SEED, off);
        expect_val(
            "pwrite 8192 @ capacity-4096",
            pwrite(fd, b.ptr(), 8192, off),
            4096,
        )
    });
    c.run("read-crossing-end", move || {
        let off = cap - 4096;
        let b = AlignedBuf::new(8192)?;
        let what = expect_val(
            "pread 8192 @ capacity-4096",
            pread(fd, b.ptr(), 8192, off),
            4096,
        )?;
        match b.pattern_mismatch(4096, SEED, off) {
            None => Ok(format!("{what}, data matches")),
            Some(k) => Err(format!(
                "{what}, but byte {k} differs from what was written"
            )),
        }
    });
    c.run("read-crossing-end-aio", move || {
        let off = cap - 4096;
        let b = AlignedBuf::new(8192)?;
        let res = aio_one(fd, aio::CMD_PREAD, b.ptr(), 8192, off)?;
        if res != 4096 {
            return Err(format!(
                "libaio pread 8192 @ capacity-4096 = {} (expected 4096)",
                res_name(res)
            ));
        }
        match b.pattern_mismatch(4096, SEED, off) {
            None => Ok("libaio pread 8192 @ capacity-4096 = 4096, data matches".into()),
            Some(k) => Err(format!("libaio read of the last page: byte {k} differs")),
        }
    });

    // Writes at or after the end.
    c.run("write-at-end", move || {
        let b = AlignedBuf::new(4096)?;
        expect_errno(
            "pwrite 4096 @ capacity",
            pwrite(fd, b.ptr(), 4096, cap),
            libc::ENOSPC,
        )?;
        expect_errno(
            "pwrite 4096 @ capacity+4096",
            pwrite(fd, b.ptr(), 4096, cap + 4096),
            libc::ENOSPC,
        )
        .map(|_| "pwrite @ capacity, capacity+4096 = -1 ENOSPC".to_string())
    });
    c.run("write-at-end-async", move || {
        let b = AlignedBuf::new(4096)?;
        let a = aio_one(fd, aio::CMD_PWRITE, b.ptr(), 4096, cap)?;
        let u = uring_one(fd, true, b.ptr(), 4096, cap)?;
        let want = -i64::from(libc::ENOSPC);
        if a == want && u == want {
            Ok("libaio and io_uring write @ capacity = -ENOSPC".into())
        } else {
            Err(format!(
                "libaio = {}, io_uring = {} (expected -ENOSPC)",
                res_name(a),
                res_name(u)
            ))
        }
    });

    // Bad buffers.
    c.run("efault", move || {
        let bad = unmapped_addr()?;
        let r = expect_errno(
            "pread 4096 into an unmapped page",
            pread(fd, bad as *mut u8, 4096, 0),
            libc::EFAULT,
        )?;
        let w = expect_errno(
            "pwrite 4096 from an unmapped page",
            pwrite(fd, bad as *const u8, 4096, 0),
            libc::EFAULT,
        )?;
        Ok(format!("{r}; {w}"))
    });

    c.run("efault-async", move || {
        // An inaccessible page rather than an unmapped address: the io_uring set-up maps
        // memory of its own, which could land on a freshly unmapped address.
        let bad = Mapping::new(4096, libc::PROT_NONE)?;
        let a = aio_one(fd, aio::CMD_PREAD, bad.0.cast(), 4096, 0)?;
        let u = uring_one(fd, true, bad.0.cast(), 4096, 0)?;
        let want = -i64::from(libc::EFAULT);
        if a == want && u == want {
            Ok("libaio read into / io_uring write from a PROT_NONE page = -EFAULT".into())
        } else {
            Err(format!(
                "libaio read = {}, io_uring write = {} (expected -EFAULT)",
                res_name(a),
                res_name(u)
            ))
        }
    });
    c.run("efault-readonly", move || {
        // A read must not let the device write into memory the caller may not write.
        let ro = Mapping::new(4096, libc::PROT_READ)?;
        let r = pread(fd, ro.0.cast(), 4096, 0);
        let a = aio_one(fd, aio::CMD_PREAD, ro.0.cast(), 4096, 0)?;
        match (r, a) {
            (Err(libc::EFAULT), -14) => {
                Ok("pread and libaio read into a PROT_READ page = EFAULT".into())
            }
            (r, a) => Err(format!(
                "pread into a PROT_READ page = {}, libaio = {} (expected EFAULT)",
                show(r),
                res_name(a)
            )),
        }
    });
    c.run("many-segments", move || {
        // 300 iovecs of 512 bytes, each in its own page: more segments than one device
        // request takes; the transfer may end short but what it reports must be right.
        let off = 3 << 20;
        let n = 300usize;
        write_pattern(fd, off, n * 512)?;
        let b = AlignedBuf::new(n * 4096)?;
        let iov: Vec<libc::iovec> = (0..n)
            .map(|i| libc::iovec {
                // SAFETY: inside `b` (page i, first 512 bytes).
                iov_base: unsafe { b.ptr().add(i * 4096 + 1024) }.cast(),
                iov_len: 512,
            })
            .collect();
        // SAFETY: every iovec points into `b`, alive across the call.
        let got =
            sys_result(unsafe { libc::preadv(fd, iov.as_ptr(), n as i32, off as i64) } as i64)
                .map_err(|e| format!("preadv of {n} iovecs = -1 {}", errno_name(e)))?;
        if got <= 0 || got as usize > n * 512 {
            return Err(format!("preadv of {n} x 512 bytes = {got}"));
        }
        for i in 0..(got as usize).div_ceil(512) {
            let len = (got as usize - i * 512).min(512);
            let seg = &b.bytes()[i * 4096 + 1024..i * 4096 + 1024 + len];
            let base = off + (i * 512) as u64;
            if let Some(k) = seg
                .iter()
                .enumerate()
                .position(|(k, x)| *x != crate::util::pattern(SEED, base + k as u64))
            {
                return Err(format!("preadv = {got}, iovec {i} byte {k} differs"));
            }
        }
        Ok(format!(
            "preadv of {n} iovecs x 512 bytes = {got}, data matches"
        ))
    });

    // Zero-length transfers.
    c.run("zero-length", move || {
        let b = AlignedBuf::new(4096)?;
        let mut parts = Vec::new();
        for off in [0, cap / 2] {
            parts.push(expect_val(
                &format!("pread 0 @ {off}"),
                pread(fd, b.ptr(), 0, off),
                0,
            )?);
            parts.push(expect_val(
                &format!("pwrite 0 @ {off}"),
                pwrite(fd, b.ptr(), 0, off),
                0,
            )?);
        }
        for (name, op) in [("read", aio::CMD_PREAD), ("write", aio::CMD_PWRITE)] {
            let res = aio_one(fd, op, b.ptr(), 0, 4096)?;
            if res != 0 {
                return Err(format!(
                    "libaio {name} of 0 bytes = {} (expected 0)",
                    res_name(res)
                ));
            }
        }
        Ok("pread/pwrite/libaio of 0 bytes = 0".into())
    });

    // lseek against the capacity, and the file position of read(2)/write(2).
    c.run("lseek", move || {
        let cap_i = cap as i64;
        let steps: [(&str, i64, i32, Result<i64, i32>); 6] = [
            ("SEEK_SET 4096", 4096, libc::SEEK_SET, Ok(4096)),
            ("SEEK_CUR +4096", 4096, libc::SEEK_CUR, Ok(8192)),
            ("SEEK_CUR -8192", -8192, libc::SEEK_CUR, Ok(0)),
            ("SEEK_END 0", 0, libc::SEEK_END, Ok(cap_i)),
            ("SEEK_END -4096", -4096, libc::SEEK_END, Ok(cap_i - 4096)),
            ("SEEK_SET -1", -1, libc::SEEK_SET, Err(libc::EINVAL)),
        ];
        for (what, off, whence, want) in steps {
            let got = lseek(fd, off, whence);
            if got != want {
                return Err(format!(
                    "lseek {what} = {} (expected {})",
                    show(got),
                    show(want)
                ));
            }
        }
        Ok("SEEK_SET/SEEK_CUR/SEEK_END land where expected, SEEK_END at capacity".into())
    });
    c.run("file-position", move || {
        let mut b = AlignedBuf::new(4096)?;
        b.fill_pattern(SEED, 2 << 20);
        let at = |what: &str, want: i64| -> CheckResult {
            expect_val(what, lseek(fd, 0, libc::SEEK_CUR), want)
        };
        lseek(fd, 2 << 20, libc::SEEK_SET).map_err(|e| format!("lseek: {}", errno_name(e)))?;
        // SAFETY: `b` holds 4096 readable bytes.
        let w = sys_result(unsafe { libc::write(fd, b.ptr().cast(), 4096) } as i64);
        expect_val("write 4096", w, 4096)?;
        at("position after write", (2 << 20) + 4096)?;
        lseek(fd, 2 << 20, libc::SEEK_SET).map_err(|e| format!("lseek: {}", errno_name(e)))?;
        b.bytes_mut().fill(0);
        // SAFETY: `b` holds 4096 writable bytes.
        let r = sys_result(unsafe { libc::read(fd, b.ptr().cast(), 4096) } as i64);
        expect_val("read 4096", r, 4096)?;
        at("position after read", (2 << 20) + 4096)?;
        if let Some(k) = b.pattern_mismatch(4096, SEED, 2 << 20) {
            return Err(format!("read(2) after write(2): byte {k} differs"));
        }
        lseek(fd, 0, libc::SEEK_END).map_err(|e| format!("lseek: {}", errno_name(e)))?;
        // SAFETY: as above.
        let r = sys_result(unsafe { libc::read(fd, b.ptr().cast(), 4096) } as i64);
        expect_val("read at SEEK_END", r, 0)?;
        Ok("read(2)/write(2) advance the position; read at SEEK_END = 0".into())
    });

    // Transfers larger than one device request.
    c.run("large-transfer", move || {
        let len = (2 * max_transfer).min(8 << 20) as usize;
        let off = 1 << 20;
        write_pattern(fd, off, len)?;
        let b = AlignedBuf::new(len)?;
        let n = pread(fd, b.ptr(), len, off)
            .map_err(|e| format!("pread {len} @ {off} = -1 {}", errno_name(e)))?
            as usize;
        if n == 0 || n > len {
            return Err(format!("pread {len} @ {off} = {n}"));
        }
        if let Some(k) = b.pattern_mismatch(n, SEED, off) {
            return Err(format!("pread {len} @ {off} = {n}, byte {k} differs"));
        }
        Ok(if n == len {
            format!("pread {len} (2 x max_transfer) = {n}, data matches")
        } else {
            format!("pread {len} (2 x max_transfer) = {n} (short read, legal for a file: the driver caps one request), data matches")
        })
    });

    c.run("large-async", move || {
        // 4 MiB in one kiocb: more parts than a request may have on the device at once, so
        // the driver sends it in waves from its completion path; the kiocb completes once,
        // with every byte.
        let len = 4usize << 20;
        let off = 8u64 << 20;
        let mut w = AlignedBuf::new(len)?;
        let mut r = AlignedBuf::new(len)?;
        let mut parts = Vec::new();
        for (engine, seed) in [("libaio", SEED ^ 0x1a), ("io_uring", SEED ^ 0x2b)] {
            w.fill_pattern(seed, off);
            r.bytes_mut().fill(0);
            let (wres, rres) = if engine == "libaio" {
                (
                    aio_one(fd, aio::CMD_PWRITE, w.ptr(), len, off)?,
                    aio_one(fd, aio::CMD_PREAD, r.ptr(), len, off)?,
                )
            } else {
                (
                    uring_one(fd, true, w.ptr(), len, off)?,
                    uring_one(fd, false, r.ptr(), len, off)?,
                )
            };
            if wres != len as i64 || rres != len as i64 {
                return Err(format!(
                    "{engine} write/read of {len} bytes = {}/{} (expected {len} each)",
                    res_name(wres),
                    res_name(rres)
                ));
            }
            if let Some(k) = r.pattern_mismatch(len, seed, off) {
                return Err(format!("{engine} {len}-byte read: byte {k} differs"));
            }
            parts.push(engine);
        }
        Ok(format!(
            "one 4 MiB kiocb each way by {}: full length, data matches",
            parts.join(" and ")
        ))
    });

    // O_DIRECT.
    let dev = o.dev.clone();
    c.run("o-direct", move || {
        let f = open_dev(&dev, libc::O_DIRECT)?;
        let dfd = f.as_raw_fd();
        let off = 1 << 20;
        let mut w = AlignedBuf::new(65536)?;
        w.fill_pattern(SEED ^ 0xd1, off);
        let wc = full_io(dfd, true, &w, off)?;
        let r = AlignedBuf::new(65536)?;
        let rc = full_io(dfd, false, &r, off)?;
        let calls = if wc + rc > 2 {
            format!(" (short transfers: {wc} writes, {rc} reads)")
        } else {
            String::new()
        };
        match r.pattern_mismatch(65536, SEED ^ 0xd1, off) {
            None => Ok(format!(
                "open(O_DIRECT) ok; aligned 64 KiB write + read round-trips{calls}"
            )),
            Some(k) => Err(format!("O_DIRECT round trip: byte {k} differs{calls}")),
        }
    });

    c.run("fsync", move || {
        // SAFETY: plain syscalls on our descriptor.
        let s = sys_result(i64::from(unsafe { libc::fsync(fd) }));
        // SAFETY: as above.
        let d = sys_result(i64::from(unsafe { libc::fdatasync(fd) }));
        match (s, d) {
            (Ok(0), Ok(0)) => Ok("fsync = 0, fdatasync = 0".into()),
            (s, d) => Err(format!("fsync = {}, fdatasync = {}", show(s), show(d))),
        }
    });

    c.run("nowait", move || {
        let mut b = AlignedBuf::new(4096)?;
        b.fill_pattern(SEED, 2 << 20);
        let mut parts = Vec::new();
        for (name, write) in [("preadv2", false), ("pwritev2", true)] {
            let t = Instant::now();
            let r = rw2(fd, write, b.ptr(), 4096, 2 << 20, libc::RWF_NOWAIT);
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            match r {
                Ok(4096) | Err(libc::EAGAIN) => {
                    parts.push(format!("{name}(RWF_NOWAIT) = {} in {ms:.1} ms", show(r)))
                }
                other => {
                    return Err(format!(
                        "{name}(RWF_NOWAIT) = {} (expected 4096 or -1 EAGAIN)",
                        show(other)
                    ))
                }
            }
        }
        Ok(parts.join(", "))
    });

    if o.expect_eagain {
        c.run("nowait-saturated", move || saturated_nowait(fd, cap));
    }

    println!("edge: {} passed, {} failed", c.passed, c.failed);
    drop(file);
    Ok(c.failed == 0)
}

/// One submitter of `saturated_nowait`: keeps issuing 4 KiB libaio reads from `cpu` (so into
/// that CPU's queue) until `stop`, blocking in `io_submit` whenever the ring is full; then
/// reaps everything. Returns (submitted, failed).
fn submitter(
    fd: RawFd,
    cap: u64,
    cpu: usize,
    stop: &AtomicBool,
    inflight: &AtomicU64,
) -> Result<(u64, u64), String> {
    const MAX_INFLIGHT: u64 = 2048;
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it for cpu < CPU_SETSIZE, and
    // sched_setaffinity only reads it. Failure (e.g. CPU offline) just leaves us unpinned.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu < libc::CPU_SETSIZE as usize {
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    let ctx = aio::Context::new(MAX_INFLIGHT as u32 * 2).map_err(|e| format!("io_setup: {e}"))?;
    let buf = AlignedBuf::new(4096)?;
    let mut events = vec![aio::IoEvent::default(); 256];
    let (mut submitted, mut errors, mut mine) = (0u64, 0u64, 0u64);
    let slots = cap / 4096;
    let mut reap = |mine: &mut u64, timeout: Duration, min: usize| -> Result<(), String> {
        let got = ctx
            .get_events(min, &mut events, Some(timeout))
            .map_err(|e| format!("io_getevents: {e}"))?;
        for ev in &events[..got] {
            if ev.res != 4096 {
                errors += 1;
            }
        }
        *mine -= got as u64;
        inflight.fetch_sub(got as u64, Ordering::SeqCst);
        Ok(())
    };
    while !stop.load(Ordering::SeqCst) {
        reap(&mut mine, Duration::ZERO, 0)?;
        if mine >= MAX_INFLIGHT {
            reap(&mut mine, Duration::from_millis(100), 1)?;
            continue;
        }
        let off = ((submitted * 7919 + cpu as u64) % slots) * 4096;
        let mut iocb = aio::Context::iocb(
            fd,
            aio::CMD_PREAD,
            buf.ptr() as u64,
            4096,
            off as i64,
            submitted,
        );
        let mut ptrs = [&mut iocb as *mut aio::Iocb];
        // SAFETY: `buf` outlives `ctx`; the kernel copies the iocb at submission. Blocks while
        // the device's ring is full: that is the point.
        let q = unsafe { ctx.submit(&mut ptrs) }.map_err(|e| format!("io_submit: {e}"))?;
        submitted += q as u64;
        mine += q as u64;
        inflight.fetch_add(q as u64, Ordering::SeqCst);
    }
    let deadline = Instant::now() + LIMIT;
    while mine > 0 {
        if Instant::now() > deadline {
            return Err(format!(
                "{mine} requests still in flight {} s after the last submission",
                LIMIT.as_secs()
            ));
        }
        reap(&mut mine, Duration::from_millis(200), 1)?;
    }
    Ok((submitted, errors))
}

/// Keep every queue of the device full with libaio reads (slow under a delay fault; one
/// submitter pinned to each CPU, as the driver picks the queue by CPU) and expect
/// `preadv2(RWF_NOWAIT)` to give `EAGAIN` at least once instead of sleeping for ring space.
fn saturated_nowait(fd: RawFd, cap: u64) -> CheckResult {
    let stop = Arc::new(AtomicBool::new(false));
    let inflight = Arc::new(AtomicU64::new(0));
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let mut threads = Vec::new();
    for cpu in 0..cpus {
        let (stop2, inflight2) = (stop.clone(), inflight.clone());
        let t = std::thread::Builder::new()
            .spawn(move || submitter(fd, cap, cpu, &stop2, &inflight2))
            .map_err(|e| format!("spawn: {e}"));
        match t {
            Ok(t) => threads.push(t),
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
    }

    std::thread::sleep(Duration::from_millis(200));
    let buf = AlignedBuf::new(4096)?;
    let (mut eagain, mut ok, mut slowest) = (0u32, 0u32, Duration::ZERO);
    let mut other = None;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) && eagain < 3 {
        let t = Instant::now();
        let r = rw2(fd, false, buf.ptr(), 4096, 0, libc::RWF_NOWAIT);
        slowest = slowest.max(t.elapsed());
        match r {
            Ok(4096) => ok += 1,
            Err(libc::EAGAIN) => eagain += 1,
            r => {
                other = Some(show(r));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let peak = inflight.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let (mut submitted, mut errors) = (0, 0);
    let mut failures = Vec::new();
    for t in threads {
        match t.join() {
            Ok(Ok((s, e))) => {
                submitted += s;
                errors += e;
            }
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push("submitter thread panicked".into()),
        }
    }
    let summary = format!(
        "{submitted} libaio reads from {cpus} CPU(s) ({peak} in flight when checked), \
         preadv2(RWF_NOWAIT): {eagain} x EAGAIN, {ok} x 4096, slowest {:.1} ms",
        slowest.as_secs_f64() * 1000.0
    );
    if let Some(e) = failures.first() {
        return Err(format!("{e}; {summary}"));
    }
    if let Some(o) = other {
        return Err(format!("preadv2(RWF_NOWAIT) = {o}; {summary}"));
    }
    if errors > 0 {
        return Err(format!("{errors} libaio reads failed; {summary}"));
    }
    if eagain == 0 {
        return Err(format!("no EAGAIN with the queue saturated; {summary}"));
    }
    Ok(summary)
}
