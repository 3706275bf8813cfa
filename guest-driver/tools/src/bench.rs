//! `aiodma-aio bench`: IOPS, bandwidth and submit→complete latency percentiles of one engine
//! at one block size, queue depth and access pattern, from preallocated aligned buffers.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::aio;
use crate::util::{device_size, open_dev, res_name, AlignedBuf, Percentiles, Rng};

/// How requests are issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `pread`/`pwrite`, one at a time.
    Sync,
    /// Linux AIO (`io_submit`/`io_getevents`).
    Libaio,
    /// io_uring.
    Uring,
}

impl Engine {
    /// Parse `sync|libaio|uring`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(Engine::Sync),
            "libaio" => Ok(Engine::Libaio),
            "uring" | "io_uring" => Ok(Engine::Uring),
            other => Err(format!("unknown engine '{other}' (sync|libaio|uring)")),
        }
    }

    /// The name as given on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sync => "sync",
            Engine::Libaio => "libaio",
            Engine::Uring => "uring",
        }
    }
}

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential, half reads and half writes at random.
    Rw,
    /// Random, half reads and half writes.
    RandRw,
}

impl Pattern {
    /// Parse the fio-style name.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "rw" | "readwrite" => Pattern::Rw,
            "randrw" => Pattern::RandRw,
            other => {
                return Err(format!(
                    "unknown --rw '{other}' (read|write|randread|randwrite|rw|randrw)"
                ))
            }
        })
    }

    /// The fio-style name.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::Rw => "rw",
            Pattern::RandRw => "randrw",
        }
    }

    fn random(self) -> bool {
        matches!(
            self,
            Pattern::RandRead | Pattern::RandWrite | Pattern::RandRw
        )
    }
}

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this long (requests in flight then drain).
    Time(Duration),
    /// After this many requests.
    Requests(u64),
}

/// What `bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// Device path.
    pub dev: String,
    /// Engine.
    pub engine: Engine,
    /// Bytes per request.
    pub bs: usize,
    /// Requests in flight (1 for sync).
    pub qd: usize,
    /// Access pattern.
    pub rw: Pattern,
    /// When to stop.
    pub stop: Stop,
    /// Open with `O_DIRECT`.
    pub direct: bool,
    /// Seed of the offsets.
    pub seed: u64,
    /// Bytes of the device to use from offset 0 (default: all of it).
    pub span: Option<u64>,
}

/// One measured row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Who measured it (`aiodma-aio` or `fio`).
    pub tool: String,
    /// Engine name.
    pub engine: String,
    /// Bytes per request.
    pub bs: u64,
    /// Queue depth.
    pub qd: u32,
    /// Access pattern name.
    pub rw: String,
    /// Requests completed.
    pub requests: u64,
    /// Wall time in seconds.
    pub secs: f64,
    /// Requests per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mbps: f64,
    /// Latency percentiles in microseconds.
    pub lat: Percentiles,
}

impl Row {
    /// The table header; `suite` adds the fault-label and tool columns in front.
    pub fn header(suite: bool) -> String {
        let pre = if suite {
            format!("{:<12} {:<10} ", "fault", "tool")
        } else {
            String::new()
        };
        format!(
            "{pre}{:<7} {:>6} {:>3} {:<9} {:>9} {:>8} {:>9} {:>9} {:>10}",
            "engine", "bs", "qd", "rw", "IOPS", "MB/s", "p50(us)", "p99(us)", "p99.9(us)"
        )
    }

    /// One table line; `fault` adds the fault-label and tool columns in front.
    pub fn line(&self, fault: Option<&str>) -> String {
        let pre = match fault {
            Some(f) => format!("{f:<12} {:<10} ", self.tool),
            None => String::new(),
        };
        format!(
            "{pre}{:<7} {:>6} {:>3} {:<9} {:>9.0} {:>8.1} {:>9.1} {:>9.1} {:>10.1}",
            self.engine,
            self.bs,
            self.qd,
            self.rw,
            self.iops,
            self.mbps,
            self.lat.p50,
            self.lat.p99,
            self.lat.p999
        )
    }

    /// The same as one JSON object.
    pub fn json(&self, fault: Option<&str>) -> String {
        let fault = fault.map_or(String::new(), |f| {
            format!("\"fault\":\"{}\",", f.replace(['"', '\\'], "_"))
        });
        format!(
            "{{{fault}\"tool\":\"{}\",\"engine\":\"{}\",\"bs\":{},\"qd\":{},\"rw\":\"{}\",\
             \"requests\":{},\"seconds\":{:.3},\"iops\":{:.1},\"mb_s\":{:.2},\
             \"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1}}}",
            self.tool,
            self.engine,
            self.bs,
            self.qd,
            self.rw,
            self.requests,
            self.secs,
            self.iops,
            self.mbps,
            self.lat.p50,
            self.lat.p99,
            self.lat.p999
        )
    }
}

