//! File backing: io_uring with direct transfers between the file and guest memory.
//!
//! The file is opened twice: buffered, and with `O_DIRECT` (when the filesystem allows it). A
//! READ/WRITE becomes one `IORING_OP_READV`/`WRITEV` whose iovecs point straight into guest
//! memory (host addresses from vm-memory, per region, so a buffer spanning two memory regions
//! becomes two iovecs); it goes to the `O_DIRECT` descriptor when the offset and every iovec's
//! address and length are multiples of [`ALIGNMENT`], else to the buffered one. FLUSH is
//! `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC` (fdatasync). An eventfd registered with the
//! ring signals completions to the device thread, which reaps them.
//!
//! If io_uring cannot be set up (old kernel, `io_uring_disabled`, seccomp), the same file is
//! served by the worker pool with `pread`/`pwrite` instead ([`FileStore`]).

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use log::{debug, info, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::pool::{Pool, Store};
use super::{Backend, BackendError, Completion, Job, JobOp, ALIGNMENT};
use crate::request::Segment;

/// Submission queue entries of the ring (more jobs wait in a backlog).
const RING_ENTRIES: u32 = 256;

/// Most iovecs in one READV/WRITEV (Linux's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// Opens an existing backing file read-write and returns it with its size.
pub fn open_file(path: &Path) -> Result<(File, u64), BackendError> {
    let open_err = |source| BackendError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    let size = if meta.file_type().is_file() {
        meta.len()
    } else if meta.file_type().is_block_device() {
        file.seek(SeekFrom::End(0)).map_err(open_err)?
    } else {
        return Err(BackendError::NotAFile {
            path: path.to_path_buf(),
        });
    };
    if size == 0 {
        return Err(BackendError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    Ok((file, size))
}

/// Opens the file backing: io_uring if possible, else the worker pool.
pub fn open(
    path: &Path,
    mem: GuestMemoryMmap,
    workers: usize,
    inflight: Arc<AtomicU64>,
) -> Result<Box<dyn Backend>, BackendError> {
    let (file, capacity) = open_file(path)?;
    let direct = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            info!(
                "backing file '{}': no O_DIRECT ({e}); every transfer is buffered",
                path.display()
            );
            None
        }
    };
    match Uring::new(
        file.try_clone(),
        direct,
        capacity,
        mem.clone(),
        inflight.clone(),
    ) {
        Ok(uring) => Ok(Box::new(uring)),
        Err(e) => {
            warn!(
                "backing file '{}': io_uring unavailable ({e}); using {} worker thread(s) with pread/pwrite",
                path.display(),
                workers.max(1)
            );
            let store = FileStore { file, capacity };
            Ok(Box::new(Pool::new("file", store, mem, workers, inflight)?))
        }
    }
}

/// One READV/WRITEV/FSYNC in the ring.
struct UringOp {
    job: Job,
    /// Host addresses inside guest memory; must stay alive (and unmoved on the heap) until the
    /// completion arrives.
    iovecs: Vec<libc::iovec>,
    expected: usize,
    direct: bool,
}

/// The io_uring engine.
pub struct Uring {
    ring: IoUring,
    file: File,
    direct: Option<File>,
    capacity: u64,
    notifier: EventFd,
    /// Keeps guest memory mapped while the kernel may still access it.
    mem: GuestMemoryMmap,
    ops: HashMap<u64, UringOp>,
    backlog: VecDeque<Job>,
    failed: Vec<Completion>,
    inflight: Arc<AtomicU64>,
    depth: usize,
    unsubmitted: bool,
    /// Transfers started on the O_DIRECT descriptor.
    direct_ops: u64,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("capacity", &self.capacity)
            .field("direct", &self.direct.is_some())
            .field("in_ring", &self.ops.len())
            .field("backlog", &self.backlog.len())
            .field("direct_ops", &self.direct_ops)
            .finish()
    }
}

impl Uring {
    /// Sets up a ring for `file` (and `direct`, its O_DIRECT twin) with a registered eventfd.
    pub fn new(
        file: io::Result<File>,
        direct: Option<File>,
        capacity: u64,
        mem: GuestMemoryMmap,
        inflight: Arc<AtomicU64>,
    ) -> io::Result<Uring> {
        let file = file?;
        let ring = IoUring::new(RING_ENTRIES)?;
        let notifier = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(notifier.as_raw_fd())?;
        let depth = ring.params().sq_entries() as usize;
        Ok(Uring {
            ring,
            file,
            direct,
            capacity,
            notifier,
            mem,
            ops: HashMap::new(),
            backlog: VecDeque::new(),
            failed: Vec::new(),
            inflight,
            depth,
            unsubmitted: false,
            direct_ops: 0,
        })
    }

