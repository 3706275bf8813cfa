//! A device that lies (`aiodma run --fault KIND:...`, device/src/fault): the driver must catch
//! every lie in the used ring and reset the device, map unknown status codes to -EIO, return
//! short reads as short counts, reap completions whose interrupt was lost, shrug off spurious
//! interrupts and recover from a spontaneous NEEDS_RESET, and through all of it complete every
//! kiocb exactly once, from the right request, with a count no larger than asked.
//!
//! Every test boots the real guest with one fault kind and runs `aiodma-aio verify --tolerate`
//! through libaio, io_uring and sync I/O: a few hundred requests each, which may fail or (reads)
//! come back short, but must each complete exactly once (no duplicate or stray completion, no
//! hang), never with more bytes than asked, and return the right data for the bytes they
//! report; failed writes are written again before the reads. The driver's counters (the INFO
//! ioctl and `/sys/kernel/debug/aiodma0/stats`, both printed by `aiodma-aio info`) must show the
//! lie detected and the recovery taken, and `--fault-log` lets the tests count what the device
//! did. `aiodma-checked` fails any run whose kernel log has a warning, BUG or lockdep report.

// Integration tests fail by panicking; helpers outside #[test] fns count too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;

use aiodma_tests::{debug_guest, stat, Guest, RunOutcome, TempDir};

/// One `aiodma-aio verify --tolerate` summary line.
#[derive(Debug)]
struct Verify {
    engine: String,
    requests: u64,
    ok: u64,
    short: u64,
    failed: u64,
    /// errno -> count.
    errnos: BTreeMap<u64, u64>,
    /// Bytes a short read returned -> count.
    short_lens: BTreeMap<u64, u64>,
    bad_data: u64,
    max_ms: u64,
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn num(line: &str, key: &str) -> u64 {
    field(line, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key}= is not a number in {line:?}"))
}

fn counts(line: &str, key: &str) -> BTreeMap<u64, u64> {
    let v = field(line, key);
    if v == "none" {
        return BTreeMap::new();
    }
    v.split(',')
        .map(|kv| {
            let (k, n) = kv.split_once('x').unwrap();
            (k.parse().unwrap(), n.parse().unwrap())
        })
        .collect()
}

/// Every verify summary of the run, checked for completeness: each of the run's 2 x requests
/// (a write and a read each) is accounted for exactly once.
fn verifies(out: &RunOutcome) -> Vec<Verify> {
    let runs: Vec<Verify> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("verify: engine=") && l.ends_with(": ok"))
        .map(|l| Verify {
            engine: field(l, "engine").to_string(),
            requests: num(l, "requests"),
            ok: num(l, "ok"),
            short: num(l, "short"),
            failed: num(l, "failed"),
            errnos: counts(l, "errnos"),
            short_lens: counts(l, "short_lens"),
            bad_data: num(l, "bad_data"),
            max_ms: num(l, "max_ms"),
        })
        .collect();
    for v in &runs {
        assert_eq!(
            v.ok + v.short + v.failed,
            2 * v.requests,
            "{v:?}: every write and read accounted for once\n{}",
            out.report()
        );
    }
    runs
}

/// The fault log's entries (one per fired fault; the summary line left out).
fn fault_log(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("summary").is_none())
        .collect()
}

fn fired(log: &[serde_json::Value], kind: &str) -> u64 {
    log.iter().filter(|e| e["kind"] == kind).count() as u64
}

/// `verify --tolerate` through every engine, `requests` each, then the driver's statistics.
fn workload(requests: u32) -> String {
    format!(
        "set -e; \
         aiodma-aio verify --engine libaio --qd 8 --requests {requests} --span 1M --seed 1 --tolerate; \
         aiodma-aio verify --engine uring --qd 8 --requests {requests} --span 1M --seed 2 --tolerate; \
         aiodma-aio verify --engine sync --requests {requests} --span 1M --seed 3 --tolerate; \
         aiodma-aio info"
    )
}

