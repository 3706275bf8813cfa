//! `aiodma-aio sigstorm`: sync readers and writers under a storm of SIGSTOP, SIGCONT and
//! SIGALRM (one signal to every worker each period, ~1 ms), once with the SIGALRM handler
//! installed without `SA_RESTART` and once with it.
//!
//! Each worker process owns one region of `bs` bytes and alternates at random between writing
//! it whole (a new sequence number each time) and reading it whole. Every 4 KiB block carries
//! a header (magic, region, sequence number, block index) and a body derived from them, so a
//! block read back names the write it came from. Rules checked:
//!
//! - a transfer returns the full count, or -1 with `EINTR`; any other count (short, or a
//!   leaked `ERESTARTSYS`) or error fails;
//! - a full read holds, block by block, data of the last acknowledged write or of a write
//!   attempted after it that failed (its data may or may not have landed); anything older
//!   (an abandoned write landing late, or an abandoned read's DMA arriving in the buffer after
//!   a later read returned) or garbage fails;
//! - after the storm and a settle time, every region still holds the last acknowledged write
//!   (or a later failed one);
//! - every worker completes at least one write and one read during the storm (a driver that
//!   lets every signal abandon the transfer starves them);
//! - no worker stays in one call longer than the stall limit (a hang).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use crate::proc::{self, fork, now_ms, status_name, Child, Shared};
use crate::util::{errno_name, open_dev, AlignedBuf, Rng};

/// What `sigstorm` was asked to do.
#[derive(Debug, Clone)]
pub struct SigstormOpts {
    /// Device path.
    pub dev: String,
    /// Worker processes (one region each).
    pub workers: usize,
    /// Bytes per transfer (a multiple of 4096).
    pub bs: usize,
    /// Storm length per variant.
    pub secs: Duration,
    /// Time between signals.
    pub period: Duration,
    /// The variants: `SA_RESTART` off and/or on.
    pub restart: Vec<bool>,
    /// Device offset of the first region.
    pub base: u64,
    /// Wait after the storm before the final read-back (late DMA lands meanwhile).
    pub settle: Duration,
    /// Longest acceptable single call.
    pub stall: Duration,
    /// PRNG seed (choice of operations).
    pub seed: u64,
}

const BLOCK: usize = 4096;
const MAGIC: u64 = 0x5349_4753_544f_524d;

// Per-worker counters (index `w * FIELDS + field`).
const FIELDS: usize = 16;
const WRITES_OK: usize = 0;
const WRITES_EINTR: usize = 1;
const READS_OK: usize = 2;
const READS_EINTR: usize = 3;
const WRONG_COUNT: usize = 4;
const OTHER_ERR: usize = 5;
const MISMATCH: usize = 6;
const LAST_OK: usize = 7;
const LAST_TRIED: usize = 8;
const HANDLED: usize = 9;
const READY: usize = 10;
const IN_OP_SINCE: usize = 11;
const LONGEST_OP: usize = 12;
const REPORTS: usize = 13;

/// Body word `j` of block `block` of write `seq` to `region`.
fn word(region: u64, seq: u64, block: u64, j: u64) -> u64 {
    let mut z = (region << 48 ^ block << 24 ^ j)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(seq.wrapping_mul(0xd1b5_4a32_d192_ed03));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 31)
}

fn words(b: &[u8]) -> impl Iterator<Item = u64> + '_ {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
}

