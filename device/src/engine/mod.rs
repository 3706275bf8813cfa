//! The queue engine: [`Engine`] implements [`QueueEngine`] for the PCI transport.
//!
//! ```text
//!  vCPU thread (transport)            device thread "aiodma-device" (event-manager)
//!  ───────────────────────            ─────────────────────────────────────────────
//!  activate / begin_reset ──command──▶ control eventfd
//!  guest doorbell ── ioeventfd ──────▶ doorbell eventfd q ─▶ pop chains (virtio-queue),
//!                                        validate (request::parse_chain), faults,
//!                                        submit ──▶ backend (worker pool / io_uring)
//!                                      completion eventfd ◀── backend
//!                                        status byte, add_used, EVENT_IDX check,
//!                                        InterruptSink::signal_queue (once per batch)
//!                                      timerfd ─▶ release delayed completions
//! ```
//!
//! Reset protocol: `begin_reset` bumps an *epoch* under the publish lock (the lock the device
//! thread holds while it writes used rings), so no completion of a pre-reset request reaches a
//! used ring once `begin_reset` returns. The device thread then drops all request state and
//! acknowledges the epoch; `reset_complete` is true once that acknowledgement is in and the
//! backend's count of operations that may still touch guest memory is zero.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use log::warn;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::abi;
use crate::backend::{BackendError, DmaGate};
use crate::fault::Scheduled;
use crate::metrics::Metrics;

pub use crate::backend::Backing;
pub use crate::fault::FaultRule;
pub use crate::metrics::DeviceMetrics;
pub use queue::BrokenQueue;

mod contract;
mod control;
pub mod queue;
mod worker;

pub use contract::{ActivateError, InterruptSink, QueueConfig, QueueEngine};
pub use control::{ControlError, DeviceControl};

#[cfg(test)]
pub(crate) mod testdrv;
#[cfg(test)]
mod tests;

/// Default `--queue-size`.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Default number of backend worker threads.
pub const DEFAULT_WORKERS: usize = 2;
/// Most data bytes per request (`DeviceConfig::max_transfer`).
pub const MAX_TRANSFER: u32 = 1 << 20;
/// Most data descriptors per request (`DeviceConfig::max_segments`), further bounded by the
/// largest queue size minus the header and status descriptors.
pub const MAX_SEGMENTS: u32 = 128;

/// Everything the device is built from (the VMM's `--queues --queue-size --backing --fault
/// --fault-seed` flags).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceOptions {
    /// Number of queues, 1..=`abi::bar0::MAX_QUEUES`.
    pub queues: u16,
    /// Largest queue size the driver may choose: a power of two ≤ 32768.
    pub queue_size_max: u16,
    /// The store.
    pub backing: Backing,
    /// Fault rules, applied in order.
    pub faults: Vec<FaultRule>,
    /// Seed of the fault PRNG.
    pub fault_seed: u64,
    /// Write one JSON line per fired fault here (`--fault-log`).
    pub fault_log: Option<PathBuf>,
    /// Fire exactly these faults, read from a fault log (`--fault-replay`), instead of `faults`.
    pub fault_replay: Option<Vec<Scheduled>>,
    /// Worker threads of the memory backing (and of the file backing when io_uring is
    /// unavailable); at least 1. The io_uring file backing uses the kernel's workers instead.
    pub workers: usize,
    /// Called on each thread the device starts, once that thread is set up and before it
    /// handles guest work (the VMM confines the thread there). `None`: nothing to do.
    pub on_thread_start: Option<ThreadHook>,
}

/// What a thread started by the device does, for [`DeviceOptions::on_thread_start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    /// The device thread ("aiodma-device"): the event loop over doorbells, completions and
    /// timers; submits to io_uring. Called after its backend and event loop are set up.
    Device,
    /// A backend pool worker: copies between guest memory and the store, preadv/pwritev,
    /// fdatasync. Called first thing in the thread.
    BackendWorker,
}

/// A callback run on the device's own threads (see [`DeviceOptions::on_thread_start`]).
///
/// A newtype so that `DeviceOptions` keeps its `Debug`/`Clone`/`PartialEq`: two hooks are equal
/// when they are the same closure.
#[derive(Clone)]
pub struct ThreadHook(pub Arc<dyn Fn(ThreadRole) + Send + Sync>);

impl std::fmt::Debug for ThreadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadHook(..)")
    }
}

