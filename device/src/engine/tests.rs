//! Engine tests: a test driver builds rings in guest memory, kicks the doorbells and checks the
//! used rings, the status bytes, the interrupts and the metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::Bytes;

use super::testdrv::*;
use super::*;
use crate::abi::{feature, op, req_status};
use crate::engine::QueueEngine;

/// Every feature but INTEGRITY (whose 8-byte status block the test driver does not lay out;
/// the integrity tests negotiate it themselves).
const ALL: u64 = DEVICE_FEATURES & !feature::INTEGRITY;
const NO_EVENT_IDX: u64 = ALL & !feature::RING_EVENT_IDX;

struct Rig {
    core: Engine,
    drv: Driver,
    sink: Arc<RecordingSink>,
}

fn options(faults: &[&str]) -> DeviceOptions {
    DeviceOptions {
        backing: Backing::Memory { size: 8 << 20 },
        faults: faults
            .iter()
            .map(|f| FaultRule::parse(f).unwrap())
            .collect(),
        fault_seed: 1,
        ..DeviceOptions::default()
    }
}

fn rig_with(opts: DeviceOptions, qsize: u16, features: u64) -> Rig {
    let mem = guest_memory();
    let queues = opts.queues;
    let core = Engine::new(opts, mem.clone()).unwrap();
    let drv = Driver::new(mem, core.doorbells(), queues, qsize);
    let mut rig = Rig {
        core,
        drv,
        sink: Arc::new(RecordingSink::default()),
    };
    rig.activate(features);
    rig
}

fn rig(faults: &[&str]) -> Rig {
    rig_with(options(faults), 64, ALL)
}

impl Rig {
    fn activate(&mut self, features: u64) {
        self.sink = Arc::new(RecordingSink::default());
        let configs = self.drv.configs();
        self.core
            .activate(features, &configs, self.sink.clone())
            .unwrap();
    }

    /// Reset the device and set up fresh rings, as a driver does.
    fn reset_and_reactivate(&mut self, features: u64) {
        self.core.begin_reset();
        wait_until("reset", || self.core.reset_complete());
        assert!(!self.core.needs_reset());
        let n = self.drv.rings.len() as u16;
        let size = self.drv.rings[0].size;
        self.drv.init_rings(n, size);
        self.activate(features);
    }

    fn write(&mut self, q: usize, id: u64, offset: u64, data: &[u8]) -> u8 {
        let p = self.drv.post_write(q, id, offset, data);
        self.drv.kick(q);
        let used = self.drv.wait_used(q, 1);
        assert_eq!(used, vec![(u32::from(p.head), 1)]);
        self.drv.status(&p)
    }

    fn read(&mut self, q: usize, id: u64, offset: u64, lens: &[u32]) -> (u8, Vec<u8>) {
        let p = self.drv.post_read(q, id, offset, lens);
        self.drv.kick(q);
        let used = self.drv.wait_used(q, 1);
        let total: u32 = lens.iter().sum();
        let status = self.drv.status(&p);
        let expect_len = if status == req_status::OK {
            total + 1
        } else {
            1
        };
        assert_eq!(used, vec![(u32::from(p.head), expect_len)]);
        (status, self.drv.data(&p))
    }
}

#[test]
fn memory_backing_round_trip() {
    let mut r = rig(&[]);
    let data = pattern(8192, 3);
    assert_eq!(r.write(0, 1, 4096, &data), req_status::OK);
    // Read back through three segments of different sizes.
    let (status, back) = r.read(0, 2, 4096, &[512, 4096, 3584]);
    assert_eq!(status, req_status::OK);
    assert_eq!(back, data);
    // Untouched parts of the store read as zeros.
    let (status, zeros) = r.read(0, 3, 0, &[4096]);
    assert_eq!(status, req_status::OK);
    assert!(zeros.iter().all(|&b| b == 0));
    // The very end of the store.
    let cap = r.core.config().capacity;
    assert_eq!(r.write(0, 4, cap - 512, &pattern(512, 9)), req_status::OK);
    assert_eq!(r.read(0, 5, cap - 512, &[512]).1, pattern(512, 9));
    let m = r.core.metrics();
    assert_eq!(m.requests.write.requests, 2);
    assert_eq!(m.requests.write.bytes, 8192 + 512);
    assert_eq!(m.requests.read.requests, 3);
    assert_eq!(m.requests.read.bytes, 8192 + 4096 + 512);
    assert_eq!(m.status.ok, 5);
    assert_eq!(m.latency.count, 5);
    assert!(m.doorbells >= 5);
    assert!(m.interrupts >= 1);
    assert!(m.inflight_high_water >= 1);
}

#[test]
fn config_and_features() {
    let r = rig_with(
        DeviceOptions {
            queues: 3,
            queue_size_max: 128,
            ..options(&[])
        },
        64,
        ALL,
    );
    let c = r.core.config();
    assert_eq!(c.capacity, 8 << 20);
    assert_eq!(c.num_queues, 3);
    assert_eq!(c.queue_size_max, 128);
    assert_eq!(c.max_segments, 126);
    assert_eq!(c.max_transfer, MAX_TRANSFER);
    assert_eq!(c.alignment, 512);
    assert_eq!(r.core.device_features(), ALL | feature::INTEGRITY);
    assert_eq!(r.core.doorbells().len(), 3);
    assert_eq!(r.core.backend_name(), "mem");
    assert_eq!(r.core.id_string(), "aiodma-mem");
}

