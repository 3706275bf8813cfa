//! The transport as a guest driver sees it: every register, width and handshake of SPEC
//! sections 1–5 through `bar_read`/`bar_write`/`config_write`, over a fake engine.

use super::*;
use crate::abi::{feature, status};
use crate::engine::ActivateError;
use crate::engine::{InterruptSink, QueueConfig};
use crate::pci::config::walk_capabilities;
use crate::pci::msix::tests::FakeController;
use crate::pci::{cap_id, reg};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const ALL_FEATURES: u64 =
    feature::FLUSH | feature::GET_ID | feature::RING_EVENT_IDX | feature::VERSION_1;

#[derive(Default)]
struct FakeState {
    activated: Option<(u64, Vec<QueueConfig>)>,
    sink: Option<Arc<dyn InterruptSink>>,
    resets_begun: u32,
    /// Every Bus Master Enable change the transport reported, in order.
    bus_master: Vec<bool>,
    reset_polls_left: u32,
    needs_reset: bool,
    fail_activate: bool,
}

struct FakeEngine {
    state: Arc<Mutex<FakeState>>,
    doorbells: Vec<Arc<EventFd>>,
    cfg: abi::DeviceConfig,
}

impl QueueEngine for FakeEngine {
    fn config(&self) -> abi::DeviceConfig {
        self.cfg
    }
    fn device_features(&self) -> u64 {
        ALL_FEATURES
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
        let mut s = self.state.lock().unwrap();
        if s.fail_activate {
            return Err(ActivateError::BadQueue {
                queue: 0,
                reason: "test".into(),
            });
        }
        s.activated = Some((features, queues.to_vec()));
        s.sink = Some(interrupts);
        Ok(())
    }
    fn begin_reset(&mut self) {
        let mut s = self.state.lock().unwrap();
        s.resets_begun += 1;
        s.activated = None;
    }
    fn reset_complete(&mut self) -> bool {
        let mut s = self.state.lock().unwrap();
        if s.reset_polls_left == 0 {
            true
        } else {
            s.reset_polls_left -= 1;
            false
        }
    }
    fn needs_reset(&self) -> bool {
        self.state.lock().unwrap().needs_reset
    }
    fn set_bus_master(&mut self, on: bool) {
        self.state.lock().unwrap().bus_master.push(on);
    }
}

struct Rig {
    t: Transport,
    state: Arc<Mutex<FakeState>>,
    ctl: Arc<FakeController>,
    doorbells: Vec<Arc<EventFd>>,
}

