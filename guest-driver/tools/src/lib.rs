//! Shared code for the guest userspace tools (static binaries that run inside the test guest).

#[path = "../../../device/src/abi.rs"]
pub mod abi;

pub mod aio;
pub mod bench;
pub mod cancel;
pub mod edge;
pub mod port;
pub mod suite;
pub mod util;
