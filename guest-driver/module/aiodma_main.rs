// SPDX-License-Identifier: GPL-2.0
//! aiodma: guest driver for the aiodma PCI DMA device (`device/SPEC.md`).
//!
//! Binds the PCI function, negotiates features, programs one split virtqueue per MSI-X vector
//! and exposes `/dev/aiodmaN`, whose `read_iter`/`write_iter` do real kiocb AIO: an
//! asynchronous kiocb (libaio `io_submit`, io_uring) is queued on the device, the call returns
//! `-EIOCBQUEUED`, and the queue's interrupt thread calls `ki_complete`. User buffers are pinned
//! and handed to the device by DMA address (zero copy).
//!
//! Module map (crate root `aiodma_main.rs`; `kdebug.c` holds the dynamic-debug sites): `hw`
//! registers, `ring` virtqueues, `mapping` pinned DMA buffers, `iocb` the kiocb shim, `wait`
//! killable sleeps, `request` one request's state machine, `queue` the lock-held bookkeeping,
//! `dev` the shared device state and completion path, `submit` submission, `recovery` watchdog,
//! cancel, reset and removal, `chardev` the file operations.

use kernel::{
    debugfs,
    device::Core,
    dma::{Device as _, DmaMask},
    fmt,
    irq::{self, IrqReturn},
    pci,
    prelude::*,
    sync::{atomic::Relaxed, Arc},
};

// The ABI is shared with host code, where its items are public API (it allows dead code itself).
#[allow(unreachable_pub)]
#[path = "../../device/src/abi.rs"]
mod abi;

mod chardev;
mod dev;
mod hw;
mod iocb;
mod mapping;
mod queue;
mod recovery;
mod request;
mod ring;
mod submit;
mod wait;

extern "C" {
    // kdebug.c: the module's dynamic-debug sites.
    fn aiodma_kdebug_enabled() -> bool;
    fn aiodma_kdebug(args: *const core::ffi::c_void);
}

/// Whether the kiocb state-transition log is on (dynamic debug: `module aiodma +p`).
pub(crate) fn kdebug_enabled() -> bool {
    // SAFETY: a plain C function without arguments.
    unsafe { aiodma_kdebug_enabled() }
}

/// Log one kiocb state transition through the dynamic-debug site. The sites run under the
/// queue spinlock, so nothing is allocated: printk formats the arguments itself (`%pA`).
pub(crate) fn kdebug_args(args: core::fmt::Arguments<'_>) {
    // SAFETY: `%pA` reads a `core::fmt::Arguments` through this pointer, during the call only.
    unsafe { aiodma_kdebug(core::ptr::from_ref(&args).cast::<core::ffi::c_void>()) };
}

/// `pr_debug!` for kiocb state transitions, controlled by dynamic debug
/// (`echo 'module aiodma +p' > /proc/dynamic_debug/control`, or `aiodma.dyndbg=+p`). The
/// kernel's Rust `pr_debug!` is compiled out without CONFIG_RUST_DEBUG_ASSERTIONS and has no
/// dynamic-debug descriptor, so the sites live in kdebug.c; nothing is formatted while off.
macro_rules! kdebug {
    ($($arg:tt)*) => {
        if crate::kdebug_enabled() {
            crate::kdebug_args(format_args!($($arg)*));
        }
    };
}
pub(crate) use kdebug;

/// Queue size the driver asks for (the device may offer less).
const QUEUE_SIZE: u16 = 256;
/// Most queues (and MSI-X vectors) the driver uses.
const MAX_QUEUES: u16 = 8;
/// Device node names, one per bound device; the lowest free one is taken at probe and given
/// back at unbind, so a rebound device gets its old name.
const NAMES: [&CStr; 4] = [c"aiodma0", c"aiodma1", c"aiodma2", c"aiodma3"];
static NAMES_IN_USE: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// A claimed entry of `NAMES`, released on drop.
struct NameSlot(usize);

impl NameSlot {
    fn claim() -> Result<Self> {
        use core::sync::atomic::Ordering::AcqRel;
        for i in 0..NAMES.len() {
            if NAMES_IN_USE.fetch_or(1 << i, AcqRel) & (1 << i) == 0 {
                return Ok(NameSlot(i));
            }
        }
        Err(ENOSPC)
    }

    fn name(&self) -> &'static CStr {
        NAMES[self.0]
    }
}

impl Drop for NameSlot {
    fn drop(&mut self) {
        NAMES_IN_USE.fetch_and(!(1 << self.0), core::sync::atomic::Ordering::AcqRel);
    }
}

