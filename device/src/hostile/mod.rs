//! The hostile-guest conformance suite: the real transport, engine and backends driven by a
//! guest that breaks every rule it can. Each case asserts what the device does (a status,
//! NEEDS_RESET, or nothing), that it stays within its work budget, and that it writes no guest
//! memory outside the used rings, status bytes and read buffers it was offered. Every test is
//! named `hostile_*`, so `cargo test hostile` runs the suite.

use std::cell::Cell;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::abi::{self, bar0, common, status};
use crate::engine::testdrv::{guest_memory, Driver, Posted, MEM_SIZE};
use crate::engine::{Backing, DeviceOptions, Engine, FaultRule, QueueEngine, DEVICE_FEATURES};
use crate::metrics::{DeviceMetrics, Metrics};
use crate::pci::config::walk_capabilities;
use crate::pci::msix::tests::FakeController;
use crate::pci::{cap_id, command, reg, PciFunction};
use crate::transport::Transport;

mod lifecycle;
mod registers;
mod rings;

/// Where the test driver lays out rings (`testdrv::Driver::new`).
const RING_BASE: u64 = 0x10_0000;

/// Where the rig places BAR0.
pub const BAR0_ADDR: u64 = 0xc000_0000;

/// The most descriptor-table entries one pass may read: 32 requests of at most
/// `max_segments + 2` descriptors each (`engine::worker::REQUESTS_PER_PASS`).
pub fn pass_budget(max_segments: u32) -> u64 {
    32 * (u64::from(max_segments) + 2)
}

/// A device as a guest sees it: PCI config space and BAR0 of the real transport around the
/// real engine, over `drv`'s guest memory.
pub struct Dev {
    pub t: Transport,
    pub drv: Driver,
    pub msi: Arc<FakeController>,
    pub metrics: Arc<Metrics>,
    pub doorbells: Vec<Arc<vmm_sys_util::eventfd::EventFd>>,
    pub queues: u16,
    pub msix_cap: u64,
}

/// Device options over an 8 MiB memory store.
pub fn options(queues: u16, faults: &[&str]) -> DeviceOptions {
    DeviceOptions {
        queues,
        queue_size_max: abi::ring::MAX_QUEUE_SIZE,
        backing: Backing::Memory { size: 8 << 20 },
        faults: faults
            .iter()
            .map(|f| FaultRule::parse(f).unwrap())
            .collect(),
        fault_seed: 3,
        ..DeviceOptions::default()
    }
}

/// A device with `queues` queues of `size` entries, brought up like a driver does.
pub fn device(queues: u16, size: u16, faults: &[&str]) -> Dev {
    device_with(options(queues, faults), size, guest_memory())
}

/// A device over `mem`, not brought up yet (decoding and bus mastering on, MSI-X enabled, every
/// vector programmed and unmasked).
pub fn device_unstarted(opts: DeviceOptions, size: u16, mem: GuestMemoryMmap) -> Dev {
    let queues = opts.queues;
    let engine = Engine::new(opts, mem.clone()).unwrap();
    let metrics = engine.metrics_handle();
    let doorbells = engine.doorbells();
    let msi = Arc::new(FakeController::default());
    let mut t = Transport::new(Box::new(engine), msi.clone()).unwrap();
    t.config_space_mut().set_bar_address(0, BAR0_ADDR).unwrap();
    t.config_space_mut().set_command(command::MEMORY);
    let mut cfg = [0u8; 256];
    t.config_read(0, &mut cfg);
    let msix_cap = walk_capabilities(&cfg)
        .into_iter()
        .find(|(id, _)| *id == cap_id::MSIX)
        .map(|(_, off)| u64::from(off))
        .unwrap();
    let drv = Driver::new(mem, doorbells.clone(), queues, size);
    let mut dev = Dev {
        t,
        drv,
        msi,
        metrics,
        doorbells,
        queues,
        msix_cap,
    };
    dev.set_command(command::MEMORY | command::BUS_MASTER);
    dev.t.config_write(
        msix_cap + 2,
        &crate::pci::msix::CONTROL_ENABLE.to_le_bytes(),
    );
    for v in 0..=queues {
        dev.program_vector(v, false);
    }
    dev
}

