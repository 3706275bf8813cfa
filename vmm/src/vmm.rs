//! Builds the VM from a `VmConfig` and runs it until it stops.
//!
//! Threads: one per vCPU (KVM_RUN and device exits) and the calling thread, which runs the event
//! loop (terminal input, the stop signal, the timeout). Each installs its seccomp filter
//! (`crate::seccomp`) once set up: vCPUs as they start, the calling thread once they run.

use std::fs::File;
use std::io::{self, IsTerminal, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::Kvm;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::terminal::Terminal;

use aiodma_device::backend::BackendError;
use aiodma_device::engine::QueueEngine;
use aiodma_device::engine::{DeviceControl, DeviceError, DeviceOptions, Engine, ThreadHook};
use aiodma_device::metrics::Metrics;
use aiodma_device::transport::Transport;

use crate::api::{self, ApiError, ApiServer};
use crate::arch::x86_64 as arch;
use crate::config::{DeviceSpec, VmConfig};
use crate::devices::bus::Bus;
use crate::devices::pci::{self, HostBridge, PciBusError, PciConfigIo, PciRoot};
use crate::devices::serial::{ConsoleOut, SerialDevice, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::{i8042, platform};
use crate::exit::{StopReason, StopSignal};
use crate::metrics::RunMetrics;
use crate::seccomp::{Filters, SeccompError, ThreadKind};
use crate::vstate::interrupts::{KvmIoEvents, MsiRouting};
use crate::vstate::vcpu::{Vcpu, VcpuContext};
use crate::vstate::vm::{resident_bytes, Vm};
use crate::vstate::{KvmContext, KvmError};

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A KVM ioctl failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest memory could not be allocated.
    #[error("cannot allocate {0} MiB of guest memory: {1}")]
    Memory(u64, String),
    /// The kernel image could not be loaded.
    #[error("cannot load kernel {0}: {1}")]
    Kernel(String, String),
    /// An initrd could not be read or placed.
    #[error("initrd: {0}")]
    Initrd(String),
    /// Boot structures (command line, zero page, MP table, registers) could not be written.
    #[error("boot setup: {0}")]
    Boot(String),
    /// The DMA device could not be built.
    #[error("DMA device: {0}")]
    Device(String),
    /// The device flags or the backing store were rejected (the message names the flag).
    #[error("{0}")]
    DeviceInput(String),
    /// An OS resource (eventfd, thread, epoll) could not be created.
    #[error("{0}: {1}")]
    Os(&'static str, io::Error),
    /// System call filters could not be set up (`--seccomp`).
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The runtime-control API could not be served (`--api-sock`).
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl VmmError {
    /// Exit code: bad kernel/initrd contents are user input (2), the rest are VMM/KVM failures (3).
    pub fn exit_code(&self) -> u8 {
        match self {
            VmmError::Kernel(..) | VmmError::Initrd(_) | VmmError::DeviceInput(_) => {
                crate::exit::EXIT_BAD_INPUT
            }
            VmmError::Api(e) => e.exit_code(),
            _ => crate::exit::EXIT_KVM_FAILURE,
        }
    }
}

/// Concatenate the initrd archives, each padded to 4 bytes (Linux unpacks concatenated cpio
/// archives, compressed or not, and skips zero padding between them).
fn read_initrds(paths: &[std::path::PathBuf]) -> Result<Vec<u8>, VmmError> {
    let mut data = Vec::new();
    for path in paths {
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(|e| VmmError::Initrd(format!("{}: {e}", path.display())))?;
        data.resize(data.len().next_multiple_of(4), 0);
    }
    Ok(data)
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    cfg: &VmConfig,
) -> Result<
    (
        GuestAddress,
        Option<linux_loader::loader::bootparam::setup_header>,
    ),
    VmmError,
> {
    let name = cfg.kernel.display().to_string();
    let mut file =
        File::open(&cfg.kernel).map_err(|e| VmmError::Kernel(name.clone(), e.to_string()))?;
    let loaded = BzImage::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(arch::layout::HIMEM_START)),
    )
    .map_err(|e| VmmError::Kernel(name, e.to_string()))?;
    let entry = GuestAddress(loaded.kernel_load.0 + arch::layout::BZIMAGE_64BIT_ENTRY_OFFSET);
    Ok((entry, loaded.setup_header))
}

/// Puts the host terminal in raw mode for an interactive guest shell and restores it on drop.
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<Self> {
        let stdin = io::stdin();
        match stdin.lock().set_raw_mode() {
            Ok(()) => Some(RawTerminal),
            Err(e) => {
                log::warn!("cannot put the terminal in raw mode: {e}");
                None
            }
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Err(e) = io::stdin().lock().set_canon_mode() {
            log::warn!("cannot restore the terminal: {e}");
        }
    }
}

type SharedSerial = Arc<Mutex<SerialDevice<io::Stdout>>>;

/// Forwards terminal keystrokes to the guest's UART.
struct StdinForwarder {
    serial: SharedSerial,
}

impl MutEventSubscriber for StdinForwarder {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        match io::stdin().lock().read(&mut buf) {
            Ok(0) => {
                let _ = ops.remove(events);
            }
            Ok(n) => {
                let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
                serial.enqueue_input(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("terminal input stopped: {e}");
                let _ = ops.remove(events);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&io::stdin(), EventSet::IN)) {
            log::warn!("cannot watch the terminal: {e}");
        }
    }
}

/// Wakes the event loop when a thread reports that the VM must stop.
struct StopWatcher {
    stop: Arc<StopSignal>,
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Drain the counter so the level-triggered epoll does not spin.
        let _ = self.stop.event_fd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.stop.event_fd(), EventSet::IN)) {
            log::error!("cannot watch the stop signal: {e}");
        }
    }
}

