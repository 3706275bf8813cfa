//! One virtqueue as the device thread sees it: virtio-queue's `Queue` for the rings and the
//! notification protocol, plus in-flight head tracking and SPEC 6.3 checks. No threads, no
//! eventfds: `crate::fuzz` drives it straight from fuzz input.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::abi;
use crate::engine::QueueConfig;
use crate::request::{parse_chain_counted, BrokenChain, Limits, Parsed};

/// Why a queue cannot be trusted any more (SPEC 6.3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokenQueue {
    /// The available index is more than the queue size ahead of the used index.
    #[error(
        "available index {avail} is more than the queue size {size} ahead of the used index {used}"
    )]
    AvailJump {
        /// Available index read from the ring.
        avail: u16,
        /// The device's used index.
        used: u16,
        /// Queue size.
        size: u16,
    },
    /// A head already in flight was offered again.
    #[error("head {0} offered again while in flight")]
    DuplicateHead(u16),
    /// The descriptor chain is broken.
    #[error(transparent)]
    Chain(#[from] BrokenChain),
    /// A ring access failed (rings outside guest RAM).
    #[error("ring access failed: {0}")]
    Ring(String),
    /// A `reset` fault: the device asks for a reset on its own.
    #[error("a reset fault fired")]
    Injected,
}

fn ring_err(e: virtio_queue::Error) -> BrokenQueue {
    BrokenQueue::Ring(e.to_string())
}

/// Why a queue configuration is refused at activation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueProblem {
    /// Size or alignment the transport should never have let through.
    #[error("{0}")]
    Config(String),
    /// A ring lies (even partly) outside guest RAM: SPEC 6.3, NEEDS_RESET.
    #[error("{0}")]
    OutsideRam(String),
}

/// A request that finished, waiting to be published in the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Head index.
    pub head: u16,
    /// Used element `len`: data bytes written plus 1 for the status byte.
    pub len: u32,
    /// Where to write which status byte (`None`: unusable status descriptor).
    pub status: Option<(GuestAddress, u8)>,
    /// How a fault makes the device lie about this completion.
    pub lie: UsedLie,
    /// With INTEGRITY: the CRC32C that completes the 8-byte status block.
    pub crc: Option<u32>,
}

/// A fault that makes the device misreport a completion in the used ring or its interrupt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UsedLie {
    /// The truth.
    #[default]
    None,
    /// Publish a head that is not in flight instead of this one (which stays in flight).
    ForeignId,
    /// Publish the element twice.
    Duplicate,
    /// Publish a `len` larger than the request's buffers.
    Overlong,
    /// Raise no interrupt for the batch this completion is published in.
    LostIrq,
    /// Raise the queue's interrupt once more after the batch.
    SpuriousIrq,
}

/// What one [`VQueue::publish`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// Requests taken out of flight (a foreign-id lie leaves its request in flight).
    pub completed: usize,
    /// Whether the queue's interrupt is due (suppression and a lost-interrupt lie applied).
    pub notify: bool,
    /// Whether a spurious-interrupt lie asks for one more interrupt.
    pub spurious: bool,
}

/// Checks a queue configuration against the device maximum and guest memory.
pub fn validate(
    cfg: &QueueConfig,
    max_size: u16,
    mem: &GuestMemoryMmap,
) -> Result<(), QueueProblem> {
    let n = cfg.size;
    if n == 0 || !n.is_power_of_two() || n > max_size {
        return Err(QueueProblem::Config(format!(
            "size {n} is not a power of two from 1 to {max_size}"
        )));
    }
    let rings = [
        (
            "descriptor table",
            cfg.desc,
            abi::ring::desc_table_size(n),
            16u64,
        ),
        ("available ring", cfg.driver, abi::ring::avail_size(n), 2),
        ("used ring", cfg.device, abi::ring::used_size(n), 4),
    ];
    for (what, addr, len, align) in rings {
        if addr % align != 0 {
            return Err(QueueProblem::Config(format!(
                "{what} at {addr:#x} is not {align}-byte aligned"
            )));
        }
        let fits = addr.checked_add(len as u64).is_some()
            && GuestMemoryBackend::check_range(mem, GuestAddress(addr), len);
        if !fits {
            return Err(QueueProblem::OutsideRam(format!(
                "{what} at {addr:#x} ({len:#x} bytes) lies outside guest RAM"
            )));
        }
    }
    Ok(())
}

