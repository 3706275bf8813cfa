//! `aiodma-aio`: exercise `/dev/aiodma0`'s AIO paths from guest userspace.
//!
//! ```text
//! aiodma-aio info [--dev PATH]
//! aiodma-aio verify [--dev PATH] [--engine sync|libaio|uring] [--qd N] [--requests N]
//!                   [--seed N] [--unaligned] [--vectored] [--direct] [--base BYTES] [--span BYTES]
//! ```
//! `verify` writes seeded patterns into non-overlapping random ranges with the chosen engine at
//! the chosen queue depth, reads everything back with the same engine and compares; it prints one
//! summary line and exits non-zero on any mismatch or unexpected errno.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;

use aiodma_guest_tools::abi;
use aiodma_guest_tools::aio;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Sync,
    Libaio,
    Uring,
}

#[derive(Debug)]
struct Opts {
    dev: String,
    engine: Engine,
    qd: usize,
    requests: usize,
    seed: u64,
    unaligned: bool,
    vectored: bool,
    direct: bool,
    base: u64,
    span: Option<u64>,
}

fn parse(args: &[String]) -> Result<(String, Opts), String> {
    let mut it = args.iter();
    let cmd = it
        .next()
        .cloned()
        .ok_or("usage: aiodma-aio info|verify [options]")?;
    let mut o = Opts {
        dev: "/dev/aiodma0".into(),
        engine: Engine::Libaio,
        qd: 8,
        requests: 64,
        seed: 1,
        unaligned: false,
        vectored: false,
        direct: false,
        base: 0,
        span: None,
    };
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--dev" => o.dev = val("--dev")?,
            "--engine" => {
                o.engine = match val("--engine")?.as_str() {
                    "sync" => Engine::Sync,
                    "libaio" => Engine::Libaio,
                    "uring" => Engine::Uring,
                    other => return Err(format!("unknown engine '{other}' (sync|libaio|uring)")),
                }
            }
            "--qd" => o.qd = val("--qd")?.parse().map_err(|_| "bad --qd")?,
            "--requests" => {
                o.requests = val("--requests")?.parse().map_err(|_| "bad --requests")?
            }
            "--seed" => o.seed = val("--seed")?.parse().map_err(|_| "bad --seed")?,
            "--base" => o.base = val("--base")?.parse().map_err(|_| "bad --base")?,
            "--span" => o.span = Some(val("--span")?.parse().map_err(|_| "bad --span")?),
            "--unaligned" => o.unaligned = true,
            "--vectored" => o.vectored = true,
            "--direct" => o.direct = true,
            other => return Err(format!("unknown option '{other}'")),
        }
    }
    if o.qd == 0 || o.requests == 0 {
        return Err("--qd and --requests must be at least 1".into());
    }
    Ok((cmd, o))
}

/// SplitMix64: a tiny deterministic PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// The byte that position `pos` holds for `seed`.
fn pattern(seed: u64, pos: u64) -> u8 {
    let mut z = pos.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
    z ^= z >> 29;
    (z.wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 56) as u8
}

fn info(fd: i32) -> Result<abi::DeviceInfo, String> {
    let mut info = abi::DeviceInfo::default();
    // SAFETY: INFO writes exactly one DeviceInfo into the pointed-to value.
    let rc = unsafe { libc::ioctl(fd, abi::ioctl::INFO as _, &mut info as *mut abi::DeviceInfo) };
    if rc != 0 {
        return Err(format!("INFO ioctl: {}", std::io::Error::last_os_error()));
    }
    Ok(info)
}

/// A buffer whose data starts `misalign` bytes after a 4 KiB boundary.
struct Buf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize, misalign: usize) -> Self {
        let storage = vec![0u8; len + misalign + 8192];
        let base = storage.as_ptr() as usize;
        let start = (4096 - base % 4096) % 4096 + misalign;
        Buf {
            storage,
            start,
            len,
        }
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.storage[self.start..].as_mut_ptr()
    }
    fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
    /// Up to three iovecs covering the buffer.
    fn iovecs(&mut self, vectored: bool) -> Vec<libc::iovec> {
        let base = self.as_mut_ptr();
        let cuts: Vec<usize> = if vectored && self.len >= 3 {
            vec![0, self.len / 3, 2 * self.len / 3, self.len]
        } else {
            vec![0, self.len]
        };
        cuts.windows(2)
            .map(|w| libc::iovec {
                // SAFETY: both cut points lie inside the buffer.
                iov_base: unsafe { base.add(w[0]) }.cast(),
                iov_len: w[1] - w[0],
            })
            .collect()
    }
}