/// The VMM's own memory: resident set size minus the guest RAM pages that are resident.
fn measure_memory(memory: &GuestMemoryMmap, metrics: &mut RunMetrics) {
    metrics.vmm_rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        });
    match resident_bytes(memory) {
        Ok(bytes) => metrics.guest_resident_kib = Some(bytes >> 10),
        Err(e) => log::debug!("memory: cannot measure resident guest RAM: {e}"),
    }
    if let (Some(rss), Some(guest)) = (metrics.vmm_rss_kib, metrics.guest_resident_kib) {
        let overhead = rss.saturating_sub(guest);
        metrics.vmm_overhead_kib = Some(overhead);
        log::debug!(
            "memory: VMM overhead {overhead} KiB (RSS {rss} KiB, resident guest RAM {guest} KiB)"
        );
    }
}

/// Where a run's metrics come from, at the stop or on SIGUSR1 while it runs.
struct MetricsSources {
    emulated_host: bool,
    vcpus: u8,
    memory_mib: u64,
    vmm_start: Instant,
    platform_ports: Arc<Mutex<platform::PlatformPorts>>,
    memory: GuestMemoryMmap,
    device: Option<Arc<Metrics>>,
}

impl MetricsSources {
    /// The metrics now; `reason` is why the VM stopped (`None`: still running, reported as
    /// stop reason "running").
    fn collect(&self, reason: Option<&StopReason>) -> RunMetrics {
        let mut metrics = RunMetrics {
            emulated_host: self.emulated_host,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            stopped_ms: u64::try_from(self.vmm_start.elapsed().as_millis()).unwrap_or(u64::MAX),
            ..Default::default()
        };
        {
            let ports = self
                .platform_ports
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            metrics.userspace_reached_ms = ports.userspace_ms();
            metrics.command_started_ms = ports.command_ms();
        }
        measure_memory(&self.memory, &mut metrics);
        metrics.device = self.device.as_ref().map(|m| m.snapshot());
        match reason {
            Some(reason) => metrics.set_stop(reason),
            None => metrics.stop_reason = "running".to_string(),
        }
        metrics
    }
}

/// The signal set holding SIGUSR1.
fn sigusr1_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialize it in place.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        set
    }
}