/// Where the next request goes.
struct Offsets {
    rng: Rng,
    next: u64,
    slots: u64,
    bs: u64,
    pattern: Pattern,
}

impl Offsets {
    /// (offset, is_write)
    fn next(&mut self) -> (u64, bool) {
        let slot = if self.pattern.random() {
            self.rng.below(self.slots)
        } else {
            let s = self.next;
            self.next = (self.next + 1) % self.slots;
            s
        };
        let write = match self.pattern {
            Pattern::Read | Pattern::RandRead => false,
            Pattern::Write | Pattern::RandWrite => true,
            Pattern::Rw | Pattern::RandRw => self.rng.next_u64() & 1 == 1,
        };
        (slot * self.bs, write)
    }
}

/// Counts completions against the stop condition.
struct Progress {
    stop: Stop,
    started: Instant,
    submitted: u64,
    lat: Vec<u64>,
}

impl Progress {
    fn may_submit(&self) -> bool {
        match self.stop {
            Stop::Time(d) => self.started.elapsed() < d,
            Stop::Requests(n) => self.submitted < n,
        }
    }
}

fn check(res: i64, bs: usize, off: u64, write: bool) -> Result<(), String> {
    if res == bs as i64 {
        Ok(())
    } else {
        Err(format!(
            "{} of {bs} bytes at {off}: result {}",
            if write { "write" } else { "read" },
            res_name(res)
        ))
    }
}

/// How long to wait for any one completion before calling the device stuck.
const STUCK: Duration = Duration::from_secs(30);

fn run_sync(
    fd: RawFd,
    bufs: &[AlignedBuf],
    offs: &mut Offsets,
    p: &mut Progress,
) -> Result<(), String> {
    let bs = bufs[0].len();
    let buf = bufs[0].ptr();
    while p.may_submit() {
        let (off, write) = offs.next();
        let t = Instant::now();
        let rc = if write {
            // SAFETY: `buf` holds `bs` bytes for the whole run.
            unsafe { libc::pwrite(fd, buf.cast(), bs, off as i64) }
        } else {
            // SAFETY: as above, writable.
            unsafe { libc::pread(fd, buf.cast(), bs, off as i64) }
        };
        p.lat.push(t.elapsed().as_nanos() as u64);
        p.submitted += 1;
        let res = if rc < 0 {
            -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            rc as i64
        };
        check(res, bs, off, write)?;
    }
    Ok(())
}

fn run_libaio(
    fd: RawFd,
    bufs: &[AlignedBuf],
    offs: &mut Offsets,
    p: &mut Progress,
) -> Result<(), String> {
    let qd = bufs.len();
    let bs = bufs[0].len();
    let ctx = aio::Context::new(qd as u32).map_err(|e| format!("io_setup: {e}"))?;
    let mut iocbs = vec![aio::Iocb::default(); qd];
    let mut sent = vec![Instant::now(); qd];
    let mut free: Vec<usize> = (0..qd).rev().collect();
    let mut events = vec![aio::IoEvent::default(); qd];
    let mut ptrs: Vec<*mut aio::Iocb> = Vec::with_capacity(qd);
    let mut inflight = 0usize;
    loop {
        ptrs.clear();
        let mut slots = Vec::new();
        while p.may_submit() && !free.is_empty() && slots.len() < qd {
            let Some(slot) = free.pop() else { break };
            let (off, write) = offs.next();
            let op = if write {
                aio::CMD_PWRITE
            } else {
                aio::CMD_PREAD
            };
            iocbs[slot] = aio::Context::iocb(
                fd,
                op,
                bufs[slot].ptr() as u64,
                bs as u64,
                off as i64,
                slot as u64,
            );
            slots.push(slot);
            p.submitted += 1;
        }
        for &s in &slots {
            ptrs.push(&mut iocbs[s] as *mut aio::Iocb);
        }
        if !ptrs.is_empty() {
            let t = Instant::now();
            // SAFETY: the buffers outlive `ctx` (they belong to the caller), and io_destroy at
            // its drop waits for anything still in flight.
            let n = unsafe { ctx.submit(&mut ptrs) }.map_err(|e| format!("io_submit: {e}"))?;
            for &s in &slots[..n] {
                sent[s] = t;
            }
            for &s in &slots[n..] {
                free.push(s);
                p.submitted -= 1;
            }
            inflight += n;
        }
        if inflight == 0 {
            return Ok(());
        }
        let got = ctx
            .get_events(1, &mut events, Some(STUCK))
            .map_err(|e| format!("io_getevents: {e}"))?;
        if got == 0 {
            return Err(format!(
                "no completion within {} s ({inflight} in flight)",
                STUCK.as_secs()
            ));
        }
        let now = Instant::now();
        for ev in &events[..got] {
            let slot = ev.data as usize;
            let c = &iocbs[slot];
            check(ev.res, bs, c.offset as u64, c.opcode == aio::CMD_PWRITE)?;
            p.lat.push(now.duration_since(sent[slot]).as_nanos() as u64);
            free.push(slot);
        }
        inflight -= got;
    }
}