struct Job {
    offset: u64,
    buf: Buf,
    iov: Vec<libc::iovec>,
}

fn run_jobs(fd: i32, o: &Opts, jobs: &mut [Job], write: bool) -> Result<(), String> {
    let want = |j: &Job| j.buf.len as i64;
    match o.engine {
        Engine::Sync => {
            for (i, j) in jobs.iter_mut().enumerate() {
                let res = if write {
                    // SAFETY: the iovecs describe live memory of `j.buf`.
                    unsafe {
                        libc::pwritev(fd, j.iov.as_ptr(), j.iov.len() as i32, j.offset as i64)
                    }
                } else {
                    // SAFETY: as above, writable.
                    unsafe { libc::preadv(fd, j.iov.as_ptr(), j.iov.len() as i32, j.offset as i64) }
                };
                if res as i64 != want(j) {
                    return Err(format!(
                        "request {i}: {} at {} returned {res} ({})",
                        if write { "write" } else { "read" },
                        j.offset,
                        std::io::Error::last_os_error()
                    ));
                }
            }
            Ok(())
        }
        Engine::Libaio => {
            let ctx = aio::Context::new(o.qd as u32).map_err(|e| format!("io_setup: {e}"))?;
            let mut iocbs: Vec<aio::Iocb> = jobs
                .iter_mut()
                .enumerate()
                .map(|(i, j)| {
                    let (op, buf, n) = match (o.vectored, write) {
                        (true, true) => {
                            (aio::CMD_PWRITEV, j.iov.as_ptr() as u64, j.iov.len() as u64)
                        }
                        (true, false) => {
                            (aio::CMD_PREADV, j.iov.as_ptr() as u64, j.iov.len() as u64)
                        }
                        (false, true) => {
                            (aio::CMD_PWRITE, j.buf.as_mut_ptr() as u64, j.buf.len as u64)
                        }
                        (false, false) => {
                            (aio::CMD_PREAD, j.buf.as_mut_ptr() as u64, j.buf.len as u64)
                        }
                    };
                    aio::Context::iocb(fd, op, buf, n, j.offset as i64, i as u64)
                })
                .collect();
            let mut next = 0;
            let mut inflight = 0;
            let mut events = vec![aio::IoEvent::default(); o.qd];
            while next < iocbs.len() || inflight > 0 {
                let room = (o.qd - inflight).min(iocbs.len() - next);
                if room > 0 {
                    let mut ptrs: Vec<*mut aio::Iocb> = iocbs[next..next + room]
                        .iter_mut()
                        .map(|c| c as *mut aio::Iocb)
                        .collect();
                    // SAFETY: the kernel copies each iocb at submission; the buffers in `jobs` belong to
                    // the caller and outlive `ctx`, whose drop (io_destroy) waits for in-flight requests.
                    let n =
                        unsafe { ctx.submit(&mut ptrs) }.map_err(|e| format!("io_submit: {e}"))?;
                    next += n;
                    inflight += n;
                }
                let got = ctx
                    .get_events(1, &mut events, Some(std::time::Duration::from_secs(30)))
                    .map_err(|e| format!("io_getevents: {e}"))?;
                if got == 0 {
                    return Err(format!(
                        "io_getevents: no completion within 30 s ({inflight} in flight)"
                    ));
                }
                for ev in &events[..got] {
                    let j = &jobs[ev.data as usize];
                    if ev.res != want(j) {
                        return Err(format!(
                            "request {}: result {} (expected {})",
                            ev.data,
                            ev.res,
                            want(j)
                        ));
                    }
                }
                inflight -= got;
            }
            Ok(())
        }
        Engine::Uring => {
            use io_uring::{opcode, types, IoUring};
            let mut ring = IoUring::new(o.qd.next_power_of_two() as u32)
                .map_err(|e| format!("io_uring_setup: {e}"))?;
            let mut next = 0;
            let mut inflight = 0;
            while next < jobs.len() || inflight > 0 {
                while next < jobs.len() && inflight < o.qd {
                    let j = &mut jobs[next];
                    let fdt = types::Fd(fd);
                    let sqe = match (o.vectored, write) {
                        (true, true) => {
                            opcode::Writev::new(fdt, j.iov.as_ptr(), j.iov.len() as u32)
                                .offset(j.offset)
                                .build()
                        }
                        (true, false) => {
                            opcode::Readv::new(fdt, j.iov.as_ptr(), j.iov.len() as u32)
                                .offset(j.offset)
                                .build()
                        }
                        (false, true) => {
                            opcode::Write::new(fdt, j.buf.as_mut_ptr(), j.buf.len as u32)
                                .offset(j.offset)
                                .build()
                        }
                        (false, false) => {
                            opcode::Read::new(fdt, j.buf.as_mut_ptr(), j.buf.len as u32)
                                .offset(j.offset)
                                .build()
                        }
                    };
                    // SAFETY: the buffers and iovecs live in `jobs` until every CQE is reaped.
                    if unsafe { ring.submission().push(&sqe.user_data(next as u64)) }.is_err() {
                        break;
                    }
                    next += 1;
                    inflight += 1;
                }
                ring.submit_and_wait(1)
                    .map_err(|e| format!("io_uring_enter: {e}"))?;
                let cqes: Vec<(u64, i32)> = ring
                    .completion()
                    .map(|c| (c.user_data(), c.result()))
                    .collect();
                for (data, res) in cqes {
                    let j = &jobs[data as usize];
                    if i64::from(res) != want(j) {
                        return Err(format!(
                            "request {data}: result {res} (expected {})",
                            want(j)
                        ));
                    }
                    inflight -= 1;
                }
            }
            Ok(())
        }
    }
}