/// Block SIGUSR1 in the calling thread and, by inheritance, in every thread it starts later:
/// the signal then interrupts no vCPU or device thread and waits for the event loop's signalfd.
fn block_sigusr1() -> io::Result<()> {
    let set = sigusr1_set();
    // SAFETY: `set` is a valid signal set; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Writes the metrics file when the process gets SIGUSR1 (`--metrics`), through a signalfd
/// watched by the event loop (no signal handler runs).
struct MetricsOnSignal {
    signals: File,
    path: std::path::PathBuf,
    sources: MetricsSources,
}

impl MetricsOnSignal {
    /// Watch SIGUSR1 (already blocked with [`block_sigusr1`]) for a run writing to `path`.
    fn install(path: std::path::PathBuf, sources: MetricsSources) -> Result<Self, VmmError> {
        let set = sigusr1_set();
        // SAFETY: `set` is valid; -1 asks for a new descriptor, checked below.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(VmmError::Os("signalfd", io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let signals = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Self {
            signals,
            path,
            sources,
        })
    }

    /// Consume the pending SIGUSR1s; true if there was one.
    fn drain(&mut self) -> bool {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        let mut got = false;
        while matches!(self.signals.read(&mut info), Ok(n) if n > 0) {
            got = true;
        }
        got
    }
}

impl MutEventSubscriber for MetricsOnSignal {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if !self.drain() {
            return;
        }
        match self.sources.collect(None).write(&self.path) {
            Ok(()) => log::info!("SIGUSR1: metrics written to {}", self.path.display()),
            Err(e) => log::warn!("SIGUSR1: --metrics {}: {e}", self.path.display()),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.signals, EventSet::IN)) {
            log::warn!("cannot watch SIGUSR1: {e}");
        }
    }
}

/// The DMA device as the VMM keeps it after wiring.
#[derive(Debug)]
struct DmaDevice {
    /// The PCI function (also on the buses).
    _function: Arc<Mutex<Transport>>,
    /// The engine's live counters.
    metrics: Arc<Metrics>,
    /// Runtime control of the engine.
    control: DeviceControl,
}

/// The queue engine behind the transport, built from the device flags.
/// `on_thread_start` confines the device's threads (`--seccomp`).
fn create_engine(
    spec: &DeviceSpec,
    memory: GuestMemoryMmap,
    on_thread_start: Option<ThreadHook>,
) -> Result<Engine, VmmError> {
    let options = DeviceOptions {
        queues: spec.queues,
        queue_size_max: spec.queue_size,
        backing: spec.backing.clone(),
        faults: spec.faults.clone(),
        fault_seed: spec.fault_seed,
        fault_log: spec.fault_log.clone(),
        fault_replay: spec.fault_replay.clone(),
        on_thread_start,
        ..DeviceOptions::default()
    };
    let core = Engine::new(options, memory).map_err(|e| match e {
        DeviceError::Queues(_)
        | DeviceError::QueueSize(_)
        | DeviceError::Backend(
            BackendError::Open { .. }
            | BackendError::EmptyFile { .. }
            | BackendError::NotAFile { .. },
        ) => VmmError::DeviceInput(e.to_string()),
        _ => VmmError::Device(e.to_string()),
    })?;
    Ok(core)
}

