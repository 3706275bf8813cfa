//! Request parsing and validation (SPEC sections 6.2 and 6.3), as a pure function over guest
//! memory.
//!
//! [`parse_chain`] walks one descriptor chain in the descriptor table, copies every descriptor
//! out of guest memory exactly once (so a guest rewriting the table while the device looks at it
//! cannot make the device see two different chains), and classifies it:
//!
//! - [`Parsed::Valid`]: a request the backend can execute, every buffer inside guest RAM;
//! - [`Parsed::Rejected`]: a request that completes at once with `MALFORMED` or `UNSUPP`, with the
//!   status byte address when the status descriptor is usable (SPEC 6.2);
//! - `Err(`[`BrokenChain`]`)`: the descriptor table itself cannot be trusted (SPEC 6.3): the
//!   queue needs a reset.
//!
//! It never panics, whatever the memory holds; the fuzz target (`device/fuzz`) and
//! [`crate::fuzz`] exercise exactly that. virtio-queue's own `DescriptorChain` iterator is not used
//! for the walk because it follows `INDIRECT` descriptors (which this device does not offer) and
//! ends a looping chain silently instead of reporting it; this walk stops after the most
//! descriptors a request can have ([`max_chain_len`]), which also bounds a looping chain.

use std::fmt;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::abi;

/// Size of [`abi::RequestHeader`]: the header descriptor must be exactly this long.
pub const HEADER_LEN: u32 = 32;

/// The ID string `GET_ID` writes is this many bytes.
pub const ID_LEN: u32 = abi::ID_LEN as u32;

/// A request operation this device knows (`abi::op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `abi::op::READ`.
    Read,
    /// `abi::op::WRITE`.
    Write,
    /// `abi::op::FLUSH`.
    Flush,
    /// `abi::op::GET_ID`.
    GetId,
}

impl Op {
    /// Every op, in metrics order.
    pub const ALL: [Op; 4] = [Op::Read, Op::Write, Op::Flush, Op::GetId];

    /// The op for a raw header value, `None` if unknown.
    pub fn from_raw(raw: u32) -> Option<Op> {
        match raw {
            abi::op::READ => Some(Op::Read),
            abi::op::WRITE => Some(Op::Write),
            abi::op::FLUSH => Some(Op::Flush),
            abi::op::GET_ID => Some(Op::GetId),
            _ => None,
        }
    }

    /// The raw header value.
    pub fn raw(self) -> u32 {
        match self {
            Op::Read => abi::op::READ,
            Op::Write => abi::op::WRITE,
            Op::Flush => abi::op::FLUSH,
            Op::GetId => abi::op::GET_ID,
        }
    }

    /// Lower-case name, as in `--fault ...,op=NAME` and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::GetId => "get_id",
        }
    }

    /// Parses a lower-case name (the inverse of [`Op::name`]).
    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }

    /// The feature bit the driver must have negotiated to use this op, if any.
    pub fn feature(self) -> Option<u64> {
        match self {
            Op::Read | Op::Write => None,
            Op::Flush => Some(abi::feature::FLUSH),
            Op::GetId => Some(abi::feature::GET_ID),
        }
    }

    /// Index into per-op tables (`Op::ALL` order).
    pub fn index(self) -> usize {
        match self {
            Op::Read => 0,
            Op::Write => 1,
            Op::Flush => 2,
            Op::GetId => 3,
        }
    }

    /// Whether the device writes the data buffers (so they must be device-writable).
    fn device_writes_data(self) -> bool {
        matches!(self, Op::Read | Op::GetId)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One data buffer in guest memory (already checked to lie inside guest RAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Head descriptor index (what goes into the used element).
    pub head: u16,
    /// Operation.
    pub op: Op,
    /// The driver's request id (opaque; for logs).
    pub id: u64,
    /// Byte offset into the store (READ/WRITE).
    pub offset: u64,
    /// Data length: the sum of `segments`' lengths.
    pub length: u32,
    /// Data buffers, in chain order.
    pub segments: Vec<Segment>,
    /// Address of the status byte.
    pub status: GuestAddress,
}

/// What the device accepts; from the device configuration and the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Store size in bytes.
    pub capacity: u64,
    /// Most data descriptors per request.
    pub max_segments: u32,
    /// Most data bytes per READ/WRITE.
    pub max_transfer: u32,
    /// Negotiated features (`abi::feature`).
    pub features: u64,
}

