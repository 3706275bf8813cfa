//! `aiodma`: boot the aiodma test guest under KVM (directly, or inside the emulated host).

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use aiodma_vmm::api::client::{self, ApiCall};
use aiodma_vmm::bench::{self, BootBench};
use aiodma_vmm::cli::{
    BenchCommand, BootBenchArgs, Cli, Command, CtlArgs, HostMode, PeerArgs, RunArgs,
};
use aiodma_vmm::config::{build_cmdline, images_dir, VmConfig};
use aiodma_vmm::exit::{StopReason, EXIT_BAD_INPUT, EXIT_KVM_FAILURE};
use aiodma_vmm::host::{self, emulated, KvmVerdict};
use aiodma_vmm::peer::{self, PeerRun};
use aiodma_vmm::vmm;

fn init_logging(level: log::LevelFilter) {
    env_logger::Builder::new()
        .filter_level(level)
        .format(|buf, record| {
            let level = match record.level() {
                log::Level::Error => "error: ",
                log::Level::Warn => "warning: ",
                log::Level::Info => "",
                log::Level::Debug => "debug: ",
                log::Level::Trace => "trace: ",
            };
            writeln!(buf, "aiodma: {level}{}", record.args())
        })
        .init();
}

/// Run `direct` on this machine's KVM, or this whole command line inside the emulated host,
/// as `--host` and the KVM probe decide.
/// `writable`: host directories the inner run writes to (shared read-write in the emulated host).
/// `api_sock`: the run's `--api-sock`, which level 0 serves and relays in the emulated host.
fn on_host(
    mode: HostMode,
    guest_memory_mib: u64,
    interactive: bool,
    writable: Vec<std::path::PathBuf>,
    timeout: Option<std::time::Duration>,
    api_sock: Option<std::path::PathBuf>,
    direct: impl FnOnce() -> u8,
) -> u8 {
    // Inside the emulated host KVM is real by construction: never recurse.
    if std::env::var_os(host::IN_EMULATED_HOST_ENV).is_some() {
        return direct();
    }
    let verdict = match mode {
        HostMode::Emulated => None,
        HostMode::Kvm | HostMode::Auto => Some(host::probe_kvm(std::path::Path::new("/"))),
    };
    match (mode, verdict) {
        (_, Some(KvmVerdict::Usable)) => direct(),
        (HostMode::Kvm, Some(KvmVerdict::Unusable(reason))) => {
            log::error!("--host kvm: this machine's KVM cannot run the guest: {reason}");
            EXIT_BAD_INPUT
        }
        (_, verdict) => {
            match verdict {
                Some(KvmVerdict::Unusable(reason)) => {
                    log::info!(
                        "not using this machine's KVM: {reason}; running in the emulated host"
                    )
                }
                _ => log::info!("--host emulated: running in the emulated host"),
            }
            let images = images_dir();
            let l1 = emulated::Level1 {
                kernel: images.join("bzImage"),
                initrd: images.join("initramfs.cpio.gz"),
                guest_memory_mib,
                interactive,
                writable,
                timeout,
                system_map: Some(images.join("System.map")),
                api_sock,
            };
            let raw_args: Vec<_> = std::env::args_os().skip(1).collect();
            match emulated::run(&l1, &raw_args) {
                Ok(code) => code,
                Err(e) => {
                    log::error!("{e}");
                    e.exit_code()
                }
            }
        }
    }
}

fn run_vm(cfg: &VmConfig, vmm_start: Instant) -> u8 {
    match vmm::run(cfg, vmm_start) {
        Ok(stopped) => {
            let code = stopped.reason.exit_code();
            match &stopped.reason {
                StopReason::GuestExited(status) => {
                    log::info!("guest command exited with status {status}")
                }
                StopReason::GuestPanicked => log::error!("guest kernel panicked"),
                StopReason::GuestReset => {
                    log::error!("guest reset without reporting an exit status")
                }
                StopReason::Timeout => {}
                StopReason::VcpuFailed(msg) | StopReason::SeccompFailed(msg) => {
                    log::error!("{msg}")
                }
            }
            if let Some(path) = &cfg.metrics {
                if let Err(e) = stopped.metrics.write(path) {
                    log::error!("--metrics {}: {e}", path.display());
                }
            }
            // Exit with the VM still mapped: vCPU threads may be inside KVM_RUN.
            let _ = std::io::stdout().flush();
            std::process::exit(i32::from(code));
        }
        Err(e) => {
            log::error!("{e}");
            e.exit_code()
        }
    }
}

