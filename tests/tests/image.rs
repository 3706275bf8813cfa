//! The test-guest image (issue: image build): the artifacts are what they claim to be, and the
//! build scripts reject bad input with one clear line.

// Integration tests fail by panicking; helpers outside #[test] fns count too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

use aiodma_tests::{artifact, repo_root, TempDir};

/// Kconfig lines of the fragment: (`CONFIG_X=v` lines, options that must be unset).
fn fragment() -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(repo_root().join("images/kernel.config")).unwrap();
    let mut set = Vec::new();
    let mut unset = Vec::new();
    for line in text.lines() {
        if line.starts_with("CONFIG_") {
            set.push(line.to_string());
        } else if let Some(rest) = line.strip_prefix("# CONFIG_") {
            if let Some(opt) = rest.strip_suffix(" is not set") {
                unset.push(format!("CONFIG_{opt}"));
            }
        }
    }
    (set, unset)
}

#[test]
fn kernel_config_has_rust_and_every_wanted_option() {
    let config = std::fs::read_to_string(artifact("kernel.config")).unwrap();
    let lines: BTreeSet<&str> = config.lines().collect();
    assert!(
        lines.contains("CONFIG_RUST=y"),
        "CONFIG_RUST=y missing from the built kernel"
    );
    let (set, unset) = fragment();
    assert!(set.len() > 50, "fragment unexpectedly small: {}", set.len());
    for want in &set {
        assert!(lines.contains(want.as_str()), "built kernel lacks {want}");
    }
    for opt in &unset {
        assert!(
            !config.lines().any(|l| l.starts_with(&format!("{opt}="))),
            "built kernel has {opt} set"
        );
    }
    // The roles' key options, spelled out so a fragment edit cannot silently drop them.
    for want in [
        "CONFIG_64BIT=y",
        "CONFIG_SMP=y",
        "CONFIG_PCI=y",
        "CONFIG_PCI_MSI=y",
        "CONFIG_MODULES=y",
        "CONFIG_AIO=y",
        "CONFIG_IO_URING=y",
        "CONFIG_KVM=y",
        "CONFIG_KVM_AMD=y",
        "CONFIG_KVM_INTEL=y",
        "CONFIG_9P_FS=y",
        "CONFIG_NET_9P_VIRTIO=y",
        "CONFIG_VIRTIO_BLK=y",
        "CONFIG_VIRTIO_PCI=y",
        "CONFIG_BLK_DEV_NULL_BLK=y",
        "CONFIG_SERIAL_8250_CONSOLE=y",
        "CONFIG_X86_MPPARSE=y",
        "CONFIG_KVM_GUEST=y",
        "CONFIG_DEVTMPFS=y",
    ] {
        assert!(lines.contains(want), "built kernel lacks {want}");
    }
    let bzimage = std::fs::metadata(artifact("bzImage")).unwrap().len();
    assert!(
        (1 << 20..16 << 20).contains(&bzimage),
        "bzImage size {bzimage}"
    );
}

