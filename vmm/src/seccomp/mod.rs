//! Seccomp filters per thread kind (`--seccomp on|log|off`), with rust-vmm's `seccompiler`.
//!
//! Each thread installs its own filter once it is set up and before it handles anything the
//! guest controls: vCPU threads first thing, the device thread after opening its backend and
//! event loop, backend pool workers first thing, the main thread after starting the vCPUs, the
//! API thread (`--api-sock`) once its runtime and socket are set up.
//! Installation order keeps filters from stacking: every thread is spawned by a thread that
//! is not filtered yet. A filter allows the system calls of [`rules`] for its kind; anything
//! else is trapped (`on`: SIGSYS, whose handler in [`sigsys`] names the thread and the call and
//! exits with [`EXIT_SECCOMP`](crate::exit::EXIT_SECCOMP)) or logged by the kernel's audit
//! (`log`: `SECCOMP_RET_LOG`, then allowed).
//!
//! `AIODMA_SECCOMP_SELFTEST=vcpu|device|backend-worker|main|api` makes the first thread of that
//! kind make one forbidden system call right after its filter is in, which proves end to end
//! that the filter and the handler work (the integration tests use it). It cannot weaken a
//! filter: its only effect is that the process stops.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use aiodma_device::engine::{ThreadHook, ThreadRole};

mod names;
mod rules;
mod sigsys;

/// The environment variable that makes a thread kind call [`SELFTEST_SYSCALL`] (see above).
pub const SELFTEST_ENV: &str = "AIODMA_SECCOMP_SELFTEST";

/// What the self-test calls: harmless if it ran, and allowed to no thread kind.
const SELFTEST_SYSCALL: libc::c_long = libc::SYS_getppid;

/// `--seccomp` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    /// Forbidden system calls stop the process with a message (exit 159).
    On,
    /// Forbidden system calls are allowed, and the kernel logs them (audit, `type=1326`).
    Log,
    /// No filters.
    Off,
}

impl SeccompMode {
    /// Parse a `--seccomp` value.
    pub fn parse(s: &str) -> Result<SeccompMode, String> {
        match s {
            "on" => Ok(SeccompMode::On),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(format!(
                "'{s}' is not a seccomp mode (expected on, log or off)"
            )),
        }
    }

    fn mismatch_action(self) -> SeccompAction {
        match self {
            SeccompMode::Log => SeccompAction::Log,
            SeccompMode::On | SeccompMode::Off => SeccompAction::Trap,
        }
    }

    /// The kernel's return value for the mismatch action, for `SECCOMP_GET_ACTION_AVAIL`.
    fn kernel_action(self) -> u32 {
        match self {
            SeccompMode::Log => SECCOMP_RET_LOG,
            SeccompMode::On | SeccompMode::Off => SECCOMP_RET_TRAP,
        }
    }
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SeccompMode::On => "on",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

// <linux/seccomp.h>
const SECCOMP_GET_ACTION_AVAIL: libc::c_uint = 2;
const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
const SECCOMP_RET_LOG: u32 = 0x7ffc_0000;

/// The kinds of thread of a running VMM, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// `vcpu<N>`: KVM_RUN and the devices behind port/MMIO exits.
    Vcpu,
    /// `aiodma-device`: the DMA device's event loop.
    Device,
    /// `aiodma-<backend>-<N>`: the device's backend pool.
    BackendWorker,
    /// `main`: the VMM's event loop, metrics, terminal.
    Main,
    /// `aiodma-api`: the runtime-control API (`--api-sock`).
    Api,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::BackendWorker,
        ThreadKind::Main,
        ThreadKind::Api,
    ];

    fn index(self) -> usize {
        match self {
            ThreadKind::Vcpu => 0,
            ThreadKind::Device => 1,
            ThreadKind::BackendWorker => 2,
            ThreadKind::Main => 3,
            ThreadKind::Api => 4,
        }
    }

    fn parse(s: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.to_string() == s)
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::BackendWorker => "backend-worker",
            ThreadKind::Main => "main",
            ThreadKind::Api => "api",
        })
    }
}

