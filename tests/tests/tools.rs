//! The guest AIO tools end to end (issue: guest AIO tools and end-to-end tests): the device's
//! file semantics (`aiodma-aio edge`), requests leaving before they finish (`aiodma-aio
//! cancel`), fio's verify jobs on every engine, a file-backed device across two boots, and
//! injected write errors and delays.

// Integration tests fail by panicking; helpers outside #[test] fns count too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aiodma_tests::{artifact, Guest, RunOutcome, TempDir};

fn stat(out: &RunOutcome, name: &str) -> u64 {
    out.stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{}", out.report()))
}

/// Every `edge` line is a PASS, the named checks ran, and the total shows no failure.
fn assert_edge_passed(out: &RunOutcome, checks: &[&str]) {
    let fails: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("FAIL "))
        .collect();
    assert!(
        fails.is_empty(),
        "edge checks failed: {fails:#?}\n{}",
        out.report()
    );
    for c in checks {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with("PASS ") && l.split_whitespace().nth(1) == Some(c)),
            "edge check {c} did not pass\n{}",
            out.report()
        );
    }
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("edge: ") && l.ends_with(" passed, 0 failed")),
        "no edge total\n{}",
        out.report()
    );
}

#[test]
fn edge_file_semantics_hold() {
    let out = Guest::new().sh("set -e; aiodma-aio edge");
    out.assert_code(0);
    assert_edge_passed(
        &out,
        &[
            "info-capacity",
            "read-at-eof",
            "read-at-eof-async",
            "write-crossing-end",
            "read-crossing-end",
            "read-crossing-end-aio",
            "write-at-end",
            "write-at-end-async",
            "efault",
            "efault-async",
            "efault-readonly",
            "many-segments",
            "zero-length",
            "lseek",
            "file-position",
            "large-transfer",
            "large-async",
            "o-direct",
            "fsync",
            "nowait",
        ],
    );
}

#[test]
fn delay_fault_saturated_nowait_gets_eagain_and_every_engine_verifies() {
    // Every request takes 20 ms on the device: the queue fills up with libaio reads, and
    // RWF_NOWAIT must then fail fast with EAGAIN instead of sleeping for ring space; slow
    // requests still carry the right data on every engine.
    let script = "set -e; aiodma-aio edge --expect-eagain; \
         for e in sync libaio uring; do aiodma-aio verify --engine $e --qd 8 --requests 16 --seed 11; done; \
         aiodma-aio verify --engine libaio --qd 4 --requests 8 --unaligned --vectored --seed 12; \
        ";
    let out = Guest::new()
        .flag("--fault")
        .flag("delay:every=1,min=20ms,max=20ms")
        .sh(script);
    out.assert_code(0);
    assert_edge_passed(&out, &["nowait", "nowait-saturated"]);
    let ok = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("verify: ") && l.ends_with(": ok"))
        .count();
    assert_eq!(ok, 4, "expected 4 verified runs\n{}", out.report());
}

#[test]
fn cancel_exit_and_close_with_requests_in_flight() {
    // 300 ms per request keeps everything in flight while the tool cancels, exits or closes;
    // each request must complete exactly once and nothing may hang.
    let out = Guest::new()
        .flag("--fault")
        .flag("delay:every=1,min=300ms,max=300ms")
        .sh("set -e; aiodma-aio cancel; aiodma-aio info | grep -e cancels -e errors");
    out.assert_code(0);
    for scenario in [
        "io_cancel",
        "uring-cancel",
        "exit",
        "close",
        "close-destroy",
        "after",
    ] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with(&format!("cancel {scenario}: ")) && l.ends_with(": ok")),
            "scenario {scenario} did not pass\n{}",
            out.report()
        );
    }
    out.assert_stdout_contains("cancel: ok");
}

#[test]
fn fio_verify_jobs_pass_on_every_engine() {
    // Terse fields 3, 5, 6 and 47: job name, error, KiB read (the verify pass), KiB written.
    let script = "for e in libaio io_uring psync; do \
           fio --output-format=terse /etc/fio/verify-$e.fio > /tmp/fio.out 2>&1; s=$?; \
           echo fio-verify-$e=$s; if [ $s = 0 ]; then cut -d';' -f3,5,6,47 /tmp/fio.out; \
           else cat /tmp/fio.out; fi; \
         done";
    let out = Guest::new()
        .flag("--initrd")
        .flag(artifact("fio.cpio.gz").to_str().unwrap())
        .sh(script);
    out.assert_code(0);
    for e in ["libaio", "io_uring", "psync"] {
        out.assert_stdout_contains(&format!("fio-verify-{e}=0"));
        // 32 MiB written and all of it read back and checked.
        out.assert_stdout_contains(&format!("verify-{e};0;32768;32768"));
    }
}