    /// Host iovecs for the job's guest segments.
    fn iovecs(&self, segments: &[Segment]) -> io::Result<Vec<libc::iovec>> {
        let mut iovecs = Vec::with_capacity(segments.len());
        for seg in segments {
            for slice in GuestMemoryBackend::get_slices(&self.mem, seg.addr, seg.len as usize) {
                let slice = slice.map_err(|e| io::Error::other(e.to_string()))?;
                iovecs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        if iovecs.len() > MAX_IOVECS {
            return Err(io::Error::other("too many iovecs"));
        }
        Ok(iovecs)
    }

    fn complete(&mut self, token: u64, result: io::Result<()>) {
        self.inflight.fetch_sub(1, Ordering::Release);
        self.failed.push(Completion { token, result });
    }

    /// Puts `job` in the ring, or in the backlog when the ring is full. `force_buffered` skips
    /// the O_DIRECT path.
    fn start(&mut self, job: Job, force_buffered: bool) {
        if self.ops.len() >= self.depth {
            self.backlog.push_back(job);
            return;
        }
        let token = job.token;
        let (iovecs, expected, direct) = match job.op {
            JobOp::Flush => (Vec::new(), 0, false),
            JobOp::Read | JobOp::Write => match self.iovecs(&job.segments) {
                Ok(iov) => {
                    let align = ALIGNMENT as usize;
                    let aligned = job.offset.is_multiple_of(u64::from(ALIGNMENT))
                        && iov.iter().all(|v| {
                            (v.iov_base as usize).is_multiple_of(align) && v.iov_len % align == 0
                        });
                    let expected = iov.iter().map(|v| v.iov_len).sum();
                    (
                        iov,
                        expected,
                        aligned && !force_buffered && self.direct.is_some(),
                    )
                }
                Err(e) => {
                    self.complete(token, Err(e));
                    return;
                }
            },
        };
        let fd = match (&self.direct, direct) {
            (Some(d), true) => {
                self.direct_ops += 1;
                d.as_raw_fd()
            }
            _ => self.file.as_raw_fd(),
        };
        let op = UringOp {
            job,
            iovecs,
            expected,
            direct,
        };
        let entry = match op.job.op {
            JobOp::Flush => opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            JobOp::Read => {
                opcode::Readv::new(types::Fd(fd), op.iovecs.as_ptr(), op.iovecs.len() as u32)
                    .offset(op.job.offset)
                    .build()
            }
            JobOp::Write => {
                opcode::Writev::new(types::Fd(fd), op.iovecs.as_ptr(), op.iovecs.len() as u32)
                    .offset(op.job.offset)
                    .build()
            }
        }
        .user_data(token);
        // The iovec array lives on the heap inside `op`, which stays in `self.ops` (moving the
        // `Vec` does not move its buffer) until the completion for `token` is reaped.
        self.ops.insert(token, op);
        // SAFETY: the entry references (1) the iovec array owned by `self.ops[token]`, kept
        // until this entry's completion is reaped (also in `Drop`); (2) guest memory through
        // those iovecs: host addresses of `self.mem`'s mappings, bounds-checked by `get_slices`,
        // which stay mapped while `self.mem` (a clone sharing the mappings) is alive, and `Drop`
        // waits for every completion before `self.mem` goes; (3) `fd`, owned by `self.file` or
        // `self.direct`, which also outlive every in-flight entry.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            if let Some(op) = self.ops.remove(&token) {
                self.backlog.push_front(op.job);
            }
            return;
        }
        self.unsubmitted = true;
    }

    fn on_cqe(&mut self, token: u64, res: i32, out: &mut Vec<Completion>) {
        let Some(op) = self.ops.remove(&token) else {
            warn!("io_uring: completion for unknown token {token}");
            return;
        };
        if res < 0 && op.direct && -res == libc::EINVAL {
            // The filesystem refused this O_DIRECT transfer: retry buffered, and stop using the
            // direct path altogether.
            info!("io_uring: O_DIRECT transfer refused (EINVAL); falling back to buffered I/O");
            self.direct = None;
            self.start(op.job, true);
            return;
        }
        let result = if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else if op.job.op != JobOp::Flush && res as usize != op.expected {
            Err(io::Error::other(format!(
                "short transfer: {res} of {} bytes",
                op.expected
            )))
        } else {
            Ok(())
        };
        if let Err(e) = &result {
            debug!("io_uring job {token} ({:?}) failed: {e}", op.job.op);
        }
        self.inflight.fetch_sub(1, Ordering::Release);
        out.push(Completion { token, result });
    }

    fn drain_cq(&mut self, out: &mut Vec<Completion>) -> usize {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for &(token, res) in &cqes {
            self.on_cqe(token, res, out);
        }
        cqes.len()
    }
}

