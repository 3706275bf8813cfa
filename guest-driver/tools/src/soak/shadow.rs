//! What a soak worker knows about its region of the device: the data of every acknowledged
//! write, as intervals of "write `tag` covers these bytes" rather than a byte copy, so a shadow of
//! many megabytes costs a few hundred kilobytes at most and stays cheap to update.
//!
//! The data a write carries is a function of its tag and the device position ([`fill`]), so
//! a read is checked by recomputing it; a misdirected transfer (right data at a wrong offset)
//! fails too, because the position is part of the pattern.
//!
//! Each interval also remembers the tags written there before (acknowledged or not): a read
//! that returns one of those instead of the current data is a *stale read* (an old write, or
//! one that failed or was cancelled, landed after a newer one); anything else that differs is
//! an *undetected corruption*.

use std::collections::BTreeMap;

/// Tag 0: no known write (the data is unknown).
pub const UNKNOWN: u64 = 0;
/// How many earlier tags an interval remembers for the stale-read verdict.
const HISTORY: usize = 2;
/// Bytes compared after a mismatch to tell stale from corrupt: enough that a chance match of a
/// random-looking pattern (1 in 256 per byte) does not decide it.
const CLASSIFY_RUN: u64 = 16;

/// The 8 bytes write `tag` puts at the aligned device word `word` (byte position / 8).
fn word(tag: u64, word: u64) -> u64 {
    let mut z = tag ^ word.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The byte write `tag` puts at device position `pos`.
pub fn byte_at(tag: u64, pos: u64) -> u8 {
    (word(tag, pos >> 3) >> ((pos & 7) * 8)) as u8
}

/// Fill `buf` with the data of write `tag` for device position `pos` onwards. Whole words are
/// produced at once: this runs for every byte the soak writes, in a slow emulated guest.
pub fn fill(tag: u64, pos: u64, buf: &mut [u8]) {
    let head = (((8 - (pos & 7)) & 7) as usize).min(buf.len());
    let tail_pos = pos + (head + (buf.len() - head) / 8 * 8) as u64;
    let (first, rest) = buf.split_at_mut(head);
    for (k, b) in first.iter_mut().enumerate() {
        *b = byte_at(tag, pos + k as u64);
    }
    let base = pos + head as u64;
    let mut chunks = rest.chunks_exact_mut(8);
    for (k, c) in chunks.by_ref().enumerate() {
        c.copy_from_slice(&word(tag, (base >> 3) + k as u64).to_le_bytes());
    }
    let tail = chunks.into_remainder();
    for (k, b) in tail.iter_mut().enumerate() {
        *b = byte_at(tag, tail_pos + k as u64);
    }
}

/// The index of the first byte of `buf` that is not write `tag`'s data at `pos`.
pub fn mismatch(tag: u64, pos: u64, buf: &[u8]) -> Option<usize> {
    let head = (((8 - (pos & 7)) & 7) as usize).min(buf.len());
    if let Some(k) = (0..head).find(|&k| buf[k] != byte_at(tag, pos + k as u64)) {
        return Some(k);
    }
    let base = pos + head as u64;
    let rest = &buf[head..];
    let mut chunks = rest.chunks_exact(8);
    for (k, c) in chunks.by_ref().enumerate() {
        let want = word(tag, (base >> 3) + k as u64).to_le_bytes();
        if c != want {
            let at = c.iter().zip(want).position(|(a, b)| *a != b).unwrap_or(0);
            return Some(head + 8 * k + at);
        }
    }
    let done = buf.len() - chunks.remainder().len();
    (done..buf.len()).find(|&k| buf[k] != byte_at(tag, pos + k as u64))
}

/// One interval `[start, end)`, keyed by its start in [`Shadow`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seg {
    end: u64,
    /// The acknowledged write whose data the bytes hold, or [`UNKNOWN`].
    tag: u64,
    /// Earlier tags, most recent first ([`UNKNOWN`] for none).
    old: [u64; HISTORY],
}

fn remember(old: [u64; HISTORY], tag: u64) -> [u64; HISTORY] {
    if tag == UNKNOWN || old[0] == tag {
        return old;
    }
    let mut out = [UNKNOWN; HISTORY];
    out[0] = tag;
    out[1..].copy_from_slice(&old[..HISTORY - 1]);
    out
}

/// How a read compared with the shadow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every returned byte of a known range was right (`checked` bytes were known).
    Good {
        /// Bytes compared.
        checked: u64,
    },
    /// The first wrong byte held an earlier write's data.
    Stale(Mismatch),
    /// The first wrong byte held data of no write the shadow remembers there.
    Corrupt(Mismatch),
}

