//! Hostile register, configuration-space and MSI-X accesses.

use std::time::Instant;

use super::*;
use crate::abi::req_status;
use crate::pci::msix::{CONTROL_ENABLE, CONTROL_FUNCTION_MASK};

#[test]
fn hostile_bad_features_ok_and_driver_ok_writes_log_a_bounded_number_of_lines() {
    let mut dev = device(1, 64, &[]);
    dev.reset();
    let before = warnings_on_this_thread();
    for i in 0..100_000u32 {
        match i % 3 {
            // FEATURES_OK with a feature the device does not offer.
            0 => {
                dev.set_status(status::ACKNOWLEDGE | status::DRIVER);
                dev.w(common::DRIVER_FEATURE_SELECT, 4, 1);
                dev.w(common::DRIVER_FEATURE, 4, 0x8000_0000);
                dev.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
                assert_eq!(dev.status() & status::FEATURES_OK, 0);
            }
            // DRIVER_OK without FEATURES_OK.
            1 => dev.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK),
            // FEATURES_OK without VERSION_1.
            _ => {
                dev.set_status(status::ACKNOWLEDGE | status::DRIVER);
                dev.w(common::DRIVER_FEATURE_SELECT, 4, 1);
                dev.w(common::DRIVER_FEATURE, 4, 0);
                dev.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
            }
        }
        dev.reset();
    }
    let logged = warnings_on_this_thread() - before;
    assert!(logged <= 10, "{logged} warnings for 100 000 bad writes");
    dev.fresh_rings();
    assert_eq!(dev.bring_up() & status::DRIVER_OK, status::DRIVER_OK);
    dev.assert_works("after 10^5 bad negotiations");
}

#[test]
fn hostile_queue_register_writes_after_driver_ok_are_ignored() {
    let mut dev = device(2, 64, &[]);
    let cfg = dev.drv.configs();
    for q in 0..2u64 {
        dev.w(common::QUEUE_SELECT, 2, q);
        dev.w(common::QUEUE_DESC, 8, 0x1234_5000);
        dev.w(common::QUEUE_DRIVER, 4, 0);
        dev.w(common::QUEUE_DEVICE + 4, 4, 0xffff_ffff);
        dev.w(common::QUEUE_SIZE, 2, 8);
        dev.w(common::QUEUE_ENABLE, 2, 0);
        assert_eq!(dev.r(common::QUEUE_DESC, 8), cfg[q as usize].desc);
        assert_eq!(dev.r(common::QUEUE_DRIVER, 8), cfg[q as usize].driver);
        assert_eq!(dev.r(common::QUEUE_DEVICE, 8), cfg[q as usize].device);
        assert_eq!(dev.r(common::QUEUE_SIZE, 2), 64);
        assert_eq!(dev.r(common::QUEUE_ENABLE, 2), 1);
    }
    dev.assert_works("after queue writes past DRIVER_OK");
}

#[test]
fn hostile_queue_register_writes_during_a_reset_are_ignored() {
    for _ in 0..20 {
        let mut dev = device(1, 4096, &[]);
        // Work in flight makes the reset take a moment.
        for _ in 0..64 {
            dev.drv.post_read(0, 1, 0, &[1 << 20]);
        }
        dev.kick(0);
        dev.set_status(0);
        let resetting = dev.status() != 0;
        dev.w(common::QUEUE_SELECT, 2, 0);
        dev.w(common::QUEUE_DESC, 8, 0x4000);
        dev.w(common::QUEUE_SIZE, 2, 16);
        dev.w(common::DRIVER_FEATURE_SELECT, 4, 0);
        dev.w(common::DRIVER_FEATURE, 4, 0xff);
        dev.set_status(status::DRIVER_OK);
        if resetting {
            while dev.status() != 0 {
                std::thread::yield_now();
            }
            // The writes made while the reset was pending left the registers at their reset
            // values.
            assert_eq!(dev.r(common::QUEUE_DESC, 8), 0);
            assert_eq!(
                dev.r(common::QUEUE_SIZE, 2),
                u64::from(abi::ring::MAX_QUEUE_SIZE)
            );
            assert_eq!(dev.r(common::DRIVER_FEATURE, 4), 0);
            return;
        }
        dev.reset();
    }
    panic!("never caught the device in the middle of a reset");
}

