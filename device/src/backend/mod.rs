//! The backing store (`--backing`) and its asynchronous engines.
//!
//! A [`Backend`] takes [`Job`]s (READ/WRITE/FLUSH with guest-memory segments) from the device
//! thread and completes them later, in any order, signalling its [`Backend::notifier`] eventfd;
//! the device thread then collects [`Completion`]s with [`Backend::reap`].
//!
//! - `mem:SIZE` ([`mem`]): an anonymous mapping, copied to and from guest memory by a pool of
//!   worker threads ([`pool`]), so a small request overtakes a big one.
//! - a file path ([`file`]): io_uring, reading and writing directly between the file and guest
//!   memory (host pointers from vm-memory); O_DIRECT when offset, length and addresses are
//!   aligned to [`ALIGNMENT`]; FLUSH is `fdatasync`. Where io_uring is unavailable, the worker
//!   pool with `preadv`/`pwritev` instead.
//!
//! Every backend counts, in the shared `inflight` counter, the jobs that may still touch guest
//! memory: incremented by `submit`, decremented once the job can no longer touch it. The device
//! reports a reset complete only when it is zero. So that this takes the time of the jobs
//! already copying, not of everything queued behind them, a backend asks the [`DmaGate`] right
//! before a job's first guest-memory access and completes a refused job with [`JOB_CANCELED`].
//!
//! Every backend orders overlapping jobs through a [`range::RangeLock`] (write atomicity,
//! SPEC 10): a job that shares a 512-byte block with an in-flight job, one of the two a WRITE,
//! starts only once the earlier one completed; other jobs are not held back.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::request::Segment;

pub mod file;
pub mod mem;
pub mod pool;
pub mod range;
#[cfg(test)]
mod testing;

/// Offsets, lengths and addresses aligned to this take the direct path (`DeviceConfig::alignment`).
pub const ALIGNMENT: u32 = 512;

/// Default backing: 64 MiB of memory.
pub const DEFAULT_MEMORY_SIZE: u64 = 64 << 20;

/// Largest memory backing accepted (1 TiB; the mapping is reserved lazily).
pub const MAX_MEMORY_SIZE: u64 = 1 << 40;

/// Where the device's store lives (`--backing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// `mem:SIZE`: anonymous memory of `size` bytes, zero-filled.
    Memory {
        /// Capacity in bytes.
        size: u64,
    },
    /// A path: an existing regular file (or block device) whose size is the capacity.
    File {
        /// The file.
        path: PathBuf,
    },
}

impl Default for Backing {
    fn default() -> Backing {
        Backing::Memory {
            size: DEFAULT_MEMORY_SIZE,
        }
    }
}

/// A `--backing` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Empty value.
    #[error("backing '': expected mem:SIZE (e.g. mem:64M) or a file path")]
    Empty,
    /// `mem:` with a size that does not parse.
    #[error("backing '{spec}': bad size '{size}' (expected a number with an optional K, M, G or T suffix, e.g. mem:64M)")]
    BadSize {
        /// The whole value.
        spec: String,
        /// The size part.
        size: String,
    },
    /// `mem:0`.
    #[error("backing '{spec}': the size must be greater than 0")]
    ZeroSize {
        /// The whole value.
        spec: String,
    },
    /// Larger than [`MAX_MEMORY_SIZE`].
    #[error("backing '{spec}': the size is larger than 1T")]
    TooLarge {
        /// The whole value.
        spec: String,
    },
}

