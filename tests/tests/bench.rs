//! `aiodma-aio bench` and the async-vs-sync table of `make bench` (issue: guest AIO tools and
//! end-to-end tests), run briefly: the numbers are not checked, only that every row is there
//! and well-formed.

// Integration tests fail by panicking; helpers outside #[test] fns count too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use aiodma_tests::{aiodma_bin, artifact, repo_root, Guest, RunOutcome};

#[test]
fn bench_prints_rows_json_and_rejects_bad_usage() {
    let out = Guest::new().sh("aiodma-aio bench --header; \
         aiodma-aio bench --engine sync --rw randread --requests 200; \
         aiodma-aio bench --engine libaio --qd 8 --rw randwrite --requests 400 --json; \
         aiodma-aio bench --engine uring --qd 4 --bs 16k --rw rw --time 0.3 --json; \
         aiodma-aio bench --engine libaio --qd 0; echo usage-qd=$?; \
         aiodma-aio bench --rw sideways; echo usage-rw=$?; \
         aiodma-aio frobnicate; echo usage-cmd=$?");
    out.assert_code(0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "engine",
                    "bs",
                    "qd",
                    "rw",
                    "IOPS",
                    "MB/s",
                    "p50(us)",
                    "p99(us)",
                    "p99.9(us)"
                ]),
        "no header\n{}",
        out.report()
    );
    let row = lines
        .iter()
        .find(|l| l.starts_with("sync "))
        .unwrap_or_else(|| panic!("no sync row\n{}", out.report()));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[..4], ["sync", "4096", "1", "randread"], "{row}");
    for c in &cols[4..] {
        assert!(c.parse::<f64>().unwrap() > 0.0, "{row}");
    }
    let json: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(json.len(), 2, "{}", out.report());
    assert_eq!(json[0]["engine"], "libaio");
    assert_eq!(json[0]["qd"], 8);
    assert_eq!(json[0]["requests"], 400);
    assert_eq!(json[1]["engine"], "uring");
    assert_eq!(json[1]["bs"], 16384);
    assert_eq!(json[1]["rw"], "rw");
    for j in &json {
        for k in ["iops", "mb_s", "p50_us", "p99_us", "p999_us"] {
            assert!(j[k].as_f64().unwrap() > 0.0, "{k} in {j}");
        }
        assert!(j["p50_us"].as_f64() <= j["p999_us"].as_f64(), "{j}");
    }
    for u in ["usage-qd=2", "usage-rw=2", "usage-cmd=2"] {
        out.assert_stdout_contains(u);
    }
}

#[test]
fn make_bench_table_has_every_engine_and_depth() {
    // The script `make bench` runs, with one (delayed) fault setting and short points.
    artifact("fio.cpio.gz");
    let out = Command::new("bash")
        .arg(repo_root().join("images/bench-aio.sh"))
        .current_dir(repo_root())
        .env("AIODMA", aiodma_bin())
        .env("BENCH_TIME", "0.2")
        .env("BENCH_FAULTS", "delay:min=100us,max=100us,every=1")
        .env("BENCH_TIMEOUT", "300")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{report}");
    // Our device's rows, then the peer's (QEMU virtio-blk with the same 100 us per request).
    for label in ["delay-100us", "vblk-100us"] {
        assert_rows(&stdout, label, &report);
    }
    assert!(
        stdout.lines().any(|l| l.starts_with("fault ")),
        "no header\n{report}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("# delay-100us aiodma-aio randread: vs sync QD1")),
        "no speed-up line\n{report}"
    );
    let versus = stdout
        .lines()
        .find(|l| {
            l.starts_with(
                "# delay-100us vs vblk-100us (aiodma / QEMU virtio-blk IOPS) fio randread:",
            )
        })
        .unwrap_or_else(|| panic!("no aiodma-vs-peer line\n{report}"));
    let ratios: Vec<f64> = versus
        .split_whitespace()
        .filter_map(|w| w.trim_end_matches(',').strip_suffix('x'))
        .filter_map(|v| v.parse().ok())
        .collect();
    assert_eq!(
        ratios.len(),
        3,
        "psync, libaio and uring ratios in {versus:?}"
    );
    assert!(ratios.iter().all(|r| *r > 0.0), "{versus:?}");
}

/// Every engine and depth of the suite has a row labelled `label` with a positive IOPS.
fn assert_rows(stdout: &str, label: &str, report: &str) {
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with(&format!("{label} ")))
        .map(|l| l.split_whitespace().collect())
        .collect();
    for tool in ["aiodma-aio", "fio"] {
        for rw in ["randread", "randwrite"] {
            let sync = if tool == "fio" { "psync" } else { "sync" };
            let mut want = vec![(sync, "1")];
            for engine in ["libaio", "uring"] {
                for qd in ["1", "8", "32"] {
                    want.push((engine, qd));
                }
            }
            for (engine, qd) in want {
                let found = rows.iter().any(|r| {
                    r.len() == 11
                        && r[1] == tool
                        && r[2] == engine
                        && r[3] == "4096"
                        && r[4] == qd
                        && r[5] == rw
                        && r[6].parse::<f64>().is_ok_and(|v| v > 0.0)
                });
                assert!(
                    found,
                    "no {label} {tool} {engine} QD{qd} {rw} row\n{report}"
                );
            }
        }
    }
    assert_eq!(rows.len(), 28, "{label} rows\n{report}");
}

#[test]
fn peer_runs_the_guest_command_on_qemu_virtio_blk() {
    // The same kernel and initramfs under QEMU with a 64 MiB null-co disk: /dev/vda is there
    // (131072 sectors), no aiodma device is, and the command's exit status (5) comes back.
    let peer = || {
        let out = Command::new(aiodma_bin())
            .current_dir(repo_root())
            .args([
                "bench",
                "peer",
                "--timeout",
                "120",
                "--latency-us",
                "50",
                "--",
            ])
            .args([
                "sh",
                "-c",
                "echo vda=$(cat /sys/block/vda/size); ls /dev/aiodma0 2>/dev/null; \
                 dd if=/dev/vda of=/dev/null bs=4k count=16 2>&1 | grep -c 'records out'; exit 5",
            ])
            .output()
            .unwrap();
        RunOutcome::from_output(out)
    };
    // Once more if the emulator broke the run (see RunOutcome::emulated_host_failure).
    let first = peer();
    let out = if first.emulated_host_failure().is_some() {
        peer()
    } else {
        first
    };
    let report = out.report();
    assert_eq!(out.code, 5, "{report}");
    assert!(out.stdout.contains("vda=131072"), "{report}");
    assert!(!out.stdout.contains("/dev/aiodma0"), "{report}");
    assert!(
        out.stdout.lines().any(|l| l.trim() == "1"),
        "dd did not finish\n{report}"
    );

    let bad = Command::new(aiodma_bin())
        .args(["bench", "peer", "--latency-us", "soon", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--latency-us"), "{err}");
}