/// Fill `buf` with write `seq` of `region`.
fn fill(buf: &mut [u8], region: u64, seq: u64) {
    for (block, b) in buf.chunks_exact_mut(BLOCK).enumerate() {
        let block = block as u64;
        for (j, c) in b.chunks_exact_mut(8).enumerate() {
            let v = match j {
                0 => MAGIC,
                1 => region,
                2 => seq,
                3 => block,
                j => word(region, seq, block, j as u64),
            };
            c.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// What block `block` of `region` holds: the sequence number of an intact write, or why not.
fn block_seq(b: &[u8], region: u64, block: u64) -> Result<u64, String> {
    let mut w = words(b);
    let head: Vec<u64> = w.by_ref().take(4).collect();
    if head.iter().all(|&v| v == 0) {
        return Err("zeros".into());
    }
    if head[0] != MAGIC || head[1] != region || head[3] != block {
        return Err(format!(
            "garbage header {:#x} {} {} {}",
            head[0], head[1], head[2], head[3]
        ));
    }
    let seq = head[2];
    for (j, v) in w.enumerate() {
        if v != word(region, seq, block, j as u64 + 4) {
            return Err(format!("header says seq {seq} but word {} differs", j + 4));
        }
    }
    Ok(seq)
}

/// Check a whole region against the acceptable range of sequence numbers; the first problem.
fn check_region(buf: &[u8], region: u64, lo: u64, hi: u64) -> Option<String> {
    for (block, b) in buf.chunks_exact(BLOCK).enumerate() {
        match block_seq(b, region, block as u64) {
            Ok(s) if s >= lo && s <= hi => {}
            Ok(s) if s < lo => {
                return Some(format!(
                "block {block} holds seq {s}, older than the last acknowledged write {lo} (stale)"
            ))
            }
            Ok(s) => {
                return Some(format!(
                    "block {block} holds seq {s}, never written (acceptable {lo}..={hi})"
                ))
            }
            Err(e) => return Some(format!("block {block}: {e} (acceptable {lo}..={hi})")),
        }
    }
    None
}

/// The worker's own SIGALRM count (signal-safe).
static ALARMS: AtomicI64 = AtomicI64::new(0);

extern "C" fn on_alarm(_sig: libc::c_int) {
    ALARMS.fetch_add(1, Ordering::Relaxed);
}

fn install_alarm(restart: bool) -> Result<(), String> {
    // SAFETY: a zeroed sigaction is valid; the handler only touches an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_alarm as *const () as usize;
        sa.sa_flags = if restart { libc::SA_RESTART } else { 0 };
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut()) != 0 {
            return Err(format!("sigaction: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

struct Worker<'a> {
    o: &'a SigstormOpts,
    fd: RawFd,
    w: usize,
    sh: &'a Shared,
}

impl Worker<'_> {
    fn f(&self, field: usize) -> usize {
        self.w * FIELDS + field
    }

    fn report(&self, what: String) {
        if self.sh.get(self.f(REPORTS)) < 3 {
            self.sh.add(self.f(REPORTS), 1);
            println!("sigstorm worker {}: {what}", self.w);
        }
    }

    fn off(&self) -> u64 {
        self.o.base + (self.w * self.o.bs) as u64
    }

    /// One pread/pwrite, timed; the raw return value and errno.
    fn transfer(&self, write: bool, buf: &mut AlignedBuf) -> (isize, i32) {
        let t = now_ms();
        self.sh.set(self.f(IN_OP_SINCE), t);
        let r = if write {
            // SAFETY: `buf` holds `bs` readable bytes.
            unsafe { libc::pwrite(self.fd, buf.ptr().cast(), self.o.bs, self.off() as i64) }
        } else {
            // SAFETY: `buf` holds `bs` writable bytes.
            unsafe { libc::pread(self.fd, buf.ptr().cast(), self.o.bs, self.off() as i64) }
        };
        let e = if r < 0 { proc::errno() } else { 0 };
        self.sh.set(self.f(IN_OP_SINCE), 0);
        let took = now_ms() - t;
        if took > self.sh.get(self.f(LONGEST_OP)) {
            self.sh.set(self.f(LONGEST_OP), took);
        }
        (r, e)
    }

    fn write(&self, buf: &mut AlignedBuf) -> bool {
        let seq = self.sh.get(self.f(LAST_TRIED)) + 1;
        // Recorded before the call: from now on the region may hold this write.
        self.sh.set(self.f(LAST_TRIED), seq);
        fill(buf.bytes_mut(), self.w as u64, seq as u64);
        match self.transfer(true, buf) {
            (r, _) if r == self.o.bs as isize => {
                self.sh.set(self.f(LAST_OK), seq);
                self.sh.add(self.f(WRITES_OK), 1);
                true
            }
            (-1, libc::EINTR) => {
                self.sh.add(self.f(WRITES_EINTR), 1);
                false
            }
            (-1, e) => {
                self.sh.add(self.f(OTHER_ERR), 1);
                self.report(format!("write of seq {seq} failed: {}", errno_name(e)));
                false
            }
            (r, _) => {
                self.sh.add(self.f(WRONG_COUNT), 1);
                self.report(format!("write of seq {seq} returned {r} of {}", self.o.bs));
                false
            }
        }
    }

    fn read(&self, buf: &mut AlignedBuf) {
        let lo = self.sh.get(self.f(LAST_OK)) as u64;
        let hi = self.sh.get(self.f(LAST_TRIED)) as u64;
        buf.bytes_mut().fill(0);
        match self.transfer(false, buf) {
            (r, _) if r == self.o.bs as isize => {
                self.sh.add(self.f(READS_OK), 1);
                if let Some(p) = check_region(buf.bytes(), self.w as u64, lo, hi) {
                    self.sh.add(self.f(MISMATCH), 1);
                    self.report(format!("read: {p}"));
                }
            }
            (-1, libc::EINTR) => self.sh.add(self.f(READS_EINTR), 1),
            (-1, e) => {
                self.sh.add(self.f(OTHER_ERR), 1);
                self.report(format!("read failed: {}", errno_name(e)));
            }
            (r, _) => {
                self.sh.add(self.f(WRONG_COUNT), 1);
                self.report(format!("read returned {r} of {}", self.o.bs));
            }
        }
    }

    fn run(&self, restart: bool, stop: usize) -> i32 {
        if let Err(e) = install_alarm(restart) {
            self.report(e);
            return 3;
        }
        let (Ok(mut wbuf), Ok(mut rbuf)) = (AlignedBuf::new(self.o.bs), AlignedBuf::new(self.o.bs))
        else {
            return 3;
        };
        // A first write before the storm, so the region holds a known write.
        let mut tries = 0;
        while !self.write(&mut wbuf) {
            tries += 1;
            if tries > 20 {
                self.report("no write succeeded before the storm".into());
                return 4;
            }
        }
        // Only what completes during the storm counts.
        self.sh.set(self.f(WRITES_OK), 0);
        self.sh.set(self.f(READY), 1);
        let mut rng = Rng(self.o.seed ^ (self.w as u64) << 32 ^ u64::from(restart));
        while self.sh.get(stop) == 0 {
            if rng.below(2) == 0 {
                self.write(&mut wbuf);
            } else {
                self.read(&mut rbuf);
            }
        }
        self.sh.set(self.f(HANDLED), ALARMS.load(Ordering::Relaxed));
        0
    }
}

fn variant(o: &SigstormOpts, file: &File, sh: &Shared, restart: bool) -> Result<bool, String> {
    let fd = file.as_raw_fd();
    let stop = o.workers * FIELDS;
    let name = if restart {
        "SA_RESTART on"
    } else {
        "SA_RESTART off"
    };
    sh.set(stop, 0);
    for w in 0..o.workers {
        for field in [
            WRITES_OK,
            WRITES_EINTR,
            READS_OK,
            READS_EINTR,
            WRONG_COUNT,
            OTHER_ERR,
            MISMATCH,
            HANDLED,
            READY,
            IN_OP_SINCE,
            LONGEST_OP,
            REPORTS,
        ] {
            sh.set(w * FIELDS + field, 0);
        }
    }
    let mut children: Vec<Child> = Vec::new();
    for w in 0..o.workers {
        children.push(fork(|| Worker { o, fd, w, sh }.run(restart, stop))?);
    }
    let ready_by = Instant::now() + o.stall;
    while (0..o.workers).any(|w| sh.get(w * FIELDS + READY) == 0) {
        if Instant::now() > ready_by || children.iter_mut().any(|c| c.try_wait().is_some()) {
            sh.set(stop, 1);
            return Ok(line(
                name,
                false,
                "workers did not get ready (first write before the storm)",
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }

    // The storm: ALRM, STOP, CONT in turn, to every worker, one kind per period.
    let started = Instant::now();
    let mut sent = 0u64;
    let mut problems: Vec<String> = Vec::new();
    while started.elapsed() < o.secs {
        let sig = [libc::SIGALRM, libc::SIGSTOP, libc::SIGCONT][(sent % 3) as usize];
        for c in &children {
            c.signal(sig);
        }
        sent += 1;
        std::thread::sleep(o.period);
        if sent.is_multiple_of(64) {
            let now = now_ms();
            for w in 0..o.workers {
                let since = sh.get(w * FIELDS + IN_OP_SINCE);
                if since != 0 && now - since > o.stall.as_millis() as i64 && problems.is_empty() {
                    problems.push(format!(
                        "worker {w} stuck in one call for {} ms",
                        now - since
                    ));
                }
            }
            if !problems.is_empty() {
                break;
            }
        }
    }
    let storm_ms = started.elapsed().as_millis();
    sh.set(stop, 1);
    for c in &children {
        c.signal(libc::SIGCONT);
    }
    for (w, c) in children.iter_mut().enumerate() {
        match c.wait_for(o.stall) {
            Some(0) => {}
            Some(st) => problems.push(format!("worker {w} ended with {}", status_name(st))),
            None => {
                let since = sh.get(w * FIELDS + IN_OP_SINCE);
                problems.push(format!(
                    "worker {w} did not stop within {} ms (in one call for {} ms: HANG)",
                    o.stall.as_millis(),
                    if since == 0 { 0 } else { now_ms() - since }
                ));
                if c.kill(Duration::from_secs(2)).is_none() {
                    problems.push(format!("worker {w} did not die within 2 s of SIGKILL"));
                }
            }
        }
    }

    // Late DMA of abandoned transfers lands meanwhile; then every region must hold the last
    // acknowledged write (or a later failed one).
    std::thread::sleep(o.settle);
    let buf = AlignedBuf::new(o.bs)?;
    for w in 0..o.workers {
        let off = o.base + (w * o.bs) as u64;
        let (lo, hi) = (
            sh.get(w * FIELDS + LAST_OK) as u64,
            sh.get(w * FIELDS + LAST_TRIED) as u64,
        );
        // SAFETY: `buf` holds `bs` writable bytes; no signals reach the parent.
        let r = unsafe { libc::pread(fd, buf.ptr().cast(), o.bs, off as i64) };
        if r != o.bs as isize {
            problems.push(format!(
                "final read of region {w} returned {r} ({})",
                std::io::Error::last_os_error()
            ));
        } else if let Some(p) = check_region(buf.bytes(), w as u64, lo, hi) {
            problems.push(format!("final read of region {w}: {p}"));
        }
    }

    let sum = |field: usize| {
        (0..o.workers)
            .map(|w| sh.get(w * FIELDS + field))
            .sum::<i64>()
    };
    for w in 0..o.workers {
        let (wr, rd) = (
            sh.get(w * FIELDS + WRITES_OK),
            sh.get(w * FIELDS + READS_OK),
        );
        if wr == 0 || rd == 0 {
            problems.push(format!(
                "worker {w} starved: {wr} writes and {rd} reads completed in {storm_ms} ms"
            ));
        }
    }
    let (wrong, other, mism) = (sum(WRONG_COUNT), sum(OTHER_ERR), sum(MISMATCH));
    if wrong > 0 {
        problems.push(format!("{wrong} transfer(s) returned a wrong count"));
    }
    if other > 0 {
        problems.push(format!(
            "{other} transfer(s) failed with an error other than EINTR"
        ));
    }
    if mism > 0 {
        problems.push(format!("{mism} read(s) returned stale or garbage data"));
    }
    let longest = (0..o.workers)
        .map(|w| sh.get(w * FIELDS + LONGEST_OP))
        .max()
        .unwrap_or(0);
    let detail = format!(
        "{} workers x {} KiB for {storm_ms} ms, {sent} signal rounds; writes {} ok, {} EINTR; \
         reads {} ok, {} EINTR; wrong counts {wrong}; other errors {other}; bad data {mism}; \
         SIGALRM handled {}; longest call {longest} ms",
        o.workers,
        o.bs / 1024,
        sum(WRITES_OK),
        sum(WRITES_EINTR),
        sum(READS_OK),
        sum(READS_EINTR),
        sum(HANDLED),
    );
    let ok = problems.is_empty();
    let detail = if ok {
        detail
    } else {
        format!("{detail}; {}", problems.join("; "))
    };
    Ok(line(name, ok, &detail))
}

fn line(name: &str, ok: bool, detail: &str) -> bool {
    println!(
        "sigstorm {name}: {detail}: {}",
        if ok { "PASS" } else { "FAIL" }
    );
    ok
}

/// Run every variant; returns whether all passed.
pub fn run(o: &SigstormOpts) -> Result<bool, String> {
    let file = open_dev(&o.dev, 0)?;
    let cap = crate::util::device_info(file.as_raw_fd())?.capacity;
    if o.base + (o.workers * o.bs) as u64 > cap {
        return Err(format!(
            "--base {} + {} regions of {} bytes passes the capacity {cap}",
            o.base, o.workers, o.bs
        ));
    }
    println!(
        "sigstorm: {} workers, {} bytes per transfer, {} ms per variant, a signal every {} us",
        o.workers,
        o.bs,
        o.secs.as_millis(),
        o.period.as_micros()
    );
    let sh = Shared::new(o.workers * FIELDS + 1)?;
    let mut all = true;
    for &restart in &o.restart {
        all &= variant(o, &file, &sh, restart)?;
    }
    println!("sigstorm: {}", if all { "PASS" } else { "FAIL" });
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_name_their_write() {
        let mut b = vec![0u8; 2 * BLOCK];
        fill(&mut b, 3, 17);
        assert_eq!(block_seq(&b[BLOCK..], 3, 1), Ok(17));
        assert!(check_region(&b, 3, 17, 17).is_none());
        assert!(check_region(&b, 3, 15, 20).is_none());
        assert!(check_region(&b, 3, 18, 19).is_some_and(|p| p.contains("stale")));
        assert!(check_region(&b, 2, 17, 17).is_some());
        let mut older = vec![0u8; 2 * BLOCK];
        fill(&mut older, 3, 16);
        b[BLOCK..].copy_from_slice(&older[BLOCK..]);
        assert!(check_region(&b, 3, 17, 17)
            .is_some_and(|p| p.starts_with("block 1 holds seq 16") && p.contains("stale")));
        assert!(check_region(&b, 3, 16, 17).is_none());
        b[BLOCK + 100] ^= 1;
        assert!(block_seq(&b[BLOCK..], 3, 1).is_err());
        assert!(check_region(&[0u8; BLOCK], 0, 1, 1).is_some_and(|p| p.contains("zeros")));
    }
}
