//! Booting the real test guest with the real kernel through `aiodma run` (issue: VMM).

// Integration tests fail by panicking; helpers outside #[test] fns count too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use aiodma_tests::{artifact, Guest, TempDir};

#[test]
fn true_exits_zero_and_reports_boot_time() {
    Guest::new()
        .run(&["/bin/true"])
        .assert_code(0)
        .assert_stderr_contains("guest userspace reached in ");
}

#[test]
fn exit_status_is_forwarded() {
    Guest::new().sh("exit 7").assert_code(7);
    Guest::new().sh("exit 255").assert_code(255);
}

#[test]
fn guest_output_reaches_stdout_in_order() {
    let out = Guest::new().sh("for i in 1 2 3 4 5 6 7 8; do echo marker-$i; done");
    out.assert_code(0);
    let order: Vec<&str> = out
        .stdout
        .split('\n')
        .filter(|l| l.starts_with("marker-"))
        .collect();
    assert_eq!(
        order,
        (1..=8).map(|i| format!("marker-{i}")).collect::<Vec<_>>(),
        "{}",
        out.report()
    );
}

#[test]
fn cpus_flag_sets_the_guest_cpu_count() {
    Guest::new()
        .flag("--cpus")
        .flag("2")
        .sh("echo cpus=$(grep -c ^processor /proc/cpuinfo)")
        .assert_code(0)
        .assert_stdout_contains("cpus=2");
}

#[test]
fn memory_flag_sets_the_guest_ram() {
    let out = Guest::new()
        .flag("--memory")
        .flag("512")
        .sh("grep MemTotal /proc/meminfo");
    out.assert_code(0);
    let kib: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal\n{}", out.report()));
    assert!(
        (440 * 1024..=512 * 1024).contains(&kib),
        "MemTotal {kib} KiB is not ~512 MiB\n{}",
        out.report()
    );
}

#[test]
fn guest_kernel_panic_gives_the_panic_code() {
    // init exiting is a kernel panic ("Attempted to kill init!").
    Guest::new()
        .flag("--append")
        .flag("rdinit=/bin/false")
        .run(&[])
        .assert_code(101)
        .assert_stdout_contains("Kernel panic")
        .assert_stderr_contains("guest kernel panicked");
}

#[test]
fn timeout_stops_a_guest_that_never_exits() {
    let out = Guest::default()
        .flag("--timeout")
        .flag("4")
        .run(&["sleep", "1000"]);
    out.assert_code(124);
    out.assert_stderr_contains("did not finish within 4 s");
}

#[test]
fn extra_initrd_adds_a_runnable_file() {
    let dir = TempDir::new("initrd");
    let root = dir.0.join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let script = root.join("bin/extra-hello");
    std::fs::write(&script, "#!/bin/sh\necho extra-initrd-says-hi\nexit 42\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let archive = dir.0.join("extra.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find bin bin/extra-hello | cpio --quiet -o -H newc > {}",
            root.display(),
            archive.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    Guest::new()
        .flag("--initrd")
        .flag(archive.to_str().unwrap())
        .run(&["/bin/extra-hello"])
        .assert_code(42)
        .assert_stdout_contains("extra-initrd-says-hi");
}

#[test]
fn module_is_loaded_in_the_guest() {
    Guest::new()
        .sh("grep -q '^aiodma ' /proc/modules && echo module-loaded")
        .assert_code(0)
        .assert_stdout_contains("module-loaded");
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    for (flags, needle) in [
        (
            vec!["--kernel", "/nonexistent/bzImage"],
            "kernel /nonexistent/bzImage",
        ),
        (
            vec!["--initrd", "/nonexistent.cpio"],
            "initrd /nonexistent.cpio",
        ),
        (
            vec!["--kernel", artifact("initramfs.cpio.gz").to_str().unwrap()],
            "not a bzImage",
        ),
    ] {
        let mut guest = Guest::new();
        for f in flags {
            guest = guest.flag(f);
        }
        let out = guest.run(&["/bin/true"]);
        out.assert_code(2);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.report());
        out.assert_stderr_contains(needle);
    }
    let out = Guest::new().flag("--cpus").flag("0").run(&[]);
    out.assert_code(2);
    let out = Guest::new().run(&["echo", "a\"b"]);
    out.assert_code(2);
    out.assert_stderr_contains("double quote");
}

#[test]
fn boot_bench_prints_both_vmms_and_their_ratio() {
    let out = std::process::Command::new(aiodma_tests::aiodma_bin())
        .current_dir(aiodma_tests::repo_root())
        .args(["bench", "boot", "--runs", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {name}")))
            .unwrap_or_else(|| panic!("no {name} row:\n{stdout}"))
            .to_string()
    };
    assert!(row("aiodma ").contains(" ms"), "{stdout}");
    assert!(row("QEMU microvm").contains(" ms"), "{stdout}");
    assert!(
        stdout.contains("aiodma / QEMU, /bin/true total: "),
        "{stdout}"
    );
}

#[test]
fn guest_reset_without_status_gives_102_and_logs_where() {
    // `reboot -f` with reboot=t triple-faults: the VMM reports the reset and the vCPU state.
    Guest::new()
        .unchecked()
        .run(&["reboot", "-f"])
        .assert_code(102)
        .assert_stderr_contains("shutdown exit (triple fault or reboot) at rip ")
        .assert_stderr_contains("guest reset without reporting an exit status");
}