/// Why a request is malformed (SPEC 6.2). The request completes with `MALFORMED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The chain goes on past [`max_chain_len`] descriptors (it may loop).
    #[error("chain is longer than {max} descriptors (a header, max_segments data, a status)")]
    ChainTooLong {
        /// The most descriptors a chain may have.
        max: usize,
    },
    /// Fewer than two descriptors: no room for both a header and a status.
    #[error("chain has {0} descriptor(s); a request needs a header and a status descriptor")]
    TooShort(usize),
    /// A descriptor has length 0.
    #[error("descriptor {index} has length 0")]
    ZeroLength {
        /// Descriptor index.
        index: u16,
    },
    /// A descriptor has the INDIRECT flag (not offered).
    #[error("descriptor {index} has the INDIRECT flag (not offered)")]
    Indirect {
        /// Descriptor index.
        index: u16,
    },
    /// A descriptor's buffer lies (even partly) outside guest RAM.
    #[error("descriptor {index}: buffer {addr:#x}+{len:#x} lies outside guest RAM")]
    OutsideRam {
        /// Descriptor index.
        index: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The last descriptor is not a device-writable buffer of at least one byte.
    #[error("the last descriptor is not a device-writable status buffer")]
    BadStatus,
    /// With INTEGRITY negotiated, the status buffer holds fewer than the status block's bytes.
    #[error("the status buffer is shorter than the {0}-byte integrity status block")]
    StatusBlock(u32),
    /// The header descriptor is not exactly 32 bytes.
    #[error("header descriptor is {0} bytes, not 32")]
    HeaderSize(u32),
    /// The header descriptor is device-writable.
    #[error("header descriptor is device-writable")]
    HeaderWritable,
    /// `flags` is not 0.
    #[error("header flags {0:#x} is not 0")]
    HeaderFlags(u32),
    /// `reserved` is not 0.
    #[error("header reserved {0:#x} is not 0")]
    HeaderReserved(u32),
    /// A data descriptor has the wrong direction for the op.
    #[error("data descriptor {index} has the wrong direction for {op}")]
    Direction {
        /// Descriptor index.
        index: u16,
        /// The request's op.
        op: Op,
    },
    /// The header's `length` differs from the data descriptors' total.
    #[error("header length {length} differs from the data descriptors' total {total}")]
    LengthMismatch {
        /// Header `length`.
        length: u32,
        /// Sum of the data descriptors' lengths.
        total: u64,
    },
    /// READ/WRITE with length 0.
    #[error("{0} with length 0")]
    ZeroTransfer(Op),
    /// READ/WRITE longer than `max_transfer`.
    #[error("length {length} exceeds max_transfer {max}")]
    TooLong {
        /// Header `length`.
        length: u32,
        /// The limit.
        max: u32,
    },
    /// `offset + length` overflows or exceeds the capacity.
    #[error("range {offset:#x}+{length:#x} exceeds the capacity {capacity:#x}")]
    OutOfRange {
        /// Header `offset`.
        offset: u64,
        /// Header `length`.
        length: u32,
        /// Store size.
        capacity: u64,
    },
    /// FLUSH with data descriptors.
    #[error("flush with {0} data descriptor(s)")]
    FlushWithData(usize),
    /// GET_ID with fewer than 20 data bytes.
    #[error("get_id with {0} data bytes, fewer than 20")]
    IdTooShort(u64),
}

/// Why a request was rejected without reaching the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// SPEC 6.2: status `MALFORMED`.
    #[error("malformed: {0}")]
    Malformed(#[from] Malformed),
    /// Unknown op, or one whose feature was not negotiated: status `UNSUPP`.
    #[error("unsupported op {0}")]
    Unsupported(u32),
}

impl RejectReason {
    /// The status byte this rejection completes with.
    pub fn status(&self) -> u8 {
        match self {
            RejectReason::Malformed(_) => abi::req_status::MALFORMED,
            RejectReason::Unsupported(_) => abi::req_status::UNSUPP,
        }
    }
}

/// A request that completes at once, without a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// Head descriptor index.
    pub head: u16,
    /// Where to write the status byte; `None` when the status descriptor is unusable (then the
    /// used element's `len` is 0 and no status byte is written).
    pub status_addr: Option<GuestAddress>,
    /// Why.
    pub reason: RejectReason,
}

impl Rejection {
    /// The used element's `len`: 1 for the status byte, 0 without a usable status descriptor.
    pub fn used_len(&self) -> u32 {
        u32::from(self.status_addr.is_some())
    }
}

/// Outcome of [`parse_chain`] for a chain that could be walked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A request for the backend.
    Valid(Request),
    /// A request that completes at once with `MALFORMED` or `UNSUPP`.
    Rejected(Rejection),
}

