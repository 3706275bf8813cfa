//! The injector: applies the rules to requests in pop order, deterministically for a seed, or
//! replays a fault log.

use std::collections::HashMap;
use std::time::Duration;

use super::rule::{FaultKind, FaultRule, Trigger};
use crate::request::Op;

/// What the injector sees of a request (a valid one: faults never apply to malformed requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFacts {
    /// Queue it was taken from.
    pub queue: u16,
    /// Its head descriptor.
    pub head: u16,
    /// Its op.
    pub op: Op,
    /// Device byte offset (READ/WRITE).
    pub offset: u64,
    /// Data bytes.
    pub length: u32,
}

/// SplitMix64: a tiny, fast, well-distributed PRNG (Steele, Lea, Flood 2014). Deterministic for
/// a seed on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform number in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform number in `[0, n)` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// What the injector decided for one request, with every parameter drawn, so that a fault log
/// entry replays exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No fault: process normally.
    Pass,
    /// Complete with `IOERR` without touching the store.
    Error,
    /// Process, but hold the completion until this long after the request was popped.
    Delay(Duration),
    /// Never complete.
    Drop,
    /// Hold this request and stop processing every queue until reset.
    Hang,
    /// Complete with this status byte, nothing transferred.
    Status(u8),
    /// READ: transfer only this many bytes (fewer than asked) and complete OK.
    Short(u32),
    /// Flip `bits` bits of the data, at positions drawn from `seed`.
    Corrupt {
        /// Bits to flip.
        bits: u32,
        /// Seed of the positions.
        seed: u64,
    },
    /// Set NEEDS_RESET and raise the configuration interrupt.
    Reset,
    /// Publish the request under another head, never under its own.
    UsedId,
    /// Publish the request's used element twice.
    UsedDup,
    /// Publish a used length larger than the request's buffers.
    UsedLen,
    /// Publish without raising the interrupt.
    IrqLost,
    /// Publish and raise the queue's interrupt once more.
    IrqSpurious,
}

impl Decision {
    /// The fault kind's name (`"pass"` for no fault).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Decision::Pass => "pass",
            Decision::Error => "error",
            Decision::Delay(_) => "delay",
            Decision::Drop => "drop",
            Decision::Hang => "hang",
            Decision::Status(_) => "status",
            Decision::Short(_) => "short",
            Decision::Corrupt { .. } => "corrupt",
            Decision::Reset => "reset",
            Decision::UsedId => "used-id",
            Decision::UsedDup => "used-dup",
            Decision::UsedLen => "used-len",
            Decision::IrqLost => "irq-lost",
            Decision::IrqSpurious => "irq-spurious",
        }
    }
}

/// A decision to fire at a given request sequence number (from a fault log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    /// The request's sequence number ([`FaultInjector::decide`] counts from 1).
    pub seq: u64,
    /// The op the logged request had (a mismatch means the run diverged).
    pub op: Op,
    /// What to do.
    pub decision: Decision,
}

/// Where decisions come from.
#[derive(Debug, Clone)]
enum Source {
    Rules {
        rules: Vec<FaultRule>,
        matched: Vec<u64>,
        fired: Vec<u64>,
        seed: u64,
        rng: SplitMix64,
    },
    Replay {
        by_seq: HashMap<u64, Scheduled>,
        diverged: u64,
    },
}

/// Applies the rules to requests in pop order.
#[derive(Debug, Clone)]
pub struct FaultInjector {
    source: Source,
    /// Decisions made since the device was created (resets do not restart it).
    seq: u64,
}

impl FaultInjector {
    /// An injector for `rules` whose PRNG starts from `seed`.
    pub fn new(rules: Vec<FaultRule>, seed: u64) -> FaultInjector {
        let n = rules.len();
        FaultInjector {
            source: Source::Rules {
                rules,
                matched: vec![0; n],
                fired: vec![0; n],
                seed,
                rng: SplitMix64::new(seed),
            },
            seq: 0,
        }
    }