impl PartialEq for ThreadHook {
    fn eq(&self, other: &ThreadHook) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

std::thread_local! {
    /// The hook of the engine that started this thread. The device thread sets it, and the
    /// backend's pool workers, which it spawns while opening the backend, take it from there,
    /// so the hook reaches them without passing through every backend constructor.
    static THREAD_HOOK: std::cell::RefCell<Option<ThreadHook>> =
        const { std::cell::RefCell::new(None) };
}

/// The hook of the engine that started the calling thread (see [`THREAD_HOOK`]).
pub(crate) fn thread_hook() -> Option<ThreadHook> {
    THREAD_HOOK.with(|h| h.borrow().clone())
}

/// Runs the hook of the calling thread's engine, if any, for `role`.
pub(crate) fn thread_started(role: ThreadRole) {
    if let Some(hook) = thread_hook() {
        (hook.0)(role);
    }
}

impl Default for DeviceOptions {
    fn default() -> DeviceOptions {
        DeviceOptions {
            queues: 1,
            queue_size_max: DEFAULT_QUEUE_SIZE,
            backing: Backing::default(),
            faults: Vec::new(),
            fault_seed: 0,
            fault_log: None,
            fault_replay: None,
            workers: DEFAULT_WORKERS,
            on_thread_start: None,
        }
    }
}

impl DeviceOptions {
    /// Checks the numbers (the backing is checked when it is opened).
    pub fn validate(&self) -> Result<(), DeviceError> {
        if self.queues == 0 || self.queues > abi::bar0::MAX_QUEUES {
            return Err(DeviceError::Queues(self.queues));
        }
        if self.queue_size_max == 0
            || !self.queue_size_max.is_power_of_two()
            || self.queue_size_max > abi::ring::MAX_QUEUE_SIZE
        {
            return Err(DeviceError::QueueSize(self.queue_size_max));
        }
        if self.workers == 0 {
            return Err(DeviceError::Workers);
        }
        Ok(())
    }

    /// `max_segments` for these options.
    pub fn max_segments(&self) -> u32 {
        u32::from(self.queue_size_max)
            .saturating_sub(2)
            .clamp(1, MAX_SEGMENTS)
    }
}

/// The device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Bad `--queues`.
    #[error("--queues {0}: must be from 1 to {max}", max = abi::bar0::MAX_QUEUES)]
    Queues(u16),
    /// Bad `--queue-size`.
    #[error("--queue-size {0}: must be a power of two from 1 to 32768")]
    QueueSize(u16),
    /// No workers.
    #[error("the device needs at least one backend worker thread")]
    Workers,
    /// The backing store could not be opened.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
    /// The device thread could not be started.
    #[error("cannot start the device thread: {0}")]
    Thread(io::Error),
    /// The device thread failed while starting.
    #[error("the device thread failed to start: {0}")]
    Start(String),
}

/// State shared by [`Engine`] and the device thread.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The current epoch; held while the device thread writes used rings, and by `begin_reset`
    /// while it bumps the epoch.
    pub publish: Mutex<u64>,
    /// Mirror of the epoch for lock-free checks, with the guest's Bus Master Enable: whether a
    /// backend job may still start touching guest memory.
    pub gate: Arc<DmaGate>,
    /// The last epoch the device thread has switched to (its request state is clean).
    pub acked: AtomicU64,
    /// Backend operations that may still touch guest memory.
    pub backend_inflight: Arc<AtomicU64>,
    /// NEEDS_RESET.
    pub needs_reset: AtomicBool,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The device thread should exit.
    pub shutdown: AtomicBool,
}