/// Where a read went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Device position of the first wrong byte.
    pub pos: u64,
    /// The byte read.
    pub got: u8,
    /// The byte the last acknowledged write put there.
    pub want: u8,
    /// That write's tag.
    pub tag: u64,
    /// The earlier tag the read matched (stale), else [`UNKNOWN`].
    pub matched_old: u64,
}

/// The shadow of the device region `[lo, hi)`: always a partition of it into intervals.
#[derive(Debug, Clone)]
pub struct Shadow {
    lo: u64,
    hi: u64,
    segs: BTreeMap<u64, Seg>,
}

impl Shadow {
    /// A region whose contents are unknown.
    pub fn new(lo: u64, hi: u64) -> Self {
        let mut segs = BTreeMap::new();
        if hi > lo {
            segs.insert(
                lo,
                Seg {
                    end: hi,
                    tag: UNKNOWN,
                    old: [UNKNOWN; HISTORY],
                },
            );
        }
        Self { lo, hi, segs }
    }

    /// Intervals held (what the shadow costs).
    pub fn intervals(&self) -> usize {
        self.segs.len()
    }

    /// Make `p` an interval boundary.
    fn split(&mut self, p: u64) {
        if p <= self.lo || p >= self.hi || self.segs.contains_key(&p) {
            return;
        }
        let Some((_, seg)) = self.segs.range_mut(..p).next_back() else {
            return;
        };
        let tail = Seg { ..*seg };
        seg.end = p;
        self.segs.insert(p, tail);
    }

    /// Apply `f` to every interval of `[off, off + len)` (clipped to the region), then merge
    /// equal neighbours so that rewrites do not fragment the map for ever.
    fn update(&mut self, off: u64, len: u64, f: impl Fn(&mut Seg)) {
        let a = off.max(self.lo);
        let b = off.saturating_add(len).min(self.hi);
        if a >= b {
            return;
        }
        self.split(a);
        self.split(b);
        for (_, seg) in self.segs.range_mut(a..b) {
            f(seg);
        }
        // Merge from the interval before `a` through the one starting at `b`.
        let from = self.segs.range(..a).next_back().map_or(a, |(s, _)| *s);
        let keys: Vec<u64> = self.segs.range(from..=b).map(|(s, _)| *s).collect();
        let mut prev: Option<u64> = None;
        for k in keys {
            let Some(cur) = self.segs.get(&k).copied() else {
                continue;
            };
            if let Some(p) = prev {
                if let Some(ps) = self.segs.get_mut(&p) {
                    if ps.tag == cur.tag && ps.old == cur.old && ps.end == k {
                        ps.end = cur.end;
                        self.segs.remove(&k);
                        continue;
                    }
                }
            }
            prev = Some(k);
        }
    }

    /// Write `tag` of `[off, off + len)` was acknowledged in full.
    pub fn wrote(&mut self, off: u64, len: u64, tag: u64) {
        self.update(off, len, |s| {
            s.old = remember(s.old, s.tag);
            s.tag = tag;
        });
    }

    /// Write `tag` of `[off, off + len)` failed, was cancelled, came back short or was never
    /// reaped: the range holds old data, new data or a mix until it is rewritten.
    pub fn unknown(&mut self, off: u64, len: u64, tag: u64) {
        self.update(off, len, |s| {
            s.old = remember(remember(s.old, s.tag), tag);
            s.tag = UNKNOWN;
        });
    }