/// A boot with `faults` (and extra flags) running `script`; returns the outcome and the fault
/// log.
fn boot(faults: &[&str], extra: &[&str], script: &str) -> (RunOutcome, Vec<serde_json::Value>) {
    let dir = TempDir::new("faults");
    let log = dir.0.join("faults.jsonl");
    let mut g = Guest::new().flag("--fault-log").flag(log.to_str().unwrap());
    for f in faults {
        g = g.flag("--fault").flag(*f);
    }
    for x in extra {
        g = g.flag(*x);
    }
    let out = g.sh(script);
    out.assert_code(0);
    let entries = fault_log(&log);
    (out, entries)
}

/// The used-ring lies the driver counted, all kinds together.
fn lies(out: &RunOutcome) -> u64 {
    [
        "used_bad_index",
        "used_bad_id",
        "used_dup",
        "used_no_status",
        "used_bad_len",
    ]
    .iter()
    .map(|k| stat(&out.stdout, k))
    .sum()
}

/// A used-ring lie: each one is caught (counted under `kind`), costs exactly one reset (a lie
/// then a reset per device lifetime: the queue is not served in between), never a timeout, and
/// the requests in flight fail with -EIO or complete; nothing waits for a timeout.
fn assert_lies_caught(out: &RunOutcome, log: &[serde_json::Value], fault: &str, kind: &str) {
    let runs = verifies(out);
    assert_eq!(runs.len(), 3, "{}", out.report());
    let injected = fired(log, fault);
    assert!(
        injected >= 3,
        "{fault} fired {injected} times\n{}",
        out.report()
    );
    let caught = lies(out);
    assert!(stat(&out.stdout, kind) >= 1, "no {kind}\n{}", out.report());
    assert!(
        caught >= 1 && caught <= injected,
        "{caught} lies caught, {injected} injected\n{}",
        out.report()
    );
    assert_eq!(stat(&out.stdout, "resets_lie"), caught, "{}", out.report());
    assert_eq!(stat(&out.stdout, "resets"), caught, "{}", out.report());
    assert_eq!(stat(&out.stdout, "timeouts"), 0, "{}", out.report());
    for v in &runs {
        assert!(
            v.errnos.keys().all(|e| *e == 5),
            "{v:?}: only -EIO\n{}",
            out.report()
        );
        assert_eq!(v.short, 0, "{v:?}\n{}", out.report());
        // A driver that ignored the lie would leave the real request to its 10 s timeout.
        assert!(v.max_ms < 5000, "{v:?}\n{}", out.report());
    }
}

#[test]
fn unknown_status_codes_fail_exactly_the_faulted_requests_with_eio() {
    // Two status bytes the device does not define; every faulted request fails with -EIO (and
    // only those: the driver's error count is the number of faults fired), nothing resets.
    let (out, log) = boot(
        &["status:every=20,code=9", "status:every=31,code=200"],
        &[],
        &workload(100),
    );
    let runs = verifies(&out);
    assert_eq!(runs.len(), 3, "{}", out.report());
    let injected = fired(&log, "status");
    assert!(injected >= 10, "{injected} status faults\n{}", out.report());
    assert_eq!(stat(&out.stdout, "errors"), injected, "{}", out.report());
    assert_eq!(
        stat(&out.stdout, "bad_status"),
        injected,
        "{}",
        out.report()
    );
    assert_eq!(stat(&out.stdout, "resets"), 0, "{}", out.report());
    for v in &runs {
        assert!(v.failed >= 1, "{v:?}\n{}", out.report());
        assert!(
            v.errnos.keys().all(|e| *e == 5),
            "{v:?}: only -EIO\n{}",
            out.report()
        );
        assert_eq!(v.short, 0, "{v:?}\n{}", out.report());
    }
}

