//! The emulated KVM host: `aiodma` re-runs itself inside a level-1 Linux VM under QEMU TCG.
//!
//! Level 0 (this process) starts QEMU with the project's own kernel (built with KVM_AMD and 9p)
//! and initramfs, entering through `/l1init` (`images/l1init`). QEMU choices, each on purpose:
//! - `-accel tcg,thread=multi -cpu max`: software emulation of an AMD CPU with SVM, so
//!   `kvm_amd` inside gives real KVM (TCG implements no Intel VMX). Level-1 KVM uses shadow
//!   paging (`kvm_amd.npt=0`, see [`qemu_args`]): TCG's nested paging breaks under load.
//! - `-M microvm,acpi=off,pit=on`: the smallest machine; virtio-mmio devices are announced on
//!   the kernel command line; the PIT lets the TSC calibrate (and `tsc_early_khz` pins it, as
//!   calibration under TCG fails in about 30% of boots without it).
//! - vCPUs = host cores, memory = the guest's `--memory` plus [`LEVEL1_HEADROOM_MIB`].
//! - `-no-reboot`: the level-1 guest reboots when done, which ends QEMU.
//! - 9p shares: `/` read-only (tag `host`), the job directory read-write (tag `job`), and each
//!   directory of `AIODMA_WRITABLE` read-write (tags `w0`, `w1`, …), each at its own path.
//! - ttyS0 = QEMU's stdio (the inner run's stdout and stdin); hvc0 (virtio-console) = this
//!   process's stderr, so the inner run's stderr stays separate.
//! - `isa-debug-exit` on `abi::platform::EXIT_PORT`: level 1 ends QEMU at once, without a
//!   reboot, by writing there (as the test guest does under our VMM).
//!
//! - With `--api-sock PATH`: a virtio-serial port named `org.aiodma.api` whose chardev connects
//!   to `<job dir>/api.sock`, where this process listens; it listens at PATH too and relays the
//!   API's requests to the VMM inside over the port (`crate::api::forward`).
//!
//! The inner run's exit status comes back through `<job dir>/status` (QEMU's own exit code
//! carries only 7 bits of it).

use std::ffi::OsString;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aiodma_device::abi::platform;

use super::{find_in_path, IN_EMULATED_HOST_ENV, QEMU};

/// Memory the level-1 kernel and the host tools it runs need on top of the level-2 guest.
pub const LEVEL1_HEADROOM_MIB: u64 = 512;
/// Time level 1 gets on top of the inner run's timeout: its own boot and shutdown (measured
/// 1.0–2.5 s here, with parallel tests), with a wide margin for a slower or busier machine.
pub const LEVEL1_GRACE: Duration = Duration::from_secs(60);
/// The line `/l1init` prints once the host's files are mounted, just before the inner run.
pub const READY_MARKER: &str = "aiodma-l1: ready";
/// Set (to anything): a level-1 reset pauses level 1 instead of ending it, so the level-0
/// watchdog's monitor dump shows the vCPUs as they were (for debugging the emulator).
pub const PAUSE_ON_RESET_ENV: &str = "AIODMA_L1_PAUSE_ON_RESET";
/// Extra level-1 kernel command-line parameters (e.g. `kvm_amd.npt=0`).
pub const L1_APPEND_ENV: &str = "AIODMA_L1_APPEND";
/// Colon-separated host directories the inner run may write to.
pub const WRITABLE_ENV: &str = "AIODMA_WRITABLE";
/// QEMU's human monitor, in the job directory: asked where level 1's vCPUs are if it hangs.
const MONITOR_SOCKET: &str = "monitor.sock";
/// The socket in the job directory that QEMU connects the API port's chardev to.
const API_LINK: &str = "api.sock";
/// QEMU's log of level-1 CPU resets (`-d cpu_reset`), in the job directory: a triple fault
/// there is how a level-1 kernel dies without a word.
const RESET_LOG: &str = "qemu-reset.log";

