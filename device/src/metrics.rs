//! Device metrics (SPEC section 8): atomic counters shared between the device thread (which
//! updates them) and whoever reports them (the VMM's `--metrics`), and a serde-serializable
//! snapshot, [`DeviceMetrics`].
//!
//! Counting rules:
//! - `requests[op].requests`: valid requests taken from a queue (before fault injection);
//!   `requests[op].bytes`: data bytes of requests that completed `OK`.
//! - `status`: every completion placed in a used ring, by status (a rejected request with an
//!   unusable status descriptor counts as malformed too).
//! - `faults`: injections by kind (every `--fault` kind; `chaos` counts as the kind it picked).
//! - `inflight_high_water`: most requests taken from the queues and not yet completed at once.
//! - `interrupts`: queue interrupts signalled (after EVENT_IDX/NO_INTERRUPT suppression);
//!   `config_interrupts`: NEEDS_RESET notifications.
//! - `doorbells`: doorbell notifications received (eventfd reads, so kicks that arrive while the
//!   device is busy may coalesce).
//! - `longest_pass`: the most descriptors read, and the most CPU time used, in one pass over one
//!   queue (the device's work per doorbell).
//! - `latency`: time from taking a request off the queue to placing it in the used ring, in log2
//!   microsecond buckets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::fault::Decision;
use crate::request::Op;

/// Number of latency buckets: `[0,1)`, `[1,2)`, `[2,4)`, ... µs, the last one open-ended
/// (≥ 2^(N-2) µs ≈ 67 s).
pub const LATENCY_BUCKETS: usize = 28;

/// Live counters, updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; 4],
    bytes: [AtomicU64; 4],
    status: [AtomicU64; 4],
    faults: [AtomicU64; FAULT_KINDS],
    inflight_high_water: AtomicU64,
    interrupts: AtomicU64,
    config_interrupts: AtomicU64,
    doorbells: AtomicU64,
    needs_reset: AtomicU64,
    resets: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
    latency_sum_us: AtomicU64,
    longest_pass_descriptors: AtomicU64,
    longest_pass_ns: AtomicU64,
}

/// Fault kinds counted (every [`Decision`] but `Pass`).
const FAULT_KINDS: usize = 13;