/// Why filters could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The kernel has no seccomp filters, or not the action this mode needs.
    #[error(
        "seccomp: this kernel cannot filter system calls with action {action} \
         (it needs CONFIG_SECCOMP_FILTER{audit}): {source}; --seccomp off runs without filters"
    )]
    Unsupported {
        /// The action (`trap` or `log`).
        action: &'static str,
        /// What else the kernel needs for it.
        audit: &'static str,
        /// The error of the probe.
        source: io::Error,
    },
    /// A rule or a filter is invalid (a bug in the rules).
    #[error("seccomp: cannot build a filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    /// The SIGSYS handler could not be installed.
    #[error("seccomp: cannot install the SIGSYS handler: {0}")]
    Handler(io::Error),
    /// The kernel refused a filter.
    #[error("seccomp: cannot install the {kind} filter on thread {thread}: {source}")]
    Install {
        /// The filter.
        kind: ThreadKind,
        /// The thread's name.
        thread: String,
        /// What the kernel said.
        source: seccompiler::Error,
    },
}

/// A compiled filter and what it allows.
#[derive(Debug)]
struct Compiled {
    program: BpfProgram,
    /// System calls allowed.
    syscalls: usize,
    /// Argument conditions (rules) among them.
    arg_rules: usize,
    /// Whether a thread of this kind has logged its installation at info level yet.
    announced: AtomicBool,
}

/// The filters of one VMM process, compiled before any thread needs them (threads then only
/// install: no allocation, no parsing).
#[derive(Debug)]
pub struct Filters {
    mode: SeccompMode,
    compiled: Vec<Compiled>,
    selftest: Option<ThreadKind>,
    selftest_done: AtomicBool,
}

impl Filters {
    /// Check that the kernel can do `mode`, compile every kind's filter and (for `on`) install
    /// the SIGSYS handler. `None` for `off`.
    pub fn new(mode: SeccompMode) -> Result<Option<Arc<Filters>>, SeccompError> {
        if mode == SeccompMode::Off {
            log::info!("seccomp: off, no system call filters");
            return Ok(None);
        }
        probe(mode)?;
        let filters = Filters::compile(mode, std::process::id())?;
        if mode == SeccompMode::On {
            sigsys::install_handler().map_err(SeccompError::Handler)?;
        }
        Ok(Some(Arc::new(filters)))
    }

    /// Compile the filters of `mode` (not `off`) for process `pid`.
    fn compile(mode: SeccompMode, pid: u32) -> Result<Filters, SeccompError> {
        let arch = TargetArch::x86_64;
        let mut compiled = Vec::with_capacity(ThreadKind::ALL.len());
        for kind in ThreadKind::ALL {
            let rules = rules::rules(kind, pid)?;
            let syscalls = rules.len();
            let arg_rules = rules.values().map(Vec::len).sum();
            let filter =
                SeccompFilter::new(rules, mode.mismatch_action(), SeccompAction::Allow, arch)?;
            compiled.push(Compiled {
                program: BpfProgram::try_from(filter)?,
                syscalls,
                arg_rules,
                announced: AtomicBool::new(false),
            });
        }
        let selftest = std::env::var(SELFTEST_ENV)
            .ok()
            .and_then(|s| ThreadKind::parse(&s));
        Ok(Filters {
            mode,
            compiled,
            selftest,
            selftest_done: AtomicBool::new(false),
        })
    }

    fn get(&self, kind: ThreadKind) -> &Compiled {
        &self.compiled[kind.index()]
    }

    /// Confine the calling thread with `kind`'s filter.
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let current = std::thread::current();
        let thread = current.name().unwrap_or("?");
        let compiled = self.get(kind);
        sigsys::set_thread_name(thread);
        seccompiler::apply_filter(&compiled.program).map_err(|source| SeccompError::Install {
            kind,
            thread: thread.to_string(),
            source,
        })?;
        let first = !compiled.announced.swap(true, Ordering::Relaxed);
        let level = if first {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        log::log!(
            level,
            "seccomp: {kind} filter on thread {thread}: {} system calls, {} argument rules, \
             {} otherwise",
            compiled.syscalls,
            compiled.arg_rules,
            match self.mode {
                SeccompMode::Log => "log",
                _ => "trap",
            }
        );
        if self.selftest == Some(kind) && !self.selftest_done.swap(true, Ordering::Relaxed) {
            log::warn!("seccomp: {SELFTEST_ENV}: thread {thread} makes a forbidden system call");
            // SAFETY: getppid has no arguments and no side effects.
            unsafe { libc::syscall(SELFTEST_SYSCALL) };
        }
        Ok(())
    }