/// Why the emulated host could not run.
#[derive(Debug, thiserror::Error)]
pub enum EmulatedError {
    /// QEMU is not installed.
    #[error("the emulated host needs {QEMU}: install the Debian package qemu-system-x86")]
    QemuMissing,
    /// A level-1 image file is missing.
    #[error("emulated host: {0}: {1} (run `make image` to build the guest image)")]
    Image(PathBuf, io::Error),
    /// A writable directory does not exist.
    #[error("{WRITABLE_ENV}: {0}: {1}")]
    Writable(PathBuf, io::Error),
    /// An OS operation failed.
    #[error("emulated host: {0}: {1}")]
    Io(&'static str, io::Error),
    /// Level 1 outlived the inner run's timeout plus its grace: it was killed.
    #[error("the emulated host did not finish within {} s (the guest's --timeout plus {} s for level 1): QEMU killed{detail}", .limit.as_secs(), LEVEL1_GRACE.as_secs())]
    Hung {
        /// The limit that passed.
        limit: Duration,
        /// Where level 1's vCPUs were, from QEMU's monitor.
        detail: String,
    },
    /// The API's socket (`--api-sock`) cannot be served.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// QEMU ended without the inner run's status.
    #[error("emulated host stopped without an exit status (QEMU {qemu}){detail}")]
    NoStatus {
        /// QEMU's exit status.
        qemu: String,
        /// The last lines the level-1 kernel printed, if the inner run never started.
        detail: String,
    },
}

impl EmulatedError {
    /// Exit code: missing tools and images are the user's to fix (2); the rest are failures (3).
    pub fn exit_code(&self) -> u8 {
        match self {
            EmulatedError::QemuMissing | EmulatedError::Image(..) | EmulatedError::Writable(..) => {
                crate::exit::EXIT_BAD_INPUT
            }
            EmulatedError::Hung { .. } => crate::exit::EXIT_TIMEOUT,
            EmulatedError::Api(e) => e.exit_code(),
            _ => crate::exit::EXIT_KVM_FAILURE,
        }
    }
}

/// What the level-1 run needs to know.
#[derive(Debug, Clone)]
pub struct Level1 {
    /// Level-1 kernel (with KVM_AMD and 9p).
    pub kernel: PathBuf,
    /// Level-1 initramfs (with `/l1init`).
    pub initrd: PathBuf,
    /// Level-2 guest memory, to size level 1.
    pub guest_memory_mib: u64,
    /// No guest command: forward the terminal.
    pub interactive: bool,
    /// Host directories the inner run writes to (besides those of `AIODMA_WRITABLE`).
    pub writable: Vec<PathBuf>,
    /// The inner run's own `--timeout`. Level 0 enforces it too (plus
    /// [`LEVEL1_GRACE`]), so a level 1 that stops responding cannot hang the caller.
    pub timeout: Option<Duration>,
    /// The level-1 kernel's symbol table, to name where a hung level 1's vCPUs are.
    pub system_map: Option<PathBuf>,
    /// The inner run's `--api-sock`: served here and relayed to level 1 over a virtio-serial
    /// port.
    pub api_sock: Option<PathBuf>,
}

/// Quote `s` for POSIX sh.
pub fn shell_quote(s: &[u8]) -> String {
    let text = String::from_utf8_lossy(s);
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The script the level-1 init runs (chrooted into the host's filesystem): enter the caller's
/// directory, restore its environment, run the same `aiodma` command line on real KVM.
pub fn job_script(
    cwd: &Path,
    exe: &Path,
    args: &[OsString],
    env: &[(OsString, OsString)],
) -> String {
    let mut script = String::from("#!/bin/sh\n# aiodma: the inner run of the emulated host\n");
    script.push_str(&format!(
        "cd {} || exit 2\n",
        shell_quote(cwd.as_os_str().as_bytes())
    ));
    for (key, value) in env {
        let key = String::from_utf8_lossy(key.as_bytes());
        if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !key.is_empty() {
            script.push_str(&format!("export {key}={}\n", shell_quote(value.as_bytes())));
        }
    }
    script.push_str(&format!(
        "export {IN_EMULATED_HOST_ENV}=1\nexec {}",
        shell_quote(exe.as_os_str().as_bytes())
    ));
    for arg in args {
        script.push(' ');
        script.push_str(&shell_quote(arg.as_bytes()));
    }
    script.push('\n');
    script
}

/// The host's TSC frequency in kHz, from /proc/cpuinfo's "cpu MHz".
pub fn tsc_khz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

/// QEMU's command line for level 1.
pub fn qemu_args(
    l1: &Level1,
    stderr_path: &str,
    job_dir: &Path,
    writable: &[PathBuf],
    cpus: usize,
    tsc_khz: Option<u64>,
) -> Vec<OsString> {
    // kvm_amd.npt=0: level-1 KVM uses shadow paging instead of nested paging. TCG's emulation
    // of nested paging breaks under sustained load: in an A/B run of the same 14-point
    // bench-suite boot, 5 of 10 boots with NPT failed (guest stuck, level-2 or level-1 triple
    // fault) and 0 of 10 without, which were also ~40% faster at QD32.
    let mut append = String::from(
        "console=ttyS0 quiet panic=-1 reboot=t rdinit=/l1init initcall_blacklist=vt_init \
         kvm_amd.npt=0",
    );
    if let Some(khz) = tsc_khz {
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }
    append.push_str(&format!(" aiodma.job={}", job_dir.display()));
    if let Some(extra) = std::env::var_os(L1_APPEND_ENV) {
        // Level-1 kernel parameters for experiments (e.g. kvm_amd's module parameters).
        append.push(' ');
        append.push_str(&extra.to_string_lossy());
    }
    let mut args: Vec<String> = vec![
        "-accel".into(),
        "tcg,thread=multi".into(),
        "-cpu".into(),
        "max".into(),
        "-M".into(),
        "microvm,acpi=off,pit=on,rtc=on".into(),
        "-smp".into(),
        cpus.to_string(),
        "-m".into(),
        format!("{}M", l1.guest_memory_mib + LEVEL1_HEADROOM_MIB),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-chardev".into(),
        format!(
            "stdio,id=out,signal={}",
            if l1.interactive { "off" } else { "on" }
        ),
        "-serial".into(),
        "chardev:out".into(),
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!("file,id=err,path={stderr_path}"),
        "-device".into(),
        "virtconsole,chardev=err".into(),
        "-device".into(),
        format!("isa-debug-exit,iobase={:#x},iosize=1", platform::EXIT_PORT),
        "-monitor".into(),
        format!(
            "unix:{},server=on,wait=off",
            job_dir.join(MONITOR_SOCKET).display()
        ),
        "-d".into(),
        "cpu_reset".into(),
        "-D".into(),
        job_dir.join(RESET_LOG).display().to_string(),
        "-fsdev".into(),
        "local,id=host,path=/,security_model=none,readonly=on,multidevs=remap".into(),
        "-device".into(),
        "virtio-9p-device,fsdev=host,mount_tag=host".into(),
        "-fsdev".into(),
        format!(
            "local,id=job,path={},security_model=none,multidevs=remap",
            job_dir.display()
        ),
        "-device".into(),
        "virtio-9p-device,fsdev=job,mount_tag=job".into(),
    ];
    for (i, dir) in writable.iter().enumerate() {
        args.push("-fsdev".into());
        args.push(format!(
            "local,id=w{i},path={},security_model=none,multidevs=remap",
            dir.display()
        ));
        args.push("-device".into());
        args.push(format!("virtio-9p-device,fsdev=w{i},mount_tag=w{i}"));
    }
    if l1.api_sock.is_some() {
        // On the virtio-serial bus of hvc0; QEMU connects to level 0's listener at start.
        args.extend([
            "-chardev".into(),
            format!("socket,id=api,path={}", job_dir.join(API_LINK).display()),
            "-device".into(),
            format!(
                "virtserialport,chardev=api,name={}",
                crate::api::port::PORT_NAME
            ),
        ]);
    }
    if std::env::var_os(PAUSE_ON_RESET_ENV).is_some() {
        // Debugging the emulator: a level-1 reset freezes level 1 as it was, for the watchdog's
        // monitor dump, instead of ending QEMU.
        args.extend(["-action".into(), "shutdown=pause".into()]);
    }
    args.extend(["-kernel".into(), l1.kernel.display().to_string()]);
    args.extend(["-initrd".into(), l1.initrd.display().to_string()]);
    args.extend(["-append".into(), append]);
    args.into_iter().map(OsString::from).collect()
}

/// The directories to share read-write: `extra` plus `AIODMA_WRITABLE`'s, canonical, without
/// duplicates or directories inside another shared one.
fn writable_dirs(extra: &[PathBuf]) -> Result<Vec<PathBuf>, EmulatedError> {
    let from_env = std::env::var_os(WRITABLE_ENV).unwrap_or_default();
    let mut dirs = Vec::new();
    for dir in extra
        .iter()
        .cloned()
        .chain(std::env::split_paths(&from_env))
    {
        if dir.as_os_str().is_empty() {
            continue;
        }
        dirs.push(
            dir.canonicalize()
                .map_err(|e| EmulatedError::Writable(dir, e))?,
        );
    }
    dirs.sort();
    let mut kept: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        if !kept.iter().any(|k| dir.starts_with(k)) {
            kept.push(dir);
        }
    }
    Ok(kept)
}

/// Copies QEMU's stdout to ours: level-1 console lines up to the ready marker are kept for
/// error reports (and logged at debug level); everything after it is the inner run's output.
fn forward_output(mut from: impl Read, started: Instant) -> Vec<String> {
    let mut prelude = Vec::new();
    let mut reader = io::BufReader::new(&mut from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return prelude,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if text == READY_MARKER {
            log::info!(
                "emulated host (QEMU TCG, AMD SVM, nested KVM) up in {} ms; timings below include emulation",
                started.elapsed().as_millis()
            );
            break;
        }
        log::debug!("level 1: {text}");
        prelude.push(text);
        if prelude.len() > 50 {
            prelude.remove(0);
        }
    }
    let mut out = io::stdout();
    let mut buf = [0u8; 8192];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Vec::new()
}

/// Run `args` (this process's arguments, without the program name) inside the emulated host and
/// return the inner run's exit code.
pub fn run(l1: &Level1, args: &[OsString]) -> Result<u8, EmulatedError> {
    let qemu = find_in_path(QEMU).ok_or(EmulatedError::QemuMissing)?;
    for path in [&l1.kernel, &l1.initrd] {
        std::fs::metadata(path).map_err(|e| EmulatedError::Image(path.clone(), e))?;
    }
    let kernel = l1
        .kernel
        .canonicalize()
        .map_err(|e| EmulatedError::Image(l1.kernel.clone(), e))?;
    let initrd = l1
        .initrd
        .canonicalize()
        .map_err(|e| EmulatedError::Image(l1.initrd.clone(), e))?;
    let l1 = Level1 {
        kernel,
        initrd,
        ..l1.clone()
    };
    let writable = writable_dirs(&l1.writable)?;
    let exe =
        std::env::current_exe().map_err(|e| EmulatedError::Io("locate the aiodma binary", e))?;
    let cwd = std::env::current_dir().map_err(|e| EmulatedError::Io("current directory", e))?;

    let job = JobDir::create()?;
    let env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            k == "PATH"
                || k == "HOME"
                || k == "TERM"
                || k == "RUST_LOG"
                || k == "RUST_BACKTRACE"
                || (k.starts_with("AIODMA_") && k != "AIODMA_HOST" && k != IN_EMULATED_HOST_ENV)
        })
        .collect();
    std::fs::write(job.0.join("job.sh"), job_script(&cwd, &exe, args, &env))
        .map_err(|e| EmulatedError::Io("write the job script", e))?;
    let mounts: String = writable
        .iter()
        .enumerate()
        .map(|(i, dir)| format!("w{i} {}\n", dir.display()))
        .collect();
    std::fs::write(job.0.join("mounts"), mounts)
        .map_err(|e| EmulatedError::Io("write the mount list", e))?;
    // Listening before QEMU starts, which connects the port's chardev at once.
    let _api = l1
        .api_sock
        .as_deref()
        .map(|path| crate::api::forward::Forwarder::start(path, &job.0.join(API_LINK)))
        .transpose()?;

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    // hvc0 (the inner run's stderr) reaches QEMU as a pipe that this process copies to its own
    // stderr, so stdout and stderr stay correctly interleaved even when both are one file.
    let (err_reader, err_writer) =
        std::io::pipe().map_err(|e| EmulatedError::Io("create the stderr pipe", e))?;
    let err_fd = std::os::fd::AsRawFd::as_raw_fd(&err_writer);
    // SAFETY: F_SETFD on a descriptor we own; clearing FD_CLOEXEC lets QEMU inherit it.
    if unsafe { libc::fcntl(err_fd, libc::F_SETFD, 0) } != 0 {
        return Err(EmulatedError::Io(
            "share the stderr pipe",
            io::Error::last_os_error(),
        ));
    }
    let stderr_path = format!("/proc/self/fd/{err_fd}");
    let qemu_argv = qemu_args(
        &l1,
        &stderr_path,
        &job.0,
        &writable,
        cpus,
        tsc_khz(&cpuinfo),
    );
    log::debug!("{} {:?}", qemu.display(), qemu_argv);