#[test]
fn get_id_and_flush() {
    let mut r = rig(&[]);
    let p = r.drv.post(0, op::GET_ID, 1, 0, &[8, 24], None);
    let f = r.drv.post(0, op::FLUSH, 2, 0, &[], None);
    r.drv.kick(0);
    let mut used = r.drv.wait_used(0, 2);
    used.sort();
    let mut expect = vec![(u32::from(p.head), 21), (u32::from(f.head), 1)];
    expect.sort();
    assert_eq!(used, expect);
    assert_eq!(r.drv.status(&p), req_status::OK);
    assert_eq!(r.drv.status(&f), req_status::OK);
    let id = r.drv.data(&p);
    let mut want = b"aiodma-mem".to_vec();
    want.resize(20, 0);
    assert_eq!(&id[..20], &want[..]);
    // Bytes past the 20 of the ID are not touched.
    assert!(id[20..].iter().all(|&b| b == 0xee));
}

#[test]
fn unnegotiated_ops_are_unsupp() {
    let mut r = rig_with(options(&[]), 64, feature::VERSION_1);
    let p = r.drv.post(0, op::FLUSH, 1, 0, &[], None);
    let g = r.drv.post(0, op::GET_ID, 2, 0, &[20], None);
    let u = r.drv.post(0, 77, 3, 0, &[512], None);
    r.drv.kick(0);
    r.drv.wait_used(0, 3);
    for x in [&p, &g, &u] {
        assert_eq!(r.drv.status(x), req_status::UNSUPP);
    }
    assert_eq!(r.core.metrics().status.unsupp, 3);
}

#[test]
fn file_backing_round_trip() {
    let dir = std::env::temp_dir().join(format!("aiodma-core-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let opts = DeviceOptions {
        backing: Backing::File { path: path.clone() },
        ..options(&[])
    };
    let mut r = rig_with(opts, 64, ALL);
    assert_eq!(r.core.config().capacity, 4 << 20);
    assert_eq!(r.core.id_string(), "aiodma-file");
    // Aligned (O_DIRECT path) and unaligned (buffered) transfers.
    let a = pattern(65536, 1);
    assert_eq!(r.write(0, 1, 1 << 20, &a), req_status::OK);
    let b = pattern(1000, 2);
    assert_eq!(r.write(0, 2, 12345, &b), req_status::OK);
    assert_eq!(r.read(0, 3, 1 << 20, &[4096, 61440]).1, a);
    assert_eq!(r.read(0, 4, 12345, &[999, 1]).1, b);
    let f = r.drv.post(0, op::FLUSH, 5, 0, &[], None);
    r.drv.kick(0);
    r.drv.wait_used(0, 1);
    assert_eq!(r.drv.status(&f), req_status::OK);
    let g = r.drv.post(0, op::GET_ID, 6, 0, &[20], None);
    r.drv.kick(0);
    r.drv.wait_used(0, 1);
    assert_eq!(&r.drv.data(&g)[..11], b"aiodma-file");
    drop(r);
    let content = std::fs::read(&path).unwrap();
    assert_eq!(&content[1 << 20..(1 << 20) + 65536], &a[..]);
    assert_eq!(&content[12345..13345], &b[..]);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn missing_backing_file_is_an_error_naming_it() {
    let path = std::env::temp_dir().join("aiodma-no-such-dir/none.img");
    let opts = DeviceOptions {
        backing: Backing::File { path: path.clone() },
        ..DeviceOptions::default()
    };
    let e = Engine::new(opts, guest_memory()).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()), "{e}");
}

#[test]
fn bad_options_are_rejected() {
    let bad = [
        DeviceOptions {
            queues: 0,
            ..DeviceOptions::default()
        },
        DeviceOptions {
            queues: 64,
            ..DeviceOptions::default()
        },
        DeviceOptions {
            queue_size_max: 100,
            ..DeviceOptions::default()
        },
        DeviceOptions {
            workers: 0,
            ..DeviceOptions::default()
        },
    ];
    for o in bad {
        assert!(Engine::new(o, guest_memory()).is_err());
    }
    assert_eq!(
        DeviceError::Queues(0).to_string(),
        "--queues 0: must be from 1 to 63"
    );
}

#[test]
fn a_delayed_big_request_completes_after_a_later_small_one() {
    // Deterministic: reads are held for 150 ms, so the write posted after the big read
    // completes first.
    let mut r = rig(&["delay:p=1,min=150ms,max=150ms,op=read"]);
    let big = r.drv.post_read(0, 1, 0, &[1 << 20]);
    let small = r.drv.post_write(0, 2, 0, &[7u8; 512]);
    r.drv.kick(0);
    let used = r.drv.wait_used(0, 2);
    assert_eq!(
        used,
        vec![
            (u32::from(small.head), 1),
            (u32::from(big.head), (1 << 20) + 1)
        ]
    );
    let m = r.core.metrics();
    assert_eq!(m.faults.delay, 1);
    // The delayed one landed in a bucket of at least 128 ms.
    let slow: u64 = m
        .latency
        .buckets
        .iter()
        .filter(|b| b.lt_us.is_none_or(|lt| lt > 131_072))
        .map(|b| b.count)
        .sum();
    assert_eq!(slow, 1);
}

