//! `aiodma`: boot the aiodma test guest under KVM (directly, or inside the emulated host).

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use aiodma_vmm::cli::{Cli, Command, HostMode, RunArgs};
use aiodma_vmm::config::{images_dir, VmConfig};
use aiodma_vmm::exit::{StopReason, EXIT_BAD_INPUT};
use aiodma_vmm::host::{self, emulated, KvmVerdict};
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

fn run_direct(cfg: &VmConfig, vmm_start: Instant) -> u8 {
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
                StopReason::VcpuFailed(msg) => log::error!("{msg}"),
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
    let cfg = match VmConfig::from_args(args) {
        Ok(cfg) => cfg,
        Err(e) => {
            log::error!("{e}");
            return EXIT_BAD_INPUT;
        }
    };
    // Inside the emulated host KVM is real by construction: never recurse.
    if std::env::var_os(host::IN_EMULATED_HOST_ENV).is_some() {
        return run_direct(&cfg, vmm_start);
    }
    let verdict = match args.host {
        HostMode::Emulated => None,
        HostMode::Kvm | HostMode::Auto => Some(host::probe_kvm(std::path::Path::new("/"))),
    };
    match (args.host, verdict) {
        (_, Some(KvmVerdict::Usable)) => run_direct(&cfg, vmm_start),
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
                guest_memory_mib: cfg.memory_mib,
                interactive: cfg.interactive,
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

fn main() -> ExitCode {
    let vmm_start = Instant::now();
    let cli = Cli::parse();
    init_logging(cli.log_level.into());
    let code = match &cli.command {
        Command::Run(args) => run(args, vmm_start),
    };
    ExitCode::from(code)
}
