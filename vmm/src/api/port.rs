//! The virtio-serial port that carries the API between level 0 and the VMM inside the
//! emulated host: found by its name (QEMU's `virtserialport,name=`) in sysfs, opened
//! non-blocking, and driven by tokio through its poll support like a socket.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::ApiError;

/// The port's name, as level 0 gives it to QEMU.
pub const PORT_NAME: &str = "org.aiodma.api";

/// The device node of the virtio-serial port called `name`, from `sys_ports` (normally
/// `/sys/class/virtio-ports`, whose entries `vportNpM` hold a `name` file) and `dev` (`/dev`).
pub fn find(sys_ports: &Path, dev: &Path, name: &'static str) -> Result<PathBuf, ApiError> {
    let no_port = |reason: String| ApiError::NoPort { name, reason };
    let entries = std::fs::read_dir(sys_ports)
        .map_err(|e| no_port(format!("{}: {e}", sys_ports.display())))?;
    let mut seen = Vec::new();
    for entry in entries.flatten() {
        let port = entry.file_name();
        let Ok(text) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        let text = text.trim();
        if text == name {
            return Ok(dev.join(port));
        }
        seen.push(format!("{}={text:?}", port.to_string_lossy()));
    }
    seen.sort();
    Err(no_port(if seen.is_empty() {
        "no named ports".into()
    } else {
        format!("ports: {}", seen.join(", "))
    }))
}

/// Open a port's device node for the API (read-write, non-blocking).
pub fn open(path: &Path) -> Result<File, ApiError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| ApiError::NoPort {
            name: PORT_NAME,
            reason: format!("{}: {e}", path.display()),
        })
}

/// A non-blocking file (a virtio-serial port) as a tokio byte stream. It cannot be half-closed:
/// shutting it down does nothing.
#[derive(Debug)]
pub struct PortStream {
    fd: AsyncFd<File>,
}

impl PortStream {
    /// Register `file` (opened with `O_NONBLOCK`) with the current runtime.
    pub fn new(file: File) -> io::Result<Self> {
        // SAFETY: the `File` owns its descriptor for as long as the `AsyncFd` holds it, and
        // this type never swaps it (no `get_mut`).
        let fd = unsafe { AsyncFd::register(file) }?;
        Ok(Self { fd })
    }
}

impl AsyncRead for PortStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PortStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| fd.get_ref().write(buf)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn the_port_is_found_by_name() {
        let root = std::env::temp_dir().join(format!("aiodma-ports-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let sys = root.join("virtio-ports");
        for (port, name) in [("vport0p0", None), ("vport0p1", Some("org.aiodma.api\n"))] {
            std::fs::create_dir_all(sys.join(port)).unwrap();
            if let Some(name) = name {
                std::fs::write(sys.join(port).join("name"), name).unwrap();
            }
        }
        std::fs::write(sys.join("vport0p0/name"), "").unwrap();
        assert_eq!(
            find(&sys, Path::new("/dev"), PORT_NAME).unwrap(),
            Path::new("/dev/vport0p1")
        );
        let err = find(&sys, Path::new("/dev"), "other").unwrap_err();
        assert!(
            err.to_string()
                .contains("ports: vport0p0=\"\", vport0p1=\"org.aiodma.api\""),
            "{err}"
        );
        let err = find(&root.join("missing"), Path::new("/dev"), PORT_NAME).unwrap_err();
        assert!(err.to_string().contains("no virtio-serial port"), "{err}");
        assert_eq!(err.exit_code(), 3);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// One end of a socket pair stands in for the port device (both poll the same way).
    #[test]
    fn a_port_is_a_byte_stream() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            let mut port = PortStream::new(File::from(OwnedFd::from(a))).unwrap();
            let mut peer = tokio::net::UnixStream::from_std({
                b.set_nonblocking(true).unwrap();
                b
            })
            .unwrap();
            // More than a socket buffer holds, so the writer has to wait for the reader.
            let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
            let expected = data.clone();
            let writer = async move {
                port.write_all(&data).await.unwrap();
                port.shutdown().await.unwrap();
                let mut back = [0u8; 5];
                port.read_exact(&mut back).await.unwrap();
                assert_eq!(&back, b"hello");
            };
            let reader = async move {
                let mut got = vec![0u8; expected.len()];
                peer.read_exact(&mut got).await.unwrap();
                assert!(got == expected);
                peer.write_all(b"hello").await.unwrap();
            };
            tokio::join!(writer, reader);
        });
    }
}
