//! Fuzz entry points (feature `fuzz`, and the unit tests). `device/fuzz` holds the cargo-fuzz
//! targets, a stable-Rust replay of any file or corpus, and a seed writer.
//!
//! - [`fuzz_input`] (target `parse`): the guest-facing parser and the queue machinery, as pure
//!   functions over a small guest memory.
//! - [`fuzz_device`] (target `device`): the whole device as a guest sees it, with the real
//!   [`Engine`](crate::engine::Engine) and its threads inside the PCI
//!   [`Transport`](crate::transport::Transport), driven by a program of register, memory,
//!   doorbell and driver operations (see [`device`]).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::abi;
use crate::engine::queue::{Done, VQueue};
use crate::engine::QueueConfig;
use crate::request::{check_invariants, parse_chain, Limits, Parsed};

pub use device::{device_program, device_run, fuzz_device, fuzz_device_reusing};

/// Findings reported to the device's owners and not fixed yet, as a fragment of the error
/// message and where the finding is described. Their deterministic reproducers live in
/// `device/fuzz/crashes/`; corpus inputs that happen to run into them (some only sometimes,
/// depending on timing) do not fail the corpus replay (`make test`) nor get moved out of the
/// corpus. Remove an entry when its fix lands: the corpus then checks it again.
pub const OPEN_FINDINGS: &[(&str, &str)] = &[
    // None open. The first one, MSI-X messages while Bus Master Enable was clear (fixed in
    // 7a0be9f), now has its reproducers in the corpus.
];

/// The open finding (see [`OPEN_FINDINGS`]) an error message is, if any.
pub fn open_finding(error: &str) -> Option<&'static str> {
    OPEN_FINDINGS
        .iter()
        .find(|(fragment, _)| error.lines().next().is_some_and(|l| l.contains(fragment)))
        .map(|&(_, what)| what)
}
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
            crc: None,
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

/// The `device` target: the register side and the real engine, driven by a program.
///
/// An input is a small setup (queues, largest queue size, backing size, fault rules, worker
/// threads) followed by operations: BAR0 reads and writes at any offset and width, common
/// configuration registers at their natural width, configuration-space accesses (command
/// register: memory decoding and Bus Master Enable; MSI-X enable and function mask), MSI-X table
/// and PBA accesses, doorbells (the eventfd an ioeventfd would signal, or a BAR write), raw
/// guest-memory writes (descriptors, rings, buffers, at any time), resets, and the steps of a
/// well-behaved driver: a full bring-up (features, 1–4 queues of up to 32768 entries, MSI-X,
/// DRIVER_OK), valid and deliberately malformed requests, and reaping the used rings.
///
/// Guest memory is 2 MiB of rings at 0, a 1 MiB hole, and 1 MiB of buffers at 3 MiB, fresh for
/// every input. After every operation and at the end the harness checks what the guest can see:
///
/// - the driver's requests complete as SPEC 6 says (status byte, used length, the GET_ID string;
///   IOERR only when an `error` fault or a Bus Master Enable toggle allows it), only heads it
///   offered come back, each once;
/// - a queue driven correctly never gets NEEDS_RESET, and, with no `drop`/`hang` faults and no
///   long delays, every request it offered completes (within 2 s after a final doorbell);
/// - a used index never moves after a reset was started, after NEEDS_RESET was seen, or while
///   Bus Master Enable is clear, and otherwise moves forward by at most twice the queue size
///   between two operations (all in-flight requests complete, then at most one more ring of
///   requests is taken);
/// - a reset (DEVICE_STATUS = 0) reads back 0 within 2 s;
/// - when a reset completes and at the end, guest memory equals a shadow copy of what the
///   program wrote, except inside the used rings and the device-writable buffers the device was
///   offered in that session (any descriptor with the WRITE flag in an active descriptor table
///   at any time); after a completed reset nothing may change at all;
/// - no MSI-X vector fires while it is masked, MSI-X is disabled or function-masked, or between a
///   completed reset and the next DRIVER_OK.
///
/// Each input builds its own engine (device thread, backend workers) and memory, so an input
/// replays alone; that costs a few hundred microseconds per input, which the fuzzer accepts.
pub mod device {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use crate::abi::{self, bar0, common, desc_flags, feature, req_status, status};
    use crate::backend::Backing;
    use crate::engine::{DeviceOptions, Engine, FaultRule, QueueEngine, DEVICE_FEATURES};
    use crate::fault::FaultKind;
    use crate::pci::{cap_id, command, msix, reg, PciFunction};
    use crate::transport::{MsiController, MsiError, Transport};