/// Parses a size: digits with an optional binary suffix `K`, `M`, `G`, `T` (either case, an
/// optional trailing `iB` or `B`).
pub fn parse_size(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let suffix = suffix
        .strip_suffix("iB")
        .or_else(|| suffix.strip_suffix('B'))
        .unwrap_or(suffix);
    let shift = match suffix {
        "" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// Formats a size with the largest binary suffix that shows it exactly.
pub fn format_size(size: u64) -> String {
    for (suffix, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if size != 0 && size.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", size >> shift);
        }
    }
    size.to_string()
}

impl Backing {
    /// Parses `mem:SIZE` (`mem:64M`, `mem:1G`, `mem:4096`), `file:PATH` or a bare path. Whether
    /// the file exists is checked when the device opens it.
    pub fn parse(spec: &str) -> Result<Backing, ParseError> {
        if spec.is_empty() {
            return Err(ParseError::Empty);
        }
        if let Some(size) = spec.strip_prefix("mem:") {
            let n = parse_size(size).ok_or_else(|| ParseError::BadSize {
                spec: spec.to_string(),
                size: size.to_string(),
            })?;
            if n == 0 {
                return Err(ParseError::ZeroSize {
                    spec: spec.to_string(),
                });
            }
            if n > MAX_MEMORY_SIZE {
                return Err(ParseError::TooLarge {
                    spec: spec.to_string(),
                });
            }
            return Ok(Backing::Memory { size: n });
        }
        let path = spec.strip_prefix("file:").unwrap_or(spec);
        if path.is_empty() {
            return Err(ParseError::Empty);
        }
        Ok(Backing::File {
            path: PathBuf::from(path),
        })
    }

    /// The string the `GET_ID` request returns for this kind of backing.
    pub fn id_string(&self) -> &'static str {
        match self {
            Backing::Memory { .. } => "aiodma-mem",
            Backing::File { .. } => "aiodma-file",
        }
    }
}

impl std::str::FromStr for Backing {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backing::parse(s)
    }
}

impl fmt::Display for Backing {
    /// `mem:64M` or the path; parses back to an equal value (a path that starts with `mem:` is
    /// shown as `file:mem:...`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backing::Memory { size } => write!(f, "mem:{}", format_size(*size)),
            Backing::File { path } => {
                let s = path.display().to_string();
                if s.starts_with("mem:") || s.starts_with("file:") {
                    write!(f, "file:{s}")
                } else {
                    f.write_str(&s)
                }
            }
        }
    }
}

/// Opening or running a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backing file could not be opened.
    #[error("backing file '{path}': {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The backing file has size 0.
    #[error("backing file '{path}': the file is empty (its size is the device capacity)")]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
    /// The backing path is not a regular file or block device.
    #[error("backing file '{path}': not a regular file or block device")]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// The memory store could not be mapped.
    #[error("backing mem:{size}: cannot map the store: {reason}")]
    Memory {
        /// Requested size.
        size: String,
        /// Why.
        reason: String,
    },
    /// Worker thread creation failed.
    #[error("cannot start a backend worker thread: {0}")]
    Thread(io::Error),
    /// Eventfd creation failed.
    #[error("cannot create the backend completion eventfd: {0}")]
    EventFd(io::Error),
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOp {
    /// Store → guest memory.
    Read,
    /// Guest memory → store.
    Write,
    /// Make completed writes durable.
    Flush,
}

/// Whether a job may still start touching guest memory: the device's reset epoch and the
/// guest's Bus Master Enable bit (SPEC 1 and 3). A backend takes a [`GateTicket`] when a job is
/// submitted and asks [`DmaGate::admits`] right before the job's first guest-memory access; a
/// job it refuses completes with [`JOB_CANCELED`] and never touches guest memory. A job already
/// copying finishes its copy.
#[derive(Debug)]
pub struct DmaGate {
    epoch: AtomicU64,
    bus_master: AtomicBool,
    /// How many times the guest cleared Bus Master Enable: a job submitted before a clear
    /// stays refused even once the guest sets the bit again.
    clears: AtomicU64,
}

/// What a job was submitted under: checked by [`DmaGate::admits`] when it is about to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateTicket {
    epoch: u64,
    clears: u64,
}

/// The error (ECANCELED) of a job the [`DmaGate`] refused.
pub const JOB_CANCELED: i32 = libc::ECANCELED;

impl Default for DmaGate {
    fn default() -> Self {
        DmaGate {
            epoch: AtomicU64::new(0),
            // A device is created with bus mastering on: the VMM's firmware role enables it
            // with memory decoding, and a platform without a PCI command register has no gate.
            bus_master: AtomicBool::new(true),
            clears: AtomicU64::new(0),
        }
    }
}

impl DmaGate {
    /// Whether a job of `epoch` may start touching guest memory now.
    pub fn allows(&self, epoch: u64) -> bool {
        self.bus_master.load(Ordering::Acquire) && self.epoch.load(Ordering::Acquire) == epoch
    }