#[test]
fn completions_really_arrive_out_of_order_with_workers() {
    // No faults: a 1 MiB read then eight 512-byte reads; with two workers a small one regularly
    // overtakes the big one. Look for it over a number of rounds.
    let mut r = rig_with(
        DeviceOptions {
            workers: 2,
            ..options(&[])
        },
        64,
        ALL,
    );
    let mut overtaken = 0;
    for round in 0..40 {
        let big = r.drv.post_read(0, round * 10, 0, &[1 << 20]);
        for i in 0..8 {
            r.drv.post_read(0, round * 10 + i + 1, 4096 * i, &[512]);
        }
        r.drv.kick(0);
        let used = r.drv.wait_used(0, 9);
        assert_eq!(used.len(), 9);
        if used[0].0 != u32::from(big.head) {
            overtaken += 1;
            if overtaken >= 3 {
                break;
            }
        }
    }
    assert!(overtaken >= 1, "a small request never overtook the big one");
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut r = rig(&[]);
    // used_event far ahead: no interrupt for three completions.
    r.drv.set_used_event(0, 100);
    for i in 0..3 {
        r.drv.post_write(0, i, 0, &[1u8; 512]);
    }
    r.drv.kick(0);
    r.drv.wait_used(0, 3);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.sink.count(0), 0);
    // used_event = 3: the next completion moves the used index from 3 to 4, across it.
    r.drv.set_used_event(0, 3);
    r.drv.post_write(0, 9, 0, &[1u8; 512]);
    r.drv.kick(0);
    r.drv.wait_used(0, 1);
    wait_until("interrupt", || r.sink.count(0) == 1);
    // The device publishes avail_event (where it wants the next doorbell).
    assert_eq!(r.drv.avail_event(0), 4);
    assert_eq!(r.core.metrics().interrupts, 1);
}

#[test]
fn no_interrupt_flag_without_event_idx() {
    let mut r = rig_with(options(&[]), 64, NO_EVENT_IDX);
    r.drv.set_avail_flags(0, abi::ring::AVAIL_F_NO_INTERRUPT);
    r.write(0, 1, 0, &[1u8; 512]);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(r.sink.count(0), 0);
    r.drv.set_avail_flags(0, 0);
    r.write(0, 2, 0, &[1u8; 512]);
    wait_until("interrupt", || r.sink.count(0) == 1);
    // Not draining: the device wants doorbells (NO_NOTIFY clear).
    assert_eq!(r.drv.used_flags(0) & abi::ring::USED_F_NO_NOTIFY, 0);
}

#[test]
fn one_interrupt_per_batch() {
    // Error faults complete inline, so sixteen requests kicked once complete in one batch.
    let mut r = rig_with(options(&["error:p=1"]), 64, NO_EVENT_IDX);
    // All sixteen become available at once (the device may look at the ring any time).
    r.drv.defer_avail = true;
    for i in 0..16 {
        r.drv.post_write(0, i, 0, &[1u8; 512]);
    }
    r.drv.publish_avail(0);
    r.drv.kick(0);
    let used = r.drv.wait_used(0, 16);
    assert_eq!(used.len(), 16);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(r.sink.count(0), 1);
    let m = r.core.metrics();
    assert_eq!(m.status.ioerr, 16);
    assert_eq!(m.faults.error, 16);
    assert_eq!(m.interrupts, 1);
    assert_eq!(m.inflight_high_water, 16);
}

#[test]
fn doorbells_before_activation_are_not_lost() {
    let mem = guest_memory();
    let mut core = Engine::new(options(&[]), mem.clone()).unwrap();
    let mut drv = Driver::new(mem, core.doorbells(), 1, 32);
    let p = drv.post_write(0, 1, 0, &[5u8; 512]);
    drv.kick(0);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(drv.used_idx(0), 0);
    let sink = Arc::new(RecordingSink::default());
    core.activate(ALL, &drv.configs(), sink).unwrap();
    drv.wait_used(0, 1);
    assert_eq!(drv.status(&p), req_status::OK);
}

#[test]
fn several_queues_interrupt_separately() {
    let mut r = rig_with(
        DeviceOptions {
            queues: 4,
            ..options(&[])
        },
        32,
        ALL,
    );
    for q in 0..4usize {
        let data = pattern(4096, q as u8);
        assert_eq!(r.write(q, q as u64, 4096 * q as u64, &data), req_status::OK);
    }
    for q in 0..4usize {
        let (s, back) = r.read(q, 10 + q as u64, 4096 * q as u64, &[4096]);
        assert_eq!(s, req_status::OK);
        assert_eq!(back, pattern(4096, q as u8));
    }
    // used_event 0 is crossed by the first completion of each queue.
    for q in 0..4u16 {
        assert!(r.sink.count(q) >= 1, "queue {q}");
    }
}

