//! The driver under the debug kernel (images/out/bzImage-debug, built with clang-19: KASAN,
//! lockdep, atomic-sleep checks, list, slab and object debugging, KFENCE, UBSAN, kmemleak, fault
//! injection): the AIO paths, cancellation-free fault recovery and unbind run without a KASAN
//! report, a lockdep splat, a "sleeping function called from invalid context", a BUG, a UBSAN
//! report or a leak (the harness runs every guest command under `aiodma-checked`, which enforces
//! that). The gates themselves are tested here
//! too, with the kernel's own misbehaving test modules: a gate that cannot fail proves nothing.

// Integration tests fail by panicking; helpers outside #[test] fns count too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aiodma_tests::{artifact, debug_guest, RunOutcome};

#[test]
fn debug_kernel_has_the_checkers() {
    let config = std::fs::read_to_string(artifact("kernel-debug.config")).unwrap();
    for want in [
        "CONFIG_PROVE_LOCKING=y",
        "CONFIG_DEBUG_ATOMIC_SLEEP=y",
        "CONFIG_DEBUG_LIST=y",
        "CONFIG_SLUB_DEBUG=y",
        "CONFIG_DEBUG_OBJECTS_TIMERS=y",
        "CONFIG_DEBUG_OBJECTS_WORK=y",
        "CONFIG_KFENCE=y",
        "CONFIG_UBSAN=y",
        "CONFIG_UBSAN_BOUNDS=y",
        "CONFIG_UBSAN_SHIFT=y",
        "CONFIG_DEBUG_KMEMLEAK=y",
        // On from boot, not only with kmemleak=on on the command line.
        "# CONFIG_DEBUG_KMEMLEAK_DEFAULT_OFF is not set",
        "CONFIG_FAULT_INJECTION=y",
        "CONFIG_FAILSLAB=y",
        "CONFIG_FAIL_PAGE_ALLOC=y",
        "CONFIG_FAULT_INJECTION_DEBUG_FS=y",
        // KASAN, generic mode, which needs a clang-built kernel to keep Rust (init/Kconfig,
        // `config RUST`: `depends on !KASAN || CC_IS_CLANG`), and keeps VMAP_STACK through
        // KASAN_VMALLOC.
        "CONFIG_CC_IS_CLANG=y",
        "CONFIG_KASAN=y",
        "CONFIG_KASAN_GENERIC=y",
        "CONFIG_KASAN_INLINE=y",
        "CONFIG_KASAN_VMALLOC=y",
        "CONFIG_VMAP_STACK=y",
        // The module is Rust: a checker that switched Rust off would leave nothing to check.
        "CONFIG_RUST=y",
    ] {
        assert!(
            config.lines().any(|l| l == want),
            "debug kernel lacks {want}"
        );
    }
}

/// The "aiodma-checked: kmemleak: N leaks" line of a run, as N.
fn kmemleak_leaks(out: &RunOutcome) -> u64 {
    let all = format!("{}{}", out.stdout, out.stderr);
    let line = all
        .lines()
        .find_map(|l| l.split("aiodma-checked: kmemleak: ").nth(1))
        .unwrap_or_else(|| panic!("no kmemleak line from aiodma-checked\n{}", out.report()));
    line.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad kmemleak line {line:?}\n{}", out.report()))
}

#[test]
fn checkers_are_live_in_the_debug_guest() {
    // Fault injection is there to be switched on, KFENCE is sampling, and aiodma-checked's
    // kmemleak scan ran after the command (module loaded, a little I/O) and found nothing.
    let script = "set -e; \
         for f in failslab fail_page_alloc; do \
             test -w /sys/kernel/debug/$f/probability; test -w /sys/kernel/debug/$f/task-filter; \
         done; \
         grep -qx 'enabled: 1' /sys/kernel/debug/kfence/stats; \
         aiodma-aio verify --engine libaio --qd 4 --requests 8; echo checkers-live";
    let out = debug_guest(600).sh(script);
    out.assert_code(0);
    out.assert_stdout_contains("checkers-live");
    assert_eq!(kmemleak_leaks(&out), 0, "{}", out.report());
}

#[test]
fn kmemleak_gate_fails_a_leaking_run() {
    // The kernel's kmemleak sample orphans kmallocs and vmallocs when it loads: the run must fail
    // with exit 99 and show them, or the gate is vacuous.
    let out = debug_guest(600).run(&["insmod", "/lib/modules/kmemleak-test.ko"]);
    out.assert_code(99);
    assert!(kmemleak_leaks(&out) >= 8, "{}", out.report());
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("unreferenced object"), "{}", out.report());
}

#[test]
fn ubsan_report_fails_the_run() {
    // The kernel's UBSAN test module shifts out of bounds, indexes past an array and loads
    // invalid bools and enums at load: its reports must fail the run.
    let out = debug_guest(600).run(&["insmod", "/lib/modules/test_ubsan.ko"]);
    out.assert_code(99);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("UBSAN: shift-out-of-bounds"),
        "{}",
        out.report()
    );
}

