//! The aiodma emulated DMA device.
//!
//! `abi` is the dependency-free contract shared with the guest (included by path by the guest
//! kernel module and the guest tools).

pub mod abi;
pub mod backend;
pub mod engine;
pub mod fault;
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
#[cfg(test)]
mod hostile;
pub mod metrics;
pub mod pci;
pub mod ratelimit;
pub mod request;
pub mod transport;
