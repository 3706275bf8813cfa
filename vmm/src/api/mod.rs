//! Runtime control of a running VM (`aiodma run --api-sock PATH`, `aiodma ctl`): a small
//! REST-like HTTP/JSON API on a Unix socket, in the manner of Firecracker's and Cloud
//! Hypervisor's, served by hyper's HTTP/1 server on a current-thread tokio runtime in its own
//! thread (`aiodma-api`), which installs its own seccomp filter once set up.
//!
//! - [`routes`]: the resources (`/faults`, `/device/*`, `/metrics`) and their JSON, on the
//!   device's [`DeviceControl`](aiodma_device::engine::DeviceControl) handle.
//! - [`server`]: where the API is served. Directly on KVM that is the socket at PATH. In the
//!   emulated host it is a virtio-serial port ([`port`]), because a socket created by the
//!   level-1 VMM would live in level 1 only: level 0 listens at PATH and relays every request,
//!   as HTTP, over that port ([`forward`]).
//! - [`client`]: `aiodma ctl`, hyper's HTTP/1 client.
//! - [`socket`]: the socket file (a stale one is replaced, a live one refused), removed at exit.

pub mod client;
pub mod forward;
mod http;
pub mod port;
pub mod routes;
pub mod server;
pub mod socket;

use std::io;
use std::path::PathBuf;

pub use routes::DeviceApi;
pub use server::{ApiServer, Endpoint, StartHook};

/// Why the API could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process serves the socket already.
    #[error("--api-sock {0}: another process is listening there")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("--api-sock {0}: exists and is not a socket (remove it, or choose another path)")]
    NotASocket(PathBuf),
    /// The socket could not be created.
    #[error("--api-sock {path}: cannot listen there: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// Inside the emulated host, the port that level 0 forwards the socket to is missing.
    #[error("--api-sock: no virtio-serial port '{name}' in the emulated host: {reason}")]
    NoPort {
        /// The port's name.
        name: &'static str,
        /// What was found instead.
        reason: String,
    },
    /// An OS resource (runtime, thread) could not be created.
    #[error("API: {0}: {1}")]
    Os(&'static str, io::Error),
}

impl ApiError {
    /// Exit code: a path that cannot be used is the user's to fix (2), the rest are failures (3).
    pub fn exit_code(&self) -> u8 {
        match self {
            ApiError::InUse(_) | ApiError::NotASocket(_) | ApiError::Bind { .. } => {
                crate::exit::EXIT_BAD_INPUT
            }
            ApiError::NoPort { .. } | ApiError::Os(..) => crate::exit::EXIT_KVM_FAILURE,
        }
    }
}