impl Backend for Uring {
    fn name(&self) -> &'static str {
        "file (io_uring)"
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    fn submit(&mut self, job: Job) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.start(job, false);
    }

    fn kick(&mut self) {
        if !self.unsubmitted {
            return;
        }
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = false,
            // EBUSY/EAGAIN: the kernel is short of resources; entries stay in the SQ and the
            // next kick (after reaping) retries.
            Err(e) => warn!("io_uring submit failed: {e}"),
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.notifier.read();
        out.append(&mut self.failed);
        while self.drain_cq(out) > 0 {}
        out.append(&mut self.failed);
        while self.ops.len() < self.depth {
            let Some(job) = self.backlog.pop_front() else {
                break;
            };
            self.start(job, false);
        }
        out.append(&mut self.failed);
        self.kick();
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Guest memory must stay mapped and the iovecs alive until the kernel is done with every
        // entry: wait for all completions (bounded, in case the kernel misbehaves).
        let mut sink = Vec::new();
        let mut rounds = 0;
        while !self.ops.is_empty() && rounds < 10_000 {
            rounds += 1;
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("io_uring: waiting for in-flight operations at shutdown: {e}");
                    break;
                }
            }
            self.drain_cq(&mut sink);
        }
        // Jobs never started were counted too.
        for _ in self.backlog.drain(..) {
            self.inflight.fetch_sub(1, Ordering::Release);
        }
    }
}

/// The file served by the worker pool (when io_uring is unavailable).
#[derive(Debug)]
pub struct FileStore {
    file: File,
    capacity: u64,
}

impl FileStore {
    /// A store over an open file of `capacity` bytes.
    pub fn new(file: File, capacity: u64) -> FileStore {
        FileStore { file, capacity }
    }

    fn transfer(
        &self,
        write: bool,
        offset: u64,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
    ) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let mut pos = offset;
        for seg in segments {
            for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
                let slice = slice.map_err(|e| io::Error::other(e.to_string()))?;
                let guard = slice.ptr_guard_mut();
                let base = guard.as_ptr();
                let len = slice.len();
                let mut done = 0usize;
                while done < len {
                    let at = pos
                        .checked_add(done as u64)
                        .and_then(|p| libc::off_t::try_from(p).ok())
                        .ok_or_else(|| io::Error::other("offset overflow"))?;
                    // SAFETY: `base..base + len` is a host mapping of guest memory that
                    // vm-memory bounds-checked for this slice (`get_slices`), kept mapped by
                    // `mem` for the duration of the call; `done < len`, so the pointer and length
                    // stay inside it. pread/pwrite only access that range.
                    let n = unsafe {
                        let p = base.add(done).cast::<libc::c_void>();
                        if write {
                            libc::pwrite(fd, p, len - done, at)
                        } else {
                            libc::pread(fd, p, len - done, at)
                        }
                    };
                    if n < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        return Err(e);
                    }
                    if n == 0 {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                    }
                    done += n as usize;
                }
                pos += len as u64;
            }
        }
        Ok(())
    }
}

impl Store for FileStore {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read(&self, offset: u64, mem: &GuestMemoryMmap, segments: &[Segment]) -> io::Result<()> {
        self.transfer(false, offset, mem, segments)
    }

