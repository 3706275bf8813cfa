//! The device thread: an event-manager loop over the doorbells, the control eventfd, the
//! backend's completion eventfd and a timerfd for delayed completions.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{debug, error, info, warn};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::queue::{BrokenQueue, Done, QueueProblem, UsedLie, VQueue};
use super::{Command, DeviceError, DeviceOptions, Shared};
use crate::abi;
use crate::backend::{self, Backend, Completion, Job, JobOp};
use crate::engine::{InterruptSink, QueueConfig};
use crate::fault::log::FaultLog;
use crate::fault::{corrupt_positions, Decision, FaultInjector, RequestFacts};
use crate::request::{Limits, Op, Parsed, Request, Segment, ID_LEN};

/// Event data of the control eventfd (doorbells use their queue index).
const CONTROL: u32 = 0x1_0000;
/// Event data of the backend completion eventfd.
const COMPLETION: u32 = 0x1_0001;
/// Event data of the delay timer.
const TIMER: u32 = 0x1_0002;
/// Event data of the resume eventfd (queues left with work after a pass).
const RESUME: u32 = 0x1_0003;

/// What the device thread needs, handed over at spawn.
pub(crate) struct Setup {
    pub options: DeviceOptions,
    pub mem: GuestMemoryMmap,
    pub shared: Arc<Shared>,
    pub doorbells: Vec<Arc<EventFd>>,
    pub control: Arc<EventFd>,
    pub commands: Receiver<Command>,
    pub ready: SyncSender<Result<BackendInfo, DeviceError>>,
}

/// What the device thread reports once the backend is open.
#[derive(Debug)]
pub(crate) struct BackendInfo {
    pub capacity: u64,
    pub name: &'static str,
}

/// Thread body.
pub(crate) fn run(setup: Setup) {
    let Setup {
        options,
        mem,
        shared,
        doorbells,
        control,
        commands,
        ready,
    } = setup;
    let backend = match backend::open(
        &options.backing,
        mem.clone(),
        options.workers,
        shared.backend_inflight.clone(),
        shared.gate.clone(),
    ) {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    let timer = match nonblocking_timer() {
        Ok(t) => t,
        Err(e) => {
            let _ = ready.send(Err(DeviceError::Start(format!("timerfd: {e}"))));
            return;
        }
    };
    let resume = match EventFd::new(EFD_NONBLOCK) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = ready.send(Err(DeviceError::Start(format!("resume eventfd: {e}"))));
            return;
        }
    };
    let mut manager = match EventManager::<DeviceLoop>::new() {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(DeviceError::Start(format!("event manager: {e}"))));
            return;
        }
    };
    let info = BackendInfo {
        capacity: backend.capacity(),
        name: backend.name(),
    };
    let fault_log = match &options.fault_log {
        Some(path) => match FaultLog::create(path) {
            Ok(log) => Some(log),
            Err(e) => {
                let _ = ready.send(Err(DeviceError::Start(format!(
                    "fault log '{}': {e}",
                    path.display()
                ))));
                return;
            }
        },
        None => None,
    };
    let mut id = [0u8; ID_LEN as usize];
    for (d, s) in id.iter_mut().zip(options.backing.id_string().bytes()) {
        *d = s;
    }
    let limits = Limits {
        capacity: info.capacity,
        max_segments: options.max_segments(),
        max_transfer: super::MAX_TRANSFER,
        features: 0,
    };
    let device = DeviceLoop {
        shared: shared.clone(),
        mem,
        doorbells,
        control,
        resume,
        commands,
        backend,
        timer,
        timer_deadline: None,
        faults: match &options.fault_replay {
            Some(schedule) => FaultInjector::replay(schedule),
            None => FaultInjector::new(options.faults.clone(), options.fault_seed),
        },
        fault_log,
        limits,
        queue_size_max: options.queue_size_max,
        id,
        epoch: 0,
        active: false,
        broken: false,
        hung: false,
        paused: false,
        sink: None,
        queues: Vec::new(),
        runnable: VecDeque::new(),
        scheduled: vec![false; usize::from(options.queues)],
        pending: HashMap::new(),
        corrupting: HashMap::new(),
        summed: HashMap::new(),
        crc_scratch: Vec::new(),
        delayed: BinaryHeap::new(),
        next_token: 1,
        inflight: 0,
        reaped: Vec::new(),
        backend_errors: 0,
        init_error: None,
    };
    let id = manager.add_subscriber(device);
    let init_error = manager
        .subscriber_mut(id)
        .ok()
        .and_then(|d| d.init_error.take());
    if let Some(e) = init_error {
        let _ = ready.send(Err(DeviceError::Start(e)));
        return;
    }
    // Set up (backend open, io_uring, timer, epoll): only the event loop's needs remain.
    super::thread_started(super::ThreadRole::Device);
    if ready.send(Ok(info)).is_err() {
        return;
    }
    while !shared.shutdown.load(Ordering::Acquire) {
        if let Err(e) = manager.run() {
            error!("aiodma device thread: event loop failed: {e}");
            break;
        }
    }
    // Dropping the manager drops the backend, which waits for its in-flight operations.
}