/// Paths in a gzip'd cpio archive.
fn cpio_list(archive: &Path) -> BTreeSet<String> {
    let gz = std::fs::File::open(archive).unwrap();
    let mut gunzip = Command::new("gzip")
        .args(["-dc"])
        .stdin(gz)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let listing = Command::new("cpio")
        .args(["-t", "--quiet"])
        .stdin(gunzip.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(gunzip.wait().unwrap().success());
    assert!(
        listing.status.success(),
        "cpio -t failed on {}",
        archive.display()
    );
    String::from_utf8(listing.stdout)
        .unwrap()
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .collect()
}

#[test]
fn base_initramfs_has_busybox_init_tools_and_module() {
    let files = cpio_list(&artifact("initramfs.cpio.gz"));
    for want in [
        "init",
        "l1init",
        "bin/busybox",
        "bin/sh",
        "bin/insmod",
        "bin/aiodma-guest",
        "lib/modules/aiodma.ko",
    ] {
        assert!(
            files.contains(want),
            "base initramfs lacks {want}: {files:?}"
        );
    }
    assert!(
        !files.iter().any(|f| f.ends_with("/fio")),
        "fio belongs in the fio layer"
    );
    let size = std::fs::metadata(artifact("initramfs.cpio.gz"))
        .unwrap()
        .len();
    assert!(
        size < 4 << 20,
        "base initramfs is {size} bytes; keep it small"
    );
}

#[test]
fn fio_layer_is_a_static_fio_and_the_job_files() {
    let layer = artifact("fio.cpio.gz");
    let files = cpio_list(&layer);
    assert!(files.contains("usr/bin/fio"), "{files:?}");
    for job in [
        "verify-libaio",
        "verify-io_uring",
        "verify-psync",
        "bench-randread",
    ] {
        assert!(files.contains(&format!("etc/fio/{job}.fio")), "{files:?}");
    }
    // One static binary: no loader, no libraries.
    assert!(
        !files
            .iter()
            .any(|f| f.contains("ld-linux") || f.contains(".so")),
        "{files:?}"
    );
    let size = std::fs::metadata(&layer).unwrap().len();
    assert!(size < 8 << 20, "fio layer is {size} bytes");
}

#[test]
fn module_modinfo_names_it_and_its_license() {
    let out = Command::new("modinfo")
        .arg(artifact("aiodma.ko"))
        .output()
        .unwrap();
    assert!(out.status.success(), "modinfo failed: {out:?}");
    let info = String::from_utf8(out.stdout).unwrap();
    assert!(
        info.lines()
            .any(|l| l.split_whitespace().eq(["name:", "aiodma"])),
        "{info}"
    );
    assert!(
        info.lines()
            .any(|l| l.split_whitespace().eq(["license:", "GPL"])),
        "{info}"
    );
    assert!(info.contains("vermagic:") && info.contains("7.3"), "{info}");
}

/// Run an images/ script; returns (exit code, stderr).
fn script(name: &str, env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("images").join(name))
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[track_caller]
fn assert_one_line_error(code: i32, stderr: &str, needle: &str) {
    assert_eq!(code, 2, "expected exit 2, stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    assert!(
        lines[0].contains("error:") && lines[0].contains(needle),
        "{stderr}"
    );
}

#[test]
fn kernel_src_rejects_a_non_kernel_directory() {
    let dir = TempDir::new("notkernel");
    std::fs::write(dir.0.join("Makefile"), "all:\n").unwrap();
    let (code, err) = script("kernel-src.sh", &[("KERNEL_SRC", dir.0.to_str().unwrap())]);
    assert_one_line_error(code, &err, "not a Linux source tree");
}

#[test]
fn kernel_src_without_a_debian_mirror_says_so() {
    let apt = TempDir::new("noapt");
    std::fs::create_dir_all(apt.0.join("sources.list.d")).unwrap();
    let (code, err) = script(
        "kernel-src.sh",
        &[
            ("AIODMA_APT_ETC", apt.0.to_str().unwrap()),
            ("KERNEL_SRC", ""),
        ],
    );
    assert_one_line_error(code, &err, "no Debian mirror configured");
}

#[test]
fn fio_src_rejects_a_non_fio_directory_and_needs_a_mirror() {
    let dir = TempDir::new("notfio");
    std::fs::write(dir.0.join("configure"), "#!/bin/sh\n").unwrap();
    let (code, err) = script("fio-src.sh", &[("FIO_SRC", dir.0.to_str().unwrap())]);
    assert_one_line_error(code, &err, "not an fio source tree");

    let apt = TempDir::new("noapt-fio");
    std::fs::create_dir_all(apt.0.join("sources.list.d")).unwrap();
    let cache = TempDir::new("nocache-fio");
    let (code, err) = script(
        "fio-src.sh",
        &[
            ("AIODMA_APT_ETC", apt.0.to_str().unwrap()),
            ("AIODMA_CACHE", cache.0.to_str().unwrap()),
            ("FIO_SRC", ""),
        ],
    );
    assert_one_line_error(code, &err, "no Debian mirror configured");
}

#[test]
fn deps_names_a_missing_tool_on_a_non_debian_machine() {
    // A PATH with every tool of this machine except flex, and no Debian marker file.
    let bin = TempDir::new("nodebian");
    for dir in ["/usr/local/bin", "/usr/bin", "/bin"] {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name();
            let link = bin.0.join(&name);
            if name != "flex" && !link.exists() {
                let _ = std::os::unix::fs::symlink(entry.path(), link);
            }
        }
    }
    let cargo_bin = std::env::var("HOME").unwrap() + "/.cargo/bin";
    let path = format!("{}:{cargo_bin}", bin.0.display());
    let (code, err) = script(
        "deps.sh",
        &[
            ("PATH", &path),
            ("AIODMA_DEBIAN_VERSION_FILE", "/nonexistent"),
        ],
    );
    assert_one_line_error(code, &err, "missing flex");
}
