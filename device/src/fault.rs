//! Fault injection (SPEC section 7): `--fault KIND:key=val,...` rules and the injector that
//! applies them, deterministically for a seed and a request order.
//!
//! Syntax: `error|delay|drop` take exactly one trigger, `p=<0..1>` (probability) or `every=<N≥1>`
//! (the Nth, 2Nth, ... matching request); `hang` takes `after=<N≥0>` (the first N matching
//! requests are served, the next one hangs the device). Every kind accepts
//! `op=read|write|flush|get_id` to match only that op. `delay` takes `min=`/`max=` durations
//! (`ns`, `us`, `ms`, `s`; a missing `min` is 0, a missing `max` equals `min`).
//!
//! Examples: `error:p=0.01`, `delay:every=10,min=100us,max=2ms,op=read`, `drop:every=1000`,
//! `hang:after=500`.
//!
//! Determinism: the device thread owns one [`FaultInjector`] and consults it once per valid
//! request, in the order requests are popped from the queues; every `p=` rule matching the
//! request draws one number from a single SplitMix64 stream, whether or not an earlier rule
//! fired. A reset restarts the injector (counters and stream) from the seed.

use std::fmt;
use std::time::Duration;

use crate::request::Op;

/// What a rule does to a request it fires on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Complete with `IOERR`, nothing transferred.
    Error,
    /// Complete after a delay drawn uniformly from `[min, max]` (measured from when the request
    /// was taken from the queue).
    Delay {
        /// Shortest delay.
        min: Duration,
        /// Longest delay.
        max: Duration,
    },
    /// Never complete; discarded at reset.
    Drop,
    /// Stop processing every queue until reset.
    Hang,
}

impl FaultKind {
    /// The kind's name in the rule syntax.
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Error => "error",
            FaultKind::Delay { .. } => "delay",
            FaultKind::Drop => "drop",
            FaultKind::Hang => "hang",
        }
    }
}

/// Which matching requests a rule fires on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trigger {
    /// Each matching request with this probability (0..=1).
    Probability(f64),
    /// Every Nth matching request (N ≥ 1).
    Every(u64),
    /// `hang` only: the first request after N matching ones.
    After(u64),
}

/// One `--fault` rule.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    /// What it does.
    pub kind: FaultKind,
    /// When.
    pub trigger: Trigger,
    /// Only requests with this op match (all ops when `None`).
    pub op: Option<Op>,
}

/// A `--fault` rule that does not parse. Every message names the whole rule and the bad part,
/// on one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultSpecError {
    /// The rule is empty.
    #[error(
        "fault '': empty rule (expected KIND:key=val,... with KIND error, delay, drop or hang)"
    )]
    Empty,
    /// Unknown kind.
    #[error("fault '{spec}': unknown kind '{kind}' (expected error, delay, drop or hang)")]
    UnknownKind {
        /// The rule.
        spec: String,
        /// The kind given.
        kind: String,
    },
    /// A part that is not `key=value`.
    #[error("fault '{spec}': expected key=value, got '{part}'")]
    NotKeyValue {
        /// The rule.
        spec: String,
        /// The part.
        part: String,
    },
    /// Unknown key.
    #[error("fault '{spec}': unknown key '{key}' (expected p, every, op, min, max or after)")]
    UnknownKey {
        /// The rule.
        spec: String,
        /// The key.
        key: String,
    },
    /// A key given twice.
    #[error("fault '{spec}': '{key}' given twice")]
    Duplicate {
        /// The rule.
        spec: String,
        /// The key.
        key: String,
    },
    /// A key the kind does not take.
    #[error("fault '{spec}': '{key}' does not apply to {kind}")]
    NotApplicable {
        /// The rule.
        spec: String,
        /// The key.
        key: String,
        /// The kind.
        kind: &'static str,
    },
    /// A bad probability.
    #[error("fault '{spec}': bad probability '{value}' (expected a number from 0 to 1)")]
    BadProbability {
        /// The rule.
        spec: String,
        /// The value given.
        value: String,
    },
    /// A bad count.
    #[error("fault '{spec}': bad count '{value}' for {key} (expected an integer ≥ {min})")]
    BadCount {
        /// The rule.
        spec: String,
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// Smallest value allowed.
        min: u64,
    },
    /// A bad duration.
    #[error("fault '{spec}': bad duration '{value}' (expected an integer with ns, us, ms or s)")]
    BadDuration {
        /// The rule.
        spec: String,
        /// The value given.
        value: String,
    },
    /// A bad op.
    #[error("fault '{spec}': bad op '{value}' (expected read, write, flush or get_id)")]
    BadOp {
        /// The rule.
        spec: String,
        /// The value given.
        value: String,
    },
    /// error/delay/drop without exactly one of p= and every=.
    #[error("fault '{spec}': {kind} needs exactly one of p= and every=")]
    Trigger {
        /// The rule.
        spec: String,
        /// The kind.
        kind: &'static str,
    },
    /// hang without after=.
    #[error("fault '{spec}': hang needs after=N")]
    HangNeedsAfter {
        /// The rule.
        spec: String,
    },
    /// delay without min= or max=.
    #[error("fault '{spec}': delay needs min= and/or max=")]
    DelayNeedsRange {
        /// The rule.
        spec: String,
    },
    /// delay with min > max.
    #[error("fault '{spec}': min {min} is greater than max {max}")]
    DelayRange {
        /// The rule.
        spec: String,
        /// min as given.
        min: String,
        /// max as given.
        max: String,
    },
}