#[test]
fn guest_memory_with_several_regions() {
    // A buffer straddling two memory regions is split into two host pieces.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (vm_memory::GuestAddress(0), 8 << 20),
        (vm_memory::GuestAddress(8 << 20), 8 << 20),
    ])
    .unwrap();
    let core = Engine::new(options(&[]), mem.clone()).unwrap();
    let drv = Driver::new(mem, core.doorbells(), 1, 64);
    let mut r = Rig {
        core,
        drv,
        sink: Arc::new(RecordingSink::default()),
    };
    r.activate(ALL);
    let data = pattern(8192, 5);
    let header = r.drv.header(op::WRITE, 1, 0, 8192);
    let status = r.drv.alloc(1);
    let at = (8 << 20) - 4096;
    r.drv
        .mem
        .write_slice(&data, vm_memory::GuestAddress(at))
        .unwrap();
    r.drv
        .post_raw(0, &[rd(header, 32), rd(at, 8192), wr(status, 1)]);
    r.drv.kick(0);
    r.drv.wait_used(0, 1);
    let (s, back) = r.read(0, 2, 0, &[8192]);
    assert_eq!(s, req_status::OK);
    assert_eq!(back, data);
}

// ---- malformed requests: MALFORMED, and the queue keeps working ----

#[test]
fn malformed_requests_get_malformed_and_the_queue_keeps_working() {
    let mut r = rig(&[]);
    let cap = r.core.config().capacity;
    type Build = fn(&mut Driver, u64) -> Vec<D>;
    let cases: Vec<(&str, Build)> = vec![
        ("buffer past the end of memory", |d, _| {
            let h = d.header(op::READ, 1, 0, 4096);
            let s = d.alloc(1);
            vec![rd(h, 32), wr(MEM_SIZE - 1024, 4096), wr(s, 1)]
        }),
        ("buffer at a huge address", |d, _| {
            let h = d.header(op::READ, 1, 0, 512);
            let s = d.alloc(1);
            vec![rd(h, 32), wr(u64::MAX - 100, 512), wr(s, 1)]
        }),
        ("zero-length descriptor", |d, _| {
            let h = d.header(op::READ, 1, 0, 512);
            let (b, s) = (d.alloc(512), d.alloc(1));
            vec![rd(h, 32), wr(b, 512), wr(b, 0), wr(s, 1)]
        }),
        ("wrong direction", |d, _| {
            let h = d.header(op::READ, 1, 0, 512);
            let (b, s) = (d.alloc(512), d.alloc(1));
            vec![rd(h, 32), rd(b, 512), wr(s, 1)]
        }),
        ("offset past capacity", |d, cap| {
            let h = d.header(op::READ, 1, cap - 256, 512);
            let (b, s) = (d.alloc(512), d.alloc(1));
            vec![rd(h, 32), wr(b, 512), wr(s, 1)]
        }),
        ("length mismatch", |d, _| {
            let h = d.header(op::WRITE, 1, 0, 1024);
            let (b, s) = (d.alloc(512), d.alloc(1));
            vec![rd(h, 32), rd(b, 512), wr(s, 1)]
        }),
        ("bad header size", |d, _| {
            let h = d.header(op::READ, 1, 0, 512);
            let (b, s) = (d.alloc(512), d.alloc(1));
            vec![rd(h, 16), wr(b, 512), wr(s, 1)]
        }),
        ("INDIRECT flag", |d, _| {
            let h = d.header(op::READ, 1, 0, 512);
            let (b, s) = (d.alloc(512), d.alloc(1));
            let ind = D {
                addr: b,
                len: 512,
                flags: abi::desc_flags::WRITE | abi::desc_flags::INDIRECT,
            };
            vec![rd(h, 32), ind, wr(s, 1)]
        }),
        ("nonzero flags", |d, _| {
            let h = d.header(op::READ, 1, 0, 512);
            d.mem
                .write_obj(1u32, vm_memory::GuestAddress(h + 4))
                .unwrap();
            let (b, s) = (d.alloc(512), d.alloc(1));
            vec![rd(h, 32), wr(b, 512), wr(s, 1)]
        }),
        ("too long", |d, _| {
            let h = d.header(op::READ, 1, 0, MAX_TRANSFER + 512);
            let (b, s) = (d.alloc(u64::from(MAX_TRANSFER) + 512), d.alloc(1));
            vec![rd(h, 32), wr(b, MAX_TRANSFER + 512), wr(s, 1)]
        }),
    ];
    for (name, build) in cases {
        let descs = build(&mut r.drv, cap);
        let status = descs.last().unwrap().addr;
        r.drv
            .mem
            .write_obj(0xffu8, vm_memory::GuestAddress(status))
            .unwrap();
        let head = r.drv.post_raw(0, &descs);
        r.drv.kick(0);
        let used = r.drv.wait_used(0, 1);
        assert_eq!(used, vec![(u32::from(head), 1)], "{name}");
        let s: u8 = r.drv.mem.read_obj(vm_memory::GuestAddress(status)).unwrap();
        assert_eq!(s, req_status::MALFORMED, "{name}");
        // And a good request right after works.
        assert_eq!(
            r.write(0, 99, 0, &[3u8; 512]),
            req_status::OK,
            "after {name}"
        );
    }
    // Missing status descriptor: used len 0, no status byte anywhere.
    let h = r.drv.header(op::WRITE, 1, 0, 512);
    let b = r.drv.alloc(512);
    let head = r.drv.post_raw(0, &[rd(h, 32), rd(b, 512)]);
    r.drv.kick(0);
    assert_eq!(r.drv.wait_used(0, 1), vec![(u32::from(head), 0)]);
    assert!(!r.core.needs_reset());
    assert_eq!(r.core.metrics().status.malformed, 11);
    assert_eq!(r.sink.configs(), 0);
}

