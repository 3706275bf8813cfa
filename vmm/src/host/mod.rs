//! Where KVM comes from: this machine's, or an emulated KVM-capable host.
//!
//! Some machines have a `/dev/kvm` that cannot run an unmodified Linux guest (`kvm_pvm`, a
//! PVM-style hypervisor) or none at all. There `aiodma` runs itself inside a level-1 VM under
//! QEMU's software emulator with an AMD SVM CPU, where real KVM is available (`emulated`).

pub mod emulated;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

/// Set (to "1") in the environment of the `aiodma` that runs inside the emulated host.
pub const IN_EMULATED_HOST_ENV: &str = "AIODMA_IN_EMULATED_HOST";

/// QEMU's x86 system emulator: the emulated host, and the peer VMM of the benchmarks.
pub const QEMU: &str = "qemu-system-x86_64";

/// The first file called `name` in a directory of `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Whether this machine's KVM can run the test guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmVerdict {
    /// It can.
    Usable,
    /// It cannot, for this reason (one line, for the log and for errors).
    Unusable(String),
}

/// Probe KVM under `root` (`/` normally; a fake tree in tests): `/dev/kvm` present and
/// openable, not provided by `kvm_pvm`, and a CPU with VMX or SVM.
pub fn probe_kvm(root: &Path) -> KvmVerdict {
    let dev = root.join("dev/kvm");
    if !dev.exists() {
        return KvmVerdict::Unusable(
            "/dev/kvm does not exist (KVM not loaded or not available)".into(),
        );
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open(&dev) {
        return KvmVerdict::Unusable(format!("/dev/kvm cannot be opened: {e}"));
    }
    if root.join("sys/module/kvm_pvm").exists() {
        return KvmVerdict::Unusable(
            "/dev/kvm is provided by kvm_pvm, which cannot run an unmodified Linux guest".into(),
        );
    }
    match std::fs::read_to_string(root.join("proc/cpuinfo")) {
        Ok(cpuinfo) => {
            let has_virt = cpuinfo
                .lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
            if has_virt {
                KvmVerdict::Usable
            } else {
                KvmVerdict::Unusable(
                    "the CPU offers no hardware virtualization (no vmx/svm flag)".into(),
                )
            }
        }
        Err(e) => KvmVerdict::Unusable(format!("cannot read /proc/cpuinfo: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct FakeRoot(PathBuf);

    impl FakeRoot {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("aiodma-probe-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("dev")).unwrap();
            std::fs::create_dir_all(dir.join("proc")).unwrap();
            std::fs::create_dir_all(dir.join("sys/module")).unwrap();
            FakeRoot(dir)
        }
        fn kvm(self) -> Self {
            std::fs::write(self.0.join("dev/kvm"), b"").unwrap();
            self
        }
        fn cpu_flags(self, flags: &str) -> Self {
            let text = format!("processor\t: 0\nflags\t\t: fpu {flags} sse2\n\n");
            std::fs::write(self.0.join("proc/cpuinfo"), text).unwrap();
            self
        }
        fn module(self, name: &str) -> Self {
            std::fs::create_dir_all(self.0.join("sys/module").join(name)).unwrap();
            self
        }
    }

    impl Drop for FakeRoot {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn unusable(v: KvmVerdict) -> String {
        match v {
            KvmVerdict::Unusable(reason) => reason,
            KvmVerdict::Usable => panic!("expected unusable"),
        }
    }

    #[test]
    fn missing_dev_kvm() {
        let root = FakeRoot::new("missing").cpu_flags("svm");
        assert!(unusable(probe_kvm(&root.0)).contains("does not exist"));
    }

    #[test]
    fn pvm_is_rejected() {
        let root = FakeRoot::new("pvm")
            .kvm()
            .cpu_flags("vmx")
            .module("kvm")
            .module("kvm_pvm");
        assert!(unusable(probe_kvm(&root.0)).contains("kvm_pvm"));
    }

    #[test]
    fn no_hardware_virtualization() {
        let root = FakeRoot::new("novirt").kvm().cpu_flags("pae hypervisor");
        assert!(unusable(probe_kvm(&root.0)).contains("vmx/svm"));
    }

    #[test]
    fn vmx_or_svm_with_plain_kvm_is_usable() {
        let intel = FakeRoot::new("intel")
            .kvm()
            .cpu_flags("vmx ept")
            .module("kvm_intel");
        assert_eq!(probe_kvm(&intel.0), KvmVerdict::Usable);
        let amd = FakeRoot::new("amd")
            .kvm()
            .cpu_flags("svm npt")
            .module("kvm_amd");
        assert_eq!(probe_kvm(&amd.0), KvmVerdict::Usable);
    }
}
