//! The `aiodma` command line.

use std::path::PathBuf;

use aiodma_device::abi;
use aiodma_device::backend::Backing;
use aiodma_device::fault::FaultRule;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::seccomp::SeccompMode;

/// `--backing`: the engine's syntax (its messages name the bad part).
fn parse_backing(s: &str) -> Result<Backing, String> {
    Backing::parse(s).map_err(|e| e.to_string())
}

/// `--fault`: the engine's syntax (its messages name the rule and the bad part).
fn parse_fault(s: &str) -> Result<FaultRule, String> {
    FaultRule::parse(s).map_err(|e| e.to_string())
}

/// `--seccomp`: one line naming the bad value (clap's own enum error would print the usage).
fn parse_seccomp(s: &str) -> Result<SeccompMode, String> {
    SeccompMode::parse(s)
}

/// `--queue-size`: a power of two that a split virtqueue can have.
fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number (expected a power of two in 1..=32768)"))?;
    match u16::try_from(n) {
        Ok(n) if n.is_power_of_two() && n <= 32768 => Ok(n),
        _ => Err(format!("{n} is not a power of two in 1..=32768")),
    }
}

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
// Parsed once at start and matched by reference: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot the test guest and run GUEST_COMMAND in it (a shell when none is given).
    ///
    /// The exit status is the guest command's. Other codes: 2 bad input, 3 KVM failure,
    /// 101 guest kernel panic, 102 guest reset without an exit status, 124 timeout,
    /// 159 a system call forbidden by `--seccomp on`.
    Run(RunArgs),
    /// Benchmarks that print a table.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Control a running VM through its `run --api-sock` socket: fault rules, reset, hang,
    /// pause and resume, metrics. Prints the answer (JSON); a refused request prints the
    /// reason on stderr and exits 1.
    Ctl(CtlArgs),
}

/// `aiodma ctl` flags.
#[derive(Debug, Clone, Args)]
pub struct CtlArgs {
    /// The socket of `aiodma run --api-sock PATH`.
    #[arg(long, value_name = "PATH", env = "AIODMA_API_SOCK")]
    pub sock: PathBuf,

    /// Give up after SECS seconds without an answer.
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,

    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `aiodma ctl` commands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum CtlCommand {
    /// Fault rules.
    #[command(subcommand)]
    Fault(FaultCommand),
    /// Make the device ask its driver for a reset (NEEDS_RESET and a configuration interrupt).
    Reset,
    /// Make the device hang: nothing completes until the driver resets it.
    Hang,
    /// Stop taking and completing requests (in flight ones wait) until `resume`.
    Pause,
    /// Undo `pause`.
    Resume,
    /// The device's counters (JSON, as `run --metrics` writes under "device").
    Metrics,
}

/// `aiodma ctl fault` commands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum FaultCommand {
    /// Append a rule in `--fault` syntax, e.g. 'error:every=1,op=write'; prints its index.
    Add {
        /// KIND:key=val,...
        rule: String,
    },
    /// The rules in force, in order.
    List,
    /// Remove rule N (as numbered by `list`, from 0; later rules move up).
    Rm {
        /// The rule's index.
        index: usize,
    },
    /// Remove every rule.
    Clear,
}

/// `aiodma bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Boot time and VMM memory of aiodma next to QEMU's microvm (same kernel, initramfs and
    /// guest command, same place), as medians.
    Boot(BootBenchArgs),
    /// Run a guest command under QEMU (KVM, microvm) with a virtio-blk disk at /dev/vda in
    /// place of our device: the peer for side-by-side I/O benchmarks (same kernel, initramfs
    /// and place). Exit codes as for `run`.
    Peer(PeerArgs),
}