#[test]
fn kasan_report_fails_the_run() {
    // KASAN's own KUnit suite, two of its cases: an out-of-bounds write past a kmalloc object
    // (C) and a use-after-free of a KVec's buffer (Rust, built with the kernel's KASAN rustc
    // flags as our module is). KUnit says "ok" for a case when KASAN reported the bad access it
    // expects; the reports must then fail the run (exit 99) and show in its output. (printf, not
    // echo: a string parameter written through sysfs keeps the newline, and the glob with it
    // matches no case.)
    let script = "set -e; \
         insmod /lib/modules/kunit.ko filter_glob=kasan.kmalloc_oob_right; \
         insmod /lib/modules/kasan_test.ko; rmmod kasan_test; \
         printf kasan.rust_uaf > /sys/module/kunit/parameters/filter_glob; \
         insmod /lib/modules/kasan_test.ko; rmmod kasan_test; \
         dmesg | grep -E '(not )?ok [0-9]+ (kmalloc_oob_right|rust_uaf)$' | sed 's/^.*] *//'";
    let out = debug_guest(600).sh(script);
    out.assert_code(99);
    out.assert_stdout_contains("ok 1 kmalloc_oob_right");
    out.assert_stdout_contains("ok 1 rust_uaf");
    assert!(!out.stdout.contains("not ok"), "{}", out.report());
    let all = format!("{}{}", out.stdout, out.stderr);
    for report in [
        "BUG: KASAN: slab-out-of-bounds in kmalloc_oob_right",
        "BUG: KASAN: slab-use-after-free in kasan_test_rust_uaf",
    ] {
        assert!(all.contains(report), "no {report:?}\n{}", out.report());
    }
    assert!(
        all.contains("aiodma-checked: the guest kernel log is not clean"),
        "{}",
        out.report()
    );
}

#[test]
fn aio_paths_and_recovery_are_clean_under_lockdep() {
    let script = "set -e; dmesg | grep -q 'lock dependency validator'; \
         for e in sync libaio uring; do aiodma-aio verify --engine $e --qd 8 --requests 16; done; \
         aiodma-aio verify --engine libaio --qd 4 --requests 8 --unaligned --vectored; \
         set +e; dd if=/dev/aiodma0 of=/dev/null bs=4k count=100 2>/dev/null; \
         aiodma-aio info | grep -e timeouts -e resets; \
         echo 0000:00:01.0 > /sys/bus/pci/drivers/aiodma/unbind; \
         echo 0000:00:01.0 > /sys/bus/pci/drivers/aiodma/bind; \
         aiodma-aio verify --engine uring --qd 4 --requests 4; \
         rmmod aiodma; echo debug-run-clean";
    let out = debug_guest(600)
        .flag("--cpus")
        .flag("2")
        .flag("--fault")
        .flag("drop:every=200")
        .flag("--append")
        .flag("aiodma.timeout_ms=500")
        .sh(script);
    out.assert_code(0);
    out.assert_stdout_contains("debug-run-clean");
    // The 200th device request was dropped: the watchdog timed it out and reset the device.
    out.assert_stdout_contains("resets: 1");
    let verified = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("verify: ") && l.ends_with(": ok"))
        .count();
    assert_eq!(verified, 5, "{}", out.report());
}

#[test]
fn file_semantics_and_waves_are_clean_under_lockdep() {
    // The edge checks include a 4 MiB kiocb by libaio and by io_uring, which the driver sends
    // in waves from its completion path (threaded IRQ, queue lock): lockdep and the atomic-
    // sleep checker watch that path here.
    let out = debug_guest(600)
        .flag("--cpus")
        .flag("2")
        .sh("aiodma-aio edge");
    out.assert_code(0);
    out.assert_stdout_contains("PASS large-async");
    out.assert_stdout_contains(" 0 failed");
}

#[test]
fn kiocb_log_under_the_queue_lock_is_clean_under_atomic_sleep_checks() {
    // The kiocb state-transition sites run under the queue spinlock (submit, completion,
    // reset). With dynamic debug on, they once formatted into a GFP_KERNEL buffer there:
    // "BUG: sleeping function called from invalid context" on this kernel (issue 10, B1).
    // A reset (the 500th device request is dropped and times out) and then every engine go
    // through those sites with the log on.
    let script = "set +e; dd if=/dev/aiodma0 of=/dev/null bs=4k count=550 2>/dev/null; set -e; \
         aiodma-aio info | grep -e resets; \
         for e in sync libaio uring; do aiodma-aio verify --engine $e --qd 8 --requests 16; done; \
         aiodma-aio verify --engine libaio --qd 4 --requests 8 --unaligned --vectored; \
         n=$(dmesg | grep -c 'aiodma: req .*returning -EIOCBQUEUED'); echo queued-log-lines=$n; \
         dmesg | grep -q 'aiodma: req .*timed out'; echo kiocb-log-clean";
    let out = debug_guest(600)
        .flag("--cpus")
        .flag("2")
        .flag("--fault")
        .flag("drop:every=500")
        .flag("--append")
        .flag("aiodma.timeout_ms=500 aiodma.dyndbg=+p")
        .sh(script);
    out.assert_code(0);
    out.assert_stdout_contains("kiocb-log-clean");
    out.assert_stdout_contains("resets: 1");
    let logged: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("queued-log-lines="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        logged >= 32,
        "too few kiocb transitions logged ({logged})\n{}",
        out.report()
    );
}
