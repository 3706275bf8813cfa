//! Fuzz entry points (feature `fuzz`, and the unit tests): they drive the device's guest-facing
//! parsers and queue machinery straight from fuzz input. `device/fuzz` holds the cargo-fuzz
//! targets and a stable-Rust replay of the corpus.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::abi;
use crate::engine::queue::{Done, VQueue};
use crate::engine::QueueConfig;
use crate::request::{check_invariants, parse_chain, Limits, Parsed};

/// The fuzz entry point: `data` becomes guest memory, descriptor table, ring contents and
/// limits; every head is parsed with [`parse_chain`] and the invariants checked, then the same
/// memory is driven through a whole virtqueue pop/complete cycle
/// ([`fuzz_queue`]). Returns `Err` with a description if an invariant is broken; a
/// panic anywhere is a bug too.
pub fn fuzz_input(data: &[u8]) -> Result<(), String> {
    if data.len() < 8 {
        return Ok(());
    }
    let (ctl, image) = data.split_at(8);
    // Queue size: a power of two from 1 to 256.
    let queue_size = 1u16 << (ctl[0] % 9);
    let limits = Limits {
        capacity: u64::from(u16::from_le_bytes([ctl[1], ctl[2]])) * 512,
        max_segments: u32::from(ctl[3] % 8) + 1,
        max_transfer: 1 << 16,
        features: if ctl[4] & 1 != 0 {
            abi::feature::FLUSH | abi::feature::GET_ID | abi::feature::RING_EVENT_IDX
        } else {
            0
        },
    };
    // Guest memory: two regions with a hole between them, so that buffers straddling a region
    // end or falling into the hole are exercised. The image fills them from address 0.
    let mem = fuzz_memory(image);
    // The descriptor table sits at a guest address chosen by the input (possibly partly
    // outside RAM).
    let desc_table = GuestAddress(u64::from(ctl[5]) * 16);
    for head in 0..queue_size.saturating_add(2) {
        let parsed = parse_chain(&mem, desc_table, queue_size, head, &limits);
        check_invariants(&mem, &limits, queue_size, head, &parsed)?;
    }
    fuzz_queue(&mem, queue_size, desc_table, &limits, ctl[6], ctl[7])
}

/// Size of each of the two guest memory regions [`fuzz_input`] builds.
pub const FUZZ_REGION: u64 = 0x2000;
/// Guest address of the second region (a hole of one page between them).
pub const FUZZ_REGION2: u64 = 0x3000;

fn fuzz_memory(image: &[u8]) -> vm_memory::GuestMemoryMmap {
    let ranges = [
        (GuestAddress(0), FUZZ_REGION as usize),
        (GuestAddress(FUZZ_REGION2), FUZZ_REGION as usize),
    ];
    let Ok(mem) = vm_memory::GuestMemoryMmap::<()>::from_ranges(&ranges) else {
        // Anonymous mappings of 8 KiB do not fail in practice; an empty memory is still a
        // valid (if boring) fuzz input.
        return vm_memory::GuestMemoryMmap::default();
    };
    let first = image.len().min(FUZZ_REGION as usize);
    let _ = mem.write_slice(&image[..first], GuestAddress(0));
    let rest = &image[first..];
    let second = rest.len().min(FUZZ_REGION as usize);
    let _ = mem.write_slice(&rest[..second], GuestAddress(FUZZ_REGION2));
    mem
}

/// Fuzz entry for the queue machinery: a queue over `mem` with its descriptor table at
/// `desc_table`, available ring chosen by `avail_sel` and used ring by `used_sel`, popped until
/// it is empty or broken, every request completed and published. Returns `Err` if an invariant
/// is broken (a head handed out twice while in flight); a panic is a bug too.
pub fn fuzz_queue(
    mem: &GuestMemoryMmap,
    size: u16,
    desc_table: GuestAddress,
    limits: &Limits,
    avail_sel: u8,
    used_sel: u8,
) -> Result<(), String> {
    let cfg = QueueConfig {
        size,
        desc: desc_table.0,
        driver: u64::from(avail_sel) * 32,
        device: FUZZ_REGION2 + u64::from(used_sel) * 64,
        enabled: true,
    };
    let event_idx = limits.features & abi::feature::RING_EVENT_IDX != 0;
    let Ok(mut q) = VQueue::new(&cfg, size, event_idx, mem) else {
        return Ok(());
    };
    let mut seen = vec![false; usize::from(size)];
    for round in 0..(4 * u32::from(size) + 4) {
        let parsed = match q.pop(mem, limits) {
            Ok(Some(p)) => p,
            Ok(None) | Err(_) => return Ok(()),
        };
        let (head, status, len) = match &parsed {
            Parsed::Valid(r) => (r.head, Some((r.status, abi::req_status::OK)), 1),
            Parsed::Rejected(r) => (
                r.head,
                r.status_addr.map(|a| (a, r.reason.status())),
                r.used_len(),
            ),
        };
        let Some(flag) = seen.get_mut(usize::from(head)) else {
            return Err(format!("head {head} ≥ size {size} handed out"));
        };
        if *flag {
            return Err(format!("head {head} handed out twice while in flight"));
        }
        *flag = true;
        q.complete(Done {
            head,
            len,
            status,
            lie: crate::engine::queue::UsedLie::None,
        });
        // Publish every other round, so some heads stay in flight across pops.
        if round % 2 == 1 {
            if q.publish(mem).is_err() {
                return Ok(());
            }
            seen.iter_mut().for_each(|s| *s = false);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_input_survives_prng_inputs() {
        // The stable stand-in for `cargo fuzz run parse`: a few thousand deterministic inputs.
        let mut rng = crate::fault::SplitMix64::new(0x5eed);
        for round in 0..3000 {
            let len = 8 + (rng.next_u64() % 0x4800) as usize;
            let mut data = vec![0u8; len];
            // Mostly random bytes, but with structure: plausible descriptors pointing at small
            // addresses, so that parsing goes deep.
            for chunk in data.chunks_mut(8) {
                let v = rng.next_u64();
                let v = match v % 4 {
                    0 => v,
                    1 => (v >> 8) % 0x5000,
                    2 => (v >> 8) % 64,
                    _ => 0,
                };
                for (b, x) in chunk.iter_mut().zip(v.to_le_bytes()) {
                    *b = x;
                }
            }
            if let Err(e) = fuzz_input(&data) {
                panic!("round {round}: {e}");
            }
        }
    }
}
