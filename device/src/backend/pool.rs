//! A pool of worker threads executing jobs against a [`Store`] concurrently, so that jobs
//! complete out of order (a small job taken by an idle worker overtakes a big one).
//!
//! The device thread registers each READ/WRITE with the pool's [`RangeLock`] (write atomicity,
//! SPEC 10) and sends it through a channel once nothing it conflicts with is in flight; each
//! worker takes the next one, asks the [`DmaGate`] whether it may still start (a job of an
//! older reset epoch, or submitted before the guest last cleared Bus Master Enable, completes
//! with [`JOB_CANCELED`] without touching guest memory), executes it against guest memory and the
//! store, decrements the shared in-flight counter (it no longer touches guest memory), releases
//! its range (sending the jobs that waited for it), sends the completion back and writes the
//! notifier eventfd.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use log::{debug, error};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::range::{LockId, RangeLock};
use super::{Backend, BackendError, Completion, DmaGate, GateTicket, Job, JobOp, JOB_CANCELED};
use crate::request::Segment;

/// Something the pool's workers read from, write to and flush, from several threads at once.
pub trait Store: Send + Sync + 'static {
    /// Size in bytes.
    fn capacity(&self) -> u64;
    /// Copies `[offset, offset + total)` of the store into the guest `segments`.
    fn read(&self, offset: u64, mem: &GuestMemoryMmap, segments: &[Segment]) -> io::Result<()>;
    /// Copies the guest `segments` into the store at `offset`.
    fn write(&self, offset: u64, mem: &GuestMemoryMmap, segments: &[Segment]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Flips the bits at `bits` (bit positions counted from `offset`) in the store: a
    /// `corrupt` fault on a WRITE, after the write.
    fn flip_bits(&self, offset: u64, bits: &[u64]) -> io::Result<()> {
        let _ = (offset, bits);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// The pool's own reference to its store.
struct StoreHandle(Arc<dyn Store>);

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// Runs a job against a store.
pub fn execute<S: Store + ?Sized>(store: &S, mem: &GuestMemoryMmap, job: &Job) -> io::Result<()> {
    match job.op {
        JobOp::Read => store.read(job.offset, mem, &job.segments),
        JobOp::Write => store.write(job.offset, mem, &job.segments),
        JobOp::Flush => store.flush(),
    }
}

/// What travels to the workers.
#[derive(Debug)]
enum Msg {
    /// Run a job (holding its range, if it has one).
    Run(Option<LockId>, Queued),
    /// One worker exits.
    Stop,
}

/// A job and what it was submitted under.
type Queued = (Job, GateTicket);

type Order = Arc<Mutex<RangeLock<Queued>>>;

fn lock_order(order: &Order) -> MutexGuard<'_, RangeLock<Queued>> {
    // The lock's state stays consistent across a panic elsewhere (none of its methods panic).
    order.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The worker pool, a [`Backend`].
#[derive(Debug)]
pub struct Pool {
    name: &'static str,
    capacity: u64,
    /// For changes outside a job (a `corrupt` fault).
    store: StoreHandle,
    jobs: Sender<Msg>,
    /// Kept so that jobs nobody will run can be counted out at drop.
    jobs_rx: Arc<Mutex<Receiver<Msg>>>,
    order: Order,
    gate: Arc<DmaGate>,
    done: Receiver<Completion>,
    notifier: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
    inflight: Arc<AtomicU64>,
}

impl Pool {
    /// Starts `workers` (at least one) threads serving `store`; `gate` says whether a job may
    /// still start.
    pub fn new<S: Store>(
        name: &'static str,
        store: S,
        mem: GuestMemoryMmap,
        workers: usize,
        inflight: Arc<AtomicU64>,
        gate: Arc<DmaGate>,
    ) -> Result<Pool, BackendError> {
        let notifier = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(BackendError::EventFd)?);
        let capacity = store.capacity();
        let store = Arc::new(store);
        let shared_store: Arc<dyn Store> = store.clone();
        let (jobs_tx, jobs_rx) = mpsc::channel::<Msg>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let (done_tx, done_rx) = mpsc::channel::<Completion>();
        let order: Order = Arc::new(Mutex::new(RangeLock::new()));
        let mut pool = Pool {
            name,
            capacity,
            store: StoreHandle(shared_store),
            jobs: jobs_tx.clone(),
            jobs_rx: jobs_rx.clone(),
            order: order.clone(),
            gate: gate.clone(),
            done: done_rx,
            notifier: notifier.clone(),
            threads: Vec::new(),
            inflight: inflight.clone(),
        };
        for i in 0..workers.max(1) {
            let worker = Worker {
                store: store.clone(),
                mem: mem.clone(),
                jobs: jobs_rx.clone(),
                requeue: jobs_tx.clone(),
                order: order.clone(),
                gate: gate.clone(),
                done: done_tx.clone(),
                notifier: notifier.clone(),
                inflight: inflight.clone(),
            };
            // Spawned by the device thread: its engine's hook, run first in the worker.
            let hook = crate::engine::thread_hook();
            let handle = std::thread::Builder::new()
                .name(format!("aiodma-{name}-{i}"))
                .spawn(move || {
                    if let Some(hook) = hook {
                        (hook.0)(crate::engine::ThreadRole::BackendWorker);
                    }
                    worker.run()
                })
                .map_err(BackendError::Thread)?;
            // On an early return `pool` is dropped, which stops the workers started so far.
            pool.threads.push(handle);
        }
        Ok(pool)
    }
}

struct Worker<S> {
    store: Arc<S>,
    mem: GuestMemoryMmap,
    jobs: Arc<Mutex<Receiver<Msg>>>,
    /// Where jobs released by this worker's completions go.
    requeue: Sender<Msg>,
    order: Order,
    gate: Arc<DmaGate>,
    done: Sender<Completion>,
    notifier: Arc<EventFd>,
    inflight: Arc<AtomicU64>,
}

impl<S: Store> Worker<S> {
    fn run(self) {
        let mut ready = Vec::new();
        loop {
            let next = {
                let rx = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
                rx.recv()
            };
            let Ok(Msg::Run(lock, (job, ticket))) = next else {
                // Stop, or the pool is gone.
                return;
            };
            // Asked right before the first guest-memory access: a refused job costs no copy,
            // so a reset with thousands of queued jobs completes within one job's time.
            let result = if self.gate.admits(ticket) {
                execute(&*self.store, &self.mem, &job)
            } else {
                Err(io::Error::from_raw_os_error(JOB_CANCELED))
            };
            if let Err(e) = &result {
                debug!("backend job {} ({:?}) failed: {e}", job.token, job.op);
            }
            // From here on this job never touches guest memory again.
            self.inflight.fetch_sub(1, Ordering::Release);
            if let Some(id) = lock {
                lock_order(&self.order).release(id, &mut ready);
                for (id, queued) in ready.drain(..) {
                    // Cannot fail: the pool keeps a receiver until every worker has exited.
                    let _ = self.requeue.send(Msg::Run(Some(id), queued));
                }
            }
            if self
                .done
                .send(Completion {
                    token: job.token,
                    result,
                })
                .is_err()
            {
                return;
            }
            if let Err(e) = self.notifier.write(1) {
                error!("backend worker: cannot signal a completion: {e}");
            }
        }
    }
}

impl Backend for Pool {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    fn submit(&mut self, job: Job) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        let ticket = self.gate.ticket(job.epoch);
        let msg = match job.op {
            JobOp::Read | JobOp::Write => {
                let (offset, len, write) = (job.offset, job.len(), job.op == JobOp::Write);
                match lock_order(&self.order).acquire(offset, len, write, (job, ticket)) {
                    Some((id, queued)) => Msg::Run(Some(id), queued),
                    // Sent by the worker that completes the last conflicting job.
                    None => return,
                }
            }
            JobOp::Flush => Msg::Run(None, (job, ticket)),
        };
        // Cannot fail: the pool itself holds a receiver.
        let _ = self.jobs.send(msg);
    }

    fn flip_stored_bits(&mut self, offset: u64, bits: &[u64]) -> io::Result<()> {
        self.store.0.flip_bits(offset, bits)
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        // Non-blocking: clears the counter, or fails with EAGAIN when it is already clear.
        let _ = self.notifier.read();
        out.extend(self.done.try_iter());
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Queued jobs run (or are refused) before the stop messages; each worker exits at its
        // first one.
        for _ in &self.threads {
            let _ = self.jobs.send(Msg::Stop);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Jobs released after the stop messages, and jobs still waiting for a conflicting one,
        // never start: they no longer count as touching guest memory.
        let mut never_started = 0u64;
        {
            let rx = self.jobs_rx.lock().unwrap_or_else(PoisonError::into_inner);
            while let Ok(msg) = rx.try_recv() {
                if let Msg::Run(..) = msg {
                    never_started += 1;
                }
            }
        }
        never_started += lock_order(&self.order).take_held().len() as u64;
        self.inflight.fetch_sub(never_started, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::SyncSender;
    use std::time::{Duration, Instant};
    use vm_memory::GuestAddress;

    /// A store whose transfers at offset 0 block until the test lets them go.
    struct GatedStore {
        gate: Mutex<Receiver<()>>,
        transfers: AtomicU64,
    }

    impl GatedStore {
        fn transfer(&self, offset: u64) -> io::Result<()> {
            self.transfers.fetch_add(1, Ordering::AcqRel);
            if offset == 0 {
                let _ = self.gate.lock().unwrap().recv();
            }
            Ok(())
        }
    }

    impl Store for Arc<GatedStore> {
        fn capacity(&self) -> u64 {
            1 << 30
        }
        fn read(&self, offset: u64, _: &GuestMemoryMmap, _: &[Segment]) -> io::Result<()> {
            self.transfer(offset)
        }
        fn write(&self, offset: u64, _: &GuestMemoryMmap, _: &[Segment]) -> io::Result<()> {
            self.transfer(offset)
        }
        fn flush(&self) -> io::Result<()> {
            Err(io::Error::other("flush fails"))
        }
    }

    fn job(token: u64, op: JobOp, offset: u64) -> Job {
        Job {
            token,
            epoch: 0,
            op,
            offset,
            segments: vec![Segment {
                addr: GuestAddress(0),
                len: 512,
            }],
        }
    }

    fn wait_for(pool: &mut Pool, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.len() < n && Instant::now() < deadline {
            pool.reap(&mut out);
            std::thread::sleep(Duration::from_millis(1));
        }
        out
    }

    struct Gated {
        pool: Pool,
        release: SyncSender<()>,
        inflight: Arc<AtomicU64>,
        gate: Arc<DmaGate>,
        store: Arc<GatedStore>,
    }

    fn gated_pool(workers: usize) -> Gated {
        let (tx, rx) = mpsc::sync_channel(16);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let inflight = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(DmaGate::default());
        let store = Arc::new(GatedStore {
            gate: Mutex::new(rx),
            transfers: AtomicU64::new(0),
        });
        let pool = Pool::new(
            "test",
            store.clone(),
            mem,
            workers,
            inflight.clone(),
            gate.clone(),
        )
        .unwrap();
        Gated {
            pool,
            release: tx,
            inflight,
            gate,
            store,
        }
    }

    fn is_canceled(c: &Completion) -> bool {
        matches!(&c.result, Err(e) if e.raw_os_error() == Some(JOB_CANCELED))
    }

    #[test]
    fn inflight_counts_until_the_store_returns() {
        let mut g = gated_pool(2);
        g.pool.submit(job(1, JobOp::Read, 0));
        g.pool.submit(job(2, JobOp::Write, 4096));
        // The write completes while the read is still blocked in the store.
        let done = wait_for(&mut g.pool, 1);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].token, 2);
        assert_eq!(g.inflight.load(Ordering::Acquire), 1);
        g.release.send(()).unwrap();
        let done = wait_for(&mut g.pool, 1);
        assert_eq!(done[0].token, 1);
        assert!(done[0].result.is_ok());
        assert_eq!(g.inflight.load(Ordering::Acquire), 0);
    }

    #[test]
    fn errors_are_reported_and_drop_joins_workers() {
        let mut g = gated_pool(1);
        g.pool.submit(job(7, JobOp::Flush, 0));
        let done = wait_for(&mut g.pool, 1);
        assert!(done[0].result.is_err());
        assert_eq!(g.pool.capacity(), 1 << 30);
        assert_eq!(g.pool.name(), "test");
        // A job still blocked at drop time: drop waits for it.
        g.pool.submit(job(8, JobOp::Read, 0));
        g.release.send(()).unwrap();
        drop(g.pool);
        assert_eq!(g.inflight.load(Ordering::Acquire), 0);
    }

    /// A worker busy with a job; thousands queued behind it, some held back by a conflict with
    /// it; then `stop` closes the gate. Every job not yet started completes with ECANCELED
    /// without reaching the store, quickly, and the in-flight count drops to 0.
    fn queued_jobs_are_refused(stop: impl FnOnce(&DmaGate)) {
        let mut g = gated_pool(1);
        g.pool.submit(job(0, JobOp::Write, 0));
        let n = 5000u64;
        for t in 1..=n {
            // Every tenth overlaps the blocked write: held in the range lock.
            let offset = if t % 10 == 0 { 0 } else { t * 4096 };
            g.pool.submit(job(t, JobOp::Read, offset));
        }
        // The worker is inside job 0.
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.store.transfers.load(Ordering::Acquire) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        stop(&g.gate);
        let start = Instant::now();
        g.release.send(()).unwrap();
        let done = wait_for(&mut g.pool, n as usize + 1);
        let took = start.elapsed();
        assert_eq!(done.len() as u64, n + 1);
        for c in &done {
            if c.token == 0 {
                assert!(c.result.is_ok(), "the job already copying finishes");
            } else {
                assert!(is_canceled(c), "job {}: {:?}", c.token, c.result);
            }
        }
        assert_eq!(g.store.transfers.load(Ordering::Acquire), 1);
        assert_eq!(g.inflight.load(Ordering::Acquire), 0);
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    #[test]
    fn a_reset_refuses_queued_jobs() {
        queued_jobs_are_refused(|gate| gate.set_epoch(1));
    }

    #[test]
    fn clearing_bus_master_refuses_queued_jobs() {
        queued_jobs_are_refused(|gate| gate.set_bus_master(false));
    }

    #[test]
    fn bus_master_cleared_and_set_again_still_refuses_queued_jobs() {
        queued_jobs_are_refused(|gate| {
            gate.set_bus_master(false);
            gate.set_bus_master(true);
        });
    }

    #[test]
    fn jobs_of_the_current_epoch_still_run() {
        let mut g = gated_pool(2);
        g.gate.set_epoch(3);
        let mut j = job(1, JobOp::Read, 4096);
        j.epoch = 3;
        g.pool.submit(j);
        g.pool.submit(job(2, JobOp::Read, 8192));
        let mut done = wait_for(&mut g.pool, 2);
        done.sort_by_key(|c| c.token);
        assert!(done[0].result.is_ok());
        assert!(is_canceled(&done[1]));
        assert_eq!(g.store.transfers.load(Ordering::Acquire), 1);
    }

    #[test]
    fn a_conflict_holds_back_only_the_overlapping_job() {
        let mut g = gated_pool(2);
        g.pool.submit(job(1, JobOp::Write, 0));
        // Overlaps the blocked write: waits for it, although a worker is idle.
        g.pool.submit(job(2, JobOp::Read, 0));
        // Unrelated: completes while the write is blocked.
        g.pool.submit(job(3, JobOp::Write, 512));
        let done = wait_for(&mut g.pool, 1);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].token, 3);
        std::thread::sleep(Duration::from_millis(50));
        let mut more = Vec::new();
        g.pool.reap(&mut more);
        assert!(more.is_empty(), "{more:?}");
        assert_eq!(g.store.transfers.load(Ordering::Acquire), 2);
        // The read starts only once the write is done (and then blocks in the store too).
        g.release.send(()).unwrap();
        let done = wait_for(&mut g.pool, 1);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].token, 1);
        g.release.send(()).unwrap();
        let done = wait_for(&mut g.pool, 1);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].token, 2);
        assert_eq!(g.store.transfers.load(Ordering::Acquire), 3);
        assert_eq!(g.inflight.load(Ordering::Acquire), 0);
    }

    #[test]
    fn drop_counts_out_jobs_that_never_start() {
        let mut g = gated_pool(1);
        g.pool.submit(job(1, JobOp::Write, 0));
        for t in 2..100 {
            g.pool.submit(job(t, JobOp::Write, 0));
        }
        let release = g.release.clone();
        let unblock = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            // One per job that reaches the store; the rest never start.
            for _ in 0..100 {
                if release.send(()).is_err() {
                    break;
                }
            }
        });
        drop(g.pool);
        assert_eq!(g.inflight.load(Ordering::Acquire), 0);
        drop(g.release);
        drop(g.store);
        let _ = unblock.join();
    }
}