/// [`device_unstarted`], then brought up.
pub fn device_with(opts: DeviceOptions, size: u16, mem: GuestMemoryMmap) -> Dev {
    let mut dev = device_unstarted(opts, size, mem);
    assert_eq!(dev.bring_up() & status::DRIVER_OK, status::DRIVER_OK);
    dev
}

impl Dev {
    pub fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.t.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    pub fn w(&mut self, off: u64, len: usize, v: u64) {
        self.t.bar_write(0, off, &v.to_le_bytes()[..len]);
    }

    pub fn status(&mut self) -> u8 {
        self.r(common::DEVICE_STATUS, 1) as u8
    }

    pub fn set_status(&mut self, s: u8) {
        self.w(common::DEVICE_STATUS, 1, u64::from(s));
    }

    pub fn set_command(&mut self, bits: u16) {
        self.t.config_write(reg::COMMAND, &bits.to_le_bytes());
    }

    pub fn program_vector(&mut self, vector: u16, masked: bool) {
        let base = bar0::MSIX_TABLE + 16 * u64::from(vector);
        self.w(base, 8, 0xfee0_0000);
        self.w(base + 8, 4, 0x40 + u64::from(vector));
        self.w(base + 12, 4, u64::from(masked));
    }

    /// Feature negotiation, queue set-up from the driver's rings, DRIVER_OK. Returns the status.
    pub fn bring_up(&mut self) -> u8 {
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.w(common::DRIVER_FEATURE_SELECT, 4, 0);
        // Not INTEGRITY: the test driver lays out 1-byte status descriptors.
        let features = DEVICE_FEATURES & !abi::feature::INTEGRITY;
        self.w(common::DRIVER_FEATURE, 4, features & 0xffff_ffff);
        self.w(common::DRIVER_FEATURE_SELECT, 4, 1);
        self.w(common::DRIVER_FEATURE, 4, features >> 32);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        for (q, cfg) in self.drv.configs().into_iter().enumerate() {
            self.w(common::QUEUE_SELECT, 2, q as u64);
            self.w(common::QUEUE_SIZE, 2, u64::from(cfg.size));
            self.w(common::QUEUE_MSIX_VECTOR, 2, q as u64);
            self.w(common::QUEUE_DESC, 8, cfg.desc);
            self.w(common::QUEUE_DRIVER, 8, cfg.driver);
            self.w(common::QUEUE_DEVICE, 8, cfg.device);
            self.w(common::QUEUE_ENABLE, 2, 1);
        }
        self.w(common::CONFIG_MSIX_VECTOR, 2, u64::from(self.queues));
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        self.status()
    }

