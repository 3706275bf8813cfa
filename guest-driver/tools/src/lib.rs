//! Shared code for the guest userspace tools (static binaries that run inside the test guest).

#[path = "../../../device/src/abi.rs"]
pub mod abi;

pub mod abandon;
pub mod aio;
pub mod bench;
pub mod cancel;
pub mod churn;
pub mod edge;
pub mod nowait;
pub mod port;
pub mod proc;
pub mod sigstorm;
pub mod soak;
pub mod suite;
pub mod util;
