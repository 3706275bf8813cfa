//! `aiodma-aio soak`: a long seeded workload against `/dev/aiodma0` that checks everything it
//! gets back, meant to run under the device's fault injection for a million requests.
//!
//! Layout: the parent forks `--procs` worker processes of `--threads` workers each (a
//! [`worker::Worker`] per thread) and gives every worker a disjoint region of the device; the
//! last share is the leavers' ([`leaver`]), short-lived processes the parent forks now and then
//! to exit or be killed with requests in flight. The parent itself does no I/O and never starts
//! a thread, so it may fork at any time; once a second it prints the shared counters and the
//! driver's statistics, and it watches every worker's blocking calls for hangs.
//!
//! What fails the soak (exit 1): a submission with no completion by the deadline (lost), a
//! second completion (duplicated), a read whose returned bytes differ from what the last
//! acknowledged write put there (stale read if they are an earlier write's, else undetected
//! corruption), a call or process exit that does not return by the deadline (hang), a kernel
//! splat (WARN, BUG, KASAN, ... in the kernel log), or a worker that cannot run. Errors the
//! driver returns are allowed and counted by errno (the faults make them), and so are short
//! reads (the bytes returned are checked).

pub mod counters;
pub mod kernel;
pub mod leaver;
pub mod shadow;
pub mod worker;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use counters::{self as c, Counters};
use leaver::Leave;
use worker::{Worker, WorkerCfg};

use crate::proc::{fork, now_ms, status_name, Child};
use crate::util::{device_info, open_dev, parse_secs, parse_size, Rng};

/// The `soak` lines of `aiodma-aio help`.
pub const USAGE: &str = "\
  soak [--seed S] [--requests N] [--seconds T] [--procs P] [--threads K] [--max-bs BYTES]
       [--base BYTES] [--span BYTES] [--deadline SECS] [--leave-every SECS] [--keep-going]
                            seeded mix of sync, libaio and io_uring (fixed, vectored) reads,
                            writes and fsyncs, aligned and not, 512 B..4 MiB, from K threads in
                            each of P processes, with cancels, fd closes, io_destroy and process
                            exits with requests in flight; every read is checked against a
                            shadow of the acknowledged writes; one line a second, then
                            'soak: N requests, 0 lost, ...'; fails on a lost, duplicated,
                            corrupt or stale result, a hang or a kernel splat";

/// What `soak` was asked to do.
#[derive(Debug, Clone)]
pub struct SoakOpts {
    /// Device path.
    pub dev: String,
    /// Seed of every choice.
    pub seed: u64,
    /// Requests to submit in total (then stop).
    pub requests: u64,
    /// Stop starting new work after this long (None: no cap).
    pub seconds: Option<Duration>,
    /// Worker processes.
    pub procs: usize,
    /// Worker threads per process.
    pub threads: usize,
    /// Largest request.
    pub max_bs: usize,
    /// Device area used: `[base, base + span)`.
    pub base: u64,
    /// Bytes of it (None: to the end of the device).
    pub span: Option<u64>,
    /// Longest wait for a completion or a blocking call (None: from the driver's timeout).
    pub deadline: Option<Duration>,
    /// Mean time between leavers (None: no leavers).
    pub leave_every: Option<Duration>,
    /// Go on after the first failure instead of stopping.
    pub keep_going: bool,
}

impl Default for SoakOpts {
    fn default() -> Self {
        Self {
            dev: "/dev/aiodma0".into(),
            seed: 1,
            requests: 1_000_000,
            seconds: None,
            procs: 2,
            threads: 2,
            max_bs: 4 << 20,
            base: 0,
            span: None,
            deadline: None,
            leave_every: Some(Duration::from_secs(2)),
            keep_going: false,
        }
    }
}

