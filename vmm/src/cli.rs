//! The `aiodma` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// A workbench for asynchronous I/O device drivers: boots the aiodma test guest under KVM.
#[derive(Debug, Parser)]
#[command(name = "aiodma", version, about, long_about = None)]
pub struct Cli {
    /// Log level of the VMM's own messages (on stderr).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "info",
        env = "AIODMA_LOG"
    )]
    pub log_level: LogLevel,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot the test guest and run GUEST_COMMAND in it (a shell when none is given).
    ///
    /// The exit status is the guest command's. Other codes: 2 bad input, 3 KVM failure,
    /// 101 guest kernel panic, 102 guest reset without an exit status, 124 timeout.
    Run(RunArgs),
    /// Benchmarks that print a table.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// `aiodma bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Boot time and VMM memory of aiodma next to QEMU's microvm (same kernel, initramfs and
    /// guest command, same place), as medians.
    Boot(BootBenchArgs),
}

/// `aiodma bench boot` flags.
#[derive(Debug, Clone, Args)]
pub struct BootBenchArgs {
    /// Boots per VMM.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub runs: u16,

    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub cpus: u8,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(64..=1 << 20))]
    pub memory: u64,

    /// Where KVM comes from (see `aiodma run --help`).
    #[arg(long, value_enum, default_value = "auto", env = "AIODMA_HOST")]
    pub host: HostMode,
}

/// `aiodma run` flags.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Guest kernel (bzImage). Default: images/out/bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// The base initramfs. Default: images/out/initramfs.cpio.gz.
    #[arg(long, value_name = "PATH")]
    pub base_initrd: Option<PathBuf>,

    /// Extra cpio archive appended after the base initramfs (repeatable, kept in order); its
    /// files are added to, or replace, the guest's. Example: images/out/fio.cpio.gz.
    #[arg(long = "initrd", value_name = "PATH")]
    pub initrds: Vec<PathBuf>,

    /// Extra kernel command-line parameters, appended to the defaults.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub append: Option<String>,

    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub cpus: u8,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(64..=1 << 20))]
    pub memory: u64,

    /// Stop the guest after SECS seconds (exit code 124). 0 means no limit.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub timeout: u64,

    /// Write the run's metrics as JSON to PATH when the VM stops (its directory must exist;
    /// in the emulated host it is shared read-write automatically).
    #[arg(long, value_name = "PATH")]
    pub metrics: Option<PathBuf>,

    /// Where KVM comes from: this machine's (kvm), an emulated KVM-capable host run under
    /// QEMU (emulated), or decide by probing this machine's KVM (auto).
    #[arg(long, value_enum, default_value = "auto", env = "AIODMA_HOST")]
    pub host: HostMode,

    /// Command to run in the guest (after `--`).
    #[arg(last = true, value_name = "GUEST_COMMAND")]
    pub command: Vec<String>,
}

/// `--host` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HostMode {
    /// Probe: use this machine's KVM when it can run the guest, else the emulated host.
    Auto,
    /// This machine's KVM, or fail.
    Kvm,
    /// Always the emulated host (QEMU TCG with AMD SVM, real KVM inside).
    Emulated,
}

/// `--log-level` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Progress (boot time, exit status).
    Info,
    /// Details.
    Debug,
    /// Everything, including each unclaimed port access.
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("aiodma").chain(args.iter().copied()))
    }

    #[test]
    fn run_with_command_and_flags() {
        let cli = parse(&[
            "run", "--cpus", "2", "--memory", "512", "--initrd", "a", "--initrd", "b", "--", "sh",
            "-c", "exit 7",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run");
        };
        assert_eq!(args.cpus, 2);
        assert_eq!(args.memory, 512);
        assert_eq!(args.initrds, vec![PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(args.command, vec!["sh", "-c", "exit 7"]);
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for bad in [
            &["run", "--cpus", "0"][..],
            &["run", "--memory", "1"],
            &["run", "--host", "xen"],
            &["run", "--bogus"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }
}
