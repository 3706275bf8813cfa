//! `aiodma bench boot`: boot time and memory of our VMM next to QEMU's `microvm`, same kernel,
//! same initramfs, same guest command (`/bin/true`), same place (directly on KVM, or inside the
//! emulated host, where both run as level-2 guests).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::config::DEFAULT_CMDLINE;

/// One boot's measurements.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootSample {
    /// Spawn to process exit, ms.
    pub total_ms: f64,
    /// VMM start to "userspace reached", ms (ours only).
    pub userspace_ms: Option<f64>,
    /// Peak RSS of the VMM process, KiB.
    pub max_rss_kib: u64,
    /// RSS minus resident guest RAM at exit, KiB (ours only).
    pub overhead_kib: Option<u64>,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootBench {
    /// Boots per VMM.
    pub runs: usize,
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// bzImage.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Hide XSAVE from QEMU's guest as our VMM does in the emulated host.
    pub hide_xsave: bool,
}

/// Run `cmd` to completion; returns (exit code, wall ms, peak RSS KiB, stderr).
fn measure(mut cmd: Command) -> std::io::Result<(i32, f64, u64, String)> {
    let stderr_file = tempfile_path("stderr");
    let err = std::fs::File::create(&stderr_file)?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
    let start = Instant::now();
    let child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for the kernel to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped (we never call `wait` on `child`), and
    // both out-pointers are valid for writes.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed().as_secs_f64() * 1000.0;
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let stderr = std::fs::read_to_string(&stderr_file).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr_file);
    Ok((
        code,
        wall,
        u64::try_from(usage.ru_maxrss).unwrap_or(0),
        stderr,
    ))
}

fn tempfile_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("aiodma-bench-{}-{tag}", std::process::id()))
}

fn ours(b: &BootBench, exe: &Path) -> Result<BootSample, String> {
    let metrics_path = tempfile_path("metrics.json");
    let mut cmd = Command::new(exe);
    cmd.args(["run", "--host", "kvm", "--metrics"])
        .arg(&metrics_path)
        .arg("--cpus")
        .arg(b.cpus.to_string())
        .arg("--memory")
        .arg(b.memory_mib.to_string())
        .arg("--kernel")
        .arg(&b.kernel)
        .arg("--base-initrd")
        .arg(&b.initrd)
        .args(["--timeout", "60", "--", "/bin/true"]);
    let (code, total_ms, max_rss_kib, stderr) = measure(cmd).map_err(|e| format!("aiodma: {e}"))?;
    if code != 0 {
        return Err(format!("aiodma exited {code}: {stderr}"));
    }
    let metrics = std::fs::read_to_string(&metrics_path)
        .map_err(|e| format!("--metrics {}: {e}", metrics_path.display()))?;
    let _ = std::fs::remove_file(&metrics_path);
    let metrics: serde_json::Value =
        serde_json::from_str(&metrics).map_err(|e| format!("metrics JSON: {e}"))?;
    Ok(BootSample {
        total_ms,
        userspace_ms: metrics["userspace_reached_ms"].as_f64(),
        max_rss_kib,
        overhead_kib: metrics["vmm_overhead_kib"].as_u64(),
    })
}

/// QEMU microvm on KVM as a peer of our VMM: `machine` options, the CPU (without XSAVE where
/// ours hides it), vCPUs and memory, the console on stdio and our exit port. The caller adds
/// devices, kernel, initramfs and command line.
pub fn microvm_peer_args(
    machine: &str,
    hide_xsave: bool,
    cpus: u8,
    memory_mib: u64,
) -> Vec<OsString> {
    let cpu = if hide_xsave { "host,-xsave" } else { "host" };
    let exit_port = format!(
        "isa-debug-exit,iobase={:#x},iosize=1",
        aiodma_device::abi::platform::EXIT_PORT
    );
    [
        "-accel",
        "kvm",
        "-M",
        machine,
        "-cpu",
        cpu,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        &exit_port,
        "-smp",
        &cpus.to_string(),
        "-m",
        &format!("{memory_mib}M"),
    ]
    .iter()
    .map(OsString::from)
    .collect()
}

/// QEMU's arguments for the same boot.
pub fn qemu_args(b: &BootBench) -> Vec<OsString> {
    let mut args = microvm_peer_args("microvm,acpi=off", b.hide_xsave, b.cpus, b.memory_mib);
    args.extend(["-kernel".into(), b.kernel.clone().into_os_string()]);
    args.extend(["-initrd".into(), b.initrd.clone().into_os_string()]);
    args.extend([
        "-append".into(),
        format!("{DEFAULT_CMDLINE} -- /bin/true").into(),
    ]);
    args
}