/// Vendor 0x1234 is not in the kernel's vendor table, whose constructor is private.
// SAFETY: `pci::Vendor` is `#[repr(transparent)]` over the 16-bit vendor ID, and every 16-bit
// value is a vendor ID the PCI core can match.
const VENDOR: pci::Vendor =
    unsafe { core::mem::transmute::<u16, pci::Vendor>(abi::pci_id::VENDOR) };

kernel::pci_device_table!(
    PCI_TABLE,
    <AiodmaDriver as pci::Driver>::IdInfo,
    [(
        pci::DeviceId::from_id(VENDOR, abi::pci_id::DEVICE as u32),
        ()
    )]
);

/// A queue's interrupt: completions run in the threaded half (process context), where
/// unpinning pages and `ki_complete` may sleep.
struct QueueIrq {
    dev: Arc<dev::AioDev>,
    index: usize,
}

impl irq::ThreadedHandler for QueueIrq {
    fn handle_threaded(&self) -> IrqReturn {
        self.dev.complete_queue(self.index, dev::Reaper::Irq);
        IrqReturn::Handled
    }
}

/// The configuration-change interrupt (the vector after the queues'), raised by the device
/// when it sets NEEDS_RESET: it only queues a recovery pass, so it runs as a hard handler.
struct ConfigIrq {
    dev: Arc<dev::AioDev>,
}

impl irq::Handler for ConfigIrq {
    fn handle(&self) -> IrqReturn {
        self.dev.config_interrupt();
        IrqReturn::Handled
    }
}

/// The debugfs `stats` file: every driver statistic, one `name: value` line each.
fn show_stats(dev: &Arc<dev::AioDev>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    dev.write_stats(f)
}

/// The device is live (DRIVER_OK on our rings) while this exists. Dropping it, on a probe
/// failure after bring-up or when the driver data goes after unbind, stops the watchdog and
/// the device and fails what it held before the rings can be freed (`shutdown` is idempotent).
struct Live(Arc<dev::AioDev>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

#[pin_data(PinnedDrop)]
struct AiodmaData<'bound> {
    // Drop order is declaration order: the device stops first; interrupts are freed before
    // their vectors.
    live: Live,
    irqs: KVec<Pin<KBox<irq::ThreadedRegistration<'bound, QueueIrq>>>>,
    config_irq: Option<Pin<KBox<irq::Registration<'bound, ConfigIrq>>>>,
    #[pin]
    chardev: chardev::Chardev,
    vectors: KBox<pci::IrqVectorRegistration<'bound>>,
    /// `/sys/kernel/debug/aiodmaN/stats`.
    stats: Pin<KBox<debugfs::File<Arc<dev::AioDev>>>>,
    dev: Arc<dev::AioDev>,
    // After `chardev`: the name is free again only once the node is gone.
    name: NameSlot,
}

struct AiodmaDriver;

fn setup<'bound>(pdev: &'bound pci::Device<Core<'_>>) -> Result<(Arc<dev::AioDev>, u16)> {
    pdev.enable_device_mem()?;
    pdev.set_master();
    // SAFETY: no DMA mapping exists yet for this device.
    unsafe { pdev.dma_set_mask_and_coherent(DmaMask::new::<64>())? };
    let bar = pdev.iomap_region_sized::<{ hw::BAR0_SIZE }>(0, c"aiodma")?;
    hw::reset(&bar)?;
    hw::set_status(&bar, abi::status::ACKNOWLEDGE | abi::status::DRIVER);
    let offered = hw::device_features(&bar);
    let wanted = abi::feature::VERSION_1
        | abi::feature::RING_EVENT_IDX
        | abi::feature::FLUSH
        | abi::feature::GET_ID;
    if offered & abi::feature::VERSION_1 == 0 {
        dev_err!(pdev, "device lacks VERSION_1 (features {:#x})\n", offered);
        return Err(ENODEV);
    }
    let features = offered & wanted;
    let mut config = hw::config(&bar);
    if config.num_queues == 0 || config.queue_size_max < 2 || config.max_segments == 0 {
        dev_err!(pdev, "unusable device configuration\n");
        return Err(ENODEV);
    }
    config.num_queues = config.num_queues.min(MAX_QUEUES);
    // The largest power of two the device accepts, at most QUEUE_SIZE; a request needs at
    // least a header, one data and one status descriptor, so smaller rings are refused.
    let size = QUEUE_SIZE.min(1u16 << (15 - config.queue_size_max.leading_zeros()));
    if size < 4 {
        dev_err!(
            pdev,
            "queue size {} is too small (need 4)\n",
            config.queue_size_max
        );
        return Err(ENODEV);
    }
    let bar = bar.into_devres()?;
    // The watchdog checks every 100 ms: a shorter timeout would reset a healthy device.
    let timeout_ms = module_parameters::timeout_ms.value().max(100);
    let aio = dev::AioDev::new(pdev, bar, config, features, size, timeout_ms)?;
    Ok((aio, size))
}

