//! Write atomicity (SPEC 10): jobs whose byte ranges share a 512-byte block of the store and of
//! which at least one is a WRITE run one after the other, in the order they were submitted;
//! every other job starts at once.
//!
//! Backends copy concurrently (pool workers, the kernel's io_uring workers), so without this two
//! overlapping writes could interleave inside a block. The [`RangeLock`] gives each job a
//! [`LockId`] when it is submitted and holds the job back until every earlier job it conflicts
//! with has been released. Ranges are widened to whole [`ALIGNMENT`] blocks, so two jobs that
//! touch different bytes of one block are still ordered: a block is always written whole by
//! one job at a time, whatever mix of direct and buffered I/O reaches it.
//!
//! The store's byte range is kept as disjoint *segments* (a `BTreeMap` keyed by first block),
//! split at every live job's boundaries, so every live job covers each segment of its range
//! whole. A segment remembers only what a new job has to wait for on it, its *top*:
//!
//! - `Write(w)`: the last write submitted on it. A later job waits for `w` alone, because `w`
//!   itself waited for everything before it.
//! - `Read(g)`: a *group* of reads submitted since the last write. A later read joins the group
//!   (reads do not wait for reads) and waits for the group's write below; a later write waits
//!   for the group to empty and *seals* it, so that reads arriving after that write are not
//!   added to what it waits for (no starvation of writes by a stream of reads).
//!
//! A split copies a segment's top, so a group may be shared by several segments. When a write
//! replaced the top of one of them, the others still show the sealed group; a read there starts
//! a new group stacked on it (`prev`), and a later write on that segment waits for the whole
//! stack of groups down to the write below. The price of sharing a group instead of copying
//! its members: a write may also wait for a read that joined the group on a neighbouring
//! segment before the write arrived (an earlier job, already running, so still no starvation).
//!
//! Costs: `acquire` and `release` take O(log n + s) map operations, where s is the number of
//! segments in the job's range (at most its number of blocks, and at most about twice the
//! number of live jobs overlapping it), plus the stacked groups walked by a write. Many reads
//! of one block share one group: each costs O(log n), not O(n).
//!
//! Dependencies only ever point from a job to jobs submitted before it, so the order is
//! acyclic: no deadlock, and every job eventually starts once the earlier ones complete.

use std::collections::{BTreeMap, HashMap};

use super::ALIGNMENT;

/// A job known to a [`RangeLock`], from `acquire` until `release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockId(u64);

/// What a new job must wait for on a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Top {
    /// The last write submitted on the segment (finished if it is no longer in `jobs`).
    Write(u64),
    /// The group of reads submitted since then.
    Read(u64),
}

#[derive(Debug)]
struct Segment {
    /// One past the last block.
    end: u64,
    top: Option<Top>,
    /// Live jobs covering the segment: it is dropped when none is left.
    cover: usize,
}

#[derive(Debug)]
struct Group {
    /// Reads of the group not yet released.
    live: usize,
    /// A write waits for the group: no more reads may join it.
    sealed: bool,
    /// Writes waiting for the group to empty.
    waiters: Vec<u64>,
    /// The sealed group this one is stacked on (its reads still cover the segment).
    prev: Option<u64>,
    /// The write below the stack, which every read of the stack waits for.
    writer: Option<u64>,
    /// Segments whose top is this group, and groups stacked on it.
    refs: usize,
}

#[derive(Debug)]
struct Entry<T> {
    /// Blocks `start..end`.
    start: u64,
    end: u64,
    /// Earlier jobs (or groups) still to be released before this one may start.
    deps: usize,
    /// The job while it is held back.
    item: Option<T>,
    /// Jobs that wait for this write.
    dependents: Vec<u64>,
    /// Groups this read belongs to (a group joined on two segments is listed twice).
    groups: Vec<u64>,
}

/// Orders jobs whose block ranges overlap when one of them writes (module documentation).
#[derive(Debug)]
pub struct RangeLock<T> {
    segments: BTreeMap<u64, Segment>,
    jobs: HashMap<u64, Entry<T>>,
    groups: HashMap<u64, Group>,
    next_job: u64,
    next_group: u64,
    held: usize,
}