fn qemu(b: &BootBench, qemu: &Path) -> Result<BootSample, String> {
    let mut cmd = Command::new(qemu);
    cmd.args(qemu_args(b));
    let (code, total_ms, max_rss_kib, stderr) = measure(cmd).map_err(|e| format!("QEMU: {e}"))?;
    // isa-debug-exit: QEMU exits with (status << 1) | 1, so /bin/true's 0 reads as 1.
    if code != 1 {
        return Err(format!("QEMU exited {code}: {stderr}"));
    }
    Ok(BootSample {
        total_ms,
        userspace_ms: None,
        max_rss_kib,
        overhead_kib: None,
    })
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0} ms"))
}

fn fmt_mib(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.1} MiB", v / 1024.0))
}

struct Row {
    name: &'static str,
    userspace: Option<f64>,
    total: Option<f64>,
    rss: Option<f64>,
    overhead: Option<f64>,
}

impl Row {
    fn of(name: &'static str, samples: &[BootSample]) -> Self {
        Row {
            name,
            userspace: median(samples.iter().filter_map(|s| s.userspace_ms).collect()),
            total: median(samples.iter().map(|s| s.total_ms).collect()),
            rss: median(samples.iter().map(|s| s.max_rss_kib as f64).collect()),
            overhead: median(
                samples
                    .iter()
                    .filter_map(|s| s.overhead_kib.map(|k| k as f64))
                    .collect(),
            ),
        }
    }
}

/// Run the benchmark and print the table. Returns an error line if a boot failed.
pub fn run(b: &BootBench, emulated: bool) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("locate aiodma: {e}"))?;
    let qemu_bin = crate::host::find_in_path(crate::host::QEMU);
    let mut ours_samples = Vec::new();
    let mut qemu_samples = Vec::new();
    // Interleave the two VMMs so drift in the machine's load hits both alike.
    for _ in 0..b.runs {
        ours_samples.push(ours(b, &exe)?);
        if let Some(q) = &qemu_bin {
            qemu_samples.push(qemu(b, q)?);
        }
    }
    let rows = [
        Row::of("aiodma", &ours_samples),
        Row::of("QEMU microvm", &qemu_samples),
    ];
    let place = if emulated {
        "inside the emulated host (level-2 guests under nested KVM on QEMU TCG: not bare-metal figures)"
    } else {
        "directly on this machine's KVM"
    };
    println!(
        "boot benchmark: median of {} runs, {} vCPU(s), {} MiB, guest command /bin/true, {place}",
        b.runs, b.cpus, b.memory_mib
    );
    println!(
        "| {:<13} | {:>18} | {:>18} | {:>13} | {:>21} |",
        "VMM", "userspace reached", "/bin/true, total", "peak RSS", "VMM memory overhead"
    );
    println!(
        "|{:-<15}|{:-<20}|{:-<20}|{:-<15}|{:-<23}|",
        "", "", "", "", ""
    );
    for row in &rows {
        println!(
            "| {:<13} | {:>18} | {:>18} | {:>13} | {:>21} |",
            row.name,
            fmt_ms(row.userspace),
            fmt_ms(row.total),
            fmt_mib(row.rss),
            fmt_mib(row.overhead)
        );
    }
    match (rows[0].total, rows[1].total) {
        (Some(a), Some(q)) if q > 0.0 => {
            println!(
                "aiodma / QEMU, /bin/true total: {:.2} ({})",
                a / q,
                if a <= q {
                    "aiodma is faster"
                } else {
                    "aiodma is slower"
                }
            )
        }
        _ => println!("QEMU (qemu-system-x86_64) not found: no peer figures"),
    }
    println!(
        "(peak RSS includes the guest RAM each guest touched; the overhead column excludes it)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(3.0));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn qemu_peer_uses_the_same_boot() {
        let b = BootBench {
            runs: 1,
            cpus: 2,
            memory_mib: 256,
            kernel: "/k".into(),
            initrd: "/i".into(),
            hide_xsave: true,
        };
        let args: Vec<String> = qemu_args(&b)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel kvm -M microvm,acpi=off -cpu host,-xsave"));
        assert!(joined.contains("-smp 2 -m 256M -kernel /k -initrd /i"));
        assert_eq!(
            args.last().unwrap(),
            &format!("{DEFAULT_CMDLINE} -- /bin/true")
        );
    }
}
