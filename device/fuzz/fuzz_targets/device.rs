//! The whole device as a guest sees it: the real engine (device thread, backend workers) inside
//! the PCI transport, driven by a program decoded from the input: register, configuration-space,
//! MSI-X and doorbell accesses, raw guest-memory writes, resets, and a well-behaved driver's
//! bring-up and (valid or malformed) requests. See `aiodma_device::fuzz::device` for the program
//! format and every invariant checked; a panic, on any thread, is a finding too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = aiodma_device::fuzz::fuzz_device_reusing(data) {
        // A finding already reported and not fixed (fuzz::OPEN_FINDINGS, deterministic
        // reproducers in crashes/) would end every run within minutes without being new.
        // AIODMA_FUZZ_STRICT=1 stops on those too.
        let strict = std::env::var_os("AIODMA_FUZZ_STRICT").is_some_and(|v| v == "1");
        if strict || aiodma_device::fuzz::open_finding(&e).is_none() {
            panic!("invariant broken: {e}");
        }
    }
});