#[test]
fn hostile_queue_select_out_of_range_reads_zero_and_ignores_writes() {
    let mut dev = device(2, 64, &[]);
    dev.reset();
    for sel in [2u64, 63, 0x7fff, 0xffff] {
        dev.w(common::QUEUE_SELECT, 2, sel);
        for (off, len) in [
            (common::QUEUE_SIZE, 2),
            (common::QUEUE_MSIX_VECTOR, 2),
            (common::QUEUE_ENABLE, 2),
            (common::QUEUE_DESC, 8),
            (common::QUEUE_DRIVER, 8),
            (common::QUEUE_DEVICE, 8),
        ] {
            dev.w(off, len, 0x1000);
            assert_eq!(dev.r(off, len), 0, "select {sel} offset {off:#x}");
        }
    }
    dev.fresh_rings();
    assert_eq!(dev.bring_up() & status::DRIVER_OK, status::DRIVER_OK);
    dev.assert_works("after out-of-range selects");
}

#[test]
fn hostile_queue_sizes_that_are_not_powers_of_two_or_too_big_are_refused() {
    let mut dev = device(1, 64, &[]);
    dev.reset();
    dev.w(common::QUEUE_SELECT, 2, 0);
    dev.w(common::QUEUE_SIZE, 2, 64);
    for bad in [0u64, 3, 100, 0x8001, 0xffff] {
        dev.w(common::QUEUE_SIZE, 2, bad);
        assert_eq!(dev.r(common::QUEUE_SIZE, 2), 64, "size {bad}");
    }
}

#[test]
fn hostile_config_space_at_every_offset_and_width() {
    let mut dev = device(2, 64, &[]);
    let mut ident = [0u8; 4];
    dev.t.config_read(0, &mut ident);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for width in [1usize, 2, 4, 8] {
        for off in 0..4096u64 {
            if off == reg::COMMAND || off + width as u64 > 4096 + 8 {
                continue;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = [0u8; 8];
            dev.t.config_read(off, &mut b[..width]);
            dev.t.config_write(off, &x.to_le_bytes()[..width]);
        }
    }
    let mut after = [0u8; 4];
    dev.t.config_read(0, &mut after);
    assert_eq!(ident, after, "vendor and device IDs are read-only");
    // The writes hit the BARs, the MSI-X control and the command register's neighbours:
    // restore what a driver would, reset, and the device works.
    dev.t
        .config_space_mut()
        .set_bar_address(0, BAR0_ADDR)
        .unwrap();
    dev.set_command(command::MEMORY | command::BUS_MASTER);
    let cap = dev.msix_cap;
    dev.t.config_write(cap + 2, &CONTROL_ENABLE.to_le_bytes());
    for v in 0..=dev.queues {
        dev.program_vector(v, false);
    }
    dev.reset_and_bring_up();
    dev.assert_works("after config space scribbling");
}

#[test]
fn hostile_bar0_msix_table_and_pba_at_every_offset_and_width() {
    let mut dev = device(2, 64, &[]);
    let mut pba = [0u8; 8];
    dev.t.bar_read(0, bar0::MSIX_PBA, &mut pba);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for width in [1usize, 2, 3, 4, 8] {
        for off in (bar0::MSIX_TABLE..bar0::SIZE).step_by(1) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = [0u8; 8];
            dev.t.bar_read(0, off, &mut b[..width]);
            dev.t.bar_write(0, off, &x.to_le_bytes()[..width]);
        }
    }
    // The PBA is read-only.
    let mut pba_after = [0u8; 8];
    dev.t.bar_read(0, bar0::MSIX_PBA, &mut pba_after);
    assert_eq!(pba, pba_after);
    // Reads past the end of BAR0 and beyond are harmless.
    let mut b = [0u8; 8];
    dev.t.bar_read(0, bar0::SIZE + 8, &mut b);
    dev.t.bar_write(0, u64::MAX - 3, &[1, 2, 3, 4]);
    for v in 0..=dev.queues {
        dev.program_vector(v, false);
    }
    dev.reset_and_bring_up();
    dev.assert_works("after MSI-X scribbling");
}