    /// An injector that fires exactly `schedule` (a fault log's entries) and nothing else.
    pub fn replay(schedule: &[Scheduled]) -> FaultInjector {
        FaultInjector {
            source: Source::Replay {
                by_seq: schedule.iter().map(|s| (s.seq, *s)).collect(),
                diverged: 0,
            },
            seq: 0,
        }
    }

    /// The rules (empty when replaying).
    pub fn rules(&self) -> &[FaultRule] {
        match &self.source {
            Source::Rules { rules, .. } => rules,
            Source::Replay { .. } => &[],
        }
    }

    /// Replaces the rules (runtime control); their counters start from zero, the PRNG goes on.
    /// A replaying injector stops replaying.
    pub fn set_rules(&mut self, new: Vec<FaultRule>) {
        let n = new.len();
        match &mut self.source {
            Source::Rules {
                rules,
                matched,
                fired,
                ..
            } => {
                *rules = new;
                *matched = vec![0; n];
                *fired = vec![0; n];
            }
            Source::Replay { .. } => {
                self.source = Source::Rules {
                    rules: new,
                    matched: vec![0; n],
                    fired: vec![0; n],
                    seed: 0,
                    rng: SplitMix64::new(0),
                };
            }
        }
    }

    /// Requests whose logged op differed from the replayed run's (0 when not replaying).
    pub fn diverged(&self) -> u64 {
        match &self.source {
            Source::Replay { diverged, .. } => *diverged,
            Source::Rules { .. } => 0,
        }
    }

    /// The sequence number of the last decision (0 before the first).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Back to the state `new` left it in (device reset): rule counters and PRNG restart, so
    /// each device lifetime is reproducible. The sequence number goes on.
    pub fn reset(&mut self) {
        if let Source::Rules {
            matched,
            fired,
            seed,
            rng,
            ..
        } = &mut self.source
        {
            matched.iter_mut().for_each(|m| *m = 0);
            fired.iter_mut().for_each(|m| *m = 0);
            *rng = SplitMix64::new(*seed);
        }
    }

    /// Decides the fate of the next request. Every rule matching it counts it (and a `p=`
    /// rule draws once); the first rule that fires wins.
    pub fn decide(&mut self, req: &RequestFacts) -> Decision {
        self.seq += 1;
        let seq = self.seq;
        match &mut self.source {
            Source::Replay { by_seq, diverged } => match by_seq.get(&seq) {
                Some(s) if s.op == req.op => s.decision,
                Some(s) => {
                    *diverged += 1;
                    log::warn!(
                        "fault replay: request {seq} is a {} where the log has a {}; not fired",
                        req.op,
                        s.op
                    );
                    Decision::Pass
                }
                None => Decision::Pass,
            },
            Source::Rules {
                rules,
                matched,
                fired,
                rng,
                ..
            } => {
                let mut winner: Option<FaultKind> = None;
                for ((rule, matched), fired) in
                    rules.iter().zip(matched.iter_mut()).zip(fired.iter_mut())
                {
                    if !rule.matches(req.op, req.queue, req.offset, req.length) {
                        continue;
                    }
                    *matched += 1;
                    let fires = match rule.trigger {
                        Trigger::Probability(p) => rng.next_f64() < p,
                        Trigger::Every(n) => n != 0 && *matched % n == 0,
                        Trigger::After(n) => *matched == n.saturating_add(1),
                    };
                    let spent = rule.times.is_some_and(|t| *fired >= t);
                    if fires && !spent && winner.is_none() {
                        *fired += 1;
                        winner = Some(rule.kind);
                    }
                }
                match winner {
                    None => Decision::Pass,
                    Some(kind) => concrete(kind, req, rng),
                }
            }
        }
    }
}