/// The descriptor table cannot be trusted (SPEC 6.3): the queue needs a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BrokenChain {
    /// The available ring names a head index ≥ the queue size.
    #[error("head index {head} is not below the queue size {size}")]
    HeadOutOfRange {
        /// The head index.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// A descriptor's `next` is ≥ the queue size.
    #[error("descriptor {index} chains to {next}, not below the queue size {size}")]
    NextOutOfRange {
        /// Descriptor index.
        index: u16,
        /// Its `next` field.
        next: u16,
        /// Queue size.
        size: u16,
    },
    /// A descriptor table entry is not in guest RAM.
    #[error("descriptor {index} at {addr:#x} is outside guest RAM")]
    TableOutsideRam {
        /// Descriptor index.
        index: u16,
        /// Its guest-physical address.
        addr: u64,
    },
}

/// One descriptor as copied out of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Desc {
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
}

impl Desc {
    fn writable(&self) -> bool {
        self.flags & abi::desc_flags::WRITE != 0
    }
    fn indirect(&self) -> bool {
        self.flags & abi::desc_flags::INDIRECT != 0
    }
}

/// A chain as far as the device reads it.
enum Walked {
    /// Every descriptor, in order.
    Complete(Vec<Desc>),
    /// The chain goes on past the most descriptors a request may have (a loop, or a chain
    /// offered to make the device work): the device stops reading it there.
    Overlong,
}

/// Most descriptors the device reads for one chain: a header, `max_segments` data descriptors
/// and a status descriptor, and never more than the queue has. Bounding the walk by the request
/// limit, not the queue size, keeps a doorbell's work linear in the number of heads even when a
/// guest makes every head the start of one long shared chain.
pub fn max_chain_len(limits: &Limits, queue_size: u16) -> usize {
    let by_request = usize::try_from(limits.max_segments)
        .unwrap_or(usize::MAX)
        .saturating_add(2);
    by_request.min(usize::from(queue_size))
}

/// Reads the descriptors of the chain starting at `head`, in order, up to `max_len` of them.
fn walk<M: GuestMemoryBackend>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    max_len: usize,
    reads: &mut usize,
) -> Result<Walked, BrokenChain> {
    if head >= queue_size {
        return Err(BrokenChain::HeadOutOfRange {
            head,
            size: queue_size,
        });
    }
    let mut descs = Vec::new();
    let mut index = head;
    loop {
        if descs.len() >= max_len {
            return Ok(Walked::Overlong);
        }
        let addr =
            desc_table
                .checked_add(u64::from(index) * 16)
                .ok_or(BrokenChain::TableOutsideRam {
                    index,
                    addr: u64::MAX,
                })?;
        let mut raw = [0u8; 16];
        *reads += 1;
        mem.read_slice(&mut raw, addr)
            .map_err(|_| BrokenChain::TableOutsideRam {
                index,
                addr: addr.raw_value(),
            })?;
        let desc = Desc {
            index,
            addr: le_u64(&raw, 0),
            len: le_u32(&raw, 8),
            flags: le_u16(&raw, 12),
        };
        let next = le_u16(&raw, 14);
        descs.push(desc);
        if desc.flags & abi::desc_flags::NEXT == 0 {
            return Ok(Walked::Complete(descs));
        }
        if next >= queue_size {
            return Err(BrokenChain::NextOutOfRange {
                index,
                next,
                size: queue_size,
            });
        }
        index = next;
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        v.copy_from_slice(s);
    }
    u16::from_le_bytes(v)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

/// Whether `[addr, addr + len)` lies entirely in guest RAM (`len` > 0).
fn in_ram<M: GuestMemoryBackend>(mem: &M, addr: u64, len: u32) -> bool {
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    if len == 0 {
        return false;
    }
    // `check_range` walks the regions with checked arithmetic: a range that wraps past the end
    // of the address space is rejected.
    match addr.checked_add(len as u64 - 1) {
        Some(_) => mem.check_range(GuestAddress(addr), len),
        None => false,
    }
}

/// The decoded request header.
#[derive(Debug, Clone, Copy)]
struct Header {
    op: u32,
    flags: u32,
    id: u64,
    offset: u64,
    length: u32,
    reserved: u32,
}

impl Header {
    fn decode(raw: &[u8; 32]) -> Header {
        Header {
            op: le_u32(raw, 0),
            flags: le_u32(raw, 4),
            id: le_u64(raw, 8),
            offset: le_u64(raw, 16),
            length: le_u32(raw, 24),
            reserved: le_u32(raw, 28),
        }
    }
}

/// Parses and validates the chain at `head` of the queue whose descriptor table is at
/// `desc_table` (`queue_size` entries). Pure: reads guest memory, writes nothing, no threads.
pub fn parse_chain<M: GuestMemoryBackend>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    limits: &Limits,
) -> Result<Parsed, BrokenChain> {
    parse_chain_counted(mem, desc_table, queue_size, head, limits, &mut 0)
}