/// The PCI platform: conf1 on the port bus, the host bridge at 00:00.0, the DMA device at
/// 00:01.0 (unless `--no-device`) with its MSI-X routes and irqfds, BARs placed in the PCI MMIO
/// window and mapped on `mmio` with the doorbell ioeventfds.
fn attach_pci(
    vm: &Vm,
    cfg: &VmConfig,
    pio: &Bus,
    mmio: &Arc<Bus>,
    device_threads: Option<ThreadHook>,
) -> Result<Option<DmaDevice>, VmmError> {
    let pci_err = |e: PciBusError| VmmError::Boot(format!("PCI: {e}"));
    let mut root = PciRoot::new(mmio.clone(), Arc::new(KvmIoEvents::new(vm.shared_fd())));
    root.add(
        pci::HOST_BRIDGE_DEVICE,
        Arc::new(Mutex::new(HostBridge::new())),
    )
    .map_err(pci_err)?;
    let dma = match &cfg.device {
        Some(spec) => {
            let engine = create_engine(spec, vm.memory().clone(), device_threads)?;
            let metrics = engine.metrics_handle();
            let control = engine.control();
            let vectors = engine.config().num_queues.saturating_add(1);
            let msi = Arc::new(MsiRouting::new(vm.shared_fd(), vectors)?);
            let transport = Transport::new(Box::new(engine), msi)
                .map_err(|e| VmmError::Device(format!("transport: {e}")))?;
            let function = Arc::new(Mutex::new(transport));
            root.add(pci::DMA_DEVICE, function.clone())
                .map_err(pci_err)?;
            Some(DmaDevice {
                _function: function,
                metrics,
                control,
            })
        }
        None => None,
    };
    root.assign_bars(arch::layout::PCI_MMIO_START, arch::layout::PCI_MMIO_SIZE)
        .map_err(pci_err)?;
    if let Some(addr) = root.bar_address(pci::DMA_DEVICE, 0) {
        log::debug!("DMA device at 00:{:02x}.0, BAR0 {addr:#x}", pci::DMA_DEVICE);
    }
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(root))),
        pci::conf1::BASE.into(),
        pci::conf1::LEN.into(),
    )
    .map_err(|e| VmmError::Boot(e.to_string()))?;
    Ok(dma)
}

/// The API thread confines itself once set up (`--seccomp`); a filter that cannot be installed
/// stops the VM.
fn api_thread_hook(
    filters: Option<&Arc<Filters>>,
    stop: &Arc<StopSignal>,
) -> Option<api::StartHook> {
    let filters = filters?.clone();
    let stop = stop.clone();
    Some(Box::new(move || {
        filters.install(ThreadKind::Api).map_err(|e| {
            stop.stop(StopReason::SeccompFailed(e.to_string()));
            e.to_string()
        })
    }))
}

/// A VM that stopped. vCPU threads may still sit in KVM_RUN on its memory, so the caller keeps
/// this alive until the process exits (which ends those threads), as Firecracker does.
#[derive(Debug)]
pub struct Stopped {
    /// Why the VM stopped.
    pub reason: StopReason,
    /// What the run measured.
    pub metrics: RunMetrics,
    _dma: Option<DmaDevice>,
    _vm: Vm,
}