#[test]
fn short_reads_return_exactly_the_bytes_the_device_transferred() {
    // Every 10th READ part transfers 1000 bytes. A 4 KiB read (one part) returns exactly 1000;
    // a 256 KiB read (several parts, each whole pages) returns the parts before the short one
    // plus 1000. Never an error, never more, and the bytes returned are the right ones.
    let script = "set -e; \
         aiodma-aio verify --engine libaio --qd 8 --requests 100 --span 1M --bs 4096 --seed 1 --tolerate; \
         aiodma-aio verify --engine sync --requests 100 --span 1M --bs 4096 --seed 2 --tolerate; \
         aiodma-aio verify --engine uring --qd 4 --requests 16 --span 4M --bs 256k --seed 3 --tolerate; \
         aiodma-aio info";
    let (out, log) = boot(&["short:every=10,len=1000"], &[], script);
    let runs = verifies(&out);
    assert_eq!(runs.len(), 3, "{}", out.report());
    let single = &runs[..2];
    let single_faults = log
        .iter()
        .filter(|e| e["kind"] == "short" && e["length"] == 4096)
        .count() as u64;
    assert_eq!(
        single.iter().map(|v| v.short).sum::<u64>(),
        single_faults,
        "every short 4 KiB read seen as one\n{}",
        out.report()
    );
    for v in single {
        assert!(v.short >= 5, "{v:?}\n{}", out.report());
        assert_eq!(
            v.short_lens.keys().copied().collect::<Vec<_>>(),
            vec![1000],
            "{v:?}: a short 4 KiB read returns exactly 1000 bytes\n{}",
            out.report()
        );
    }
    let multi = &runs[2];
    assert_eq!(multi.engine, "uring");
    assert!(multi.short >= 1, "{multi:?}\n{}", out.report());
    for len in multi.short_lens.keys() {
        assert!(
            *len < 256 * 1024 && len % 4096 == 1000,
            "{multi:?}: short length {len} is not whole parts + 1000\n{}",
            out.report()
        );
    }
    for v in &runs {
        assert_eq!(v.failed, 0, "{v:?}\n{}", out.report());
    }
    assert_eq!(
        stat(&out.stdout, "short_reads"),
        fired(&log, "short"),
        "{}",
        out.report()
    );
    assert_eq!(stat(&out.stdout, "errors"), 0, "{}", out.report());
    assert_eq!(stat(&out.stdout, "resets"), 0, "{}", out.report());
}

#[test]
fn a_used_element_naming_a_foreign_head_resets_the_device() {
    // The request's used element names another head (never posted, or completed already);
    // the request itself never completes.
    let (out, log) = boot(&["used-id:every=20"], &[], &workload(100));
    assert_lies_caught(&out, &log, "used-id", "used_bad_id");
}

#[test]
fn a_duplicated_used_element_resets_the_device() {
    // The same head twice: the first completes its request, the second is a lie.
    let (out, log) = boot(&["used-dup:every=20"], &[], &workload(100));
    assert_lies_caught(&out, &log, "used-dup", "used_dup");
}

#[test]
fn an_overlong_used_length_resets_the_device() {
    // A used length 4096 bytes larger than the chain's writable buffers.
    let (out, log) = boot(&["used-len:every=20"], &[], &workload(100));
    assert_lies_caught(&out, &log, "used-len", "used_bad_len");
}

#[test]
fn lost_interrupts_only_cost_latency() {
    // Completions published without an interrupt (and with EVENT_IDX no further interrupt
    // until the driver looks): the watchdog reaps the used ring every 100 ms, so every request
    // succeeds within a few watchdog periods; a driver that waited for the interrupt would
    // time out (3 s here), reset and fail requests.
    let (out, log) = boot(
        &["irq-lost:every=20"],
        &["--append", "aiodma.timeout_ms=3000"],
        &workload(100),
    );
    let runs = verifies(&out);
    assert_eq!(runs.len(), 3, "{}", out.report());
    assert!(fired(&log, "irq-lost") >= 10, "{}", out.report());
    for v in &runs {
        assert_eq!(v.ok, 2 * v.requests, "{v:?}: all succeed\n{}", out.report());
        assert!(v.max_ms < 1500, "{v:?}: latency bound\n{}", out.report());
    }
    assert!(
        stat(&out.stdout, "watchdog_reaped") >= 1,
        "{}",
        out.report()
    );
    for k in ["errors", "timeouts", "resets"] {
        assert_eq!(stat(&out.stdout, k), 0, "{k}\n{}", out.report());
    }
}