/// CPU time the calling thread has used: the device's own work, whatever else the host runs.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let timer = TimerFd::new()?;
    let fd = timer.as_raw_fd();
    // SAFETY: `fd` is the timerfd just created and owned by `timer`; F_GETFL/F_SETFL only
    // change its file status flags and touch no memory.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if ok {
        Ok(timer)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Requests one queue may take per pass before the other queues get a turn. A pass reads at
/// most this many chains of at most `max_segments + 2` descriptors each, so a doorbell costs a
/// bounded amount of device time however the guest builds its rings.
pub(crate) const REQUESTS_PER_PASS: usize = 32;

/// One request from the moment it is popped until it is published: the device thread's only
/// record of it (pending in the backend, held by a delay fault, or finished).
#[derive(Debug, Clone, Copy)]
struct InFlight {
    queue: u16,
    head: u16,
    /// `None` for a request rejected before it had a valid op.
    op: Option<Op>,
    /// Where the status byte goes; `None` when the chain has no usable status descriptor.
    status_addr: Option<GuestAddress>,
    /// Data bytes the request asked for.
    length: u32,
    popped: Instant,
    /// A delay fault holds the completion until then.
    not_before: Option<Instant>,
    /// The outcome, once known.
    status: u8,
    /// Data bytes written to the guest (READ, GET_ID).
    written: u32,
    /// How a fault makes the device misreport the completion.
    lie: UsedLie,
    /// With INTEGRITY negotiated: the CRC32C of the data as in the store.
    crc: Option<u32>,
}

/// Bits a `corrupt` fault flips once the backend has moved the data (positions count from the
/// start of the request's data).
#[derive(Debug)]
enum Corruption {
    /// A READ: in the guest's buffers.
    Guest(Vec<Segment>, Vec<u64>),
    /// A WRITE: in the store, from this offset.
    Stored(u64, Vec<u64>),
}

/// CRC32C of the data in guest memory at `segments`, with the bits at `flips` flipped (what a
/// corrupted WRITE left in the store). `buf` is scratch space, kept by the caller so that a
/// checksum does not allocate.
fn data_crc(mem: &GuestMemoryMmap, segments: &[Segment], flips: &[u64], buf: &mut Vec<u8>) -> u32 {
    let mut crc = 0u32;
    buf.resize(64 << 10, 0);
    let mut pos = 0u64;
    for seg in segments {
        let mut done = 0u32;
        while done < seg.len {
            let n = (seg.len - done).min(buf.len() as u32) as usize;
            let chunk = &mut buf[..n];
            let read = seg
                .addr
                .checked_add(u64::from(done))
                .map(|a| mem.read_slice(chunk, a));
            if !matches!(read, Some(Ok(()))) {
                // Checked to be in RAM when parsed; a failure here cannot match any CRC.
                return !crc;
            }
            for &bit in flips {
                if (pos..pos + n as u64).contains(&(bit / 8)) {
                    chunk[(bit / 8 - pos) as usize] ^= 1 << (bit % 8);
                }
            }
            crc = crc32c::crc32c_append(crc, chunk);
            pos += n as u64;
            done += n as u32;
        }
    }
    crc
}