fn run(args: &RunArgs, vmm_start: Instant) -> u8 {
    match VmConfig::from_args(args) {
        Ok(cfg) => {
            let writable = cfg
                .metrics
                .iter()
                .filter_map(|p| p.parent().map(Into::into))
                .chain(cfg.device.as_ref().and_then(|d| d.backing_dir()))
                .chain(cfg.device.as_ref().and_then(|d| d.fault_log_dir()))
                .collect();
            on_host(
                args.host,
                cfg.memory_mib,
                cfg.interactive,
                writable,
                cfg.timeout,
                cfg.api_sock.clone(),
                || run_vm(&cfg, vmm_start),
            )
        }
        Err(e) => {
            log::error!("{e}");
            EXIT_BAD_INPUT
        }
    }
}

fn bench_boot(args: &BootBenchArgs) -> u8 {
    let images = images_dir();
    let b = BootBench {
        runs: args.runs.into(),
        cpus: args.cpus,
        memory_mib: args.memory,
        kernel: images.join("bzImage"),
        initrd: images.join("initramfs.cpio.gz"),
        hide_xsave: std::env::var_os(host::IN_EMULATED_HOST_ENV).is_some(),
    };
    for path in [&b.kernel, &b.initrd] {
        if !path.exists() {
            log::error!(
                "{} is missing (run `make image` to build the guest image)",
                path.display()
            );
            return EXIT_BAD_INPUT;
        }
    }
    on_host(
        args.host,
        args.memory,
        false,
        Vec::new(),
        // Each boot of the bench has its own limit; the whole bench gets one too.
        Some(std::time::Duration::from_secs(
            60 * u64::from(args.runs) + 60,
        )),
        None,
        || match bench::run(&b, b.hide_xsave) {
            Ok(()) => 0,
            Err(e) => {
                log::error!("bench boot: {e}");
                EXIT_KVM_FAILURE
            }
        },
    )
}

fn bench_peer(args: &PeerArgs) -> u8 {
    let images = images_dir();
    let kernel = images.join("bzImage");
    let mut initrds = vec![images.join("initramfs.cpio.gz")];
    initrds.extend(args.initrds.iter().cloned());
    for path in std::iter::once(&kernel).chain(&initrds) {
        if let Err(e) = std::fs::File::open(path) {
            log::error!("{}: {e}", path.display());
            return EXIT_BAD_INPUT;
        }
    }
    // The guest has no aiodma device: skip the module.
    let extra = format!("aiodma.nomodule {}", peer::DISK_TRANSPORT);
    let cmdline = match build_cmdline(Some(&extra), &args.command) {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            return EXIT_BAD_INPUT;
        }
    };
    let timeout = (args.timeout > 0).then(|| std::time::Duration::from_secs(args.timeout));
    let run = PeerRun {
        kernel,
        initrds,
        cpus: args.cpus,
        memory_mib: args.memory,
        latency: std::time::Duration::from_micros(args.latency_us),
        disk_mib: args.disk,
        cmdline,
        timeout,
        hide_xsave: std::env::var_os(host::IN_EMULATED_HOST_ENV).is_some(),
    };
    on_host(
        args.host,
        args.memory,
        false,
        Vec::new(),
        timeout,
        None,
        || peer::run(&run),
    )
}

/// `aiodma ctl`: print the answer; a refused request or no answer is one line on stderr and
/// exit code 1.
fn ctl(args: &CtlArgs) -> u8 {
    let call = ApiCall::from_command(&args.command);
    match client::call(
        &args.sock,
        &call,
        std::time::Duration::from_secs(args.timeout),
    ) {
        Ok(answer) if answer.status.is_success() => {
            // A reader that went away (`| head`) is not an error of the request.
            if !answer.body.is_empty() {
                let _ = writeln!(std::io::stdout(), "{}", answer.body.trim_end());
            }
            0
        }
        Ok(answer) => {
            log::error!("{} {}: {}", call.method, call.path, answer.error_message());
            1
        }
        Err(e) => {
            log::error!("{e}");
            1
        }
    }
}

/// Report a command-line error. A bad flag value (a failed value parser or range) is one line
/// naming the flag and the bad part, exit code 2; other usage errors keep clap's usage text.
fn command_line_error(e: clap::Error) -> ! {
    if e.kind() == clap::error::ErrorKind::ValueValidation {
        let text = e.render().to_string();
        let line = text.lines().next().unwrap_or_default();
        eprintln!(
            "aiodma: error: {}",
            line.strip_prefix("error: ").unwrap_or(line)
        );
        std::process::exit(i32::from(EXIT_BAD_INPUT));
    }
    e.exit()
}

fn main() -> ExitCode {
    let vmm_start = Instant::now();
    let cli = Cli::try_parse().unwrap_or_else(|e| command_line_error(e));
    init_logging(cli.log_level.into());
    let code = match &cli.command {
        Command::Run(args) => run(args, vmm_start),
        Command::Bench(BenchCommand::Boot(args)) => bench_boot(args),
        Command::Bench(BenchCommand::Peer(args)) => bench_peer(args),
        Command::Ctl(args) => ctl(args),
    };
    ExitCode::from(code)
}