    const MIB: u64 = 1 << 20;
    /// Ring region: descriptor tables and rings of up to four queues of up to 32768 entries.
    const RING: (u64, u64) = (0, 2 * MIB);
    /// A hole in guest RAM between the two regions: buffers there are outside RAM.
    const HOLE: u64 = 2 * MIB;
    /// Buffer region: headers, data and status bytes of the driver's requests.
    const BUFFERS: (u64, u64) = (3 * MIB, MIB);
    const REGIONS: [(u64, u64); 2] = [RING, BUFFERS];
    const RAM_END: u64 = BUFFERS.0 + BUFFERS.1;
    const PAGE: u64 = 4096;
    /// SPEC 4: drivers poll for the end of a reset; one that takes this long is a finding.
    const RESET_TIMEOUT: Duration = Duration::from_secs(2);
    /// How long the final drain waits for the driver's requests before calling them lost.
    const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
    /// Requests held longer than this by a `delay` rule make the drain pointless.
    const DRAIN_MAX_DELAY: Duration = Duration::from_millis(100);
    /// Most operations one input runs.
    const MAX_OPS: usize = 160;
    /// Most time one input spends in `Wait` and `Sleep` operations, so executions stay short
    /// (the device thread takes microseconds per request; a wait that runs out means requests
    /// that cannot complete yet: not kicked, held by a fault, or Bus Master Enable clear).
    const WAIT_BUDGET: Duration = Duration::from_millis(3);
    /// The status buffer's contents before the device writes it (no status code has this value).
    const STATUS_SENTINEL: u8 = 0xff;
    /// What the data buffers of a GET_ID request hold before the device writes the ID.
    const ID_SENTINEL: u8 = 0xee;

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.1 && b.0 < a.1
    }

    fn align_up(v: u64, to: u64) -> u64 {
        v.div_ceil(to) * to
    }

    // ---------------------------------------------------------------------------------------
    // Input decoding
    // ---------------------------------------------------------------------------------------

    /// Reads the input front to back; past its end every value is 0, so any input decodes.
    struct Reader<'a> {
        data: &'a [u8],
    }

    impl<'a> Reader<'a> {
        fn is_empty(&self) -> bool {
            self.data.is_empty()
        }
        fn u8(&mut self) -> u8 {
            match self.data.split_first() {
                Some((&b, rest)) => {
                    self.data = rest;
                    b
                }
                None => 0,
            }
        }
        fn u16(&mut self) -> u16 {
            u16::from_le_bytes([self.u8(), self.u8()])
        }
        fn u32(&mut self) -> u32 {
            u32::from(self.u16()) | u32::from(self.u16()) << 16
        }
        fn u64(&mut self) -> u64 {
            u64::from(self.u32()) | u64::from(self.u32()) << 32
        }
        fn bytes(&mut self, n: usize) -> &'a [u8] {
            let (head, rest) = self.data.split_at(n.min(self.data.len()));
            self.data = rest;
            head
        }
    }

    fn width(b: u8) -> usize {
        [1, 2, 4, 8][usize::from(b % 4)]
    }

    /// The device the input asks for.
    #[derive(Debug, Clone)]
    struct Setup {
        queues: u16,
        queue_size_max: u16,
        capacity: u64,
        workers: usize,
        faults: Vec<FaultRule>,
        fault_seed: u64,
        /// The platform refuses the routes of odd vectors (the transport must carry on).
        refuse_routes: bool,
    }

    fn decode_setup(r: &mut Reader<'_>) -> Result<Setup, String> {
        let b = r.u8();
        let queues = 1 + u16::from(b & 3);
        let workers = 1 + usize::from(b >> 2 & 1);
        let refuse_routes = b & 0x18 == 0x18;
        let queue_size_max = 1u16 << (r.u8() % 16);
        let capacity = [
            512,
            4096,
            64 << 10,
            1 << 20,
            1536,
            256 << 10,
            8 << 10,
            3 << 20,
        ][usize::from(r.u8() % 8)];
        let fault_seed = u64::from(r.u8());
        let n = r.u8();
        let rules = if n & 0x80 == 0 { 0 } else { 1 + n % 3 };
        let mut faults = Vec::new();
        for _ in 0..rules {
            if let Some(rule) = decode_fault(r)? {
                faults.push(rule);
            }
        }
        Ok(Setup {
            queues,
            queue_size_max,
            capacity,
            workers,
            faults,
            fault_seed,
            refuse_routes,
        })
    }

    /// One fault rule: mostly built from the input in the rule syntax, sometimes free text (then
    /// it also exercises the rule and backing parsers, and is used if it parses). Every rule that
    /// parses must show (Display) as text that parses back to the same rule.
    fn decode_fault(r: &mut Reader<'_>) -> Result<Option<FaultRule>, String> {
        let kind = r.u8() % 8;
        let op =
            ["", ",op=read", ",op=write", ",op=flush", ",op=get_id", ""][usize::from(r.u8() % 6)];
        let t = r.u8();
        let trigger = if t & 1 == 0 {
            format!("p={}", f64::from(t >> 1) / 127.0)
        } else {
            format!("every={}", 1 + (t >> 1) % 8)
        };
        let spec = match kind {
            0 | 1 => format!("error:{trigger}{op}"),
            2 | 3 => {
                let min = u32::from(r.u8()) * 4;
                let max = min + u32::from(r.u8()) * 4;
                format!("delay:{trigger},min={min}us,max={max}us{op}")
            }
            4 => format!("drop:{trigger}{op}"),
            5 => format!("hang:after={}{op}", t % 16),
            _ => {
                let len = usize::from(r.u8() % 48);
                let text = String::from_utf8_lossy(r.bytes(len)).into_owned();
                check_backing_round_trip(&text)?;
                text
            }
        };
        match FaultRule::parse(&spec) {
            Ok(rule) => {
                let shown = rule.to_string();
                match FaultRule::parse(&shown) {
                    Ok(again) if again == rule => Ok(Some(rule)),
                    other => Err(format!(
                        "fault rule {spec:?} shows as {shown:?}, which parses as {other:?}"
                    )),
                }
            }
            Err(_) if kind >= 6 => Ok(None),
            Err(e) => Err(format!(
                "the harness's fault rule {spec:?} does not parse: {e}"
            )),
        }
    }

    /// `Backing`'s Display promises to parse back to an equal value.
    fn check_backing_round_trip(text: &str) -> Result<(), String> {
        if let Ok(b) = Backing::parse(text) {
            let shown = b.to_string();
            match Backing::parse(&shown) {
                Ok(again) if again == b => {}
                other => {
                    return Err(format!(
                        "backing {text:?} shows as {shown:?}, which parses as {other:?}"
                    ))
                }
            }
        }
        Ok(())
    }

    /// A guest-physical address chosen relative to the structures the device looks at.
    #[derive(Debug, Clone, Copy)]
    enum Target {
        /// Inside queue `queue`'s descriptor table.
        Desc { queue: u8, offset: u32 },
        /// Inside its available ring.
        Avail { queue: u8, offset: u32 },
        /// Inside its used ring (clipped while a session uses it: see `Rig::write_mem`).
        Used { queue: u8, offset: u32 },
        /// Inside the buffer region.
        Buffer { offset: u32 },
        /// Anywhere in the first 4 MiB + 64 KiB (RAM, the hole, past the end).
        Anywhere { addr: u32 },
        /// Just before a region boundary.
        Edge { which: u8, back: u8 },
    }

    fn decode_target(r: &mut Reader<'_>) -> Target {
        let sel = r.u8();
        let queue = sel >> 3;
        match sel % 8 {
            0 | 1 => Target::Desc {
                queue,
                offset: r.u32(),
            },
            2 => Target::Avail {
                queue,
                offset: r.u32(),
            },
            3 => Target::Used {
                queue,
                offset: r.u32(),
            },
            4 | 5 => Target::Buffer { offset: r.u32() },
            6 => Target::Anywhere { addr: r.u32() },
            _ => Target::Edge {
                which: r.u8(),
                back: r.u8(),
            },
        }
    }

    /// The well-behaved driver's bring-up (see `Rig::bring_up`).
    #[derive(Debug, Clone)]
    struct BringUp {
        /// Which queues to enable (queue 0 if none of the device's).
        queue_mask: u8,
        /// log2 of each queue's size (clamped to the device maximum).
        sizes: [u8; 4],
        /// bit 0 FLUSH, 1 GET_ID, 2 EVENT_IDX; 0x30 drops VERSION_1, 0xc0 adds an unknown bit.
        features: u8,
        /// MSI-X vector per queue, and the configuration vector (index 4).
        vectors: [u8; 5],
        /// bit 0: enable MSI-X; bit 1: leave the entries masked; bit 2: function mask.
        msix: u8,
        /// Program ring addresses as two 32-bit halves instead of one 64-bit access.
        split_addr: bool,
    }

    /// One request of the well-behaved driver (see `Rig::submit`).
    #[derive(Debug, Clone)]
    struct Submit {
        queue: u8,
        op: u8,
        segs: u8,
        len_sel: u16,
        offset: u32,
        corrupt: u8,
        kick: u8,
        aligned: bool,
        status_len: u8,
    }

    /// One operation of a program.
    #[derive(Debug, Clone)]
    enum Op {
        BarRead {
            offset: u64,
            width: usize,
        },
        BarWrite {
            offset: u64,
            width: usize,
            value: u64,
        },
        Register {
            reg: u8,
            value: u64,
            read: bool,
        },
        ConfigRead {
            offset: u64,
            width: usize,
        },
        ConfigWrite {
            offset: u64,
            width: usize,
            value: u32,
        },
        Command {
            value: u16,
        },
        MsixControl {
            value: u16,
        },
        MsixEntry {
            vector: u8,
            offset: u8,
            width: usize,
            value: u64,
        },
        Pba {
            offset: u8,
            width: usize,
            write: bool,
        },
        Doorbell {
            queue: u8,
            how: u8,
        },
        Memory {
            target: Target,
            data: Vec<u8>,
        },
        Descriptor {
            queue: u8,
            index: u16,
            target: Target,
            len: u32,
            flags: u8,
            next: u16,
        },
        Avail {
            queue: u8,
            head: u16,
            advance: u8,
        },
        BringUp(BringUp),
        Submit(Submit),
        Wait {
            us: u16,
        },
        Suppress {
            queue: u8,
            which: u8,
            value: u16,
        },
        Reset {
            wait: bool,
        },
        Status {
            value: u8,
        },
        Sleep {
            us: u16,
        },
    }

    /// Opcodes (input byte modulo this many); repeated entries make an operation more likely.
    const OPCODES: u8 = 32;

    fn decode_op(r: &mut Reader<'_>) -> Op {
        let code = r.u8() % OPCODES;
        match code {
            0 | 1 => Op::BarRead {
                offset: u64::from(r.u16() % 0x4400),
                width: width(r.u8()),
            },
            2 | 3 => Op::BarWrite {
                offset: u64::from(r.u16() % 0x4400),
                width: width(r.u8()),
                value: r.u64(),
            },
            4..=6 => {
                let b = r.u8();
                Op::Register {
                    reg: b >> 1,
                    read: b & 1 == 1,
                    value: r.u64(),
                }
            }
            7 => Op::ConfigRead {
                offset: u64::from(r.u16() % 0x110),
                width: width(r.u8()),
            },
            8 => Op::ConfigWrite {
                offset: u64::from(r.u16() % 0x110),
                width: width(r.u8()),
                value: r.u32(),
            },
            9 => Op::Command { value: r.u16() },
            10 => Op::MsixControl { value: r.u16() },
            11 => Op::MsixEntry {
                vector: r.u8(),
                offset: r.u8(),
                width: width(r.u8()),
                value: r.u64(),
            },
            12 => {
                let b = r.u8();
                Op::Pba {
                    offset: r.u8() % 24,
                    width: width(b),
                    write: b & 0x10 != 0,
                }
            }
            13 | 14 => Op::Doorbell {
                queue: r.u8(),
                how: r.u8(),
            },
            15 => {
                let target = decode_target(r);
                let len = usize::from(r.u8() % 65);
                Op::Memory {
                    target,
                    data: r.bytes(len).to_vec(),
                }
            }
            16 => Op::Descriptor {
                queue: r.u8(),
                index: r.u16(),
                target: decode_target(r),
                len: r.u32(),
                flags: r.u8(),
                next: r.u16(),
            },
            17 => Op::Avail {
                queue: r.u8(),
                head: r.u16(),
                advance: r.u8(),
            },
            18 | 19 => {
                let queue_mask = r.u8();
                let sizes = [r.u8(), r.u8(), r.u8(), r.u8()];
                let features = r.u8();
                let vectors = [r.u8(), r.u8(), r.u8(), r.u8(), r.u8()];
                let msix = r.u8();
                Op::BringUp(BringUp {
                    queue_mask,
                    sizes,
                    features,
                    vectors,
                    msix,
                    split_addr: msix & 0x80 != 0,
                })
            }
            20..=25 => {
                let queue = r.u8();
                let op = r.u8();
                let segs = r.u8();
                let len_sel = r.u16();
                let offset = r.u32();
                let corrupt = r.u8();
                let kick = r.u8();
                Op::Submit(Submit {
                    queue,
                    op,
                    segs,
                    len_sel,
                    offset,
                    corrupt,
                    kick,
                    aligned: kick & 0x80 != 0,
                    status_len: kick >> 4 & 7,
                })
            }
            26 | 27 => Op::Wait { us: r.u16() % 512 },
            28 => Op::Suppress {
                queue: r.u8(),
                which: r.u8(),
                value: r.u16(),
            },
            29 => Op::Reset {
                wait: r.u8() & 3 != 0,
            },
            30 => Op::Status { value: r.u8() },
            _ => Op::Sleep {
                us: u16::from(r.u8()) * 2,
            },
        }
    }

    /// The opcode byte (as [`decode_op`] reads it) of each operation kind, for the seed
    /// generator.
    mod opcode {
        pub const BAR_READ: u8 = 0;
        pub const BAR_WRITE: u8 = 2;
        pub const REGISTER: u8 = 4;
        pub const CONFIG_WRITE: u8 = 8;
        pub const COMMAND: u8 = 9;
        pub const MSIX_CONTROL: u8 = 10;
        pub const MSIX_ENTRY: u8 = 11;
        pub const DOORBELL: u8 = 13;
        pub const MEMORY: u8 = 15;
        pub const DESCRIPTOR: u8 = 16;
        pub const AVAIL: u8 = 17;
        pub const BRING_UP: u8 = 18;
        pub const SUBMIT: u8 = 20;
        pub const WAIT: u8 = 26;
        pub const SUPPRESS: u8 = 28;
        pub const RESET: u8 = 29;
        pub const STATUS: u8 = 30;
        pub const SLEEP: u8 = 31;
    }

    /// Common configuration registers at their natural width (`Op::Register`), 64-bit address
    /// registers also as halves.
    const REGISTERS: [(u64, usize); 20] = [
        (common::DEVICE_FEATURE_SELECT, 4),
        (common::DEVICE_FEATURE, 4),
        (common::DRIVER_FEATURE_SELECT, 4),
        (common::DRIVER_FEATURE, 4),
        (common::CONFIG_MSIX_VECTOR, 2),
        (common::NUM_QUEUES, 2),
        (common::DEVICE_STATUS, 1),
        (common::CONFIG_GENERATION, 1),
        (common::QUEUE_SELECT, 2),
        (common::QUEUE_SIZE, 2),
        (common::QUEUE_MSIX_VECTOR, 2),
        (common::QUEUE_ENABLE, 2),
        (common::QUEUE_NOTIFY_OFF, 2),
        (common::QUEUE_DESC, 8),
        (common::QUEUE_DRIVER, 8),
        (common::QUEUE_DEVICE, 8),
        (common::QUEUE_DESC, 4),
        (common::QUEUE_DESC + 4, 4),
        (common::QUEUE_DRIVER, 4),
        (common::QUEUE_DEVICE + 4, 4),
    ];

    // ---------------------------------------------------------------------------------------
    // The platform's MSI side
    // ---------------------------------------------------------------------------------------

    /// The platform's MSI controller: counts what the device asks for and checks each trigger
    /// against what the guest allowed (it runs on the device thread too).
    #[derive(Debug)]
    struct Recorder {
        vectors: u16,
        refuse_routes: bool,
        /// Per vector: MSI-X enabled, the function and the entry unmasked (mirrors the guest's
        /// last writes; refreshed after each).
        deliverable: Vec<AtomicBool>,
        /// Set around MSI-X table writes: unmasking a pending vector fires it inside the write,
        /// before the mirror is refreshed.
        table_write: AtomicBool,
        /// Set around configuration writes (MSI-X enable and function mask, Bus Master Enable):
        /// vectors that fire inside one are counted, and judged once the write is done.
        config_write: AtomicBool,
        fired_in_config_write: AtomicU32,
        /// Bus Master Enable (SPEC 1: no MSI-X message while it is clear; an MSI is a memory
        /// write).
        bus_master: AtomicBool,
        /// From the first write of DRIVER_OK to a completed reset: outside, nothing may fire.
        session: AtomicBool,
        /// Fault rules make the device raise (or drop) interrupts on purpose.
        lenient: bool,
        violations: Mutex<Vec<String>>,
    }

    impl Recorder {
        fn new(vectors: u16, refuse_routes: bool, lenient: bool) -> Self {
            Recorder {
                vectors,
                refuse_routes,
                lenient,
                deliverable: (0..vectors).map(|_| AtomicBool::new(false)).collect(),
                table_write: AtomicBool::new(false),
                config_write: AtomicBool::new(false),
                fired_in_config_write: AtomicU32::new(0),
                bus_master: AtomicBool::new(false),
                session: AtomicBool::new(false),
                violations: Mutex::new(Vec::new()),
            }
        }

        fn violation(&self, msg: String) {
            let mut v = lock(&self.violations);
            if v.len() < 4 {
                v.push(msg);
            }
        }
    }

    impl MsiController for Recorder {
        fn set_route(
            &self,
            vector: u16,
            _addr: u64,
            _data: u32,
            _masked: bool,
        ) -> Result<(), MsiError> {
            if vector >= self.vectors {
                self.violation(format!(
                    "route for MSI-X vector {vector}; the function has {}",
                    self.vectors
                ));
            }
            if self.refuse_routes && vector % 2 == 1 {
                return Err(MsiError::Route {
                    vector,
                    reason: "refused by the fuzz platform".into(),
                });
            }
            Ok(())
        }

        fn trigger(&self, vector: u16) {
            if self.lenient {
                return;
            }
            if self.config_write.load(Ordering::SeqCst) {
                self.fired_in_config_write.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if !self.bus_master.load(Ordering::SeqCst) {
                self.violation(format!(
                    "MSI-X vector {vector} fired while Bus Master Enable was clear"
                ));
                return;
            }
            if self.table_write.load(Ordering::SeqCst) {
                return;
            }
            let allowed = self.session.load(Ordering::SeqCst)
                && self
                    .deliverable
                    .get(usize::from(vector))
                    .is_some_and(|d| d.load(Ordering::SeqCst));
            if !allowed {
                self.violation(format!(
                    "MSI-X vector {vector} fired while masked, disabled, or outside a session \
                     (between a completed reset and the next DRIVER_OK)"
                ));
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // What the harness knows
    // ---------------------------------------------------------------------------------------

    /// Where one queue's structures are.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Rings {
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    }

    impl Rings {
        fn desc_range(&self) -> (u64, u64) {
            (
                self.desc,
                self.desc.saturating_add(16 * u64::from(self.size)),
            )
        }
        fn avail_range(&self) -> (u64, u64) {
            let len = abi::ring::avail_size(self.size) as u64;
            (self.avail, self.avail.saturating_add(len))
        }
        fn used_range(&self) -> (u64, u64) {
            let len = abi::ring::used_size(self.size) as u64;
            (self.used, self.used.saturating_add(len))
        }
        fn used_idx(&self) -> u64 {
            self.used.saturating_add(2)
        }
    }

    /// The driver's ring layout in the ring region: each structure page-aligned, one queue
    /// after the other; the largest queue is halved until all fit.
    fn layout(sizes: &[u16]) -> Vec<Rings> {
        let mut sizes = sizes.to_vec();
        loop {
            let mut at = RING.0;
            let mut out = Vec::with_capacity(sizes.len());
            for &n in &sizes {
                let desc = at;
                let avail = align_up(desc + abi::ring::desc_table_size(n) as u64, PAGE);
                let used = align_up(avail + abi::ring::avail_size(n) as u64, PAGE);
                at = align_up(used + abi::ring::used_size(n) as u64, PAGE);
                out.push(Rings {
                    size: n,
                    desc,
                    avail,
                    used,
                });
            }
            if at <= RING.0 + RING.1 {
                return out;
            }
            match sizes.iter_mut().max() {
                Some(m) if *m > 1 => *m /= 2,
                _ => return out,
            }
        }
    }

    /// A queue the device may be running, whose used index the harness watches.
    #[derive(Debug, Clone)]
    struct Watched {
        index: u16,
        rings: Rings,
        /// The used index after the previous operation, once the device has written it.
        last: Option<u16>,
        /// What the used index held at activation (the guest's; the device counts from 0).
        pristine: Option<u16>,
        /// It must stay at this value (a reset started, or NEEDS_RESET seen), and why.
        frozen: Option<(u16, &'static str)>,
        /// It must stay at this value while Bus Master Enable is clear.
        bme_frozen: Option<u16>,
        /// A device-writable buffer overlaps the used index: it may change for other reasons.
        tainted: bool,
    }

    /// What one request should come back as (SPEC 6, 6.2, clarification 3).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Expect {
        /// Valid: OK (or IOERR where a fault or a Bus Master Enable toggle allows it).
        Valid { op: u32, length: u32 },
        /// MALFORMED, used length 1.
        Malformed,
        /// UNSUPP, used length 1.
        Unsupported,
        /// MALFORMED or UNSUPP: a header-field error in a request with an op that is not
        /// negotiated (which check comes first is not pinned down).
        Rejected,
        /// The status descriptor is unusable: used length 0, no status byte.
        NoStatus,
    }

    /// A request the driver has on the device.
    #[derive(Debug)]
    struct Outstanding {
        descs: Vec<u16>,
        expect: Expect,
        corrupt: Corrupt,
        /// Status byte address, when the device should write it.
        status: Option<u64>,
        /// Status byte address, when the device must leave it alone although it is writable.
        untouched: Option<u64>,
        /// The buffer block (header, data, status) in the buffer region.
        block: (u64, u64),
        /// GET_ID data segments.
        id_segments: Vec<(u64, u32)>,
        /// A raw write hit the request's buffers: its outcome is no longer predictable.
        tampered: bool,
        /// `Rig::bme_off_count` at submission.
        bme_gen: u64,
    }

    /// One of the driver's queues.
    #[derive(Debug)]
    struct DriverQueue {
        index: u16,
        rings: Rings,
        free: Vec<u16>,
        avail_idx: u16,
        used_idx: u16,
        outstanding: HashMap<u16, Outstanding>,
    }

    /// The well-behaved driver, from its bring-up to the end of the session, while no raw
    /// write touched its rings.
    #[derive(Debug)]
    struct Driver {
        queues: Vec<DriverQueue>,
        features: u64,
        next_buf: u64,
        next_id: u64,
    }

    impl Driver {
        /// A block of `len` bytes in the buffer region that no outstanding request uses.
        fn alloc(&mut self, len: u64) -> Option<u64> {
            let len = align_up(len.max(1), 512);
            if len > BUFFERS.1 {
                return None;
            }
            let mut at = self.next_buf;
            if at + len > BUFFERS.0 + BUFFERS.1 {
                at = BUFFERS.0;
            }
            let block = (at, at + len);
            let busy = self
                .queues
                .iter()
                .flat_map(|q| q.outstanding.values())
                .any(|o| overlaps(o.block, block));
            if busy {
                return None;
            }
            self.next_buf = at + len;
            Some(at)
        }
    }

    /// From the first DRIVER_OK write to a completed reset.
    #[derive(Debug, Default)]
    struct Session {
        queues: Vec<Watched>,
        driver: Option<Driver>,
        needs_reset: bool,
        /// Device-writable buffers overlap descriptor tables or available rings: the device
        /// may rewrite what it reads, so the memory and used-index bounds are not checked.
        lax: bool,
    }

    /// Faults the setup configured, as far as the checks care.
    #[derive(Debug, Clone, Copy, Default)]
    struct FaultSummary {
        error: bool,
        /// `drop`, `hang`, or a delay longer than [`DRAIN_MAX_DELAY`]: requests may never
        /// (or not soon) complete.
        unbounded: bool,
        /// A rule of a kind that makes the device misreport on purpose (anything but the four
        /// of SPEC 7): what comes back, and the interrupts, are not checked.
        lies: bool,
    }

    impl FaultSummary {
        fn of(rules: &[FaultRule]) -> Self {
            let mut s = FaultSummary::default();
            for r in rules {
                // By name, so that kinds added to the injector land in `lies` by default.
                match r.kind.name() {
                    "error" => s.error = true,
                    "drop" | "hang" => s.unbounded = true,
                    "delay" => {}
                    _ => {
                        s.lies = true;
                        s.unbounded = true;
                    }
                }
                if let FaultKind::Delay { max, .. } = r.kind {
                    if max > DRAIN_MAX_DELAY {
                        s.unbounded = true;
                    }
                }
            }
            s
        }
    }

    /// Malformations the driver can put into a request (one at a time).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Corrupt {
        None,
        HeaderShort,
        HeaderLong,
        HeaderWritable,
        HeaderOutside,
        Flags,
        Reserved,
        WrongDirection,
        ZeroLength,
        LengthMismatch,
        TooManySegments,
        PastCapacity,
        OffsetOverflow,
        TooLong,
        FlushWithData,
        GetIdShort,
        DataInHole,
        DataPastEnd,
        DataStraddle,
        Indirect,
        StatusReadable,
        StatusEmpty,
        StatusOutside,
        UnknownOp,
        NoData,
    }

    const CORRUPTIONS: [Corrupt; 24] = [
        Corrupt::HeaderShort,
        Corrupt::HeaderLong,
        Corrupt::HeaderWritable,
        Corrupt::HeaderOutside,
        Corrupt::Flags,
        Corrupt::Reserved,
        Corrupt::WrongDirection,
        Corrupt::ZeroLength,
        Corrupt::LengthMismatch,
        Corrupt::TooManySegments,
        Corrupt::PastCapacity,
        Corrupt::OffsetOverflow,
        Corrupt::TooLong,
        Corrupt::FlushWithData,
        Corrupt::GetIdShort,
        Corrupt::DataInHole,
        Corrupt::DataPastEnd,
        Corrupt::DataStraddle,
        Corrupt::Indirect,
        Corrupt::StatusReadable,
        Corrupt::StatusEmpty,
        Corrupt::StatusOutside,
        Corrupt::UnknownOp,
        Corrupt::NoData,
    ];

    /// When a malformation is found relative to the op check (SPEC clarification 3).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Stage {
        /// Chain shape, lengths 0, INDIRECT, addresses, header descriptor, status: MALFORMED
        /// before the op is looked at.
        Early,
        /// `flags`/`reserved`: header contents, before or after the op check.
        Either,
        /// Op-specific: after the op check (an unsupported op answers UNSUPP).
        Late,
    }

    impl Corrupt {
        fn stage(self) -> Option<Stage> {
            use Corrupt::*;
            match self {
                None | UnknownOp => Option::None,
                HeaderShort | HeaderLong | HeaderWritable | HeaderOutside | ZeroLength
                | TooManySegments | DataInHole | DataPastEnd | DataStraddle | Indirect
                | StatusReadable | StatusEmpty | StatusOutside => Some(Stage::Early),
                Flags | Reserved => Some(Stage::Either),
                WrongDirection | LengthMismatch | PastCapacity | OffsetOverflow | TooLong
                | FlushWithData | GetIdShort | NoData => Some(Stage::Late),
            }
        }

        fn needs_data(self) -> bool {
            use Corrupt::*;
            matches!(
                self,
                WrongDirection | ZeroLength | DataInHole | DataPastEnd | DataStraddle | Indirect
            )
        }
    }

    // ---------------------------------------------------------------------------------------
    // Guest memory helpers
    // ---------------------------------------------------------------------------------------

    /// Little-endian value of up to 8 bytes.
    fn le(b: &[u8]) -> u64 {
        b.iter().rev().fold(0, |acc, &x| acc << 8 | u64::from(x))
    }

    fn used_index(mem: &GuestMemoryMmap, rings: &Rings) -> Option<u16> {
        mem.load::<u16>(GuestAddress(rings.used_idx()), Ordering::Acquire)
            .ok()
            .map(u16::from_le)
    }

    /// Which pages of the region at guest `base` (`len` bytes) are resident. Guest memory is a
    /// fresh anonymous mapping per input, so a page nobody touched is not resident and still
    /// zero: the memory check compares only resident pages. (A page swapped out would be
    /// skipped: a missed finding, never a false one.)
    fn resident_pages(mem: &GuestMemoryMmap, base: u64, len: u64) -> Vec<bool> {
        let pages = (len / PAGE) as usize;
        let Ok(host) = mem.get_host_address(GuestAddress(base)) else {
            return vec![true; pages];
        };
        let mut vec = vec![0u8; pages];
        // SAFETY: `host` is the start of the page-aligned host mapping of one guest region of
        // `len` bytes, kept mapped by `mem` for the whole call; `vec` has one byte per page of
        // that range, which is all mincore(2) writes.
        let rc = unsafe { libc::mincore(host.cast(), len as usize, vec.as_mut_ptr()) };
        if rc != 0 {
            return vec![true; pages];
        }
        vec.iter().map(|b| b & 1 != 0).collect()
    }

    /// Drops the pages of the region at guest `base` (`len` bytes): they read back as zero.
    fn discard(mem: &GuestMemoryMmap, base: u64, len: u64) -> bool {
        let Ok(host) = mem.get_host_address(GuestAddress(base)) else {
            return false;
        };
        // SAFETY: `host` is the page-aligned start of one guest region, a private anonymous
        // mapping of `len` bytes kept mapped by `mem`. MADV_DONTNEED only drops its pages (the
        // next access reads zeros); nothing else accesses guest memory now, as the device's
        // reset is complete and the harness is between programs.
        unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) == 0 }
    }

    /// Sorted, merged copy of `ranges`.
    fn merged(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = ranges.iter().copied().filter(|r| r.0 < r.1).collect();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if r.0 <= last.1 => last.1 = last.1.max(r.1),
                _ => out.push(r),
            }
        }
        out
    }

    fn contains(sorted: &[(u64, u64)], addr: u64) -> bool {
        let i = sorted.partition_point(|&(start, _)| start <= addr);
        i.checked_sub(1)
            .and_then(|k| sorted.get(k))
            .is_some_and(|&(_, end)| addr < end)
    }

    /// The first run of bytes of `page` (at guest `base`) that differ from `expected` outside
    /// `allowed`: `(address, bytes now)`.
    fn stray(
        base: u64,
        page: &[u8],
        expected: &[u8],
        allowed: &[(u64, u64)],
    ) -> Option<(u64, Vec<u8>)> {
        let mut run: Option<(u64, Vec<u8>)> = None;
        for (i, (&now, &was)) in page.iter().zip(expected).enumerate() {
            let addr = base + i as u64;
            let bad = now != was && !contains(allowed, addr);
            match (&mut run, bad) {
                (None, true) => run = Some((addr, vec![now])),
                (Some((_, bytes)), true) if bytes.len() < 16 => bytes.push(now),
                (Some(_), _) => break,
                (None, false) => {}
            }
        }
        run
    }

    fn device_id() -> [u8; abi::ID_LEN] {
        let mut id = [0u8; abi::ID_LEN];
        let name = Backing::Memory { size: 1 }.id_string().as_bytes();
        for (d, s) in id.iter_mut().zip(name) {
            *d = *s;
        }
        id
    }

    fn vector_choice(b: u8, vectors: u16) -> u16 {
        let v = u16::from(b) % (vectors + 2);
        match v {
            v if v < vectors => v,
            v if v == vectors => abi::NO_VECTOR,
            _ => 0x7f0 | u16::from(b),
        }
    }

    /// A data segment's length: small and unaligned, or large (split over the segments).
    fn seg_len(sel: u16, i: u32, aligned: bool, n: u32) -> u32 {
        let v = u32::from(sel.rotate_left(i * 3));
        let len = if v & 0x8000 != 0 {
            ((v & 0x3f) + 1) * 4096 / n.max(1)
        } else {
            1 + (v & 0xfff)
        };
        let len = if aligned {
            align_up(u64::from(len), 512) as u32
        } else {
            len
        };
        len.max(1)
    }

    // ---------------------------------------------------------------------------------------
    // The rig: transport + engine + guest memory + what the harness knows
    // ---------------------------------------------------------------------------------------

    struct Rig {
        t: Transport,
        doorbells: Vec<Arc<EventFd>>,
        mem: GuestMemoryMmap,
        msi: Arc<Recorder>,
        msix_cap: u64,
        /// The configuration space as the rig set it up (restored when the rig is reused).
        config0: Vec<u8>,
        queues: u16,
        queue_size_max: u16,
        capacity: u64,
        max_segments: u32,
        faults: FaultSummary,
        /// What guest memory should hold outside the device-writable ranges (pages not here are
        /// zero).
        shadow: HashMap<u64, Box<[u8; PAGE as usize]>>,
        /// Where the device may write in this session: used rings and device-writable buffers.
        allowed: Vec<(u64, u64)>,
        session: Option<Session>,
        /// DEVICE_STATUS = 0 written and not yet read back as 0: the transport is resetting
        /// (and ignores status writes).
        reset_pending: bool,
        /// How many times Bus Master Enable went from set to clear.
        bme_off_count: u64,
        wait_left: Duration,
        failure: Option<String>,
        stats: Stats,
    }

    /// What one program reached (for `replay -v` and for judging the seeds).
    #[derive(Debug, Default, Clone, Copy)]
    pub struct Stats {
        /// Operations run.
        pub ops: usize,
        /// Bring-ups that reached DRIVER_OK.
        pub bring_ups: u32,
        /// Requests the driver placed, and how many of them were malformed on purpose.
        pub submitted: u32,
        /// ... of which malformed on purpose.
        pub malformed: u32,
        /// Requests that came back and were checked.
        pub completed: u32,
        /// Resets that completed (DEVICE_STATUS read back as 0 after a session).
        pub resets: u32,
        /// NEEDS_RESET seen.
        pub needs_reset: u32,
        /// Memory comparisons, and pages compared in them.
        pub diffs: u32,
        /// Pages compared.
        pub pages: u32,
    }

    impl Rig {
        fn new(setup: &Setup) -> Result<Rig, String> {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[
                (GuestAddress(RING.0), RING.1 as usize),
                (GuestAddress(BUFFERS.0), BUFFERS.1 as usize),
            ])
            .map_err(|e| format!("guest memory: {e}"))?;
            let options = DeviceOptions {
                queues: setup.queues,
                queue_size_max: setup.queue_size_max,
                backing: Backing::Memory {
                    size: setup.capacity,
                },
                faults: setup.faults.clone(),
                fault_seed: setup.fault_seed,
                workers: setup.workers,
                ..DeviceOptions::default()
            };
            let max_segments = options.max_segments();
            let engine = Engine::new(options, mem.clone()).map_err(|e| format!("engine: {e}"))?;
            let doorbells = engine.doorbells();
            let faults = FaultSummary::of(&setup.faults);
            let msi = Arc::new(Recorder::new(
                setup.queues + 1,
                setup.refuse_routes,
                faults.lies,
            ));
            let mut t = Transport::new(Box::new(engine), msi.clone())
                .map_err(|e| format!("transport: {e}"))?;
            // Firmware places BAR0 and enables memory decoding; bus mastering is the driver's
            // (Linux: pci_set_master in probe).
            t.config_space_mut()
                .set_bar_address(0, 0xc000_0000)
                .map_err(|e| format!("BAR0: {e}"))?;
            t.config_space_mut().set_command(command::MEMORY);
            let mut config0 = vec![0u8; crate::pci::CONFIG_SPACE_SIZE];
            t.config_read(0, &mut config0);
            let msix_cap = t
                .config_space()
                .capabilities()
                .into_iter()
                .find(|&(id, _)| id == cap_id::MSIX)
                .map(|(_, off)| u64::from(off))
                .ok_or("no MSI-X capability")?;
            Ok(Rig {
                t,
                doorbells,
                mem,
                msi,
                msix_cap,
                config0,
                queues: setup.queues,
                queue_size_max: setup.queue_size_max,
                capacity: setup.capacity,
                max_segments,
                faults,
                shadow: HashMap::new(),
                allowed: Vec::new(),
                session: None,
                reset_pending: false,
                bme_off_count: 0,
                wait_left: WAIT_BUDGET,
                failure: None,
                stats: Stats::default(),
            })
        }

        fn fail(&mut self, msg: String) {
            if self.failure.is_none() {
                self.failure = Some(msg);
            }
        }

        fn command(&self) -> u16 {
            self.t.config_space().command()
        }

        fn decoding(&self) -> bool {
            self.command() & command::MEMORY != 0
        }

        fn bus_master(&self) -> bool {
            self.command() & command::BUS_MASTER != 0
        }

        // --- the guest's accesses (everything the program does goes through these) ---------

        fn bar_read(&mut self, offset: u64, width: usize) -> u64 {
            let mut b = [0u8; 8];
            self.t.bar_read(0, offset, &mut b[..width.min(8)]);
            let v = u64::from_le_bytes(b);
            if offset == common::DEVICE_STATUS && width == 1 && self.decoding() {
                self.saw_status(v as u8);
            }
            v
        }

        fn bar_write(&mut self, offset: u64, data: &[u8]) {
            let decoding = self.decoding();
            let status = match data {
                [v] if decoding && offset == common::DEVICE_STATUS => Some(*v),
                _ => None,
            };
            let table = decoding && (bar0::MSIX_TABLE..bar0::MSIX_PBA).contains(&offset);
            if let Some(v) = status {
                if v & status::DRIVER_OK != 0 {
                    // Activation may fail and raise the configuration vector inside the write.
                    self.msi.session.store(true, Ordering::SeqCst);
                }
            }
            if table {
                self.msi.table_write.store(true, Ordering::SeqCst);
            }
            self.t.bar_write(0, offset, data);
            if table {
                self.refresh_msi();
                self.msi.table_write.store(false, Ordering::SeqCst);
            }
            if let Some(v) = status {
                self.after_status_write(v);
            }
        }

        fn config_write(&mut self, offset: u64, data: &[u8]) {
            let bme_before = self.bus_master();
            self.msi.fired_in_config_write.store(0, Ordering::SeqCst);
            self.msi.config_write.store(true, Ordering::SeqCst);
            self.t.config_write(offset, data);
            self.refresh_msi();
            let bme = self.bus_master();
            self.msi.bus_master.store(bme, Ordering::SeqCst);
            self.msi.config_write.store(false, Ordering::SeqCst);
            let fired = self.msi.fired_in_config_write.load(Ordering::SeqCst);
            if fired > 0 && !bme_before && !bme && !self.msi.lenient {
                // E.g. enabling MSI-X or clearing the function mask with a vector pending.
                self.msi.violation(format!(
                    "{fired} MSI-X message(s) during a configuration write at {offset:#x} \
                     while Bus Master Enable stayed clear"
                ));
            }
            if bme_before && !bme {
                self.bme_off_count += 1;
                let mem = &self.mem;
                if let Some(s) = self.session.as_mut() {
                    for w in s.queues.iter_mut() {
                        w.bme_frozen = used_index(mem, &w.rings);
                    }
                }
            } else if !bme_before && bme {
                if let Some(s) = self.session.as_mut() {
                    for w in s.queues.iter_mut() {
                        w.bme_frozen = None;
                    }
                }
            }
        }

        fn read_reg(&mut self, offset: u64, width: usize) -> u64 {
            self.bar_read(offset, width)
        }

        fn write_reg(&mut self, offset: u64, width: usize, value: u64) {
            let b = value.to_le_bytes();
            self.bar_write(offset, &b[..width.min(8)]);
        }

        /// The harness's own register read (not the guest's): only for registers without side
        /// effects.
        fn peek(&mut self, offset: u64, width: usize) -> u64 {
            let mut b = [0u8; 8];
            self.t.bar0_read(offset, &mut b[..width.min(8)]);
            u64::from_le_bytes(b)
        }

        /// Mirror of what may fire, from the MSI-X capability and table as they are now.
        fn refresh_msi(&mut self) {
            let control = self
                .t
                .config_space()
                .read_u16(self.msix_cap + msix::CAP_CONTROL);
            let on =
                control & msix::CONTROL_ENABLE != 0 && control & msix::CONTROL_FUNCTION_MASK == 0;
            for v in 0..self.msi.vectors {
                let ctl = self.peek(bar0::MSIX_TABLE + 16 * u64::from(v) + 12, 4);
                let masked = ctl as u32 & msix::VECTOR_MASKED != 0;
                if let Some(d) = self.msi.deliverable.get(usize::from(v)) {
                    d.store(on && !masked, Ordering::SeqCst);
                }
            }
        }

        // --- device status -----------------------------------------------------------------

        fn after_status_write(&mut self, v: u8) {
            if v == 0 {
                self.reset_pending = true;
                let mem = &self.mem;
                if let Some(s) = self.session.as_mut() {
                    // The device drops every request; the driver expects nothing any more.
                    s.driver = None;
                    for w in s.queues.iter_mut() {
                        if w.frozen.is_none() {
                            w.frozen =
                                used_index(mem, &w.rings).map(|i| (i, "a reset was started"));
                        }
                    }
                }
                // Read the status back at once, as drivers do: then the harness knows whether
                // the transport is resetting (it ignores status writes until a read sees 0).
                let s = self.peek(common::DEVICE_STATUS, 1);
                self.saw_status(s as u8);
            } else if v & status::DRIVER_OK != 0 {
                self.note_activation();
            }
        }

        fn saw_status(&mut self, v: u8) {
            if v == 0 {
                self.reset_pending = false;
                if self.session.is_some() {
                    self.end_session();
                }
                self.msi.session.store(false, Ordering::SeqCst);
            } else if v & status::NEEDS_RESET != 0 && !self.reset_pending {
                self.saw_needs_reset();
            }
        }

        fn saw_needs_reset(&mut self) {
            let mem = &self.mem;
            let Some(s) = self.session.as_mut() else {
                return;
            };
            if s.needs_reset {
                return;
            }
            s.needs_reset = true;
            self.stats.needs_reset += 1;
            for w in s.queues.iter_mut() {
                if w.frozen.is_none() {
                    w.frozen = used_index(mem, &w.rings).map(|i| (i, "NEEDS_RESET was seen"));
                }
            }
            if s.driver.is_some() && !self.faults.lies {
                self.fail(
                    "NEEDS_RESET although the driver set up and used every queue correctly".into(),
                );
            }
        }

        /// A status write with DRIVER_OK: the engine may have been activated with the queue
        /// registers as they are now. Watch those queues (a write that activated nothing only
        /// makes the checks more permissive).
        fn note_activation(&mut self) {
            if self.reset_pending {
                return;
            }
            let select = self.peek(common::QUEUE_SELECT, 2);
            let mut found = Vec::new();
            for q in 0..self.queues {
                self.t.bar0_write(common::QUEUE_SELECT, &q.to_le_bytes());
                if self.peek(common::QUEUE_SELECT, 2) != u64::from(q) {
                    break;
                }
                if self.peek(common::QUEUE_ENABLE, 2) & 1 == 0 {
                    continue;
                }
                let rings = Rings {
                    size: self.peek(common::QUEUE_SIZE, 2) as u16,
                    desc: self.peek(common::QUEUE_DESC, 8),
                    avail: self.peek(common::QUEUE_DRIVER, 8),
                    used: self.peek(common::QUEUE_DEVICE, 8),
                };
                found.push((q, rings));
            }
            self.t
                .bar0_write(common::QUEUE_SELECT, &select.to_le_bytes()[..2]);
            let bme = self.bus_master();
            let mem = &self.mem;
            let session = self.session.get_or_insert_with(Session::default);
            let mut new = Vec::new();
            for (index, rings) in found {
                if session
                    .queues
                    .iter()
                    .any(|w| w.index == index && w.rings == rings)
                {
                    continue;
                }
                let now = used_index(mem, &rings);
                session.queues.push(Watched {
                    index,
                    rings,
                    last: None,
                    pristine: now,
                    frozen: None,
                    bme_frozen: if bme { None } else { now },
                    tainted: false,
                });
                new.push(rings);
            }
            for rings in &new {
                self.allowed.push(rings.used_range());
            }
            for rings in new {
                self.scan_descriptors(rings, 0, u64::from(rings.size));
            }
            self.classify_all();
        }

        fn end_session(&mut self) {
            self.stats.resets += 1;
            self.diff("when the reset completed");
            self.allowed.clear();
            self.session = None;
        }

        // --- guest memory ------------------------------------------------------------------

        /// A guest write of `data` at `addr`: only the parts inside RAM land. The used rings of
        /// the live session are left out: only the device writes them (a driver has no reason
        /// to), and the used-index checks rely on it. `raw` writes (not the driver's own) that
        /// hit the driver's rings retire the driver; those that hit a request's buffers make
        /// that request's outcome unpredictable.
        fn write_mem(&mut self, addr: u64, data: &[u8], raw: bool) {
            let end = addr.saturating_add(data.len() as u64);
            if addr >= end {
                return;
            }
            let mut cuts: Vec<(u64, u64)> = self
                .session
                .as_ref()
                .map(|s| s.queues.iter().map(|w| w.rings.used_range()).collect())
                .unwrap_or_default();
            cuts.sort_unstable();
            for (rb, rl) in REGIONS {
                let (s, e) = (addr.max(rb), end.min(rb + rl));
                if s >= e {
                    continue;
                }
                let mut cur = s;
                let mut pieces = Vec::new();
                for &(cs, ce) in &cuts {
                    if ce <= cur || cs >= e {
                        continue;
                    }
                    if cs > cur {
                        pieces.push((cur, cs));
                    }
                    cur = cur.max(ce);
                }
                if cur < e {
                    pieces.push((cur, e));
                }
                for (a, b) in pieces {
                    let Some(src) = data.get((a - addr) as usize..(b - addr) as usize) else {
                        continue;
                    };
                    if self.mem.write_slice(src, GuestAddress(a)).is_ok() {
                        self.shadow_write(a, src);
                    }
                }
            }
            let range = (addr, end);
            let tables: Vec<Rings> = self
                .session
                .as_ref()
                .map(|s| s.queues.iter().map(|w| w.rings).collect())
                .unwrap_or_default();
            for rings in tables {
                let (d0, d1) = rings.desc_range();
                if overlaps(range, (d0, d1)) {
                    let first = (addr.max(d0) - d0) / 16;
                    let last = (end.min(d1) - d0).div_ceil(16);
                    self.scan_descriptors(rings, first, last);
                }
            }
            if !raw {
                return;
            }
            if let Some(s) = self.session.as_mut() {
                if let Some(d) = s.driver.as_mut() {
                    let rings_hit = d.queues.iter().any(|q| {
                        overlaps(range, q.rings.desc_range())
                            || overlaps(range, q.rings.avail_range())
                    });
                    if rings_hit {
                        s.driver = None;
                    } else {
                        for o in d.queues.iter_mut().flat_map(|q| q.outstanding.values_mut()) {
                            if overlaps(o.block, range) {
                                o.tampered = true;
                            }
                        }
                    }
                }
            }
        }

        fn shadow_write(&mut self, addr: u64, src: &[u8]) {
            let mut at = addr;
            let mut rest = src;
            while !rest.is_empty() {
                let page = at & !(PAGE - 1);
                let off = (at - page) as usize;
                let n = rest.len().min(PAGE as usize - off);
                let p = self
                    .shadow
                    .entry(page)
                    .or_insert_with(|| Box::new([0u8; PAGE as usize]));
                if let (Some(dst), Some(src)) = (p.get_mut(off..off + n), rest.get(..n)) {
                    dst.copy_from_slice(src);
                }
                at += n as u64;
                rest = rest.get(n..).unwrap_or_default();
            }
        }

        /// Descriptors `first..end` of a live table: their device-writable buffers are places
        /// the device may write from now on.
        fn scan_descriptors(&mut self, rings: Rings, first: u64, end: u64) {
            let end = end.min(u64::from(rings.size));
            if first >= end {
                return;
            }
            let count = (end - first) as usize;
            let base = rings.desc.saturating_add(16 * first);
            let mut table = vec![0u8; 16 * count];
            let whole = self.mem.read_slice(&mut table, GuestAddress(base)).is_ok();
            for i in 0..count {
                let mut d = [0u8; 16];
                match table.get(16 * i..16 * i + 16) {
                    Some(src) if whole => d.copy_from_slice(src),
                    _ => {
                        let at = base.saturating_add(16 * i as u64);
                        if self.mem.read_slice(&mut d, GuestAddress(at)).is_err() {
                            continue;
                        }
                    }
                }
                let addr = le(&d[0..8]);
                let len = le(&d[8..12]);
                let flags = le(&d[12..14]) as u16;
                if flags & desc_flags::WRITE != 0 && len > 0 {
                    self.add_allowed(addr, len);
                }
            }
        }

        fn add_allowed(&mut self, addr: u64, len: u64) {
            let range = (addr, addr.saturating_add(len));
            self.allowed.push(range);
            if let Some(s) = self.session.as_mut() {
                classify(s, range);
            }
        }

        fn classify_all(&mut self) {
            if let Some(s) = self.session.as_mut() {
                for &range in &self.allowed {
                    classify(s, range);
                }
            }
        }

        /// Compares guest memory with the shadow: outside the allowed ranges nothing may have
        /// changed. Then the shadow takes what the device wrote.
        fn diff(&mut self, when: &str) {
            let lax = self.session.as_ref().is_some_and(|s| s.lax);
            let allowed = merged(&self.allowed);
            let zero = [0u8; PAGE as usize];
            let mut found = None;
            let mut adopt = Vec::new();
            let mut pages = 0;
            for (base, len) in REGIONS {
                let resident = resident_pages(&self.mem, base, len);
                for (i, &res) in resident.iter().enumerate() {
                    let page = base + i as u64 * PAGE;
                    let known = self.shadow.get(&page);
                    if !res && known.is_none() {
                        continue;
                    }
                    let mut now = [0u8; PAGE as usize];
                    pages += 1;
                    if self.mem.read_slice(&mut now, GuestAddress(page)).is_err() {
                        continue;
                    }
                    let expected: &[u8] = known.map_or(&zero[..], |p| &p[..]);
                    if now[..] == *expected {
                        continue;
                    }
                    if !lax && found.is_none() {
                        found = stray(page, &now, expected, &allowed);
                    }
                    adopt.push((page, now));
                }
            }
            if let Some((addr, bytes)) = found {
                self.fail(format!(
                    "{when}: the device wrote guest memory at {addr:#x} (now {bytes:02x?}), \
                     outside the used rings and device-writable buffers of the session"
                ));
            }
            for (page, now) in adopt {
                self.shadow.insert(page, Box::new(now));
            }
            self.stats.diffs += 1;
            self.stats.pages += pages;
        }

        // --- checks after every operation ---------------------------------------------------

        fn check(&mut self) {
            let lies = self.faults.lies;
            let violation = lock(&self.msi.violations).first().cloned();
            if let Some(v) = violation {
                self.fail(v);
            }
            if self.session.is_none() {
                return;
            }
            if !self.reset_pending {
                // Not resetting: reading the status has no side effect.
                let s = self.peek(common::DEVICE_STATUS, 1) as u8;
                self.saw_status(s);
            }
            let mem = &self.mem;
            let Some(s) = self.session.as_mut() else {
                return;
            };
            let mut msg = None;
            for w in s.queues.iter_mut() {
                if w.tainted {
                    continue;
                }
                let Some(v) = used_index(mem, &w.rings) else {
                    continue;
                };
                let q = w.index;
                if let Some((f, why)) = w.frozen {
                    if v != f {
                        msg = Some(format!(
                            "queue {q}: used index moved from {f} to {v} after {why}"
                        ));
                        break;
                    }
                }
                if let Some(f) = w.bme_frozen {
                    if v != f {
                        msg = Some(format!(
                            "queue {q}: used index moved from {f} to {v} while Bus Master Enable was clear"
                        ));
                        break;
                    }
                }
                let last = match (w.last, w.pristine) {
                    (Some(last), _) => Some(last),
                    // Still what the guest left there: the device has not written it yet.
                    (None, Some(p)) if p == v => None,
                    // The device counts from 0.
                    (None, _) => Some(0),
                };
                if let (Some(last), false) = (last, s.lax || lies) {
                    let step = v.wrapping_sub(last);
                    if u32::from(step) > 2 * u32::from(w.rings.size) {
                        msg = Some(format!(
                            "queue {q}: used index went from {last} to {v} between two operations, \
                             more than twice the queue size {}",
                            w.rings.size
                        ));
                        break;
                    }
                }
                if last.is_some() {
                    w.last = Some(v);
                }
            }
            if let Some(m) = msg {
                self.fail(m);
            }
        }
    }

    /// Records what a device-writable `range` may disturb in the session.
    fn classify(s: &mut Session, range: (u64, u64)) {
        for w in s.queues.iter_mut() {
            let idx = (w.rings.used_idx(), w.rings.used_idx().saturating_add(2));
            if range != w.rings.used_range() && overlaps(range, idx) {
                w.tainted = true;
            }
        }
        let rings_hit = s.queues.iter().any(|w| {
            overlaps(range, w.rings.desc_range()) || overlaps(range, w.rings.avail_range())
        });
        if rings_hit {
            s.lax = true;
        }
    }

    /// A request the driver is about to place: what to write, then what to expect.
    struct Plan {
        queue: usize,
        head: u16,
        writes: Vec<(u64, Vec<u8>)>,
        outstanding: Outstanding,
    }

    impl Rig {
        // --- operations ----------------------------------------------------------------------

        fn run(&mut self, op: &Op) {
            match *op {
                Op::BarRead { offset, width } => {
                    self.bar_read(offset, width);
                }
                Op::BarWrite {
                    offset,
                    width,
                    value,
                } => self.write_reg(offset, width, value),
                Op::Register { reg, value, read } => {
                    let (off, w) = REGISTERS[usize::from(reg) % REGISTERS.len()];
                    if read {
                        self.read_reg(off, w);
                    } else {
                        // Queue addresses mostly point into guest RAM, 16-byte aligned.
                        let value = if off >= common::QUEUE_DESC && value & 3 != 0 {
                            ((value >> 2) % RAM_END) & !15
                        } else {
                            value
                        };
                        self.write_reg(off, w, value);
                    }
                }
                Op::ConfigRead { offset, width } => {
                    let mut b = [0u8; 8];
                    self.t.config_read(offset, &mut b[..width]);
                }
                Op::ConfigWrite {
                    offset,
                    width,
                    value,
                } => {
                    let b = u64::from(value).to_le_bytes();
                    self.config_write(offset, &b[..width]);
                }
                Op::Command { value } => self.config_write(reg::COMMAND, &value.to_le_bytes()),
                Op::MsixControl { value } => {
                    self.config_write(self.msix_cap + msix::CAP_CONTROL, &value.to_le_bytes())
                }
                Op::MsixEntry {
                    vector,
                    offset,
                    width,
                    value,
                } => {
                    let v = u64::from(vector) % (u64::from(self.msi.vectors) + 2);
                    let off = bar0::MSIX_TABLE + 16 * v + u64::from(offset % 16);
                    self.write_reg(off, width, value);
                }
                Op::Pba {
                    offset,
                    width,
                    write,
                } => {
                    let off = bar0::MSIX_PBA + u64::from(offset);
                    if write {
                        self.write_reg(off, width, u64::MAX);
                    } else {
                        self.read_reg(off, width);
                    }
                }
                Op::Doorbell { queue, how } => self.doorbell(queue, how),
                Op::Memory { target, ref data } => {
                    let addr = self.resolve(target);
                    self.write_mem(addr, data, true);
                }
                Op::Descriptor {
                    queue,
                    index,
                    target,
                    len,
                    flags,
                    next,
                } => {
                    let rings = self.rings_of(queue);
                    let size = rings.size.max(1);
                    let at = rings.desc + 16 * u64::from(index % size);
                    let mut d = [0u8; 16];
                    d[0..8].copy_from_slice(&self.resolve(target).to_le_bytes());
                    let len = if len & 0x8000_0000 == 0 {
                        len % 8192
                    } else {
                        len
                    };
                    d[8..12].copy_from_slice(&len.to_le_bytes());
                    d[12..14].copy_from_slice(&u16::from(flags & 7).to_le_bytes());
                    let next = if flags & 0x80 == 0 { next % size } else { next };
                    d[14..16].copy_from_slice(&next.to_le_bytes());
                    self.write_mem(at, &d, true);
                }
                Op::Avail {
                    queue,
                    head,
                    advance,
                } => {
                    let rings = self.rings_of(queue);
                    let size = rings.size.max(1);
                    let idx = self
                        .mem
                        .read_obj::<u16>(GuestAddress(rings.avail + 2))
                        .map(u16::from_le)
                        .unwrap_or(0);
                    let head = if head & 0x8000 == 0 {
                        head % size
                    } else {
                        head
                    };
                    let slot = rings.avail + 4 + 2 * u64::from(idx % size);
                    self.write_mem(slot, &head.to_le_bytes(), true);
                    let new = if advance >= 0xf0 {
                        idx.wrapping_add(size).wrapping_add(1)
                    } else {
                        idx.wrapping_add(u16::from(advance % 4))
                    };
                    self.write_mem(rings.avail + 2, &new.to_le_bytes(), true);
                }
                Op::BringUp(ref b) => self.bring_up(b),
                Op::Submit(ref s) => self.submit(s),
                Op::Wait { us } => self.wait(Duration::from_micros(u64::from(us))),
                Op::Suppress {
                    queue,
                    which,
                    value,
                } => self.suppress(queue, which, value),
                Op::Reset { wait } => {
                    if wait {
                        self.reset_and_wait();
                    } else {
                        self.write_reg(common::DEVICE_STATUS, 1, 0);
                    }
                }
                Op::Status { value } => self.write_reg(common::DEVICE_STATUS, 1, value.into()),
                Op::Sleep { us } => {
                    let d = Duration::from_micros(u64::from(us)).min(self.wait_left);
                    self.wait_left -= d;
                    std::thread::sleep(d);
                }
            }
        }

        /// Queue `queue`'s structures: the session's, or where the driver would put them.
        fn rings_of(&self, queue: u8) -> Rings {
            if let Some(s) = &self.session {
                if let Some(w) = s.queues.get(usize::from(queue) % s.queues.len().max(1)) {
                    return w.rings;
                }
            }
            let l = layout(&vec![self.queue_size_max; usize::from(self.queues)]);
            l.get(usize::from(queue) % l.len().max(1))
                .copied()
                .unwrap_or(Rings {
                    size: 1,
                    desc: 0,
                    avail: 0,
                    used: 0,
                })
        }

        fn resolve(&self, t: Target) -> u64 {
            match t {
                Target::Desc { queue, offset } => {
                    let r = self.rings_of(queue);
                    r.desc + u64::from(offset) % (16 * u64::from(r.size.max(1)))
                }
                Target::Avail { queue, offset } => {
                    let r = self.rings_of(queue);
                    r.avail + u64::from(offset) % abi::ring::avail_size(r.size) as u64
                }
                Target::Used { queue, offset } => {
                    let r = self.rings_of(queue);
                    r.used + u64::from(offset) % abi::ring::used_size(r.size) as u64
                }
                Target::Buffer { offset } => BUFFERS.0 + u64::from(offset) % BUFFERS.1,
                Target::Anywhere { addr } => u64::from(addr) % (RAM_END + 0x10000),
                Target::Edge { which, back } => [HOLE, BUFFERS.0, RAM_END, RING.0 + 64]
                    [usize::from(which % 4)]
                .saturating_sub(u64::from(back % 64)),
            }
        }

        fn doorbell(&mut self, queue: u8, how: u8) {
            // One queue past the last as well.
            let q = u64::from(queue) % (u64::from(self.queues) + 1);
            match how % 4 {
                0 | 1 => {
                    if let Some(fd) = self.doorbells.get(q as usize) {
                        let _ = fd.write(1);
                    }
                }
                2 => self.write_reg(bar0::NOTIFY + 4 * q, 2, q),
                _ => {
                    let off = bar0::NOTIFY + 4 * q + u64::from(how >> 2 & 3);
                    self.write_reg(off, width(how >> 4), q);
                }
            }
        }

        fn suppress(&mut self, queue: u8, which: u8, value: u16) {
            let rings = match self.session.as_ref().and_then(|s| s.driver.as_ref()) {
                Some(d) => match d.queues.get(usize::from(queue) % d.queues.len().max(1)) {
                    Some(q) => q.rings,
                    None => return,
                },
                None => return,
            };
            if which & 1 == 0 {
                // Available ring flags (bit 0: no interrupts, without EVENT_IDX).
                self.write_mem(rings.avail, &value.to_le_bytes(), false);
            } else {
                // used_event (with EVENT_IDX).
                let at = rings.avail + 4 + 2 * u64::from(rings.size);
                self.write_mem(at, &value.to_le_bytes(), false);
            }
        }

        fn reset_and_wait(&mut self) -> bool {
            if !self.decoding() {
                let c = self.command() | command::MEMORY;
                self.config_write(reg::COMMAND, &c.to_le_bytes());
            }
            self.write_reg(common::DEVICE_STATUS, 1, 0);
            let start = Instant::now();
            let mut polls = 0u32;
            loop {
                let s = self.read_reg(common::DEVICE_STATUS, 1);
                if s == 0 {
                    return self.failure.is_none();
                }
                if start.elapsed() > RESET_TIMEOUT {
                    self.fail(format!(
                        "reset not complete after {RESET_TIMEOUT:?} ({polls} polls): \
                         DEVICE_STATUS still reads {s:#x}"
                    ));
                    return false;
                }
                polls += 1;
                if polls < 100 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
        }

        // --- the well-behaved driver -----------------------------------------------------------

        fn set_status(&mut self, v: u8) {
            self.write_reg(common::DEVICE_STATUS, 1, v.into());
        }

        fn bring_up(&mut self, b: &BringUp) {
            use status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
            let cmd = self.command() | command::MEMORY | command::BUS_MASTER;
            self.config_write(reg::COMMAND, &cmd.to_le_bytes());
            if !self.reset_and_wait() {
                return;
            }
            self.set_status(ACKNOWLEDGE);
            self.set_status(ACKNOWLEDGE | DRIVER);
            self.write_reg(common::DEVICE_FEATURE_SELECT, 4, 0);
            let lo = self.read_reg(common::DEVICE_FEATURE, 4);
            self.write_reg(common::DEVICE_FEATURE_SELECT, 4, 1);
            let hi = self.read_reg(common::DEVICE_FEATURE, 4);
            let offered = lo | hi << 32;
            if offered != DEVICE_FEATURES {
                self.fail(format!(
                    "the device offers features {offered:#x}; SPEC 3 says {DEVICE_FEATURES:#x}"
                ));
                return;
            }
            let mut wanted = feature::VERSION_1;
            for (bit, f) in [
                (1, feature::FLUSH),
                (2, feature::GET_ID),
                (4, feature::RING_EVENT_IDX),
            ] {
                if b.features & bit != 0 {
                    wanted |= f;
                }
            }
            if b.features & 0x30 == 0x30 {
                wanted &= !feature::VERSION_1;
            }
            if b.features & 0xc0 == 0xc0 {
                wanted |= 1 << 40;
            }
            self.write_reg(common::DRIVER_FEATURE_SELECT, 4, 0);
            self.write_reg(common::DRIVER_FEATURE, 4, wanted & 0xffff_ffff);
            self.write_reg(common::DRIVER_FEATURE_SELECT, 4, 1);
            self.write_reg(common::DRIVER_FEATURE, 4, wanted >> 32);
            self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
            let st = self.read_reg(common::DEVICE_STATUS, 1) as u8;
            let acceptable = wanted & !offered == 0 && wanted & feature::VERSION_1 != 0;
            if (st & FEATURES_OK != 0) != acceptable {
                self.fail(format!(
                    "driver features {wanted:#x}: DEVICE_STATUS reads {st:#x} after FEATURES_OK \
                     (SPEC 3: the device clears it exactly when it rejects the features)"
                ));
                return;
            }
            if !acceptable {
                self.set_status(st | FAILED);
                return;
            }
            let nq = self.read_reg(common::NUM_QUEUES, 2);
            let qmax = self.read_reg(bar0::CONFIG + abi::config::QUEUE_SIZE_MAX, 2);
            if nq != u64::from(self.queues) || qmax != u64::from(self.queue_size_max) {
                self.fail(format!(
                    "NUM_QUEUES {nq} / queue_size_max {qmax}; the device has {} queue(s) of up to {}",
                    self.queues, self.queue_size_max
                ));
                return;
            }
            let vectors = self.msi.vectors;
            if b.msix & 1 != 0 {
                let at = self.msix_cap + msix::CAP_CONTROL;
                let mut control = self.t.config_space().read_u16(at) | msix::CONTROL_ENABLE;
                if b.msix & 4 != 0 {
                    control |= msix::CONTROL_FUNCTION_MASK;
                } else {
                    control &= !msix::CONTROL_FUNCTION_MASK;
                }
                self.config_write(at, &control.to_le_bytes());
                let masked = u64::from(b.msix >> 1 & 1);
                for v in 0..u64::from(vectors) {
                    let entry = bar0::MSIX_TABLE + 16 * v;
                    self.write_reg(entry, 4, 0xfee0_0000 | v << 12);
                    self.write_reg(entry + 4, 4, 0);
                    self.write_reg(entry + 8, 4, 0x40 + v);
                    self.write_reg(entry + 12, 4, masked);
                }
            }
            let config_vector = vector_choice(b.vectors[4], vectors);
            self.write_reg(common::CONFIG_MSIX_VECTOR, 2, config_vector.into());
            let got = self.read_reg(common::CONFIG_MSIX_VECTOR, 2) as u16;
            let expect = if config_vector < vectors {
                config_vector
            } else {
                abi::NO_VECTOR
            };
            if got != expect {
                self.fail(format!(
                    "CONFIG_MSIX_VECTOR reads {got:#x} after writing {config_vector:#x}; expected {expect:#x}"
                ));
                return;
            }
            let mut enabled: Vec<u16> = (0..self.queues)
                .filter(|&q| b.queue_mask >> q & 1 != 0)
                .collect();
            if enabled.is_empty() {
                enabled.push(0);
            }
            let sizes: Vec<u16> = enabled
                .iter()
                .map(|&q| {
                    let log = b.sizes.get(usize::from(q)).copied().unwrap_or(0) % 16;
                    (1u16 << log).min(self.queue_size_max)
                })
                .collect();
            let mut queues = Vec::new();
            for (&q, rings) in enabled.iter().zip(layout(&sizes)) {
                self.write_reg(common::QUEUE_SELECT, 2, q.into());
                let size = self.read_reg(common::QUEUE_SIZE, 2);
                if size != u64::from(self.queue_size_max) {
                    self.fail(format!(
                        "queue {q}: QUEUE_SIZE reads {size} after reset; SPEC 2.1: the maximum {}",
                        self.queue_size_max
                    ));
                    return;
                }
                self.write_reg(common::QUEUE_SIZE, 2, rings.size.into());
                let v = vector_choice(b.vectors.get(usize::from(q)).copied().unwrap_or(0), vectors);
                self.write_reg(common::QUEUE_MSIX_VECTOR, 2, v.into());
                let addrs = [
                    (common::QUEUE_DESC, rings.desc),
                    (common::QUEUE_DRIVER, rings.avail),
                    (common::QUEUE_DEVICE, rings.used),
                ];
                for (reg, addr) in addrs {
                    if b.split_addr {
                        self.write_reg(reg, 4, addr & 0xffff_ffff);
                        self.write_reg(reg + 4, 4, addr >> 32);
                    } else {
                        self.write_reg(reg, 8, addr);
                    }
                }
                let back = (
                    self.read_reg(common::QUEUE_SIZE, 2),
                    self.read_reg(common::QUEUE_DESC, 8),
                    self.read_reg(common::QUEUE_DRIVER, 8),
                    self.read_reg(common::QUEUE_DEVICE, 8),
                );
                let written = (u64::from(rings.size), rings.desc, rings.avail, rings.used);
                if back != written {
                    self.fail(format!(
                        "queue {q}: size and ring addresses read back as {back:x?}, written {written:x?}"
                    ));
                    return;
                }
                // The driver zeroes the ring headers: the device starts at used index 0.
                self.write_mem(rings.avail, &[0; 4], false);
                self.write_mem(rings.used, &[0; 4], false);
                self.write_reg(common::QUEUE_ENABLE, 2, 1);
                queues.push(DriverQueue {
                    index: q,
                    rings,
                    free: (0..rings.size).rev().collect(),
                    avail_idx: 0,
                    used_idx: 0,
                    outstanding: HashMap::new(),
                });
            }
            self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
            let st = self.read_reg(common::DEVICE_STATUS, 1) as u8;
            if st & DRIVER_OK == 0 || st & status::NEEDS_RESET != 0 {
                self.fail(format!(
                    "DEVICE_STATUS reads {st:#x} after DRIVER_OK with valid rings in guest RAM"
                ));
                return;
            }
            match self.session.as_mut() {
                Some(s) => {
                    self.stats.bring_ups += 1;
                    s.driver = Some(Driver {
                        queues,
                        features: wanted,
                        next_buf: BUFFERS.0,
                        next_id: 1,
                    })
                }
                None => self.fail("no session after DRIVER_OK".into()),
            }
        }

        fn submit(&mut self, s: &Submit) {
            if self.reset_pending {
                return;
            }
            let capacity = self.capacity;
            let max_segments = self.max_segments;
            let bme_gen = self.bme_off_count;
            let Some(driver) = self.session.as_mut().and_then(|x| x.driver.as_mut()) else {
                return;
            };
            let Some(plan) = plan(driver, s, capacity, max_segments, bme_gen) else {
                return;
            };
            for (addr, bytes) in &plan.writes {
                self.write_mem(*addr, bytes, false);
            }
            let Some(driver) = self.session.as_mut().and_then(|x| x.driver.as_mut()) else {
                return;
            };
            let Some(dq) = driver.queues.get_mut(plan.queue) else {
                return;
            };
            let rings = dq.rings;
            let slot = rings.avail + 4 + 2 * u64::from(dq.avail_idx % rings.size);
            dq.avail_idx = dq.avail_idx.wrapping_add(1);
            let idx = dq.avail_idx;
            let q = dq.index;
            self.stats.submitted += 1;
            if plan.outstanding.corrupt != Corrupt::None {
                self.stats.malformed += 1;
            }
            dq.outstanding.insert(plan.head, plan.outstanding);
            self.write_mem(slot, &plan.head.to_le_bytes(), false);
            self.write_mem(rings.avail + 2, &idx.to_le_bytes(), false);
            match s.kick % 4 {
                0 => {}
                1 | 2 => {
                    if let Some(fd) = self.doorbells.get(usize::from(q)) {
                        let _ = fd.write(1);
                    }
                }
                _ => self.write_reg(bar0::NOTIFY + 4 * u64::from(q), 2, q.into()),
            }
        }

        /// Reads every new used element of the driver's queues and checks it.
        fn reap(&mut self) {
            let Some(mut driver) = self.session.as_mut().and_then(|s| s.driver.take()) else {
                return;
            };
            let lies = self.faults.lies;
            let mut msg = None;
            'queues: for dq in driver.queues.iter_mut() {
                let Some(dev) = used_index(&self.mem, &dq.rings) else {
                    continue;
                };
                let ahead = dev.wrapping_sub(dq.used_idx);
                if usize::from(ahead) > dq.outstanding.len() && !lies {
                    msg = Some(format!(
                        "queue {}: used index {dev} is {ahead} past the {} the driver consumed, \
                         with {} request(s) outstanding",
                        dq.index,
                        dq.used_idx,
                        dq.outstanding.len()
                    ));
                    break;
                }
                for _ in 0..ahead {
                    let slot = dq.rings.used + 4 + 8 * u64::from(dq.used_idx % dq.rings.size);
                    let mut e = [0u8; 8];
                    if self.mem.read_slice(&mut e, GuestAddress(slot)).is_err() {
                        msg = Some(format!(
                            "queue {}: used element at {slot:#x} unreadable",
                            dq.index
                        ));
                        break 'queues;
                    }
                    let id = le(&e[0..4]);
                    let len = le(&e[4..8]) as u32;
                    let found = u16::try_from(id)
                        .ok()
                        .and_then(|h| dq.outstanding.remove(&h).map(|o| (h, o)));
                    let Some((head, o)) = found else {
                        if lies {
                            // A fault misreported the head: the driver loses track of it.
                            dq.used_idx = dq.used_idx.wrapping_add(1);
                            continue;
                        }
                        msg = Some(format!(
                            "queue {}: used element {} names head {id}, which is not outstanding",
                            dq.index, dq.used_idx
                        ));
                        break 'queues;
                    };
                    if let Err(m) = self.check_completion(&o, len, driver.features) {
                        msg = Some(format!("queue {} head {head}: {m}", dq.index));
                        break 'queues;
                    }
                    dq.free.extend(o.descs);
                    self.stats.completed += 1;
                    dq.used_idx = dq.used_idx.wrapping_add(1);
                }
            }
            if let Some(s) = self.session.as_mut() {
                s.driver = Some(driver);
            }
            if let Some(m) = msg {
                self.fail(m);
            }
        }

        fn check_completion(&self, o: &Outstanding, len: u32, features: u64) -> Result<(), String> {
            if o.tampered || self.faults.lies {
                return Ok(());
            }
            let status = o.status.map(|a| {
                self.mem
                    .read_obj::<u8>(GuestAddress(a))
                    .unwrap_or(STATUS_SENTINEL)
            });
            let what = || format!("{:?} ({:?}, features {features:#x})", o.expect, o.corrupt);
            let want = |ok: bool, expected: &str| {
                if ok {
                    Ok(())
                } else {
                    Err(format!(
                        "{} completed with status {status:?}, used len {len}; expected {expected}",
                        what()
                    ))
                }
            };
            match o.expect {
                Expect::Valid { op, length } => {
                    let may_fail =
                        self.faults.error || o.bme_gen != self.bme_off_count || !self.bus_master();
                    match status {
                        Some(req_status::OK) => {
                            let expected = match op {
                                abi::op::READ => length + 1,
                                abi::op::GET_ID => abi::ID_LEN as u32 + 1,
                                _ => 1,
                            };
                            want(len == expected, &format!("OK with used len {expected}"))?;
                            if op == abi::op::GET_ID {
                                let mut got = Vec::new();
                                for &(addr, n) in &o.id_segments {
                                    let mut b = vec![0u8; n as usize];
                                    let _ = self.mem.read_slice(&mut b, GuestAddress(addr));
                                    got.extend(b);
                                }
                                got.truncate(abi::ID_LEN);
                                let id = device_id();
                                want(
                                    got == id,
                                    &format!("the ID {id:?} in the buffers, found {got:?}"),
                                )?;
                            }
                            Ok(())
                        }
                        Some(req_status::IOERR) if may_fail => {
                            want(len == 1, "IOERR with used len 1")
                        }
                        _ => want(false, "OK"),
                    }
                }
                Expect::Malformed => want(
                    status == Some(req_status::MALFORMED) && len == 1,
                    "MALFORMED with used len 1",
                ),
                Expect::Unsupported => want(
                    status == Some(req_status::UNSUPP) && len == 1,
                    "UNSUPP with used len 1",
                ),
                Expect::Rejected => want(
                    matches!(status, Some(req_status::MALFORMED | req_status::UNSUPP)) && len == 1,
                    "MALFORMED or UNSUPP with used len 1",
                ),
                Expect::NoStatus => {
                    let left = o.untouched.map(|a| {
                        self.mem
                            .read_obj::<u8>(GuestAddress(a))
                            .unwrap_or(STATUS_SENTINEL)
                    });
                    want(
                        len == 0 && left.is_none_or(|b| b == STATUS_SENTINEL),
                        &format!(
                            "used len 0 and no status byte (unusable status descriptor, or the \
                             chain is longer than max_segments + 2); status buffer holds {left:?}"
                        ),
                    )
                }
            }
        }

        fn driver_idle(&self) -> bool {
            self.session
                .as_ref()
                .and_then(|s| s.driver.as_ref())
                .is_none_or(|d| d.queues.iter().all(|q| q.outstanding.is_empty()))
        }

        fn wait(&mut self, d: Duration) {
            let start = Instant::now();
            let deadline = start + d.min(self.wait_left);
            loop {
                self.reap();
                if self.failure.is_some() || self.driver_idle() || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_micros(20));
            }
            self.wait_left = self.wait_left.saturating_sub(start.elapsed());
        }

        /// Liveness: with Bus Master Enable on and a doorbell on every queue, every request the
        /// driver offered completes, unless a fault may hold it or the session is over.
        fn drain(&mut self) {
            let Some(s) = self.session.as_ref() else {
                return;
            };
            if s.driver.is_none() || s.needs_reset || self.reset_pending || self.faults.unbounded {
                return;
            }
            // SPEC 1: setting Bus Master Enable again publishes what was held and looks at the
            // queues without a new doorbell; otherwise the driver rings every queue.
            let resumed = !self.bus_master();
            let cmd = self.command() | command::MEMORY | command::BUS_MASTER;
            if cmd != self.command() {
                self.config_write(reg::COMMAND, &cmd.to_le_bytes());
            }
            let queues: Vec<u16> = if resumed {
                Vec::new()
            } else {
                self.session
                    .as_ref()
                    .and_then(|s| s.driver.as_ref())
                    .map(|d| d.queues.iter().map(|q| q.index).collect())
                    .unwrap_or_default()
            };
            for q in queues {
                if let Some(fd) = self.doorbells.get(usize::from(q)) {
                    let _ = fd.write(1);
                }
            }
            let start = Instant::now();
            loop {
                self.reap();
                self.check();
                if self.failure.is_some() || self.driver_idle() {
                    return;
                }
                if start.elapsed() > DRAIN_TIMEOUT {
                    let lost: Vec<(u16, Vec<u16>)> = self
                        .session
                        .as_ref()
                        .and_then(|s| s.driver.as_ref())
                        .map(|d| {
                            d.queues
                                .iter()
                                .map(|q| (q.index, q.outstanding.keys().copied().collect()))
                                .collect()
                        })
                        .unwrap_or_default();
                    let st = self.peek(common::DEVICE_STATUS, 1);
                    let after = if resumed {
                        "Bus Master Enable was set again (no doorbell: SPEC 1)"
                    } else {
                        "a doorbell on every queue"
                    };
                    self.fail(format!(
                        "requests lost: (queue, heads) {lost:?} not complete {DRAIN_TIMEOUT:?} \
                         after {after} (DEVICE_STATUS {st:#x})"
                    ));
                    return;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }

        /// The end of every program: drain, reset (it must complete), and compare memory.
        fn finish(&mut self) {
            self.drain();
            if self.failure.is_some() || !self.reset_and_wait() {
                return;
            }
            if self.session.is_some() {
                self.fail("a session is still open after DEVICE_STATUS read 0".into());
                return;
            }
            self.diff("after the final reset");
            self.check();
        }

        /// Makes a rig whose program passed (and whose device completed its final reset) look
        /// like a new one: MSI-X table and configuration space as at creation, guest memory
        /// zero, nothing remembered. `false` if that did not work out (the rig is dropped).
        fn recycle(&mut self) -> bool {
            if self.failure.is_some() || self.session.is_some() || self.reset_pending {
                return false;
            }
            let mut entry = [0u8; 16];
            entry[12] = msix::VECTOR_MASKED as u8;
            for v in 0..u64::from(self.msi.vectors) {
                self.t.bar0_write(bar0::MSIX_TABLE + 16 * v, &entry);
            }
            let config0 = self.config0.clone();
            self.config_write(0, &config0);
            let mut now = vec![0u8; config0.len()];
            self.t.config_read(0, &mut now);
            if now != config0 {
                return false;
            }
            for (base, len) in REGIONS {
                if !discard(&self.mem, base, len)
                    || resident_pages(&self.mem, base, len).contains(&true)
                {
                    return false;
                }
            }
            self.shadow.clear();
            self.allowed.clear();
            self.bme_off_count = 0;
            self.wait_left = WAIT_BUDGET;
            self.stats = Stats::default();
            lock(&self.msi.violations).clear();
            self.msi.session.store(false, Ordering::SeqCst);
            self.check();
            self.failure.is_none()
        }
    }

    /// Lays out one request of the driver (see [`Corrupt`] for the malformations), taking
    /// descriptors and a buffer block; `None` when the queue or the buffer region is full.
    fn plan(
        driver: &mut Driver,
        s: &Submit,
        capacity: u64,
        max_segments: u32,
        bme_gen: u64,
    ) -> Option<Plan> {
        use abi::op::{FLUSH, GET_ID, READ, WRITE};
        let features = driver.features;
        let queue = usize::from(s.queue) % driver.queues.len().max(1);
        let mut corrupt = if s.corrupt < 128 {
            Corrupt::None
        } else {
            CORRUPTIONS[usize::from(s.corrupt - 128) % CORRUPTIONS.len()]
        };
        let mut opcode = [READ, READ, WRITE, WRITE, FLUSH, GET_ID][usize::from(s.op % 6)];
        match corrupt {
            Corrupt::TooLong => opcode = WRITE,
            Corrupt::UnknownOp => {
                opcode = [2, 3, 5, 7, 0x80, u32::MAX][usize::from(s.op / 6 % 6)];
            }
            _ => {}
        }
        let rw = opcode == READ || opcode == WRITE;
        let fits = match corrupt {
            Corrupt::TooManySegments
            | Corrupt::PastCapacity
            | Corrupt::OffsetOverflow
            | Corrupt::NoData => rw,
            Corrupt::FlushWithData => opcode == FLUSH,
            Corrupt::GetIdShort => opcode == GET_ID,
            _ => true,
        };
        if !fits {
            corrupt = Corrupt::None;
        }
        let mut lens: Vec<u32> = match opcode {
            READ | WRITE => {
                let n = match corrupt {
                    Corrupt::NoData => 0,
                    Corrupt::TooManySegments => max_segments + 1,
                    _ => 1 + u32::from(s.segs) % max_segments.clamp(1, 8),
                };
                (0..n)
                    .map(|i| seg_len(s.len_sel, i, s.aligned, n))
                    .collect()
            }
            FLUSH if corrupt == Corrupt::FlushWithData => vec![512],
            FLUSH => Vec::new(),
            GET_ID if corrupt == Corrupt::GetIdShort => vec![abi::ID_LEN as u32 - 1],
            GET_ID if s.segs & 1 == 0 => vec![abi::ID_LEN as u32 + u32::from(s.segs >> 1 & 31)],
            GET_ID => vec![8, 12 + u32::from(s.segs >> 1 & 31)],
            _ => vec![u32::from(s.segs % 64) + 1],
        };
        if corrupt == Corrupt::TooLong {
            lens = Vec::new();
        }
        if corrupt.needs_data() && lens.is_empty() {
            corrupt = Corrupt::None;
        }
        if corrupt == Corrupt::ZeroLength {
            if let Some(l) = lens.first_mut() {
                *l = 0;
            }
        }
        let dq = driver.queues.get(queue)?;
        let too_long = corrupt == Corrupt::TooLong;
        let ndesc = lens.len() + 2 + usize::from(too_long);
        if ndesc > dq.free.len() {
            return None;
        }
        // Block: header, padding to 512, data segments, status.
        let seg_align = if s.aligned { 512 } else { 8 };
        let data_space: u64 = lens
            .iter()
            .map(|&l| align_up(u64::from(l), seg_align))
            .sum();
        let block_len = 512 + data_space + 16;
        let base = driver.alloc(block_len)?;
        let block = (base, base + align_up(block_len, 512));
        let status_addr = base + block_len - 16;
        let mut length: u32 = lens.iter().fold(0u32, |a, &l| a.saturating_add(l));
        if too_long {
            length = crate::engine::MAX_TRANSFER + 1;
        }
        let mut offset = u64::from(s.offset) % capacity.max(1);
        if s.aligned {
            offset &= !511;
        }
        if rw && offset + u64::from(length) > capacity {
            offset = capacity.saturating_sub(u64::from(length));
            if s.aligned {
                offset &= !511;
            }
        }
        match corrupt {
            Corrupt::PastCapacity => offset = capacity.saturating_sub(u64::from(length)) + 1,
            Corrupt::OffsetOverflow => offset = u64::MAX - u64::from(length / 2),
            _ => {}
        }
        let header_length = match corrupt {
            Corrupt::LengthMismatch if s.segs & 1 == 0 => length.wrapping_add(1),
            Corrupt::LengthMismatch => length.wrapping_sub(1),
            _ => length,
        };
        let id = driver.next_id;
        driver.next_id += 1;
        let mut hdr = [0u8; 32];
        hdr[0..4].copy_from_slice(&opcode.to_le_bytes());
        let flags: u32 = if corrupt == Corrupt::Flags {
            1 << (s.len_sel % 32)
        } else {
            0
        };
        hdr[4..8].copy_from_slice(&flags.to_le_bytes());
        hdr[8..16].copy_from_slice(&id.to_le_bytes());
        hdr[16..24].copy_from_slice(&offset.to_le_bytes());
        hdr[24..28].copy_from_slice(&header_length.to_le_bytes());
        let reserved: u32 = if corrupt == Corrupt::Reserved {
            1 + u32::from(s.segs)
        } else {
            0
        };
        hdr[28..32].copy_from_slice(&reserved.to_le_bytes());

        let device_writes = opcode != WRITE && opcode != FLUSH;
        // (address, length, flags) in chain order.
        let mut chain: Vec<(u64, u32, u16)> = Vec::with_capacity(ndesc);
        let header = match corrupt {
            Corrupt::HeaderShort => (base, 31, 0),
            Corrupt::HeaderLong => (base, 33, 0),
            Corrupt::HeaderWritable => (base, 32, desc_flags::WRITE),
            Corrupt::HeaderOutside => (HOLE + 0x100, 32, 0),
            _ => (base, 32, 0),
        };
        chain.push(header);
        let mut writes = vec![(base, hdr.to_vec())];
        let mut id_segments = Vec::new();
        let mut at = base + 512;
        for (i, &l) in lens.iter().enumerate() {
            let mut addr = at;
            at += align_up(u64::from(l), seg_align);
            let mut flags = if device_writes { desc_flags::WRITE } else { 0 };
            if i == 0 {
                match corrupt {
                    Corrupt::WrongDirection => flags ^= desc_flags::WRITE,
                    Corrupt::Indirect => flags |= desc_flags::INDIRECT,
                    Corrupt::DataInHole => addr = HOLE + 0x1000,
                    Corrupt::DataPastEnd => addr = RAM_END - u64::from(l / 2),
                    Corrupt::DataStraddle => addr = HOLE - u64::from(l / 2),
                    _ => {}
                }
            }
            if opcode == GET_ID {
                id_segments.push((addr, l));
                writes.push((addr, vec![ID_SENTINEL; l as usize]));
            }
            chain.push((addr, l, flags));
        }
        if too_long {
            // One device-readable buffer of max_transfer + 1 bytes (the ring region is large
            // enough; the device must not read it anyway).
            chain.push((RING.0, length, 0));
        }
        let status_len = 1 + u32::from(s.status_len);
        let status = match corrupt {
            Corrupt::StatusReadable => (status_addr, status_len, 0),
            Corrupt::StatusEmpty => (status_addr, 0, desc_flags::WRITE),
            Corrupt::StatusOutside => (HOLE + 0x200, status_len, desc_flags::WRITE),
            _ => (status_addr, status_len, desc_flags::WRITE),
        };
        chain.push(status);
        writes.push((status_addr, vec![STATUS_SENTINEL; status_len as usize]));

        let status_usable = !matches!(
            corrupt,
            Corrupt::StatusReadable | Corrupt::StatusEmpty | Corrupt::StatusOutside
        );
        let known = rw
            || (opcode == FLUSH && features & feature::FLUSH != 0)
            || (opcode == GET_ID && features & feature::GET_ID != 0);
        // SPEC 6.2 (chain length): past max_segments + 2 descriptors the device stops reading,
        // before the status descriptor.
        let too_many = chain.len() > max_segments as usize + 2;
        let expect = if !status_usable || too_many {
            Expect::NoStatus
        } else {
            match corrupt.stage() {
                Some(Stage::Early) => Expect::Malformed,
                Some(Stage::Either) if known => Expect::Malformed,
                Some(Stage::Either) => Expect::Rejected,
                Some(Stage::Late) if known => Expect::Malformed,
                Some(Stage::Late) => Expect::Unsupported,
                None if !known => Expect::Unsupported,
                None if rw
                    && (length == 0
                        || offset
                            .checked_add(u64::from(length))
                            .is_none_or(|e| e > capacity)) =>
                {
                    Expect::Malformed
                }
                None => Expect::Valid { op: opcode, length },
            }
        };

        let dq = driver.queues.get_mut(queue)?;
        let descs: Vec<u16> = (0..chain.len()).filter_map(|_| dq.free.pop()).collect();
        if descs.len() != chain.len() {
            dq.free.extend(descs);
            return None;
        }
        let head = *descs.first()?;
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let next = descs.get(i + 1).copied();
            let flags = flags | if next.is_some() { desc_flags::NEXT } else { 0 };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
            let at = dq.rings.desc + 16 * u64::from(descs.get(i).copied().unwrap_or(0));
            writes.push((at, d.to_vec()));
        }
        Some(Plan {
            queue,
            head,
            writes,
            outstanding: Outstanding {
                descs,
                expect,
                corrupt,
                status: (status_usable && !too_many).then_some(status_addr),
                untouched: (too_many && corrupt != Corrupt::StatusOutside).then_some(status_addr),
                block,
                id_segments,
                tampered: false,
                bme_gen,
            },
        })
    }

    // ---------------------------------------------------------------------------------------
    // Entry points
    // ---------------------------------------------------------------------------------------

    /// The `device` fuzz entry point: decodes a setup and a program from `data`, runs it against
    /// a fresh device, and returns `Err` with the broken invariant and the operations leading
    /// to it. A panic anywhere (also on the device's threads) is a bug too.
    pub fn fuzz_device(data: &[u8]) -> Result<(), String> {
        device_run(data).0
    }

    /// [`fuzz_device`], also returning what the program reached.
    pub fn device_run(data: &[u8]) -> (Result<(), String>, Stats) {
        run_program(data, false)
    }

    /// [`fuzz_device`] on a device kept from an earlier input with the same setup, when there
    /// is one (the cargo-fuzz target uses this): creating and stopping an engine (threads,
    /// backend) costs about a millisecond, more than most programs. Between inputs the device
    /// is reset, its MSI-X table and configuration space are put back as they were at creation
    /// and guest memory is zeroed, so it must behave as a fresh one (SPEC 4: after a reset every
    /// register is at its initial value). A failure is run again on a fresh device: if that
    /// passes (three times), the error says the failure may depend on what earlier inputs left
    /// behind.
    pub fn fuzz_device_reusing(data: &[u8]) -> Result<(), String> {
        let Err(e) = run_program(data, true).0 else {
            return Ok(());
        };
        // Some failures depend on timing: a fresh device gets a few tries before the failure
        // is blamed on the reuse.
        for _ in 0..3 {
            device_run(data).0?;
        }
        Err(format!(
            "fails on a device reused across inputs, passed three times on a fresh one (state \
             left by earlier inputs survived the reset, or a rare timing): {e}"
        ))
    }

    /// Devices kept for [`fuzz_device_reusing`], by setup.
    const KEPT_RIGS: usize = 6;

    thread_local! {
        static RIGS: std::cell::RefCell<Vec<(String, Rig)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    fn run_program(data: &[u8], reuse: bool) -> (Result<(), String>, Stats) {
        let mut r = Reader { data };
        let setup = match decode_setup(&mut r) {
            Ok(s) => s,
            Err(e) => return (Err(e), Stats::default()),
        };
        let mut ops = Vec::new();
        while !r.is_empty() && ops.len() < MAX_OPS {
            ops.push(decode_op(&mut r));
        }
        let key = format!("{setup:?}");
        let kept = if reuse {
            RIGS.with(|rigs| {
                let mut rigs = rigs.borrow_mut();
                let i = rigs.iter().position(|(k, _)| *k == key)?;
                Some(rigs.swap_remove(i).1)
            })
        } else {
            None
        };
        let mut rig = match kept {
            Some(rig) => rig,
            None => match Rig::new(&setup) {
                Ok(rig) => rig,
                Err(e) => return (Err(e), Stats::default()),
            },
        };
        for (i, op) in ops.iter().enumerate() {
            rig.stats.ops += 1;
            rig.run(op);
            rig.check();
            if let Some(e) = rig.failure.take() {
                return (Err(report(&setup, &ops, i, &e)), rig.stats);
            }
        }
        rig.finish();
        if let Some(e) = rig.failure.take() {
            return (Err(report(&setup, &ops, ops.len(), &e)), rig.stats);
        }
        let stats = rig.stats;
        if reuse && rig.recycle() {
            RIGS.with(|rigs| {
                let mut rigs = rigs.borrow_mut();
                if rigs.len() >= KEPT_RIGS {
                    rigs.remove(0);
                }
                rigs.push((key, rig));
            });
        }
        (Ok(()), stats)
    }

    fn report(setup: &Setup, ops: &[Op], at: usize, e: &str) -> String {
        let mut s = format!("{e}\n  at operation {at} of {}; {setup:?}\n", ops.len());
        for (i, op) in ops
            .iter()
            .enumerate()
            .take(at + 1)
            .skip(at.saturating_sub(8))
        {
            s.push_str(&format!("  #{i} {op:?}\n"));
        }
        s
    }

    /// A structured program for [`fuzz_device`] from `seed`: a setup, a driver bring-up, then
    /// operations weighted toward requests and reaping, with raw register, memory, doorbell,
    /// MSI-X, Bus Master Enable and reset operations mixed in. The stable unit test runs a few
    /// hundred of them; `device/fuzz`'s `seed` binary writes them as a starting corpus.
    pub fn device_program(seed: u64) -> Vec<u8> {
        let mut rng = crate::fault::SplitMix64::new(seed);
        let mut next = move || rng.next_u64();
        let mut out = Vec::new();
        let random = |out: &mut Vec<u8>, next: &mut dyn FnMut() -> u64, n: usize| {
            for _ in 0..n {
                out.push(next() as u8);
            }
        };
        // Setup: queues and workers; queue size mostly small (max 4..=512), sometimes 32768.
        out.push(next() as u8 & 0x07);
        out.push(if next() % 8 == 0 {
            15
        } else {
            2 + (next() % 8) as u8
        });
        out.push(next() as u8);
        out.push(next() as u8);
        let rules = if next() % 3 == 0 {
            0x80 | (next() % 3) as u8
        } else {
            0
        };
        out.push(rules);
        if rules != 0 {
            for _ in 0..1 + rules % 3 {
                // Structured rules only (free text would swallow the program).
                let kind = (next() % 6) as u8;
                out.push(kind);
                random(
                    &mut out,
                    &mut next,
                    if kind == 2 || kind == 3 { 4 } else { 2 },
                );
            }
        }
        let bring_up = |out: &mut Vec<u8>, next: &mut dyn FnMut() -> u64| {
            out.push(opcode::BRING_UP);
            out.push(next() as u8 | 1);
            for _ in 0..4 {
                out.push(2 + (next() % 7) as u8);
            }
            out.push(next() as u8 & 0x07);
            for _ in 0..5 {
                out.push(next() as u8);
            }
            out.push(next() as u8 & 0x81 | 1);
        };
        bring_up(&mut out, &mut next);
        let n = 10 + next() % 60;
        for _ in 0..n {
            let pick = next() % 100;
            match pick {
                0..=39 => {
                    out.push(opcode::SUBMIT);
                    random(&mut out, &mut next, 9);
                    // Mostly valid requests; a quarter malformed.
                    out.push(if next() % 4 == 0 {
                        128 + next() as u8 % 128
                    } else {
                        next() as u8 % 128
                    });
                    out.push((next() as u8 & 0xfc) | (1 + (next() % 3) as u8));
                    // (kick: eventfd or BAR doorbell, some not at all)
                }
                40..=54 => {
                    out.push(opcode::WAIT);
                    random(&mut out, &mut next, 2);
                }
                55..=59 => {
                    out.push(opcode::DOORBELL);
                    random(&mut out, &mut next, 2);
                }
                60..=63 => {
                    out.push(opcode::MEMORY);
                    out.push(4 + (next() % 2) as u8);
                    random(&mut out, &mut next, 4);
                    let len = (next() % 24) as u8;
                    out.push(len);
                    random(&mut out, &mut next, usize::from(len));
                }
                64..=67 => {
                    out.push(opcode::REGISTER);
                    random(&mut out, &mut next, 9);
                }
                68..=71 => {
                    // Bus Master Enable off, then (usually later) on again.
                    out.push(opcode::COMMAND);
                    out.push(if next() % 2 == 0 { 0x02 } else { 0x06 });
                    out.push(0);
                }
                72..=74 => {
                    out.push(opcode::MSIX_ENTRY);
                    random(&mut out, &mut next, 11);
                }
                75 => {
                    out.push(opcode::MSIX_CONTROL);
                    random(&mut out, &mut next, 2);
                }
                76..=77 => {
                    out.push(opcode::RESET);
                    random(&mut out, &mut next, 1);
                    if next() % 4 != 0 {
                        bring_up(&mut out, &mut next);
                    }
                }
                78..=80 => bring_up(&mut out, &mut next),
                81..=83 => {
                    out.push(opcode::SLEEP);
                    out.push((next() % 32) as u8);
                }
                84..=85 => {
                    out.push(opcode::SUPPRESS);
                    random(&mut out, &mut next, 4);
                }
                86 => {
                    // Raw ring writes retire the driver; it usually starts over.
                    out.push(opcode::DESCRIPTOR);
                    random(&mut out, &mut next, 3);
                    out.push(4);
                    random(&mut out, &mut next, 11);
                    if next() % 4 != 0 {
                        bring_up(&mut out, &mut next);
                    }
                }
                87 => {
                    out.push(opcode::AVAIL);
                    random(&mut out, &mut next, 4);
                    if next() % 4 != 0 {
                        bring_up(&mut out, &mut next);
                    }
                }
                88..=89 => {
                    out.push(opcode::STATUS);
                    random(&mut out, &mut next, 1);
                }
                90..=92 => {
                    out.push(opcode::BAR_READ);
                    random(&mut out, &mut next, 3);
                }
                93..=95 => {
                    out.push(opcode::BAR_WRITE);
                    random(&mut out, &mut next, 11);
                }
                _ => {
                    out.push(opcode::CONFIG_WRITE);
                    random(&mut out, &mut next, 7);
                }
            }
        }
        out
    }

    /// The checks themselves: each must catch the misbehaviour it is for (a fuzzer whose
    /// oracle never fires finds nothing).
    #[cfg(test)]
    mod oracle_tests {
        use super::*;

        fn rig() -> Rig {
            let setup = Setup {
                queues: 2,
                queue_size_max: 64,
                capacity: 1 << 20,
                workers: 1,
                faults: Vec::new(),
                fault_seed: 0,
                refuse_routes: false,
            };
            let mut rig = Rig::new(&setup).unwrap();
            rig.wait_left = Duration::from_secs(10);
            rig.bring_up(&BringUp {
                queue_mask: 3,
                sizes: [4, 4, 4, 4],
                features: 7,
                vectors: [0, 1, 2, 3, 4],
                msix: 1,
                split_addr: false,
            });
            assert_eq!(rig.failure, None);
            assert!(rig.session.as_ref().unwrap().driver.is_some());
            rig
        }

        fn request(op: u8, corrupt: u8) -> Submit {
            Submit {
                queue: 0,
                op,
                segs: 1,
                len_sel: 700,
                offset: 4096,
                corrupt,
                kick: 1,
                aligned: false,
                status_len: 0,
            }
        }

        fn rings(rig: &Rig) -> Rings {
            rig.session
                .as_ref()
                .unwrap()
                .driver
                .as_ref()
                .unwrap()
                .queues[0]
                .rings
        }

        #[test]
        fn every_kind_of_request_completes_as_specified() {
            let mut rig = rig();
            for op in 0..6 {
                for corrupt in std::iter::once(0).chain(128..128 + CORRUPTIONS.len() as u8) {
                    rig.submit(&request(op, corrupt));
                    rig.wait(Duration::from_secs(2));
                    rig.check();
                    assert_eq!(rig.failure, None, "op {op} corrupt {corrupt}");
                }
            }
            assert!(rig.stats.submitted > 100);
            assert_eq!(rig.stats.completed, rig.stats.submitted);
            rig.finish();
            assert_eq!(rig.failure, None);
        }

        #[test]
        fn a_stray_write_is_caught() {
            let mut rig = rig();
            rig.mem
                .write_slice(&[1], GuestAddress(BUFFERS.0 + 0x8_0000))
                .unwrap();
            rig.reset_and_wait();
            assert!(rig.failure.unwrap().contains("outside the used rings"));
        }

        #[test]
        fn a_write_after_a_completed_reset_is_caught() {
            let mut rig = rig();
            let used = rings(&rig).used;
            assert!(rig.reset_and_wait());
            rig.mem.write_obj(7u16, GuestAddress(used + 2)).unwrap();
            rig.finish();
            assert!(rig.failure.unwrap().contains("after the final reset"));
        }

        #[test]
        fn a_used_index_moving_without_bus_master_is_caught() {
            let mut rig = rig();
            let used = rings(&rig).used;
            rig.config_write(reg::COMMAND, &command::MEMORY.to_le_bytes());
            rig.check();
            assert_eq!(rig.failure, None);
            rig.mem.write_obj(1u16, GuestAddress(used + 2)).unwrap();
            rig.check();
            assert!(rig.failure.unwrap().contains("Bus Master Enable"));
        }

        #[test]
        fn a_head_never_offered_is_caught() {
            let mut rig = rig();
            let used = rings(&rig).used;
            rig.submit(&request(0, 0));
            rig.mem.write_obj(9u32, GuestAddress(used + 4)).unwrap();
            rig.mem.write_obj(1u16, GuestAddress(used + 2)).unwrap();
            rig.reap();
            assert!(rig.failure.unwrap().contains("not outstanding"));
        }

        #[test]
        fn a_wrong_status_is_caught() {
            let rig = rig();
            let addr = BUFFERS.0 + 0x100;
            rig.mem
                .write_obj(req_status::OK, GuestAddress(addr))
                .unwrap();
            let o = Outstanding {
                descs: Vec::new(),
                expect: Expect::Malformed,
                corrupt: Corrupt::Flags,
                status: Some(addr),
                untouched: None,
                block: (addr, addr + 512),
                id_segments: Vec::new(),
                tampered: false,
                bme_gen: 0,
            };
            assert!(rig.check_completion(&o, 1, 0).is_err());
        }

        #[test]
        fn interrupts_outside_what_the_guest_allows_are_caught() {
            let msi = Recorder::new(2, false, false);
            msi.trigger(0);
            msi.bus_master.store(true, Ordering::SeqCst);
            msi.session.store(true, Ordering::SeqCst);
            msi.trigger(1);
            assert_eq!(lock(&msi.violations).len(), 2);
            msi.deliverable[1].store(true, Ordering::SeqCst);
            msi.trigger(1);
            assert_eq!(lock(&msi.violations).len(), 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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

    #[test]
    fn device_programs_from_prng_hold() {
        // The stable stand-in for `cargo fuzz run device`: structured programs (bring-up,
        // valid and malformed requests, reaping, Bus Master Enable toggles, resets, raw
        // register and memory writes) against the real engine.
        for seed in 0..150 {
            let program = device_program(seed);
            if let Err(e) = fuzz_device(&program) {
                panic!("seed {seed}: {e}");
            }
        }
    }

    #[test]
    fn device_programs_hold_on_a_reused_device() {
        // The cargo-fuzz target keeps devices between inputs: the same programs must pass on
        // devices that ran other programs before.
        for seed in 0..150 {
            let program = device_program(seed % 40);
            if let Err(e) = fuzz_device_reusing(&program) {
                panic!("seed {}: {e}", seed % 40);
            }
        }
    }

    #[test]
    fn device_survives_random_bytes() {
        let mut rng = crate::fault::SplitMix64::new(0xd1ce);
        for round in 0..100 {
            let len = (rng.next_u64() % 600) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if let Err(e) = fuzz_device(&data) {
                panic!("round {round}: {e}");
            }
        }
    }

    /// Every file of the corpus kept in the repository (`device/fuzz/corpus/<target>/`, grown
    /// and minimized by `make fuzz`) runs through its target's function here, on stable.
    #[test]
    fn corpus_replays() {
        type Target = fn(&[u8]) -> Result<(), String>;
        let targets: [(&str, Target); 2] = [("parse", fuzz_input), ("device", fuzz_device)];
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let mut jobs: Vec<(std::path::PathBuf, Target)> = Vec::new();
        for (name, run) in targets {
            let dir = root.join(name);
            let files = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.map(|e| (e.path(), run)))
                .collect::<Result<Vec<_>, _>>()
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            jobs.extend(files);
        }
        jobs.sort_by(|a, b| a.0.cmp(&b.0));
        let count = jobs.len();
        // A device program mostly waits for the device's threads: four replay at once.
        let lanes = 4;
        let outcomes: Vec<(usize, Vec<String>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..lanes)
                .map(|lane| {
                    let jobs = &jobs;
                    scope.spawn(move || {
                        let (mut known, mut failures) = (0, Vec::new());
                        for (path, run) in jobs.iter().skip(lane).step_by(lanes) {
                            let data = std::fs::read(path)
                                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                            match std::panic::catch_unwind(|| run(&data)) {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => match open_finding(&e) {
                                    Some(what) => {
                                        known += 1;
                                        eprintln!("{}: open finding ({what})", path.display());
                                    }
                                    None => failures.push(format!("{}: {e}", path.display())),
                                },
                                Err(_) => failures.push(format!("{}: panicked", path.display())),
                            }
                        }
                        (known, failures)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let known: usize = outcomes.iter().map(|o| o.0).sum();
        let failures: Vec<String> = outcomes.into_iter().flat_map(|o| o.1).collect();
        assert!(count > 0, "no corpus under {}", root.display());
        eprintln!("{count} corpus file(s), {known} ran into an open finding");
        assert!(
            failures.is_empty(),
            "{} of {count} corpus file(s) fail:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}