/// `aiodma bench peer` flags.
#[derive(Debug, Clone, Args)]
pub struct PeerArgs {
    /// Extra cpio archive appended after the base initramfs (repeatable), as for `run`.
    #[arg(long = "initrd", value_name = "PATH")]
    pub initrds: Vec<PathBuf>,

    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub cpus: u8,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(64..=1 << 20))]
    pub memory: u64,

    /// Service time of every disk request, in microseconds (QEMU null-co's latency-ns), to
    /// mirror a `delay` fault on our device.
    #[arg(long, value_name = "US", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub latency_us: u64,

    /// Disk size in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub disk: u64,

    /// Stop the guest after SECS seconds (exit code 124). 0 means no limit.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub timeout: u64,

    /// Where KVM comes from (see `aiodma run --help`).
    #[arg(long, value_enum, default_value = "auto", env = "AIODMA_HOST")]
    pub host: HostMode,

    /// Command to run in the guest (after `--`).
    #[arg(last = true, value_name = "GUEST_COMMAND", required = true)]
    pub command: Vec<String>,
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

    /// Write the run's metrics (including the DMA device's counters) as JSON to PATH when the
    /// VM stops, and on SIGUSR1 while it runs (direct KVM only). Its directory must exist; in
    /// the emulated host it is shared read-write automatically.
    #[arg(long, value_name = "PATH")]
    pub metrics: Option<PathBuf>,

    /// Serve the runtime-control API (HTTP/JSON, see `aiodma ctl`) on a Unix socket at PATH
    /// while the VM runs; the file is removed at exit. A stale socket there (nobody listening)
    /// is replaced, a live one is an error (exit 2). In the emulated host this process listens
    /// at PATH and relays to the VMM inside.
    #[arg(long, value_name = "PATH", conflicts_with = "no_device")]
    pub api_sock: Option<PathBuf>,

    /// Where KVM comes from: this machine's (kvm), an emulated KVM-capable host run under
    /// QEMU (emulated), or decide by probing this machine's KVM (auto).
    #[arg(long, value_enum, default_value = "auto", env = "AIODMA_HOST")]
    pub host: HostMode,

    /// System call filters on the VMM's threads (vCPUs, device, backend workers, main):
    /// on (a forbidden call stops the VMM with a message naming it, exit code 159), log (the
    /// kernel's audit log records it, the call proceeds) or off. In the emulated host they
    /// apply to the inner VMM.
    #[arg(long, value_name = "on|log|off", default_value = "on", env = "AIODMA_SECCOMP",
          value_parser = parse_seccomp)]
    pub seccomp: SeccompMode,

    /// Number of queues, 1..=63 (each has its own MSI-X vector). Default: one per vCPU.
    #[arg(long, value_name = "N", help_heading = "DMA device",
          value_parser = clap::value_parser!(u16).range(1..=i64::from(abi::bar0::MAX_QUEUES)))]
    pub queues: Option<u16>,

    /// Largest queue size the driver may choose, a power of two in 1..=32768.
    #[arg(long, value_name = "N", default_value_t = 256, help_heading = "DMA device",
          value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// The store: `mem:SIZE` (anonymous memory, e.g. mem:64M, mem:1G) or the path
    /// of an existing file or block device (its size is the capacity; in the emulated host its
    /// directory is shared read-write automatically).
    #[arg(long, value_name = "mem:SIZE|PATH", default_value = "mem:64M",
          help_heading = "DMA device", value_parser = parse_backing)]
    pub backing: Backing,

    /// Inject faults, KIND:key=val,... (repeatable, applied in order), e.g.
    /// error:p=0.01, delay:every=10,min=100us,max=2ms, drop:p=0.001,op=write, hang:after=1000.
    /// See device/SPEC.md section 7.
    #[arg(long = "fault", value_name = "KIND:key=val,...", help_heading = "DMA device",
          value_parser = parse_fault)]
    pub faults: Vec<FaultRule>,

    /// Seed of the fault injector's PRNG (same seed and request order: same faults).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        help_heading = "DMA device"
    )]
    pub fault_seed: u64,

    /// Write one JSON line per fired fault (request sequence number, queue, head, op, offset,
    /// length, kind and its drawn parameters, device time) and a summary line to PATH. Its
    /// directory must exist; in the emulated host it is shared read-write automatically.
    #[arg(long, value_name = "PATH", help_heading = "DMA device")]
    pub fault_log: Option<PathBuf>,

    /// Fire exactly the faults of a fault log written by --fault-log, on the same request
    /// sequence numbers, instead of --fault rules (for the same guest workload the new log is
    /// the same, device times aside).
    #[arg(
        long,
        value_name = "PATH",
        help_heading = "DMA device",
        conflicts_with = "faults"
    )]
    pub fault_replay: Option<PathBuf>,

    /// Boot without the DMA device (the PCI bus then holds only the host bridge).
    #[arg(long, help_heading = "DMA device",
          conflicts_with_all = ["queues", "queue_size", "backing", "faults", "fault_seed",
                                "fault_log", "fault_replay"])]
    pub no_device: bool,

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

    fn run_args(args: &[&str]) -> RunArgs {
        let argv: Vec<&str> = std::iter::once("run").chain(args.iter().copied()).collect();
        match parse(&argv).unwrap().command {
            Command::Run(args) => args,
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn device_flags_and_defaults() {
        let a = run_args(&[]);
        assert_eq!(
            (a.queues, a.queue_size, a.fault_seed, a.no_device),
            (None, 256, 0, false)
        );
        let a = run_args(&["--queues", "4", "--queue-size", "1024", "--fault-seed", "9"]);
        assert_eq!((a.queues, a.queue_size, a.fault_seed), (Some(4), 1024, 9));
        assert_eq!(run_args(&["--queue-size", "32768"]).queue_size, 32768);
        assert_eq!(run_args(&["--queue-size", "1"]).queue_size, 1);
        assert!(run_args(&["--no-device"]).no_device);
        assert_eq!(run_args(&[]).backing, Backing::parse("mem:64M").unwrap());
        assert!(run_args(&[]).faults.is_empty());
        let a = run_args(&[
            "--backing",
            "mem:1G",
            "--fault",
            "error:p=0.5",
            "--fault",
            "hang:after=3",
        ]);
        assert_eq!(a.backing, Backing::Memory { size: 1 << 30 });
        assert_eq!(
            a.faults,
            vec![
                FaultRule::parse("error:p=0.5").unwrap(),
                FaultRule::parse("hang:after=3").unwrap()
            ]
        );
    }

    #[test]
    fn bad_device_values_name_the_bad_part() {
        for (args, needle) in [
            (&["run", "--backing", "mem:abc"][..], "abc"),
            (&["run", "--fault", "explode:p=1"], "explode"),
            (&["run", "--queue-size", "100"], "100 is not a power of two"),
            (
                &["run", "--seccomp", "strict"],
                "'strict' is not a seccomp mode",
            ),
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
            let first = err.render().to_string();
            let first = first.lines().next().unwrap();
            assert!(first.contains(needle), "{first}");
            assert!(first.contains(args[1]), "{first}");
        }
    }

    #[test]
    fn seccomp_modes() {
        if std::env::var_os("AIODMA_SECCOMP").is_none() {
            assert_eq!(run_args(&[]).seccomp, SeccompMode::On);
        }
        for (value, mode) in [
            ("on", SeccompMode::On),
            ("log", SeccompMode::Log),
            ("off", SeccompMode::Off),
        ] {
            assert_eq!(run_args(&["--seccomp", value]).seccomp, mode);
        }
        for bad in ["", "ON", "trap", "1"] {
            let err = parse(&["run", "--seccomp", bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for bad in [
            &["run", "--cpus", "0"][..],
            &["run", "--memory", "1"],
            &["run", "--host", "xen"],
            &["run", "--bogus"],
            &["run", "--queues", "0"],
            &["run", "--queues", "64"],
            &["run", "--queue-size", "100"],
            &["run", "--queue-size", "0"],
            &["run", "--queue-size", "65536"],
            &["run", "--queue-size", "x"],
            &["run", "--no-device", "--queues", "2"],
            &["run", "--no-device", "--backing", "mem:1M"],
            &["run", "--backing", ""],
            &["run", "--fault", "error"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    fn ctl(args: &[&str]) -> Result<CtlArgs, clap::Error> {
        let argv: Vec<&str> = ["ctl", "--sock", "/s"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        match parse(&argv)?.command {
            Command::Ctl(args) => Ok(args),
            other => panic!("expected ctl, got {other:?}"),
        }
    }

    #[test]
    fn ctl_commands_and_usage_errors() {
        let a = ctl(&["fault", "add", "error:every=1,op=write"]).unwrap();
        assert_eq!(a.sock, PathBuf::from("/s"));
        assert_eq!(a.timeout, 30);
        assert_eq!(
            a.command,
            CtlCommand::Fault(FaultCommand::Add {
                rule: "error:every=1,op=write".into()
            })
        );
        assert_eq!(
            ctl(&["fault", "rm", "2"]).unwrap().command,
            CtlCommand::Fault(FaultCommand::Rm { index: 2 })
        );
        for (word, cmd) in [
            ("reset", CtlCommand::Reset),
            ("hang", CtlCommand::Hang),
            ("pause", CtlCommand::Pause),
            ("resume", CtlCommand::Resume),
            ("metrics", CtlCommand::Metrics),
        ] {
            assert_eq!(ctl(&[word]).unwrap().command, cmd);
        }
        assert_eq!(
            ctl(&["--timeout", "5", "fault", "list"]).unwrap().timeout,
            5
        );
        for bad in [
            &["fault", "rm", "x"][..],
            &["fault", "rm", "-1"],
            &["fault", "add"],
            &["fault"],
            &["explode"],
            &[],
            &["--timeout", "0", "reset"],
        ] {
            assert_eq!(ctl(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
        if std::env::var_os("AIODMA_API_SOCK").is_none() {
            assert_eq!(parse(&["ctl", "reset"]).unwrap_err().exit_code(), 2);
        }
    }

    #[test]
    fn api_sock_needs_the_device() {
        assert_eq!(
            run_args(&["--api-sock", "/tmp/a.sock"]).api_sock,
            Some(PathBuf::from("/tmp/a.sock"))
        );
        assert_eq!(run_args(&[]).api_sock, None);
        let err = parse(&["run", "--api-sock", "/a", "--no-device"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
