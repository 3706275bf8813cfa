//! File backing: io_uring with direct transfers between the file and guest memory.
//!
//! The file is opened once, by path; its `O_DIRECT` twin (when the filesystem allows it) is a
//! reopen of that descriptor through `/proc/self/fd`, so both name the same inode even if the
//! path is replaced in between. A READ/WRITE becomes one `IORING_OP_READV`/`WRITEV` whose
//! iovecs point straight into guest memory (host addresses from vm-memory, per region, so a
//! buffer spanning two memory regions becomes two iovecs); it goes to the `O_DIRECT` descriptor
//! when the offset and every iovec's address and length are multiples of [`ALIGNMENT`], else
//! to the buffered one. FLUSH is `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC` (fdatasync). An
//! eventfd registered with the ring signals completions to the device thread, which reaps them.
//!
//! A job waits, before it gets an entry, in the [`RangeLock`] while it conflicts with an
//! in-flight job (write atomicity, SPEC 10), then in a FIFO while the ring is full. It asks the
//! [`DmaGate`] right before its entry is pushed: jobs still waiting when a reset (or a cleared
//! Bus Master Enable) closes the gate complete with [`JOB_CANCELED`], at once.
//!
//! If io_uring cannot be set up (old kernel, `io_uring_disabled`, seccomp), the same file is
//! served by the worker pool with `pread`/`pwrite` instead ([`FileStore`]).

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use log::{debug, info, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::pool::{Pool, Store};
use super::range::{LockId, RangeLock};
use super::{
    Backend, BackendError, Completion, DmaGate, GateTicket, Job, JobOp, ALIGNMENT, JOB_CANCELED,
};
use crate::request::Segment;

/// Submission queue entries of the ring (more jobs wait in a backlog).
const RING_ENTRIES: u32 = 256;

/// Most iovecs in one READV/WRITEV (Linux's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// `user_data` of the cancellations queued at drop (operation ids count up from 0).
const CANCEL: u64 = u64::MAX;

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

/// A read-write `O_DIRECT` descriptor for the inode `file` refers to. `/proc/self/fd/N` resolves
/// to the open file itself, not to the path it was opened by, so a path swapped since cannot
/// give a different file (and the `O_DIRECT` flag stays off `file`'s own open file
/// description, which `F_SETFL` on a dup would change too).
pub fn reopen_direct(file: &File) -> io::Result<File> {
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let (a, b) = (file.metadata()?, direct.metadata()?);
    if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
        // Only if /proc is not procfs.
        return Err(io::Error::other(
            "the reopened descriptor names another file",
        ));
    }
    Ok(direct)
}

/// Opens the file backing: io_uring if possible, else the worker pool.
pub fn open(
    path: &Path,
    mem: GuestMemoryMmap,
    workers: usize,
    inflight: Arc<AtomicU64>,
    gate: Arc<DmaGate>,
) -> Result<Box<dyn Backend>, BackendError> {
    let (file, capacity) = open_file(path)?;
    let direct = match reopen_direct(&file) {
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
        gate.clone(),
    ) {
        Ok(uring) => Ok(Box::new(uring)),
        Err(e) => {
            warn!(
                "backing file '{}': io_uring unavailable ({e}); using {} worker thread(s) with pread/pwrite",
                path.display(),
                workers.max(1)
            );
            let store = FileStore { file, capacity };
            Ok(Box::new(Pool::new(
                "file", store, mem, workers, inflight, gate,
            )?))
        }
    }
}

/// A job and what it was submitted under.
type Queued = (Job, GateTicket);

fn canceled() -> io::Error {
    io::Error::from_raw_os_error(JOB_CANCELED)
}