#[test]
fn file_backed_device_keeps_data_across_boots() {
    let dir = TempDir::new("tools-persist");
    let image = dir.0.join("store.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let backing = image.to_str().unwrap();
    let first = Guest::new().flag("--backing").flag(backing).sh(
        "set -e; aiodma-aio verify --engine uring --qd 8 --requests 32 --seed 4242 --write-only; \
         aiodma-aio verify --engine sync --requests 8 --seed 77 --unaligned --vectored \
           --base 50331648 --span 8388608 --write-only; \
         sync",
    );
    first.assert_code(0);
    first.assert_stdout_contains("phase=write-only");
    // The data reached the file on the host.
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(bytes.len(), 64 << 20);
    assert!(
        bytes[..1 << 20].iter().any(|&b| b != 0),
        "nothing written to {backing}"
    );

    // Second boot: read back with other engines; a wrong seed must not verify.
    let second = Guest::new().flag("--backing").flag(backing).sh(
        "set -e; aiodma-aio verify --engine libaio --qd 8 --requests 32 --seed 4242 --read-only; \
         aiodma-aio verify --engine uring --qd 2 --requests 8 --seed 77 --unaligned --vectored \
           --base 50331648 --span 8388608 --read-only; \
         if aiodma-aio verify --engine sync --requests 32 --seed 4243 --read-only; \
         then echo wrong-seed-verified; exit 1; fi; echo wrong-seed-rejected",
    );
    second.assert_code(0);
    second.assert_stdout_contains("verify: engine=libaio qd=8 requests=32");
    second.assert_stdout_contains("verify: engine=uring qd=2 requests=8");
    second.assert_stdout_contains("wrong-seed-rejected");
    assert_eq!(
        second
            .stdout
            .lines()
            .filter(|l| l.contains("phase=read-only") && l.ends_with(": ok"))
            .count(),
        2,
        "{}",
        second.report()
    );
}

#[test]
fn injected_write_errors_hit_exactly_every_fifth_write_and_the_guest_recovers() {
    // Writes 5, 10, 15 and 20 (sync, dd) fail with EIO; the 25th is the 5th of a libaio
    // bench run, which reports it; then reads and writes 26..29 work again (each under 64 KiB,
    // one device request: the driver splits larger ones, and the device counts the parts).
    let script = "for i in $(seq 1 20); do \
           if dd if=/dev/zero of=/dev/aiodma0 bs=4096 count=1 seek=$i conv=notrunc 2>/tmp/err; then printf o; \
           elif grep -q -e 'I/O error' -e 'Input/output error' /tmp/err; then printf E; else printf X; fi; \
         done; echo; \
         aiodma-aio bench --engine libaio --qd 1 --rw write --requests 5; echo bench-status=$?; \
         set -e; aiodma-aio info | grep -e errors -e resets; \
         aiodma-aio bench --engine uring --qd 8 --rw randread --requests 256; \
         aiodma-aio verify --engine sync --qd 1 --requests 4 --seed 9 --span 256k";
    let out = Guest::new()
        .flag("--fault")
        .flag("error:every=5,op=write")
        .sh(script);
    out.assert_code(0);
    out.assert_stdout_contains("ooooEooooEooooEooooE");
    out.assert_stdout_contains("bench-status=1");
    assert!(
        out.stderr.contains("result -EIO") || out.stdout.contains("result -EIO"),
        "the libaio write did not report -EIO\n{}",
        out.report()
    );
    assert_eq!(stat(&out, "errors"), 5, "{}", out.report());
    assert_eq!(stat(&out, "resets"), 0, "{}", out.report());
    out.assert_stdout_contains("verify: engine=sync qd=1 requests=4");
}

#[test]
fn concurrent_submitters_on_a_busy_ring_lose_no_request() {
    // Six io_uring processes at QD16 and one sync writer on two queues whose requests take
    // 2-4 ms: the rings stay full, io_uring retries from its workers, and submitters race for
    // ring space. Every request must complete on time (no watchdog timeout, no reset).
    let script = "for r in 1 2 3; do \
           for p in 0 1 2 3 4 5; do \
             (aiodma-aio verify --engine uring --qd 16 --requests 32 --seed $p \
                --base $((p * 8388608)) --span 8388608; echo $? > /tmp/s.$p) & \
           done; \
           (aiodma-aio verify --engine sync --requests 32 --seed 9 --base 50331648 \
              --span 8388608; echo $? > /tmp/s.9) & \
           wait; echo statuses=$(cat /tmp/s.* | tr -d '\\n'); \
         done; \
         aiodma-aio info | grep -e timeouts -e resets";
    let out = Guest::new()
        .flag("--cpus")
        .flag("2")
        .flag("--fault")
        .flag("delay:every=1,min=2ms,max=4ms")
        .sh(script);
    out.assert_code(0);
    assert_eq!(
        out.stdout.matches("statuses=0000000").count(),
        3,
        "{}",
        out.report()
    );
    assert_eq!(stat(&out, "timeouts"), 0, "{}", out.report());
    assert_eq!(stat(&out, "resets"), 0, "{}", out.report());
}