/// Parse the options after `soak`.
pub fn parse(args: &[String]) -> Result<SoakOpts, String> {
    let mut o = SoakOpts::default();
    let mut it = args.iter().map(String::as_str);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("soak {flag} needs a value"))
        };
        let bad = |v: &str| format!("soak {flag}: bad value '{v}'");
        match flag {
            "--dev" => o.dev = value()?.into(),
            "--seed" => {
                let v = value()?;
                o.seed = v.parse().map_err(|_| bad(v))?;
            }
            "--requests" => {
                let v = value()?;
                o.requests = v.parse().map_err(|_| bad(v))?;
            }
            "--procs" => {
                let v = value()?;
                o.procs = v.parse().map_err(|_| bad(v))?;
            }
            "--threads" => {
                let v = value()?;
                o.threads = v.parse().map_err(|_| bad(v))?;
            }
            "--seconds" => {
                let v = value()?;
                o.seconds = Some(parse_secs(v).ok_or_else(|| bad(v))?);
            }
            "--deadline" => {
                let v = value()?;
                o.deadline = Some(parse_secs(v).ok_or_else(|| bad(v))?);
            }
            "--leave-every" => {
                let v = value()?;
                o.leave_every = match v {
                    "0" => None,
                    _ => Some(parse_secs(v).ok_or_else(|| bad(v))?),
                };
            }
            "--max-bs" => {
                let v = value()?;
                o.max_bs = parse_size(v).ok_or_else(|| bad(v))? as usize;
            }
            "--base" => {
                let v = value()?;
                o.base = parse_size(v).ok_or_else(|| bad(v))?;
            }
            "--span" => {
                let v = value()?;
                o.span = Some(parse_size(v).ok_or_else(|| bad(v))?);
            }
            "--keep-going" => o.keep_going = true,
            other => return Err(format!("soak: unknown option '{other}' (aiodma-aio help)")),
        }
    }
    let workers = o.procs * o.threads;
    if o.requests == 0
        || o.procs == 0
        || o.threads == 0
        || workers + 1 > c::MAX_WORKERS
        || o.max_bs < 512
        || o.max_bs > 8 << 20
    {
        return Err(format!(
            "soak: --requests, --procs and --threads at least 1, at most {} workers, --max-bs \
             512..=8M",
            c::MAX_WORKERS - 1
        ));
    }
    Ok(o)
}

/// SplitMix-style mixing of the seed with a stream number, so workers do not share choices.
fn sub_seed(seed: u64, stream: u64) -> u64 {
    let mut r = Rng(seed ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03));
    r.next_u64()
}

/// How the device area is shared out.
#[derive(Debug, Clone, Copy)]
struct Layout {
    base: u64,
    /// Bytes per worker (and for the leavers' slots together).
    share: u64,
    workers: usize,
    max_bs: usize,
    slots: usize,
    slot: u64,
    leaver_bs: usize,
}

impl Layout {
    fn new(o: &SoakOpts, capacity: u64) -> Result<Self, String> {
        if o.base >= capacity {
            return Err(format!("--base {} is past the capacity {capacity}", o.base));
        }
        let span = o.span.unwrap_or(capacity).min(capacity - o.base);
        let workers = o.procs * o.threads;
        let share = span / (workers as u64 + 1) / 4096 * 4096;
        // Two of the largest requests must fit a region, or batches could not place them.
        let max_bs = (o.max_bs as u64).min(share / 2) as usize;
        if max_bs < 4096 {
            return Err(format!(
                "{span} bytes are too few for {workers} workers and the leavers"
            ));
        }
        let slots = 4;
        let slot = share / slots as u64 / 4096 * 4096;
        Ok(Self {
            base: o.base,
            share,
            workers,
            max_bs,
            slots,
            slot,
            leaver_bs: (slot / 2).min(1 << 20) as usize,
        })
    }

    fn worker(&self, w: usize) -> (u64, u64) {
        let lo = self.base + w as u64 * self.share;
        (lo, lo + self.share)
    }

    fn leaver_slot(&self, s: usize) -> (u64, u64) {
        let lo = self.base + self.workers as u64 * self.share + s as u64 * self.slot;
        (lo, lo + self.slot)
    }
}

/// A leaver the parent is looking after.
#[derive(Debug)]
struct LeaverRun {
    child: Child,
    slot: usize,
    how: Leave,
    started: Instant,
    /// When it was SIGKILLed (Killed) — its deadline to be gone starts then.
    killed: Option<Instant>,
    hang_counted: bool,
}