impl<T> Default for RangeLock<T> {
    fn default() -> Self {
        RangeLock {
            segments: BTreeMap::new(),
            jobs: HashMap::new(),
            groups: HashMap::new(),
            next_job: 0,
            next_group: 0,
            held: 0,
        }
    }
}

/// The blocks `[start, end)` that bytes `[offset, offset + len)` touch.
fn blocks(offset: u64, len: u64) -> (u64, u64) {
    let align = u64::from(ALIGNMENT);
    let start = offset / align;
    let end = offset.saturating_add(len).div_ceil(align);
    (start, end.max(start))
}

impl<T> RangeLock<T> {
    /// An empty lock.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a job over bytes `[offset, offset + len)`. Returns it with its id when it may
    /// start at once; otherwise keeps it until a `release` hands it back.
    pub fn acquire(&mut self, offset: u64, len: u64, write: bool, item: T) -> Option<(LockId, T)> {
        let (start, end) = blocks(offset, len);
        let id = self.next_job;
        self.next_job += 1;
        self.jobs.insert(
            id,
            Entry {
                start,
                end,
                deps: 0,
                item: None,
                dependents: Vec::new(),
                groups: Vec::new(),
            },
        );
        if start < end {
            self.split(start);
            self.split(end);
            let mut pieces = Vec::new();
            let mut gaps = Vec::new();
            let mut pos = start;
            for (&s, seg) in self.segments.range(start..end) {
                if s > pos {
                    gaps.push((pos, s));
                }
                pieces.push(s);
                pos = seg.end;
            }
            if pos < end {
                gaps.push((pos, end));
            }
            for (s, e) in gaps {
                self.segments.insert(
                    s,
                    Segment {
                        end: e,
                        top: None,
                        cover: 0,
                    },
                );
                pieces.push(s);
            }
            for s in pieces {
                if write {
                    self.write_piece(id, s);
                } else {
                    self.read_piece(id, s);
                }
            }
        }
        match self.jobs.get_mut(&id) {
            Some(entry) if entry.deps > 0 => {
                entry.item = Some(item);
                self.held += 1;
                None
            }
            _ => Some((LockId(id), item)),
        }
    }

    /// The job `id` is done (or was refused): appends the jobs that may start now to `ready`.
    pub fn release(&mut self, id: LockId, ready: &mut Vec<(LockId, T)>) {
        let Some(entry) = self.jobs.remove(&id.0) else {
            return;
        };
        if entry.item.is_some() {
            self.held -= 1;
        }
        for d in entry.dependents {
            self.satisfy(d, ready);
        }
        for g in entry.groups {
            let Some(group) = self.groups.get_mut(&g) else {
                continue;
            };
            group.live = group.live.saturating_sub(1);
            if group.live > 0 {
                continue;
            }
            let waiters = std::mem::take(&mut group.waiters);
            if group.refs == 0 {
                let prev = group.prev;
                self.groups.remove(&g);
                self.unref(prev.map(Top::Read));
            }
            for w in waiters {
                self.satisfy(w, ready);
            }
        }
        let pieces: Vec<u64> = self
            .segments
            .range(entry.start..entry.end)
            .map(|(&s, _)| s)
            .collect();
        for s in pieces {
            let Some(seg) = self.segments.get_mut(&s) else {
                continue;
            };
            seg.cover = seg.cover.saturating_sub(1);
            if seg.cover == 0 {
                let top = seg.top;
                self.segments.remove(&s);
                self.unref(top);
            }
        }
    }

    /// Empties the lock, returning the jobs it still held back (at shutdown: they never start).
    pub fn take_held(&mut self) -> Vec<T> {
        let held = self.jobs.drain().filter_map(|(_, e)| e.item).collect();
        *self = Self::default();
        held
    }

