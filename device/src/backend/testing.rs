//! Test helpers shared by the backends' unit tests.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Backend, Completion, Job, JobOp};
use crate::request::Segment;

/// xorshift64*: a reproducible stream without a dependency.
#[derive(Debug)]
pub(crate) struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Reaps until `n` completions arrived (or 20 s passed), kicking the backend in between.
pub(crate) fn wait(b: &mut dyn Backend, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n && Instant::now() < deadline {
        b.kick();
        b.reap(&mut out);
        if out.len() < n {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    out
}

/// Guest memory for [`overlapping_writes_never_tear`]: 32 write buffers, 8 read buffers and a
/// read-back area, 1 MiB each.
pub(crate) fn atomicity_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 48 << 20)]).unwrap()
}

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 512;
/// The part of the store the writes land in.
const AREA: u64 = 2 * MIB;
const WRITERS: u64 = 32;
const READERS: u64 = 8;

/// The 8-byte word at byte `pos` of the store after `writer` of `round` wrote it (0: never
/// written). Unique per round, writer and position, so a block mixing two writes, or showing
/// a write in the wrong place, cannot match.
fn word(round: u64, writer: u64, pos: u64) -> u64 {
    ((round + 1) << 56) | ((writer + 1) << 48) | (pos / 8)
}

fn expected_bytes(model: &[Option<(u64, u64)>], offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    for pos in (offset..offset + len).step_by(8) {
        let w = match model[(pos / BLOCK) as usize] {
            Some((round, writer)) => word(round, writer, pos),
            None => 0,
        };
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

/// Describes the first block where `got` and `want` (both starting at store byte `offset`)
/// differ: whether it is torn (words of two writes) or whole but from the wrong write.
fn first_difference(got: &[u8], want: &[u8], offset: u64) -> Option<String> {
    for (i, (g, w)) in got
        .chunks(BLOCK as usize)
        .zip(want.chunks(BLOCK as usize))
        .enumerate()
    {
        if g == w {
            continue;
        }
        let tags: std::collections::BTreeSet<u64> = g
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()) >> 48)
            .collect();
        let want_tag = u64::from_le_bytes(w[..8].try_into().unwrap()) >> 48;
        return Some(format!(
            "block at store byte {}: {} (round<<8|writer tags {tags:x?}, expected {want_tag:x})",
            offset + i as u64 * BLOCK,
            if tags.len() > 1 {
                "torn"
            } else {
                "wrong write"
            },
        ));
    }
    None
}

/// Rounds of 32 overlapping block-aligned writes (up to 1 MiB each, distinct patterns) with 8
/// overlapping reads among them, all in flight at once. Overlapping jobs take effect in the
/// order they were submitted (SPEC 10): afterwards every block holds exactly the last
/// submitted write covering it, whole, and every read saw each block whole, as the writes
/// submitted before it left it.
pub(crate) fn overlapping_writes_never_tear(b: &mut dyn Backend, mem: &GuestMemoryMmap, seed: u64) {
    let mut rng = Rng(seed);
    let mut model: Vec<Option<(u64, u64)>> = vec![None; (AREA / BLOCK) as usize];
    let read_base = WRITERS * MIB;
    let back_base = (WRITERS + READERS) * MIB;
    let mut token = 0u64;
    for round in 0..8u64 {
        let read_at: Vec<u64> = (0..READERS).map(|_| rng.below(WRITERS)).collect();
        let mut jobs = Vec::new();
        let mut reads = Vec::new();
        for writer in 0..WRITERS {
            for (r, _) in read_at.iter().enumerate().filter(|(_, &w)| w == writer) {
                let len = (1 + rng.below(MIB / BLOCK)) * BLOCK;
                let offset = rng.below((AREA - len) / BLOCK + 1) * BLOCK;
                let addr = read_base + r as u64 * MIB;
                reads.push((addr, offset, len, expected_bytes(&model, offset, len)));
                jobs.push((JobOp::Read, offset, addr, len));
            }
            // Mostly large writes, so that several copy at the same time.
            let len = if rng.below(4) == 0 {
                (1 + rng.below(16)) * BLOCK
            } else {
                (MIB / 2 / BLOCK + rng.below(MIB / 2 / BLOCK + 1)) * BLOCK
            };
            let offset = rng.below((AREA - len) / BLOCK + 1) * BLOCK;
            let addr = writer * MIB;
            let data: Vec<u8> = (offset..offset + len)
                .step_by(8)
                .flat_map(|pos| word(round, writer, pos).to_le_bytes())
                .collect();
            mem.write_slice(&data, GuestAddress(addr)).unwrap();
            for blk in offset / BLOCK..(offset + len) / BLOCK {
                model[blk as usize] = Some((round, writer));
            }
            jobs.push((JobOp::Write, offset, addr, len));
        }
        let n = jobs.len();
        for (op, offset, addr, len) in jobs {
            token += 1;
            b.submit(Job {
                token,
                epoch: 0,
                op,
                offset,
                segments: vec![Segment {
                    addr: GuestAddress(addr),
                    len: len as u32,
                }],
            });
        }
        b.kick();
        let done = wait(b, n);
        assert_eq!(done.len(), n, "round {round}: completions missing");
        assert!(
            done.iter().all(|c| c.result.is_ok()),
            "round {round}: {done:?}"
        );
        for (addr, offset, len, want) in reads {
            let mut got = vec![0u8; len as usize];
            mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
            if let Some(d) = first_difference(&got, &want, offset) {
                panic!("round {round}: a read of {len} bytes at {offset}: {d}");
            }
        }
        // Read the whole area back through the backend.
        token += 1;
        b.submit(Job {
            token,
            epoch: 0,
            op: JobOp::Read,
            offset: 0,
            segments: vec![Segment {
                addr: GuestAddress(back_base),
                len: AREA as u32,
            }],
        });
        b.kick();
        let done = wait(b, 1);
        assert!(
            done.len() == 1 && done[0].result.is_ok(),
            "read-back: {done:?}"
        );
        let mut got = vec![0u8; AREA as usize];
        mem.read_slice(&mut got, GuestAddress(back_base)).unwrap();
        if let Some(d) = first_difference(&got, &expected_bytes(&model, 0, AREA), 0) {
            panic!("round {round}: after the writes: {d}");
        }
    }
}