// ---- broken queues: NEEDS_RESET ----

fn expect_needs_reset(r: &mut Rig, what: &str) {
    wait_until(what, || r.core.needs_reset());
    wait_until("config interrupt", || r.sink.configs() == 1);
    assert_eq!(r.core.metrics().config_interrupts, 1);
    // The device stops: a good request is not processed.
    let used_before = r.drv.used_idx(0);
    r.drv.post_write(0, 50, 0, &[1u8; 512]);
    r.drv.kick(0);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(r.drv.used_idx(0), used_before, "{what}: still processing");
    // A reset clears it and the device works again.
    r.reset_and_reactivate(ALL);
    assert!(!r.core.needs_reset());
    assert_eq!(
        r.write(0, 51, 0, &[2u8; 512]),
        req_status::OK,
        "{what}: after reset"
    );
}

#[test]
fn head_index_past_the_queue_size_needs_reset() {
    let mut r = rig(&[]);
    r.drv.push_avail(0, 64 + 3);
    r.drv.kick(0);
    expect_needs_reset(&mut r, "head ≥ size");
}

#[test]
fn available_index_jump_needs_reset() {
    let mut r = rig(&[]);
    r.drv.set_avail_idx(0, 65);
    r.drv.kick(0);
    expect_needs_reset(&mut r, "avail idx jump");
}

#[test]
fn descriptor_loop_is_malformed_and_the_queue_keeps_working() {
    let mut r = rig(&[]);
    let h = r.drv.header(op::READ, 1, 0, 512);
    let b = r.drv.alloc(512);
    // 10 -> 11 -> 12 -> 11 ...
    r.drv.write_desc(0, 10, h, 32, abi::desc_flags::NEXT, 11);
    r.drv.write_desc(
        0,
        11,
        b,
        512,
        abi::desc_flags::NEXT | abi::desc_flags::WRITE,
        12,
    );
    r.drv.write_desc(
        0,
        12,
        b,
        1,
        abi::desc_flags::NEXT | abi::desc_flags::WRITE,
        11,
    );
    r.drv.push_avail(0, 10);
    r.drv.kick(0);
    // The walk stops at max_segments + 2 descriptors: used len 0 (no status byte found).
    assert_eq!(r.drv.wait_used(0, 1), vec![(10, 0)]);
    assert!(!r.core.needs_reset());
    assert_eq!(r.core.metrics().status.malformed, 1);
    assert_eq!(r.write(0, 1, 0, &[7u8; 512]), req_status::OK);
}

#[test]
fn descriptor_next_past_the_queue_size_needs_reset() {
    let mut r = rig(&[]);
    let h = r.drv.header(op::READ, 1, 0, 512);
    r.drv.write_desc(0, 5, h, 32, abi::desc_flags::NEXT, 200);
    r.drv.push_avail(0, 5);
    r.drv.kick(0);
    expect_needs_reset(&mut r, "next ≥ size");
}

#[test]
fn head_offered_twice_needs_reset() {
    // The first offer is dropped by a fault, so the head stays in flight.
    let mut r = rig(&["drop:every=1,op=write"]);
    let p = r.drv.post_write(0, 1, 0, &[1u8; 512]);
    r.drv.kick(0);
    wait_until("drop", || r.core.metrics().faults.drop == 1);
    r.drv.push_avail(0, p.head);
    r.drv.kick(0);
    wait_until("needs reset", || r.core.needs_reset());
    assert_eq!(r.drv.used_idx(0), 0);
    r.core.begin_reset();
    wait_until("reset", || r.core.reset_complete());
}

#[test]
fn rings_outside_guest_memory() {
    let mem = guest_memory();
    let mut core = Engine::new(options(&[]), mem.clone()).unwrap();
    let drv = Driver::new(mem, core.doorbells(), 1, 64);
    let sink: Arc<RecordingSink> = Arc::new(RecordingSink::default());
    // Used ring past the end of memory: SPEC 6.3.
    let mut cfg = drv.configs();
    cfg[0].device = MEM_SIZE - 64;
    let e = core.activate(ALL, &cfg, sink.clone()).unwrap_err();
    assert!(matches!(e, ActivateError::BadQueue { queue: 0, .. }), "{e}");
    assert!(core.needs_reset());
    core.begin_reset();
    wait_until("reset", || core.reset_complete());
    assert!(!core.needs_reset());
    // A size that is not a power of two, or above the maximum: refused, no NEEDS_RESET.
    for size in [48, 512, 0] {
        let mut cfg = drv.configs();
        cfg[0].size = size;
        let e = core.activate(ALL, &cfg, sink.clone()).unwrap_err();
        assert!(matches!(e, ActivateError::BadQueue { .. }));
        assert!(!core.needs_reset());
    }
    // Misaligned descriptor table.
    let mut cfg = drv.configs();
    cfg[0].desc += 8;
    assert!(core.activate(ALL, &cfg, sink.clone()).is_err());
    // A queue the device does not have.
    let mut cfg = drv.configs();
    cfg.push(cfg[0]);
    assert!(core.activate(ALL, &cfg, sink.clone()).is_err());
    // Disabled queues are ignored, whatever they hold.
    let mut cfg = drv.configs();
    cfg.push(QueueConfig::default());
    core.activate(ALL, &cfg, sink.clone()).unwrap();
    // A second activation without a reset is refused.
    assert!(core.activate(ALL, &cfg, sink).is_err());
}

