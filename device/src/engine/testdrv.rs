//! A test driver: lays out split rings in a `GuestMemoryMmap` the way a guest driver does,
//! posts requests, rings doorbells and reads the used ring; and an `InterruptSink` that records
//! what it is asked to signal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::abi::{self, desc_flags};
use crate::engine::{InterruptSink, QueueConfig};

/// Records interrupts.
#[derive(Debug, Default)]
pub struct RecordingSink {
    pub queue: Mutex<Vec<u16>>,
    pub config: AtomicUsize,
}

impl InterruptSink for RecordingSink {
    fn signal_queue(&self, queue: u16) {
        self.queue.lock().unwrap().push(queue);
    }
    fn signal_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}

impl RecordingSink {
    pub fn count(&self, q: u16) -> usize {
        self.queue
            .lock()
            .unwrap()
            .iter()
            .filter(|&&x| x == q)
            .count()
    }
    pub fn configs(&self) -> usize {
        self.config.load(Ordering::SeqCst)
    }
}

/// A descriptor as the test describes it (NEXT is added by the chain builder).
#[derive(Debug, Clone, Copy)]
pub struct D {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

pub fn rd(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        flags: 0,
    }
}

pub fn wr(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        flags: desc_flags::WRITE,
    }
}

/// One queue's rings, driver side.
#[derive(Debug)]
pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    pub avail_idx: u16,
    used_seen: u16,
}

/// A posted request.
#[derive(Debug, Clone)]
pub struct Posted {
    pub head: u16,
    pub status: u64,
    /// Data buffers (address, length).
    pub data: Vec<(u64, u32)>,
}

/// The test driver.
#[derive(Debug)]
pub struct Driver {
    pub mem: GuestMemoryMmap,
    pub rings: Vec<Ring>,
    pub doorbells: Vec<Arc<EventFd>>,
    next_buf: u64,
    buf_end: u64,
    pub ring_base: u64,
    /// When set, `push_avail` fills ring entries without moving the available index
    /// (`publish_avail` moves it for all of them at once).
    pub defer_avail: bool,
}

/// Guest memory the tests use: 16 MiB at 0.
pub const MEM_SIZE: u64 = 16 << 20;
/// Where data buffers start.
const BUF_BASE: u64 = 4 << 20;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

impl Driver {
    pub fn new(
        mem: GuestMemoryMmap,
        doorbells: Vec<Arc<EventFd>>,
        queues: u16,
        size: u16,
    ) -> Driver {
        let mut d = Driver {
            mem,
            rings: Vec::new(),
            doorbells,
            next_buf: BUF_BASE,
            buf_end: MEM_SIZE,
            ring_base: 0x10_0000,
            defer_avail: false,
        };
        d.init_rings(queues, size);
        d
    }