/// A live queue.
#[derive(Debug)]
pub struct VQueue {
    queue: Queue,
    size: u16,
    inflight: Vec<bool>,
    done: Vec<Done>,
    draining: bool,
    /// Descriptor-table entries read so far (the device's work, for the metrics).
    descriptors_read: u64,
}

impl VQueue {
    /// A ready queue for `cfg` (validated here too).
    pub fn new(
        cfg: &QueueConfig,
        max_size: u16,
        event_idx: bool,
        mem: &GuestMemoryMmap,
    ) -> Result<VQueue, QueueProblem> {
        validate(cfg, max_size, mem)?;
        let config = |e: virtio_queue::Error| QueueProblem::Config(e.to_string());
        let mut queue = Queue::new(max_size).map_err(config)?;
        queue.try_set_size(cfg.size).map_err(config)?;
        queue
            .try_set_desc_table_address(GuestAddress(cfg.desc))
            .map_err(config)?;
        queue
            .try_set_avail_ring_address(GuestAddress(cfg.driver))
            .map_err(config)?;
        queue
            .try_set_used_ring_address(GuestAddress(cfg.device))
            .map_err(config)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(QueueProblem::OutsideRam("rings outside guest RAM".into()));
        }
        Ok(VQueue {
            queue,
            size: cfg.size,
            inflight: vec![false; usize::from(cfg.size)],
            done: Vec::new(),
            draining: false,
            descriptors_read: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Takes the next request off the available ring, or `None` when the ring is empty (then
    /// notifications are enabled again: with EVENT_IDX `avail_event` is published, else the
    /// used ring's `NO_NOTIFY` flag is cleared; while draining they are disabled).
    pub fn pop(
        &mut self,
        mem: &GuestMemoryMmap,
        limits: &Limits,
    ) -> Result<Option<Parsed>, BrokenQueue> {
        loop {
            if !self.draining {
                self.queue.disable_notification(mem).map_err(ring_err)?;
                self.draining = true;
            }
            let avail = self
                .queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(ring_err)?;
            let used = Wrapping(self.queue.next_used());
            if (avail - used).0 > self.size {
                return Err(BrokenQueue::AvailJump {
                    avail: avail.0,
                    used: used.0,
                    size: self.size,
                });
            }
            let next = self.queue.next_avail();
            if avail.0 != next {
                // The ring entry is read here rather than through virtio-queue's `AvailIter`,
                // which refuses an available ring at guest address 0 and turns a failed read
                // into a silent end of iteration.
                let slot = 4 + 2 * u64::from(next % self.size);
                let addr = GuestAddress(self.queue.avail_ring())
                    .checked_add(slot)
                    .ok_or_else(|| BrokenQueue::Ring("available ring address overflows".into()))?;
                let head: u16 = mem
                    .load(addr, Ordering::Acquire)
                    .map(u16::from_le)
                    .map_err(|e| BrokenQueue::Ring(e.to_string()))?;
                self.queue.set_next_avail(next.wrapping_add(1));
                match self.inflight.get(usize::from(head)) {
                    None => {
                        return Err(BrokenChain::HeadOutOfRange {
                            head,
                            size: self.size,
                        }
                        .into())
                    }
                    Some(true) => return Err(BrokenQueue::DuplicateHead(head)),
                    Some(false) => {}
                }
                let desc_table = GuestAddress(self.queue.desc_table());
                let mut reads = 0;
                let parsed =
                    parse_chain_counted(mem, desc_table, self.size, head, limits, &mut reads);
                self.descriptors_read += reads as u64;
                let parsed = parsed?;
                if let Some(f) = self.inflight.get_mut(usize::from(head)) {
                    *f = true;
                }
                return Ok(Some(parsed));
            }
            // Empty: re-enable notifications, then look once more (the driver may have added
            // a request just before).
            let more = self.queue.enable_notification(mem).map_err(ring_err)?;
            self.draining = false;
            if !more {
                return Ok(None);
            }
        }
    }

    /// Descriptor-table entries this queue has read so far.
    pub fn descriptors_read(&self) -> u64 {
        self.descriptors_read
    }

    /// Queues a finished request for [`VQueue::publish`].
    pub fn complete(&mut self, done: Done) {
        self.done.push(done);
    }

    /// Finished requests not yet published.
    pub fn pending_done(&self) -> usize {
        self.done.len()
    }

    /// Drops the finished requests without publishing them.
    pub fn discard_done(&mut self) -> usize {
        let n = self.done.len();
        self.done.clear();
        n
    }

    /// Whether `head` is in flight.
    pub fn is_inflight(&self, head: u16) -> bool {
        self.inflight
            .get(usize::from(head))
            .copied()
            .unwrap_or(false)
    }

    /// Writes the status bytes and used elements of every finished request, in completion
    /// order. Returns how many were published and whether the driver wants an interrupt for
    /// them (EVENT_IDX `used_event`, or without it the available ring's `NO_INTERRUPT` flag).
    pub fn publish(&mut self, mem: &GuestMemoryMmap) -> Result<Published, BrokenQueue> {
        if self.done.is_empty() {
            return Ok(Published::default());
        }
        let mut out = Published::default();
        let mut lost_irq = false;
        let done = std::mem::take(&mut self.done);
        for d in &done {
            if let Some((addr, status)) = d.status {
                // The address (and with a CRC the whole 8-byte block) was checked to be in
                // guest RAM when the request was parsed.
                let written = match d.crc {
                    None => mem.write_obj(status, addr),
                    Some(crc) => {
                        let mut block = [0u8; abi::integrity::STATUS_LEN as usize];
                        block[0] = status;
                        block[abi::integrity::CRC..].copy_from_slice(&crc.to_le_bytes());
                        mem.write_slice(&block, addr)
                    }
                };
                if let Err(e) = written {
                    log::warn!("status at {:#x}: {e}", addr.0);
                }
            }
            let mut head = d.head;
            let mut len = d.len;
            let mut copies = 1;
            match d.lie {
                UsedLie::None => {}
                UsedLie::ForeignId => match self.free_head_after(d.head) {
                    Some(other) => head = other,
                    // Every other head is in flight: naming one would complete another
                    // request, which no driver can tell from the truth. Tell the truth.
                    None => log::debug!("used-id: no head free besides {}", d.head),
                },
                UsedLie::Duplicate => copies = 2,
                UsedLie::Overlong => len = len.saturating_add(4096),
                UsedLie::LostIrq => lost_irq = true,
                UsedLie::SpuriousIrq => out.spurious = true,
            }
            for _ in 0..copies {
                // Writes the element, then the used index with release ordering.
                self.queue.add_used(mem, head, len).map_err(ring_err)?;
            }
            if head == d.head {
                if let Some(f) = self.inflight.get_mut(usize::from(d.head)) {
                    *f = false;
                }
                out.completed += 1;
            }
        }
        self.done = done;
        self.done.clear();
        let mut notify = self.queue.needs_notification(mem).map_err(ring_err)?;
        if notify && !self.queue.event_idx_enabled() {
            // virtio-queue does not look at VRING_AVAIL_F_NO_INTERRUPT; SPEC 5 asks for it.
            let flags: u16 = mem
                .load(GuestAddress(self.queue.avail_ring()), Ordering::Acquire)
                .map(u16::from_le)
                .map_err(|e| BrokenQueue::Ring(e.to_string()))?;
            notify = flags & abi::ring::AVAIL_F_NO_INTERRUPT == 0;
        }
        out.notify = notify && !lost_irq;
        Ok(out)
    }

    /// A head after `head` (wrapping) that is not in flight.
    fn free_head_after(&self, head: u16) -> Option<u16> {
        (1..self.size)
            .map(|i| head.wrapping_add(i) % self.size)
            .find(|h| !self.inflight.get(usize::from(*h)).copied().unwrap_or(true))
    }
}