/// The decision for a rule of `kind` that fired on `req`, with its parameters drawn.
fn concrete(kind: FaultKind, req: &RequestFacts, rng: &mut SplitMix64) -> Decision {
    match kind {
        FaultKind::Error => Decision::Error,
        FaultKind::Drop => Decision::Drop,
        FaultKind::Hang => Decision::Hang,
        FaultKind::Reset => Decision::Reset,
        FaultKind::UsedId => Decision::UsedId,
        FaultKind::UsedDup => Decision::UsedDup,
        FaultKind::UsedLen => Decision::UsedLen,
        FaultKind::IrqLost => Decision::IrqLost,
        FaultKind::IrqSpurious => Decision::IrqSpurious,
        FaultKind::Status { code } => Decision::Status(code),
        FaultKind::Short { len } => Decision::Short(len.min(req.length.saturating_sub(1))),
        FaultKind::Corrupt { bits } => Decision::Corrupt {
            bits,
            seed: rng.next_u64(),
        },
        FaultKind::Delay { min, max } => {
            let lo = min.as_nanos().min(u128::from(u64::MAX)) as u64;
            let hi = max.as_nanos().min(u128::from(u64::MAX)) as u64;
            let span = hi.saturating_sub(lo);
            let extra = match span.checked_add(1) {
                Some(n) => rng.below(n),
                None => rng.next_u64(),
            };
            Decision::Delay(Duration::from_nanos(lo.saturating_add(extra)))
        }
        FaultKind::Chaos => {
            // Every other kind, with parameters a driver meets in practice.
            let pick = match rng.below(13) {
                0 => FaultKind::Error,
                1 => FaultKind::Delay {
                    min: Duration::from_micros(100),
                    max: Duration::from_millis(20),
                },
                2 => FaultKind::Drop,
                3 => FaultKind::Hang,
                4 => FaultKind::Status {
                    code: rng.below(256) as u8,
                },
                5 => FaultKind::Short {
                    len: rng.below(u64::from(req.length)) as u32,
                },
                6 => FaultKind::Corrupt { bits: 1 },
                7 => FaultKind::Reset,
                8 => FaultKind::UsedId,
                9 => FaultKind::UsedDup,
                10 => FaultKind::UsedLen,
                11 => FaultKind::IrqLost,
                _ => FaultKind::IrqSpurious,
            };
            if pick.applies_to(req.op) {
                concrete(pick, req, rng)
            } else {
                Decision::Error
            }
        }
    }
}