/// `req` with its data cut to the first `len` bytes.
fn truncated(mut req: Request, len: u32) -> Request {
    let mut left = len;
    req.segments.retain_mut(|seg| {
        if left == 0 {
            return false;
        }
        seg.len = seg.len.min(left);
        left -= seg.len;
        true
    });
    req.length = len;
    req
}

/// The guest address of data byte `index` of a request with `segments`.
fn data_address(segments: &[Segment], mut index: u64) -> Option<GuestAddress> {
    for seg in segments {
        if index < u64::from(seg.len) {
            return seg.addr.checked_add(index);
        }
        index -= u64::from(seg.len);
    }
    None
}

impl InFlight {
    fn finished(mut self, status: u8, written: u32) -> Self {
        self.status = status;
        self.written = written;
        self
    }

    /// Data bytes moved, for the metrics.
    fn bytes(&self) -> u64 {
        match self.op {
            Some(Op::Read | Op::Write) => u64::from(self.length),
            Some(Op::GetId) => u64::from(self.written),
            Some(Op::Flush) | None => 0,
        }
    }
}

/// A completion a delay fault holds, ordered by its release time (then by arrival, so equal
/// deadlines keep their order).
#[derive(Debug)]
struct Delayed {
    at: Instant,
    seq: u64,
    req: InFlight,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct DeviceLoop {
    shared: Arc<Shared>,
    mem: GuestMemoryMmap,
    doorbells: Vec<Arc<EventFd>>,
    control: Arc<EventFd>,
    /// Written when queues still have work after a pass: the loop comes back to them after
    /// serving whatever else is ready.
    resume: EventFd,
    commands: Receiver<Command>,
    backend: Box<dyn Backend>,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    faults: FaultInjector,
    /// `--fault-log`.
    fault_log: Option<FaultLog>,
    limits: Limits,
    queue_size_max: u16,
    id: [u8; ID_LEN as usize],
    /// The epoch this thread works for.
    epoch: u64,
    active: bool,
    /// NEEDS_RESET: nothing is processed or published until reset.
    broken: bool,
    /// A hang fault fired: nothing is processed or published until reset.
    hung: bool,
    /// Paused through the control API: nothing is taken or published until resumed.
    paused: bool,
    sink: Option<Arc<dyn InterruptSink>>,
    queues: Vec<Option<VQueue>>,
    /// Queues with work left, served round-robin.
    runnable: VecDeque<u16>,
    /// Whether a queue is in `runnable`.
    scheduled: Vec<bool>,
    pending: HashMap<u64, InFlight>,
    /// Corruptions to apply when the request with this token completes.
    corrupting: HashMap<u64, Corruption>,
    /// With INTEGRITY: the data buffers of READs and WRITEs in the backend, for their CRC.
    summed: HashMap<u64, Vec<Segment>>,
    /// Scratch space for computing those CRCs.
    crc_scratch: Vec<u8>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    next_token: u64,
    /// Requests taken from the queues and not yet published.
    inflight: u64,
    reaped: Vec<Completion>,
    /// Backend failures so far (the first few are logged as warnings).
    backend_errors: u64,
    init_error: Option<String>,
}

impl MutEventSubscriber for DeviceLoop {
    fn init(&mut self, ops: &mut EventOps) {
        let mut errors = Vec::new();
        for (q, fd) in self.doorbells.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(&**fd, q as u32, EventSet::IN)) {
                errors.push(format!("doorbell {q}: {e}"));
            }
        }
        let others = [
            (self.control.as_raw_fd(), CONTROL, "control"),
            (
                self.backend.notifier().as_raw_fd(),
                COMPLETION,
                "completion",
            ),
            (self.timer.as_raw_fd(), TIMER, "timer"),
            (self.resume.as_raw_fd(), RESUME, "resume"),
        ];
        for (fd, data, what) in others {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                errors.push(format!("{what}: {e}"));
            }
        }
        if !errors.is_empty() {
            self.init_error = Some(format!("cannot register events: {}", errors.join(", ")));
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            CONTROL => self.on_control(),
            COMPLETION => self.on_completions(),
            TIMER => self.on_timer(),
            RESUME => {
                let _ = self.resume.read();
                self.run_queues();
            }
            q => self.on_doorbell(q),
        }
        self.flush();
    }
}