    /// The ticket of a job of `epoch` submitted now.
    pub fn ticket(&self, epoch: u64) -> GateTicket {
        GateTicket {
            epoch,
            clears: self.clears.load(Ordering::Acquire),
        }
    }

    /// Whether a job holding `ticket` may start touching guest memory now: [`DmaGate::allows`]
    /// its epoch, and the guest has not cleared Bus Master Enable since it was submitted.
    pub fn admits(&self, ticket: GateTicket) -> bool {
        // Bus master first: a clear counts before the bit can read as set again.
        self.allows(ticket.epoch) && self.clears.load(Ordering::Acquire) == ticket.clears
    }

    /// What `admits` depends on, to notice a change: (epoch, bus master, clears).
    pub fn state(&self) -> (u64, bool, u64) {
        (
            self.epoch.load(Ordering::Acquire),
            self.bus_master.load(Ordering::Acquire),
            self.clears.load(Ordering::Acquire),
        )
    }

    /// The current reset epoch (jobs are tagged with it when they are created).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A reset began: jobs of older epochs must not start.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    /// Whether the guest lets the device master the bus.
    pub fn bus_master(&self) -> bool {
        self.bus_master.load(Ordering::Acquire)
    }

    /// The guest set or cleared Bus Master Enable.
    pub fn set_bus_master(&self, on: bool) {
        if on {
            self.bus_master.store(true, Ordering::Release);
        } else {
            // Counted before the bit clears, so by the time it reads as set again the count
            // has moved on for every job submitted before.
            self.clears.fetch_add(1, Ordering::AcqRel);
            self.bus_master.store(false, Ordering::Release);
        }
    }
}

/// One backend operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Identifies the completion (chosen by the device thread, unique).
    pub token: u64,
    /// The reset epoch the job belongs to ([`DmaGate::allows`]).
    pub epoch: u64,
    /// What to do.
    pub op: JobOp,
    /// Store offset (READ/WRITE).
    pub offset: u64,
    /// Guest buffers, in order (READ/WRITE); validated to lie in guest RAM.
    pub segments: Vec<Segment>,
}

impl Job {
    /// Total data bytes.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Whether the job moves no data.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }
}

/// A finished job.
#[derive(Debug)]
pub struct Completion {
    /// The job's token.
    pub token: u64,
    /// `Ok` when every byte was transferred (or the flush succeeded).
    pub result: io::Result<()>,
}

/// An asynchronous backing store, driven from the device thread.
pub trait Backend {
    /// Short name for logs ("mem", "file (io_uring)", ...).
    fn name(&self) -> &'static str;

    /// Store size in bytes.
    fn capacity(&self) -> u64;

    /// Readable when completions may be waiting (non-blocking eventfd).
    fn notifier(&self) -> &EventFd;

    /// Starts a job; its completion comes later through `reap`.
    fn submit(&mut self, job: Job);

    /// Pushes the jobs submitted since the last call to the kernel (one syscall per batch);
    /// a no-op for backends that start jobs at once.
    fn kick(&mut self) {}

    /// Clears the notifier and appends every finished job to `out`.
    fn reap(&mut self, out: &mut Vec<Completion>);

    /// Flips the bits at `bits` (bit positions counted from store offset `offset`), at once:
    /// a `corrupt` fault on a completed WRITE.
    fn flip_stored_bits(&mut self, offset: u64, bits: &[u64]) -> io::Result<()>;
}

/// [`Backend::flip_stored_bits`] on a file: each byte read, flipped and written back.
pub fn flip_file_bits(file: &std::fs::File, offset: u64, bits: &[u64]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    for &bit in bits {
        let at = offset
            .checked_add(bit / 8)
            .ok_or_else(|| io::Error::other("offset overflow"))?;
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, at)?;
        b[0] ^= 1 << (bit % 8);
        file.write_all_at(&b, at)?;
    }
    Ok(())
}

