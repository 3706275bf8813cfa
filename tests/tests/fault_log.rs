//! The fault log and its replay, through the real guest: a run under seeded fault rules writes
//! one line per fired fault; replaying that log on the same guest workload fires the same
//! faults on the same requests, so the new log is the same (device times and the driver's
//! choice of descriptor heads aside, which are the run's own); bad logs and paths are exit 2.

// Integration tests fail by panicking; helpers outside #[test] fns count too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aiodma_tests::{Guest, TempDir};

/// The sequential workload both runs do: one writer, one request in flight at a time.
const WORKLOAD: &str = "aiodma-aio verify --engine sync --requests 96 --qd 1";

/// A log line without the fields a replay does not reproduce.
fn comparable(line: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    if let Some(o) = v.as_object_mut() {
        o.remove("t_us");
        o.remove("head");
    }
    v.to_string()
}

fn read_log(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(comparable)
        .collect()
}

#[test]
fn a_replayed_run_writes_the_same_fault_log() {
    let dir = TempDir::new("faultlog");
    let first = dir.0.join("first.jsonl");
    let second = dir.0.join("second.jsonl");
    let out = Guest::new()
        .flag("--fault")
        .flag("delay:p=0.2,min=10us,max=3ms")
        .flag("--fault")
        .flag("status:every=17,code=9,op=write")
        .flag("--fault")
        .flag("error:p=0.05,op=read")
        .flag("--fault-seed")
        .flag("11")
        .flag("--fault-log")
        .flag(first.to_str().unwrap())
        .sh(WORKLOAD);
    // Injected errors fail some requests; the tool reports them and the run goes on.
    assert!(out.code == 0 || out.code == 1, "{}", out.report());
    let logged = read_log(&first);
    assert!(logged.len() >= 4, "too few faults fired: {logged:?}");
    for kind in ["\"kind\":\"delay\"", "\"kind\":\"status\""] {
        assert!(
            logged.iter().any(|l| l.contains(kind)),
            "no {kind} in {logged:?}"
        );
    }
    let summary = logged.last().unwrap();
    assert!(summary.contains("\"summary\""), "{summary}");

    let again = Guest::new()
        .flag("--fault-replay")
        .flag(first.to_str().unwrap())
        .flag("--fault-log")
        .flag(second.to_str().unwrap())
        .sh(WORKLOAD);
    assert_eq!(again.code, out.code, "{}", again.report());
    assert_eq!(read_log(&second), logged);
}

#[test]
fn bad_fault_logs_and_paths_are_refused_with_exit_2() {
    let dir = TempDir::new("faultlog-bad");
    let bad = dir.0.join("bad.jsonl");
    std::fs::write(&bad, "{\"seq\":1,\"kind\":\"delay\"}\n").unwrap();
    let out = Guest::new()
        .flag("--fault-replay")
        .flag(bad.to_str().unwrap())
        .run(&["true"]);
    out.assert_code(2);
    out.assert_stderr_contains("fault replay");
    out.assert_stderr_contains("line 1");
    let missing = dir.0.join("missing.jsonl");
    let out = Guest::new()
        .flag("--fault-replay")
        .flag(missing.to_str().unwrap())
        .run(&["true"]);
    out.assert_code(2);
    let out = Guest::new()
        .flag("--fault-log")
        .flag(dir.0.join("no/such/dir/log.jsonl").to_str().unwrap())
        .run(&["true"]);
    out.assert_code(2);
    out.assert_stderr_contains("--fault-log");
    // A replay and rules together make no sense.
    let out = Guest::new()
        .flag("--fault-replay")
        .flag(bad.to_str().unwrap())
        .flag("--fault")
        .flag("error:p=1")
        .run(&["true"]);
    out.assert_code(2);
}
