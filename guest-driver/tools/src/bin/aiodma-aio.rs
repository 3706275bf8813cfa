//! `aiodma-aio`: exercise `/dev/aiodma0`'s AIO paths from guest userspace. `aiodma-aio help`
//! lists the subcommands; bad usage exits with 2, a failed check with 1.

use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::Duration;

use aiodma_guest_tools::abandon::{self, AbandonOpts};
use aiodma_guest_tools::aio;
use aiodma_guest_tools::bench::{self, BenchOpts, Engine, Pattern, Row, Stop};
use aiodma_guest_tools::cancel::{self, CancelOpts};
use aiodma_guest_tools::churn::{self, ChurnOpts, Mode};
use aiodma_guest_tools::edge::{self, EdgeOpts};
use aiodma_guest_tools::nowait::{self, NowaitOpts};
use aiodma_guest_tools::sigstorm::{self, SigstormOpts};
use aiodma_guest_tools::soak;
use aiodma_guest_tools::suite::{self, SuiteOpts};
use aiodma_guest_tools::util::{device_info, open_dev, parse_secs, parse_size, pattern, Rng};

const USAGE: &str = "\
usage: aiodma-aio COMMAND [--dev PATH] [options]   (PATH defaults to /dev/aiodma0)
  info                      the driver's INFO ioctl
  verify [--engine sync|libaio|uring] [--qd N] [--requests N] [--seed N] [--unaligned]
         [--vectored] [--fixed] [--direct] [--dsync] [--base BYTES] [--span BYTES] [--bs BYTES]
         [--write-only|--read-only] [--tolerate [--allow-corrupt]]
                            write seeded patterns, read them back and compare; --write-only
                            and --read-only split the two phases (e.g. across boots); --bs
                            fixes the request size (else random multiples of 512);
                            --tolerate (a faulty device): a request may fail or a read come
                            back short, but each completes exactly once, never with more than
                            asked, and the bytes it returned are right; failed writes are
                            retried with pwrite before the reads; prints ok/short/failed counts,
                            errnos, short lengths and the slowest request; --allow-corrupt
                            reports wrong data (bad data: lines) instead of failing on it
  edge [--expect-eagain]    the file-semantics contract, one PASS/FAIL line per check;
                            --expect-eagain also needs EAGAIN from RWF_NOWAIT while the queue is
                            saturated (run under a delay fault)
  cancel [--requests N] [--bs BYTES] [--timeout SECS] [--settle SECS] [--base BYTES]
                            io_cancel, io_uring cancel, exit, close and io_destroy with requests
                            in flight (run under a delay fault); fails on hang/lost/duplicate
  abandon [--timeout-ms N] [--sync N] [--cancel N] [--exit N] [--uring N] [--batch N]
          [--ring N] [--wait SECS] [--slack SECS] [--base BYTES]
                            the wedge: requests abandoned by SIGKILLed sync readers, io_cancel
                            and exit while the device drops reads (run under
                            --fault drop:every=1,op=read with aiodma.timeout_ms=N); then writes
                            must complete within 2 x timeout and the driver must count
                            timeouts and resets
  sigstorm [--workers N] [--bs BYTES] [--secs SECS] [--period-us N] [--restart on|off|both]
           [--settle SECS] [--stall SECS] [--base BYTES] [--seed N]
                            sync readers/writers under SIGSTOP/SIGCONT/SIGALRM every period:
                            full counts or EINTR only, no stale or misordered data
  nowait [--qd N] [--bs BYTES] [--secs SECS] [--span BYTES] [--base BYTES] [--stall SECS]
         [--write-pct N] [--make-it-fail] [--seed N]
                            io_uring RWF_NOWAIT reads/writes at QD N; errors counted, a hang,
                            lost/duplicate completion or bad data fails (--make-it-fail: under
                            failslab/fail_page_alloc with task-filter)
  churn [--iterations N] [--mode unbind|rmmod|both] [--hold SECS] [--stall SECS] [--qd N]
        [--sync-workers N] [--bs BYTES] [--span BYTES] [--base BYTES] [--bdf B]
        [--module PATH] [--params 'a=1 b=2']
                            unbind/bind and rmmod/insmod with libaio, io_uring and sync I/O
                            going: every request completes once, nothing hangs
  bench [--engine E] [--bs BYTES] [--qd N] [--rw read|write|randread|randwrite|rw|randrw]
        [--time SECS | --requests N] [--seed N] [--span BYTES] [--buffered] [--json] [--header]
                            IOPS, MB/s and submit-to-complete latency p50/p99/p99.9 (us);
                            sync runs at QD1; --header prints the table header (alone: only it)
  bench-suite [--time SECS] [--label TEXT] [--no-header] [--no-fio] [--fio-dir DIR] [--json]
                            sync QD1 vs libaio/uring QD1/8/32, 4 KiB randread/randwrite, then
                            the fio equivalents (fio layer), then the speed-ups