/// Opens `backing` with `workers` threads for the pool-based engines. `inflight` counts jobs
/// that may still touch guest memory; `gate` says whether a job may still start.
pub fn open(
    backing: &Backing,
    mem: GuestMemoryMmap,
    workers: usize,
    inflight: Arc<AtomicU64>,
    gate: Arc<DmaGate>,
) -> Result<Box<dyn Backend>, BackendError> {
    match backing {
        Backing::Memory { size } => {
            let store = mem::MemStore::new(*size)?;
            let pool = pool::Pool::new("mem", store, mem, workers, inflight, gate)?;
            Ok(Box::new(pool))
        }
        Backing::File { path } => file::open(path, mem, workers, inflight, gate),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backings() {
        assert_eq!(
            Backing::parse("mem:64M").unwrap(),
            Backing::Memory { size: 64 << 20 }
        );
        assert_eq!(
            Backing::parse("mem:1G").unwrap(),
            Backing::Memory { size: 1 << 30 }
        );
        assert_eq!(
            Backing::parse("mem:4096").unwrap(),
            Backing::Memory { size: 4096 }
        );
        assert_eq!(
            Backing::parse("mem:2KiB").unwrap(),
            Backing::Memory { size: 2048 }
        );
        assert_eq!(
            Backing::parse("mem:3m").unwrap(),
            Backing::Memory { size: 3 << 20 }
        );
        assert_eq!(
            Backing::parse("/var/tmp/disk.img").unwrap(),
            Backing::File {
                path: "/var/tmp/disk.img".into()
            }
        );
        assert_eq!(
            Backing::parse("file:rel/disk").unwrap(),
            Backing::File {
                path: "rel/disk".into()
            }
        );
        assert_eq!(Backing::default(), Backing::Memory { size: 64 << 20 });
        assert_eq!(
            "mem:8M".parse::<Backing>().unwrap(),
            Backing::Memory { size: 8 << 20 }
        );
    }

    #[test]
    fn rejects_bad_backings_with_one_line_messages() {
        let e = |s: &str| Backing::parse(s).unwrap_err().to_string();
        assert!(e("mem:64X").starts_with("backing 'mem:64X': bad size '64X'"));
        assert!(e("mem:").contains("bad size ''"));
        assert!(e("mem:M").contains("bad size 'M'"));
        assert!(e("mem:-1").contains("bad size '-1'"));
        assert!(e("mem:99999999999999999999").contains("bad size"));
        assert!(e("mem:100000000T").contains("bad size"));
        assert_eq!(
            e("mem:0"),
            "backing 'mem:0': the size must be greater than 0"
        );
        assert_eq!(e("mem:2T"), "backing 'mem:2T': the size is larger than 1T");
        assert!(e("").starts_with("backing '': expected"));
        assert!(e("file:").starts_with("backing '': expected"));
        for s in ["mem:64X", "", "mem:0"] {
            assert!(!e(s).contains('\n'));
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "mem:64M",
            "mem:1G",
            "mem:1T",
            "mem:1000",
            "mem:3K",
            "/tmp/x",
            "file:mem:odd",
        ] {
            let b = Backing::parse(s).unwrap();
            assert_eq!(b.to_string(), s);
            assert_eq!(Backing::parse(&b.to_string()).unwrap(), b);
        }
        assert_eq!(Backing::parse("mem:1024K").unwrap().to_string(), "mem:1M");
    }

    #[test]
    fn the_gate_admits_a_job_only_in_its_epoch_and_bus_master_period() {
        let gate = DmaGate::default();
        let t0 = gate.ticket(0);
        assert!(gate.admits(t0) && gate.allows(0));
        gate.set_bus_master(false);
        assert!(!gate.admits(t0) && !gate.allows(0));
        // Set again: jobs submitted before the clear stay refused, later ones start.
        gate.set_bus_master(true);
        assert!(!gate.admits(t0) && gate.allows(0));
        let t1 = gate.ticket(0);
        assert!(gate.admits(t1));
        gate.set_epoch(1);
        assert!(!gate.admits(t1));
        assert!(gate.admits(gate.ticket(1)));
        assert_eq!(gate.state(), (1, true, 1));
    }

    #[test]
    fn id_strings() {
        assert_eq!(Backing::default().id_string(), "aiodma-mem");
        assert_eq!(Backing::parse("/x").unwrap().id_string(), "aiodma-file");
    }
}