/// [`parse_chain`], adding the number of descriptor-table entries it read to `reads` (the
/// device's work per request, which its metrics report).
pub fn parse_chain_counted<M: GuestMemoryBackend>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    limits: &Limits,
    reads: &mut usize,
) -> Result<Parsed, BrokenChain> {
    let max_len = max_chain_len(limits, queue_size);
    let descs = match walk(mem, desc_table, queue_size, head, max_len, reads)? {
        Walked::Complete(descs) => descs,
        Walked::Overlong => {
            // The status descriptor is somewhere past where the device stopped reading.
            return Ok(Parsed::Rejected(Rejection {
                head,
                status_addr: None,
                reason: RejectReason::Malformed(Malformed::ChainTooLong { max: max_len }),
            }));
        }
    };

    // The status descriptor: the last one, device-writable, ≥ 1 byte, its first byte in RAM.
    let status_addr = descs.last().and_then(|d| {
        (d.writable() && !d.indirect() && d.len >= 1 && in_ram(mem, d.addr, 1))
            .then_some(GuestAddress(d.addr))
    });
    let reject = |reason: RejectReason| {
        Ok(Parsed::Rejected(Rejection {
            head,
            status_addr,
            reason,
        }))
    };
    let malformed = |m: Malformed| reject(RejectReason::Malformed(m));

    if descs.len() < 2 {
        return malformed(Malformed::TooShort(descs.len()));
    }
    for d in &descs {
        if d.len == 0 {
            return malformed(Malformed::ZeroLength { index: d.index });
        }
        if d.indirect() {
            return malformed(Malformed::Indirect { index: d.index });
        }
        if !in_ram(mem, d.addr, d.len) {
            return malformed(Malformed::OutsideRam {
                index: d.index,
                addr: d.addr,
                len: d.len,
            });
        }
    }
    let Some(status) = status_addr else {
        return malformed(Malformed::BadStatus);
    };
    if limits.features & abi::feature::INTEGRITY != 0 {
        let block = abi::integrity::STATUS_LEN;
        if descs
            .last()
            .is_none_or(|d| d.len < block || !in_ram(mem, d.addr, block))
        {
            return malformed(Malformed::StatusBlock(block));
        }
    }

    let (header_desc, rest) = match descs.split_first() {
        Some(split) => split,
        None => return malformed(Malformed::TooShort(0)),
    };
    let data = match rest.split_last() {
        Some((_, data)) => data,
        None => return malformed(Malformed::TooShort(1)),
    };
    if header_desc.len != HEADER_LEN {
        return malformed(Malformed::HeaderSize(header_desc.len));
    }
    if header_desc.writable() {
        return malformed(Malformed::HeaderWritable);
    }
    let mut raw = [0u8; 32];
    if mem
        .read_slice(&mut raw, GuestAddress(header_desc.addr))
        .is_err()
    {
        // Checked above; a read can only fail if the memory map changed.
        return malformed(Malformed::OutsideRam {
            index: header_desc.index,
            addr: header_desc.addr,
            len: header_desc.len,
        });
    }
    let header = Header::decode(&raw);
    if header.flags != 0 {
        return malformed(Malformed::HeaderFlags(header.flags));
    }
    if header.reserved != 0 {
        return malformed(Malformed::HeaderReserved(header.reserved));
    }

    let op = match Op::from_raw(header.op) {
        Some(op) if op.feature().is_none_or(|f| limits.features & f != 0) => op,
        _ => return reject(RejectReason::Unsupported(header.op)),
    };

    for d in data {
        if d.writable() != op.device_writes_data() {
            return malformed(Malformed::Direction { index: d.index, op });
        }
    }
    let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
    if total != u64::from(header.length) {
        return malformed(Malformed::LengthMismatch {
            length: header.length,
            total,
        });
    }
    match op {
        Op::Read | Op::Write => {
            if header.length == 0 {
                return malformed(Malformed::ZeroTransfer(op));
            }
            if header.length > limits.max_transfer {
                return malformed(Malformed::TooLong {
                    length: header.length,
                    max: limits.max_transfer,
                });
            }
            let fits = header
                .offset
                .checked_add(u64::from(header.length))
                .is_some_and(|end| end <= limits.capacity);
            if !fits {
                return malformed(Malformed::OutOfRange {
                    offset: header.offset,
                    length: header.length,
                    capacity: limits.capacity,
                });
            }
        }
        Op::Flush => {
            if !data.is_empty() {
                return malformed(Malformed::FlushWithData(data.len()));
            }
        }
        Op::GetId => {
            if total < u64::from(ID_LEN) {
                return malformed(Malformed::IdTooShort(total));
            }
        }
    }

    Ok(Parsed::Valid(Request {
        head,
        op,
        id: header.id,
        offset: header.offset,
        length: header.length,
        segments: data
            .iter()
            .map(|d| Segment {
                addr: GuestAddress(d.addr),
                len: d.len,
            })
            .collect(),
        status,
    }))
}