    /// Check the bytes a read of device position `off` returned (`got`: only what it returned).
    pub fn check(&self, off: u64, got: &[u8]) -> Verdict {
        let end = off + got.len() as u64;
        let first = self.segs.range(..=off).next_back().map_or(off, |(s, _)| *s);
        let mut checked = 0;
        for (&start, seg) in self.segs.range(first..end) {
            let a = start.max(off);
            let b = seg.end.min(end);
            if a >= b || seg.tag == UNKNOWN {
                continue;
            }
            let bytes = &got[(a - off) as usize..(b - off) as usize];
            checked += bytes.len() as u64;
            let Some(k) = mismatch(seg.tag, a, bytes) else {
                continue;
            };
            let pos = a + k as u64;
            let run = &bytes[k..bytes.len().min(k + CLASSIFY_RUN as usize)];
            // Stale: every byte of the run is an older write's (or, by chance, the current one's).
            let older = seg.old.iter().copied().find(|&t| {
                t != UNKNOWN
                    && run.iter().enumerate().all(|(i, &g)| {
                        let p = pos + i as u64;
                        g == byte_at(t, p) || g == byte_at(seg.tag, p)
                    })
            });
            let m = Mismatch {
                pos,
                got: bytes[k],
                want: byte_at(seg.tag, pos),
                tag: seg.tag,
                matched_old: older.unwrap_or(UNKNOWN),
            };
            return if older.is_some() {
                Verdict::Stale(m)
            } else {
                Verdict::Corrupt(m)
            };
        }
        Verdict::Good { checked }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(tag: u64, pos: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        fill(tag, pos, &mut v);
        v
    }

    #[test]
    fn fill_matches_byte_at_at_every_alignment() {
        for pos in 0..17u64 {
            for len in [0usize, 1, 7, 8, 9, 23, 64] {
                let v = data(5, pos, len);
                for (k, b) in v.iter().enumerate() {
                    assert_eq!(*b, byte_at(5, pos + k as u64), "pos {pos} len {len} k {k}");
                }
                assert_eq!(mismatch(5, pos, &v), None);
                if len > 0 {
                    let mut w = v.clone();
                    w[len - 1] ^= 1;
                    assert_eq!(mismatch(5, pos, &w), Some(len - 1));
                }
            }
        }
        assert_ne!(data(1, 0, 64), data(2, 0, 64));
        assert_ne!(
            data(1, 0, 64),
            data(1, 8, 64),
            "the position is part of the data"
        );
    }

    #[test]
    fn acknowledged_writes_are_checked_and_unknown_ranges_are_not() {
        let mut s = Shadow::new(1000, 9000);
        assert_eq!(s.check(1000, &[0; 100]), Verdict::Good { checked: 0 });
        s.wrote(1000, 4000, 7);
        assert_eq!(
            s.check(1500, &data(7, 1500, 700)),
            Verdict::Good { checked: 700 }
        );
        s.unknown(2000, 100, 8);
        // 1900..2000 and 2100..2200 known, 2000..2100 unknown: any bytes there pass.
        let mut v = data(7, 1900, 300);
        v[150] ^= 0xff;
        assert_eq!(s.check(1900, &v), Verdict::Good { checked: 200 });
        v[50] ^= 0xff;
        assert!(matches!(s.check(1900, &v), Verdict::Corrupt(m) if m.pos == 1950));
    }

    #[test]
    fn an_older_writes_data_is_a_stale_read() {
        let mut s = Shadow::new(0, 1 << 20);
        s.wrote(4096, 8192, 1);
        s.wrote(4096, 8192, 2);
        assert!(
            matches!(s.check(4096, &data(1, 4096, 8192)), Verdict::Stale(m) if m.matched_old == 1 && m.pos == 4096)
        );
        // A failed write that lands after a later acknowledged one is stale too.
        s.unknown(4096, 100, 3);
        s.wrote(4096, 100, 4);
        assert!(
            matches!(s.check(4096, &data(3, 4096, 100)), Verdict::Stale(m) if m.matched_old == 3)
        );
        assert!(matches!(s.check(4096, &[0; 100]), Verdict::Corrupt(_)));
    }

    #[test]
    fn rewrites_do_not_fragment_the_map_for_ever() {
        let mut s = Shadow::new(0, 1 << 20);
        let mut rng = crate::util::Rng(3);
        for t in 1..2000u64 {
            let off = rng.below(1 << 20);
            let len = 1 + rng.below(1 << 14);
            if t % 7 == 0 {
                s.unknown(off, len, t);
            } else {
                s.wrote(off, len, t);
            }
        }
        // Whole-region rewrites collapse everything once the history agrees.
        for t in 5000..5000 + HISTORY as u64 + 1 {
            s.wrote(0, 1 << 20, t);
        }
        assert_eq!(s.intervals(), 1);
        let keys: Vec<_> = s.segs.iter().map(|(k, v)| (*k, v.end)).collect();
        assert_eq!(keys, vec![(0, 1 << 20)]);
    }

    #[test]
    fn the_partition_stays_contiguous() {
        let mut s = Shadow::new(100, 5000);
        let mut rng = crate::util::Rng(9);
        for t in 1..500u64 {
            let off = rng.below(5200);
            let len = rng.below(900);
            s.wrote(off, len, t);
            let mut at = 100;
            for (k, v) in &s.segs {
                assert_eq!(*k, at);
                assert!(v.end > *k);
                at = v.end;
            }
            assert_eq!(at, 5000);
        }
    }
}