// ---- faults ----

#[test]
fn error_every_n_fails_exactly_those_without_touching_the_store() {
    let mut r = rig(&["error:every=3,op=write"]);
    let mut statuses = Vec::new();
    for i in 1..=9u8 {
        statuses.push(r.write(0, u64::from(i), 0, &[i; 512]));
    }
    let failed: Vec<usize> = statuses
        .iter()
        .enumerate()
        .filter(|(_, s)| **s == req_status::IOERR)
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(failed, vec![3, 6, 9]);
    // Write 9 failed, so the store holds write 8's data.
    assert_eq!(r.read(0, 10, 0, &[512]).1, vec![8u8; 512]);
    assert_eq!(r.core.metrics().faults.error, 3);
}

#[test]
fn same_seed_same_faulted_requests() {
    fn faulted(seed: u64) -> Vec<u64> {
        let mut opts = options(&["error:p=0.3"]);
        opts.fault_seed = seed;
        let mut r = rig_with(opts, 128, ALL);
        let mut posted = Vec::new();
        for batch in 0..4u64 {
            for i in 0..25 {
                let id = batch * 25 + i;
                posted.push((id, r.drv.post_write(0, id, 0, &[1u8; 512])));
            }
            r.drv.kick(0);
            r.drv.wait_used(0, 25);
        }
        posted
            .iter()
            .filter(|(_, p)| r.drv.status(p) == req_status::IOERR)
            .map(|(id, _)| *id)
            .collect()
    }
    let a = faulted(1234);
    assert!((10..60).contains(&a.len()), "{} faults for p=0.3", a.len());
    assert_eq!(a, faulted(1234));
    assert_ne!(a, faulted(999));
}

#[test]
fn drop_never_completes_and_is_discarded_at_reset() {
    let mut r = rig(&["drop:p=1,op=read"]);
    let p = r.drv.post_read(0, 1, 0, &[512]);
    r.drv.kick(0);
    // Other ops still complete.
    assert_eq!(r.write(0, 2, 0, &[1u8; 512]), req_status::OK);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.drv.used_idx(0), 1);
    assert_eq!(r.drv.status(&p), 0xff);
    assert_eq!(r.core.metrics().faults.drop, 1);
    r.core.begin_reset();
    wait_until("reset", || r.core.reset_complete());
    assert_eq!(r.drv.used_idx(0), 1);
    assert_eq!(r.drv.status(&p), 0xff);
}

#[test]
fn hang_stops_every_queue_until_reset() {
    let mut r = rig_with(
        DeviceOptions {
            queues: 2,
            ..options(&["hang:after=2"])
        },
        64,
        ALL,
    );
    assert_eq!(r.write(0, 1, 0, &[1u8; 512]), req_status::OK);
    assert_eq!(r.write(1, 2, 0, &[1u8; 512]), req_status::OK);
    // The third request hangs the device: nothing completes on any queue.
    r.drv.post_write(0, 3, 0, &[1u8; 512]);
    r.drv.kick(0);
    wait_until("hang", || r.core.metrics().faults.hang == 1);
    r.drv.post_write(1, 4, 0, &[1u8; 512]);
    r.drv.kick(1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.drv.used_idx(0), 1);
    assert_eq!(r.drv.used_idx(1), 1);
    assert!(!r.core.needs_reset());
    // After a reset the device works again (and hangs again after two more requests).
    r.reset_and_reactivate(ALL);
    assert_eq!(r.write(0, 5, 0, &[1u8; 512]), req_status::OK);
    assert_eq!(r.write(1, 6, 0, &[1u8; 512]), req_status::OK);
    r.drv.post_write(0, 7, 0, &[1u8; 512]);
    r.drv.kick(0);
    wait_until("second hang", || r.core.metrics().faults.hang == 2);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(r.drv.used_idx(0), 1);
}

#[test]
fn delay_holds_completions_within_the_range() {
    let mut r = rig(&["delay:every=1,min=20ms,max=40ms"]);
    let start = Instant::now();
    for i in 0..4 {
        r.drv.post_write(0, i, 0, &[1u8; 512]);
    }
    r.drv.kick(0);
    r.drv.wait_used(0, 4);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(20), "{took:?}");
    let m = r.core.metrics();
    assert_eq!(m.faults.delay, 4);
    assert_eq!(m.status.ok, 4);
    // All four in the 16..32 ms or 32..64 ms buckets.
    let in_range: u64 = m.latency.buckets[15..17].iter().map(|b| b.count).sum();
    assert_eq!(in_range, 4, "{:?}", m.latency.buckets);
}

// ---- reset ----