#[test]
fn hostile_masked_vectors_and_a_disabled_table_deliver_nothing_until_allowed() {
    let mut dev = device(1, 64, &[]);
    dev.msi.take_fired();
    // Queue 0's vector masked: the completion is published, its interrupt is pending.
    dev.program_vector(0, true);
    assert_eq!(dev.write(0, 0, &[1u8; 512]), req_status::OK);
    settle();
    assert!(!dev.msi.take_fired().contains(&0), "a masked vector fired");
    let mut pba = [0u8; 8];
    dev.t.bar_read(0, bar0::MSIX_PBA, &mut pba);
    assert_eq!(pba[0] & 1, 1, "pending bit");
    dev.program_vector(0, false);
    assert!(
        dev.msi.take_fired().contains(&0),
        "unmasking delivers the pending one"
    );
    // The whole function masked, then MSI-X disabled.
    let cap = dev.msix_cap;
    for control in [CONTROL_ENABLE | CONTROL_FUNCTION_MASK, 0] {
        dev.t.config_write(cap + 2, &control.to_le_bytes());
        assert_eq!(dev.write(0, 0, &[2u8; 512]), req_status::OK);
        settle();
        assert_eq!(
            dev.msi.take_fired(),
            Vec::<u16>::new(),
            "control {control:#x}"
        );
    }
    dev.t.config_write(cap + 2, &CONTROL_ENABLE.to_le_bytes());
    assert_eq!(dev.write(0, 0, &[3u8; 512]), req_status::OK);
}

#[test]
fn hostile_doorbells_of_odd_width_or_offset_are_ignored() {
    let mut dev = device(2, 64, &[]);
    // The activation has been processed (it looks at every queue once).
    dev.assert_works("before");
    let used = dev.drv.used_idx(0);
    let p = dev.drv.post_write(0, 1, 0, &[9u8; 512]);
    let doorbells = dev.metrics().doorbells;
    for (off, data) in [
        (bar0::NOTIFY, &[0u8][..]),
        (bar0::NOTIFY, &[0u8; 8][..]),
        (bar0::NOTIFY + 1, &[0u8; 2][..]),
        (bar0::NOTIFY + 3, &[0u8; 4][..]),
        (bar0::NOTIFY + bar0::NOTIFY_STRIDE * 2, &[0u8; 2][..]),
        (bar0::NOTIFY + bar0::NOTIFY_STRIDE * 4000, &[0u8; 4][..]),
    ] {
        dev.t.bar_write(0, off, data);
    }
    settle();
    assert_eq!(dev.metrics().doorbells, doorbells);
    assert_eq!(dev.drv.used_idx(0), used);
    dev.kick(0);
    dev.drv.wait_used(0, 1);
    assert_eq!(dev.drv.status(&p), req_status::OK);
}

#[test]
fn hostile_bar_moves_and_decoding_toggles_during_a_doorbell_storm() {
    let mut dev = device(2, 256, &[]);
    let doorbells = dev.doorbells.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for d in &doorbells {
                    let _ = d.write(1);
                }
                n += 1;
            }
            n
        })
    };
    let start = Instant::now();
    let mut moves = 0u32;
    while start.elapsed() < std::time::Duration::from_millis(300) {
        moves += 1;
        let addr = BAR0_ADDR + u64::from(moves % 16) * 0x10_0000;
        dev.set_command(command::BUS_MASTER);
        dev.t.config_write(reg::BAR0, &(addr as u32).to_le_bytes());
        dev.set_command(command::MEMORY | command::BUS_MASTER);
        // Requests keep flowing while the BAR moves.
        let p = dev.drv.post_write(0, 1, 0, &[moves as u8; 512]);
        dev.kick(0);
        dev.drv.wait_used(0, 1);
        assert_eq!(dev.drv.status(&p), req_status::OK);
        // With decoding off the registers read all-ones and writes are dropped.
        dev.set_command(command::BUS_MASTER);
        let mut b = [0u8; 4];
        dev.t.bar_read(0, common::DEVICE_STATUS, &mut b);
        assert_eq!(b, [0xff; 4]);
        dev.set_command(command::MEMORY | command::BUS_MASTER);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kicks = storm.join().unwrap();
    eprintln!("hostile: {moves} BAR moves and decode toggles against {kicks} doorbell rounds");
    dev.assert_works("after the storm");
}