    /// Lays out fresh rings (as after a reset), zeroed, somewhere not used before.
    pub fn init_rings(&mut self, queues: u16, size: u16) {
        self.rings.clear();
        for _ in 0..queues {
            let base = self.ring_base;
            let n = u64::from(size);
            let desc = base;
            let avail = desc + 16 * n;
            let used = (avail + 6 + 2 * n + 3) & !3;
            let end = used + 6 + 8 * n;
            self.mem
                .write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base))
                .unwrap();
            self.ring_base = (end + 0xfff) & !0xfff;
            self.rings.push(Ring {
                size,
                desc,
                avail,
                used,
                free: (0..size).rev().collect(),
                chains: HashMap::new(),
                avail_idx: 0,
                used_seen: 0,
            });
        }
        assert!(self.ring_base <= BUF_BASE);
    }

    pub fn configs(&self) -> Vec<QueueConfig> {
        self.rings
            .iter()
            .map(|r| QueueConfig {
                size: r.size,
                desc: r.desc,
                driver: r.avail,
                device: r.used,
                enabled: true,
            })
            .collect()
    }

    /// A buffer of `len` bytes, 512-aligned (wraps around when the buffer area is used up).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = (len.max(1) + 511) & !511;
        if self.next_buf + len > self.buf_end {
            self.next_buf = BUF_BASE;
        }
        let a = self.next_buf;
        self.next_buf += len;
        a
    }

    pub fn write_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let at = self.rings[q].desc + u64::from(index) * 16;
        self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }

    /// Writes a chain into free descriptors; returns its head (not yet made available).
    pub fn build_chain(&mut self, q: usize, descs: &[D]) -> u16 {
        let mut idx = Vec::new();
        for _ in descs {
            idx.push(self.rings[q].free.pop().expect("descriptor table full"));
        }
        for (i, d) in descs.iter().enumerate() {
            let (flags, next) = match idx.get(i + 1) {
                Some(&n) => (d.flags | desc_flags::NEXT, n),
                None => (d.flags, 0),
            };
            self.write_desc(q, idx[i], d.addr, d.len, flags, next);
        }
        let head = idx[0];
        self.rings[q].chains.insert(head, idx);
        head
    }

    /// Makes `head` available (does not kick).
    pub fn push_avail(&mut self, q: usize, head: u16) {
        let r = &mut self.rings[q];
        let slot = r.avail + 4 + 2 * u64::from(r.avail_idx % r.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        r.avail_idx = r.avail_idx.wrapping_add(1);
        let idx = r.avail_idx;
        if !self.defer_avail {
            self.set_avail_idx(q, idx);
        }
    }

    /// Moves the available index over every entry pushed so far.
    pub fn publish_avail(&mut self, q: usize) {
        let idx = self.rings[q].avail_idx;
        self.set_avail_idx(q, idx);
    }

    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let at = self.rings[q].avail + 2;
        self.mem
            .store(idx.to_le(), GuestAddress(at), Ordering::Release)
            .unwrap();
    }

    pub fn set_avail_flags(&self, q: usize, flags: u16) {
        let at = self.rings[q].avail;
        self.mem.write_obj(flags.to_le(), GuestAddress(at)).unwrap();
    }

    pub fn set_used_event(&self, q: usize, v: u16) {
        let r = &self.rings[q];
        let at = r.avail + 4 + 2 * u64::from(r.size);
        self.mem.write_obj(v.to_le(), GuestAddress(at)).unwrap();
    }

    pub fn used_flags(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(self.rings[q].used)).unwrap()
    }

    pub fn avail_event(&self, q: usize) -> u16 {
        let r = &self.rings[q];
        self.mem
            .read_obj(GuestAddress(r.used + 4 + 8 * u64::from(r.size)))
            .unwrap()
    }

    pub fn kick(&self, q: usize) {
        self.doorbells[q].write(1).unwrap();
    }

    pub fn header(&mut self, op: u32, id: u64, offset: u64, length: u32) -> u64 {
        let a = self.alloc(32);
        let mut raw = [0u8; 32];
        raw[0..4].copy_from_slice(&op.to_le_bytes());
        raw[8..16].copy_from_slice(&id.to_le_bytes());
        raw[16..24].copy_from_slice(&offset.to_le_bytes());
        raw[24..28].copy_from_slice(&length.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(a)).unwrap();
        a
    }

    /// Posts (makes available, no kick) a request with data segments of `lens` bytes;
    /// `data` is copied into the segments first (WRITE).
    pub fn post(
        &mut self,
        q: usize,
        op: u32,
        id: u64,
        offset: u64,
        lens: &[u32],
        data: Option<&[u8]>,
    ) -> Posted {
        let total: u32 = lens.iter().sum();
        let header = self.header(op, id, offset, total);
        let writable = op != abi::op::WRITE;
        let mut descs = vec![rd(header, 32)];
        let mut segs = Vec::new();
        let mut pos = 0usize;
        for &len in lens {
            let a = self.alloc(u64::from(len));
            if let Some(data) = data {
                self.mem
                    .write_slice(&data[pos..pos + len as usize], GuestAddress(a))
                    .unwrap();
            } else {
                // Poison read buffers so a read that transfers nothing is noticed.
                self.mem
                    .write_slice(&vec![0xee; len as usize], GuestAddress(a))
                    .unwrap();
            }
            pos += len as usize;
            descs.push(if writable { wr(a, len) } else { rd(a, len) });
            segs.push((a, len));
        }
        let status = self.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        descs.push(wr(status, 1));
        let head = self.build_chain(q, &descs);
        self.push_avail(q, head);
        Posted {
            head,
            status,
            data: segs,
        }
    }

    pub fn post_read(&mut self, q: usize, id: u64, offset: u64, lens: &[u32]) -> Posted {
        self.post(q, abi::op::READ, id, offset, lens, None)
    }

    pub fn post_write(&mut self, q: usize, id: u64, offset: u64, data: &[u8]) -> Posted {
        let len = data.len() as u32;
        self.post(q, abi::op::WRITE, id, offset, &[len], Some(data))
    }

    /// Posts a raw chain (for malformed requests); returns its head.
    pub fn post_raw(&mut self, q: usize, descs: &[D]) -> u16 {
        let head = self.build_chain(q, descs);
        self.push_avail(q, head);
        head
    }

    /// The device's used index.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .load(GuestAddress(self.rings[q].used + 2), Ordering::Acquire)
            .unwrap()
    }

    /// Waits until at least `n` new used elements are there and returns the new ones
    /// (id, len), freeing their descriptors.
    pub fn wait_used(&mut self, q: usize, n: usize) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seen = self.rings[q].used_seen;
            let avail = self.used_idx(q).wrapping_sub(seen) as usize;
            if avail >= n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} used elements on queue {q} (have {avail})"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        self.take_used(q)
    }

    /// Every new used element (id, len), freeing their descriptors.
    pub fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let idx = self.used_idx(q);
        let mut out = Vec::new();
        while self.rings[q].used_seen != idx {
            let r = &self.rings[q];
            let slot = r.used + 4 + 8 * u64::from(r.used_seen % r.size);
            let id: u32 = self.mem.read_obj(GuestAddress(slot)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).unwrap();
            out.push((id, len));
            let r = &mut self.rings[q];
            r.used_seen = r.used_seen.wrapping_add(1);
            if let Some(chain) = r.chains.remove(&(id as u16)) {
                r.free.extend(chain);
            }
        }
        out
    }

    pub fn status(&self, p: &Posted) -> u8 {
        self.mem.read_obj(GuestAddress(p.status)).unwrap()
    }

    pub fn data(&self, p: &Posted) -> Vec<u8> {
        let mut out = Vec::new();
        for &(a, len) in &p.data {
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
            out.extend(b);
        }
        out
    }
}

/// Waits for `cond` (20 s at most).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A deterministic byte pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(u32::from(seed)) as u8)
        .collect()
}
