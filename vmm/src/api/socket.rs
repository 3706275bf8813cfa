//! The API's socket file: created owner-only, a stale one (nobody listening, e.g. left by a
//! killed run) replaced, a live one refused, and removed when its [`SocketPath`] is dropped,
//! unless another file has taken its place since.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::ApiError;

/// Removes the socket file it names on drop, if it is still the one that was created.
#[derive(Debug)]
pub struct SocketPath {
    path: PathBuf,
    /// (device, inode) of the socket file created.
    id: Option<(u64, u64)>,
}

impl SocketPath {
    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let same = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && Some((m.dev(), m.ino())) == self.id);
        if same {
            match std::fs::remove_file(&self.path) {
                Ok(()) => log::debug!("api: removed {}", self.path.display()),
                Err(e) => log::warn!("api: cannot remove {}: {e}", self.path.display()),
            }
        }
    }
}

/// Listen at `path`. A socket already there is replaced if nobody accepts connections on it
/// (stale), and refused if somebody does; any other file there is refused.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketPath), ApiError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ApiError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("api: replacing the stale socket {}", path.display());
                std::fs::remove_file(path).map_err(|source| ApiError::Bind {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            Err(source) => {
                return Err(ApiError::Bind {
                    path: path.to_path_buf(),
                    source,
                })
            }
        },
        Ok(_) => return Err(ApiError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ApiError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let bind_err = |source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    let meta = std::fs::symlink_metadata(path);
    let guard = SocketPath {
        path: path.to_path_buf(),
        id: meta.as_ref().ok().map(|m| (m.dev(), m.ino())),
    };
    // The API can hang the device: only its owner may connect.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok((listener, guard))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("aiodma-sock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn created_owner_only_and_removed_on_drop() {
        let dir = scratch("drop");
        let path = dir.join("api.sock");
        let (listener, guard) = bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(guard.path(), path);
        drop(listener);
        drop(guard);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = scratch("live");
        let path = dir.join("api.sock");
        let (live, guard) = bind(&path).unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, ApiError::InUse(_)), "{err}");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("another process is listening"));
        // Closed without removing the file: stale.
        drop(live);
        std::mem::forget(guard);
        let (_listener, _guard) = bind(&path).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn other_files_and_missing_dirs_are_refused() {
        let dir = scratch("other");
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        let err = bind(&file).unwrap_err();
        assert!(matches!(err, ApiError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
        let err = bind(&dir.join("missing/api.sock")).unwrap_err();
        assert!(matches!(err, ApiError::Bind { .. }), "{err}");
        assert_eq!(err.exit_code(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_replaced_file_is_not_removed() {
        let dir = scratch("replaced");
        let path = dir.join("api.sock");
        let (listener, guard) = bind(&path).unwrap();
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(guard);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