";

/// Bad usage: exit code 2.
struct Usage(String);

/// Walks the options of one subcommand.
struct Args<'a> {
    it: std::slice::Iter<'a, String>,
    cmd: &'a str,
}

impl<'a> Args<'a> {
    fn next(&mut self) -> Option<&'a str> {
        self.it.next().map(String::as_str)
    }
    fn value(&mut self, flag: &str) -> Result<&'a str, Usage> {
        self.next()
            .ok_or_else(|| Usage(format!("{} {flag} needs a value", self.cmd)))
    }
    fn num<T: std::str::FromStr>(&mut self, flag: &str) -> Result<T, Usage> {
        let v = self.value(flag)?;
        v.parse()
            .map_err(|_| Usage(format!("{} {flag}: bad number '{v}'", self.cmd)))
    }
    fn size(&mut self, flag: &str) -> Result<u64, Usage> {
        let v = self.value(flag)?;
        parse_size(v).ok_or_else(|| {
            Usage(format!(
                "{} {flag}: bad size '{v}' (bytes, or with k/m/g)",
                self.cmd
            ))
        })
    }
    fn secs(&mut self, flag: &str) -> Result<Duration, Usage> {
        let v = self.value(flag)?;
        parse_secs(v).ok_or_else(|| {
            Usage(format!(
                "{} {flag}: bad duration '{v}' (seconds > 0)",
                self.cmd
            ))
        })
    }
    fn unknown(&self, flag: &str) -> Usage {
        Usage(format!(
            "{}: unknown option '{flag}' (aiodma-aio help)",
            self.cmd
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Both,
    WriteOnly,
    ReadOnly,
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
    /// io_uring: register the buffers and use READ_FIXED/WRITE_FIXED.
    fixed: bool,
    direct: bool,
    /// Open with O_DSYNC: every write is durable (the driver ends it with a FLUSH).
    dsync: bool,
    base: u64,
    span: Option<u64>,
    phase: Phase,
    /// Fixed request size.
    bs: Option<u64>,
    /// A faulty device: errors and short reads are counted, not fatal.
    tolerate: bool,
    /// With `tolerate`: wrong data is reported, not fatal.
    allow_corrupt: bool,
}

fn parse_verify(a: &mut Args) -> Result<Opts, Usage> {
    let mut o = Opts {
        dev: "/dev/aiodma0".into(),
        engine: Engine::Libaio,
        qd: 8,
        requests: 64,
        seed: 1,
        unaligned: false,
        vectored: false,
        fixed: false,
        direct: false,
        dsync: false,
        base: 0,
        span: None,
        phase: Phase::Both,
        bs: None,
        tolerate: false,
        allow_corrupt: false,
    };
    while let Some(f) = a.next() {
        match f {
            "--dev" => o.dev = a.value(f)?.into(),
            "--bs" => o.bs = Some(a.size(f)?),
            "--tolerate" => o.tolerate = true,
            "--allow-corrupt" => o.allow_corrupt = true,
            "--engine" => o.engine = Engine::parse(a.value(f)?).map_err(Usage)?,
            "--qd" => o.qd = a.num(f)?,
            "--requests" => o.requests = a.num(f)?,
            "--seed" => o.seed = a.num(f)?,
            "--base" => o.base = a.size(f)?,
            "--span" => o.span = Some(a.size(f)?),
            "--unaligned" => o.unaligned = true,
            "--vectored" => o.vectored = true,
            "--fixed" => o.fixed = true,
            "--direct" => o.direct = true,
            "--dsync" => o.dsync = true,
            "--write-only" => o.phase = Phase::WriteOnly,
            "--read-only" => o.phase = Phase::ReadOnly,
            other => return Err(a.unknown(other)),
        }
    }
    if o.fixed && (o.engine != Engine::Uring || o.vectored) {
        return Err(Usage(
            "verify: --fixed needs --engine uring and no --vectored".into(),
        ));
    }
    if o.qd == 0 || o.requests == 0 || o.bs == Some(0) {
        return Err(Usage(
            "verify: --qd, --requests and --bs must be at least 1".into(),
        ));
    }
    if o.allow_corrupt && !o.tolerate {
        return Err(Usage("verify: --allow-corrupt needs --tolerate".into()));
    }
    Ok(o)
}

fn parse_dev_only(a: &mut Args) -> Result<String, Usage> {
    let mut dev = "/dev/aiodma0".to_string();
    while let Some(f) = a.next() {
        match f {
            "--dev" => dev = a.value(f)?.into(),
            other => return Err(a.unknown(other)),
        }
    }
    Ok(dev)
}

fn parse_edge(a: &mut Args) -> Result<EdgeOpts, Usage> {
    let mut o = EdgeOpts {
        dev: "/dev/aiodma0".into(),
        expect_eagain: false,
    };
    while let Some(f) = a.next() {
        match f {
            "--dev" => o.dev = a.value(f)?.into(),
            "--expect-eagain" => o.expect_eagain = true,
            other => return Err(a.unknown(other)),
        }
    }
    Ok(o)
}

fn parse_cancel(a: &mut Args) -> Result<CancelOpts, Usage> {
    let mut o = CancelOpts {
        dev: "/dev/aiodma0".into(),
        requests: 16,
        bs: 16384,
        timeout: Duration::from_secs(20),
        settle: Duration::from_millis(500),
        base: 16 << 20,
    };
    while let Some(f) = a.next() {
        match f {
            "--dev" => o.dev = a.value(f)?.into(),
            "--requests" => o.requests = a.num(f)?,
            "--bs" => o.bs = a.size(f)? as usize,
            "--timeout" => o.timeout = a.secs(f)?,
            "--settle" => o.settle = a.secs(f)?,
            "--base" => o.base = a.size(f)?,
            other => return Err(a.unknown(other)),
        }
    }
    if o.requests == 0 || o.requests > 255 || o.bs == 0 {
        return Err(Usage(
            "cancel: --requests must be 1..=255 and --bs at least 1".into(),
        ));
    }
    Ok(o)
}

fn parse_abandon(a: &mut Args) -> Result<AbandonOpts, Usage> {
    let mut o = AbandonOpts {
        dev: "/dev/aiodma0".into(),
        timeout_ms: 1000,
        sync: 60,
        cancel: 60,
        exit: 60,
        uring: 8,
        batch: 12,
        bs: 4096,
        base: 8 << 20,
        ring: 256,
        wait: Duration::from_millis(300),
        slack: Duration::from_secs(1),
    };
    while let Some(f) = a.next() {
        match f {
            "--dev" => o.dev = a.value(f)?.into(),
            "--timeout-ms" => o.timeout_ms = a.num(f)?,
            "--sync" => o.sync = a.num(f)?,
            "--cancel" => o.cancel = a.num(f)?,
            "--exit" => o.exit = a.num(f)?,
            "--uring" => o.uring = a.num(f)?,
            "--batch" => o.batch = a.num(f)?,
            "--ring" => o.ring = a.num(f)?,
            "--wait" => o.wait = a.secs(f)?,
            "--slack" => o.slack = a.secs(f)?,
            "--base" => o.base = a.size(f)?,
            other => return Err(a.unknown(other)),
        }
    }
    if o.timeout_ms == 0 || o.batch == 0 || o.batch > 64 || o.ring == 0 || o.uring > 256 {
        return Err(Usage(
            "abandon: --timeout-ms, --batch (1..=64) and --ring must be positive, --uring at most 256"
                .into(),
        ));
    }
    Ok(o)
}

fn parse_sigstorm(a: &mut Args) -> Result<SigstormOpts, Usage> {
    let mut o = SigstormOpts {
        dev: "/dev/aiodma0".into(),
        workers: 3,
        bs: 1 << 20,
        secs: Duration::from_secs(3),
        period: Duration::from_millis(1),
        restart: vec![false, true],
        base: 32 << 20,
        settle: Duration::from_millis(500),
        stall: Duration::from_secs(10),
        seed: 1,
    };
    while let Some(f) = a.next() {
        match f {
            "--dev" => o.dev = a.value(f)?.into(),
            "--workers" => o.workers = a.num(f)?,
            "--bs" => o.bs = a.size(f)? as usize,
            "--secs" => o.secs = a.secs(f)?,
            "--period-us" => o.period = Duration::from_micros(a.num(f)?),
            "--restart" => {
                o.restart = match a.value(f)? {
                    "off" => vec![false],
                    "on" => vec![true],
                    "both" => vec![false, true],
                    v => return Err(Usage(format!("sigstorm --restart: '{v}' (on|off|both)"))),
                }
            }
            "--settle" => o.settle = a.secs(f)?,
            "--stall" => o.stall = a.secs(f)?,
            "--base" => o.base = a.size(f)?,
            "--seed" => o.seed = a.num(f)?,
            other => return Err(a.unknown(other)),
        }
    }
    if o.workers == 0
        || o.workers > 64
        || o.bs == 0
        || !o.bs.is_multiple_of(4096)
        || o.period.is_zero()
    {
        return Err(Usage(
            "sigstorm: --workers 1..=64, --bs a multiple of 4096, --period-us at least 1".into(),
        ));
    }
    Ok(o)
}

fn parse_nowait(a: &mut Args) -> Result<NowaitOpts, Usage> {
    let mut o = NowaitOpts {
        dev: "/dev/aiodma0".into(),
        qd: 32,
        bs: 4096,
        secs: Duration::from_secs(5),
        span: 8 << 20,
        base: 0,
        stall: Duration::from_secs(5),
        write_pct: 50,
        make_it_fail: false,
        seed: 1,
    };
    while let Some(f) = a.next() {
        match f {
            "--dev" => o.dev = a.value(f)?.into(),
            "--qd" => o.qd = a.num(f)?,
            "--bs" => o.bs = a.size(f)? as usize,
            "--secs" => o.secs = a.secs(f)?,
            "--span" => o.span = a.size(f)?,
            "--base" => o.base = a.size(f)?,
            "--stall" => o.stall = a.secs(f)?,
            "--write-pct" => o.write_pct = a.num(f)?,
            "--make-it-fail" => o.make_it_fail = true,
            "--seed" => o.seed = a.num(f)?,
            other => return Err(a.unknown(other)),
        }
    }
    if o.qd == 0 || o.qd > 1024 || o.bs == 0 || o.bs > 1 << 20 || o.write_pct > 100 {
        return Err(Usage(
            "nowait: --qd 1..=1024, --bs 1..=1M, --write-pct 0..=100".into(),
        ));
    }
    Ok(o)
}

fn parse_churn(a: &mut Args) -> Result<ChurnOpts, Usage> {
    let mut o = ChurnOpts {
        dev: "/dev/aiodma0".into(),
        iterations: 50,
        mode: Mode::Both,
        bdf: "0000:00:01.0".into(),
        driver_dir: "/sys/bus/pci/drivers/aiodma".into(),
        module: "/lib/modules/aiodma.ko".into(),
        params: None,
        sync_workers: 2,
        qd: 8,
        bs: 16384,
        base: 0,
        span: 4 << 20,
        hold: Duration::from_millis(20),
        stall: Duration::from_secs(10),
        seed: 1,
    };
    while let Some(f) = a.next() {
        match f {
            "--dev" => o.dev = a.value(f)?.into(),
            "--iterations" => o.iterations = a.num(f)?,
            "--mode" => o.mode = Mode::parse(a.value(f)?).map_err(Usage)?,
            "--bdf" => o.bdf = a.value(f)?.into(),
            "--driver-dir" => o.driver_dir = a.value(f)?.into(),
            "--module" => o.module = a.value(f)?.into(),
            "--params" => {
                o.params = Some(a.value(f)?.split_whitespace().map(str::to_string).collect())
            }
            "--sync-workers" => o.sync_workers = a.num(f)?,
            "--qd" => o.qd = a.num(f)?,
            "--bs" => o.bs = a.size(f)? as usize,
            "--base" => o.base = a.size(f)?,
            "--span" => o.span = a.size(f)?,
            "--hold" => o.hold = a.secs(f)?,
            "--stall" => o.stall = a.secs(f)?,
            "--seed" => o.seed = a.num(f)?,
            other => return Err(a.unknown(other)),
        }
    }
    if o.qd == 0 || o.qd > 256 || o.bs == 0 || o.sync_workers > 16 {
        return Err(Usage(
            "churn: --qd 1..=256, --bs at least 1, --sync-workers at most 16".into(),
        ));
    }
    Ok(o)
}

/// `bench` options plus the output switches.
struct BenchCmd {
    o: BenchOpts,
    json: bool,
    header: bool,
    /// Only `--header` was given: print it and stop.
    header_only: bool,
}

fn parse_bench(a: &mut Args) -> Result<BenchCmd, Usage> {
    let mut o = BenchOpts {
        dev: "/dev/aiodma0".into(),
        engine: Engine::Libaio,
        bs: 4096,
        qd: 1,
        rw: Pattern::RandRead,
        stop: Stop::Time(Duration::from_secs(5)),
        direct: true,
        seed: 1,
        span: None,
    };
    let (mut json, mut header, mut any) = (false, false, false);
    let (mut time, mut requests) = (None, None);
    while let Some(f) = a.next() {
        if f != "--header" {
            any = true;
        }
        match f {
            "--dev" => o.dev = a.value(f)?.into(),
            "--engine" => o.engine = Engine::parse(a.value(f)?).map_err(Usage)?,
            "--bs" => o.bs = a.size(f)? as usize,
            "--qd" => o.qd = a.num(f)?,
            "--rw" => o.rw = Pattern::parse(a.value(f)?).map_err(Usage)?,
            "--time" => time = Some(a.secs(f)?),
            "--requests" => requests = Some(a.num::<u64>(f)?),
            "--seed" => o.seed = a.num(f)?,
            "--span" => o.span = Some(a.size(f)?),
            "--buffered" => o.direct = false,
            "--json" => json = true,
            "--header" => header = true,
            other => return Err(a.unknown(other)),
        }
    }
    o.stop = match (time, requests) {
        (Some(_), Some(_)) => {
            return Err(Usage(
                "bench: --time and --requests exclude each other".into(),
            ))
        }
        (Some(t), None) => Stop::Time(t),
        (None, Some(0)) => return Err(Usage("bench: --requests must be at least 1".into())),
        (None, Some(n)) => Stop::Requests(n),
        (None, None) => o.stop,
    };
    if o.bs == 0 || o.bs > 64 << 20 || o.qd == 0 || o.qd > 4096 {
        return Err(Usage(
            "bench: --bs must be 1..=64M and --qd 1..=4096".into(),
        ));
    }
    if o.direct && !o.bs.is_multiple_of(512) {
        return Err(Usage(
            "bench: O_DIRECT needs --bs in multiples of 512 (or --buffered)".into(),
        ));
    }
    Ok(BenchCmd {
        o,
        json,
        header,
        header_only: header && !any,
    })
}

fn parse_suite(a: &mut Args) -> Result<SuiteOpts, Usage> {
    let mut o = SuiteOpts {
        dev: "/dev/aiodma0".into(),
        time: Duration::from_secs(2),
        label: "none".into(),
        header: true,
        fio: true,
        fio_dir: "/etc/fio".into(),
        json: false,
    };
    while let Some(f) = a.next() {
        match f {
            "--dev" => o.dev = a.value(f)?.into(),
            "--time" => o.time = a.secs(f)?,
            "--label" => o.label = a.value(f)?.into(),
            "--no-header" => o.header = false,
            "--no-fio" => o.fio = false,
            "--fio-dir" => o.fio_dir = a.value(f)?.into(),
            "--json" => o.json = true,
            other => return Err(a.unknown(other)),
        }
    }
    Ok(o)
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

/// What each request of one phase returned (bytes or a negative errno) and how long it took
/// from submission to completion.
struct Record {
    res: Vec<Option<i64>>,
    latency: Vec<std::time::Duration>,
}

impl Record {
    fn new(n: usize) -> Self {
        Record {
            res: vec![None; n],
            latency: vec![std::time::Duration::ZERO; n],
        }
    }

    /// Record request `i`'s completion. A second completion, or a count larger than asked,
    /// fails whatever the mode; a result other than `want` fails unless `tolerate`.
    fn complete(
        &mut self,
        i: usize,
        res: i64,
        want: i64,
        since: std::time::Instant,
        tolerate: bool,
    ) -> Result<(), String> {
        let slot = self
            .res
            .get_mut(i)
            .ok_or_else(|| format!("completion for unknown request {i} (result {res})"))?;
        if let Some(first) = slot {
            return Err(format!(
                "request {i}: completed twice (results {first} and {res})"
            ));
        }
        *slot = Some(res);
        self.latency[i] = since.elapsed();
        if res > want {
            return Err(format!(
                "request {i}: result {res} is more than the {want} bytes asked"
            ));
        }
        if res != want && !tolerate {
            return Err(format!("request {i}: result {res} (expected {want})"));
        }
        Ok(())
    }
}

fn run_jobs(fd: i32, o: &Opts, jobs: &mut [Job], write: bool) -> Result<Record, String> {
    let want = |j: &Job| j.buf.len as i64;
    let mut rec = Record::new(jobs.len());
    let mut started = vec![std::time::Instant::now(); jobs.len()];
    match o.engine {
        Engine::Sync => {
            for (i, j) in jobs.iter_mut().enumerate() {
                started[i] = std::time::Instant::now();
                let res = if write {
                    // SAFETY: the iovecs describe live memory of `j.buf`.
                    unsafe {
                        libc::pwritev(fd, j.iov.as_ptr(), j.iov.len() as i32, j.offset as i64)
                    }
                } else {
                    // SAFETY: as above, writable.
                    unsafe { libc::preadv(fd, j.iov.as_ptr(), j.iov.len() as i32, j.offset as i64) }
                };
                let res = if res < 0 {
                    let err = std::io::Error::last_os_error();
                    if !o.tolerate {
                        return Err(format!(
                            "request {i}: {} at {} returned {res} ({err})",
                            if write { "write" } else { "read" },
                            j.offset,
                        ));
                    }
                    -i64::from(err.raw_os_error().unwrap_or(libc::EIO))
                } else {
                    res as i64
                };
                rec.complete(i, res, want(j), started[i], o.tolerate)?;
            }
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
                    let now = std::time::Instant::now();
                    // SAFETY: the kernel copies each iocb at submission; the buffers in `jobs` belong to
                    // the caller and outlive `ctx`, whose drop (io_destroy) waits for in-flight requests.
                    let n =
                        unsafe { ctx.submit(&mut ptrs) }.map_err(|e| format!("io_submit: {e}"))?;
                    for t in &mut started[next..next + n] {
                        *t = now;
                    }
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
                    let i = ev.data as usize;
                    let (w, t) = match (jobs.get(i), started.get(i)) {
                        (Some(j), Some(t)) => (want(j), *t),
                        _ => return Err(format!("event for unknown request {}", ev.data)),
                    };
                    rec.complete(i, ev.res, w, t, o.tolerate)?;
                }
                inflight -= got;
            }
            if o.tolerate {
                // Nothing may complete twice, not even late.
                std::thread::sleep(std::time::Duration::from_millis(300));
                let stray = ctx
                    .get_events(0, &mut events, Some(std::time::Duration::ZERO))
                    .map_err(|e| format!("io_getevents: {e}"))?;
                if let Some(ev) = events[..stray].first() {
                    return Err(format!(
                        "request {}: a stray completion (result {}) after all {} completed",
                        ev.data,
                        ev.res,
                        jobs.len()
                    ));
                }
            }
        }
        Engine::Uring => {
            use io_uring::{opcode, types, IoUring};
            let mut ring = IoUring::new(o.qd.next_power_of_two() as u32)
                .map_err(|e| format!("io_uring_setup: {e}"))?;
            if o.fixed {
                // Registered ("fixed") buffers reach the driver as bvec iterators of pages the
                // ring already pinned, a different path from user iovecs.
                let bufs: Vec<libc::iovec> = jobs
                    .iter_mut()
                    .map(|j| libc::iovec {
                        iov_base: j.buf.as_mut_ptr().cast(),
                        iov_len: j.buf.len,
                    })
                    .collect();
                // SAFETY: the buffers live in `jobs`, which outlives the ring (dropped at the
                // end of this block, which unregisters them).
                unsafe { ring.submitter().register_buffers(&bufs) }
                    .map_err(|e| format!("io_uring register_buffers: {e}"))?;
            }
            let mut next = 0;
            let mut inflight = 0;
            while next < jobs.len() || inflight > 0 {
                while next < jobs.len() && inflight < o.qd {
                    let j = &mut jobs[next];
                    let fdt = types::Fd(fd);
                    let sqe = match (o.vectored, write) {
                        _ if o.fixed && write => opcode::WriteFixed::new(
                            fdt,
                            j.buf.as_mut_ptr(),
                            j.buf.len as u32,
                            next as u16,
                        )
                        .offset(j.offset)
                        .build(),
                        _ if o.fixed => opcode::ReadFixed::new(
                            fdt,
                            j.buf.as_mut_ptr(),
                            j.buf.len as u32,
                            next as u16,
                        )
                        .offset(j.offset)
                        .build(),
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
                    started[next] = std::time::Instant::now();
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
                    let i = data as usize;
                    let (w, t) = match (jobs.get(i), started.get(i)) {
                        (Some(j), Some(t)) => (want(j), *t),
                        _ => return Err(format!("completion for unknown request {data}")),
                    };
                    rec.complete(i, i64::from(res), w, t, o.tolerate)?;
                    inflight -= 1;
                }
            }
            if o.tolerate {
                std::thread::sleep(std::time::Duration::from_millis(300));
                ring.submit().map_err(|e| format!("io_uring_enter: {e}"))?;
                if let Some(c) = ring.completion().next() {
                    return Err(format!(
                        "request {}: a stray completion (result {}) after all {} completed",
                        c.user_data(),
                        c.result(),
                        jobs.len()
                    ));
                }
            }
        }
    }
    Ok(rec)
}

/// `--tolerate`: what the requests of a run came to.
#[derive(Default)]
struct Tally {
    ok: u64,
    short: u64,
    failed: u64,
    /// errno -> count.
    errnos: std::collections::BTreeMap<i64, u64>,
    /// Lengths the short reads returned -> count.
    short_lens: std::collections::BTreeMap<i64, u64>,
    rewrites: u64,
    bad_data: u64,
    slowest: std::time::Duration,
}

impl Tally {
    fn add(&mut self, res: i64, want: i64, latency: std::time::Duration) {
        self.slowest = self.slowest.max(latency);
        if res == want {
            self.ok += 1;
        } else if res < 0 {
            self.failed += 1;
            *self.errnos.entry(-res).or_default() += 1;
        } else {
            self.short += 1;
            *self.short_lens.entry(res).or_default() += 1;
        }
    }

    fn line(&self) -> String {
        let join = |m: &std::collections::BTreeMap<i64, u64>| {
            if m.is_empty() {
                "none".to_string()
            } else {
                m.iter()
                    .map(|(k, v)| format!("{k}x{v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        format!(
            " ok={} short={} failed={} errnos={} short_lens={} rewrites={} bad_data={} max_ms={}",
            self.ok,
            self.short,
            self.failed,
            join(&self.errnos),
            join(&self.short_lens),
            self.rewrites,
            self.bad_data,
            self.slowest.as_millis()
        )
    }
}

/// `--tolerate`: write `j` again with pwritev until it succeeds in full (each attempt is one
/// more request to the faulty device). Returns the number of attempts.
fn rewrite(fd: i32, i: usize, j: &Job) -> Result<u64, String> {
    for attempt in 1..=64u64 {
        // SAFETY: the iovecs describe live memory of `j.buf`.
        let res = unsafe { libc::pwritev(fd, j.iov.as_ptr(), j.iov.len() as i32, j.offset as i64) };
        if res as i64 == j.buf.len as i64 {
            return Ok(attempt);
        }
        if res > j.buf.len as isize {
            return Err(format!(
                "request {i}: rewrite returned {res}, more than the {} bytes asked",
                j.buf.len
            ));
        }
    }
    Err(format!("request {i}: the write failed 64 times over"))
}

fn verify(o: &Opts) -> Result<String, String> {
    let flags = if o.direct { libc::O_DIRECT } else { 0 } | if o.dsync { libc::O_DSYNC } else { 0 };
    let file = open_dev(&o.dev, flags)?;
    let fd = file.as_raw_fd();
    let capacity = device_info(fd)?.capacity;
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
    if let Some(bs) = o.bs {
        if bs + if o.unaligned { 511 } else { 0 } > slot {
            return Err(format!(
                "--bs {bs} does not fit the {slot}-byte slot of each of {} requests",
                o.requests
            ));
        }
    }
    let mut rng = Rng(o.seed);
    let mut jobs: Vec<Job> = (0..o.requests)
        .map(|i| {
            let misalign = if o.unaligned {
                rng.below(511) as usize + 1
            } else {
                0
            };
            let len = match o.bs {
                Some(bs) => bs as usize,
                None if o.unaligned => 1 + rng.below(slot - misalign as u64) as usize,
                None => 512 * (1 + rng.below(slot / 512)) as usize,
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
    let mut tally = Tally::default();
    if o.phase != Phase::ReadOnly {
        let rec = run_jobs(fd, o, &mut jobs, true)?;
        for (i, j) in jobs.iter().enumerate() {
            let want = j.buf.len as i64;
            let res = rec.res[i].ok_or_else(|| format!("request {i}: never completed"))?;
            tally.add(res, want, rec.latency[i]);
            if res >= 0 && res < want {
                // The device never shortens a write: a short count is the driver's invention.
                return Err(format!("request {i}: write returned {res} of {want} bytes"));
            }
            if res != want {
                tally.rewrites += rewrite(fd, i, j)?;
            }
        }
    }
    let mut reads = None;
    if o.phase != Phase::WriteOnly {
        for j in &mut jobs {
            j.buf.bytes_mut().fill(0);
        }
        reads = Some(run_jobs(fd, o, &mut jobs, false)?);
    }
    let elapsed = started.elapsed();
    let mut bytes = 0u64;
    for (i, j) in jobs.iter().enumerate() {
        bytes += j.buf.len as u64;
        let Some(rec) = reads.as_ref() else { continue };
        let want = j.buf.len as i64;
        let res = rec.res[i].ok_or_else(|| format!("request {i}: never completed"))?;
        tally.add(res, want, rec.latency[i]);
        // Only the bytes the read returned are the device's; the rest stay zero-filled.
        let got = res.clamp(0, want) as usize;
        if let Some(k) = j.buf.bytes()[..got]
            .iter()
            .enumerate()
            .position(|(k, b)| *b != pattern(o.seed, j.offset + k as u64))
        {
            let msg = format!(
                "request {i}: mismatch at byte {k} of {} (offset {}, {got} bytes returned)",
                j.buf.len,
                j.offset + k as u64
            );
            if !o.allow_corrupt {
                return Err(msg);
            }
            println!("verify: bad data: {msg}");
            tally.bad_data += 1;
        }
    }
    let phase = match o.phase {
        Phase::Both => "",
        Phase::WriteOnly => " phase=write-only",
        Phase::ReadOnly => " phase=read-only",
    };
    Ok(format!(
        "verify: engine={:?} qd={} requests={} bytes={} unaligned={} vectored={} direct={}{}{}{phase}{} time={:.1}ms: OK",
        o.engine, o.qd, o.requests, bytes, o.unaligned, o.vectored, o.direct,
        if o.fixed { " fixed=true" } else { "" },
        if o.dsync { " dsync=true" } else { "" },
        if o.tolerate { tally.line() } else { String::new() },
        elapsed.as_secs_f64() * 1000.0
    ).to_lowercase())
}

/// The driver's statistics beyond the INFO ioctl's (`/sys/kernel/debug/aiodmaN/stats`: how
/// the device misbehaved and what the driver did), as `name: value` lines after the INFO dump;
/// empty without debugfs.
fn debugfs_stats(dev: &str) -> String {
    const IN_INFO: [&str; 8] = [
        "submitted",
        "async_completions",
        "sync_completions",
        "errors",
        "bytes",
        "timeouts",
        "cancels",
        "resets",
    ];
    let name = dev.rsplit('/').next().unwrap_or(dev);
    let path = format!("/sys/kernel/debug/{name}/stats");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return String::new();
    };
    let mut out = format!("\ndriver statistics ({path}):");
    for line in text.lines() {
        let key = line.split(':').next().unwrap_or("");
        if !IN_INFO.contains(&key) {
            out.push_str("\n    ");
            out.push_str(line);
        }
    }
    out
}

/// What a subcommand produced: a line to print on success, or whether its own report passed.
enum Done {
    Line(String),
    Passed(bool),
}

fn dispatch(args: &[String]) -> Result<Result<Done, String>, Usage> {
    let Some(cmd) = args.first() else {
        return Err(Usage("no command (aiodma-aio help)".into()));
    };
    let mut a = Args {
        it: args[1..].iter(),
        cmd,
    };
    Ok(match cmd.as_str() {
        "help" | "--help" | "-h" => Ok(Done::Line(format!("{}\n{}", USAGE.trim_end(), soak::USAGE))),
        "info" => {
            let dev = parse_dev_only(&mut a)?;
            std::fs::File::open(&dev)
                .map_err(|e| format!("open {dev}: {e}"))
                .and_then(|f| device_info(f.as_raw_fd()))
                .map(|i| Done::Line(format!("{i:#?}{}", debugfs_stats(&dev))))
        }
        "verify" => verify(&parse_verify(&mut a)?).map(Done::Line),
        "edge" => edge::run(&parse_edge(&mut a)?).map(Done::Passed),
        "cancel" => cancel::run(&parse_cancel(&mut a)?).map(Done::Passed),
        "abandon" => abandon::run(&parse_abandon(&mut a)?).map(Done::Passed),
        "sigstorm" => sigstorm::run(&parse_sigstorm(&mut a)?).map(Done::Passed),
        "nowait" => nowait::run(&parse_nowait(&mut a)?).map(Done::Passed),
        "churn" => churn::run(&parse_churn(&mut a)?).map(Done::Passed),
        "soak" => soak::run(&soak::parse(&args[1..]).map_err(Usage)?).map(Done::Passed),
        "bench" => {
            let b = parse_bench(&mut a)?;
            if b.header && !b.json {
                println!("{}", Row::header(false));
            }
            if b.header_only {
                return Ok(Ok(Done::Passed(true)));
            }
            bench::run(&b.o).map(|r| Done::Line(if b.json { r.json(None) } else { r.line(None) }))
        }
        "bench-suite" => suite::run(&parse_suite(&mut a)?).map(|()| Done::Passed(true)),
        other => {
            return Err(Usage(format!(
                "unknown command '{other}' (info|verify|edge|cancel|abandon|sigstorm|nowait|churn|soak|bench|bench-suite|help)"
            )))
        }
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&args) {
        Err(Usage(e)) => {
            eprintln!("aiodma-aio: {e}");
            ExitCode::from(2)
        }
        Ok(Ok(Done::Line(line))) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Ok(Ok(Done::Passed(true))) => ExitCode::SUCCESS,
        Ok(Ok(Done::Passed(false))) => ExitCode::FAILURE,
        Ok(Err(e)) => {
            eprintln!("aiodma-aio: {e}");
            ExitCode::FAILURE
        }
    }
}