/// Parses a duration: an integer followed by `ns`, `us`, `ms` or `s` (a bare `0` is allowed).
pub fn parse_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let nanos_per = match unit {
        "ns" => 1u64,
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        _ => return None,
    };
    Some(Duration::from_nanos(n.checked_mul(nanos_per)?))
}

/// Formats a duration in the largest unit that shows it exactly (the inverse of
/// [`parse_duration`]).
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0".into();
    }
    for (unit, per) in [("s", 1_000_000_000u128), ("ms", 1_000_000), ("us", 1_000)] {
        if ns.is_multiple_of(per) {
            return format!("{}{unit}", ns / per);
        }
    }
    format!("{ns}ns")
}

impl FaultRule {
    /// Parses `KIND:key=val,...` (see the module documentation).
    pub fn parse(spec: &str) -> Result<FaultRule, FaultSpecError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(FaultSpecError::Empty);
        }
        let owned = || spec.to_string();
        let (kind_str, rest) = match spec.split_once(':') {
            Some((k, r)) => (k, Some(r)),
            None => (spec, None),
        };
        let kind_name: &'static str = match kind_str {
            "error" => "error",
            "delay" => "delay",
            "drop" => "drop",
            "hang" => "hang",
            other => {
                return Err(FaultSpecError::UnknownKind {
                    spec: owned(),
                    kind: other.to_string(),
                })
            }
        };

        let mut p: Option<f64> = None;
        let mut every: Option<u64> = None;
        let mut after: Option<u64> = None;
        let mut op: Option<Op> = None;
        let mut min: Option<(Duration, String)> = None;
        let mut max: Option<(Duration, String)> = None;
        let mut seen: Vec<&str> = Vec::new();

        for part in rest.into_iter().flat_map(|r| r.split(',')) {
            let Some((key, value)) = part.split_once('=') else {
                return Err(FaultSpecError::NotKeyValue {
                    spec: owned(),
                    part: part.to_string(),
                });
            };
            let key = key.trim();
            let value = value.trim();
            let applies = match key {
                "p" | "every" => kind_name != "hang",
                "after" => kind_name == "hang",
                "min" | "max" => kind_name == "delay",
                "op" => true,
                _ => {
                    return Err(FaultSpecError::UnknownKey {
                        spec: owned(),
                        key: key.to_string(),
                    })
                }
            };
            if !applies {
                return Err(FaultSpecError::NotApplicable {
                    spec: owned(),
                    key: key.to_string(),
                    kind: kind_name,
                });
            }
            if seen.contains(&key) {
                return Err(FaultSpecError::Duplicate {
                    spec: owned(),
                    key: key.to_string(),
                });
            }
            seen.push(key);
            match key {
                "p" => {
                    let v: f64 = value
                        .parse()
                        .ok()
                        .filter(|v: &f64| (0.0..=1.0).contains(v))
                        .ok_or_else(|| FaultSpecError::BadProbability {
                            spec: owned(),
                            value: value.to_string(),
                        })?;
                    p = Some(v);
                }
                "every" => {
                    let v = value
                        .parse::<u64>()
                        .ok()
                        .filter(|v| *v >= 1)
                        .ok_or_else(|| FaultSpecError::BadCount {
                            spec: owned(),
                            key: "every",
                            value: value.to_string(),
                            min: 1,
                        })?;
                    every = Some(v);
                }
                "after" => {
                    let v = value.parse::<u64>().map_err(|_| FaultSpecError::BadCount {
                        spec: owned(),
                        key: "after",
                        value: value.to_string(),
                        min: 0,
                    })?;
                    after = Some(v);
                }
                "op" => {
                    op = Some(Op::from_name(value).ok_or_else(|| FaultSpecError::BadOp {
                        spec: owned(),
                        value: value.to_string(),
                    })?);
                }
                "min" | "max" => {
                    let d = parse_duration(value).ok_or_else(|| FaultSpecError::BadDuration {
                        spec: owned(),
                        value: value.to_string(),
                    })?;
                    if key == "min" {
                        min = Some((d, value.to_string()));
                    } else {
                        max = Some((d, value.to_string()));
                    }
                }
                _ => {}
            }
        }

        let trigger = if kind_name == "hang" {
            Trigger::After(after.ok_or(FaultSpecError::HangNeedsAfter { spec: owned() })?)
        } else {
            match (p, every) {
                (Some(p), None) => Trigger::Probability(p),
                (None, Some(n)) => Trigger::Every(n),
                _ => {
                    return Err(FaultSpecError::Trigger {
                        spec: owned(),
                        kind: kind_name,
                    })
                }
            }
        };
        let kind = match kind_name {
            "error" => FaultKind::Error,
            "drop" => FaultKind::Drop,
            "hang" => FaultKind::Hang,
            _ => {
                let (lo, hi) = match (min, max) {
                    (None, None) => return Err(FaultSpecError::DelayNeedsRange { spec: owned() }),
                    (Some(lo), None) => (lo.clone(), lo),
                    (None, Some(hi)) => ((Duration::ZERO, "0".to_string()), hi),
                    (Some(lo), Some(hi)) => (lo, hi),
                };
                if lo.0 > hi.0 {
                    return Err(FaultSpecError::DelayRange {
                        spec: owned(),
                        min: lo.1,
                        max: hi.1,
                    });
                }
                FaultKind::Delay {
                    min: lo.0,
                    max: hi.0,
                }
            }
        };
        Ok(FaultRule { kind, trigger, op })
    }

    /// Whether the rule looks at requests with `op`.
    pub fn matches(&self, op: Op) -> bool {
        self.op.is_none_or(|o| o == op)
    }
}

