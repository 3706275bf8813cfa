//! Turns `aiodma run` flags into a validated VM configuration: files exist and are what they
//! claim to be, and the guest command fits on the kernel command line.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aiodma_device::abi;
use aiodma_device::backend::Backing;
use aiodma_device::fault::log::read_schedule;
use aiodma_device::fault::{FaultRule, Scheduled};

use crate::cli::RunArgs;

/// Kernel parameters every boot gets. `reboot=t` + `panic=-1`: a panic or reboot triple-faults at
/// once, which the VMM sees as a shutdown; the guest role never needs KVM itself, so its init
/// functions are skipped (they would only print "not supported" errors).
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=t panic=-1 quiet initcall_blacklist=vt_init,svm_init";

/// Linux's x86 COMMAND_LINE_SIZE, including the terminating NUL.
pub const CMDLINE_CAPACITY: usize = 2048;
/// Linux passes at most 32 arguments to init (MAX_INIT_ARGS), the program name included.
const MAX_INIT_ARGS: usize = 31;

/// Invalid user input; reported in one line with exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file given (or defaulted) on the command line cannot be opened.
    #[error("{what} {path}: {source}{hint}")]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The kernel is not a bzImage.
    #[error("kernel {0}: not a bzImage (no \"HdrS\" boot header)")]
    NotBzImage(PathBuf),
    /// The guest command cannot be expressed on the kernel command line.
    #[error("guest command: {0}")]
    Command(String),
    /// The `--backing` file is unusable.
    #[error("--backing {0}: {1}")]
    Backing(PathBuf, String),
    /// An output file cannot be created where asked.
    #[error("--{0} {1}: directory {2} does not exist")]
    OutputDir(&'static str, PathBuf, PathBuf),
    /// The `--fault-replay` file is not a fault log.
    #[error(transparent)]
    FaultReplay(#[from] aiodma_device::fault::log::ReplayError),
    /// The whole kernel command line is too long.
    #[error("kernel command line is {0} bytes; Linux accepts at most {max}", max = CMDLINE_CAPACITY - 1)]
    CmdlineTooLong(usize),
}

/// A validated VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// bzImage path.
    pub kernel: PathBuf,
    /// Initramfs archives, concatenated in this order.
    pub initrds: Vec<PathBuf>,
    /// The complete kernel command line.
    pub cmdline: String,
    /// vCPU count.
    pub cpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Stop after this long.
    pub timeout: Option<Duration>,
    /// Hide XSAVE from the guest (needed inside the emulated host; see arch cpuid).
    pub hide_xsave: bool,
    /// The guest runs an interactive shell: forward a terminal's keystrokes.
    pub interactive: bool,
    /// Where to write the run's metrics (absolute).
    pub metrics: Option<PathBuf>,
    /// Where to serve the runtime-control API (`--api-sock`).
    pub api_sock: Option<PathBuf>,
    /// The DMA device, unless `--no-device`.
    pub device: Option<DeviceSpec>,
    /// System call filters (`--seccomp`).
    pub seccomp: crate::seccomp::SeccompMode,
}

/// The DMA device's flags.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSpec {
    /// Number of queues (`--queues`; default one per vCPU).
    pub queues: u16,
    /// Largest queue size (`--queue-size`).
    pub queue_size: u16,
    /// The store (`--backing`); a file path is absolute.
    pub backing: Backing,
    /// Fault rules (`--fault`), in order.
    pub faults: Vec<FaultRule>,
    /// Fault injector seed (`--fault-seed`).
    pub fault_seed: u64,
    /// Where to log fired faults (`--fault-log`, absolute).
    pub fault_log: Option<PathBuf>,
    /// Faults to replay (`--fault-replay`), read from the log.
    pub fault_replay: Option<Vec<Scheduled>>,
}

