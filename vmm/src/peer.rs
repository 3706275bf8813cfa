//! `aiodma bench peer`: the same guest under QEMU (KVM, `microvm`) with a virtio-blk disk in
//! place of our device, for side-by-side I/O benchmarks. Same kernel, same initramfs layers,
//! same guest command, same place (directly on KVM, or as a level-2 guest in the emulated host).
//!
//! The disk is QEMU's `null-co` block driver (reads return zeroes, writes are dropped) with an
//! optional fixed latency per request, so it can mirror a `delay` fault on our device: both
//! then measure the virtqueue path plus the same service time, without a storage medium.

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::exit::{EXIT_GUEST_RESET, EXIT_KVM_FAILURE, EXIT_TIMEOUT};

/// What to run.
#[derive(Debug, Clone)]
pub struct PeerRun {
    /// bzImage.
    pub kernel: PathBuf,
    /// Initramfs layers, concatenated in order (QEMU takes one file).
    pub initrds: Vec<PathBuf>,
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Service time of each disk request.
    pub latency: Duration,
    /// Disk size, MiB.
    pub disk_mib: u64,
    /// The full kernel command line (guest command included).
    pub cmdline: String,
    /// Stop QEMU after this long.
    pub timeout: Option<Duration>,
    /// Hide XSAVE from the guest, as our VMM does in the emulated host (TCG ignores the
    /// XSETBV intercept).
    pub hide_xsave: bool,
}

/// Where microvm puts the disk's virtio-mmio transport, announced on the kernel command line.
/// microvm would append this itself, but after the guest command, where /init would take it
/// for an argument; so it is off, and this is its fixed layout: 8 transports of 512 bytes
/// from 0xfeb00000 on GSIs 5.., the first device on the last one.
pub const DISK_TRANSPORT: &str = "virtio_mmio.device=512@0xfeb00e00:12";

/// QEMU's arguments; `initrd` is the concatenated initramfs.
pub fn qemu_args(p: &PeerRun, initrd: &Path) -> Vec<OsString> {
    let mut args = crate::bench::microvm_peer_args(
        "microvm,acpi=off,auto-kernel-cmdline=off",
        p.hide_xsave,
        p.cpus,
        p.memory_mib,
    );
    let disk = format!(
        "driver=null-co,node-name=disk,size={},read-zeroes=on,latency-ns={}",
        p.disk_mib << 20,
        p.latency.as_nanos()
    );
    for arg in [
        "-blockdev",
        &disk,
        "-device",
        "virtio-blk-device,drive=disk",
        "-kernel",
        &p.kernel.display().to_string(),
        "-initrd",
        &initrd.display().to_string(),
        "-append",
        &p.cmdline,
    ] {
        args.push(arg.into());
    }
    args
}

/// The guest's exit status from QEMU's: `isa-debug-exit` makes QEMU exit with
/// `(value << 1) | 1`; 0 means the guest rebooted (a panic, or no exit port) without one.
pub fn guest_status(qemu_code: i32) -> Result<u8, String> {
    match qemu_code {
        0 => Err("the guest rebooted without reporting an exit status".into()),
        c if c > 0 && c & 1 == 1 => Ok(((c >> 1) & 0xff) as u8),
        c => Err(format!("QEMU exited with {c}")),
    }
}

/// Concatenate cpio archives into one file (the kernel unpacks each member in turn).
fn concat_initrds(layers: &[PathBuf], out: &Path) -> std::io::Result<()> {
    let mut file = std::fs::File::create(out)?;
    for layer in layers {
        std::io::copy(&mut std::fs::File::open(layer)?, &mut file)?;
    }
    file.flush()
}

/// What QEMU prints when a vCPU stops on a KVM internal error (it then pauses the VM).
const KVM_INTERNAL_ERROR: &str = "KVM internal error";
/// The one-line verdict for it. In the emulated host this is TCG's stale EXITINTINFO: KVM
/// reports an exit during event delivery (suberror 3) on an MMIO access, which our VMM's vCPU
/// loop steps over and QEMU does not.
pub const KVM_INTERNAL_ERROR_VERDICT: &str = "peer: QEMU stopped its guest on a KVM internal \
    error (in the emulated host: the emulator's stale EXITINTINFO, which our VMM steps over)";

/// Copy QEMU's stderr to ours, noting a KVM internal error.
fn forward_stderr(from: impl std::io::Read, seen: &AtomicBool) {
    let mut reader = std::io::BufReader::new(from);
    let mut line = String::new();
    let mut out = std::io::stderr();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.contains(KVM_INTERNAL_ERROR) {
            seen.store(true, Ordering::SeqCst);
        }
        let _ = out.write_all(line.as_bytes());
    }
}

