//! Arbitrary bytes become guest memory (two regions with a hole), a descriptor table, ring
//! contents and device limits; every head is parsed and validated, then the same memory is
//! driven through a whole pop/complete/publish cycle of a virtqueue. Any panic, or a broken
//! invariant (a buffer outside guest RAM accepted, a head handed out twice...), is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = aiodma_device::fuzz::fuzz_input(data) {
        panic!("invariant broken: {e}");
    }
});