impl pci::Driver for AiodmaDriver {
    type IdInfo = ();
    type Data<'bound> = AiodmaData<'bound>;

    const ID_TABLE: pci::IdTable<Self::IdInfo> = &PCI_TABLE;

    fn probe<'bound>(
        pdev: &'bound pci::Device<Core<'_>>,
        _info: Option<&'bound Self::IdInfo>,
    ) -> impl PinInit<Self::Data<'bound>, Error> + 'bound {
        pin_init::pin_init_scope(move || {
            let (aio, size) = setup(pdev)?;
            let nq = aio.config.num_queues;
            let features = aio.features;
            // One vector per queue, and one more for configuration changes if the device has it
            // (without it the watchdog polls for NEEDS_RESET).
            let vectors = KBox::new(
                pdev.alloc_irq_vectors(
                    u32::from(nq),
                    u32::from(nq) + 1,
                    pci::IrqTypes::default().with(pci::IrqType::MsiX),
                )?,
                GFP_KERNEL,
            )?;
            // SAFETY: the box is moved into the returned data, where it is declared after (so
            // dropped after) the interrupt registrations that borrow it; its heap address does
            // not change when the box moves.
            let vref: &'bound pci::IrqVectorRegistration<'bound> =
                unsafe { &*core::ptr::from_ref(&*vectors) };
            let mut irqs = KVec::with_capacity(usize::from(nq), GFP_KERNEL)?;
            for i in 0..usize::from(nq) {
                let handler = QueueIrq {
                    dev: aio.clone(),
                    index: i,
                };
                // SAFETY: the registration is stored in the driver data and dropped normally.
                let reg = unsafe {
                    irq::ThreadedRegistration::new(
                        vref.index(i)?.into(),
                        irq::Flags::TRIGGER_NONE,
                        c"aiodma",
                        Ok::<_, Error>(handler),
                    )
                };
                irqs.push(KBox::pin_init(reg, GFP_KERNEL)?, GFP_KERNEL)?;
            }
            let config_irq = if vref.len() > usize::from(nq) {
                let handler = ConfigIrq { dev: aio.clone() };
                // SAFETY: the registration is stored in the driver data and dropped normally.
                let reg = unsafe {
                    irq::Registration::new(
                        vref.index(usize::from(nq))?.into(),
                        irq::Flags::TRIGGER_NONE,
                        c"aiodma-config",
                        Ok::<_, Error>(handler),
                    )
                };
                let reg = KBox::pin_init(reg, GFP_KERNEL)?;
                aio.config_vector.store(u32::from(nq), Relaxed);
                Some(reg)
            } else {
                None
            };
            let slot = NameSlot::claim()?;
            let stats = KBox::pin_init(
                debugfs::Dir::new(slot.name()).read_callback_file(
                    c"stats",
                    Ok::<_, Error>(aio.clone()),
                    &show_stats,
                ),
                GFP_KERNEL,
            )?;
            // From here a failure stops the device (and the recovery works the configuration
            // interrupt may have queued) before the rings go.
            let live = Live(aio.clone());
            hw::bring_up(
                aio.bar_access(pdev)?,
                features,
                &aio.queue_addrs()?,
                aio.config_vector(),
            )?;
            let name = slot.name();
            dev_info!(
                pdev,
                "{}: {} queue(s) x {}, capacity {} bytes, features {:#x}, ABI v{}\n",
                name,
                nq,
                size,
                aio.config.capacity,
                aio.features,
                abi::ABI_VERSION
            );
            Ok(try_pin_init!(AiodmaData {
                irqs,
                config_irq,
                chardev <- chardev::Chardev::register(name, aio.clone()),
                vectors,
                stats,
                name: slot,
                // The watchdog starts last, when nothing can fail any more.
                live: {
                    live.0.start_watchdog();
                    live
                },
                dev: aio,
            }))
        })
    }

    fn unbind<'bound>(_pdev: &'bound pci::Device<Core<'_>>, this: Pin<&Self::Data<'bound>>) {
        this.dev.shutdown();
    }
}

#[pinned_drop]
impl PinnedDrop for AiodmaData<'_> {
    fn drop(self: Pin<&mut Self>) {}
}

kernel::module_pci_driver! {
    type: AiodmaDriver,
    name: "aiodma",
    authors: ["aiodma developers"],
    description: "Asynchronous I/O driver for the aiodma PCI DMA device",
    license: "GPL",
    params: {
        timeout_ms: u32 {
            default: 10000,
            description: "Per-request timeout in ms: then the device is reset and the request fails with -ETIMEDOUT",
        },
    },
}