/// One READV/WRITEV/FSYNC in the ring.
struct UringOp {
    job: Job,
    ticket: GateTicket,
    /// The job's range in the [`RangeLock`], released at completion.
    lock: Option<LockId>,
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
    gate: Arc<DmaGate>,
    /// The gate's state when the queued jobs were last checked against it.
    gate_seen: (u64, bool, u64),
    /// Jobs waiting for an earlier conflicting one (write atomicity).
    order: RangeLock<Queued>,
    /// Operations with an entry in the ring, by id (the entry's `user_data`).
    ops: HashMap<u64, UringOp>,
    next_op: u64,
    /// Jobs free to start, waiting for room in the ring (not started: the gate is asked when
    /// they leave).
    ready: VecDeque<(Option<LockId>, Queued)>,
    /// Scratch space for the jobs a release lets go.
    released: Vec<(LockId, Queued)>,
    /// Completions of jobs that never reached the ring.
    failed: Vec<Completion>,
    inflight: Arc<AtomicU64>,
    depth: usize,
    /// Transfers started on the O_DIRECT descriptor.
    direct_ops: u64,
    /// A submission left entries in the ring: logged once until one goes through again.
    stalled: bool,
    /// Set by `Drop`: nothing starts any more.
    closing: bool,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("capacity", &self.capacity)
            .field("direct", &self.direct.is_some())
            .field("in_ring", &self.ops.len())
            .field("ready", &self.ready.len())
            .field("held", &self.order.held())
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
        gate: Arc<DmaGate>,
    ) -> io::Result<Uring> {
        Self::with_entries(file, direct, capacity, mem, inflight, gate, RING_ENTRIES)
    }

    fn with_entries(
        file: io::Result<File>,
        direct: Option<File>,
        capacity: u64,
        mem: GuestMemoryMmap,
        inflight: Arc<AtomicU64>,
        gate: Arc<DmaGate>,
        entries: u32,
    ) -> io::Result<Uring> {
        let file = file?;
        let ring = IoUring::new(entries)?;
        let notifier = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(notifier.as_raw_fd())?;
        // At most this many operations are in the ring at once, so the completion queue (twice
        // as large) never overflows.
        let depth = ring.params().sq_entries() as usize;
        let gate_seen = gate.state();
        Ok(Uring {
            ring,
            file,
            direct,
            capacity,
            notifier,
            mem,
            gate,
            gate_seen,
            order: RangeLock::new(),
            ops: HashMap::new(),
            next_op: 0,
            ready: VecDeque::new(),
            released: Vec::new(),
            failed: Vec::new(),
            inflight,
            depth,
            direct_ops: 0,
            stalled: false,
            closing: false,
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

    /// Releases a finished job's range; the jobs that waited for it join the ready queue.
    fn release(&mut self, lock: Option<LockId>) {
        let Some(id) = lock else {
            return;
        };
        self.order.release(id, &mut self.released);
        self.ready.extend(
            self.released
                .drain(..)
                .map(|(id, queued)| (Some(id), queued)),
        );
    }

    /// Completes a job that never got an entry: it did not and will not touch guest memory.
    fn finish_unstarted(&mut self, lock: Option<LockId>, token: u64, result: io::Result<()>) {
        self.inflight.fetch_sub(1, Ordering::Release);
        self.failed.push(Completion { token, result });
        self.release(lock);
    }

    /// Checks every queued job against the gate, refusing those it no longer allows (and
    /// those their release lets go, in turn).
    fn refuse_queued(&mut self) {
        let mut queue = std::mem::take(&mut self.ready);
        let mut kept = VecDeque::with_capacity(queue.len());
        while let Some((lock, (job, ticket))) = queue.pop_front() {
            if !self.closing && self.gate.admits(ticket) {
                kept.push_back((lock, (job, ticket)));
                continue;
            }
            self.finish_unstarted(lock, job.token, Err(canceled()));
            queue.append(&mut self.ready);
        }
        self.ready = kept;
    }

    /// Moves ready jobs into the ring while it has room. When the gate changed since the last
    /// call, first refuses every queued job it no longer allows, so that they stop counting as
    /// in flight without waiting for room in the ring.
    fn pump(&mut self) {
        let gate = self.gate.state();
        if gate != self.gate_seen {
            self.gate_seen = gate;
            self.refuse_queued();
        }
        // The submission queue only fills up if something else is in it (a partial submission
        // never leaves more than `ops` entries): stop rather than spin on a failing push.
        while self.ops.len() < self.depth && !self.ring.submission().is_full() {
            let Some((lock, queued)) = self.ready.pop_front() else {
                break;
            };
            self.start(lock, queued);
        }
    }

    /// Gives `job` an entry in the ring (the ring has room), or completes it at once when the
    /// gate refuses it or its buffers cannot be described.
    fn start(&mut self, lock: Option<LockId>, (job, ticket): Queued) {
        // Right before the entry is pushed: from then on the kernel may access guest memory.
        if self.closing || !self.gate.admits(ticket) {
            self.finish_unstarted(lock, job.token, Err(canceled()));
            return;
        }
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
                    (iov, expected, aligned && self.direct.is_some())
                }
                Err(e) => {
                    self.finish_unstarted(lock, job.token, Err(e));
                    return;
                }
            },
        };
        let fd = match (&self.direct, direct) {
            (Some(d), true) => d.as_raw_fd(),
            _ => self.file.as_raw_fd(),
        };
        let id = self.next_op;
        self.next_op += 1;
        let op = UringOp {
            job,
            ticket,
            lock,
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
        .user_data(id);
        // The iovec array lives on the heap inside `op`, which stays in `self.ops` (moving the
        // `Vec` does not move its buffer) until the completion for `id` is reaped.
        self.ops.insert(id, op);
        // SAFETY: the entry references (1) the iovec array owned by `self.ops[id]`, kept until
        // this entry's completion is reaped (`Drop` waits for every completion, or leaks the
        // arrays); (2) guest memory through those iovecs: host addresses of `self.mem`'s
        // mappings, bounds-checked by `get_slices`, which stay mapped while `self.mem` (a clone
        // sharing the mappings) is alive, and `Drop` waits for every completion before
        // `self.mem` goes (or leaks it); (3) `fd`, owned by `self.file` or `self.direct`: the
        // kernel takes its own reference to the file when it picks the entry up.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // Not expected: the ring never holds more than `depth` operations.
            if let Some(op) = self.ops.remove(&id) {
                self.ready.push_front((op.lock, (op.job, op.ticket)));
            }
            return;
        }
        if direct {
            self.direct_ops += 1;
        }
    }

    fn on_cqe(&mut self, id: u64, res: i32, out: &mut Vec<Completion>) {
        if id == CANCEL {
            return;
        }
        let Some(op) = self.ops.remove(&id) else {
            warn!("io_uring: completion for unknown operation {id}");
            return;
        };
        if res < 0 && op.direct && -res == libc::EINVAL && !self.closing {
            // The filesystem refused this O_DIRECT transfer (before touching any memory): stop
            // using the direct path altogether and start the job again, buffered, first in line
            // (it keeps its range).
            info!("io_uring: O_DIRECT transfer refused (EINVAL); falling back to buffered I/O");
            self.direct = None;
            self.ready.push_front((op.lock, (op.job, op.ticket)));
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
            debug!(
                "io_uring job {} ({:?}) failed: {e}",
                op.job.token, op.job.op
            );
        }
        self.inflight.fetch_sub(1, Ordering::Release);
        out.push(Completion {
            token: op.job.token,
            result,
        });
        self.release(op.lock);
    }

    fn drain_cq(&mut self, out: &mut Vec<Completion>) -> usize {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for &(id, res) in &cqes {
            self.on_cqe(id, res, out);
        }
        cqes.len()
    }

    /// Hands the entries in the submission queue to the kernel. The kernel may take only some
    /// of them (it stops at an entry it cannot set up, or when short of memory: EAGAIN; EBUSY
    /// while completions are backed up): the rest stay queued and go with the next call. That
    /// call follows a completion of an operation the kernel holds; when it holds none, the
    /// notifier brings the device thread back.
    fn submit_ring(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        let result = self.ring.submit();
        let left = self.ring.submission().len();
        if left == 0 {
            self.stalled = false;
            return;
        }
        let busy = match &result {
            Ok(_) => false,
            Err(e) => matches!(
                e.raw_os_error(),
                Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::EINTR)
            ),
        };
        if !self.stalled {
            self.stalled = true;
            match &result {
                Ok(n) => debug!("io_uring: the kernel took {n} entries, {left} left for later"),
                Err(e) => warn!("io_uring submit failed ({e}); {left} entries left for later"),
            }
        }
        let in_kernel = self.ops.len().saturating_sub(left);
        if in_kernel == 0 || busy {
            if let Err(e) = self.notifier.write(1) {
                warn!("io_uring: cannot schedule a retry: {e}");
            }
        }
    }
}

