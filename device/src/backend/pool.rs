//! A pool of worker threads executing jobs against a [`Store`] concurrently, so that jobs
//! complete out of order (a small job taken by an idle worker overtakes a big one).
//!
//! The device thread sends jobs through a channel; each worker takes the next one, executes it
//! against guest memory and the store, decrements the shared in-flight counter (it no longer
//! touches guest memory), sends the completion back and writes the notifier eventfd.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use log::{debug, error};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Backend, BackendError, Completion, Job, JobOp};
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
}

/// Runs a job against a store.
pub fn execute<S: Store + ?Sized>(store: &S, mem: &GuestMemoryMmap, job: &Job) -> io::Result<()> {
    match job.op {
        JobOp::Read => store.read(job.offset, mem, &job.segments),
        JobOp::Write => store.write(job.offset, mem, &job.segments),
        JobOp::Flush => store.flush(),
    }
}

/// The worker pool, a [`Backend`].
#[derive(Debug)]
pub struct Pool {
    name: &'static str,
    capacity: u64,
    jobs: Option<Sender<Job>>,
    done: Receiver<Completion>,
    /// Completions of jobs that could not be handed to a worker.
    failed: Vec<Completion>,
    notifier: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
    inflight: Arc<AtomicU64>,
}

impl Pool {
    /// Starts `workers` (at least one) threads serving `store`.
    pub fn new<S: Store>(
        name: &'static str,
        store: S,
        mem: GuestMemoryMmap,
        workers: usize,
        inflight: Arc<AtomicU64>,
    ) -> Result<Pool, BackendError> {
        let notifier = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(BackendError::EventFd)?);
        let capacity = store.capacity();
        let store = Arc::new(store);
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let (done_tx, done_rx) = mpsc::channel::<Completion>();
        let mut pool = Pool {
            name,
            capacity,
            jobs: Some(jobs_tx),
            done: done_rx,
            failed: Vec::new(),
            notifier: notifier.clone(),
            threads: Vec::new(),
            inflight: inflight.clone(),
        };
        for i in 0..workers.max(1) {
            let worker = Worker {
                store: store.clone(),
                mem: mem.clone(),
                jobs: jobs_rx.clone(),
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
    jobs: Arc<Mutex<Receiver<Job>>>,
    done: Sender<Completion>,
    notifier: Arc<EventFd>,
    inflight: Arc<AtomicU64>,
}

impl<S: Store> Worker<S> {
    fn run(self) {
        loop {
            let next = {
                let rx = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
                rx.recv()
            };
            let Ok(job) = next else {
                // The pool was dropped.
                return;
            };
            let result = execute(&*self.store, &self.mem, &job);
            if let Err(e) = &result {
                debug!("backend job {} ({:?}) failed: {e}", job.token, job.op);
            }
            // From here on this job never touches guest memory again.
            self.inflight.fetch_sub(1, Ordering::Release);
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
        let token = job.token;
        let sent = match &self.jobs {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        };
        if !sent {
            self.inflight.fetch_sub(1, Ordering::Release);
            self.failed.push(Completion {
                token,
                result: Err(io::Error::other("backend workers are gone")),
            });
            let _ = self.notifier.write(1);
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        // Non-blocking: clears the counter, or fails with EAGAIN when it is already clear.
        let _ = self.notifier.read();
        out.append(&mut self.failed);
        out.extend(self.done.try_iter());
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the channel ends every worker once it finishes its current job.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::SyncSender;
    use std::time::{Duration, Instant};
    use vm_memory::GuestAddress;

    /// A store whose reads block until the test lets them go.
    struct GatedStore {
        gate: Mutex<Receiver<()>>,
    }

    impl Store for GatedStore {
        fn capacity(&self) -> u64 {
            1 << 20
        }
        fn read(&self, _: u64, _: &GuestMemoryMmap, _: &[Segment]) -> io::Result<()> {
            let _ = self.gate.lock().unwrap().recv();
            Ok(())
        }
        fn write(&self, _: u64, _: &GuestMemoryMmap, _: &[Segment]) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Err(io::Error::other("flush fails"))
        }
    }

    fn job(token: u64, op: JobOp) -> Job {
        Job {
            token,
            epoch: 0,
            op,
            offset: 0,
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

    fn gated_pool(workers: usize) -> (Pool, SyncSender<()>, Arc<AtomicU64>) {
        let (tx, rx) = mpsc::sync_channel(16);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let inflight = Arc::new(AtomicU64::new(0));
        let store = GatedStore {
            gate: Mutex::new(rx),
        };
        let pool = Pool::new("test", store, mem, workers, inflight.clone()).unwrap();
        (pool, tx, inflight)
    }

    #[test]
    fn inflight_counts_until_the_store_returns() {
        let (mut pool, gate, inflight) = gated_pool(2);
        pool.submit(job(1, JobOp::Read));
        pool.submit(job(2, JobOp::Write));
        // The write completes while the read is still blocked in the store.
        let done = wait_for(&mut pool, 1);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].token, 2);
        assert_eq!(inflight.load(Ordering::Acquire), 1);
        gate.send(()).unwrap();
        let done = wait_for(&mut pool, 1);
        assert_eq!(done[0].token, 1);
        assert!(done[0].result.is_ok());
        assert_eq!(inflight.load(Ordering::Acquire), 0);
    }

    #[test]
    fn errors_are_reported_and_drop_joins_workers() {
        let (mut pool, gate, inflight) = gated_pool(1);
        pool.submit(job(7, JobOp::Flush));
        let done = wait_for(&mut pool, 1);
        assert!(done[0].result.is_err());
        assert_eq!(pool.capacity(), 1 << 20);
        assert_eq!(pool.name(), "test");
        // A job still blocked at drop time: drop waits for it.
        pool.submit(job(8, JobOp::Read));
        gate.send(()).unwrap();
        drop(pool);
        assert_eq!(inflight.load(Ordering::Acquire), 0);
    }
}