/// The counter of a fired fault.
fn fault_index(d: &Decision) -> Option<usize> {
    Some(match d {
        Decision::Pass => return None,
        Decision::Error => 0,
        Decision::Delay(_) => 1,
        Decision::Drop => 2,
        Decision::Hang => 3,
        Decision::Status(_) => 4,
        Decision::Short(_) => 5,
        Decision::Corrupt { .. } => 6,
        Decision::Reset => 7,
        Decision::UsedId => 8,
        Decision::UsedDup => 9,
        Decision::UsedLen => 10,
        Decision::IrqLost => 11,
        Decision::IrqSpurious => 12,
    })
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The bucket of a latency.
pub fn latency_bucket(latency: Duration) -> usize {
    let us = latency.as_micros();
    if us == 0 {
        return 0;
    }
    // us in [2^k, 2^(k+1)) -> bucket k + 1.
    let k = (u128::BITS - 1 - us.leading_zeros()) as usize;
    (k + 1).min(LATENCY_BUCKETS - 1)
}

impl Metrics {
    /// All zero.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// A valid request with `op` was taken from a queue.
    pub fn request(&self, op: Op) {
        add(&self.requests[op.index()], 1);
    }

    /// A request with `op` completed OK, transferring `bytes` data bytes.
    pub fn bytes(&self, op: Op, bytes: u64) {
        add(&self.bytes[op.index()], bytes);
    }

    /// A completion with status byte `status` (`abi::req_status`) went into a used ring.
    pub fn status(&self, status: u8) {
        if let Some(c) = self.status.get(usize::from(status)) {
            add(c, 1);
        }
    }

    /// A fault was injected (`Decision::Pass` counts nothing).
    pub fn fault(&self, decision: &Decision) {
        if let Some(c) = fault_index(decision).and_then(|i| self.faults.get(i)) {
            add(c, 1);
        }
    }

    /// `n` requests are in flight now.
    pub fn inflight(&self, n: u64) {
        self.inflight_high_water.fetch_max(n, Ordering::Relaxed);
    }

    /// A queue interrupt was signalled.
    pub fn interrupt(&self) {
        add(&self.interrupts, 1);
    }

    /// A configuration interrupt (NEEDS_RESET) was signalled.
    pub fn config_interrupt(&self) {
        add(&self.config_interrupts, 1);
    }

    /// The device entered NEEDS_RESET.
    pub fn needs_reset(&self) {
        add(&self.needs_reset, 1);
    }

    /// A reset began.
    pub fn reset(&self) {
        add(&self.resets, 1);
    }

    /// A doorbell notification was received.
    pub fn doorbell(&self) {
        add(&self.doorbells, 1);
    }

    /// One pass over a queue read `descriptors` descriptor-table entries using `took` of CPU.
    pub fn pass(&self, descriptors: u64, took: Duration) {
        self.longest_pass_descriptors
            .fetch_max(descriptors, Ordering::Relaxed);
        self.longest_pass_ns.fetch_max(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// A request completed `latency` after it was taken from its queue.
    pub fn latency(&self, latency: Duration) {
        add(&self.latency[latency_bucket(latency)], 1);
        add(
            &self.latency_sum_us,
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
        );
    }

    /// A consistent-enough copy of every counter (each counter is read atomically; the set is not
    /// a single atomic snapshot).
    pub fn snapshot(&self) -> DeviceMetrics {
        let op = |op: Op| OpMetrics {
            requests: get(&self.requests[op.index()]),
            bytes: get(&self.bytes[op.index()]),
        };
        let buckets: Vec<LatencyBucket> = self
            .latency
            .iter()
            .enumerate()
            .map(|(i, c)| LatencyBucket {
                lt_us: (i + 1 < LATENCY_BUCKETS).then(|| 1u64 << i),
                count: get(c),
            })
            .collect();
        DeviceMetrics {
            requests: PerOp {
                read: op(Op::Read),
                write: op(Op::Write),
                flush: op(Op::Flush),
                get_id: op(Op::GetId),
            },
            status: StatusCounts {
                ok: get(&self.status[0]),
                ioerr: get(&self.status[1]),
                unsupp: get(&self.status[2]),
                malformed: get(&self.status[3]),
            },
            faults: {
                let f = |i: usize| get(&self.faults[i]);
                FaultCounts {
                    error: f(0),
                    delay: f(1),
                    drop: f(2),
                    hang: f(3),
                    status: f(4),
                    short: f(5),
                    corrupt: f(6),
                    reset: f(7),
                    used_id: f(8),
                    used_dup: f(9),
                    used_len: f(10),
                    irq_lost: f(11),
                    irq_spurious: f(12),
                }
            },
            inflight_high_water: get(&self.inflight_high_water),
            interrupts: get(&self.interrupts),
            config_interrupts: get(&self.config_interrupts),
            doorbells: get(&self.doorbells),
            needs_reset: get(&self.needs_reset),
            resets: get(&self.resets),
            longest_pass: PassMetrics {
                descriptors: get(&self.longest_pass_descriptors),
                ns: get(&self.longest_pass_ns),
            },
            latency: LatencyHistogram {
                count: buckets.iter().map(|b| b.count).sum(),
                sum_us: get(&self.latency_sum_us),
                buckets,
            },
        }
    }
}

/// The most work one pass over one queue did (a pass takes at most 32 requests before the
/// other queues get a turn): what a guest can make the device thread do per doorbell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PassMetrics {
    /// Most descriptor-table entries read in one pass.
    pub descriptors: u64,
    /// Longest pass in nanoseconds of the device thread's CPU time.
    pub ns: u64,
}

/// Requests and bytes of one op.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OpMetrics {
    /// Valid requests taken from the queues.
    pub requests: u64,
    /// Data bytes of the ones that completed OK.
    pub bytes: u64,
}

/// Per-op metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PerOp {
    /// READ.
    pub read: OpMetrics,
    /// WRITE.
    pub write: OpMetrics,
    /// FLUSH.
    pub flush: OpMetrics,
    /// GET_ID.
    pub get_id: OpMetrics,
}

/// Completions by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatusCounts {
    /// `OK`.
    pub ok: u64,
    /// `IOERR`.
    pub ioerr: u64,
    /// `UNSUPP`.
    pub unsupp: u64,
    /// `MALFORMED`.
    pub malformed: u64,
}

/// Injected faults by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    /// `error`.
    pub error: u64,
    /// `delay`.
    pub delay: u64,
    /// `drop`.
    pub drop: u64,
    /// `hang`.
    pub hang: u64,
    /// `status`.
    pub status: u64,
    /// `short`.
    pub short: u64,
    /// `corrupt`.
    pub corrupt: u64,
    /// `reset`.
    pub reset: u64,
    /// `used-id`.
    pub used_id: u64,
    /// `used-dup`.
    pub used_dup: u64,
    /// `used-len`.
    pub used_len: u64,
    /// `irq-lost`.
    pub irq_lost: u64,
    /// `irq-spurious`.
    pub irq_spurious: u64,
}