/// The parent's state.
struct Parent<'a> {
    o: &'a SoakOpts,
    ctrs: &'a Counters,
    layout: Layout,
    deadline: Duration,
    quarantine: Duration,
    rng: Rng,
    /// When each leaver slot was last freed (None: never used).
    slot_free_at: Vec<Option<Instant>>,
    leaver: Option<LeaverRun>,
    leavers: u64,
    next_leaver: Option<Instant>,
    splats_at_start: usize,
}

impl Parent<'_> {
    fn fork_workers(&self) -> Result<Vec<Child>, String> {
        let mut procs = Vec::with_capacity(self.o.procs);
        for p in 0..self.o.procs {
            let cfgs: Vec<WorkerCfg> = (0..self.o.threads)
                .map(|t| {
                    let w = p * self.o.threads + t;
                    let (lo, hi) = self.layout.worker(w);
                    WorkerCfg {
                        id: w,
                        name: format!("w{w}"),
                        dev: self.o.dev.clone(),
                        lo,
                        hi,
                        seed: sub_seed(self.o.seed, w as u64 + 1),
                        max_bs: self.layout.max_bs,
                        deadline: self.deadline,
                        target: self.o.requests as i64,
                        tag_base: (w as u64 + 1) << 44,
                    }
                })
                .collect();
            let ctrs = self.ctrs;
            procs.push(fork(move || worker_process(cfgs, ctrs))?);
        }
        Ok(procs)
    }

    /// Fork the next leaver if one is due and a slot is out of quarantine.
    fn maybe_fork_leaver(&mut self, now: Instant) -> Result<(), String> {
        let (Some(every), Some(due)) = (self.o.leave_every, self.next_leaver) else {
            return Ok(());
        };
        if self.leaver.is_some() || now < due || self.ctrs.get(c::STOP) != 0 {
            return Ok(());
        }
        let Some(slot) = (0..self.layout.slots).find(|&s| {
            self.slot_free_at[s].is_none_or(|t| now.duration_since(t) >= self.quarantine)
        }) else {
            return Ok(());
        };
        let k = self.leavers;
        self.leavers += 1;
        let (lo, hi) = self.layout.leaver_slot(slot);
        let id = self.layout.workers;
        let cfg = WorkerCfg {
            id,
            name: format!("leaver{k}"),
            dev: self.o.dev.clone(),
            lo,
            hi,
            seed: sub_seed(self.o.seed, 0x1ea7_0000 + k),
            max_bs: self.layout.leaver_bs,
            deadline: self.deadline,
            target: i64::MAX,
            tag_base: (id as u64 + 1 + k) << 44,
        };
        let how = Leave::pick(&mut self.rng);
        let steps = 1 + self.rng.below(6);
        self.ctrs.set(c::LEAVER_READY, 0);
        let ctrs = self.ctrs;
        let child = fork(move || leaver::run(cfg, ctrs, steps, how))?;
        self.slot_free_at[slot] = None;
        self.leaver = Some(LeaverRun {
            child,
            slot,
            how,
            started: now,
            killed: None,
            hang_counted: false,
        });
        // Next one after 0.5..1.5 times the mean.
        let ms = every.as_millis() as u64;
        self.next_leaver = Some(now + Duration::from_millis(ms / 2 + self.rng.below(ms + 1)));
        Ok(())
    }

    /// Kill a leaver that is ready for it, reap one that is gone, count one that hangs.
    fn tend_leaver(&mut self, now: Instant) {
        let Some(l) = self.leaver.as_mut() else {
            return;
        };
        if let Some(st) = l.child.try_wait() {
            // Exit 0, or our SIGKILL (a Killed leaver; or any, once stopping); exit 1 is a
            // setup failure the leaver counted itself. Anything else is a failure.
            let exited = libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0;
            let killed =
                l.killed.is_some() && libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL;
            let counted = libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 1;
            if !(exited || killed || counted) {
                self.ctrs.add(c::FAILED_WORKERS, 1);
                println!(
                    "soak: leaver (pid {}, {:?}) ended with {}",
                    l.child.pid(),
                    l.how,
                    status_name(st)
                );
            }
            self.slot_free_at[l.slot] = Some(now);
            self.leaver = None;
            // A leaver killed inside a blocking call never cleared its watch slot.
            self.ctrs.set(c::busy_since(self.layout.workers), 0);
            return;
        }
        let stopping = self.ctrs.get(c::STOP) != 0;
        if l.killed.is_none() && (self.ctrs.get(c::LEAVER_READY) != 0 || stopping) {
            if self.ctrs.get(c::LEAVER_READY) != 0 {
                self.ctrs.add(c::KILLS, 1);
            }
            l.child.signal(libc::SIGKILL);
            l.killed = Some(now);
        }
        // Its deadline: from the kill, else from its start plus its work (a few batches, each
        // within the deadline, then the exit).
        let since = l.killed.unwrap_or(l.started);
        let limit = if l.killed.is_some() {
            self.deadline
        } else {
            self.deadline * 8
        };
        if !l.hang_counted && now.duration_since(since) > limit {
            l.hang_counted = true;
            self.ctrs.add(c::HANGS, 1);
            println!(
                "soak: HANG: leaver pid {} ({:?}) is not gone {} s after {}",
                l.child.pid(),
                l.how,
                limit.as_secs(),
                if l.killed.is_some() {
                    "SIGKILL"
                } else {
                    "it started"
                }
            );
        }
    }

    /// Count a hang for every worker whose blocking call outlived the deadline.
    fn watch_hangs(&self) {
        let now = now_ms();
        for w in 0..=self.layout.workers {
            let since = self.ctrs.get(c::busy_since(w));
            if since > 0
                && now - since > self.deadline.as_millis() as i64
                && self.ctrs.get(c::hang_counted(w)) == 0
            {
                self.ctrs.set(c::hang_counted(w), 1);
                self.ctrs.add(c::HANGS, 1);
                println!(
                    "soak: HANG: worker {w}: a blocking call (sync I/O, close or io_destroy) has \
                     not returned for {} s",
                    (now - since) / 1000
                );
            }
        }
    }

    fn splats(&self) -> (usize, Vec<String>) {
        let Some(log) = kernel::log() else {
            return (0, Vec::new());
        };
        let lines = kernel::splat_lines(&log);
        let new: Vec<String> = lines
            .iter()
            .skip(self.splats_at_start)
            .map(|l| l.to_string())
            .collect();
        (new.len(), new)
    }
}