    /// Jobs held back, waiting for an earlier conflicting one.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Whether no job is registered (and no bookkeeping is left over).
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.segments.is_empty() && self.groups.is_empty()
    }

    /// Makes `at` a segment boundary.
    fn split(&mut self, at: u64) {
        let Some((_, seg)) = self.segments.range_mut(..at).next_back() else {
            return;
        };
        if seg.end <= at {
            return;
        }
        let tail = Segment {
            end: seg.end,
            top: seg.top,
            cover: seg.cover,
        };
        seg.end = at;
        self.add_ref(tail.top);
        self.segments.insert(at, tail);
    }

    fn add_ref(&mut self, top: Option<Top>) {
        if let Some(Top::Read(g)) = top {
            if let Some(group) = self.groups.get_mut(&g) {
                group.refs += 1;
            }
        }
    }

    /// Drops one reference to `top`, freeing groups nothing refers to any more.
    fn unref(&mut self, mut top: Option<Top>) {
        while let Some(Top::Read(g)) = top {
            let Some(group) = self.groups.get_mut(&g) else {
                return;
            };
            group.refs = group.refs.saturating_sub(1);
            if group.refs > 0 || group.live > 0 {
                return;
            }
            top = group.prev.map(Top::Read);
            self.groups.remove(&g);
        }
    }

    /// Job `id` waits for write `w`, unless `w` is done or already counted.
    fn wait_for_write(&mut self, id: u64, w: u64) {
        let Some(writer) = self.jobs.get_mut(&w) else {
            return;
        };
        // `id`'s pieces are processed one after the other, so a repeat is always the last entry.
        if writer.dependents.last() == Some(&id) {
            return;
        }
        writer.dependents.push(id);
        if let Some(entry) = self.jobs.get_mut(&id) {
            entry.deps += 1;
        }
    }

    fn write_piece(&mut self, id: u64, s: u64) {
        let Some(seg) = self.segments.get_mut(&s) else {
            return;
        };
        seg.cover += 1;
        let old = seg.top.replace(Top::Write(id));
        match old {
            None => {}
            Some(Top::Write(w)) => self.wait_for_write(id, w),
            Some(Top::Read(g)) => {
                let mut deps = 0;
                let mut writer = None;
                let mut next = Some(g);
                while let Some(gid) = next {
                    let Some(group) = self.groups.get_mut(&gid) else {
                        break;
                    };
                    writer = group.writer;
                    if group.live > 0 {
                        group.sealed = true;
                        if group.waiters.last() != Some(&id) {
                            group.waiters.push(id);
                            deps += 1;
                        }
                    }
                    next = group.prev;
                }
                if let Some(entry) = self.jobs.get_mut(&id) {
                    entry.deps += deps;
                }
                // Redundant while a group below is live (its reads wait for this write), but
                // those reads may already be done.
                if let Some(w) = writer {
                    self.wait_for_write(id, w);
                }
                self.unref(old);
            }
        }
    }

    fn read_piece(&mut self, id: u64, s: u64) {
        let Some(seg) = self.segments.get_mut(&s) else {
            return;
        };
        seg.cover += 1;
        let top = seg.top;
        let (group, writer) = match top {
            Some(Top::Read(g)) => match self.groups.get(&g) {
                Some(group) if !group.sealed => (g, group.writer),
                Some(group) => {
                    // A write on a neighbouring segment sealed the group: start a new one on
                    // top of it, skipping sealed groups that have emptied (they stay empty).
                    let writer = group.writer;
                    let mut below = Some(g);
                    while let Some(b) = below {
                        match self.groups.get(&b) {
                            Some(gb) if gb.live == 0 => below = gb.prev,
                            Some(_) => break,
                            None => below = None,
                        }
                    }
                    self.add_ref(below.map(Top::Read));
                    let new = self.new_group(s, writer, below);
                    self.unref(top);
                    (new, writer)
                }
                None => (self.new_group(s, None, None), None),
            },
            Some(Top::Write(w)) => (self.new_group(s, Some(w), None), Some(w)),
            None => (self.new_group(s, None, None), None),
        };
        if let Some(g) = self.groups.get_mut(&group) {
            g.live += 1;
        }
        if let Some(entry) = self.jobs.get_mut(&id) {
            entry.groups.push(group);
        }
        if let Some(w) = writer {
            self.wait_for_write(id, w);
        }
    }

    /// A new group becomes the top of segment `s` (which holds its one reference).
    fn new_group(&mut self, s: u64, writer: Option<u64>, prev: Option<u64>) -> u64 {
        let g = self.next_group;
        self.next_group += 1;
        self.groups.insert(
            g,
            Group {
                live: 0,
                sealed: false,
                waiters: Vec::new(),
                prev,
                writer,
                refs: 1,
            },
        );
        if let Some(seg) = self.segments.get_mut(&s) {
            seg.top = Some(Top::Read(g));
        }
        g
    }

    /// One of `d`'s dependencies was released.
    fn satisfy(&mut self, d: u64, ready: &mut Vec<(LockId, T)>) {
        let Some(entry) = self.jobs.get_mut(&d) else {
            return;
        };
        entry.deps = entry.deps.saturating_sub(1);
        if entry.deps == 0 {
            if let Some(item) = entry.item.take() {
                self.held -= 1;
                ready.push((LockId(d), item));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::testing::Rng;

    const B: u64 = ALIGNMENT as u64;

    fn ready_ids(ready: &[(LockId, u32)]) -> Vec<u32> {
        let mut v: Vec<u32> = ready.iter().map(|(_, t)| *t).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn disjoint_jobs_and_overlapping_reads_start_at_once() {
        let mut l = RangeLock::new();
        assert!(l.acquire(0, B, true, 1).is_some());
        assert!(l.acquire(B, B, true, 2).is_some());
        assert!(l.acquire(8 * B, 4 * B, false, 3).is_some());
        assert!(l.acquire(9 * B, B, false, 4).is_some());
        assert!(l.acquire(8 * B, 8 * B, false, 5).is_some());
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn a_write_waits_for_earlier_overlaps_and_later_jobs_wait_for_it() {
        let mut l = RangeLock::new();
        let (r1, _) = l.acquire(0, 4 * B, false, 1).unwrap();
        let (r2, _) = l.acquire(2 * B, 4 * B, false, 2).unwrap();
        // Overlaps both reads.
        assert!(l.acquire(3 * B, B, true, 3).is_none());
        // A read after the write waits for it, even though it only overlaps reads otherwise.
        assert!(l.acquire(3 * B, 2, false, 4).is_none());
        // Overlaps only r2 (block 4): reads never wait for reads.
        assert!(l.acquire(4 * B, B, false, 5).is_some());
        // Same block as the write, different bytes: still ordered.
        assert!(l.acquire(3 * B + 100, 10, true, 6).is_none());
        let mut ready = Vec::new();
        l.release(r1, &mut ready);
        assert!(ready.is_empty());
        l.release(r2, &mut ready);
        assert_eq!(ready_ids(&ready), vec![3]);
        let (w3, _) = ready.pop().unwrap();
        l.release(w3, &mut ready);
        assert_eq!(ready_ids(&ready), vec![4]);
        let (r4, _) = ready.pop().unwrap();
        l.release(r4, &mut ready);
        assert_eq!(ready_ids(&ready), vec![6]);
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn a_conflict_does_not_hold_back_unrelated_jobs() {
        let mut l = RangeLock::new();
        let (w1, _) = l.acquire(0, 64 * B, true, 1).unwrap();
        assert!(l.acquire(10 * B, B, true, 2).is_none());
        assert!(l.acquire(10 * B, B, false, 3).is_none());
        assert!(l.acquire(64 * B, B, true, 4).is_some());
        assert!(l.acquire(1000 * B, 2048 * B, false, 5).is_some());
        let mut ready = Vec::new();
        l.release(w1, &mut ready);
        assert_eq!(ready_ids(&ready), vec![2]);
    }

    #[test]
    fn a_read_next_to_a_sealed_group_does_not_wait_for_the_sealing_write() {
        let mut l = RangeLock::new();
        let (r1, _) = l.acquire(0, 10 * B, false, 1).unwrap();
        assert!(l.acquire(0, 5 * B, true, 2).is_none());
        // Blocks 5..10 share r1's sealed group; this read does not overlap the write.
        let (r3, _) = l.acquire(5 * B, 5 * B, false, 3).unwrap();
        // This write overlaps r1 and r3 (through the stacked group).
        assert!(l.acquire(5 * B, 5 * B, true, 4).is_none());
        let mut ready = Vec::new();
        l.release(r3, &mut ready);
        assert!(ready.is_empty());
        l.release(r1, &mut ready);
        assert_eq!(ready_ids(&ready), vec![2, 4]);
        for (id, _) in std::mem::take(&mut ready) {
            l.release(id, &mut ready);
        }
        assert!(ready.is_empty());
        assert!(l.is_empty());
    }

    #[test]
    fn many_reads_of_one_block_share_one_group() {
        let mut l = RangeLock::new();
        let ids: Vec<LockId> = (0..100_000)
            .map(|i| l.acquire(0, B, false, i).unwrap().0)
            .collect();
        assert_eq!(l.groups.len(), 1);
        assert!(l.acquire(0, B, true, u32::MAX).is_none());
        let mut ready = Vec::new();
        for id in ids {
            assert!(ready.is_empty());
            l.release(id, &mut ready);
        }
        assert_eq!(ready_ids(&ready), vec![u32::MAX]);
        l.release(ready[0].0, &mut Vec::new());
        assert!(l.is_empty());
    }

    #[test]
    fn take_held_empties_the_lock() {
        let mut l = RangeLock::new();
        let _ = l.acquire(0, B, true, 1).unwrap();
        assert!(l.acquire(0, B, true, 2).is_none());
        assert!(l.acquire(0, B, false, 3).is_none());
        let mut held = l.take_held();
        held.sort_unstable();
        assert_eq!(held, vec![2, 3]);
        assert!(l.is_empty());
        assert_eq!(l.held(), 0);
    }

    #[derive(Debug, Clone, Copy)]
    struct Model {
        seq: u32,
        start: u64,
        end: u64,
        write: bool,
    }

    fn conflict(a: &Model, b: &Model) -> bool {
        a.start < b.end && b.start < a.end && (a.write || b.write)
    }

    fn overlap(a: &Model, b: &Model) -> bool {
        a.start < b.end && b.start < a.end
    }

    /// Random jobs over a small store, released in random order, checked against the rules:
    /// a job starts only when no earlier live job conflicts with it (so conflicting jobs run in
    /// submission order and never together), a job overlapping no earlier live job starts at
    /// once, nothing is left held once everything before it is released, and no bookkeeping
    /// leaks.
    #[test]
    fn random_jobs_follow_the_rules() {
        for seed in 1..40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut l = RangeLock::new();
            let mut live: Vec<Model> = Vec::new();
            let mut running: Vec<(LockId, Model)> = Vec::new();
            let mut seq = 0u32;
            let check_start = |m: &Model, live: &[Model]| {
                for o in live {
                    assert!(
                        o.seq >= m.seq || !conflict(o, m),
                        "seed {seed}: job {m:?} started before {o:?}"
                    );
                }
            };
            for _ in 0..3000 {
                if running.is_empty() || rng.below(100) < 55 {
                    let start = rng.below(64);
                    let max = if rng.below(4) == 0 { 32 } else { 4 };
                    let len = 1 + rng.below(max);
                    // Anywhere inside the first and last blocks (a + b < B keeps it non-empty).
                    let byte_start = start * B + rng.below(B / 2);
                    let byte_len = (start + len) * B - byte_start - rng.below(B / 2);
                    let m = Model {
                        seq,
                        start,
                        end: start + len,
                        write: rng.below(3) == 0,
                    };
                    seq += 1;
                    let free = !live.iter().any(|o| overlap(o, &m));
                    live.push(m);
                    match l.acquire(byte_start, byte_len, m.write, m) {
                        Some((id, m)) => {
                            check_start(&m, &live);
                            running.push((id, m));
                        }
                        None => assert!(!free, "seed {seed}: {m:?} held for nothing"),
                    }
                } else {
                    let i = rng.below(running.len() as u64) as usize;
                    let (id, m) = running.swap_remove(i);
                    live.retain(|o| o.seq != m.seq);
                    let mut ready = Vec::new();
                    l.release(id, &mut ready);
                    for (id, m) in ready {
                        check_start(&m, &live);
                        running.push((id, m));
                    }
                }
                assert_eq!(l.held() + running.len(), live.len(), "seed {seed}");
            }
            while let Some((id, m)) = running.pop() {
                live.retain(|o| o.seq != m.seq);
                let mut ready = Vec::new();
                l.release(id, &mut ready);
                for (id, m) in ready {
                    check_start(&m, &live);
                    running.push((id, m));
                }
            }
            assert!(
                live.is_empty(),
                "seed {seed}: {} jobs never started",
                live.len()
            );
            assert!(l.is_empty(), "seed {seed}: bookkeeping left over");
        }
    }
}
