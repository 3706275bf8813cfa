//! Fault injection (SPEC section 7): `--fault KIND:key=val,...` rules ([`rule`]), the injector
//! that applies them in request order, deterministically for a seed ([`injector`]), and the
//! fault log that records what fired and replays it ([`log`]).
//!
//! Syntax: a kind, then one trigger — `p=<0..1>` (probability) or `every=<N≥1>` (the Nth, 2Nth,
//! ... matching request); `hang` takes `after=<N≥0>` instead (the first N matching requests are
//! served, the next one hangs the device) and `reset` takes any of the three. Every kind accepts
//! `op=read|write|flush|get_id`, `times=N` (fire at most N times), `queue=Q` and
//! `range=START..END` (device bytes a READ or WRITE must touch). Kind parameters: `delay`
//! `min=`/`max=` durations (`ns`, `us`, `ms`, `s`; a missing `min` is 0, a missing `max` equals
//! `min`), `status` `code=0..255`, `short` `len=` bytes, `corrupt` `bits=1..64` (default 1).
//!
//! Examples: `error:p=0.01`, `delay:every=10,min=100us,max=2ms,op=read`, `drop:every=1000`,
//! `hang:after=500`, `status:every=50,code=9`, `corrupt:p=0.01,bits=2,op=write`,
//! `reset:after=1000,times=1`, `used-dup:every=100,queue=0`, `chaos:p=0.01`.
//!
//! Determinism: the device thread owns one [`FaultInjector`] and consults it once per valid
//! request, in the order requests are popped from the queues; every `p=` rule matching the
//! request draws one number from a single SplitMix64 stream, whether or not an earlier rule
//! fired, and a fired rule draws its parameters from the same stream. A reset restarts the
//! injector (counters and stream) from the seed.

pub mod injector;
pub mod log;
pub mod rule;

pub use injector::{
    corrupt_positions, Decision, FaultInjector, RequestFacts, Scheduled, SplitMix64,
};
pub use rule::{format_duration, parse_duration, FaultKind, FaultRule, FaultSpecError, Trigger};