    let started = Instant::now();
    let mut command = Command::new(&qemu);
    command
        .args(&qemu_argv)
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: the closure runs in the forked child before exec and only makes one
    // async-signal-safe system call.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            // Level 1 dies with us: a killed `aiodma` (a test's timeout, ^C) leaves no QEMU behind.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let child = command
        .spawn()
        .map_err(|e| EmulatedError::Io("start QEMU", e))?;
    drop(err_writer);
    let stderr_copier = std::thread::Builder::new()
        .name("l1-stderr".into())
        .spawn(move || {
            let mut reader = err_reader;
            let _ = io::copy(&mut reader, &mut io::stderr());
        })
        .map_err(|e| EmulatedError::Io("start the stderr copier", e))?;
    let limit = l1.timeout.map(|t| t + LEVEL1_GRACE);
    let mut child = child;
    let stdout = child.stdout.take();
    let monitor = job.0.join(MONITOR_SOCKET);
    let system_map = l1.system_map.clone();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::Builder::new()
        .name("l1-watchdog".into())
        .spawn(move || watch_level1(child, limit, &monitor, system_map.as_deref(), done_rx))
        .map_err(|e| EmulatedError::Io("start the level-1 watchdog", e))?;
    let prelude = match stdout {
        Some(out) => forward_output(out, started),
        None => Vec::new(),
    };
    drop(done_tx);
    let (status, hung) = watchdog
        .join()
        .unwrap_or_else(|_| (Err(io::Error::other("watchdog panicked")), None));
    let status = status.map_err(|e| EmulatedError::Io("wait for QEMU", e))?;
    let _ = stderr_copier.join();
    log::debug!(
        "emulated host session took {} ms",
        started.elapsed().as_millis()
    );