#[test]
fn reset_discards_pre_reset_completions() {
    let mut r = rig(&["delay:p=1,min=100ms,max=100ms"]);
    let ps: Vec<_> = (0..4).map(|i| r.drv.post_read(0, i, 0, &[4096])).collect();
    r.drv.kick(0);
    wait_until("requests taken", || r.core.metrics().faults.delay == 4);
    r.core.begin_reset();
    // Idempotent.
    r.core.begin_reset();
    wait_until("reset", || r.core.reset_complete());
    assert!(r.core.reset_complete());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(r.drv.used_idx(0), 0);
    assert_eq!(r.sink.count(0), 0);
    for p in &ps {
        assert_eq!(r.drv.status(p), 0xff);
    }
    // A clean device afterwards, with new rings and no faults... but the rule still applies:
    // the first request after reset is delayed too and completes normally.
    let old_sink = r.sink.clone();
    r.drv.init_rings(1, 64);
    r.activate(ALL);
    assert_eq!(r.write(0, 9, 0, &[4u8; 512]), req_status::OK);
    assert_eq!(old_sink.count(0), 0);
}

#[test]
fn reset_right_after_submission_and_reactivation() {
    // Many resets with requests in flight: each reset completes, no stale completion shows up
    // in the new rings, and the device works after each.
    let mut r = rig_with(options(&[]), 64, ALL);
    for round in 0..20u64 {
        for i in 0..16 {
            r.drv.post_read(0, round * 100 + i, 4096 * i, &[65536]);
        }
        r.drv.kick(0);
        r.core.begin_reset();
        wait_until("reset", || r.core.reset_complete());
        r.drv.init_rings(1, 64);
        r.activate(ALL);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(r.drv.used_idx(0), 0, "round {round}: stale completion");
        assert_eq!(r.write(0, 1, 0, &[round as u8; 512]), req_status::OK);
    }
    assert!(r.core.metrics().resets >= 20);
}

#[test]
fn reset_of_an_idle_device_completes() {
    let mem = guest_memory();
    let mut core = Engine::new(options(&[]), mem).unwrap();
    assert!(core.reset_complete());
    core.begin_reset();
    wait_until("reset", || core.reset_complete());
}

#[test]
fn metrics_serialize_to_json() {
    let mut r = rig(&["error:every=2"]);
    r.write(0, 1, 0, &[1u8; 512]);
    r.write(0, 2, 0, &[1u8; 512]);
    let json = serde_json::to_value(r.core.metrics()).unwrap();
    assert_eq!(json["requests"]["write"]["requests"], 2);
    assert_eq!(json["status"]["ok"], 1);
    assert_eq!(json["status"]["ioerr"], 1);
    assert_eq!(json["faults"]["error"], 1);
    assert!(json["latency"]["buckets"].as_array().unwrap().len() > 10);
    let handle = r.core.metrics_handle();
    assert_eq!(handle.snapshot(), r.core.metrics());
}