/// Build the VM described by `cfg`, run it, and return why it stopped.
pub fn run(cfg: &VmConfig, vmm_start: Instant) -> Result<Stopped, VmmError> {
    if cfg.metrics.is_some() {
        // Before any thread starts, so they all inherit the blocked mask.
        block_sigusr1().map_err(|e| VmmError::Os("block SIGUSR1", e))?;
    }
    // First, so that a kernel without seccomp fails the run before anything is built.
    let filters = Filters::new(cfg.seccomp)?;
    // Early, so that an unusable --api-sock fails the run before the VM is built.
    let api_endpoint = cfg
        .api_sock
        .as_deref()
        .map(api::Endpoint::open)
        .transpose()?;
    let kvm = Kvm::new().kvm("open /dev/kvm")?;
    let mem_bytes = cfg.memory_mib << 20;
    let memory = GuestMemoryMmap::from_ranges(&arch::layout::ram_regions(mem_bytes))
        .map_err(|e| VmmError::Memory(cfg.memory_mib, e.to_string()))?;
    let vm = Vm::new(kvm, memory)?;
    let mem = vm.memory();

    let (entry, setup_header) = load_kernel(mem, cfg)?;
    let initrd = read_initrds(&cfg.initrds)?;
    let initrd_addr = arch::boot::initrd_load_addr(mem, initrd.len())
        .map_err(|e| VmmError::Initrd(e.to_string()))?;
    mem.write_slice(&initrd, initrd_addr)
        .map_err(|e| VmmError::Initrd(e.to_string()))?;
    let initrd_len = initrd.len();
    drop(initrd);
    let mut cmdline = cfg.cmdline.clone().into_bytes();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(arch::layout::CMDLINE_START))
        .map_err(|e| VmmError::Boot(format!("command line: {e}")))?;
    arch::boot::configure_system(
        mem,
        GuestAddress(arch::layout::CMDLINE_START),
        cmdline.len(),
        Some((initrd_addr, initrd_len)),
        cfg.cpus,
        setup_header,
    )
    .map_err(|e| VmmError::Boot(format!("MP table / zero page: {e}")))?;
    log::debug!("kernel command line: {}", cfg.cmdline);

    // Devices.
    let stop = Arc::new(StopSignal::new().map_err(|e| VmmError::Os("eventfd", e))?);
    let guest_panicked = Arc::new(AtomicBool::new(false));
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Os("eventfd", e))?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let interactive = cfg.interactive && io::stdin().is_terminal();
    let serial: SharedSerial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        ConsoleOut::new(io::stdout(), interactive, guest_panicked.clone()),
    )));
    let pio = Bus::new();
    let bus_err = |e: crate::devices::bus::BusError| VmmError::Boot(e.to_string());
    pio.insert(serial.clone(), COM1_BASE.into(), COM1_LEN.into())
        .map_err(bus_err)?;
    pio.insert(
        Arc::new(Mutex::new(i8042::I8042::new(stop.clone()))),
        i8042::BASE.into(),
        i8042::LEN.into(),
    )
    .map_err(bus_err)?;
    let platform_ports = Arc::new(Mutex::new(platform::PlatformPorts::new(
        vmm_start,
        stop.clone(),
    )));
    pio.insert(
        platform_ports.clone(),
        platform::BASE.into(),
        platform::LEN.into(),
    )
    .map_err(bus_err)?;
    let mmio = Arc::new(Bus::new());
    let device_threads = filters.as_ref().map(|f| {
        let stop = stop.clone();
        f.device_hook(move |e| stop.stop(StopReason::SeccompFailed(e.to_string())))
    });
    let dma = attach_pci(&vm, cfg, &pio, &mmio, device_threads)?;
    // Stopped (and its socket file removed) when `run` returns.
    let _api = match (api_endpoint, &dma) {
        (Some(endpoint), Some(d)) => Some(ApiServer::spawn(
            endpoint,
            Arc::new(d.control.clone()),
            api_thread_hook(filters.as_ref(), &stop),
        )?),
        _ => None,
    };
    let ctx = VcpuContext {
        pio: Arc::new(pio),
        mmio,
        stop: stop.clone(),
        guest_panicked,
        seccomp: filters.clone(),
    };

    // vCPUs: configure all before starting any, so a failure leaves nothing running.
    let supported = vm
        .kvm()
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .kvm("KVM_GET_SUPPORTED_CPUID")?;
    let mut vcpus = Vec::with_capacity(cfg.cpus.into());
    for id in 0..cfg.cpus {
        let fd = vm.fd().create_vcpu(id.into()).kvm("KVM_CREATE_VCPU")?;
        let mut cpuid = supported.clone();
        arch::cpuid::filter_cpuid(&mut cpuid, id, cfg.cpus, cfg.hide_xsave)
            .map_err(|e| VmmError::Boot(format!("vCPU {id} CPUID: {e}")))?;
        arch::configure_vcpu(&fd, &cpuid, entry, mem, id == 0)
            .map_err(|e| VmmError::Boot(format!("vCPU {id}: {e}")))?;
        vcpus.push(Vcpu::new(id, fd, ctx.clone()));
    }

    let sources = || MetricsSources {
        emulated_host: cfg.hide_xsave,
        vcpus: cfg.cpus,
        memory_mib: cfg.memory_mib,
        vmm_start,
        platform_ports: platform_ports.clone(),
        memory: vm.memory().clone(),
        device: dma.as_ref().map(|d| d.metrics.clone()),
    };
    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new()
            .map_err(|e| VmmError::Os("epoll", io::Error::other(format!("{e:?}"))))?;
    events.add_subscriber(Arc::new(Mutex::new(StopWatcher { stop: stop.clone() })));
    if let Some(path) = &cfg.metrics {
        events.add_subscriber(Arc::new(Mutex::new(MetricsOnSignal::install(
            path.clone(),
            sources(),
        )?)));
    }
    let _raw_terminal = if interactive {
        events.add_subscriber(Arc::new(Mutex::new(StdinForwarder {
            serial: serial.clone(),
        })));
        RawTerminal::enter()
    } else {
        None
    };

    log::info!(
        "booting {} with {} vCPU(s), {} MiB",
        cfg.kernel.display(),
        cfg.cpus,
        cfg.memory_mib
    );
    for vcpu in vcpus {
        vcpu.spawn()
            .map_err(|e| VmmError::Os("spawn vCPU thread", e))?;
    }
    // Last: the threads above were spawned unfiltered, so no filter stacks on another.
    if let Some(filters) = &filters {
        filters.install(ThreadKind::Main)?;
    }

    let deadline = cfg.timeout.map(|t| Instant::now() + t);
    let reason = loop {
        if let Some(reason) = stop.reason() {
            break reason;
        }
        let wait_ms = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    stop.stop(StopReason::Timeout);
                    continue;
                }
                i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
            }
            None => -1,
        };
        if let Err(e) = events.run_with_timeout(wait_ms) {
            log::warn!("event loop: {e:?}");
        }
    };
    serial.lock().unwrap_or_else(|p| p.into_inner()).flush();
    if let Some(d) = &dma {
        // The process exits without tearing the device down: end the fault log now.
        if let Err(e) = d.control.close_fault_log(Duration::from_secs(2)) {
            log::warn!("fault log: no summary line: {e}");
        }
    }
    let metrics = sources().collect(Some(&reason));
    if let (Some(d), StopReason::Timeout) = (cfg.timeout, &reason) {
        log::error!("guest did not finish within {} s", d.as_secs());
    }
    Ok(Stopped {
        reason,
        metrics,
        _dma: dma,
        _vm: vm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_snapshot_on_sigusr1() {
        let stop = Arc::new(StopSignal::new().unwrap());
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let device = Arc::new(Metrics::new());
        device.doorbell();
        let sources = MetricsSources {
            emulated_host: false,
            vcpus: 2,
            memory_mib: 1,
            vmm_start: Instant::now(),
            platform_ports: Arc::new(Mutex::new(platform::PlatformPorts::new(
                Instant::now(),
                stop,
            ))),
            memory,
            device: Some(device),
        };
        let running = sources.collect(None);
        assert_eq!(running.stop_reason, "running");
        assert_eq!(running.vcpus, 2);
        assert_eq!(running.device.as_ref().unwrap().doorbells, 1);
        let stopped = sources.collect(Some(&StopReason::GuestExited(3)));
        assert_eq!(
            (stopped.stop_reason.as_str(), stopped.exit_code),
            ("guest_exited", 3)
        );

        let path = std::env::temp_dir().join(format!("aiodma-sigusr1-{}.json", std::process::id()));
        block_sigusr1().unwrap();
        let mut sub = MetricsOnSignal::install(path.clone(), sources).unwrap();
        assert!(!sub.drain());
        // SAFETY: raise has no memory-safety preconditions; SIGUSR1 is blocked in this thread,
        // so it stays pending for the signalfd instead of killing the test.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR1) }, 0);
        assert!(sub.drain());
        assert!(!sub.drain());
        sub.sources.collect(None).write(&path).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["stop_reason"], "running");
        assert_eq!(v["device"]["doorbells"], 1);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn initrds_are_concatenated_with_padding() {
        let dir = std::env::temp_dir().join(format!("aiodma-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, b"abcde").unwrap();
        std::fs::write(&b, b"xyz").unwrap();
        let data = read_initrds(&[a, b]).unwrap();
        assert_eq!(data, b"abcde\0\0\0xyz\0");
        assert!(read_initrds(&[dir.join("missing")]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