#[test]
fn spurious_interrupts_are_harmless() {
    let (out, log) = boot(&["irq-spurious:every=5"], &[], &workload(100));
    let runs = verifies(&out);
    assert_eq!(runs.len(), 3, "{}", out.report());
    assert!(fired(&log, "irq-spurious") >= 20, "{}", out.report());
    for v in &runs {
        assert_eq!(v.ok, 2 * v.requests, "{v:?}: all succeed\n{}", out.report());
    }
    assert!(stat(&out.stdout, "empty_irqs") >= 1, "{}", out.report());
    for k in ["errors", "timeouts", "resets"] {
        assert_eq!(stat(&out.stdout, k), 0, "{k}\n{}", out.report());
    }
}

#[test]
fn needs_reset_through_the_configuration_interrupt_resets_and_recovers() {
    // The device sets NEEDS_RESET, raises the configuration vector and never completes the
    // request: the driver resets at once (no timeout), fails what was in flight with -EIO,
    // and service resumes. One reset per fault.
    let (out, log) = boot(&["reset:every=20"], &[], &workload(100));
    let runs = verifies(&out);
    assert_eq!(runs.len(), 3, "{}", out.report());
    let injected = fired(&log, "reset");
    assert!(injected >= 10, "{}", out.report());
    assert_eq!(
        stat(&out.stdout, "resets_needs_reset"),
        injected,
        "{}",
        out.report()
    );
    assert_eq!(stat(&out.stdout, "resets"), injected, "{}", out.report());
    assert!(
        stat(&out.stdout, "config_irqs") >= injected,
        "{}",
        out.report()
    );
    assert_eq!(stat(&out.stdout, "timeouts"), 0, "{}", out.report());
    for v in &runs {
        assert!(v.errnos.keys().all(|e| *e == 5), "{v:?}\n{}", out.report());
        assert!(v.max_ms < 5000, "{v:?}\n{}", out.report());
    }
}

/// Chaos: every run passes verify; wrong data only where the device corrupted a READ on
/// purpose (undetectable without integrity checks): each `bad data` line's device offset lies
/// in the range of a `corrupt` fault. Returns the kinds that fired.
fn assert_chaos_survived(out: &RunOutcome, log: &[serde_json::Value], runs: usize) -> Vec<String> {
    let v = verifies(out);
    assert_eq!(v.len(), runs, "{}", out.report());
    let corrupt: Vec<(u64, u64)> = log
        .iter()
        .filter(|e| e["kind"] == "corrupt")
        .map(|e| {
            let off = e["offset"].as_u64().unwrap();
            (off, off + e["length"].as_u64().unwrap())
        })
        .collect();
    for line in out
        .stdout
        .lines()
        .filter(|l| l.starts_with("verify: bad data: "))
    {
        let at: u64 = line
            .split("(offset ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no offset in {line:?}"));
        assert!(
            corrupt.iter().any(|(lo, hi)| (*lo..*hi).contains(&at)),
            "wrong data at {at} where the device corrupted nothing: {line}\n{}",
            out.report()
        );
    }
    assert_eq!(
        v.iter().map(|r| r.bad_data).sum::<u64>(),
        out.stdout.matches("verify: bad data: ").count() as u64
    );
    // Each kind that fired was handled as that kind: a lie in the used ring was caught and
    // reset the device, a NEEDS_RESET reset it once, a short READ came back short (not as an
    // error), and nothing but a lie, NEEDS_RESET or a timeout ever resets.
    let used_lies: u64 = ["used-id", "used-dup", "used-len"]
        .iter()
        .map(|k| fired(log, k))
        .sum();
    if used_lies > 0 {
        assert!(
            lies(out) >= 1,
            "{used_lies} used-ring lies fired, none caught\n{}",
            out.report()
        );
        assert!(stat(&out.stdout, "resets_lie") >= 1, "{}", out.report());
    }
    assert!(lies(out) <= used_lies, "{}", out.report());
    // (A reset fault that fires on a request taken after a lie is cleared by the lie's reset.)
    let needs_reset = fired(log, "reset");
    assert!(
        stat(&out.stdout, "resets_needs_reset") <= needs_reset,
        "{}",
        out.report()
    );
    if needs_reset >= 3 {
        assert!(
            stat(&out.stdout, "resets_needs_reset") >= 1,
            "{}",
            out.report()
        );
    }
    if fired(log, "short") > 0 {
        assert!(stat(&out.stdout, "short_reads") >= 1, "{}", out.report());
        assert!(
            v.iter().map(|r| r.short).sum::<u64>() >= 1,
            "short READs fired but no read came back short\n{}",
            out.report()
        );
    }
    assert_eq!(
        stat(&out.stdout, "resets"),
        stat(&out.stdout, "resets_lie")
            + stat(&out.stdout, "resets_needs_reset")
            + stat(&out.stdout, "resets_timeout"),
        "{}",
        out.report()
    );
    let mut kinds: Vec<String> = log
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