impl std::str::FromStr for FaultRule {
    type Err = FaultSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultRule::parse(s)
    }
}

impl fmt::Display for FaultRule {
    /// The canonical rule syntax; parses back to an equal rule.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.kind.name())?;
        match self.trigger {
            Trigger::Probability(p) => write!(f, "p={p}")?,
            Trigger::Every(n) => write!(f, "every={n}")?,
            Trigger::After(n) => write!(f, "after={n}")?,
        }
        if let FaultKind::Delay { min, max } = self.kind {
            write!(
                f,
                ",min={},max={}",
                format_duration(min),
                format_duration(max)
            )?;
        }
        if let Some(op) = self.op {
            write!(f, ",op={op}")?;
        }
        Ok(())
    }
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
}

/// What the injector decided for one request.
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
}

/// Applies the rules to requests in pop order.
#[derive(Debug, Clone)]
pub struct FaultInjector {
    rules: Vec<FaultRule>,
    matched: Vec<u64>,
    seed: u64,
    rng: SplitMix64,
}

impl FaultInjector {
    /// An injector for `rules` whose PRNG starts from `seed`.
    pub fn new(rules: Vec<FaultRule>, seed: u64) -> FaultInjector {
        let matched = vec![0; rules.len()];
        FaultInjector {
            rules,
            matched,
            seed,
            rng: SplitMix64::new(seed),
        }
    }

    /// Whether there are no rules at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Back to the state `new` left it in (device reset).
    pub fn reset(&mut self) {
        self.matched.iter_mut().for_each(|m| *m = 0);
        self.rng = SplitMix64::new(self.seed);
    }