    /// The hook that confines the DMA device's threads; `failed` is told when that fails
    /// (the thread then runs on without a filter, so the VM must stop).
    pub fn device_hook(
        self: &Arc<Self>,
        failed: impl Fn(SeccompError) + Send + Sync + 'static,
    ) -> ThreadHook {
        let filters = self.clone();
        ThreadHook(Arc::new(move |role| {
            let kind = match role {
                ThreadRole::Device => ThreadKind::Device,
                ThreadRole::BackendWorker => ThreadKind::BackendWorker,
            };
            if let Err(e) = filters.install(kind) {
                failed(e);
            }
        }))
    }
}

/// Whether the kernel has seccomp filters with `mode`'s mismatch action.
fn probe(mode: SeccompMode) -> Result<(), SeccompError> {
    let action = mode.kernel_action();
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 through the pointer, which is valid.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    Err(SeccompError::Unsupported {
        action: match mode {
            SeccompMode::Log => "log",
            _ => "trap",
        },
        audit: match mode {
            SeccompMode::Log => "; its log goes to the audit log (CONFIG_AUDIT)",
            _ => "",
        },
        source: io::Error::last_os_error(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for (s, mode) in [
            ("on", SeccompMode::On),
            ("log", SeccompMode::Log),
            ("off", SeccompMode::Off),
        ] {
            assert_eq!(SeccompMode::parse(s), Ok(mode));
            assert_eq!(mode.to_string(), s);
        }
        let err = SeccompMode::parse("strict").unwrap_err();
        assert!(
            err.contains("'strict'") && err.contains("on, log or off"),
            "{err}"
        );
        assert_eq!(
            ThreadKind::parse("backend-worker"),
            Some(ThreadKind::BackendWorker)
        );
        assert_eq!(ThreadKind::parse("gpu"), None);
    }

    #[test]
    fn every_kind_compiles_to_bpf_in_both_modes() {
        for mode in [SeccompMode::On, SeccompMode::Log] {
            let filters = Filters::compile(mode, 1234).unwrap();
            for kind in ThreadKind::ALL {
                let c = filters.get(kind);
                assert!(c.syscalls > 15, "{kind}: {}", c.syscalls);
                // Kernel limit: BPF_MAXINSNS.
                assert!(
                    !c.program.is_empty() && c.program.len() < 4096,
                    "{kind}: {} instructions",
                    c.program.len()
                );
                assert!(!rules::rules(kind, 1234)
                    .unwrap()
                    .contains_key(&SELFTEST_SYSCALL));
            }
            assert!(filters.get(ThreadKind::Vcpu).arg_rules >= 6);
        }
    }

    /// Install `kind`'s filter in a forked child, make a forbidden call there, and return the
    /// child's exit status and what it wrote to stderr.
    fn forbidden_call_in_child(kind: ThreadKind) -> (i32, String) {
        let filters = Filters::compile(SeccompMode::On, std::process::id()).unwrap();
        // The child's pid differs from ours, which only narrows tgkill further.
        let program = filters.get(kind).program.clone();
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes async-signal-safe calls (dup2, sigaction, prctl,
        // seccomp, a forbidden call, and the handler's write/_exit): no allocation, no locks,
        // which matters because the test process has other threads.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: see above; every path ends in _exit.
            unsafe {
                libc::dup2(fds[1], libc::STDERR_FILENO);
                if sigsys::install_handler().is_err()
                    || seccompiler::apply_filter(&program).is_err()
                {
                    libc::_exit(1);
                }
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copy of the write end, so the read below sees EOF.
        unsafe { libc::close(fds[1]) };
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is valid.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            // SAFETY: `buf` is valid for its length.
            let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        // SAFETY: our read end.
        unsafe { libc::close(fds[0]) };
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        (
            libc::WEXITSTATUS(status),
            String::from_utf8_lossy(&out).into_owned(),
        )
    }

    #[test]
    fn forbidden_call_stops_the_process_with_a_message() {
        if probe(SeccompMode::On).is_err() {
            eprintln!("skipped: this kernel has no seccomp filters");
            return;
        }
        for kind in [ThreadKind::Vcpu, ThreadKind::Device] {
            let (code, stderr) = forbidden_call_in_child(kind);
            assert_eq!(code, 159, "{kind}: {stderr}");
            assert!(
                stderr.contains("made a forbidden system call: 41 (socket)"),
                "{kind}: {stderr}"
            );
        }
    }
}