impl DeviceLoop {
    fn now_epoch(&self) -> u64 {
        self.shared.gate.epoch()
    }

    fn on_control(&mut self) {
        let _ = self.control.read();
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Activate {
                    epoch,
                    features,
                    queues,
                    sink,
                } => self.activate(epoch, features, queues, sink),
                Command::Reset { epoch } => self.reset(epoch),
                Command::BusMasterOn => {
                    // Doorbells rung while DMA was off were drained without processing.
                    self.schedule_all();
                    self.run_queues();
                }
                Command::SetFaults(rules) => {
                    info!("aiodma device: {} fault rule(s) now", rules.len());
                    self.faults.set_rules(rules);
                }
                Command::InjectReset => {
                    if self.active {
                        self.shared.metrics.fault(&Decision::Reset);
                        self.needs_reset(0, &BrokenQueue::Injected);
                    }
                }
                Command::InjectHang => {
                    if self.active && !self.hung {
                        self.shared.metrics.fault(&Decision::Hang);
                        warn!("aiodma device: hang injected: every queue stops until reset");
                        self.hung = true;
                    }
                }
                Command::Pause(paused) => {
                    self.paused = paused;
                    if !paused {
                        self.schedule_all();
                        self.run_queues();
                    }
                }
                Command::CloseFaultLog(done) => {
                    // Dropping the log writes its summary line.
                    self.fault_log = None;
                    let _ = done.send(());
                }
                Command::Shutdown => self.shared.shutdown.store(true, Ordering::Release),
            }
        }
    }

    fn activate(
        &mut self,
        epoch: u64,
        features: u64,
        configs: Vec<(u16, QueueConfig)>,
        sink: Arc<dyn InterruptSink>,
    ) {
        if epoch != self.epoch {
            warn!(
                "aiodma device: ignoring an activation for epoch {epoch} (now {})",
                self.epoch
            );
            return;
        }
        self.limits.features = features;
        self.sink = Some(sink);
        self.queues = (0..self.doorbells.len()).map(|_| None).collect();
        self.active = true;
        let event_idx = features & abi::feature::RING_EVENT_IDX != 0;
        for (index, cfg) in configs {
            match VQueue::new(&cfg, self.queue_size_max, event_idx, &self.mem) {
                Ok(q) => {
                    if let Some(slot) = self.queues.get_mut(usize::from(index)) {
                        *slot = Some(q);
                    }
                }
                Err(QueueProblem::Config(reason)) | Err(QueueProblem::OutsideRam(reason)) => {
                    self.needs_reset(index, &BrokenQueue::Ring(reason));
                    return;
                }
            }
        }
        debug!(
            "aiodma device: active, features {features:#x}, {} queue(s)",
            self.queues.iter().flatten().count()
        );
        // Doorbells rung before DRIVER_OK were drained without processing: look at every queue.
        self.schedule_all();
        self.run_queues();
    }

    fn reset(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.active = false;
        self.broken = false;
        self.hung = false;
        self.sink = None;
        self.queues.clear();
        self.runnable.clear();
        self.scheduled.fill(false);
        self.pending.clear();
        self.corrupting.clear();
        self.summed.clear();
        self.delayed.clear();
        self.timer_deadline = None;
        let _ = self.timer.clear();
        self.faults.reset();
        self.limits.features = 0;
        self.inflight = 0;
        // From now on completions of pre-reset requests find no `pending` entry and are dropped.
        self.shared.acked.store(epoch, Ordering::Release);
        debug!("aiodma device: reset to epoch {epoch}");
    }

    fn on_doorbell(&mut self, q: u32) {
        let Some(fd) = self.doorbells.get(q as usize) else {
            return;
        };
        let _ = fd.read();
        self.shared.metrics.doorbell();
        self.schedule(q as u16);
        self.run_queues();
    }

    fn can_process(&self) -> bool {
        self.active
            && !self.broken
            && !self.hung
            && !self.paused
            && self.now_epoch() == self.epoch
            && self.shared.gate.bus_master()
    }

    fn schedule(&mut self, qi: u16) {
        if let Some(s) = self.scheduled.get_mut(usize::from(qi)) {
            if !*s {
                *s = true;
                self.runnable.push_back(qi);
            }
        }
    }

    fn schedule_all(&mut self) {
        for qi in 0..self.queues.len() {
            self.schedule(qi as u16);
        }
    }

    /// One pass over the queues with work, each taking at most [`REQUESTS_PER_PASS`]
    /// requests. Queues left with work go to the back of the line, and the resume eventfd brings
    /// the loop back to them after it has served the other events (completions, other
    /// doorbells, control) that are ready.
    fn run_queues(&mut self) {
        for _ in 0..self.runnable.len() {
            let Some(qi) = self.runnable.pop_front() else {
                break;
            };
            if let Some(s) = self.scheduled.get_mut(usize::from(qi)) {
                *s = false;
            }
            if self.process_queue(qi) {
                self.schedule(qi);
            }
        }
        if !self.runnable.is_empty() {
            if let Err(e) = self.resume.write(1) {
                error!("aiodma device: cannot schedule the next pass: {e}");
            }
        }
    }

    /// Takes up to [`REQUESTS_PER_PASS`] requests off queue `qi`, validates and starts them.
    /// Returns whether the queue may have more.
    fn process_queue(&mut self, qi: u16) -> bool {
        let started = thread_cpu_time();
        let reads_before = self.descriptors_read(qi);
        let more = self.take_requests(qi);
        let reads = self.descriptors_read(qi).saturating_sub(reads_before);
        self.shared
            .metrics
            .pass(reads, thread_cpu_time().saturating_sub(started));
        more
    }

    fn descriptors_read(&self, qi: u16) -> u64 {
        match self.queues.get(usize::from(qi)) {
            Some(Some(q)) => q.descriptors_read(),
            _ => 0,
        }
    }

    fn take_requests(&mut self, qi: u16) -> bool {
        for _ in 0..REQUESTS_PER_PASS {
            if !self.can_process() {
                return false;
            }
            let popped = match self.queues.get_mut(usize::from(qi)) {
                Some(Some(q)) => q.pop(&self.mem, &self.limits),
                _ => return false,
            };
            match popped {
                Ok(Some(parsed)) => {
                    self.inflight += 1;
                    self.shared.metrics.inflight(self.inflight);
                    self.accept(qi, parsed);
                }
                Ok(None) => return false,
                Err(e) => {
                    self.needs_reset(qi, &e);
                    return false;
                }
            }
        }
        true
    }

    fn accept(&mut self, qi: u16, parsed: Parsed) {
        let now = Instant::now();
        let req = match parsed {
            Parsed::Rejected(r) => {
                debug!("queue {qi} head {}: {}", r.head, r.reason);
                let rejected = InFlight {
                    queue: qi,
                    head: r.head,
                    op: None,
                    status_addr: r.status_addr,
                    length: 0,
                    popped: now,
                    not_before: None,
                    status: r.reason.status(),
                    written: 0,
                    lie: UsedLie::None,
                    crc: None,
                };
                self.deliver(rejected);
                return;
            }
            Parsed::Valid(req) => req,
        };
        self.shared.metrics.request(req.op);
        let record = InFlight {
            queue: qi,
            head: req.head,
            op: Some(req.op),
            status_addr: Some(req.status),
            length: req.length,
            popped: now,
            not_before: None,
            status: abi::req_status::IOERR,
            written: 0,
            lie: UsedLie::None,
            crc: (self.limits.features & abi::feature::INTEGRITY != 0).then_some(0),
        };
        let facts = RequestFacts {
            queue: qi,
            head: req.head,
            op: req.op,
            offset: req.offset,
            length: req.length,
        };
        let decision = self.faults.decide(&facts);
        if let Some(log) = &mut self.fault_log {
            log.record(self.faults.seq(), &facts, &decision);
        }
        if decision != Decision::Pass {
            self.shared.metrics.fault(&decision);
            debug!(
                "fault: {decision:?} for request {} (queue {qi} head {}, seq {})",
                req.id,
                req.head,
                self.faults.seq()
            );
        }
        let lying = |lie| InFlight { lie, ..record };
        match decision {
            Decision::Pass => self.start(record, req),
            Decision::Delay(d) => {
                // An absurd delay (centuries) that overflows the clock never completes.
                match now.checked_add(d) {
                    Some(t) => self.start(
                        InFlight {
                            not_before: Some(t),
                            ..record
                        },
                        req,
                    ),
                    None => info!("fault: delay {d:?} is beyond the clock; request held"),
                }
            }
            Decision::Error => self.deliver(record.finished(abi::req_status::IOERR, 0)),
            Decision::Status(code) => self.deliver(record.finished(code, 0)),
            Decision::Drop => {}
            Decision::Hang => {
                warn!(
                    "fault: hang at request {} (queue {qi} head {}): every queue stops until reset",
                    req.id, req.head
                );
                self.hung = true;
            }
            Decision::Reset => {
                // The request is dropped with everything else in flight by the reset the
                // driver has to do.
                self.needs_reset(qi, &BrokenQueue::Injected);
            }
            Decision::Short(len) => {
                let req = truncated(req, len);
                self.start(
                    InFlight {
                        length: len,
                        ..record
                    },
                    req,
                );
            }
            Decision::Corrupt { bits, seed } => {
                let flips = corrupt_positions(seed, bits, u64::from(req.length));
                let corruption = match req.op {
                    Op::Write => Corruption::Stored(req.offset, flips),
                    _ => Corruption::Guest(req.segments.clone(), flips),
                };
                self.corrupting.insert(self.next_token, corruption);
                self.start(record, req);
            }
            Decision::UsedId => self.start(lying(UsedLie::ForeignId), req),
            Decision::UsedDup => self.start(lying(UsedLie::Duplicate), req),
            Decision::UsedLen => self.start(lying(UsedLie::Overlong), req),
            Decision::IrqLost => self.start(lying(UsedLie::LostIrq), req),
            Decision::IrqSpurious => self.start(lying(UsedLie::SpuriousIrq), req),
        }
    }

    /// Starts a request that passed validation and fault injection.
    fn start(&mut self, record: InFlight, req: Request) {
        let job_op = match req.op {
            Op::Read => JobOp::Read,
            Op::Write => JobOp::Write,
            Op::Flush => JobOp::Flush,
            Op::GetId => {
                let done = if self.write_id(&req) {
                    InFlight {
                        crc: record.crc.map(|_| crc32c::crc32c(&self.id)),
                        ..record.finished(abi::req_status::OK, ID_LEN)
                    }
                } else {
                    record.finished(abi::req_status::IOERR, 0)
                };
                self.finish(done);
                return;
            }
        };
        let token = self.next_token;
        self.next_token += 1;
        self.pending.insert(token, record);
        if record.crc.is_some() && job_op != JobOp::Flush {
            self.summed.insert(token, req.segments.clone());
        }
        self.backend.submit(Job {
            token,
            epoch: self.epoch,
            op: job_op,
            offset: req.offset,
            segments: req.segments,
        });
    }

    /// Writes the NUL-padded ID string into the first 20 bytes of the data buffers.
    fn write_id(&self, req: &Request) -> bool {
        let mut rest: &[u8] = &self.id;
        for seg in &req.segments {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(seg.len as usize);
            if self.mem.write_slice(&rest[..n], seg.addr).is_err() {
                return false;
            }
            rest = &rest[n..];
        }
        rest.is_empty()
    }

    fn on_completions(&mut self) {
        let mut done = std::mem::take(&mut self.reaped);
        self.backend.reap(&mut done);
        for c in done.drain(..) {
            let corruption = self.corrupting.remove(&c.token);
            let summed = self.summed.remove(&c.token);
            let Some(mut p) = self.pending.remove(&c.token) else {
                // A request from before a reset (or NEEDS_RESET): discarded.
                continue;
            };
            let finished = match c.result {
                Ok(()) => {
                    // The CRC is of the data as in the store: a READ's before a fault flips
                    // bits in the guest's copy, a WRITE's after one flipped bits in the store.
                    let stored_flips = match &corruption {
                        Some(Corruption::Stored(_, flips)) => flips.as_slice(),
                        _ => &[],
                    };
                    if let (Some(_), Some(segments)) = (p.crc, &summed) {
                        p.crc = Some(data_crc(
                            &self.mem,
                            segments,
                            stored_flips,
                            &mut self.crc_scratch,
                        ));
                    }
                    if let Some(corruption) = corruption {
                        self.corrupt(corruption);
                    }
                    let written = if p.op == Some(Op::Read) { p.length } else { 0 };
                    p.finished(abi::req_status::OK, written)
                }
                Err(e) => {
                    self.backend_errors += 1;
                    let level = if self.backend_errors <= 10 {
                        log::Level::Warn
                    } else {
                        log::Level::Debug
                    };
                    let op =
                        p.op.map_or_else(|| "request".to_string(), |o| o.to_string());
                    log::log!(
                        level,
                        "aiodma device: {op} at queue {} head {} failed: {e}",
                        p.queue,
                        p.head
                    );
                    p.finished(abi::req_status::IOERR, 0)
                }
            };
            self.finish(finished);
        }
        self.reaped = done;
    }

    /// Flips the bits a `corrupt` fault chose, after the backend moved the data.
    fn corrupt(&mut self, corruption: Corruption) {
        match corruption {
            Corruption::Guest(segments, flips) => {
                for bit in flips {
                    let Some(addr) = data_address(&segments, bit / 8) else {
                        continue;
                    };
                    let flipped = self
                        .mem
                        .read_obj::<u8>(addr)
                        .and_then(|b| self.mem.write_obj(b ^ (1 << (bit % 8)), addr));
                    if let Err(e) = flipped {
                        warn!("fault: corrupt: guest byte at {:#x}: {e}", addr.0);
                    }
                }
            }
            Corruption::Stored(offset, flips) => {
                if let Err(e) = self.backend.flip_stored_bits(offset, &flips) {
                    warn!("fault: corrupt: the store at {offset:#x}: {e}");
                }
            }
        }
    }

    /// Completes now, or holds the completion until its `not_before`.
    fn finish(&mut self, req: InFlight) {
        if let Some(at) = req.not_before {
            if at > Instant::now() {
                let seq = self.next_token;
                self.next_token += 1;
                self.delayed.push(Reverse(Delayed { at, seq, req }));
                self.arm_timer();
                return;
            }
        }
        self.deliver(req);
    }

    fn arm_timer(&mut self) {
        let Some(Reverse(earliest)) = self.delayed.peek() else {
            return;
        };
        let earliest = earliest.at;
        if self.timer_deadline.is_some_and(|d| d <= earliest) {
            return;
        }
        let wait = earliest
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(1));
        match self.timer.reset(wait, None) {
            Ok(()) => self.timer_deadline = Some(earliest),
            Err(e) => error!("aiodma device: cannot arm the delay timer: {e}"),
        }
    }

    fn on_timer(&mut self) {
        // Non-blocking read: clears the expiration (EAGAIN if it was re-armed meanwhile).
        let _ = self.timer.wait();
        self.timer_deadline = None;
        let now = Instant::now();
        while self.delayed.peek().is_some_and(|Reverse(d)| d.at <= now) {
            if let Some(Reverse(d)) = self.delayed.pop() {
                self.deliver(d.req);
            }
        }
        self.arm_timer();
    }

    /// Queues a finished request for publication (or drops it while hung or broken).
    fn deliver(&mut self, req: InFlight) {
        if !self.active || self.broken || self.hung {
            // Held until reset (hang), or never published (NEEDS_RESET).
            return;
        }
        let Some(Some(q)) = self.queues.get_mut(usize::from(req.queue)) else {
            return;
        };
        let status_len = match (req.status_addr, req.crc) {
            (None, _) => 0,
            (Some(_), None) => 1,
            (Some(_), Some(_)) => abi::integrity::STATUS_LEN,
        };
        q.complete(Done {
            head: req.head,
            len: req.written + status_len,
            status: req.status_addr.map(|a| (a, req.status)),
            lie: req.lie,
            crc: req.crc,
        });
        let m = &self.shared.metrics;
        m.status(req.status);
        if req.status == abi::req_status::OK {
            if let Some(op) = req.op {
                m.bytes(op, req.bytes());
            }
        }
        m.latency(req.popped.elapsed());
    }

    /// Publishes every queue's finished requests (under the publish lock, only for the current
    /// epoch and while the guest lets the device master the bus) and signals the queues whose
    /// driver wants an interrupt. With Bus Master Enable clear the finished requests wait.
    fn flush(&mut self) {
        self.backend.kick();
        if !self.queues.iter().flatten().any(|q| q.pending_done() > 0) {
            return;
        }
        let mut notify = Vec::new();
        let mut broken = None;
        {
            let guard = self.shared.lock_publish();
            if !self.shared.gate.bus_master() || self.paused {
                return;
            }
            let current = *guard == self.epoch && self.active && !self.broken && !self.hung;
            for (qi, q) in self.queues.iter_mut().enumerate() {
                let Some(q) = q else { continue };
                if !current {
                    q.discard_done();
                    continue;
                }
                match q.publish(&self.mem) {
                    Ok(p) => {
                        self.inflight = self.inflight.saturating_sub(p.completed as u64);
                        if p.notify {
                            notify.push(qi as u16);
                        }
                        if p.spurious {
                            notify.push(qi as u16);
                        }
                    }
                    Err(e) => {
                        broken = Some((qi as u16, e));
                        break;
                    }
                }
            }
        }
        if let Some((qi, e)) = broken {
            self.needs_reset(qi, &e);
            return;
        }
        if let Some(sink) = &self.sink {
            for qi in notify {
                sink.signal_queue(qi);
                self.shared.metrics.interrupt();
            }
        }
    }

    /// SPEC 6.3: stop every queue, set NEEDS_RESET, signal a configuration change.
    fn needs_reset(&mut self, qi: u16, reason: &BrokenQueue) {
        if self.broken {
            return;
        }
        warn!("aiodma device: queue {qi}: {reason}; NEEDS_RESET, every queue stops");
        self.broken = true;
        for q in self.queues.iter_mut().flatten() {
            q.discard_done();
        }
        let set = {
            let guard = self.shared.lock_publish();
            if *guard == self.epoch {
                self.shared.needs_reset.store(true, Ordering::Release);
                true
            } else {
                false
            }
        };
        if set {
            self.shared.metrics.needs_reset();
            if let Some(sink) = &self.sink {
                sink.signal_config();
                self.shared.metrics.config_interrupt();
            }
        }
    }
}