    fn write(&self, offset: u64, mem: &GuestMemoryMmap, segments: &[Segment]) -> io::Result<()> {
        self.transfer(true, offset, mem, segments)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    pub(crate) fn temp_file(name: &str, size: u64) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("aiodma-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        path
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x10_0000), 0x10_0000),
        ])
        .unwrap()
    }

    fn wait(b: &mut dyn Backend, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.len() < n && Instant::now() < deadline {
            b.reap(&mut out);
            std::thread::sleep(Duration::from_millis(1));
        }
        out
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn round_trip(b: &mut dyn Backend, mem: &GuestMemoryMmap, inflight: &AtomicU64) {
        // Aligned (direct path) and unaligned (buffered) transfers, one straddling the two
        // guest memory regions.
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 253) as u8).collect();
        mem.write_slice(&data, GuestAddress(0x1000)).unwrap();
        mem.write_slice(&data[..1000], GuestAddress(0xf_ff00))
            .unwrap();
        let jobs = [
            Job {
                token: 1,
                epoch: 0,
                op: JobOp::Write,
                offset: 4096,
                segments: vec![seg(0x1000, 4096), seg(0x2000, 4096)],
            },
            Job {
                token: 2,
                epoch: 0,
                op: JobOp::Write,
                offset: 100_003,
                segments: vec![seg(0xf_ff00, 1000)],
            },
        ];
        for j in jobs {
            b.submit(j);
        }
        b.kick();
        let done = wait(b, 2);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        b.submit(Job {
            token: 3,
            epoch: 0,
            op: JobOp::Flush,
            offset: 0,
            segments: vec![],
        });
        b.submit(Job {
            token: 4,
            epoch: 0,
            op: JobOp::Read,
            offset: 4096,
            segments: vec![seg(0x8_0000, 8192)],
        });
        b.submit(Job {
            token: 5,
            epoch: 0,
            op: JobOp::Read,
            offset: 100_003,
            segments: vec![seg(0x9_0001, 1000)],
        });
        b.kick();
        let done = wait(b, 3);
        assert_eq!(done.len(), 3);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        let mut back = vec![0u8; 8192];
        mem.read_slice(&mut back, GuestAddress(0x8_0000)).unwrap();
        assert_eq!(back, data);
        let mut back = vec![0u8; 1000];
        mem.read_slice(&mut back, GuestAddress(0x9_0001)).unwrap();
        assert_eq!(back, data[..1000]);
        assert_eq!(inflight.load(Ordering::Acquire), 0);
    }

    #[test]
    fn io_uring_round_trip() {
        let path = temp_file("uring.img", 1 << 20);
        let mem = mem();
        let inflight = Arc::new(AtomicU64::new(0));
        let mut b = open(&path, mem.clone(), 2, inflight.clone()).unwrap();
        assert_eq!(b.capacity(), 1 << 20);
        round_trip(&mut *b, &mem, &inflight);
        drop(b);
        // The data really is in the file.
        let mut f = File::open(&path).unwrap();
        let mut head = vec![0u8; 8192];
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.read_exact(&mut head).unwrap();
        let expect: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 253) as u8).collect();
        assert_eq!(head, expect);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn aligned_transfers_take_the_direct_path() {
        let path = temp_file("direct.img", 1 << 20);
        let (file, size) = open_file(&path).unwrap();
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .ok();
        let has_direct = direct.is_some();
        let mem = mem();
        let inflight = Arc::new(AtomicU64::new(0));
        let mut u = Uring::new(Ok(file), direct, size, mem.clone(), inflight.clone()).unwrap();
        round_trip(&mut u, &mem, &inflight);
        // Jobs 1 and 4 are aligned; 2 and 5 are not.
        if has_direct {
            assert_eq!(u.direct_ops, 2);
        }
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn pool_fallback_round_trip() {
        let path = temp_file("pool.img", 1 << 20);
        let (file, size) = open_file(&path).unwrap();
        let mem = mem();
        let inflight = Arc::new(AtomicU64::new(0));
        let mut b = Pool::new(
            "file",
            FileStore::new(file, size),
            mem.clone(),
            2,
            inflight.clone(),
        )
        .unwrap();
        round_trip(&mut b, &mem, &inflight);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn read_error_and_short_read_report_errors() {
        let path = temp_file("short.img", 1 << 20);
        let mem = mem();
        let inflight = Arc::new(AtomicU64::new(0));
        let mut b = open(&path, mem.clone(), 1, inflight.clone()).unwrap();
        // Someone truncates the file under the device: the read comes up short.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        b.submit(Job {
            token: 9,
            epoch: 0,
            op: JobOp::Read,
            offset: 0,
            segments: vec![seg(0x1000, 8192)],
        });
        b.kick();
        let done = wait(&mut *b, 1);
        assert!(done[0].result.is_err());
        assert_eq!(inflight.load(Ordering::Acquire), 0);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn open_errors_name_the_path() {
        let missing = std::env::temp_dir().join("aiodma-definitely-missing.img");
        let e = open_file(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("backing file '{}': ", missing.display())),
            "{e}"
        );
        let empty = temp_file("empty.img", 0);
        let e = open_file(&empty).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        let dir = std::env::temp_dir();
        let e = open_file(&dir).unwrap_err().to_string();
        assert!(e.contains(&dir.display().to_string()), "{e}");
        let _ = std::fs::remove_file(empty);
    }

    #[test]
    fn backlog_beyond_the_ring_depth() {
        let path = temp_file("backlog.img", 1 << 20);
        let mem = mem();
        let inflight = Arc::new(AtomicU64::new(0));
        let mut b = open(&path, mem.clone(), 1, inflight.clone()).unwrap();
        let n = RING_ENTRIES as u64 * 2 + 5;
        for t in 0..n {
            b.submit(Job {
                token: t,
                epoch: 0,
                op: JobOp::Write,
                offset: (t % 256) * 512,
                segments: vec![seg(0x1000 + (t % 64) * 512, 512)],
            });
        }
        b.kick();
        let done = wait(&mut *b, n as usize);
        assert_eq!(done.len() as u64, n);
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert_eq!(inflight.load(Ordering::Acquire), 0);
        let mut f = File::options().append(true).open(&path).unwrap();
        f.write_all(b"x").unwrap();
        let _ = std::fs::remove_file(path);
    }
}