    /// Writes 0 to DEVICE_STATUS and polls until it reads 0. Returns how long that took.
    pub fn reset(&mut self) -> Duration {
        let start = Instant::now();
        self.set_status(0);
        while self.status() != 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "reset did not complete"
            );
            std::thread::yield_now();
        }
        start.elapsed()
    }

    /// Fresh, zeroed rings for every queue at the start of the ring area (the test driver
    /// forgets every chain it had).
    pub fn fresh_rings(&mut self) {
        let size = self.drv.rings[0].size;
        self.drv.ring_base = RING_BASE;
        self.drv.init_rings(self.queues, size);
    }

    /// A reset, fresh rings, and the bring-up again.
    pub fn reset_and_bring_up(&mut self) {
        self.reset();
        self.fresh_rings();
        assert_eq!(self.bring_up() & status::DRIVER_OK, status::DRIVER_OK);
    }

    /// A doorbell write through BAR0 (as an ioeventfd would deliver it).
    pub fn kick(&mut self, q: u16) {
        self.w(
            bar0::NOTIFY + bar0::NOTIFY_STRIDE * u64::from(q),
            2,
            u64::from(q),
        );
    }

    pub fn needs_reset(&mut self) -> bool {
        self.status() & status::NEEDS_RESET != 0
    }

    pub fn metrics(&self) -> DeviceMetrics {
        self.metrics.snapshot()
    }

    /// A WRITE of `data` at `offset` on queue `q`; returns its status.
    pub fn write(&mut self, q: u16, offset: u64, data: &[u8]) -> u8 {
        let p = self.drv.post_write(usize::from(q), 1, offset, data);
        self.kick(q);
        self.complete(q, &p)
    }

    /// A READ of `len` bytes at `offset` on queue `q`; returns its status and data.
    pub fn read(&mut self, q: u16, offset: u64, len: u32) -> (u8, Vec<u8>) {
        let p = self.drv.post_read(usize::from(q), 2, offset, &[len]);
        self.kick(q);
        let s = self.complete(q, &p);
        (s, self.drv.data(&p))
    }

    fn complete(&mut self, q: u16, p: &Posted) -> u8 {
        let used = self.drv.wait_used(usize::from(q), 1);
        assert!(
            used.iter().any(|(id, _)| *id == u32::from(p.head)),
            "head {} not in {used:?}",
            p.head
        );
        self.drv.status(p)
    }

    /// The device still works: a write and a read back on every queue.
    pub fn assert_works(&mut self, what: &str) {
        assert!(!self.needs_reset(), "{what}: NEEDS_RESET");
        for q in 0..self.queues {
            self.assert_queue_works(q, what);
        }
    }

    /// A write and a read back on queue `q`.
    pub fn assert_queue_works(&mut self, q: u16, what: &str) {
        let data = crate::engine::testdrv::pattern(4096, q as u8 ^ 0x5a);
        let offset = 8192 * (1 + u64::from(q));
        assert_eq!(self.write(q, offset, &data), abi::req_status::OK, "{what}");
        let (s, back) = self.read(q, offset, 4096);
        assert_eq!(s, abi::req_status::OK, "{what}");
        assert_eq!(back, data, "{what}: data");
    }

    /// Guest memory ranges the device may write: the used rings.
    pub fn used_rings(&self) -> Vec<(u64, u64)> {
        self.drv
            .rings
            .iter()
            .map(|r| (r.used, 6 + 8 * u64::from(r.size)))
            .collect()
    }
}

/// A copy of all of guest memory, to find what the device wrote.
pub struct Snapshot(Vec<u8>);

impl Snapshot {
    pub fn take(mem: &GuestMemoryMmap) -> Snapshot {
        let mut b = vec![0u8; MEM_SIZE as usize];
        mem.read_slice(&mut b, GuestAddress(0)).unwrap();
        Snapshot(b)
    }

    /// Addresses (the first few) that changed since the snapshot outside `allowed`
    /// (start, length) ranges.
    pub fn changed_outside(&self, mem: &GuestMemoryMmap, allowed: &[(u64, u64)]) -> Vec<u64> {
        let now = Snapshot::take(mem);
        let mut out = Vec::new();
        for (i, (a, b)) in self.0.iter().zip(&now.0).enumerate() {
            let addr = i as u64;
            if a != b
                && !allowed
                    .iter()
                    .any(|&(start, len)| addr >= start && addr < start + len)
            {
                out.push(addr);
                if out.len() == 8 {
                    break;
                }
            }
        }
        out
    }
}

thread_local! {
    static WARNINGS: Cell<u64> = const { Cell::new(0) };
}

/// Counts warnings (and errors) logged on each thread.
struct CountingLogger;

impl log::Log for CountingLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            WARNINGS.with(|w| w.set(w.get() + 1));
        }
    }
    fn flush(&self) {}
}

/// Warnings logged on this thread so far (installs the counting logger on first use).
pub fn warnings_on_this_thread() -> u64 {
    static INSTALL: Once = Once::new();
    static LOGGER: CountingLogger = CountingLogger;
    INSTALL.call_once(|| {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Warn);
        }
    });
    WARNINGS.with(|w| w.get())
}

/// Waits (10 s at most) for `cond`.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Lets the device thread run for a while (to show that something does *not* happen).
pub fn settle() {
    std::thread::sleep(Duration::from_millis(50));
}