/// One latency bucket: completions faster than `lt_us` microseconds (and not faster than the
/// previous bucket's bound); `lt_us` is `null` for the last, open-ended bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LatencyBucket {
    /// Exclusive upper bound in microseconds (a power of two), `None` for the last bucket.
    pub lt_us: Option<u64>,
    /// Completions in this bucket.
    pub count: u64,
}

/// Completion-latency histogram with log2 microsecond buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LatencyHistogram {
    /// Completions measured.
    pub count: u64,
    /// Sum of their latencies in microseconds (mean = `sum_us / count`).
    pub sum_us: u64,
    /// The buckets, `[0,1)`, `[1,2)`, `[2,4)`, ... µs.
    pub buckets: Vec<LatencyBucket>,
}

/// A snapshot of every metric (serializes to the JSON `aiodma run --metrics` writes under
/// `device`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceMetrics {
    /// Requests and bytes per op.
    pub requests: PerOp,
    /// Completions by status.
    pub status: StatusCounts,
    /// Injected faults by kind.
    pub faults: FaultCounts,
    /// Most requests in flight at once.
    pub inflight_high_water: u64,
    /// Queue interrupts signalled.
    pub interrupts: u64,
    /// Configuration-change interrupts signalled (NEEDS_RESET).
    pub config_interrupts: u64,
    /// Doorbell notifications received.
    pub doorbells: u64,
    /// Times the device entered NEEDS_RESET.
    pub needs_reset: u64,
    /// Resets begun.
    pub resets: u64,
    /// The most work one pass over one queue did.
    pub longest_pass: PassMetrics,
    /// Completion latency.
    pub latency: LatencyHistogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_microseconds() {
        assert_eq!(latency_bucket(Duration::from_nanos(999)), 0);
        assert_eq!(latency_bucket(Duration::from_micros(1)), 1);
        assert_eq!(latency_bucket(Duration::from_micros(2)), 2);
        assert_eq!(latency_bucket(Duration::from_micros(3)), 2);
        assert_eq!(latency_bucket(Duration::from_micros(4)), 3);
        assert_eq!(latency_bucket(Duration::from_micros(1023)), 10);
        assert_eq!(latency_bucket(Duration::from_micros(1024)), 11);
        assert_eq!(
            latency_bucket(Duration::from_secs(1 << 30)),
            LATENCY_BUCKETS - 1
        );
    }

    #[test]
    fn snapshot_counts_and_serializes() {
        let m = Metrics::new();
        m.request(Op::Read);
        m.request(Op::Read);
        m.bytes(Op::Read, 4096);
        m.request(Op::GetId);
        m.status(crate::abi::req_status::OK);
        m.status(crate::abi::req_status::MALFORMED);
        m.status(200);
        m.fault(&Decision::Delay(Duration::from_micros(5)));
        m.inflight(3);
        m.inflight(2);
        m.interrupt();
        m.doorbell();
        m.latency(Duration::from_micros(3));
        m.latency(Duration::from_micros(100));
        let s = m.snapshot();
        assert_eq!(
            s.requests.read,
            OpMetrics {
                requests: 2,
                bytes: 4096
            }
        );
        assert_eq!(s.requests.get_id.requests, 1);
        assert_eq!(s.status.ok, 1);
        assert_eq!(s.status.malformed, 1);
        assert_eq!(s.faults.delay, 1);
        assert_eq!(s.inflight_high_water, 3);
        assert_eq!(s.interrupts, 1);
        assert_eq!(s.doorbells, 1);
        assert_eq!(s.latency.count, 2);
        assert_eq!(s.latency.sum_us, 103);
        assert_eq!(s.latency.buckets[2].count, 1);
        assert_eq!(s.latency.buckets[2].lt_us, Some(4));
        assert_eq!(s.latency.buckets[7].count, 1);
        assert_eq!(s.latency.buckets.last().unwrap().lt_us, None);

        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["requests"]["read"]["bytes"], 4096);
        assert_eq!(json["status"]["malformed"], 1);
        assert_eq!(json["faults"]["delay"], 1);
        assert_eq!(json["latency"]["buckets"][0]["lt_us"], 1);
        assert!(json["latency"]["buckets"][LATENCY_BUCKETS - 1]["lt_us"].is_null());
    }
}