    if let (Some(limit), Some(detail)) = (limit, hung) {
        return Err(EmulatedError::Hung { limit, detail });
    }
    match std::fs::read_to_string(job.0.join("status")) {
        Ok(text) => match text.trim().parse::<u8>() {
            Ok(code) => Ok(code),
            Err(_) => Err(EmulatedError::NoStatus {
                qemu: status.to_string(),
                detail: format!(": unreadable status {text:?}"),
            }),
        },
        Err(_) => {
            let reset_log = std::fs::read_to_string(job.0.join(RESET_LOG)).unwrap_or_default();
            let map = l1
                .system_map
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok());
            let mut detail = reset_cause(&reset_log, map.as_deref());
            // Keep the full register dumps for whoever debugs the emulator.
            if !reset_log.is_empty() {
                let kept = std::env::temp_dir()
                    .join(format!("aiodma-l1-reset.{}.log", std::process::id()));
                if std::fs::write(&kept, &reset_log).is_ok() {
                    detail.push_str(&format!(" (QEMU's reset log: {})", kept.display()));
                }
            }
            if !prelude.is_empty() {
                detail.push_str(&format!("; level 1 said: {}", prelude.join(" | ")));
            }
            Err(EmulatedError::NoStatus {
                qemu: status.to_string(),
                detail,
            })
        }
    }
}