impl Shared {
    pub(crate) fn lock_publish(&self) -> MutexGuard<'_, u64> {
        self.publish.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Messages from [`Engine`] to the device thread.
pub(crate) enum Command {
    Activate {
        epoch: u64,
        features: u64,
        queues: Vec<(u16, QueueConfig)>,
        sink: Arc<dyn InterruptSink>,
    },
    Reset {
        epoch: u64,
    },
    /// The guest set Bus Master Enable again: look at the queues.
    BusMasterOn,
    /// Runtime control: the fault rules from now on.
    SetFaults(Vec<FaultRule>),
    /// Runtime control: set NEEDS_RESET now.
    InjectReset,
    /// Runtime control: hang now.
    InjectHang,
    /// Runtime control: stop or resume processing.
    Pause(bool),
    /// Write the fault log's summary and close it; acknowledge on the channel.
    CloseFaultLog(std::sync::mpsc::SyncSender<()>),
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not processing (never activated, or reset complete).
    Idle,
    /// Processing since `activate`.
    Active,
    /// `begin_reset` called for this epoch; not complete yet.
    Resetting(u64),
}

/// The aiodma queue engine.
///
/// ```no_run
/// use aiodma_device::engine::{Backing, Engine, DeviceOptions, FaultRule};
/// use aiodma_device::engine::QueueEngine;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])?;
/// let options = DeviceOptions {
///     queues: 2,
///     backing: Backing::parse("mem:64M")?,
///     faults: vec![FaultRule::parse("delay:p=0.1,min=100us,max=2ms")?],
///     fault_seed: 7,
///     ..DeviceOptions::default()
/// };
/// let core = Engine::new(options, mem)?;
/// let doorbells = core.doorbells(); // register as ioeventfds
/// let metrics = core.metrics_handle(); // keep for --metrics
/// let engine: Box<dyn aiodma_device::engine::QueueEngine> = Box::new(core);
/// # Ok(()) }
/// ```
pub struct Engine {
    config: abi::DeviceConfig,
    features: u64,
    doorbells: Vec<Arc<EventFd>>,
    mem: GuestMemoryMmap,
    shared: Arc<Shared>,
    control: Arc<EventFd>,
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
    state: State,
    backend_name: &'static str,
    id: &'static str,
    device_control: DeviceControl,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("backend", &self.backend_name)
            .field("state", &self.state)
            .finish()
    }
}

/// Features the device offers.
pub const DEVICE_FEATURES: u64 = abi::feature::FLUSH
    | abi::feature::GET_ID
    | abi::feature::INTEGRITY
    | abi::feature::RING_EVENT_IDX
    | abi::feature::VERSION_1;

impl Engine {
    /// Opens the backing, creates the doorbell eventfds and starts the device thread (which
    /// waits for `activate`). `mem` is the guest's memory (a clone shares the mappings).
    pub fn new(options: DeviceOptions, mem: GuestMemoryMmap) -> Result<Engine, DeviceError> {
        options.validate()?;
        let mut doorbells = Vec::with_capacity(usize::from(options.queues));
        for _ in 0..options.queues {
            doorbells.push(Arc::new(
                EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?,
            ));
        }
        let control = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?);
        let shared = Arc::new(Shared {
            publish: Mutex::new(0),
            gate: Arc::new(DmaGate::default()),
            acked: AtomicU64::new(0),
            backend_inflight: Arc::new(AtomicU64::new(0)),
            needs_reset: AtomicBool::new(false),
            metrics: Arc::new(Metrics::new()),
            shutdown: AtomicBool::new(false),
        });
        let (commands, commands_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let id = options.backing.id_string();
        let setup = worker::Setup {
            options: options.clone(),
            mem: mem.clone(),
            shared: shared.clone(),
            doorbells: doorbells.clone(),
            control: control.clone(),
            commands: commands_rx,
            ready: ready_tx,
        };
        let thread = std::thread::Builder::new()
            .name("aiodma-device".into())
            .spawn(move || {
                let hook = setup.options.on_thread_start.clone();
                THREAD_HOOK.with(|h| *h.borrow_mut() = hook);
                worker::run(setup)
            })
            .map_err(DeviceError::Thread)?;
        let info = match ready_rx.recv() {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(DeviceError::Start("the device thread exited".into()));
            }
        };
        let config = abi::DeviceConfig {
            capacity: info.capacity,
            max_segments: options.max_segments(),
            max_transfer: MAX_TRANSFER,
            num_queues: options.queues,
            queue_size_max: options.queue_size_max,
            alignment: crate::backend::ALIGNMENT,
        };
        log::info!(
            "aiodma device: {} queue(s) of up to {}, backing {} ({}, {} bytes), {} fault rule(s)",
            options.queues,
            options.queue_size_max,
            options.backing,
            info.name,
            info.capacity,
            options.faults.len()
        );
        let device_control = DeviceControl::new(
            commands.clone(),
            control.clone(),
            options.faults.clone(),
            shared.metrics.clone(),
        );
        Ok(Engine {
            config,
            features: DEVICE_FEATURES,
            doorbells,
            mem,
            shared,
            control,
            commands,
            thread: Some(thread),
            state: State::Idle,
            backend_name: info.name,
            id,
            device_control,
        })
    }

    /// A handle to change the device while it runs (fault rules, reset, hang, pause).
    pub fn control(&self) -> DeviceControl {
        self.device_control.clone()
    }

    /// A snapshot of the metrics.
    pub fn metrics(&self) -> DeviceMetrics {
        self.shared.metrics.snapshot()
    }

    /// The live metrics, for a reporter that outlives the borrow of the engine (e.g. after the
    /// engine was boxed into the transport).
    pub fn metrics_handle(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Which backend engine serves the backing ("mem", "file (io_uring)", "file").
    pub fn backend_name(&self) -> &'static str {
        self.backend_name
    }

    /// The GET_ID string (before NUL padding).
    pub fn id_string(&self) -> &'static str {
        self.id
    }

    fn send(&self, cmd: Command) -> bool {
        if self.commands.send(cmd).is_err() {
            return false;
        }
        if let Err(e) = self.control.write(1) {
            warn!("aiodma device: cannot wake the device thread: {e}");
        }
        true
    }
}