fn run_uring(
    fd: RawFd,
    bufs: &[AlignedBuf],
    offs: &mut Offsets,
    p: &mut Progress,
) -> Result<(), String> {
    use io_uring::{opcode, types, IoUring};
    let qd = bufs.len();
    let bs = bufs[0].len();
    let mut ring =
        IoUring::new(qd.next_power_of_two() as u32).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut sent = vec![Instant::now(); qd];
    let mut what = vec![(0u64, false); qd];
    let mut free: Vec<usize> = (0..qd).rev().collect();
    let mut inflight = 0usize;
    loop {
        let mut queued = Vec::new();
        while p.may_submit() && !free.is_empty() {
            let Some(slot) = free.pop() else { break };
            let (off, write) = offs.next();
            let buf = bufs[slot].ptr();
            let sqe = if write {
                opcode::Write::new(types::Fd(fd), buf, bs as u32)
                    .offset(off)
                    .build()
            } else {
                opcode::Read::new(types::Fd(fd), buf, bs as u32)
                    .offset(off)
                    .build()
            };
            // SAFETY: the buffers outlive the ring (they belong to the caller; the ring is
            // dropped here first).
            if unsafe { ring.submission().push(&sqe.user_data(slot as u64)) }.is_err() {
                free.push(slot);
                break;
            }
            what[slot] = (off, write);
            queued.push(slot);
            p.submitted += 1;
        }
        let t = Instant::now();
        for &s in &queued {
            sent[s] = t;
        }
        inflight += queued.len();
        if inflight == 0 {
            return Ok(());
        }
        let ts = types::Timespec::from(STUCK);
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                return Err(format!(
                    "no completion within {} s ({inflight} in flight)",
                    STUCK.as_secs()
                ))
            }
            Err(e) => return Err(format!("io_uring_enter: {e}")),
        }
        let now = Instant::now();
        for cqe in ring.completion() {
            let slot = cqe.user_data() as usize;
            let (off, write) = what[slot];
            check(i64::from(cqe.result()), bs, off, write)?;
            p.lat.push(now.duration_since(sent[slot]).as_nanos() as u64);
            free.push(slot);
            inflight -= 1;
        }
    }
}

/// Run one benchmark and measure it.
pub fn run(o: &BenchOpts) -> Result<Row, String> {
    if o.bs == 0 || o.qd == 0 {
        return Err("--bs and --qd must be at least 1".into());
    }
    let file = open_dev(&o.dev, if o.direct { libc::O_DIRECT } else { 0 })?;
    let fd = file.as_raw_fd();
    let cap = device_size(fd)?;
    let span = o.span.unwrap_or(cap).min(cap);
    let slots = span / o.bs as u64;
    if slots == 0 {
        return Err(format!("--bs {} is larger than the span {span}", o.bs));
    }
    let qd = if o.engine == Engine::Sync { 1 } else { o.qd };
    let mut bufs = Vec::with_capacity(qd);
    for i in 0..qd {
        let mut b = AlignedBuf::new(o.bs)?;
        b.fill_pattern(o.seed, i as u64 * o.bs as u64);
        bufs.push(b);
    }
    let mut offs = Offsets {
        rng: Rng(o.seed),
        next: 0,
        slots,
        bs: o.bs as u64,
        pattern: o.rw,
    };
    let expect = match o.stop {
        Stop::Requests(n) => n as usize,
        Stop::Time(d) => (d.as_secs_f64() * 50_000.0).min(4e6) as usize,
    };
    let mut p = Progress {
        stop: o.stop,
        started: Instant::now(),
        submitted: 0,
        lat: Vec::with_capacity(expect),
    };
    match o.engine {
        Engine::Sync => run_sync(fd, &bufs, &mut offs, &mut p)?,
        Engine::Libaio => run_libaio(fd, &bufs, &mut offs, &mut p)?,
        Engine::Uring => run_uring(fd, &bufs, &mut offs, &mut p)?,
    }
    let secs = p.started.elapsed().as_secs_f64();
    drop(file);
    let requests = p.lat.len() as u64;
    let lat = Percentiles::of(&mut p.lat);
    Ok(Row {
        tool: "aiodma-aio".into(),
        engine: o.engine.name().into(),
        bs: o.bs as u64,
        qd: qd as u32,
        rw: o.rw.name().into(),
        requests,
        secs,
        iops: requests as f64 / secs,
        mbps: (requests * o.bs as u64) as f64 / secs / 1e6,
        lat,
    })
}