    /// Decides the fate of the next request, which has `op`. Every rule matching `op` counts the
    /// request (and a `p=` rule draws once); the first rule that fires wins.
    pub fn decide(&mut self, op: Op) -> Decision {
        let mut winner: Option<FaultKind> = None;
        for (rule, matched) in self.rules.iter().zip(self.matched.iter_mut()) {
            if !rule.matches(op) {
                continue;
            }
            *matched += 1;
            let fires = match rule.trigger {
                Trigger::Probability(p) => self.rng.next_f64() < p,
                Trigger::Every(n) => n != 0 && *matched % n == 0,
                Trigger::After(n) => *matched == n.saturating_add(1),
            };
            if fires && winner.is_none() {
                winner = Some(rule.kind);
            }
        }
        match winner {
            None => Decision::Pass,
            Some(FaultKind::Error) => Decision::Error,
            Some(FaultKind::Drop) => Decision::Drop,
            Some(FaultKind::Hang) => Decision::Hang,
            Some(FaultKind::Delay { min, max }) => {
                let lo = min.as_nanos().min(u128::from(u64::MAX)) as u64;
                let hi = max.as_nanos().min(u128::from(u64::MAX)) as u64;
                let span = hi.saturating_sub(lo);
                let extra = match span.checked_add(1) {
                    Some(n) => self.rng.next_u64() % n,
                    None => self.rng.next_u64(),
                };
                Decision::Delay(Duration::from_nanos(lo.saturating_add(extra)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(spec: &str) -> String {
        FaultRule::parse(spec).unwrap_err().to_string()
    }

    #[test]
    fn parses_good_rules() {
        let r = FaultRule::parse("error:p=0.25").unwrap();
        assert_eq!(r.kind, FaultKind::Error);
        assert_eq!(r.trigger, Trigger::Probability(0.25));
        assert_eq!(r.op, None);

        let r = FaultRule::parse("delay:every=10,min=100us,max=2ms,op=read").unwrap();
        assert_eq!(
            r.kind,
            FaultKind::Delay {
                min: Duration::from_micros(100),
                max: Duration::from_millis(2)
            }
        );
        assert_eq!(r.trigger, Trigger::Every(10));
        assert_eq!(r.op, Some(Op::Read));

        let r = FaultRule::parse("delay:p=1,min=5ms").unwrap();
        assert_eq!(
            r.kind,
            FaultKind::Delay {
                min: Duration::from_millis(5),
                max: Duration::from_millis(5)
            }
        );
        let r = FaultRule::parse("delay:p=1,max=1s").unwrap();
        assert_eq!(
            r.kind,
            FaultKind::Delay {
                min: Duration::ZERO,
                max: Duration::from_secs(1)
            }
        );
        assert_eq!(
            FaultRule::parse("drop:every=1000,op=write")
                .unwrap()
                .trigger,
            Trigger::Every(1000)
        );
        let r = FaultRule::parse("hang:after=0").unwrap();
        assert_eq!((r.kind, r.trigger), (FaultKind::Hang, Trigger::After(0)));
        assert_eq!(
            FaultRule::parse("error:p=0,op=get_id").unwrap().op,
            Some(Op::GetId)
        );
        assert_eq!(
            "error:p=1".parse::<FaultRule>().unwrap().trigger,
            Trigger::Probability(1.0)
        );
    }

    #[test]
    fn display_round_trips() {
        for spec in [
            "error:p=0.25",
            "error:every=3,op=flush",
            "delay:p=0.5,min=100us,max=2ms,op=read",
            "delay:every=1,min=0,max=1500ns",
            "drop:every=7",
            "hang:after=12,op=write",
        ] {
            let rule = FaultRule::parse(spec).unwrap();
            assert_eq!(rule.to_string(), spec);
            assert_eq!(FaultRule::parse(&rule.to_string()).unwrap(), rule);
        }
    }

    #[test]
    fn rejects_bad_rules_naming_the_bad_part() {
        assert_eq!(
            err("delay:min=5xs"),
            "fault 'delay:min=5xs': bad duration '5xs' (expected an integer with ns, us, ms or s)"
        );
        assert!(err("").starts_with("fault '': empty"));
        assert_eq!(
            err("explode:p=1"),
            "fault 'explode:p=1': unknown kind 'explode' (expected error, delay, drop or hang)"
        );
        assert!(err("error:p=1.5").contains("bad probability '1.5'"));
        assert!(err("error:p=-0.1").contains("bad probability '-0.1'"));
        assert!(err("error:p=NaN").contains("bad probability 'NaN'"));
        assert!(err("error:p=x").contains("bad probability 'x'"));
        assert!(err("error:every=0").contains("bad count '0' for every"));
        assert!(err("error:every=-1").contains("bad count '-1' for every"));
        assert!(err("hang:after=x").contains("bad count 'x' for after"));
        assert!(err("error:op=erase,p=1").contains("bad op 'erase'"));
        assert!(err("error:p=0.1,every=2").contains("error needs exactly one of p= and every="));
        assert!(err("drop").contains("drop needs exactly one of p= and every="));
        assert!(err("hang").contains("hang needs after=N"));
        assert!(err("hang:p=0.5").contains("'p' does not apply to hang"));
        assert!(err("error:p=1,min=1ms").contains("'min' does not apply to error"));
        assert!(err("delay:p=1").contains("delay needs min= and/or max="));
        assert!(err("delay:p=1,min=2ms,max=1ms").contains("min 2ms is greater than max 1ms"));
        assert!(err("error:p=1,p=0").contains("'p' given twice"));
        assert!(err("error:p").contains("expected key=value, got 'p'"));
        assert!(err("error:p=1,color=red").contains("unknown key 'color'"));
        assert!(err("delay:p=1,min=ms").contains("bad duration 'ms'"));
        assert!(err("delay:p=1,min=5").contains("bad duration '5'"));
        assert!(err("delay:p=1,min=99999999999999999999s").contains("bad duration"));
        // Every message is one line.
        for spec in ["delay:min=5xs", "error", "x", "hang:after=1,op=no"] {
            assert!(!err(spec).contains('\n'));
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100us"), Some(Duration::from_micros(100)));
        assert_eq!(parse_duration("7ns"), Some(Duration::from_nanos(7)));
        assert_eq!(parse_duration("3s"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("1.5ms"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(format_duration(Duration::from_micros(1500)), "1500us");
        assert_eq!(format_duration(Duration::from_millis(2000)), "2s");
    }

    #[test]
    fn every_n_fires_on_multiples_of_matching_requests() {
        let rules = vec![FaultRule::parse("error:every=3,op=write").unwrap()];
        let mut inj = FaultInjector::new(rules, 1);
        let mut fired = Vec::new();
        for i in 1..=12u32 {
            // Reads do not count.
            assert_eq!(inj.decide(Op::Read), Decision::Pass);
            if inj.decide(Op::Write) == Decision::Error {
                fired.push(i);
            }
        }
        assert_eq!(fired, vec![3, 6, 9, 12]);
    }

    #[test]
    fn hang_after_n() {
        let mut inj = FaultInjector::new(vec![FaultRule::parse("hang:after=2").unwrap()], 0);
        assert_eq!(inj.decide(Op::Read), Decision::Pass);
        assert_eq!(inj.decide(Op::Write), Decision::Pass);
        assert_eq!(inj.decide(Op::Read), Decision::Hang);
        assert_eq!(inj.decide(Op::Read), Decision::Pass);
        inj.reset();
        assert_eq!(inj.decide(Op::Read), Decision::Pass);
        assert_eq!(inj.decide(Op::Read), Decision::Pass);
        assert_eq!(inj.decide(Op::Read), Decision::Hang);
    }

    #[test]
    fn probability_is_reproducible_for_a_seed() {
        let rules = vec![
            FaultRule::parse("error:p=0.2").unwrap(),
            FaultRule::parse("delay:p=0.3,min=1us,max=1ms").unwrap(),
        ];
        let run = |seed| {
            let mut inj = FaultInjector::new(rules.clone(), seed);
            (0..1000).map(|_| inj.decide(Op::Read)).collect::<Vec<_>>()
        };
        let a = run(42);
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
        let errors = a.iter().filter(|d| **d == Decision::Error).count();
        assert!((120..280).contains(&errors), "{errors} errors for p=0.2");
        for d in &a {
            if let Decision::Delay(d) = d {
                assert!(*d >= Duration::from_micros(1) && *d <= Duration::from_millis(1));
            }
        }
        // Reset restarts the stream.
        let mut inj = FaultInjector::new(rules.clone(), 42);
        let first: Vec<_> = (0..50).map(|_| inj.decide(Op::Read)).collect();
        inj.reset();
        let again: Vec<_> = (0..50).map(|_| inj.decide(Op::Read)).collect();
        assert_eq!(first, again);
    }

    #[test]
    fn p_zero_never_and_p_one_always() {
        let mut inj = FaultInjector::new(vec![FaultRule::parse("drop:p=0").unwrap()], 9);
        assert!((0..1000).all(|_| inj.decide(Op::Read) == Decision::Pass));
        let mut inj = FaultInjector::new(vec![FaultRule::parse("drop:p=1").unwrap()], 9);
        assert!((0..1000).all(|_| inj.decide(Op::Flush) == Decision::Drop));
    }
}
