//! The driver under the debug kernel (images/out/bzImage-debug: lockdep, atomic-sleep checks,
//! list, slab and object debugging): the AIO paths, cancellation-free fault recovery and unbind
//! run without a lockdep splat, a "sleeping function called from invalid context", or a BUG
//! (the harness runs every guest command under `aiodma-checked`, which enforces that).

// Integration tests fail by panicking; helpers outside #[test] fns count too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aiodma_tests::{artifact, Guest};

fn debug_guest() -> Guest {
    // The debug kernel is several times slower: a longer limit than Guest::new()'s.
    Guest::default()
        .flag("--kernel")
        .flag(artifact("bzImage-debug").to_str().unwrap())
        .flag("--base-initrd")
        .flag(artifact("initramfs-debug.cpio.gz").to_str().unwrap())
        .flag("--timeout")
        .flag("300")
}

#[test]
fn debug_kernel_has_the_checkers() {
    let config = std::fs::read_to_string(artifact("kernel-debug.config")).unwrap();
    for want in [
        "CONFIG_PROVE_LOCKING=y",
        "CONFIG_DEBUG_ATOMIC_SLEEP=y",
        "CONFIG_DEBUG_LIST=y",
        "CONFIG_SLUB_DEBUG=y",
        "CONFIG_RUST=y",
    ] {
        assert!(
            config.lines().any(|l| l == want),
            "debug kernel lacks {want}"
        );
    }
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
    let out = debug_guest()
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
    let out = debug_guest().flag("--cpus").flag("2").sh("aiodma-aio edge");
    out.assert_code(0);
    out.assert_stdout_contains("PASS large-async");
    out.assert_stdout_contains(" 0 failed");
}
