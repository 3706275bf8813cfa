//! Resets, Bus Master Enable and faults under a hostile guest.

use std::time::{Duration, Instant};

use super::*;
use crate::abi::req_status;

#[test]
fn hostile_reset_with_thousands_of_1mib_requests_in_flight_stops_guest_writes() {
    let mut dev = device(2, 8192, &[]);
    let mib = 1u32 << 20;
    // Every READ lands in the same 1 MiB of guest memory: 2 × 2000 MiB of copying queued.
    let buf = dev.drv.alloc(u64::from(mib));
    dev.drv.defer_avail = true;
    for q in 0..2 {
        for _ in 0..2000 {
            let h = dev.drv.header(abi::op::READ, 1, 0, mib);
            let s = dev.drv.alloc(1);
            use crate::engine::testdrv::{rd, wr};
            dev.drv.post_raw(q, &[rd(h, 32), wr(buf, mib), wr(s, 1)]);
        }
        dev.drv.publish_avail(q);
    }
    dev.drv.defer_avail = false;
    dev.kick(0);
    dev.kick(1);
    std::thread::sleep(Duration::from_millis(5));
    let took = dev.reset();
    // Once the status reads 0 the device touches guest memory no more.
    let after_reset = Snapshot::take(&dev.drv.mem);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        after_reset.changed_outside(&dev.drv.mem, &[]),
        Vec::<u64>::new()
    );
    let m = dev.metrics();
    eprintln!(
        "hostile: reset with {} of 4000 1-MiB reads taken took {took:?}",
        m.requests.read.requests
    );
    assert!(took < Duration::from_secs(2), "reset took {took:?}");
    dev.fresh_rings();
    assert_eq!(dev.bring_up() & status::DRIVER_OK, status::DRIVER_OK);
    dev.assert_works("after the reset");
}

#[test]
fn hostile_reset_during_hang_drop_and_delay_faults() {
    for fault in [
        "hang:after=3",
        "drop:every=2",
        "delay:every=1,min=50ms,max=200ms",
    ] {
        let mut dev = device(1, 64, &[fault]);
        for i in 0..8u64 {
            dev.drv.post_read(0, i, i * 512, &[512]);
        }
        dev.kick(0);
        std::thread::sleep(Duration::from_millis(10));
        let before = Snapshot::take(&dev.drv.mem);
        let took = dev.reset();
        std::thread::sleep(Duration::from_millis(250));
        // Held completions of the old session never reach guest memory.
        assert_eq!(
            before.changed_outside(&dev.drv.mem, &[]),
            Vec::<u64>::new(),
            "{fault}"
        );
        assert!(
            took < Duration::from_secs(1),
            "{fault}: reset took {took:?}"
        );
        dev.fresh_rings();
        assert_eq!(dev.bring_up() & status::DRIVER_OK, status::DRIVER_OK);
    }
}

#[test]
fn hostile_ten_thousand_reset_and_activate_cycles() {
    let mut dev = device(2, 64, &[]);
    let start = Instant::now();
    for i in 0..10_000u32 {
        dev.reset();
        dev.fresh_rings();
        assert_eq!(
            dev.bring_up() & status::DRIVER_OK,
            status::DRIVER_OK,
            "cycle {i}"
        );
        if i % 1000 == 0 {
            dev.drv.post_write(0, 1, 0, &[i as u8; 512]);
            dev.kick(0);
            dev.drv.wait_used(0, 1);
        }
    }
    eprintln!(
        "hostile: 10^4 reset/activate cycles in {:?}",
        start.elapsed()
    );
    dev.assert_works("after 10^4 cycles");
}

#[test]
fn hostile_bus_master_cleared_with_requests_posted_moves_nothing() {
    let mut dev = device(1, 64, &[]);
    dev.set_command(command::MEMORY);
    let before = Snapshot::take(&dev.drv.mem);
    let reads: Vec<_> = (0..8u64)
        .map(|i| dev.drv.post_read(0, i, i * 4096, &[4096]))
        .collect();
    let before_kick = Snapshot::take(&dev.drv.mem);
    drop(before);
    dev.kick(0);
    settle();
    assert_eq!(dev.drv.used_idx(0), 0);
    assert_eq!(
        before_kick.changed_outside(&dev.drv.mem, &[]),
        Vec::<u64>::new()
    );
    assert_eq!(dev.metrics().requests.read.requests, 0, "nothing popped");
    // Bus mastering back on: the posted requests are served without another doorbell.
    dev.set_command(command::MEMORY | command::BUS_MASTER);
    dev.drv.wait_used(0, 8);
    for r in &reads {
        assert_eq!(dev.drv.status(r), req_status::OK);
    }
}

#[test]
fn hostile_bus_master_cleared_with_completions_pending_holds_them() {
    let mut dev = device(1, 64, &["delay:every=1,min=1s,max=1s"]);
    let p = dev.drv.post_read(0, 1, 0, &[4096]);
    dev.kick(0);
    eventually("the request is taken", || {
        dev.metrics().requests.read.requests == 1
    });
    dev.set_command(command::MEMORY);
    dev.msi.take_fired();
    let before = Snapshot::take(&dev.drv.mem);
    std::thread::sleep(Duration::from_millis(100));
    // The read's data may have landed (the copy started before the delay), but nothing is
    // published and no interrupt is raised while bus mastering is off.
    let data: Vec<(u64, u64)> = p.data.iter().map(|&(a, l)| (a, u64::from(l))).collect();
    assert_eq!(
        before.changed_outside(&dev.drv.mem, &data),
        Vec::<u64>::new()
    );
    assert_eq!(dev.drv.used_idx(0), 0);
    assert_eq!(dev.msi.take_fired(), Vec::<u16>::new());
    dev.set_command(command::MEMORY | command::BUS_MASTER);
    dev.drv.wait_used(0, 1);
    // OK if the backend had started the copy before the bit was cleared; IOERR if the job was
    // still queued then (refused: SPEC 1).
    let s = dev.drv.status(&p);
    assert!(s == req_status::OK || s == req_status::IOERR, "status {s}");
}

#[test]
fn hostile_reset_while_bus_mastering_is_off_completes() {
    let mut dev = device(1, 64, &["delay:every=1,min=20ms,max=20ms"]);
    for i in 0..4u64 {
        dev.drv.post_read(0, i, 0, &[512]);
    }
    dev.kick(0);
    dev.set_command(command::MEMORY);
    let took = dev.reset();
    assert!(took < Duration::from_secs(1));
    dev.set_command(command::MEMORY | command::BUS_MASTER);
    dev.fresh_rings();
    assert_eq!(dev.bring_up() & status::DRIVER_OK, status::DRIVER_OK);
    dev.assert_works("after a reset with bus mastering off");
}