impl DeviceSpec {
    /// The device `args` describe, or `None` with `--no-device`. A backing file must exist, be a
    /// regular file (not empty) or a block device, and be readable and writable.
    pub fn from_args(args: &RunArgs) -> Result<Option<Self>, ConfigError> {
        if args.no_device {
            return Ok(None);
        }
        let backing = match &args.backing {
            Backing::File { path } => Backing::File {
                path: check_backing_file(path)?,
            },
            other => other.clone(),
        };
        Ok(Some(Self {
            queues: args
                .queues
                .unwrap_or_else(|| u16::from(args.cpus).min(abi::bar0::MAX_QUEUES)),
            queue_size: args.queue_size,
            backing,
            faults: args.faults.clone(),
            fault_seed: args.fault_seed,
            fault_log: args
                .fault_log
                .as_deref()
                .map(|p| absolute_in_existing_dir("fault-log", p))
                .transpose()?,
            fault_replay: args
                .fault_replay
                .as_deref()
                .map(read_schedule)
                .transpose()?,
        }))
    }

    /// The directory of the fault log, which the emulated host must share read-write.
    pub fn fault_log_dir(&self) -> Option<PathBuf> {
        self.fault_log
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
    }

    /// The directory of the backing file, which the emulated host must share read-write.
    pub fn backing_dir(&self) -> Option<PathBuf> {
        match &self.backing {
            Backing::File { path } => path.parent().map(Path::to_path_buf),
            Backing::Memory { .. } => None,
        }
    }
}

/// Check a `--backing` file before the VM (or the emulated host) starts; returns it absolute.
fn check_backing_file(path: &Path) -> Result<PathBuf, ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    let bad = |why: String| ConfigError::Backing(path.to_path_buf(), why);
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    let kind = meta.file_type();
    if kind.is_file() {
        if meta.len() == 0 {
            return Err(bad(
                "the file is empty (its size is the device capacity; e.g. truncate -s 64M FILE)"
                    .into(),
            ));
        }
    } else if !kind.is_block_device() {
        return Err(bad("not a regular file or block device".into()));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| bad(e.to_string()))?;
    Ok(std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
}

/// Where the image build publishes its artifacts: `$AIODMA_IMAGES`, else `images/out` in the
/// current directory or in an ancestor of the `aiodma` executable (a checkout's target/ dir).
pub fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AIODMA_IMAGES") {
        return PathBuf::from(dir);
    }
    let local = PathBuf::from("images/out");
    if local.is_dir() {
        return local;
    }
    if let Ok(exe) = std::env::current_exe() {
        for ancestor in exe.ancestors().skip(1) {
            let candidate = ancestor.join("images/out");
            if candidate.is_dir() {
                return candidate;
            }
        }
    }
    local
}

const BUILD_HINT: &str = " (run `make image` to build the guest image)";

fn check_readable(what: &'static str, path: &Path, defaulted: bool) -> Result<File, ConfigError> {
    File::open(path).map_err(|source| ConfigError::File {
        what,
        path: path.to_path_buf(),
        source,
        hint: if defaulted { BUILD_HINT } else { "" },
    })
}

fn check_bzimage(path: &Path, defaulted: bool) -> Result<(), ConfigError> {
    let mut header = [0u8; 0x206];
    let mut file = check_readable("kernel", path, defaulted)?;
    match file.read_exact(&mut header) {
        Ok(()) if &header[0x202..0x206] == b"HdrS" => Ok(()),
        _ => Err(ConfigError::NotBzImage(path.to_path_buf())),
    }
}

/// Quote the guest command for the kernel command line. Linux splits on spaces and honours
/// double quotes around a whole argument, with no escapes, so arguments containing a double
/// quote or a control character cannot be passed.
pub fn quote_command(command: &[String]) -> Result<String, ConfigError> {
    if command.len() > MAX_INIT_ARGS {
        return Err(ConfigError::Command(format!(
            "{} arguments; Linux passes at most {MAX_INIT_ARGS} to init",
            command.len()
        )));
    }
    let mut quoted = Vec::with_capacity(command.len());
    for arg in command {
        if arg.contains('"') || arg.chars().any(char::is_control) {
            return Err(ConfigError::Command(format!(
                "argument {arg:?} contains a double quote or control character, which the \
                 kernel command line cannot carry (put the command in a script instead)"
            )));
        }
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            quoted.push(format!("\"{arg}\""));
        } else {
            quoted.push(arg.clone());
        }
    }
    Ok(quoted.join(" "))
}