/// A worker process: one thread per worker; exit 0, or 1 if one could not run.
fn worker_process(cfgs: Vec<WorkerCfg>, ctrs: &Counters) -> i32 {
    let failed = std::thread::scope(|s| {
        let handles: Vec<_> = cfgs
            .into_iter()
            .map(|cfg| s.spawn(move || worker_thread(cfg, ctrs)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(false))
            .filter(|ok| !ok)
            .count()
    });
    i32::from(failed > 0)
}

/// One worker thread; false if it could not run.
fn worker_thread(cfg: WorkerCfg, ctrs: &Counters) -> bool {
    let name = cfg.name.clone();
    let mut w = match Worker::new(cfg, ctrs) {
        Ok(w) => w,
        Err(e) => {
            println!("soak: {name}: {e}");
            ctrs.add(c::FAILED_WORKERS, 1);
            return false;
        }
    };
    w.fill_region();
    while !w.should_stop() {
        if let Err(e) = w.step() {
            println!("soak: {name}: {e}");
            ctrs.add(c::FAILED_WORKERS, 1);
            if !w.poisoned {
                w.settle_strays();
            }
            return false;
        }
    }
    if w.poisoned {
        // Requests of ours may still be in the kernel: dropping the worker would wait in
        // io_destroy for ever and free memory they may still write. Leave it all.
        std::mem::forget(w);
        return true;
    }
    w.settle_strays();
    true
}

/// Run the soak; `Ok(true)` when nothing failed.
pub fn run(o: &SoakOpts) -> Result<bool, String> {
    let (capacity, num_queues) = {
        let f = open_dev(&o.dev, 0)?;
        let info = device_info(f.as_raw_fd())?;
        (info.capacity, info.num_queues)
    };
    let layout = Layout::new(o, capacity)?;
    let timeout_ms = kernel::driver_timeout_ms();
    // A request the device never completes is failed by the driver after its timeout (plus a
    // watchdog tick and a reset); the deadline leaves room for a slow emulated guest too.
    let deadline = o
        .deadline
        .unwrap_or(Duration::from_millis((3 * timeout_ms + 10_000).max(60_000)));
    let quarantine = Duration::from_millis(2 * timeout_ms + 1000);
    let ctrs = Counters::new()?;
    let splats_at_start = kernel::log()
        .map(|l| kernel::splat_lines(&l).len())
        .unwrap_or(0);
    println!(
        "soak: seed {} requests {} procs {} threads {} queues {num_queues} capacity {capacity} \
         region {}+{} per worker, leaver slots {}x{}, max request {} B, deadline {} s, driver \
         timeout {timeout_ms} ms{}",
        o.seed,
        o.requests,
        o.procs,
        o.threads,
        layout.base,
        layout.share,
        layout.slots,
        layout.slot,
        layout.max_bs,
        deadline.as_secs(),
        o.seconds
            .map(|s| format!(", at most {} s", s.as_secs()))
            .unwrap_or_default()
    );
    let start = Instant::now();
    let mut parent = Parent {
        o,
        ctrs: &ctrs,
        layout,
        deadline,
        quarantine,
        rng: Rng(sub_seed(o.seed, 0x9a7e)),
        slot_free_at: vec![None; layout.slots],
        leaver: None,
        leavers: 0,
        next_leaver: o.leave_every.map(|e| start + e),
        splats_at_start,
    };
    let mut procs: Vec<(Child, Option<i32>)> = parent
        .fork_workers()?
        .into_iter()
        .map(|c| (c, None))
        .collect();
    let mut last_print = start;
    let mut last_requests = 0;
    let mut stop_at: Option<Instant> = None;
    let mut splats = 0;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        for (child, status) in procs.iter_mut() {
            if status.is_none() {
                *status = child.try_wait();
                if let Some(st) = *status {
                    if !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) <= 1) {
                        ctrs.add(c::FAILED_WORKERS, 1);
                        println!(
                            "soak: worker process {} ended with {}",
                            child.pid(),
                            status_name(st)
                        );
                    }
                }
            }
        }
        let workers_done = procs.iter().all(|(_, s)| s.is_some());
        parent.tend_leaver(now);
        parent.watch_hangs();
        let failing = ctrs.failures() > 0 || splats > 0;
        if stop_at.is_none()
            && (ctrs.get(c::REQUESTS) >= o.requests as i64
                || o.seconds.is_some_and(|s| now.duration_since(start) >= s)
                || (failing && !o.keep_going)
                || workers_done)
        {
            ctrs.set(c::STOP, 1);
            stop_at = Some(now);
        }
        if stop_at.is_none() {
            parent.maybe_fork_leaver(now)?;
        }
        if now.duration_since(last_print) >= Duration::from_secs(1) {
            splats = parent.splats().0;
            let requests = ctrs.get(c::REQUESTS);
            let rate =
                (requests - last_requests) as f64 / now.duration_since(last_print).as_secs_f64();
            println!(
                "soak: t={}s requests={requests} rate={rate:.0}/s {} | driver: {}",
                now.duration_since(start).as_secs(),
                progress(&ctrs, splats),
                kernel::driver_line(&kernel::driver_stats(&o.dev))
            );
            last_print = now;
            last_requests = requests;
        }
        if workers_done && parent.leaver.is_none() {
            break;
        }
        // Stopping: workers finish their batch (each bounded by the deadline); past that,
        // whatever is still running is stuck.
        if let Some(t) = stop_at {
            if now.duration_since(t) > deadline + Duration::from_secs(10) {
                let stuck: Vec<String> = procs
                    .iter()
                    .filter(|(_, s)| s.is_none())
                    .map(|(c, _)| format!("worker process {}", c.pid()))
                    .chain(
                        parent
                            .leaver
                            .as_ref()
                            .map(|l| format!("leaver {}", l.child.pid())),
                    )
                    .collect();
                println!(
                    "soak: HANG: {} did not finish within {} s of the stop",
                    stuck.join(", "),
                    now.duration_since(t).as_secs()
                );
                ctrs.add(c::HANGS, 1);
                break;
            }
        }
    }
    let elapsed = start.elapsed();
    let (splats, splat_lines) = parent.splats();
    for l in &splat_lines {
        println!("soak: KERNEL SPLAT: {l}");
    }
    let requests = ctrs.get(c::REQUESTS);
    println!(
        "soak: done in {:.1} s ({:.0} requests/s): {} | engines sync={} libaio={} uring={} \
         fixed={} vectored={} unaligned={} dsync={} | reads={} writes={} flushes={} \
         verified={} MiB moved={} MiB | closes={} destroys={} exits={} kills={} leavers={} | \
         driver: {}",
        elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64().max(0.001),
        progress(&ctrs, splats),
        ctrs.get(c::SYNC),
        ctrs.get(c::LIBAIO),
        ctrs.get(c::URING),
        ctrs.get(c::FIXED),
        ctrs.get(c::VECTORED),
        ctrs.get(c::UNALIGNED),
        ctrs.get(c::DSYNC),
        ctrs.get(c::READS),
        ctrs.get(c::WRITES),
        ctrs.get(c::FLUSHES),
        ctrs.get(c::VERIFIED) >> 20,
        ctrs.get(c::BYTES) >> 20,
        ctrs.get(c::CLOSES),
        ctrs.get(c::DESTROYS),
        ctrs.get(c::EXITS),
        ctrs.get(c::KILLS),
        parent.leavers,
        kernel::driver_line(&kernel::driver_stats(&o.dev))
    );
    let failed = ctrs.failures() > 0 || splats > 0;
    if ctrs.get(c::FAILED_WORKERS) > 0 {
        println!(
            "soak: {} worker(s) or leaver(s) could not run (see above)",
            ctrs.get(c::FAILED_WORKERS)
        );
    }
    println!(
        "soak: {requests} requests, {} lost, {} duplicated, {} undetected corruptions, {} stale \
         reads, {} hangs, {splats} kernel splats, seed {}",
        ctrs.get(c::LOST),
        ctrs.get(c::DUPLICATED),
        ctrs.get(c::CORRUPT),
        ctrs.get(c::STALE),
        ctrs.get(c::HANGS),
        o.seed
    );
    if failed {
        println!("soak: FAILED (seed {})", o.seed);
    }
    // Stuck children are left behind (SIGKILLed by Drop where they can be): the verdict is out.
    Ok(!failed)
}