fn verify(o: &Opts) -> Result<String, String> {
    let mut flags = 0;
    if o.direct {
        flags |= libc::O_DIRECT;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(&o.dev)
        .map_err(|e| format!("open {}: {e}", o.dev))?;
    let fd = file.as_raw_fd();
    let capacity = info(fd)?.capacity;
    if o.base >= capacity {
        return Err(format!("--base {} is past the capacity {capacity}", o.base));
    }
    let span = o.span.unwrap_or(capacity - o.base).min(capacity - o.base);
    let slot = ((span / o.requests as u64).min(256 << 10) / 4096) * 4096;
    if slot < 4096 {
        return Err(format!(
            "capacity {capacity} too small for {} requests",
            o.requests
        ));
    }
    let mut rng = Rng(o.seed);
    let mut jobs: Vec<Job> = (0..o.requests)
        .map(|i| {
            let misalign = if o.unaligned {
                rng.below(511) as usize + 1
            } else {
                0
            };
            let len = if o.unaligned {
                1 + rng.below(slot - misalign as u64) as usize
            } else {
                512 * (1 + rng.below(slot / 512)) as usize
            };
            let offset = o.base + i as u64 * slot + misalign as u64;
            let mut buf = Buf::new(len, misalign);
            for (k, b) in buf.bytes_mut().iter_mut().enumerate() {
                *b = pattern(o.seed, offset + k as u64);
            }
            let iov = buf.iovecs(o.vectored);
            Job { offset, buf, iov }
        })
        .collect();
    let started = std::time::Instant::now();
    run_jobs(fd, o, &mut jobs, true)?;
    for j in &mut jobs {
        j.buf.bytes_mut().fill(0);
    }
    run_jobs(fd, o, &mut jobs, false)?;
    let elapsed = started.elapsed();
    let mut bytes = 0u64;
    for (i, j) in jobs.iter().enumerate() {
        bytes += j.buf.len as u64;
        if let Some(k) = j
            .buf
            .bytes()
            .iter()
            .enumerate()
            .position(|(k, b)| *b != pattern(o.seed, j.offset + k as u64))
        {
            return Err(format!(
                "request {i}: mismatch at byte {k} of {} (offset {})",
                j.buf.len,
                j.offset + k as u64
            ));
        }
    }
    Ok(format!(
        "verify: engine={:?} qd={} requests={} bytes={} unaligned={} vectored={} direct={} time={:.1}ms: OK",
        o.engine, o.qd, o.requests, bytes, o.unaligned, o.vectored, o.direct, elapsed.as_secs_f64() * 1000.0
    ).to_lowercase())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, o) = match parse(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("aiodma-aio: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cmd.as_str() {
        "info" => std::fs::File::open(&o.dev)
            .map_err(|e| format!("open {}: {e}", o.dev))
            .and_then(|f| info(f.as_raw_fd()))
            .map(|i| format!("{i:#?}")),
        "verify" => verify(&o),
        other => {
            eprintln!("aiodma-aio: unknown command '{other}' (info|verify)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aiodma-aio: {e}");
            ExitCode::FAILURE
        }
    }
}