/// Build the kernel command line: defaults, the user's extra parameters, then the command.
pub fn build_cmdline(append: Option<&str>, command: &[String]) -> Result<String, ConfigError> {
    let mut cmdline = DEFAULT_CMDLINE.to_string();
    if let Some(extra) = append.map(str::trim).filter(|s| !s.is_empty()) {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    if !command.is_empty() {
        cmdline.push_str(" -- ");
        cmdline.push_str(&quote_command(command)?);
    }
    if cmdline.len() >= CMDLINE_CAPACITY {
        return Err(ConfigError::CmdlineTooLong(cmdline.len()));
    }
    Ok(cmdline)
}

/// `path` (the value of `--flag`) made absolute, checking that its directory exists (the file
/// itself may not).
fn absolute_in_existing_dir(flag: &'static str, path: &Path) -> Result<PathBuf, ConfigError> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = absolute.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.is_dir() {
        Ok(absolute)
    } else {
        Err(ConfigError::OutputDir(flag, path.to_path_buf(), dir))
    }
}

impl VmConfig {
    /// Validate `args` into a configuration.
    pub fn from_args(args: &RunArgs) -> Result<Self, ConfigError> {
        let images = images_dir();
        let kernel = args
            .kernel
            .clone()
            .unwrap_or_else(|| images.join("bzImage"));
        check_bzimage(&kernel, args.kernel.is_none())?;
        let base = args
            .base_initrd
            .clone()
            .unwrap_or_else(|| images.join("initramfs.cpio.gz"));
        check_readable("initrd", &base, args.base_initrd.is_none())?;
        let mut initrds = vec![base];
        for extra in &args.initrds {
            check_readable("initrd", extra, false)?;
            initrds.push(extra.clone());
        }
        let metrics = args
            .metrics
            .as_deref()
            .map(|p| absolute_in_existing_dir("metrics", p))
            .transpose()?;
        Ok(Self {
            kernel,
            initrds,
            cmdline: build_cmdline(args.append.as_deref(), &args.command)?,
            cpus: args.cpus,
            memory_mib: args.memory,
            timeout: (args.timeout > 0).then(|| Duration::from_secs(args.timeout)),
            hide_xsave: std::env::var_os(crate::host::IN_EMULATED_HOST_ENV).is_some(),
            interactive: args.command.is_empty(),
            metrics,
            api_sock: args.api_sock.clone(),
            device: DeviceSpec::from_args(args)?,
            seccomp: args.seccomp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn quotes_arguments_with_spaces() {
        let q = quote_command(&strings(&["sh", "-c", "echo hi; exit 7", ""])).unwrap();
        assert_eq!(q, r#"sh -c "echo hi; exit 7" """#);
    }

    #[test]
    fn rejects_what_the_kernel_cannot_carry() {
        assert!(quote_command(&strings(&["echo", "a\"b"])).is_err());
        assert!(quote_command(&strings(&["echo", "a\nb"])).is_err());
        let many = vec!["x".to_string(); 40];
        assert!(quote_command(&many).is_err());
    }

    #[test]
    fn cmdline_has_defaults_append_and_command() {
        let c = build_cmdline(Some(" loglevel=7 "), &strings(&["/bin/true"])).unwrap();
        assert_eq!(c, format!("{DEFAULT_CMDLINE} loglevel=7 -- /bin/true"));
        assert_eq!(build_cmdline(None, &[]).unwrap(), DEFAULT_CMDLINE);
        let long = vec!["y".repeat(100); 25];
        assert!(matches!(
            build_cmdline(None, &long),
            Err(ConfigError::CmdlineTooLong(_))
        ));
    }

    #[test]
    fn backing_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("aiodma-backing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        let good = dir.join("good.img");
        std::fs::write(&good, vec![0u8; 4096]).unwrap();
        let err = check_backing_file(&empty).unwrap_err().to_string();
        assert!(
            err.starts_with("--backing ") && err.contains("empty"),
            "{err}"
        );
        let err = check_backing_file(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
        let err = check_backing_file(&dir).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        assert_eq!(check_backing_file(&good).unwrap(), good);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_missing_and_non_bzimage_kernels() {
        let dir = std::env::temp_dir().join(format!("aiodma-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("vmlinux");
        std::fs::write(&fake, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            check_bzimage(&fake, false),
            Err(ConfigError::NotBzImage(_))
        ));
        let err = check_bzimage(&dir.join("missing"), true).unwrap_err();
        assert!(err.to_string().contains("make image"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
