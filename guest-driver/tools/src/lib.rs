//! Shared code for the guest userspace tools (static binaries that run inside the test guest).

#[path = "../../../device/src/abi.rs"]
pub mod abi;

pub mod aio;
pub mod port;
