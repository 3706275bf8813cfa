//! Seccomp filters on the VMM's threads (issue 11): the real guest runs with every thread kind
//! confined, and a forbidden system call stops the VMM with a message naming it.
//!
//! The rest of the suite runs with the default `--seccomp on` too, so every scenario there
//! (file and memory backings, io_uring and the pool, metrics, faults, resets, several queues)
//! also proves that the filters allow what it needs.

// Integration tests fail by panicking; helpers outside #[test] fns count too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aiodma_tests::{Guest, TempDir};

/// The VMM's log line for the first thread of `kind` that installed its filter.
fn installed(kind: &str) -> String {
    format!("seccomp: {kind} filter on thread ")
}

#[test]
fn every_thread_kind_is_filtered_with_the_memory_backing() {
    let out = Guest::new()
        .flag("--seccomp")
        .flag("on")
        .flag("--cpus")
        .flag("2")
        .flag("--queues")
        .flag("2")
        .run(&["aiodma-aio", "verify", "--engine", "uring"]);
    out.assert_code(0);
    for kind in ["vcpu", "device", "backend-worker", "main"] {
        out.assert_stderr_contains(&installed(kind));
    }
    out.assert_stderr_contains("filter on thread vcpu")
        .assert_stderr_contains("filter on thread aiodma-device")
        .assert_stderr_contains("filter on thread aiodma-mem-")
        .assert_stderr_contains("filter on thread main");
}

#[test]
fn file_backing_with_io_uring_is_filtered_and_flushes() {
    let dir = TempDir::new("seccomp-file");
    let store = dir.0.join("store.img");
    std::fs::write(&store, vec![0u8; 8 << 20]).unwrap();
    let metrics = dir.0.join("run.json");
    let out = Guest::new()
        .flag("--backing")
        .flag(store.to_str().unwrap())
        .flag("--metrics")
        .flag(metrics.to_str().unwrap())
        .sh("aiodma-aio verify --engine libaio --dsync && aiodma-aio verify --engine sync");
    out.assert_code(0)
        .assert_stderr_contains(&installed("device"))
        .assert_stderr_contains(&installed("main"));
    // The main thread wrote the metrics file after its filter went in.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!(json["exit_code"], 0, "{json}");
}

#[test]
fn off_installs_nothing() {
    let out = Guest::new()
        .flag("--seccomp")
        .flag("off")
        .run(&["/bin/true"]);
    out.assert_code(0).assert_stderr_contains("seccomp: off");
    assert!(!out.stderr.contains("filter on thread"), "{}", out.report());
}

#[test]
fn bad_mode_is_one_line_and_exit_2() {
    let out = Guest::new()
        .flag("--seccomp")
        .flag("maybe")
        .run(&["/bin/true"]);
    out.assert_code(2);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.report());
    assert!(
        lines[0].contains("'maybe' is not a seccomp mode"),
        "{}",
        out.report()
    );
}

/// `AIODMA_SECCOMP_SELFTEST=<kind>`: the first thread of that kind makes one forbidden call
/// right after its filter is in; the SIGSYS handler names it (`thread`: the start of the name as
/// quoted in the message) and ends the VMM with 159.
fn forbidden_call_stops_the_vmm(kind: &str, thread: &str) {
    let out = Guest::new()
        .flag("--seccomp")
        .flag("on")
        .env("AIODMA_SECCOMP_SELFTEST", kind)
        .run(&["sleep", "30"]);
    out.assert_code(159)
        .assert_stderr_contains(&format!("seccomp: thread '{thread}"))
        .assert_stderr_contains(
            "' made a forbidden system call: 110 (getppid); exiting with status 159",
        );
}

#[test]
fn log_mode_lets_a_forbidden_call_through() {
    let out = Guest::new()
        .flag("--seccomp")
        .flag("log")
        .env("AIODMA_SECCOMP_SELFTEST", "device")
        .run(&["/bin/true"]);
    out.assert_code(0)
        .assert_stderr_contains("seccomp: device filter on thread aiodma-device")
        .assert_stderr_contains("log otherwise")
        .assert_stderr_contains("makes a forbidden system call");
}

#[test]
fn forbidden_call_on_a_vcpu_thread_stops_the_vmm() {
    forbidden_call_stops_the_vmm("vcpu", "vcpu0'");
}

#[test]
fn forbidden_call_on_the_device_thread_stops_the_vmm() {
    forbidden_call_stops_the_vmm("device", "aiodma-device'");
}

#[test]
fn forbidden_call_on_a_backend_worker_stops_the_vmm() {
    // Which of the two workers starts first is up to the scheduler.
    forbidden_call_stops_the_vmm("backend-worker", "aiodma-mem-");
}

#[test]
fn forbidden_call_on_the_main_thread_stops_the_vmm() {
    forbidden_call_stops_the_vmm("main", "main'");
}
