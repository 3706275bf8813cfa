//! The device thread: an event-manager loop over the doorbells, the control eventfd, the
//! backend's completion eventfd and a timerfd for delayed completions.

use std::collections::HashMap;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{debug, error, info, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::queue::{BrokenQueue, Done, QueueProblem, VQueue};
use super::{Command, DeviceError, DeviceOptions, Shared};
use crate::abi;
use crate::backend::{self, Backend, Completion, Job, JobOp};
use crate::engine::{InterruptSink, QueueConfig};
use crate::fault::{Decision, FaultInjector};
use crate::metrics::FaultCounter;
use crate::request::{Limits, Op, Parsed, Request, ID_LEN};

/// Event data of the control eventfd (doorbells use their queue index).
const CONTROL: u32 = 0x1_0000;
/// Event data of the backend completion eventfd.
const COMPLETION: u32 = 0x1_0001;
/// Event data of the delay timer.
const TIMER: u32 = 0x1_0002;

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
        commands,
        backend,
        timer,
        timer_deadline: None,
        faults: FaultInjector::new(options.faults.clone(), options.fault_seed),
        limits,
        queue_size_max: options.queue_size_max,
        id,
        epoch: 0,
        active: false,
        broken: false,
        hung: false,
        sink: None,
        queues: Vec::new(),
        pending: HashMap::new(),
        delayed: Vec::new(),
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

/// A request handed to the backend.
#[derive(Debug)]
struct Pending {
    queue: u16,
    head: u16,
    op: Op,
    length: u32,
    status: GuestAddress,
    popped: Instant,
    not_before: Option<Instant>,
}

/// A request whose outcome is known.
#[derive(Debug, Clone, Copy)]
struct Finished {
    queue: u16,
    head: u16,
    op: Option<Op>,
    status_addr: Option<GuestAddress>,
    status: u8,
    /// Data bytes written to the guest (READ, GET_ID).
    written: u32,
    /// Data bytes transferred (for the metrics).
    bytes: u64,
    popped: Instant,
}

struct DeviceLoop {
    shared: Arc<Shared>,
    mem: GuestMemoryMmap,
    doorbells: Vec<Arc<EventFd>>,
    control: Arc<EventFd>,
    commands: Receiver<Command>,
    backend: Box<dyn Backend>,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    faults: FaultInjector,
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
    sink: Option<Arc<dyn InterruptSink>>,
    queues: Vec<Option<VQueue>>,
    pending: HashMap<u64, Pending>,
    delayed: Vec<(Instant, Finished)>,
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
        for q in 0..self.queues.len() {
            self.process_queue(q as u16);
        }
    }

    fn reset(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.active = false;
        self.broken = false;
        self.hung = false;
        self.sink = None;
        self.queues.clear();
        self.pending.clear();
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
        self.process_queue(q as u16);
    }

    fn can_process(&self) -> bool {
        self.active && !self.broken && !self.hung && self.now_epoch() == self.epoch
    }

    /// Drains queue `qi`: pops, validates and starts every available request.
    fn process_queue(&mut self, qi: u16) {
        while self.can_process() {
            let popped = match self.queues.get_mut(usize::from(qi)) {
                Some(Some(q)) => q.pop(&self.mem, &self.limits),
                _ => return,
            };
            match popped {
                Ok(Some(parsed)) => {
                    self.inflight += 1;
                    self.shared.metrics.inflight(self.inflight);
                    self.accept(qi, parsed);
                }
                Ok(None) => return,
                Err(e) => {
                    self.needs_reset(qi, &e);
                    return;
                }
            }
        }
    }

    fn accept(&mut self, qi: u16, parsed: Parsed) {
        let now = Instant::now();
        let req = match parsed {
            Parsed::Rejected(r) => {
                debug!("queue {qi} head {}: {}", r.head, r.reason);
                self.deliver(Finished {
                    queue: qi,
                    head: r.head,
                    op: None,
                    status_addr: r.status_addr,
                    status: r.reason.status(),
                    written: 0,
                    bytes: 0,
                    popped: now,
                });
                return;
            }
            Parsed::Valid(req) => req,
        };
        self.shared.metrics.request(req.op);
        match self.faults.decide(req.op) {
            Decision::Pass => self.start(qi, req, now, None),
            Decision::Delay(d) => {
                self.shared.metrics.fault(FaultCounter::Delay);
                debug!(
                    "fault: delay {d:?} for request {} (queue {qi} head {})",
                    req.id, req.head
                );
                // An absurd delay (centuries) that overflows the clock never completes.
                match now.checked_add(d) {
                    Some(t) => self.start(qi, req, now, Some(t)),
                    None => info!("fault: delay {d:?} is beyond the clock; request held"),
                }
            }
            Decision::Error => {
                self.shared.metrics.fault(FaultCounter::Error);
                debug!(
                    "fault: error for request {} (queue {qi} head {})",
                    req.id, req.head
                );
                self.deliver(Finished {
                    queue: qi,
                    head: req.head,
                    op: Some(req.op),
                    status_addr: Some(req.status),
                    status: abi::req_status::IOERR,
                    written: 0,
                    bytes: 0,
                    popped: now,
                });
            }
            Decision::Drop => {
                self.shared.metrics.fault(FaultCounter::Drop);
                debug!(
                    "fault: dropping request {} (queue {qi} head {})",
                    req.id, req.head
                );
            }
            Decision::Hang => {
                self.shared.metrics.fault(FaultCounter::Hang);
                warn!(
                    "fault: hang at request {} (queue {qi} head {}): every queue stops until reset",
                    req.id, req.head
                );
                self.hung = true;
            }
        }
    }

    /// Starts a request that passed validation and fault injection.
    fn start(&mut self, qi: u16, req: Request, popped: Instant, not_before: Option<Instant>) {
        let job_op = match req.op {
            Op::Read => JobOp::Read,
            Op::Write => JobOp::Write,
            Op::Flush => JobOp::Flush,
            Op::GetId => {
                let (status, written) = if self.write_id(&req) {
                    (abi::req_status::OK, ID_LEN)
                } else {
                    (abi::req_status::IOERR, 0)
                };
                self.finish(
                    Finished {
                        queue: qi,
                        head: req.head,
                        op: Some(Op::GetId),
                        status_addr: Some(req.status),
                        status,
                        written,
                        bytes: u64::from(written),
                        popped,
                    },
                    not_before,
                );
                return;
            }
        };
        let token = self.next_token;
        self.next_token += 1;
        self.pending.insert(
            token,
            Pending {
                queue: qi,
                head: req.head,
                op: req.op,
                length: req.length,
                status: req.status,
                popped,
                not_before,
            },
        );
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
            let Some(p) = self.pending.remove(&c.token) else {
                // A request from before a reset (or NEEDS_RESET): discarded.
                continue;
            };
            let (status, written, bytes) = match c.result {
                Ok(()) => {
                    let written = if p.op == Op::Read { p.length } else { 0 };
                    (abi::req_status::OK, written, u64::from(p.length))
                }
                Err(e) => {
                    self.backend_errors += 1;
                    let level = if self.backend_errors <= 10 {
                        log::Level::Warn
                    } else {
                        log::Level::Debug
                    };
                    log::log!(
                        level,
                        "aiodma device: {} at queue {} head {} failed: {e}",
                        p.op,
                        p.queue,
                        p.head
                    );
                    (abi::req_status::IOERR, 0, 0)
                }
            };
            self.finish(
                Finished {
                    queue: p.queue,
                    head: p.head,
                    op: Some(p.op),
                    status_addr: Some(p.status),
                    status,
                    written,
                    bytes,
                    popped: p.popped,
                },
                p.not_before,
            );
        }
        self.reaped = done;
    }

    /// Completes now, or holds the completion until `not_before`.
    fn finish(&mut self, f: Finished, not_before: Option<Instant>) {
        if let Some(t) = not_before {
            if t > Instant::now() {
                self.delayed.push((t, f));
                self.arm_timer();
                return;
            }
        }
        self.deliver(f);
    }

    fn arm_timer(&mut self) {
        let Some(earliest) = self.delayed.iter().map(|(t, _)| *t).min() else {
            return;
        };
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
        let mut due: Vec<(Instant, Finished)> = Vec::new();
        self.delayed.retain(|(t, f)| {
            if *t <= now {
                due.push((*t, *f));
                false
            } else {
                true
            }
        });
        due.sort_by_key(|(t, _)| *t);
        for (_, f) in due {
            self.deliver(f);
        }
        self.arm_timer();
    }

    /// Queues a finished request for publication (or drops it while hung or broken).
    fn deliver(&mut self, f: Finished) {
        if !self.active || self.broken || self.hung {
            // Held until reset (hang), or never published (NEEDS_RESET).
            return;
        }
        let Some(Some(q)) = self.queues.get_mut(usize::from(f.queue)) else {
            return;
        };
        let len = f.written + u32::from(f.status_addr.is_some());
        q.complete(Done {
            head: f.head,
            len,
            status: f.status_addr.map(|a| (a, f.status)),
        });
        let m = &self.shared.metrics;
        m.status(f.status);
        if f.status == abi::req_status::OK {
            if let Some(op) = f.op {
                m.bytes(op, f.bytes);
            }
        }
        m.latency(f.popped.elapsed());
    }

    /// Publishes every queue's finished requests (under the publish lock, only for the current
    /// epoch) and signals the queues whose driver wants an interrupt.
    fn flush(&mut self) {
        self.backend.kick();
        if !self.queues.iter().flatten().any(|q| q.pending_done() > 0) {
            return;
        }
        let mut notify = Vec::new();
        let mut broken = None;
        {
            let guard = self.shared.lock_publish();
            let current = *guard == self.epoch && self.active && !self.broken && !self.hung;
            for (qi, q) in self.queues.iter_mut().enumerate() {
                let Some(q) = q else { continue };
                if !current {
                    q.discard_done();
                    continue;
                }
                match q.publish(&self.mem) {
                    Ok((n, wants)) => {
                        self.inflight = self.inflight.saturating_sub(n as u64);
                        if wants {
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
