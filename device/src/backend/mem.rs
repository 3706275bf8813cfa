//! `mem:SIZE`: the store is an anonymous private mapping (reserved lazily, zero-filled), copied
//! to and from guest memory with volatile copies (guest and store may be accessed concurrently
//! by several workers; the copies are defined for that, unlike plain slices).

use std::io;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, MmapRegion, VolatileMemory};

use super::pool::Store;
use super::{format_size, BackendError};
use crate::request::Segment;

/// The memory store.
#[derive(Debug)]
pub struct MemStore {
    region: MmapRegion<()>,
    size: u64,
}

fn to_io<E: std::fmt::Display>(e: E) -> io::Error {
    io::Error::other(e.to_string())
}

impl MemStore {
    /// Maps `size` bytes.
    pub fn new(size: u64) -> Result<MemStore, BackendError> {
        let err = |reason: String| BackendError::Memory {
            size: format_size(size),
            reason,
        };
        let len = usize::try_from(size).map_err(|e| err(e.to_string()))?;
        let region = MmapRegion::<()>::new(len).map_err(|e| err(e.to_string()))?;
        Ok(MemStore { region, size })
    }

    /// Calls `f(store_slice, guest_slice)` for consecutive pieces of the transfer.
    fn each_piece<F>(
        &self,
        offset: u64,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
        mut f: F,
    ) -> io::Result<()>
    where
        F: FnMut(vm_memory::VolatileSlice<'_, ()>, vm_memory::VolatileSlice<'_, ()>),
    {
        let mut pos = usize::try_from(offset).map_err(to_io)?;
        for seg in segments {
            for guest in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
                let guest = guest.map_err(to_io)?;
                let n = guest.len();
                let store = self.region.get_slice(pos, n).map_err(to_io)?;
                f(store, guest);
                pos = pos.checked_add(n).ok_or_else(|| to_io("offset overflow"))?;
            }
        }
        Ok(())
    }
}

impl Store for MemStore {
    fn capacity(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, mem: &GuestMemoryMmap, segments: &[Segment]) -> io::Result<()> {
        self.each_piece(offset, mem, segments, |store, guest| {
            store.copy_to_volatile_slice(guest)
        })
    }

    fn write(&self, offset: u64, mem: &GuestMemoryMmap, segments: &[Segment]) -> io::Result<()> {
        self.each_piece(offset, mem, segments, |store, guest| {
            guest.copy_to_volatile_slice(store)
        })
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn flip_bits(&self, offset: u64, bits: &[u64]) -> io::Result<()> {
        for &bit in bits {
            let at = offset
                .checked_add(bit / 8)
                .and_then(|a| usize::try_from(a).ok())
                .ok_or_else(|| to_io("offset overflow"))?;
            let byte = self.region.get_slice(at, 1).map_err(to_io)?;
            let v: u8 = vm_memory::Bytes::read_obj(&byte, 0).map_err(to_io)?;
            vm_memory::Bytes::write_obj(&byte, v ^ (1 << (bit % 8)), 0).map_err(to_io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn round_trip_across_guest_regions() {
        // Two adjacent regions: a segment straddling them is split into two pieces.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let store = MemStore::new(1 << 20).unwrap();
        let data: Vec<u8> = (0..0x400u32).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&data, GuestAddress(0xe00)).unwrap();
        let seg = [Segment {
            addr: GuestAddress(0xe00),
            len: 0x400,
        }];
        store.write(4096, &mem, &seg).unwrap();
        let back = [
            Segment {
                addr: GuestAddress(0x1800),
                len: 0x100,
            },
            Segment {
                addr: GuestAddress(0x100),
                len: 0x300,
            },
        ];
        store.read(4096, &mem, &back).unwrap();
        let mut out = vec![0u8; 0x400];
        mem.read_slice(&mut out[..0x100], GuestAddress(0x1800))
            .unwrap();
        mem.read_slice(&mut out[0x100..], GuestAddress(0x100))
            .unwrap();
        assert_eq!(out, data);
        assert!(store.flush().is_ok());
        assert_eq!(store.capacity(), 1 << 20);
    }

    #[test]
    fn overlapping_writes_never_tear_a_block() {
        use crate::backend::pool::Pool;
        use crate::backend::testing;
        use crate::backend::DmaGate;
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;

        let mem = testing::atomicity_memory();
        let inflight = Arc::new(AtomicU64::new(0));
        let store = MemStore::new(4 << 20).unwrap();
        let gate = Arc::new(DmaGate::default());
        let mut pool = Pool::new("mem", store, mem.clone(), 4, inflight.clone(), gate).unwrap();
        testing::overlapping_writes_never_tear(&mut pool, &mem, 0x5eed_0001);
        assert_eq!(inflight.load(Ordering::Acquire), 0);
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let store = MemStore::new(4096).unwrap();
        let seg = [Segment {
            addr: GuestAddress(0),
            len: 0x200,
        }];
        assert!(store.read(4000, &mem, &seg).is_err());
        let outside = [Segment {
            addr: GuestAddress(0xf00),
            len: 0x200,
        }];
        assert!(store.write(0, &mem, &outside).is_err());
    }
}