#[test]
fn drop_of_the_device_with_requests_in_flight() {
    let mut r = rig(&["delay:p=1,min=1s,max=1s"]);
    for i in 0..8 {
        r.drv.post_read(0, i, 0, &[65536]);
    }
    r.drv.kick(0);
    wait_until("taken", || r.core.metrics().faults.delay == 8);
    let start = Instant::now();
    drop(r);
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn rings_at_guest_address_zero() {
    // Any place in RAM is fine for the rings, address 0 included.
    let mem = guest_memory();
    let mut core = Engine::new(options(&[]), mem.clone()).unwrap();
    let mut drv = Driver::new(mem, core.doorbells(), 1, 64);
    drv.ring_base = 0;
    drv.init_rings(1, 64);
    // The available ring at 0 (virtio-queue's own iterator refuses that), the descriptor table
    // out of its way.
    drv.rings[0].avail = 0;
    drv.rings[0].desc = 0x2000;
    let sink = Arc::new(RecordingSink::default());
    core.activate(ALL, &drv.configs(), sink).unwrap();
    let p = drv.post_write(0, 1, 0, &[9u8; 512]);
    drv.kick(0);
    drv.wait_used(0, 1);
    assert_eq!(drv.status(&p), req_status::OK);
    assert!(!core.needs_reset());
}

// ---- runtime control ----

#[test]
fn control_adds_and_removes_faults_pauses_and_requests_a_reset_while_running() {
    let mut r = rig(&[]);
    let ctl = r.core.control();
    assert_eq!(r.write(0, 1, 0, &[1u8; 512]), req_status::OK);
    let index = ctl
        .add_fault(FaultRule::parse("error:every=1,op=write").unwrap())
        .unwrap();
    assert_eq!(index, 0);
    assert_eq!(ctl.faults().len(), 1);
    assert_eq!(r.write(0, 2, 0, &[2u8; 512]), req_status::IOERR);
    assert_eq!(
        ctl.remove_fault(0).unwrap().to_string(),
        "error:every=1,op=write"
    );
    assert!(matches!(
        ctl.remove_fault(0),
        Err(ControlError::NoSuchRule { index: 0, count: 0 })
    ));
    assert_eq!(r.write(0, 3, 0, &[3u8; 512]), req_status::OK);
    // Paused: a request waits, untouched, until resumed.
    ctl.pause(true).unwrap();
    let p = r.drv.post_write(0, 4, 0, &[4u8; 512]);
    r.drv.kick(0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.drv.take_used(0), vec![]);
    ctl.pause(false).unwrap();
    r.drv.wait_used(0, 1);
    assert_eq!(r.drv.status(&p), req_status::OK);
    // A reset request: NEEDS_RESET and a configuration interrupt.
    ctl.request_reset().unwrap();
    wait_until("NEEDS_RESET", || r.core.needs_reset());
    wait_until("config interrupt", || r.sink.configs() == 1);
    assert_eq!(ctl.metrics().faults.reset, 1);
    r.reset_and_reactivate(ALL);
    ctl.hang().unwrap();
    let p = r.drv.post_write(0, 5, 0, &[5u8; 512]);
    r.drv.kick(0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.drv.take_used(0), vec![]);
    assert_eq!(ctl.metrics().faults.hang, 1);
    let _ = p;
}

// ---- integrity (CRC32C in an 8-byte status block) ----

/// Posts a request whose status descriptor is an 8-byte block; returns (posted, block address).
fn post_with_block(
    r: &mut Rig,
    op_code: u32,
    offset: u64,
    data: Option<&[u8]>,
    len: u32,
) -> (u16, u64, u64) {
    let h = r.drv.header(op_code, 9, offset, len);
    let buf = r.drv.alloc(u64::from(len));
    if let Some(d) = data {
        r.drv
            .mem
            .write_slice(d, vm_memory::GuestAddress(buf))
            .unwrap();
    }
    let block = r.drv.alloc(8);
    r.drv
        .mem
        .write_slice(&[0xff; 8], vm_memory::GuestAddress(block))
        .unwrap();
    let data_desc = if op_code == op::WRITE {
        rd(buf, len)
    } else {
        wr(buf, len)
    };
    let head = r.drv.post_raw(0, &[rd(h, 32), data_desc, wr(block, 8)]);
    (head, buf, block)
}

fn block(r: &Rig, addr: u64) -> (u8, u32) {
    let mut b = [0u8; 8];
    r.drv
        .mem
        .read_slice(&mut b, vm_memory::GuestAddress(addr))
        .unwrap();
    (b[0], u32::from_le_bytes([b[4], b[5], b[6], b[7]]))
}

#[test]
fn integrity_status_blocks_carry_the_crc32c_of_the_stored_data() {
    let mut r = rig_with(options(&[]), 64, ALL | feature::INTEGRITY);
    let data = pattern(4096, 3);
    let (head, _, blk) = post_with_block(&mut r, op::WRITE, 8192, Some(&data), 4096);
    r.drv.kick(0);
    assert_eq!(r.drv.wait_used(0, 1), vec![(u32::from(head), 8)]);
    assert_eq!(block(&r, blk), (req_status::OK, crc32c::crc32c(&data)));
    let (head, buf, blk) = post_with_block(&mut r, op::READ, 8192, None, 4096);
    r.drv.kick(0);
    assert_eq!(r.drv.wait_used(0, 1), vec![(u32::from(head), 4096 + 8)]);
    assert_eq!(block(&r, blk), (req_status::OK, crc32c::crc32c(&data)));
    let mut back = vec![0u8; 4096];
    r.drv
        .mem
        .read_slice(&mut back, vm_memory::GuestAddress(buf))
        .unwrap();
    assert_eq!(back, data);
    // A 1-byte status descriptor is malformed once INTEGRITY is negotiated.
    let p = r.drv.post_read(0, 1, 0, &[512]);
    r.drv.kick(0);
    assert_eq!(r.drv.wait_used(0, 1), vec![(u32::from(p.head), 1)]);
    assert_eq!(r.drv.status(&p), req_status::MALFORMED);
    // Known answer: CRC32C("123456789") = 0xe3069283.
    assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
}

#[test]
fn corrupted_reads_and_writes_are_caught_by_the_crc() {
    let mut r = rig_with(
        options(&["corrupt:every=2,bits=3"]),
        64,
        ALL | feature::INTEGRITY,
    );
    let data = pattern(4096, 7);
    // Write 1 is clean, write 2 is corrupted in the store: its CRC is of what was stored.
    for i in 0..2u64 {
        let (_, _, blk) = post_with_block(&mut r, op::WRITE, 4096 * i, Some(&data), 4096);
        r.drv.kick(0);
        r.drv.wait_used(0, 1);
        let (s, crc) = block(&r, blk);
        assert_eq!(s, req_status::OK);
        if i == 0 {
            assert_eq!(crc, crc32c::crc32c(&data), "clean write");
        } else {
            assert_ne!(
                crc,
                crc32c::crc32c(&data),
                "a corrupted write is detectable"
            );
        }
    }
    // Read 1 (the 3rd request, clean) of the corrupted block: the store's CRC matches what
    // arrives, which differs from what was written. Read 2 (corrupted in the guest's buffer):
    // what arrives does not match the CRC.
    for (i, offset) in [(0, 4096u64), (1, 0)] {
        let (_, buf, blk) = post_with_block(&mut r, op::READ, offset, None, 4096);
        r.drv.kick(0);
        r.drv.wait_used(0, 1);
        let (s, crc) = block(&r, blk);
        assert_eq!(s, req_status::OK);
        let mut got = vec![0u8; 4096];
        r.drv
            .mem
            .read_slice(&mut got, vm_memory::GuestAddress(buf))
            .unwrap();
        if i == 0 {
            assert_eq!(crc, crc32c::crc32c(&got));
            assert_ne!(got, data);
        } else {
            assert_ne!(crc, crc32c::crc32c(&got), "a corrupted read is detectable");
            assert_eq!(crc, crc32c::crc32c(&data));
        }
    }
    assert_eq!(r.core.metrics().faults.corrupt, 2);
}
