//! `--fault KIND:key=val,...` rules: what they do, when they fire, which requests they look at.

use std::fmt;
use std::ops::Range;
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
    /// Complete with this status byte (any value, defined or not), nothing transferred.
    Status {
        /// The status byte.
        code: u8,
    },
    /// READ: transfer only the first `len` bytes (fewer than asked) and complete OK.
    Short {
        /// Bytes transferred (capped at one less than the request's length).
        len: u32,
    },
    /// Flip `bits` bits of the data — a READ's in the guest's buffers after the transfer, a
    /// WRITE's in the store after it — and report success.
    Corrupt {
        /// Bits flipped, at positions drawn from the fault PRNG.
        bits: u32,
    },
    /// The device sets NEEDS_RESET and raises the configuration interrupt (a spontaneous
    /// reset request), as if it had found a broken queue.
    Reset,
    /// The request's used element names another head (one not in flight); the request itself
    /// never completes.
    UsedId,
    /// The request's used element is published twice.
    UsedDup,
    /// The request's used element claims more bytes than its buffers hold.
    UsedLen,
    /// The completion is published but its interrupt is not raised.
    IrqLost,
    /// The completion is published and its queue's interrupt is raised once more, for nothing.
    IrqSpurious,
    /// Each firing picks one of the kinds above (with default parameters) from the fault PRNG.
    Chaos,
}

impl FaultKind {
    /// Every kind's name, in the order the syntax lists them.
    pub const NAMES: [&'static str; 14] = [
        "error",
        "delay",
        "drop",
        "hang",
        "status",
        "short",
        "corrupt",
        "reset",
        "used-id",
        "used-dup",
        "used-len",
        "irq-lost",
        "irq-spurious",
        "chaos",
    ];

    /// The kind's name in the rule syntax.
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Error => "error",
            FaultKind::Delay { .. } => "delay",
            FaultKind::Drop => "drop",
            FaultKind::Hang => "hang",
            FaultKind::Status { .. } => "status",
            FaultKind::Short { .. } => "short",
            FaultKind::Corrupt { .. } => "corrupt",
            FaultKind::Reset => "reset",
            FaultKind::UsedId => "used-id",
            FaultKind::UsedDup => "used-dup",
            FaultKind::UsedLen => "used-len",
            FaultKind::IrqLost => "irq-lost",
            FaultKind::IrqSpurious => "irq-spurious",
            FaultKind::Chaos => "chaos",
        }
    }

    /// Whether the kind can apply to a request with `op`: `short` shortens what a READ returns,
    /// `corrupt` changes data a READ or WRITE moves; neither touches FLUSH or GET_ID.
    pub fn applies_to(&self, op: Op) -> bool {
        match self {
            FaultKind::Short { .. } => op == Op::Read,
            FaultKind::Corrupt { .. } => matches!(op, Op::Read | Op::Write),
            _ => true,
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
    /// `hang` and `reset`: the first request after N matching ones.
    After(u64),
}

/// One `--fault` rule.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    /// What it does.
    pub kind: FaultKind,
    /// When.
    pub trigger: Trigger,
    /// Only requests with this op match (all ops the kind applies to when `None`).
    pub op: Option<Op>,
    /// Fire at most this many times (per device lifetime, like every counter).
    pub times: Option<u64>,
    /// Only requests on this queue match.
    pub queue: Option<u16>,
    /// Only requests whose bytes `[offset, offset + length)` meet this device byte range match
    /// (FLUSH and GET_ID, which have no range, never do).
    pub range: Option<Range<u64>>,
}