/// Why level 1 went away, from QEMU's `-d cpu_reset` log: a triple fault, with where the vCPU
/// was if a register dump follows it (QEMU dumps registers on each vCPU reset, including the
/// ones at start-up, and with `-no-reboot` there is no reset after a triple fault).
fn reset_cause(log: &str, system_map: Option<&str>) -> String {
    let Some(at) = log.find("Triple fault") else {
        return String::new();
    };
    let rip = log[at..]
        .lines()
        .find(|l| l.starts_with("RIP="))
        .and_then(|l| l.split_whitespace().next())
        .map(|rip| format!(" at {}", name_rip(rip, system_map)))
        .unwrap_or_default();
    format!(": the level-1 kernel triple-faulted{rip}")
}

/// Wait for QEMU; past `limit`, ask its monitor where the vCPUs are and kill it. Returns QEMU's
/// exit status and, if it was killed, the monitor's answer. `stdout_done` disconnects once the
/// caller has read QEMU's output to its end, i.e. QEMU is exiting.
fn watch_level1(
    mut child: std::process::Child,
    limit: Option<Duration>,
    monitor: &Path,
    system_map: Option<&Path>,
    stdout_done: mpsc::Receiver<()>,
) -> (io::Result<std::process::ExitStatus>, Option<String>) {
    let deadline = limit.map(|l| Instant::now() + l);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return (Ok(status), None),
            Ok(None) => {}
            Err(e) => return (Err(e), None),
        }
        let poll = Duration::from_millis(20);
        let wait = match deadline {
            Some(d) if Instant::now() >= d => break,
            Some(d) => d.saturating_duration_since(Instant::now()).min(poll),
            None => poll,
        };
        if let Err(mpsc::RecvTimeoutError::Disconnected) = stdout_done.recv_timeout(wait) {
            // QEMU closed its output: only the exit is left, which cannot hang.
            return (child.wait(), None);
        }
    }
    let detail = match vcpu_states(monitor) {
        Ok(states) if !states.is_empty() => {
            let map = system_map.and_then(|p| std::fs::read_to_string(p).ok());
            let named: Vec<String> = states
                .iter()
                .map(|state| name_rip(state, map.as_deref()))
                .collect();
            format!("; level 1 vCPUs: {}", named.join(" | "))
        }
        Ok(_) => String::new(),
        Err(e) => format!("; QEMU monitor: {e}"),
    };
    log::debug!("killing QEMU (pid {})", child.id());
    let _ = child.kill();
    (child.wait(), Some(detail))
}