/// Positions of `bits` distinct-ish bits to flip in `len` bytes, drawn from `seed` (repeats are
/// possible and harmless only in the sense that they cancel: callers flip each drawn position).
pub fn corrupt_positions(seed: u64, bits: u32, len: u64) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed);
    let total_bits = len.saturating_mul(8);
    let mut out: Vec<u64> = Vec::with_capacity(bits as usize);
    while out.len() < bits as usize && (out.len() as u64) < total_bits {
        let bit = rng.below(total_bits);
        if !out.contains(&bit) {
            out.push(bit);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(op: Op) -> RequestFacts {
        RequestFacts {
            queue: 0,
            head: 0,
            op,
            offset: 0,
            length: 4096,
        }
    }

    fn rule(s: &str) -> FaultRule {
        FaultRule::parse(s).unwrap()
    }

    #[test]
    fn every_n_fires_on_multiples_of_matching_requests() {
        let mut inj = FaultInjector::new(vec![rule("error:every=3,op=write")], 1);
        let mut fired = Vec::new();
        for i in 1..=12u32 {
            assert_eq!(inj.decide(&facts(Op::Read)), Decision::Pass);
            if inj.decide(&facts(Op::Write)) == Decision::Error {
                fired.push(i);
            }
        }
        assert_eq!(fired, vec![3, 6, 9, 12]);
        assert_eq!(inj.seq(), 24);
    }

    #[test]
    fn hang_after_n_and_reset_restarts_the_counters_not_the_sequence() {
        let mut inj = FaultInjector::new(vec![rule("hang:after=2")], 0);
        assert_eq!(inj.decide(&facts(Op::Read)), Decision::Pass);
        assert_eq!(inj.decide(&facts(Op::Write)), Decision::Pass);
        assert_eq!(inj.decide(&facts(Op::Read)), Decision::Hang);
        assert_eq!(inj.decide(&facts(Op::Read)), Decision::Pass);
        inj.reset();
        assert_eq!(inj.decide(&facts(Op::Read)), Decision::Pass);
        assert_eq!(inj.decide(&facts(Op::Read)), Decision::Pass);
        assert_eq!(inj.decide(&facts(Op::Read)), Decision::Hang);
        assert_eq!(inj.seq(), 7);
    }

    #[test]
    fn times_caps_the_firings() {
        let mut inj = FaultInjector::new(vec![rule("error:p=1,times=3"), rule("drop:p=1")], 0);
        let d: Vec<_> = (0..5).map(|_| inj.decide(&facts(Op::Read))).collect();
        assert_eq!(
            d,
            vec![
                Decision::Error,
                Decision::Error,
                Decision::Error,
                Decision::Drop,
                Decision::Drop
            ]
        );
    }

    #[test]
    fn probability_is_reproducible_for_a_seed() {
        let rules = vec![rule("error:p=0.2"), rule("delay:p=0.3,min=1us,max=1ms")];
        let run = |seed| {
            let mut inj = FaultInjector::new(rules.clone(), seed);
            (0..1000)
                .map(|_| inj.decide(&facts(Op::Read)))
                .collect::<Vec<_>>()
        };
        let a = run(42);
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
        let errors = a.iter().filter(|d| **d == Decision::Error).count();
        assert!((120..280).contains(&errors), "{errors} errors for p=0.2");
    }

    #[test]
    fn short_is_always_shorter_and_chaos_only_picks_what_applies() {
        let mut inj = FaultInjector::new(vec![rule("short:p=1,len=100000")], 0);
        assert_eq!(inj.decide(&facts(Op::Read)), Decision::Short(4095));
        let mut inj = FaultInjector::new(vec![rule("chaos:p=1")], 5);
        let mut kinds = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let d = inj.decide(&facts(Op::Flush));
            assert!(!matches!(d, Decision::Short(_) | Decision::Corrupt { .. }));
            kinds.insert(d.kind_name());
            let r = inj.decide(&facts(Op::Read));
            if let Decision::Short(n) = r {
                assert!(n < 4096);
            }
            kinds.insert(r.kind_name());
        }
        assert_eq!(kinds.len(), 13, "{kinds:?}");
    }

    #[test]
    fn replay_fires_exactly_the_schedule() {
        let schedule = [
            Scheduled {
                seq: 2,
                op: Op::Read,
                decision: Decision::Delay(Duration::from_micros(7)),
            },
            Scheduled {
                seq: 4,
                op: Op::Write,
                decision: Decision::Corrupt { bits: 2, seed: 9 },
            },
        ];
        let mut inj = FaultInjector::replay(&schedule);
        let d: Vec<_> = [Op::Read, Op::Read, Op::Read, Op::Write, Op::Read]
            .iter()
            .map(|op| inj.decide(&facts(*op)))
            .collect();
        assert_eq!(
            d,
            vec![
                Decision::Pass,
                Decision::Delay(Duration::from_micros(7)),
                Decision::Pass,
                Decision::Corrupt { bits: 2, seed: 9 },
                Decision::Pass
            ]
        );
        // A different op at a scheduled number is a divergence, not a fault.
        let mut inj = FaultInjector::replay(&schedule);
        inj.decide(&facts(Op::Read));
        assert_eq!(inj.decide(&facts(Op::Write)), Decision::Pass);
        assert_eq!(inj.diverged(), 1);
    }

    #[test]
    fn corrupt_positions_are_distinct_and_in_range() {
        let p = corrupt_positions(3, 8, 16);
        assert_eq!(p.len(), 8);
        assert!(p.iter().all(|&b| b < 128));
        let mut q = p.clone();
        q.dedup();
        assert_eq!(corrupt_positions(3, 8, 16), p);
        assert_eq!(
            corrupt_positions(3, 64, 1).len(),
            8,
            "at most every bit once"
        );
    }
}