/// Run the guest under QEMU; returns `aiodma run`'s exit code for the same outcome.
pub fn run(p: &PeerRun) -> u8 {
    let Some(qemu) = crate::host::find_in_path(crate::host::QEMU) else {
        log::error!(
            "bench peer needs qemu-system-x86_64: install the Debian package qemu-system-x86"
        );
        return crate::exit::EXIT_BAD_INPUT;
    };
    let initrd = std::env::temp_dir().join(format!("aiodma-peer-{}.cpio", std::process::id()));
    if let Err(e) = concat_initrds(&p.initrds, &initrd) {
        log::error!("bench peer: initramfs {}: {e}", initrd.display());
        return EXIT_KVM_FAILURE;
    }
    let code = run_qemu(p, &qemu, &initrd);
    let _ = std::fs::remove_file(&initrd);
    code
}

fn run_qemu(p: &PeerRun, qemu: &Path, initrd: &Path) -> u8 {
    log::info!(
        "peer: QEMU microvm, virtio-blk over null-co ({} MiB, {} us per request), {} vCPU(s), {} MiB",
        p.disk_mib,
        p.latency.as_micros(),
        p.cpus,
        p.memory_mib
    );
    let mut child = match Command::new(qemu)
        .args(qemu_args(p, initrd))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            log::error!("bench peer: start QEMU: {e}");
            return EXIT_KVM_FAILURE;
        }
    };
    // QEMU pauses a VM whose vCPU hit a KVM internal error, forever: watch its stderr for that.
    let internal_error = Arc::new(AtomicBool::new(false));
    if let Some(stderr) = child.stderr.take() {
        let seen = internal_error.clone();
        let _ = std::thread::Builder::new()
            .name("peer-stderr".into())
            .spawn(move || forward_stderr(stderr, &seen));
    }
    let deadline = p.timeout.map(|t| Instant::now() + t);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                log::error!("bench peer: wait for QEMU: {e}");
                return EXIT_KVM_FAILURE;
            }
        }
        if internal_error.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            log::error!("{KVM_INTERNAL_ERROR_VERDICT}");
            return EXIT_KVM_FAILURE;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            log::error!(
                "peer guest did not finish within {} s",
                p.timeout.map_or(0, |t| t.as_secs())
            );
            return EXIT_TIMEOUT;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    match guest_status(status.code().unwrap_or(-1)) {
        Ok(code) => {
            log::info!("peer guest command exited with status {code}");
            code
        }
        Err(e) => {
            log::error!("peer: {e}");
            if status.code() == Some(0) {
                EXIT_GUEST_RESET
            } else {
                EXIT_KVM_FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PeerRun {
        PeerRun {
            kernel: "/k/bzImage".into(),
            initrds: vec!["/a.cpio.gz".into(), "/b.cpio.gz".into()],
            cpus: 2,
            memory_mib: 256,
            latency: Duration::from_micros(100),
            disk_mib: 64,
            cmdline: "console=ttyS0 -- fio x".into(),
            timeout: None,
            hide_xsave: true,
        }
    }

    #[test]
    fn qemu_gets_a_null_disk_with_the_latency() {
        let args: Vec<String> = qemu_args(&sample(), Path::new("/tmp/i.cpio"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(joined
            .contains("-accel kvm -M microvm,acpi=off,auto-kernel-cmdline=off -cpu host,-xsave"));
        assert!(joined.contains(
            "driver=null-co,node-name=disk,size=67108864,read-zeroes=on,latency-ns=100000"
        ));
        assert!(joined.contains("-device virtio-blk-device,drive=disk"));
        assert!(joined.contains("-smp 2 -m 256M"));
        assert!(joined.contains("-initrd /tmp/i.cpio"));
        assert_eq!(args.last().unwrap(), "console=ttyS0 -- fio x");
    }

    #[test]
    fn a_kvm_internal_error_on_stderr_is_noticed_and_forwarded() {
        let seen = AtomicBool::new(false);
        forward_stderr(&b"qemu: warning: x\n"[..], &seen);
        assert!(!seen.load(Ordering::SeqCst));
        forward_stderr(
            &b"KVM internal error. Suberror: 3\nextra data[0]: 0x1\n"[..],
            &seen,
        );
        assert!(seen.load(Ordering::SeqCst));
    }

    #[test]
    fn exit_status_decodes_isa_debug_exit() {
        assert_eq!(guest_status(1), Ok(0));
        assert_eq!(guest_status(7), Ok(3));
        assert!(guest_status(0).is_err());
        assert!(guest_status(2).is_err());
        assert!(guest_status(-1).is_err());
    }

    #[test]
    fn initrd_layers_are_concatenated_in_order() {
        let dir = std::env::temp_dir().join(format!("aiodma-peer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b, out) = (dir.join("a"), dir.join("b"), dir.join("out"));
        std::fs::write(&a, b"first").unwrap();
        std::fs::write(&b, b"second").unwrap();
        concat_initrds(&[a, b], &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"firstsecond");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