/// Checks the promises [`parse_chain`] makes about its result; used by the fuzz target and the
/// tests. Returns a description of the first broken promise.
pub fn check_invariants<M: GuestMemoryBackend>(
    mem: &M,
    limits: &Limits,
    queue_size: u16,
    head: u16,
    parsed: &Result<Parsed, BrokenChain>,
) -> Result<(), String> {
    match parsed {
        Err(BrokenChain::HeadOutOfRange { head: h, .. }) if *h < queue_size => {
            Err(format!("head {h} reported out of range"))
        }
        Err(_) => Ok(()),
        Ok(Parsed::Rejected(r)) => {
            if r.head != head {
                return Err("rejection names another head".into());
            }
            match r.status_addr {
                Some(a) if !in_ram(mem, a.raw_value(), 1) => {
                    Err("status address outside RAM".into())
                }
                _ => Ok(()),
            }
        }
        Ok(Parsed::Valid(req)) => {
            if req.head != head || head >= queue_size {
                return Err("valid request with a bad head".into());
            }
            if !in_ram(mem, req.status.raw_value(), 1) {
                return Err("status byte outside RAM".into());
            }
            let mut total = 0u64;
            for s in &req.segments {
                if !in_ram(mem, s.addr.raw_value(), s.len) {
                    return Err(format!("segment {:#x}+{:#x} outside RAM", s.addr.0, s.len));
                }
                total += u64::from(s.len);
            }
            if total != u64::from(req.length) {
                return Err("segments do not add up to the length".into());
            }
            match req.op {
                Op::Read | Op::Write => {
                    if req.segments.len() > limits.max_segments as usize {
                        return Err("too many segments".into());
                    }
                    if req.length == 0 || req.length > limits.max_transfer {
                        return Err("bad transfer length accepted".into());
                    }
                    if req
                        .offset
                        .checked_add(u64::from(req.length))
                        .is_none_or(|e| e > limits.capacity)
                    {
                        return Err("range past the capacity accepted".into());
                    }
                }
                Op::Flush => {
                    if !req.segments.is_empty() {
                        return Err("flush with data accepted".into());
                    }
                }
                Op::GetId => {
                    if req.length < ID_LEN {
                        return Err("short get_id accepted".into());
                    }
                }
            }
            if let Some(f) = req.op.feature() {
                if limits.features & f == 0 {
                    return Err("op accepted without its feature".into());
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const TABLE: u64 = 0x1000;
    const QSIZE: u16 = 16;
    const MEM: usize = 0x10_0000;

    fn limits() -> Limits {
        Limits {
            capacity: 1 << 20,
            max_segments: 4,
            max_transfer: 1 << 16,
            features: abi::feature::FLUSH | abi::feature::GET_ID,
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    fn set_desc(mem: &GuestMemoryMmap, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(TABLE + u64::from(index) * 16))
            .unwrap();
    }

    fn set_header(mem: &GuestMemoryMmap, addr: u64, op: u32, offset: u64, length: u32) {
        let mut raw = [0u8; 32];
        raw[0..4].copy_from_slice(&op.to_le_bytes());
        raw[8..16].copy_from_slice(&77u64.to_le_bytes());
        raw[16..24].copy_from_slice(&offset.to_le_bytes());
        raw[24..28].copy_from_slice(&length.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(addr)).unwrap();
    }

    const N: u16 = abi::desc_flags::NEXT;
    const W: u16 = abi::desc_flags::WRITE;

    /// header(0) -> data(1..) -> status(last); descriptors at consecutive indices.
    fn chain(mem: &GuestMemoryMmap, op: u32, offset: u64, data: &[(u64, u32, u16)]) {
        let length = data.iter().map(|d| d.1).sum();
        set_header(mem, 0x8000, op, offset, length);
        set_desc(mem, 0, 0x8000, 32, N, 1);
        for (i, &(addr, len, flags)) in data.iter().enumerate() {
            let i = i as u16 + 1;
            set_desc(mem, i, addr, len, flags | N, i + 1);
        }
        let last = data.len() as u16 + 1;
        set_desc(mem, last, 0x9000, 1, W, 0);
    }

    fn parse(mem: &GuestMemoryMmap) -> Result<Parsed, BrokenChain> {
        let r = parse_chain(mem, GuestAddress(TABLE), QSIZE, 0, &limits());
        check_invariants(mem, &limits(), QSIZE, 0, &r).unwrap();
        r
    }

    fn malformed(r: Result<Parsed, BrokenChain>) -> Malformed {
        match r {
            Ok(Parsed::Rejected(Rejection {
                reason: RejectReason::Malformed(m),
                ..
            })) => m,
            other => panic!("expected malformed, got {other:?}"),
        }
    }

    #[test]
    fn valid_read_write_flush_get_id() {
        let m = mem();
        chain(
            &m,
            abi::op::READ,
            512,
            &[(0xa000, 512, W), (0xc000, 1024, W)],
        );
        let Ok(Parsed::Valid(req)) = parse(&m) else {
            panic!()
        };
        assert_eq!(req.op, Op::Read);
        assert_eq!(req.id, 77);
        assert_eq!(req.offset, 512);
        assert_eq!(req.length, 1536);
        assert_eq!(req.segments.len(), 2);
        assert_eq!(req.status, GuestAddress(0x9000));

        chain(&m, abi::op::WRITE, 0, &[(0xa000, 4096, 0)]);
        assert!(matches!(
            parse(&m),
            Ok(Parsed::Valid(Request { op: Op::Write, .. }))
        ));
        chain(&m, abi::op::FLUSH, 0, &[]);
        assert!(matches!(
            parse(&m),
            Ok(Parsed::Valid(Request { op: Op::Flush, .. }))
        ));
        chain(&m, abi::op::GET_ID, 0, &[(0xa000, 20, W)]);
        assert!(matches!(
            parse(&m),
            Ok(Parsed::Valid(Request { op: Op::GetId, .. }))
        ));
        // The last byte of the store is reachable.
        chain(&m, abi::op::READ, (1 << 20) - 512, &[(0xa000, 512, W)]);
        assert!(matches!(parse(&m), Ok(Parsed::Valid(_))));
    }

    #[test]
    fn unknown_or_unnegotiated_op_is_unsupp() {
        let m = mem();
        chain(&m, 99, 0, &[(0xa000, 512, W)]);
        let Ok(Parsed::Rejected(r)) = parse(&m) else {
            panic!()
        };
        assert_eq!(r.reason, RejectReason::Unsupported(99));
        assert_eq!(r.reason.status(), abi::req_status::UNSUPP);
        assert_eq!(r.status_addr, Some(GuestAddress(0x9000)));
        assert_eq!(r.used_len(), 1);

        chain(&m, abi::op::FLUSH, 0, &[]);
        let no_features = Limits {
            features: 0,
            ..limits()
        };
        let r = parse_chain(&m, GuestAddress(TABLE), QSIZE, 0, &no_features);
        assert!(matches!(
            r,
            Ok(Parsed::Rejected(Rejection {
                reason: RejectReason::Unsupported(4),
                ..
            }))
        ));
    }

    #[test]
    fn every_malformed_case() {
        let m = mem();
        // Header size.
        chain(&m, abi::op::READ, 0, &[(0xa000, 512, W)]);
        set_desc(&m, 0, 0x8000, 31, N, 1);
        assert_eq!(malformed(parse(&m)), Malformed::HeaderSize(31));
        // Header device-writable.
        set_desc(&m, 0, 0x8000, 32, N | W, 1);
        assert_eq!(malformed(parse(&m)), Malformed::HeaderWritable);
        // flags / reserved.
        chain(&m, abi::op::READ, 0, &[(0xa000, 512, W)]);
        m.write_obj(5u32, GuestAddress(0x8004)).unwrap();
        assert_eq!(malformed(parse(&m)), Malformed::HeaderFlags(5));
        m.write_obj(0u32, GuestAddress(0x8004)).unwrap();
        m.write_obj(1u32, GuestAddress(0x801c)).unwrap();
        assert_eq!(malformed(parse(&m)), Malformed::HeaderReserved(1));
        // Wrong direction: READ with a device-readable buffer, WRITE with a writable one.
        chain(&m, abi::op::READ, 0, &[(0xa000, 512, 0)]);
        assert!(matches!(
            malformed(parse(&m)),
            Malformed::Direction { index: 1, .. }
        ));
        chain(&m, abi::op::WRITE, 0, &[(0xa000, 512, W)]);
        assert!(matches!(malformed(parse(&m)), Malformed::Direction { .. }));
        // Zero-length descriptor.
        chain(&m, abi::op::READ, 0, &[(0xa000, 512, W), (0xb000, 0, W)]);
        assert_eq!(malformed(parse(&m)), Malformed::ZeroLength { index: 2 });
        // Length mismatch.
        chain(&m, abi::op::READ, 0, &[(0xa000, 512, W)]);
        m.write_obj(1024u32, GuestAddress(0x8018)).unwrap();
        assert!(matches!(
            malformed(parse(&m)),
            Malformed::LengthMismatch { .. }
        ));
        // READ with length 0 (no data descriptors).
        chain(&m, abi::op::READ, 0, &[]);
        assert_eq!(malformed(parse(&m)), Malformed::ZeroTransfer(Op::Read));
        // Too long.
        chain(&m, abi::op::READ, 0, &[(0xa000, 0x1_0001, W)]);
        assert!(matches!(malformed(parse(&m)), Malformed::TooLong { .. }));
        // Too many segments.
        let five: Vec<_> = (0..5).map(|i| (0xa000 + i * 0x1000, 512, W)).collect();
        chain(&m, abi::op::READ, 0, &five);
        assert_eq!(malformed(parse(&m)), Malformed::ChainTooLong { max: 6 });
        // Offset past the capacity, and overflow.
        chain(&m, abi::op::READ, 1 << 20, &[(0xa000, 512, W)]);
        assert!(matches!(malformed(parse(&m)), Malformed::OutOfRange { .. }));
        chain(&m, abi::op::READ, (1 << 20) - 511, &[(0xa000, 512, W)]);
        assert!(matches!(malformed(parse(&m)), Malformed::OutOfRange { .. }));
        chain(&m, abi::op::WRITE, u64::MAX - 100, &[(0xa000, 512, 0)]);
        assert!(matches!(malformed(parse(&m)), Malformed::OutOfRange { .. }));
        // FLUSH with data.
        chain(&m, abi::op::FLUSH, 0, &[(0xa000, 512, 0)]);
        assert_eq!(malformed(parse(&m)), Malformed::FlushWithData(1));
        // GET_ID too short.
        chain(&m, abi::op::GET_ID, 0, &[(0xa000, 19, W)]);
        assert_eq!(malformed(parse(&m)), Malformed::IdTooShort(19));
        // Data buffer past the end of RAM, and wrapping the address space.
        chain(&m, abi::op::READ, 0, &[(MEM as u64 - 256, 512, W)]);
        assert!(matches!(
            malformed(parse(&m)),
            Malformed::OutsideRam { index: 1, .. }
        ));
        chain(&m, abi::op::READ, 0, &[(u64::MAX - 10, 512, W)]);
        assert!(matches!(malformed(parse(&m)), Malformed::OutsideRam { .. }));
        // Header outside RAM.
        chain(&m, abi::op::READ, 0, &[(0xa000, 512, W)]);
        set_desc(&m, 0, 1 << 40, 32, N, 1);
        assert!(matches!(
            malformed(parse(&m)),
            Malformed::OutsideRam { index: 0, .. }
        ));
        // INDIRECT flag.
        chain(&m, abi::op::READ, 0, &[(0xa000, 512, W)]);
        set_desc(&m, 1, 0xa000, 512, W | N | abi::desc_flags::INDIRECT, 2);
        assert_eq!(malformed(parse(&m)), Malformed::Indirect { index: 1 });
    }

    #[test]
    fn unusable_status_descriptor_means_no_status_byte() {
        let m = mem();
        // Missing status: the last descriptor is the (readable) data buffer of a WRITE.
        set_header(&m, 0x8000, abi::op::WRITE, 0, 512);
        set_desc(&m, 0, 0x8000, 32, N, 1);
        set_desc(&m, 1, 0xa000, 512, 0, 0);
        let Ok(Parsed::Rejected(r)) = parse(&m) else {
            panic!()
        };
        assert_eq!(r.status_addr, None);
        assert_eq!(r.used_len(), 0);
        assert_eq!(r.reason, RejectReason::Malformed(Malformed::BadStatus));
        // Status of length 0.
        chain(&m, abi::op::READ, 0, &[(0xa000, 512, W)]);
        set_desc(&m, 2, 0x9000, 0, W, 0);
        let Ok(Parsed::Rejected(r)) = parse(&m) else {
            panic!()
        };
        assert_eq!(r.status_addr, None);
        // Status outside RAM.
        set_desc(&m, 2, 1 << 40, 1, W, 0);
        let Ok(Parsed::Rejected(r)) = parse(&m) else {
            panic!()
        };
        assert_eq!(r.status_addr, None);
        // A lone descriptor: too short; it is writable so it takes the status byte.
        set_desc(&m, 0, 0x9000, 1, W, 0);
        let Ok(Parsed::Rejected(r)) = parse(&m) else {
            panic!()
        };
        assert_eq!(r.reason, RejectReason::Malformed(Malformed::TooShort(1)));
        assert_eq!(r.status_addr, Some(GuestAddress(0x9000)));
        // Status partly outside RAM: malformed, but the status byte itself is writable.
        chain(&m, abi::op::READ, 0, &[(0xa000, 512, W)]);
        set_desc(&m, 2, MEM as u64 - 1, 16, W, 0);
        let Ok(Parsed::Rejected(r)) = parse(&m) else {
            panic!()
        };
        assert!(matches!(
            r.reason,
            RejectReason::Malformed(Malformed::OutsideRam { .. })
        ));
        assert_eq!(r.status_addr, Some(GuestAddress(MEM as u64 - 1)));
    }

    #[test]
    fn broken_chains() {
        let m = mem();
        chain(&m, abi::op::READ, 0, &[(0xa000, 512, W)]);
        // Head out of range.
        assert_eq!(
            parse_chain(&m, GuestAddress(TABLE), QSIZE, QSIZE, &limits()),
            Err(BrokenChain::HeadOutOfRange { head: 16, size: 16 })
        );
        // next out of range.
        set_desc(&m, 1, 0xa000, 512, W | N, 40);
        assert!(matches!(
            parse(&m),
            Err(BrokenChain::NextOutOfRange { next: 40, .. })
        ));
        // A loop 0 -> 1 -> 2 -> 1: the walk stops at max_segments + 2 descriptors and the
        // request is malformed, with no status byte (the device never reached one).
        let too_long = Parsed::Rejected(Rejection {
            head: 0,
            status_addr: None,
            reason: RejectReason::Malformed(Malformed::ChainTooLong { max: 6 }),
        });
        set_desc(&m, 1, 0xa000, 512, W | N, 2);
        set_desc(&m, 2, 0x9000, 1, W | N, 1);
        assert_eq!(parse(&m), Ok(too_long.clone()));
        // A self-loop.
        set_desc(&m, 0, 0x8000, 32, N, 0);
        assert_eq!(parse(&m), Ok(too_long.clone()));
        // A chain of the queue size: longer than any request, so the device reads no more than
        // max_segments + 2 of it.
        for i in 0..QSIZE {
            let last = i == QSIZE - 1;
            let flags = if i == 0 {
                N
            } else if last {
                W
            } else {
                W | N
            };
            let addr = if i == 0 { 0x8000 } else { 0xa000 };
            set_desc(&m, i, addr, if i == 0 { 32 } else { 512 }, flags, i + 1);
        }
        assert_eq!(parse(&m), Ok(too_long.clone()));
        // A chain of exactly max_segments + 2 is walked whole.
        set_desc(&m, 5, 0x9000, 1, W, 0);
        assert!(matches!(
            malformed(parse(&m)),
            Malformed::LengthMismatch { .. }
        ));
        // Descriptor table outside RAM.
        let r = parse_chain(&m, GuestAddress(MEM as u64 - 16), QSIZE, 2, &limits());
        assert!(matches!(
            r,
            Err(BrokenChain::TableOutsideRam { index: 2, .. })
        ));
        let r = parse_chain(&m, GuestAddress(u64::MAX - 15), QSIZE, 1, &limits());
        assert!(matches!(r, Err(BrokenChain::TableOutsideRam { .. })));
    }

    #[test]
    fn op_names_round_trip() {
        for op in Op::ALL {
            assert_eq!(Op::from_name(op.name()), Some(op));
            assert_eq!(Op::from_raw(op.raw()), Some(op));
            assert_eq!(Op::ALL[op.index()], op);
        }
        assert_eq!(Op::from_raw(2), None);
    }
}
