//! Where KVM comes from (issue: emulated host): the probe's verdict, forcing either path, and
//! output and exit-code forwarding through whichever path this machine takes.

// Integration tests fail by panicking; helpers outside #[test] fns count too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aiodma_tests::{Guest, TempDir};

/// Whether this machine's KVM can run the guest, by the same rules as `aiodma`.
fn kvm_usable() -> bool {
    std::path::Path::new("/dev/kvm").exists()
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
        && !std::path::Path::new("/sys/module/kvm_pvm").exists()
        && std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| c.contains(" vmx") || c.contains(" svm"))
            .unwrap_or(false)
}

#[test]
fn auto_mode_logs_the_path_it_took() {
    let out = Guest::new().run(&["/bin/true"]);
    out.assert_code(0);
    if kvm_usable() {
        assert!(!out.stderr.contains("emulated host"), "{}", out.report());
    } else {
        out.assert_stderr_contains("not using this machine's KVM: ");
        out.assert_stderr_contains("emulated host (QEMU TCG, AMD SVM, nested KVM) up in ");
    }
}

#[test]
fn forcing_kvm_fails_clearly_where_it_cannot_work() {
    let out = Guest::new().flag("--host").flag("kvm").run(&["/bin/true"]);
    if kvm_usable() {
        out.assert_code(0);
    } else {
        out.assert_code(2);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.report());
        out.assert_stderr_contains("--host kvm: this machine's KVM cannot run the guest: ");
    }
}

#[test]
fn forced_emulated_host_forwards_status_and_output() {
    let out = Guest::new()
        .flag("--host")
        .flag("emulated")
        .sh("echo through-level-one; echo to-stderr >&2; exit 9");
    out.assert_code(9);
    out.assert_stdout_contains("through-level-one");
    out.assert_stderr_contains("emulated host");
    assert!(!out.stderr.contains("reboot:"), "{}", out.report());
}

#[test]
fn emulated_host_without_qemu_names_the_package() {
    let empty = TempDir::new("noqemu");
    let out = Guest::new()
        .flag("--host")
        .flag("emulated")
        .env("PATH", empty.0.to_str().unwrap())
        .run(&["/bin/true"]);
    out.assert_code(2);
    out.assert_stderr_contains("qemu-system-x86");
}

#[test]
fn metrics_written_by_the_inner_run_reach_the_host() {
    let dir = TempDir::new("metrics");
    let path = dir.0.join("run.json");
    Guest::new()
        .flag("--metrics")
        .flag(path.to_str().unwrap())
        .sh("exit 5")
        .assert_code(5);
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["stop_reason"], "guest_exited", "{text}");
    assert_eq!(json["guest_status"], 5, "{text}");
    assert_eq!(json["emulated_host"], !kvm_usable(), "{text}");
    assert!(json["userspace_reached_ms"].as_u64().unwrap() > 0, "{text}");
    assert!(json["vmm_overhead_kib"].as_u64().unwrap() > 0, "{text}");

    let out = Guest::new()
        .flag("--metrics")
        .flag("/nonexistent-dir/run.json")
        .run(&["/bin/true"]);
    out.assert_code(2);
    out.assert_stderr_contains("--metrics /nonexistent-dir/run.json: directory");
}
