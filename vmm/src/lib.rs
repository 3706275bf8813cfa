//! aiodma VMM library: everything behind the `aiodma` binary.
//!
//! - `cli`: flags; `config`: validated VM configuration
//! - `host`: where KVM comes from (this machine's, or the emulated host)
//! - `arch`: x86_64 boot structures; `vstate`: KVM VM and vCPUs; `devices`: what the guest sees
//! - `vmm`: builds and runs a VM; `exit`: why it stopped and the exit code
//! - `bench`: benchmarks that print a table (boot time and memory next to QEMU)
//! - `seccomp`: system call filters per thread kind (`--seccomp`)
//! - `api`: the runtime-control API (`run --api-sock`, `ctl`)

pub mod api;
pub mod arch;
pub mod bench;
pub mod cli;
pub mod config;
pub mod devices;
pub mod exit;
pub mod host;
pub mod metrics;
pub mod peer;
pub mod seccomp;
pub mod vmm;
pub mod vstate;