#[test]
fn chaos_every_engine_survives() {
    // `chaos` picks a kind per firing; the device restarts its fault stream from the seed at
    // every reset, so one seed keeps meeting the same first fault that resets the device.
    // Three seeds, three boots, for a mix.
    let script = "set -e; for e in libaio uring sync; do \
           aiodma-aio verify --engine $e --qd 8 --requests 100 --span 1M --tolerate --allow-corrupt; \
         done; aiodma-aio info";
    let mut all = Vec::new();
    // Measured: seed 1 fires drop, irq-spurious and short; 3 used-len; 6 reset and status.
    for seed in ["1", "3", "6"] {
        let (out, log) = boot(
            &["chaos:p=0.03"],
            &["--fault-seed", seed, "--append", "aiodma.timeout_ms=1000"],
            script,
        );
        all.extend(assert_chaos_survived(&out, &log, 3));
    }
    all.sort();
    all.dedup();
    assert!(all.len() >= 5, "only {all:?} fired");
}

#[test]
fn chaos_on_the_debug_kernel_leaves_a_clean_log() {
    // The same on the debug kernel (KASAN, lockdep, atomic-sleep checks, kmemleak...), with two
    // vCPUs and two queues, and libaio, io_uring and sync I/O running at once, so resets race
    // with the other queue's interrupt thread and with submitters. Chaos seed 1 fires spurious
    // interrupts, drops (timeouts, 1 s here) and short reads; a foreign used id every 90th read
    // adds lies. The device's fault stream restarts at every reset, so which of them a run meets
    // depends on how the three engines interleave: at least two kinds, and at least one reset.
    let dir = TempDir::new("faults-debug");
    let log = dir.0.join("faults.jsonl");
    let script = "for e in libaio uring sync; do \
           (aiodma-aio verify --engine $e --qd 8 --requests 60 --span 1M \
              --base $(( ${#e} * 4194304 )) --tolerate --allow-corrupt; echo $e-status=$?) & \
         done; wait; aiodma-aio info";
    let out = debug_guest(900)
        .flag("--cpus")
        .flag("2")
        .flag("--fault")
        .flag("chaos:p=0.03")
        .flag("--fault")
        .flag("used-id:every=90,op=read")
        .flag("--fault-seed")
        .flag("1")
        .flag("--fault-log")
        .flag(log.to_str().unwrap())
        .flag("--append")
        .flag("aiodma.timeout_ms=1000")
        .sh(script);
    out.assert_code(0);
    for e in ["libaio", "uring", "sync"] {
        out.assert_stdout_contains(&format!("{e}-status=0"));
    }
    let entries = fault_log(&log);
    let kinds = assert_chaos_survived(&out, &entries, 3);
    eprintln!(
        "fired: {kinds:?}; resets: {} lie, {} timeout, {} NEEDS_RESET",
        stat(&out.stdout, "resets_lie"),
        stat(&out.stdout, "resets_timeout"),
        stat(&out.stdout, "resets_needs_reset")
    );
    assert!(kinds.len() >= 2, "only {kinds:?} fired\n{}", out.report());
    assert!(stat(&out.stdout, "resets") >= 1, "{}", out.report());
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("aiodma-checked: kmemleak: 0 leaks"),
        "{}",
        out.report()
    );
}