/// A `--fault` rule that does not parse. Every message names the whole rule and the bad part,
/// on one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultSpecError {
    /// The rule is empty.
    #[error(
        "fault '': empty rule (expected KIND:key=val,... with KIND one of {})",
        kinds()
    )]
    Empty,
    /// Unknown kind.
    #[error("fault '{spec}': unknown kind '{kind}' (expected one of {})", kinds())]
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
    #[error(
        "fault '{spec}': unknown key '{key}' (expected p, every, after, op, times, queue, \
         range, min, max, code, len or bits)"
    )]
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
    #[error(
        "fault '{spec}': bad count '{value}' for {key} (expected an integer from {min} to {max})"
    )]
    BadCount {
        /// The rule.
        spec: String,
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// Smallest value allowed.
        min: u64,
        /// Largest value allowed.
        max: u64,
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
    /// An op the kind cannot apply to.
    #[error("fault '{spec}': {kind} does not apply to {op} requests")]
    OpNotApplicable {
        /// The rule.
        spec: String,
        /// The kind.
        kind: &'static str,
        /// The op given.
        op: String,
    },
    /// A bad byte range.
    #[error("fault '{spec}': bad range '{value}' (expected START..END in bytes, START < END, e.g. 0..1M)")]
    BadRange {
        /// The rule.
        spec: String,
        /// The value given.
        value: String,
    },
    /// Not exactly one trigger.
    #[error("fault '{spec}': {kind} needs exactly one of {triggers}")]
    Trigger {
        /// The rule.
        spec: String,
        /// The kind.
        kind: &'static str,
        /// The triggers it takes.
        triggers: &'static str,
    },
    /// A required parameter is missing.
    #[error("fault '{spec}': {kind} needs {key}=")]
    Missing {
        /// The rule.
        spec: String,
        /// The kind.
        kind: &'static str,
        /// The key.
        key: &'static str,
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

fn kinds() -> String {
    FaultKind::NAMES.join(", ")
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

/// `START..END` with sizes as `--backing` takes them (`0..1M`, `4096..8192`).
fn parse_range(s: &str) -> Option<Range<u64>> {
    let (a, b) = s.split_once("..")?;
    let start = crate::backend::parse_size(a)?;
    let end = crate::backend::parse_size(b)?;
    (start < end).then_some(start..end)
}

/// Which keys a kind takes besides `op`, `times`, `queue` and `range`.
fn takes(kind: &str, key: &str) -> bool {
    match key {
        "op" | "times" | "queue" | "range" => true,
        "p" | "every" => kind != "hang",
        "after" => matches!(kind, "hang" | "reset"),
        "min" | "max" => kind == "delay",
        "code" => kind == "status",
        "len" => kind == "short",
        "bits" => kind == "corrupt",
        _ => false,
    }
}

impl FaultRule {
    /// A rule of `kind` on `trigger` for every request.
    pub fn new(kind: FaultKind, trigger: Trigger) -> FaultRule {
        FaultRule {
            kind,
            trigger,
            op: None,
            times: None,
            queue: None,
            range: None,
        }
    }

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
        let Some(kind_name) = FaultKind::NAMES.iter().copied().find(|n| *n == kind_str) else {
            return Err(FaultSpecError::UnknownKind {
                spec: owned(),
                kind: kind_str.to_string(),
            });
        };

        let mut values: Vec<(&str, &str)> = Vec::new();
        for part in rest.into_iter().flat_map(|r| r.split(',')) {
            let Some((key, value)) = part.split_once('=') else {
                return Err(FaultSpecError::NotKeyValue {
                    spec: owned(),
                    part: part.to_string(),
                });
            };
            let (key, value) = (key.trim(), value.trim());
            const KEYS: [&str; 12] = [
                "p", "every", "after", "op", "times", "queue", "range", "min", "max", "code",
                "len", "bits",
            ];
            if !KEYS.contains(&key) {
                return Err(FaultSpecError::UnknownKey {
                    spec: owned(),
                    key: key.to_string(),
                });
            }
            if !takes(kind_name, key) {
                return Err(FaultSpecError::NotApplicable {
                    spec: owned(),
                    key: key.to_string(),
                    kind: kind_name,
                });
            }
            if values.iter().any(|(k, _)| *k == key) {
                return Err(FaultSpecError::Duplicate {
                    spec: owned(),
                    key: key.to_string(),
                });
            }
            values.push((key, value));
        }
        let get = |key: &str| values.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let count =
            |key: &'static str, min: u64, max: u64| -> Result<Option<u64>, FaultSpecError> {
                get(key)
                    .map(|v| {
                        v.parse::<u64>()
                            .ok()
                            .filter(|n| (min..=max).contains(n))
                            .ok_or_else(|| FaultSpecError::BadCount {
                                spec: owned(),
                                key,
                                value: v.to_string(),
                                min,
                                max,
                            })
                    })
                    .transpose()
            };
        let duration = |key: &str| -> Result<Option<(Duration, String)>, FaultSpecError> {
            get(key)
                .map(|v| {
                    parse_duration(v)
                        .map(|d| (d, v.to_string()))
                        .ok_or_else(|| FaultSpecError::BadDuration {
                            spec: owned(),
                            value: v.to_string(),
                        })
                })
                .transpose()
        };

        let p = get("p")
            .map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=1.0).contains(p))
                    .ok_or_else(|| FaultSpecError::BadProbability {
                        spec: owned(),
                        value: v.to_string(),
                    })
            })
            .transpose()?;
        let every = count("every", 1, u64::MAX)?;
        let after = count("after", 0, u64::MAX)?;
        let trigger = match (p, every, after) {
            (Some(p), None, None) => Trigger::Probability(p),
            (None, Some(n), None) => Trigger::Every(n),
            (None, None, Some(n)) => Trigger::After(n),
            _ => {
                let triggers = match kind_name {
                    "hang" => "after=",
                    "reset" => "p=, every= and after=",
                    _ => "p= and every=",
                };
                return Err(FaultSpecError::Trigger {
                    spec: owned(),
                    kind: kind_name,
                    triggers,
                });
            }
        };
        let missing = |key: &'static str| FaultSpecError::Missing {
            spec: owned(),
            kind: kind_name,
            key,
        };
        let kind = match kind_name {
            "error" => FaultKind::Error,
            "drop" => FaultKind::Drop,
            "hang" => FaultKind::Hang,
            "reset" => FaultKind::Reset,
            "used-id" => FaultKind::UsedId,
            "used-dup" => FaultKind::UsedDup,
            "used-len" => FaultKind::UsedLen,
            "irq-lost" => FaultKind::IrqLost,
            "irq-spurious" => FaultKind::IrqSpurious,
            "chaos" => FaultKind::Chaos,
            "status" => FaultKind::Status {
                code: count("code", 0, 255)?.ok_or_else(|| missing("code"))? as u8,
            },
            "short" => FaultKind::Short {
                len: count("len", 0, u64::from(u32::MAX))?.ok_or_else(|| missing("len"))? as u32,
            },
            "corrupt" => FaultKind::Corrupt {
                bits: count("bits", 1, 64)?.unwrap_or(1) as u32,
            },
            _ => {
                let (lo, hi) = match (duration("min")?, duration("max")?) {
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
        let op = get("op")
            .map(|v| {
                Op::from_name(v).ok_or_else(|| FaultSpecError::BadOp {
                    spec: owned(),
                    value: v.to_string(),
                })
            })
            .transpose()?;
        if let Some(op) = op {
            if !kind.applies_to(op) {
                return Err(FaultSpecError::OpNotApplicable {
                    spec: owned(),
                    kind: kind_name,
                    op: op.to_string(),
                });
            }
        }
        let range = get("range")
            .map(|v| {
                parse_range(v).ok_or_else(|| FaultSpecError::BadRange {
                    spec: owned(),
                    value: v.to_string(),
                })
            })
            .transpose()?;
        Ok(FaultRule {
            kind,
            trigger,
            op,
            times: count("times", 1, u64::MAX)?,
            queue: count("queue", 0, u64::from(crate::abi::bar0::MAX_QUEUES) - 1)?
                .map(|q| q as u16),
            range,
        })
    }

    /// Whether the rule looks at a request with `op` on `queue` covering `offset..offset+len`.
    pub fn matches(&self, op: Op, queue: u16, offset: u64, len: u32) -> bool {
        if !self.kind.applies_to(op) || self.op.is_some_and(|o| o != op) {
            return false;
        }
        if self.queue.is_some_and(|q| q != queue) {
            return false;
        }
        match &self.range {
            None => true,
            Some(r) => {
                matches!(op, Op::Read | Op::Write)
                    && offset < r.end
                    && offset.saturating_add(u64::from(len)) > r.start
            }
        }
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
        match self.kind {
            FaultKind::Delay { min, max } => write!(
                f,
                ",min={},max={}",
                format_duration(min),
                format_duration(max)
            )?,
            FaultKind::Status { code } => write!(f, ",code={code}")?,
            FaultKind::Short { len } => write!(f, ",len={len}")?,
            FaultKind::Corrupt { bits } => write!(f, ",bits={bits}")?,
            _ => {}
        }
        if let Some(op) = self.op {
            write!(f, ",op={op}")?;
        }
        if let Some(n) = self.times {
            write!(f, ",times={n}")?;
        }
        if let Some(q) = self.queue {
            write!(f, ",queue={q}")?;
        }
        if let Some(r) = &self.range {
            write!(f, ",range={}..{}", r.start, r.end)?;
        }
        Ok(())
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
        assert_eq!(
            r,
            FaultRule::new(FaultKind::Error, Trigger::Probability(0.25))
        );

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
        let r = FaultRule::parse("hang:after=0").unwrap();
        assert_eq!((r.kind, r.trigger), (FaultKind::Hang, Trigger::After(0)));
        let r = FaultRule::parse("status:every=3,code=200").unwrap();
        assert_eq!(r.kind, FaultKind::Status { code: 200 });
        let r = FaultRule::parse("short:p=0.5,len=100").unwrap();
        assert_eq!(r.kind, FaultKind::Short { len: 100 });
        let r = FaultRule::parse("corrupt:every=1").unwrap();
        assert_eq!(r.kind, FaultKind::Corrupt { bits: 1 });
        let r = FaultRule::parse("reset:after=100,times=1").unwrap();
        assert_eq!(
            (r.kind, r.trigger, r.times),
            (FaultKind::Reset, Trigger::After(100), Some(1))
        );
        let r = FaultRule::parse("used-dup:every=7,queue=1,range=4K..1M").unwrap();
        assert_eq!(r.queue, Some(1));
        assert_eq!(r.range, Some(4096..1 << 20));
        for kind in ["used-id", "used-len", "irq-lost", "irq-spurious", "chaos"] {
            assert_eq!(
                FaultRule::parse(&format!("{kind}:p=0.1"))
                    .unwrap()
                    .kind
                    .name(),
                kind
            );
        }
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
            "status:p=0.1,code=7",
            "short:every=2,len=511",
            "corrupt:every=5,bits=3,op=write,times=2",
            "reset:after=10,queue=0",
            "used-len:p=1,range=0..4096",
            "chaos:p=0.05",
        ] {
            let rule = FaultRule::parse(spec).unwrap();
            assert_eq!(rule.to_string(), spec);
            assert_eq!(FaultRule::parse(&rule.to_string()).unwrap(), rule);
        }
    }

    #[test]
    fn rejects_bad_rules_naming_the_bad_part() {
        assert_eq!(
            err("delay:min=5xs,p=1"),
            "fault 'delay:min=5xs,p=1': bad duration '5xs' (expected an integer with ns, us, ms or s)"
        );
        assert!(err("").starts_with("fault '': empty"));
        assert!(err("explode:p=1").starts_with(
            "fault 'explode:p=1': unknown kind 'explode' (expected one of error, delay,"
        ));
        assert!(err("error:p=1.5").contains("bad probability '1.5'"));
        assert!(err("error:p=NaN").contains("bad probability 'NaN'"));
        assert!(err("error:every=0").contains("bad count '0' for every"));
        assert!(err("hang:after=x").contains("bad count 'x' for after"));
        assert!(err("error:op=erase,p=1").contains("bad op 'erase'"));
        assert!(err("error:p=0.1,every=2").contains("error needs exactly one of p= and every="));
        assert!(err("drop").contains("drop needs exactly one of p= and every="));
        assert!(err("hang").contains("hang needs exactly one of after="));
        assert!(err("hang:p=0.5").contains("'p' does not apply to hang"));
        assert!(err("error:p=1,min=1ms").contains("'min' does not apply to error"));
        assert!(err("error:after=1").contains("'after' does not apply to error"));
        assert!(err("delay:p=1").contains("delay needs min= and/or max="));
        assert!(err("delay:p=1,min=2ms,max=1ms").contains("min 2ms is greater than max 1ms"));
        assert!(err("error:p=1,p=0").contains("'p' given twice"));
        assert!(err("error:p").contains("expected key=value, got 'p'"));
        assert!(err("error:p=1,color=red").contains("unknown key 'color'"));
        assert!(err("status:p=1").contains("status needs code="));
        assert!(err("status:p=1,code=256").contains("bad count '256' for code"));
        assert!(err("short:p=1").contains("short needs len="));
        assert!(err("short:p=1,len=8,op=write").contains("short does not apply to write requests"));
        assert!(err("corrupt:p=1,op=flush").contains("corrupt does not apply to flush requests"));
        assert!(err("corrupt:p=1,bits=0").contains("bad count '0' for bits"));
        assert!(err("error:p=1,range=5..5").contains("bad range '5..5'"));
        assert!(err("error:p=1,range=1M").contains("bad range '1M'"));
        assert!(err("error:p=1,queue=63").contains("bad count '63' for queue"));
        assert!(err("error:p=1,times=0").contains("bad count '0' for times"));
        for spec in ["delay:min=5xs", "error", "x", "hang:after=1,op=no"] {
            assert!(!err(spec).contains('\n'));
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100us"), Some(Duration::from_micros(100)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("1.5ms"), None);
        assert_eq!(parse_duration("5"), None);
        assert_eq!(format_duration(Duration::from_micros(1500)), "1500us");
        assert_eq!(format_duration(Duration::from_millis(2000)), "2s");
    }

    #[test]
    fn matching_by_op_queue_and_range() {
        let r = FaultRule::parse("error:p=1,queue=1,range=4096..8192").unwrap();
        assert!(r.matches(Op::Read, 1, 4000, 100));
        assert!(r.matches(Op::Write, 1, 8191, 1));
        assert!(!r.matches(Op::Write, 1, 8192, 512));
        assert!(!r.matches(Op::Read, 1, 0, 4096));
        assert!(!r.matches(Op::Read, 0, 4096, 512));
        assert!(!r.matches(Op::Flush, 1, 4096, 0));
        let short = FaultRule::parse("short:p=1,len=1").unwrap();
        assert!(short.matches(Op::Read, 0, 0, 512));
        assert!(!short.matches(Op::Write, 0, 0, 512));
    }
}