/// Each vCPU's `RIP=… CPL=… HLT=…` line from QEMU's `info registers -a`.
fn vcpu_states(monitor: &Path) -> io::Result<Vec<String>> {
    let mut sock = std::os::unix::net::UnixStream::connect(monitor)?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.write_all(b"info registers -a\n")?;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    // The reply ends with the next prompt; the timeout bounds a monitor that never answers.
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                text.extend_from_slice(&buf[..n]);
                let tail = String::from_utf8_lossy(&text);
                if tail.matches("(qemu)").count() >= 2 {
                    break;
                }
            }
            Err(e) if text.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(parse_vcpu_states(&String::from_utf8_lossy(&text)))
}

/// `state` with its `RIP=<hex>` followed by `(symbol+0xoff)` when `system_map` has it.
fn name_rip(state: &str, system_map: Option<&str>) -> String {
    let Some(map) = system_map else {
        return state.to_string();
    };
    let rip = state
        .split_whitespace()
        .find_map(|f| f.strip_prefix("RIP="))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok());
    let Some(rip) = rip else {
        return state.to_string();
    };
    let best = map
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let addr = u64::from_str_radix(fields.next()?, 16).ok()?;
            let kind = fields.next()?;
            let name = fields.next()?;
            (matches!(kind, "t" | "T") && addr <= rip).then_some((addr, name))
        })
        .max_by_key(|(addr, _)| *addr);
    match best {
        Some((addr, name)) if rip - addr < 1 << 20 => state.replacen(
            &format!("RIP={rip:016x}"),
            &format!("RIP={rip:016x}({name}+{:#x})", rip - addr),
            1,
        ),
        _ => state.to_string(),
    }
}