impl Backend for Uring {
    fn flip_stored_bits(&mut self, offset: u64, bits: &[u64]) -> io::Result<()> {
        super::flip_file_bits(&self.file, offset, bits)
    }

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
        let ticket = self.gate.ticket(job.epoch);
        match job.op {
            JobOp::Read | JobOp::Write => {
                let (offset, len, write) = (job.offset, job.len(), job.op == JobOp::Write);
                if let Some((id, queued)) = self.order.acquire(offset, len, write, (job, ticket)) {
                    self.ready.push_back((Some(id), queued));
                }
            }
            JobOp::Flush => self.ready.push_back((None, (job, ticket))),
        }
        self.pump();
    }

    fn kick(&mut self) {
        self.pump();
        self.submit_ring();
        if !self.failed.is_empty() {
            // Completed outside `reap` (refused by the gate): bring the device thread back.
            let _ = self.notifier.write(1);
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let _ = self.notifier.read();
        while self.drain_cq(out) > 0 {}
        self.pump();
        out.append(&mut self.failed);
        self.submit_ring();
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Jobs that never got an entry will not start.
        self.closing = true;
        let unstarted = self.ready.len() + self.order.take_held().len();
        self.ready.clear();
        self.inflight.fetch_sub(unstarted as u64, Ordering::Release);
        // The iovec arrays and guest memory must outlive every entry the kernel may still act
        // on: ask it to cancel them all (a transfer already running finishes), then wait for
        // each completion, however long that takes.
        let mut cancel: Vec<u64> = self.ops.keys().copied().collect();
        let mut sink = Vec::new();
        while !self.ops.is_empty() {
            while let Some(&id) = cancel.last() {
                let entry = opcode::AsyncCancel::new(id).build().user_data(CANCEL);
                // SAFETY: a cancellation carries only the target's user_data, no pointers.
                if unsafe { self.ring.submission().push(&entry) }.is_err() {
                    break;
                }
                cancel.pop();
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => {
                    // Whether the kernel is done with them is unknown: never free them.
                    warn!(
                        "io_uring: cannot wait for {} in-flight operation(s) at shutdown ({e}); leaking their buffers",
                        self.ops.len()
                    );
                    std::mem::forget(std::mem::take(&mut self.ops));
                    std::mem::forget(std::mem::take(&mut self.mem));
                    return;
                }
            }
            self.drain_cq(&mut sink);
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

    fn flip_bits(&self, offset: u64, bits: &[u64]) -> io::Result<()> {
        super::flip_file_bits(&self.file, offset, bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::testing;
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

    fn gate() -> Arc<DmaGate> {
        Arc::new(DmaGate::default())
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
        let mut b = open(&path, mem.clone(), 2, inflight.clone(), gate()).unwrap();
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
        let direct = reopen_direct(&file).ok();
        let has_direct = direct.is_some();
        let mem = mem();
        let inflight = Arc::new(AtomicU64::new(0));
        let mut u = Uring::new(
            Ok(file),
            direct,
            size,
            mem.clone(),
            inflight.clone(),
            gate(),
        )
        .unwrap();
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
            gate(),
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
        let mut b = open(&path, mem.clone(), 1, inflight.clone(), gate()).unwrap();
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

    fn small_uring(
        path: &Path,
        entries: u32,
        mem: &GuestMemoryMmap,
    ) -> (Uring, Arc<AtomicU64>, Arc<DmaGate>) {
        let (file, size) = open_file(path).unwrap();
        let direct = reopen_direct(&file).ok();
        let inflight = Arc::new(AtomicU64::new(0));
        let gate = gate();
        let u = Uring::with_entries(
            Ok(file),
            direct,
            size,
            mem.clone(),
            inflight.clone(),
            gate.clone(),
            entries,
        )
        .unwrap();
        (u, inflight, gate)
    }

    fn is_canceled(c: &Completion) -> bool {
        matches!(&c.result, Err(e) if e.raw_os_error() == Some(JOB_CANCELED))
    }

    /// 4 entries in the ring, 196 reads waiting for room and 2 jobs held behind a conflict with
    /// the first; then `stop` closes the gate. The device thread's next kick refuses the 196
    /// at once (they stop counting as in flight before any completion), the held ones are
    /// refused when the conflict ends, and no refused job touches guest memory or the file.
    fn queued_jobs_are_refused(name: &str, stop: impl FnOnce(&DmaGate)) {
        let path = temp_file(name, 4 << 20);
        let mem = mem();
        mem.write_slice(&vec![0xaa; 0x20_0000], GuestAddress(0))
            .unwrap();
        let (mut u, inflight, gate) = small_uring(&path, 4, &mem);
        let n = 200u64;
        for t in 0..n {
            u.submit(Job {
                token: t,
                epoch: 0,
                op: JobOp::Read,
                offset: t * 4096,
                segments: vec![seg(t * 4096, 4096)],
            });
        }
        // Held behind read 0, then behind this write.
        u.submit(Job {
            token: n,
            epoch: 0,
            op: JobOp::Write,
            offset: 0,
            segments: vec![seg(0x10_0000, 4096)],
        });
        u.submit(Job {
            token: n + 1,
            epoch: 0,
            op: JobOp::Read,
            offset: 0,
            segments: vec![seg(0x18_0000, 4096)],
        });
        assert_eq!((u.ops.len(), u.ready.len(), u.order.held()), (4, 196, 2));
        stop(&gate);
        u.kick();
        assert_eq!(inflight.load(Ordering::Acquire), 4 + 2);
        let done = wait(&mut u, n as usize + 2);
        assert_eq!(done.len() as u64, n + 2);
        for c in &done {
            if c.token < 4 {
                assert!(c.result.is_ok(), "{c:?}");
            } else {
                assert!(is_canceled(c), "{c:?}");
            }
        }
        assert_eq!(inflight.load(Ordering::Acquire), 0);
        let mut buf = vec![0u8; 0x20_0000];
        mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert!(buf[..4 * 4096].iter().all(|&b| b == 0));
        assert!(buf[4 * 4096..].iter().all(|&b| b == 0xaa));
        let mut head = vec![0xffu8; 4096];
        File::open(&path).unwrap().read_exact(&mut head).unwrap();
        assert!(
            head.iter().all(|&b| b == 0),
            "the refused write reached the file"
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn io_uring_reset_refuses_the_backlog() {
        queued_jobs_are_refused("refuse-reset.img", |gate| gate.set_epoch(1));
    }

    #[test]
    fn io_uring_bus_master_off_refuses_the_backlog() {
        queued_jobs_are_refused("refuse-bme.img", |gate| gate.set_bus_master(false));
    }

    #[test]
    fn io_uring_bus_master_toggled_refuses_the_backlog() {
        queued_jobs_are_refused("refuse-toggle.img", |gate| {
            gate.set_bus_master(false);
            gate.set_bus_master(true);
        });
    }

    #[test]
    fn a_partial_submission_is_finished_later() {
        let path = temp_file("partial.img", 1 << 20);
        let mem = mem();
        let (mut u, inflight, _) = small_uring(&path, 8, &mem);
        // An entry the kernel cannot set up (BUFFER_SELECT on an fsync) ahead of the jobs: the
        // kernel consumes it, completes it with an error and stops there.
        let bad = opcode::Fsync::new(types::Fd(u.file.as_raw_fd()))
            .build()
            .flags(io_uring::squeue::Flags::BUFFER_SELECT)
            .user_data(CANCEL);
        // SAFETY: the entry references no memory, and the descriptor outlives the ring.
        unsafe { u.ring.submission().push(&bad) }.unwrap();
        for t in 0..4u64 {
            u.submit(Job {
                token: t,
                epoch: 0,
                op: JobOp::Read,
                offset: t * 4096,
                segments: vec![seg(t * 4096, 4096)],
            });
        }
        u.kick();
        assert_eq!(
            u.ring.submission().len(),
            4,
            "the kernel should have stopped at the bad entry"
        );
        // `wait` only reaps, as the device thread does on a completion.
        let done = wait(&mut u, 4);
        assert_eq!(
            done.len(),
            4,
            "entries left in the ring were never submitted"
        );
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        assert_eq!(inflight.load(Ordering::Acquire), 0);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn the_direct_twin_is_the_opened_file_even_if_the_path_is_swapped() {
        let path = temp_file("inode.img", 1 << 20);
        let (file, _) = open_file(&path).unwrap();
        // The path is replaced after the open.
        let other = temp_file("inode-other.img", 1 << 20);
        std::fs::rename(&other, &path).unwrap();
        let direct = match reopen_direct(&file) {
            Ok(d) => d,
            Err(e) => {
                // A filesystem without O_DIRECT: nothing to compare.
                eprintln!("no O_DIRECT in {}: {e}", path.display());
                return;
            }
        };
        let (a, b) = (file.metadata().unwrap(), direct.metadata().unwrap());
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), a.ino());
        // O_DIRECT is set on the twin only, not on the buffered descriptor's description.
        // SAFETY: F_GETFL on descriptors owned by `file` and `direct`; no memory involved.
        let (fa, fb) = unsafe {
            (
                libc::fcntl(file.as_raw_fd(), libc::F_GETFL),
                libc::fcntl(direct.as_raw_fd(), libc::F_GETFL),
            )
        };
        assert_eq!(fa & libc::O_DIRECT, 0);
        assert_ne!(fb & libc::O_DIRECT, 0);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn drop_waits_for_every_entry() {
        let path = temp_file("drop.img", 8 << 20);
        let mem = mem();
        let (mut u, inflight, _) = small_uring(&path, 16, &mem);
        let write = |t: u64| Job {
            token: t,
            epoch: 0,
            op: JobOp::Write,
            offset: (t % 24) * 0x1_0000,
            segments: vec![seg(0, 0x1_0000)],
        };
        // Submitted to the kernel, pushed but not submitted, waiting for room, held behind a
        // conflict.
        for t in 0..8 {
            u.submit(write(t));
        }
        u.kick();
        for t in 8..48 {
            u.submit(write(t));
        }
        assert!(!u.ring.submission().is_empty());
        assert!(!u.ready.is_empty());
        assert!(u.order.held() > 0);
        drop(u);
        // Every entry completed (each decrements the count when its completion is seen).
        assert_eq!(inflight.load(Ordering::Acquire), 0);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn io_uring_overlapping_writes_never_tear_a_block() {
        let path = temp_file("atomic-uring.img", 4 << 20);
        let mem = testing::atomicity_memory();
        let inflight = Arc::new(AtomicU64::new(0));
        let mut b = open(&path, mem.clone(), 2, inflight.clone(), gate()).unwrap();
        assert_eq!(b.name(), "file (io_uring)");
        testing::overlapping_writes_never_tear(&mut *b, &mem, 0x5eed_0002);
        assert_eq!(inflight.load(Ordering::Acquire), 0);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn pool_file_overlapping_writes_never_tear_a_block() {
        let path = temp_file("atomic-pool.img", 4 << 20);
        let (file, size) = open_file(&path).unwrap();
        let mem = testing::atomicity_memory();
        let inflight = Arc::new(AtomicU64::new(0));
        let store = FileStore::new(file, size);
        let mut b = Pool::new("file", store, mem.clone(), 4, inflight.clone(), gate()).unwrap();
        testing::overlapping_writes_never_tear(&mut b, &mem, 0x5eed_0003);
        assert_eq!(inflight.load(Ordering::Acquire), 0);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn backlog_beyond_the_ring_depth() {
        let path = temp_file("backlog.img", 1 << 20);
        let mem = mem();
        let inflight = Arc::new(AtomicU64::new(0));
        let mut b = open(&path, mem.clone(), 1, inflight.clone(), gate()).unwrap();
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