fn rig(queues: u16) -> Rig {
    let state = Arc::new(Mutex::new(FakeState::default()));
    let doorbells: Vec<_> = (0..queues)
        .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
        .collect();
    let engine = FakeEngine {
        state: state.clone(),
        doorbells: doorbells.clone(),
        cfg: abi::DeviceConfig {
            capacity: 64 << 20,
            max_segments: 32,
            max_transfer: 1 << 20,
            num_queues: queues,
            queue_size_max: 256,
            alignment: 512,
        },
    };
    let ctl = Arc::new(FakeController::default());
    let mut t = Transport::new(Box::new(engine), ctl.clone()).unwrap();
    t.config_space_mut()
        .set_bar_address(0, 0xc000_0000)
        .unwrap();
    t.config_space_mut().set_command(command::MEMORY);
    // The driver enables bus mastering (pci_set_master) through a config write.
    t.config_write(
        reg::COMMAND,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
    Rig {
        t,
        state,
        ctl,
        doorbells,
    }
}

impl Rig {
    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.t.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, len: usize, v: u64) {
        self.t.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    fn status(&mut self) -> u8 {
        self.r(common::DEVICE_STATUS, 1) as u8
    }
    fn set_status(&mut self, s: u8) {
        self.w(common::DEVICE_STATUS, 1, u64::from(s));
    }
    fn negotiate(&mut self, features: u64) -> u8 {
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.w(common::DRIVER_FEATURE_SELECT, 4, 0);
        self.w(common::DRIVER_FEATURE, 4, features & 0xffff_ffff);
        self.w(common::DRIVER_FEATURE_SELECT, 4, 1);
        self.w(common::DRIVER_FEATURE, 4, features >> 32);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.status()
    }
    fn setup_queue(&mut self, q: u16, vector: u16) {
        self.w(common::QUEUE_SELECT, 2, u64::from(q));
        self.w(common::QUEUE_SIZE, 2, 128);
        self.w(common::QUEUE_MSIX_VECTOR, 2, u64::from(vector));
        self.w(common::QUEUE_DESC, 8, 0x1_0000 * (u64::from(q) + 1));
        self.w(common::QUEUE_DRIVER, 4, 0x2000);
        self.w(common::QUEUE_DRIVER + 4, 4, 0x1);
        self.w(common::QUEUE_DEVICE, 8, 0x3000);
        self.w(common::QUEUE_ENABLE, 2, 1);
    }
    fn config_u16(&mut self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.t.config_read(off, &mut b);
        u16::from_le_bytes(b)
    }
    fn enable_msix(&mut self, function_mask: bool) {
        let cap = self.t.msix_cap;
        let mut v = msix::CONTROL_ENABLE;
        if function_mask {
            v |= msix::CONTROL_FUNCTION_MASK;
        }
        self.t.config_write(cap + 2, &v.to_le_bytes());
    }
    fn program_vector(&mut self, vector: u16, masked: bool) {
        let base = bar0::MSIX_TABLE + 16 * u64::from(vector);
        self.w(base, 8, 0xfee0_0000);
        self.w(base + 8, 4, 0x40 + u64::from(vector));
        self.w(base + 12, 4, u64::from(masked));
    }
}

#[test]
fn config_space_identity_bar_and_msix_capability() {
    let mut rig = rig(3);
    let mut cfg = [0u8; 256];
    rig.t.config_read(0, &mut cfg);
    assert_eq!(u16::from_le_bytes([cfg[0], cfg[1]]), 0x1234);
    assert_eq!(u16::from_le_bytes([cfg[2], cfg[3]]), 0xa10d);
    assert_eq!(cfg[8], abi::ABI_VERSION as u8);
    assert_eq!([cfg[9], cfg[10], cfg[11]], [0x00, 0x80, 0x01]);
    assert_eq!(u16::from_le_bytes([cfg[0x2c], cfg[0x2d]]), 0x1234);
    assert_eq!(u16::from_le_bytes([cfg[0x2e], cfg[0x2f]]), 0x0001);
    assert_eq!(cfg[reg::INTERRUPT_PIN as usize], 0);
    assert_eq!(cfg[reg::HEADER_TYPE as usize], 0);
    let caps = walk_capabilities(&cfg);
    assert_eq!(caps.len(), 1);
    let (id, off) = caps[0];
    assert_eq!(id, cap_id::MSIX);
    let off = usize::from(off);
    let control = u16::from_le_bytes([cfg[off + 2], cfg[off + 3]]);
    assert_eq!(control & 0x7ff, 3, "4 vectors: 3 queues + config");
    let table = u32::from_le_bytes(cfg[off + 4..off + 8].try_into().unwrap());
    let pba = u32::from_le_bytes(cfg[off + 8..off + 12].try_into().unwrap());
    assert_eq!(table, bar0::MSIX_TABLE as u32, "BIR 0");
    assert_eq!(pba, bar0::MSIX_PBA as u32, "BIR 0");
    // BAR0 sizing: 16 KiB, 32-bit, non-prefetchable.
    rig.t.config_write(reg::BAR0, &[0xff; 4]);
    let mut bar = [0u8; 4];
    rig.t.config_read(reg::BAR0, &mut bar);
    assert_eq!(u32::from_le_bytes(bar), !(bar0::SIZE as u32 - 1));
    rig.t.config_write(reg::BAR0, &0xc000_4000u32.to_le_bytes());
    assert_eq!(
        rig.t.decoded_bars(),
        vec![BarRegion {
            index: 0,
            addr: 0xc000_4000,
            size: bar0::SIZE,
            kind: BarKind::MEMORY32
        }]
    );
    let fds = rig.t.ioeventfds(0);
    assert_eq!(
        fds.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        vec![0x2000, 0x2004, 0x2008]
    );
    assert!(rig.t.ioeventfds(1).is_empty());
}

#[test]
fn memory_decoding_off_hides_bar0() {
    let mut rig = rig(1);
    assert_eq!(rig.r(common::NUM_QUEUES, 2), 1);
    rig.t.config_write(reg::COMMAND, &[0, 0]);
    assert!(rig.t.decoded_bars().is_empty());
    assert_eq!(rig.r(common::NUM_QUEUES, 2), 0xffff);
    rig.w(common::QUEUE_SELECT, 2, 5);
    rig.t
        .config_write(reg::COMMAND, &command::MEMORY.to_le_bytes());
    assert_eq!(rig.r(common::QUEUE_SELECT, 2), 0);
}

#[test]
fn feature_negotiation_accepts_offered_features() {
    let mut rig = rig(1);
    rig.w(common::DEVICE_FEATURE_SELECT, 4, 0);
    assert_eq!(rig.r(common::DEVICE_FEATURE, 4), ALL_FEATURES & 0xffff_ffff);
    rig.w(common::DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(rig.r(common::DEVICE_FEATURE, 4), 1);
    rig.w(common::DEVICE_FEATURE_SELECT, 4, 2);
    assert_eq!(rig.r(common::DEVICE_FEATURE, 4), 0);
    // Wrong widths read 0.
    rig.w(common::DEVICE_FEATURE_SELECT, 4, 0);
    assert_eq!(rig.r(common::DEVICE_FEATURE, 2), 0);
    let s = rig.negotiate(feature::VERSION_1 | feature::FLUSH);
    assert_eq!(
        s,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    );
    rig.w(common::DRIVER_FEATURE_SELECT, 4, 1);
    assert_eq!(rig.r(common::DRIVER_FEATURE, 4), 1);
    // Features are frozen after FEATURES_OK.
    rig.w(common::DRIVER_FEATURE_SELECT, 4, 0);
    rig.w(common::DRIVER_FEATURE, 4, 0);
    assert_eq!(rig.r(common::DRIVER_FEATURE, 4), feature::FLUSH);
}

#[test]
fn features_ok_rejected_without_version_1_or_with_unknown_bits() {
    let mut rig = rig(1);
    let s = rig.negotiate(feature::FLUSH);
    assert_eq!(s & status::FEATURES_OK, 0, "VERSION_1 missing");
    assert_eq!(s, status::ACKNOWLEDGE | status::DRIVER);
    // DRIVER_OK without FEATURES_OK does nothing.
    rig.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
    assert_eq!(rig.status() & status::DRIVER_OK, 0);
    assert!(rig.state.lock().unwrap().activated.is_none());

    let mut rig = super::tests::rig(1);
    let s = rig.negotiate(feature::VERSION_1 | 1 << 5);
    assert_eq!(s & status::FEATURES_OK, 0, "unknown bit 5");
    let mut rig = super::tests::rig(1);
    let s = rig.negotiate(feature::VERSION_1 | 1 << 40);
    assert_eq!(s & status::FEATURES_OK, 0, "unknown bit 40");
}

#[test]
fn queue_register_rules() {
    let mut rig = rig(2);
    assert_eq!(rig.r(common::NUM_QUEUES, 2), 2);
    rig.w(common::QUEUE_SELECT, 2, 1);
    assert_eq!(rig.r(common::QUEUE_SIZE, 2), 256, "reads the maximum");
    assert_eq!(rig.r(common::QUEUE_NOTIFY_OFF, 2), 1);
    assert_eq!(rig.r(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    for bad in [0u64, 3, 100, 512] {
        rig.w(common::QUEUE_SIZE, 2, bad);
        assert_eq!(rig.r(common::QUEUE_SIZE, 2), 256, "size {bad}");
    }
    rig.w(common::QUEUE_SIZE, 2, 64);
    assert_eq!(rig.r(common::QUEUE_SIZE, 2), 64);
    rig.w(common::QUEUE_SIZE, 4, 32);
    assert_eq!(rig.r(common::QUEUE_SIZE, 2), 64, "wrong width ignored");
    // Vectors past the table read back NO_VECTOR.
    rig.w(common::QUEUE_MSIX_VECTOR, 2, 2);
    assert_eq!(rig.r(common::QUEUE_MSIX_VECTOR, 2), 2);
    rig.w(common::QUEUE_MSIX_VECTOR, 2, 3);
    assert_eq!(rig.r(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    // 64-bit registers: whole, or as two halves in either order.
    rig.w(common::QUEUE_DESC, 8, 0x1234_5678_9abc_def0);
    assert_eq!(rig.r(common::QUEUE_DESC, 8), 0x1234_5678_9abc_def0);
    rig.w(common::QUEUE_DRIVER + 4, 4, 0xaaaa_bbbb);
    rig.w(common::QUEUE_DRIVER, 4, 0xcccc_dddd);
    assert_eq!(rig.r(common::QUEUE_DRIVER, 8), 0xaaaa_bbbb_cccc_dddd);
    assert_eq!(rig.r(common::QUEUE_DRIVER + 4, 4), 0xaaaa_bbbb);
    assert_eq!(rig.r(common::QUEUE_DRIVER, 4), 0xcccc_dddd);
    rig.w(common::QUEUE_DEVICE + 2, 4, 0xffff_ffff);
    rig.w(common::QUEUE_DEVICE, 2, 0xffff);
    assert_eq!(rig.r(common::QUEUE_DEVICE, 8), 0, "odd widths ignored");
    assert_eq!(rig.r(common::QUEUE_DEVICE + 2, 4), 0);
    // Once enabled, the queue's registers are frozen.
    rig.w(common::QUEUE_ENABLE, 2, 1);
    assert_eq!(rig.r(common::QUEUE_ENABLE, 2), 1);
    rig.w(common::QUEUE_SIZE, 2, 16);
    rig.w(common::QUEUE_DESC, 4, 0);
    rig.w(common::QUEUE_ENABLE, 2, 0);
    assert_eq!(rig.r(common::QUEUE_SIZE, 2), 64);
    assert_eq!(rig.r(common::QUEUE_DESC, 8), 0x1234_5678_9abc_def0);
    assert_eq!(rig.r(common::QUEUE_ENABLE, 2), 1);
    // Queue 0 is still writable.
    rig.w(common::QUEUE_SELECT, 2, 0);
    rig.w(common::QUEUE_SIZE, 2, 16);
    assert_eq!(rig.r(common::QUEUE_SIZE, 2), 16);
    // A select past the last queue reads 0 and ignores writes.
    rig.w(common::QUEUE_SELECT, 2, 2);
    assert_eq!(rig.r(common::QUEUE_SELECT, 2), 2);
    rig.w(common::QUEUE_SIZE, 2, 16);
    rig.w(common::QUEUE_DESC, 8, 0x1000);
    for (off, len) in [
        (common::QUEUE_SIZE, 2),
        (common::QUEUE_MSIX_VECTOR, 2),
        (common::QUEUE_ENABLE, 2),
        (common::QUEUE_NOTIFY_OFF, 2),
        (common::QUEUE_DESC, 8),
    ] {
        assert_eq!(rig.r(off, len), 0, "{off:#x}");
    }
    rig.w(common::QUEUE_SELECT, 2, 0xffff);
    assert_eq!(rig.r(common::QUEUE_SIZE, 2), 0);
}

#[test]
fn driver_ok_activates_the_engine_and_freezes_queues() {
    let mut rig = rig(2);
    rig.negotiate(feature::VERSION_1 | feature::RING_EVENT_IDX);
    rig.setup_queue(0, 1);
    rig.w(common::QUEUE_SELECT, 2, 1);
    rig.w(common::QUEUE_SIZE, 2, 32);
    rig.w(common::CONFIG_MSIX_VECTOR, 2, 0);
    assert_eq!(rig.r(common::CONFIG_MSIX_VECTOR, 2), 0);
    rig.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    assert_eq!(rig.status() & status::DRIVER_OK, status::DRIVER_OK);
    let (features, queues) = rig.state.lock().unwrap().activated.clone().unwrap();
    assert_eq!(features, feature::VERSION_1 | feature::RING_EVENT_IDX);
    assert_eq!(
        queues,
        vec![
            QueueConfig {
                size: 128,
                desc: 0x1_0000,
                driver: 0x1_0000_2000,
                device: 0x3000,
                enabled: true
            },
            QueueConfig {
                size: 32,
                desc: 0,
                driver: 0,
                device: 0,
                enabled: false
            }
        ]
    );
    // After DRIVER_OK even disabled queues are frozen.
    rig.w(common::QUEUE_SIZE, 2, 64);
    assert_eq!(rig.r(common::QUEUE_SIZE, 2), 32);
    // NEEDS_RESET from the engine shows in the status; the driver cannot set it.
    assert_eq!(rig.status() & status::NEEDS_RESET, 0);
    rig.state.lock().unwrap().needs_reset = true;
    assert_ne!(rig.status() & status::NEEDS_RESET, 0);
}

#[test]
fn failed_activation_sets_needs_reset_and_raises_the_config_vector() {
    let mut rig = rig(1);
    rig.state.lock().unwrap().fail_activate = true;
    rig.enable_msix(false);
    rig.program_vector(0, false);
    rig.negotiate(feature::VERSION_1);
    rig.w(common::CONFIG_MSIX_VECTOR, 2, 0);
    rig.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    assert_ne!(rig.status() & status::NEEDS_RESET, 0);
    assert_eq!(rig.ctl.take_fired(), vec![0]);
    rig.set_status(0);
    assert_eq!(rig.status(), 0);
}

#[test]
fn reset_waits_for_the_engine() {
    let mut rig = rig(1);
    rig.negotiate(feature::VERSION_1);
    rig.setup_queue(0, 0);
    rig.program_vector(0, false);
    rig.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    rig.state.lock().unwrap().reset_polls_left = 2;
    rig.set_status(0);
    assert_eq!(rig.state.lock().unwrap().resets_begun, 1);
    let old = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    // `begin_reset` polled once already; the engine needs one more poll.
    assert_eq!(rig.status(), old, "old value without DRIVER_OK");
    // Writes during the reset are ignored.
    rig.w(common::QUEUE_SELECT, 2, 0);
    rig.w(common::CONFIG_MSIX_VECTOR, 2, 0);
    rig.set_status(status::ACKNOWLEDGE);
    assert_eq!(rig.status(), 0, "engine done: reset complete");
    // Every register is back at its initial value...
    assert_eq!(rig.r(common::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    assert_eq!(rig.r(common::QUEUE_SIZE, 2), 256);
    assert_eq!(rig.r(common::QUEUE_ENABLE, 2), 0);
    assert_eq!(rig.r(common::QUEUE_DESC, 8), 0);
    assert_eq!(rig.r(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    rig.w(common::DRIVER_FEATURE_SELECT, 4, 1);
    assert_eq!(rig.r(common::DRIVER_FEATURE, 4), 0);
    // ...but the MSI-X table keeps its contents.
    assert_eq!(rig.r(bar0::MSIX_TABLE, 8), 0xfee0_0000);
    // The queues are writable again.
    rig.w(common::QUEUE_SIZE, 2, 8);
    assert_eq!(rig.r(common::QUEUE_SIZE, 2), 8);
}

#[test]
fn reset_of_an_idle_device_is_immediate() {
    let mut rig = rig(1);
    rig.state.lock().unwrap().reset_polls_left = 5;
    rig.negotiate(feature::VERSION_1);
    rig.w(common::QUEUE_SIZE, 2, 64);
    rig.set_status(0);
    assert_eq!(rig.status(), 0);
    assert_eq!(
        rig.state.lock().unwrap().resets_begun,
        0,
        "engine never started"
    );
    assert_eq!(rig.r(common::QUEUE_SIZE, 2), 256);
    // Registers are writable at once.
    rig.w(common::QUEUE_SIZE, 2, 32);
    assert_eq!(rig.r(common::QUEUE_SIZE, 2), 32);
    assert_eq!(
        rig.negotiate(feature::VERSION_1) & status::FEATURES_OK,
        status::FEATURES_OK
    );
    // A failed activation started the engine: its reset waits.
    rig.state.lock().unwrap().fail_activate = true;
    rig.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    rig.set_status(0);
    assert_eq!(rig.state.lock().unwrap().resets_begun, 1);
    assert_ne!(rig.status(), 0, "engine still resetting");
    // Writing 0 again while resetting does not begin another engine reset.
    rig.set_status(0);
    assert_eq!(rig.state.lock().unwrap().resets_begun, 1);
    while rig.status() != 0 {}
    assert_eq!(rig.state.lock().unwrap().reset_polls_left, 0);
}

#[test]
fn queue_interrupts_follow_msix_masking() {
    let mut rig = rig(2);
    rig.negotiate(feature::VERSION_1);
    rig.setup_queue(0, 1);
    rig.setup_queue(1, 2);
    rig.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    let sink = rig.state.lock().unwrap().sink.clone().unwrap();
    // MSI-X disabled: dropped.
    sink.signal_queue(0);
    assert!(rig.ctl.take_fired().is_empty());
    rig.enable_msix(false);
    assert_eq!(
        rig.config_u16(rig.t.msix_cap + 2) & msix::CONTROL_ENABLE,
        msix::CONTROL_ENABLE
    );
    rig.program_vector(1, false);
    rig.program_vector(2, true);
    sink.signal_queue(0);
    sink.signal_queue(1);
    sink.signal_queue(7);
    sink.signal_config(); // NO_VECTOR
    assert_eq!(rig.ctl.take_fired(), vec![1]);
    assert_eq!(rig.r(bar0::MSIX_PBA, 8), 1 << 2);
    rig.w(bar0::MSIX_TABLE + 2 * 16 + 12, 4, 0);
    assert_eq!(rig.ctl.take_fired(), vec![2]);
    assert_eq!(rig.r(bar0::MSIX_PBA, 8), 0);
    // Function mask.
    rig.enable_msix(true);
    sink.signal_queue(0);
    assert!(rig.ctl.take_fired().is_empty());
    rig.enable_msix(false);
    assert_eq!(rig.ctl.take_fired(), vec![1]);
    // The routes the platform saw.
    let routes = rig.ctl.routes.lock().unwrap().clone();
    assert!(routes.contains(&(1, 0xfee0_0000, 0x41, false)));
    assert!(routes.contains(&(2, 0xfee0_0000, 0x42, false)));
    // After a reset the old session's sink is dead.
    rig.set_status(0);
    sink.signal_queue(0);
    assert!(rig.ctl.take_fired().is_empty());
}

#[test]
fn doorbells_and_device_config() {
    let mut rig = rig(2);
    rig.w(bar0::NOTIFY + 4, 2, 1);
    assert_eq!(rig.doorbells[1].read().unwrap(), 1);
    rig.w(bar0::NOTIFY, 4, 0);
    assert_eq!(rig.doorbells[0].read().unwrap(), 1);
    // Wrong width, misaligned, or past the last queue: nothing.
    rig.w(bar0::NOTIFY, 1, 0);
    rig.w(bar0::NOTIFY + 2, 2, 0);
    rig.w(bar0::NOTIFY + 8, 4, 2);
    assert!(rig.doorbells[0].read().is_err());
    assert!(rig.doorbells[1].read().is_err());
    assert_eq!(rig.r(bar0::NOTIFY, 4), 0);
    // Device configuration, any width.
    assert_eq!(rig.r(bar0::CONFIG + abi::config::CAPACITY, 8), 64 << 20);
    assert_eq!(rig.r(bar0::CONFIG + abi::config::CAPACITY + 2, 2), 0x400);
    assert_eq!(rig.r(bar0::CONFIG + abi::config::MAX_SEGMENTS, 4), 32);
    assert_eq!(rig.r(bar0::CONFIG + abi::config::MAX_TRANSFER, 4), 1 << 20);
    assert_eq!(rig.r(bar0::CONFIG + abi::config::NUM_QUEUES, 2), 2);
    assert_eq!(rig.r(bar0::CONFIG + abi::config::QUEUE_SIZE_MAX, 2), 256);
    assert_eq!(rig.r(bar0::CONFIG + abi::config::ALIGNMENT, 4), 512);
    assert_eq!(rig.r(bar0::CONFIG + abi::config::ALIGNMENT + 2, 8), 0);
    rig.w(bar0::CONFIG, 8, 0);
    assert_eq!(rig.r(bar0::CONFIG, 8), 64 << 20, "read-only");
    assert_eq!(rig.r(bar0::CONFIG + 0x100, 4), 0);
}

#[test]
fn rejects_bad_engines() {
    for (queues, doorbells, max, want) in [
        (0u16, 0usize, 256u16, TransportError::QueueCount(0)),
        (64, 64, 256, TransportError::QueueCount(64)),
        (
            2,
            1,
            256,
            TransportError::Doorbells {
                doorbells: 1,
                queues: 2,
            },
        ),
        (1, 1, 100, TransportError::QueueSizeMax(100)),
        (1, 1, 0, TransportError::QueueSizeMax(0)),
    ] {
        let engine = FakeEngine {
            state: Arc::default(),
            doorbells: (0..doorbells)
                .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
                .collect(),
            cfg: abi::DeviceConfig {
                num_queues: queues,
                queue_size_max: max,
                ..Default::default()
            },
        };
        let err =
            Transport::new(Box::new(engine), Arc::new(FakeController::default())).unwrap_err();
        assert_eq!(err, want);
    }
}

#[test]
fn arbitrary_accesses_never_panic() {
    let mut rig = rig(abi::bar0::MAX_QUEUES);
    // A deterministic xorshift stream of offsets, widths and values.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..200_000 {
        let r = next();
        let offset = match r % 4 {
            0 => r >> 40 & 0x3f,
            1 => r >> 32 & 0x7fff,
            2 => (r >> 32 & 0xfff) | 0x3000,
            _ => r >> 8,
        };
        let len = [1usize, 2, 3, 4, 5, 8, 16, 0][(r >> 4) as usize % 8];
        let mut buf = vec![0u8; len];
        let value = next().to_le_bytes();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = value[i % 8];
        }
        if r & 8 == 0 {
            rig.t.bar_read(0, offset, &mut buf);
        } else {
            rig.t.bar_write((r >> 20) as u8 % 2, offset, &buf);
        }
        let cfg_off = r >> 48 & 0x1ff;
        if r & 0x10 == 0 {
            rig.t.config_read(cfg_off, &mut buf);
        } else if cfg_off != reg::COMMAND {
            rig.t.config_write(cfg_off, &buf);
        }
    }
}

#[test]
fn bus_master_enable_reaches_the_engine_and_gates_interrupts() {
    let mut rig = rig(1);
    assert_eq!(rig.state.lock().unwrap().bus_master, vec![false, true]);
    assert_eq!(
        rig.negotiate(ALL_FEATURES) & status::FEATURES_OK,
        status::FEATURES_OK
    );
    rig.setup_queue(0, 0);
    rig.enable_msix(false);
    rig.program_vector(0, false);
    rig.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    let sink = rig.state.lock().unwrap().sink.clone().unwrap();
    sink.signal_queue(0);
    assert_eq!(rig.ctl.take_fired(), vec![0]);
    // Cleared: the engine is told, and no MSI (a memory write) leaves the function.
    rig.t
        .config_write(reg::COMMAND, &command::MEMORY.to_le_bytes());
    assert_eq!(
        rig.state.lock().unwrap().bus_master,
        vec![false, true, false]
    );
    sink.signal_queue(0);
    assert_eq!(rig.ctl.take_fired(), Vec::<u16>::new());
    // Writes that leave the bit alone are not reported again.
    rig.t
        .config_write(reg::COMMAND, &command::MEMORY.to_le_bytes());
    rig.t.config_write(
        reg::COMMAND,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
    assert_eq!(
        rig.state.lock().unwrap().bus_master,
        vec![false, true, false, true]
    );
    sink.signal_queue(0);
    assert_eq!(rig.ctl.take_fired(), vec![0]);
}