/// The running counts, `ok=.. short=.. errors=EIO:3 cancels=2/9 lost=0 ...`.
fn progress(ctrs: &Counters, splats: usize) -> String {
    format!(
        "ok={} short={} errors={} cancels={}/{} unknown_writes={} lost={} dup={} corrupt={} \
         stale={} hangs={} splats={splats}",
        ctrs.get(c::OK),
        ctrs.get(c::SHORT),
        ctrs.errnos(),
        ctrs.get(c::CANCEL_TAKEN),
        ctrs.get(c::CANCEL_TRIED),
        ctrs.get(c::UNKNOWN_WRITES),
        ctrs.get(c::LOST),
        ctrs.get(c::DUPLICATED),
        ctrs.get(c::CORRUPT),
        ctrs.get(c::STALE),
        ctrs.get(c::HANGS),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_and_layout() {
        let o = parse(&args(
            "--seed 7 --requests 20000 --procs 3 --threads 2 --max-bs 1m",
        ))
        .unwrap();
        assert_eq!(
            (o.seed, o.requests, o.procs, o.threads, o.max_bs),
            (7, 20000, 3, 2, 1 << 20)
        );
        assert!(parse(&args("--procs 0")).is_err());
        assert!(parse(&args("--bogus")).is_err());
        assert!(parse(&args("--seed")).is_err());
        let l = Layout::new(&o, 64 << 20).unwrap();
        assert_eq!(l.workers, 6);
        assert_eq!(l.share % 4096, 0);
        let (_, last) = l.worker(5);
        assert_eq!(l.leaver_slot(0).0, last);
        assert!(l.leaver_slot(l.slots - 1).1 <= 64 << 20);
        assert!(l.max_bs as u64 * 2 <= l.share);
        assert!(Layout::new(&o, 8192).is_err());
        assert_ne!(sub_seed(1, 1), sub_seed(1, 2));
    }
}