fn parse_vcpu_states(reply: &str) -> Vec<String> {
    let mut states = Vec::new();
    let mut cpu = String::new();
    for line in reply.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("CPU#") {
            cpu = format!("cpu{}", rest.trim());
        } else if line.starts_with("RIP=") {
            let fields: Vec<&str> = line
                .split_whitespace()
                .filter(|f| f.starts_with("RIP=") || f.starts_with("CPL=") || f.starts_with("HLT="))
                .collect();
            states.push(format!("{cpu} {}", fields.join(" ")).trim().to_string());
        }
    }
    states
}

/// The per-run directory shared with level 1; removed when dropped.
struct JobDir(PathBuf);

impl JobDir {
    fn create() -> Result<Self, EmulatedError> {
        let base = std::env::temp_dir();
        for attempt in 0..100u32 {
            let dir = base.join(format!("aiodma-l1.{}.{attempt}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(JobDir(dir)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(EmulatedError::Io("create the job directory", e)),
            }
        }
        Err(EmulatedError::Io(
            "create the job directory",
            io::Error::other("no free name"),
        ))
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote(b"it's"), r"'it'\''s'");
        assert_eq!(shell_quote(b"a b"), "'a b'");
    }

    #[test]
    fn job_script_reproduces_the_command() {
        let script = job_script(
            Path::new("/work/x"),
            Path::new("/bin/aiodma"),
            &[
                "run".into(),
                "--".into(),
                "sh".into(),
                "-c".into(),
                "echo 'hi'; exit 7".into(),
            ],
            &[
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("BAD-KEY".into(), "x".into()),
            ],
        );
        assert!(script.contains("cd '/work/x' || exit 2\n"));
        assert!(script.contains("export PATH='/usr/bin:/bin'\n"));
        assert!(!script.contains("BAD-KEY"));
        assert!(script.contains("export AIODMA_IN_EMULATED_HOST=1\n"));
        assert!(script.ends_with(concat!(
            r"exec '/bin/aiodma' 'run' '--' 'sh' '-c' 'echo '\''hi'\''; exit 7'",
            "\n"
        )));
    }