impl QueueEngine for Engine {
    fn config(&self) -> abi::DeviceConfig {
        self.config
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn doorbells(&self) -> Vec<Arc<EventFd>> {
        self.doorbells.clone()
    }

    fn activate(
        &mut self,
        features: u64,
        queues: &[QueueConfig],
        interrupts: Arc<dyn InterruptSink>,
    ) -> Result<(), ActivateError> {
        match self.state {
            State::Idle => {}
            State::Active => {
                return Err(ActivateError::Start("the device is already active".into()))
            }
            State::Resetting(_) => {
                if !self.reset_complete() {
                    return Err(ActivateError::Start("a reset is still in progress".into()));
                }
            }
        }
        let features = features & self.features;
        let mut enabled = Vec::new();
        for (i, cfg) in queues.iter().enumerate() {
            if !cfg.enabled {
                continue;
            }
            let index = u16::try_from(i).unwrap_or(u16::MAX);
            if index >= self.config.num_queues {
                return Err(ActivateError::BadQueue {
                    queue: index,
                    reason: format!("the device has {} queue(s)", self.config.num_queues),
                });
            }
            match queue::validate(cfg, self.config.queue_size_max, &self.mem) {
                Ok(()) => enabled.push((index, *cfg)),
                Err(queue::QueueProblem::Config(reason)) => {
                    return Err(ActivateError::BadQueue {
                        queue: index,
                        reason,
                    })
                }
                Err(queue::QueueProblem::OutsideRam(reason)) => {
                    // SPEC 6.3: rings outside guest RAM make the queue untrustworthy.
                    // The transport logs the failed activation (rate-limited: a guest can repeat it).
                    log::debug!("aiodma device: queue {index}: {reason}; NEEDS_RESET");
                    self.shared.needs_reset.store(true, Ordering::Release);
                    self.shared.metrics.needs_reset();
                    return Err(ActivateError::BadQueue {
                        queue: index,
                        reason,
                    });
                }
            }
        }
        let epoch = self.shared.gate.epoch();
        if !self.send(Command::Activate {
            epoch,
            features,
            queues: enabled,
            sink: interrupts,
        }) {
            return Err(ActivateError::Start("the device thread is gone".into()));
        }
        self.state = State::Active;
        Ok(())
    }

    fn begin_reset(&mut self) {
        if let State::Resetting(_) = self.state {
            return;
        }
        let epoch = {
            let mut guard = self.shared.lock_publish();
            *guard += 1;
            self.shared.gate.set_epoch(*guard);
            self.shared.needs_reset.store(false, Ordering::Release);
            *guard
        };
        self.shared.metrics.reset();
        if !self.send(Command::Reset { epoch }) {
            // No device thread: nothing left that could touch guest memory.
            self.shared.acked.store(epoch, Ordering::Release);
        }
        self.state = State::Resetting(epoch);
    }

    fn reset_complete(&mut self) -> bool {
        match self.state {
            State::Idle => true,
            State::Active => false,
            State::Resetting(epoch) => {
                let acked = self.shared.acked.load(Ordering::Acquire) == epoch;
                if acked && self.shared.backend_inflight.load(Ordering::Acquire) == 0 {
                    self.state = State::Idle;
                    true
                } else {
                    false
                }
            }
        }
    }

    fn needs_reset(&self) -> bool {
        self.shared.needs_reset.load(Ordering::Acquire)
    }

    fn set_bus_master(&mut self, on: bool) {
        if self.shared.gate.bus_master() == on {
            return;
        }
        if on {
            self.shared.gate.set_bus_master(true);
            self.send(Command::BusMasterOn);
        } else {
            // Under the publish lock: once this returns no used-ring write is in progress,
            // and the device thread checks the gate under the same lock before the next one.
            let _publishing = self.shared.lock_publish();
            self.shared.gate.set_bus_master(false);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