    #[test]
    fn writable_dirs_are_canonical_and_not_nested() {
        let base = std::env::temp_dir().canonicalize().unwrap();
        let dir = base.join(format!("aiodma-writable-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("inner")).unwrap();
        let got = writable_dirs(&[dir.join("inner"), dir.join("."), dir.clone()]).unwrap();
        assert_eq!(got, vec![dir.clone()]);
        assert!(matches!(
            writable_dirs(&[dir.join("missing")]),
            Err(EmulatedError::Writable(..))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn watchdog_kills_a_child_past_its_limit() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let (_tx, rx) = mpsc::channel();
        let started = Instant::now();
        let (status, hung) = watch_level1(
            child,
            Some(Duration::from_millis(200)),
            Path::new("/nonexistent/monitor.sock"),
            None,
            rx,
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(!status.unwrap().success());
        assert!(hung.unwrap().contains("QEMU monitor:"));
    }

    #[test]
    fn watchdog_leaves_a_child_that_exits_in_time() {
        let child = Command::new("true").spawn().unwrap();
        let (_tx, rx) = mpsc::channel();
        let (status, hung) = watch_level1(
            child,
            Some(Duration::from_secs(30)),
            Path::new("/x"),
            None,
            rx,
        );
        assert!(status.unwrap().success());
        assert!(hung.is_none());
    }

    #[test]
    fn vcpu_states_from_the_monitor_reply() {
        let reply = "QEMU 10.0.2 monitor - type 'help' for more information\r\n(qemu) info registers -a\r\n\r\nCPU#0\r\nRAX=0000000000000000 RBX=ffffffff82a0f940\r\nRIP=ffffffff81b2c3d4 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n\r\nCPU#1\r\nRIP=0000000000401000 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0\r\n(qemu) ";
        assert_eq!(
            parse_vcpu_states(reply),
            vec![
                "cpu0 RIP=ffffffff81b2c3d4 CPL=0 HLT=1",
                "cpu1 RIP=0000000000401000 CPL=3 HLT=0"
            ]
        );
        assert!(parse_vcpu_states("(qemu) ").is_empty());
    }

    #[test]
    fn a_triple_fault_is_named_with_where_it_happened() {
        let map = "ffffffff81000000 T _stext\nffffffff81500000 t svm_vcpu_run\n";
        let start = "CPU Reset (CPU 0)\nEIP=0000fff0 EFL=00000002\nCPU Reset (CPU 1)\n\
                     RIP=0000000000001000 RFL=00000002\n";
        assert_eq!(
            reset_cause(&format!("{start}Triple fault\n"), Some(map)),
            ": the level-1 kernel triple-faulted"
        );
        let dumped = format!(
            "{start}Triple fault\nCPU Reset (CPU 0)\nRIP=ffffffff81500010 RFL=00000046 CPL=0\n"
        );
        assert_eq!(
            reset_cause(&dumped, Some(map)),
            ": the level-1 kernel triple-faulted at RIP=ffffffff81500010(svm_vcpu_run+0x10)"
        );
        assert_eq!(reset_cause(start, None), "");
    }

    #[test]
    fn rip_is_named_from_the_symbol_table() {
        let map = "ffffffff81000000 T _stext\nffffffff81572e30 t default_idle\nffffffff81572e50 T next_fn\nffffffff82000000 D some_data\n";
        assert_eq!(
            name_rip("cpu0 RIP=ffffffff81572e37 CPL=0 HLT=1", Some(map)),
            "cpu0 RIP=ffffffff81572e37(default_idle+0x7) CPL=0 HLT=1"
        );
        assert_eq!(
            name_rip("cpu1 RIP=0000000000401000 CPL=3", Some(map)),
            "cpu1 RIP=0000000000401000 CPL=3"
        );
        assert_eq!(
            name_rip("cpu0 RIP=ffffffff81572e37", None),
            "cpu0 RIP=ffffffff81572e37"
        );
    }

    #[test]
    fn tsc_from_cpuinfo() {
        assert_eq!(
            tsc_khz("processor: 0\ncpu MHz\t\t: 2600.004\n"),
            Some(2_600_004)
        );
        assert_eq!(tsc_khz("processor: 0\n"), None);
    }

    #[test]
    fn qemu_command_line_is_deliberate() {
        let l1 = Level1 {
            kernel: "/k".into(),
            initrd: "/i".into(),
            guest_memory_mib: 256,
            interactive: false,
            writable: Vec::new(),
            timeout: None,
            system_map: None,
            api_sock: None,
        };
        let args: Vec<String> = qemu_args(
            &l1,
            "/proc/self/fd/9",
            Path::new("/tmp/j"),
            &["/data".into()],
            2,
            Some(2_600_000),
        )
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg,thread=multi -cpu max"));
        assert!(joined.contains("-smp 2 -m 768M"));
        assert!(joined.contains("path=/,security_model=none,readonly=on"));
        assert!(joined.contains("local,id=w0,path=/data,security_model=none"));
        assert!(joined.contains("mount_tag=w0"));
        assert!(joined.contains("-no-reboot"));
        assert!(joined.contains("file,id=err,path=/proc/self/fd/9"));
        let append = args.last().unwrap();
        assert!(append.contains("rdinit=/l1init"));
        assert!(append.contains("kvm_amd.npt=0"));
        assert!(append.contains("tsc_early_khz=2600000"));
        assert!(append.contains("aiodma.job=/tmp/j"));
        assert!(!joined.contains("virtserialport"));

        let with_api = Level1 {
            api_sock: Some("/x/api.sock".into()),
            ..l1
        };
        let joined = qemu_args(&with_api, "/e", Path::new("/tmp/j"), &[], 1, None)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.contains(
            "-chardev socket,id=api,path=/tmp/j/api.sock \
             -device virtserialport,chardev=api,name=org.aiodma.api"
        ));
    }
}
