//! The VMM's side: the API thread, serving [`routes`](super::routes) on the socket, or inside
//! the emulated host on the port that level 0 relays the socket to.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use hyper::body::Incoming;
use hyper::Request;
use tokio::sync::oneshot;

use super::http::{read_body, response, serve_socket, serve_stream, FullResponse};
use super::port::{self, PortStream, PORT_NAME};
use super::routes::{route, DeviceApi};
use super::socket::{self, SocketPath};
use super::ApiError;

/// Run in the API thread once it is set up, before it serves anything (the VMM installs the
/// thread's seccomp filter there). An error stops the thread before it serves.
pub type StartHook = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// Where the API is served.
#[derive(Debug)]
pub enum Endpoint {
    /// A listening socket, and its file.
    Socket(std::os::unix::net::UnixListener, SocketPath),
    /// The emulated host's virtio-serial port (its device node, opened).
    Port(PathBuf, File),
}

impl Endpoint {
    /// Where `--api-sock PATH` is served: PATH itself, or, inside the emulated host (where
    /// level 0 listens at PATH and relays to this VMM), the port called [`PORT_NAME`].
    pub fn open(path: &Path) -> Result<Endpoint, ApiError> {
        if std::env::var_os(crate::host::IN_EMULATED_HOST_ENV).is_some() {
            let node = port::find(
                Path::new("/sys/class/virtio-ports"),
                Path::new("/dev"),
                PORT_NAME,
            )?;
            let file = port::open(&node)?;
            return Ok(Endpoint::Port(node, file));
        }
        let (listener, guard) = socket::bind(path)?;
        Ok(Endpoint::Socket(listener, guard))
    }

    fn describe(&self) -> String {
        match self {
            Endpoint::Socket(_, guard) => guard.path().display().to_string(),
            Endpoint::Port(node, _) => format!("{} (relayed by level 0)", node.display()),
        }
    }
}

/// A thread running one future on its own current-thread runtime until the handle is dropped.
#[derive(Debug)]
pub(crate) struct ApiThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiThread {
    /// Build a runtime here, make the future with `setup` inside it (so sockets register with
    /// it before the thread starts), then run it on thread `name`: `on_start` first, then the
    /// future until it ends or the handle is dropped. `keep` is dropped when the thread ends,
    /// after the runtime (e.g. a socket file to remove).
    pub(crate) fn spawn<S, F, K>(
        name: &str,
        on_start: Option<StartHook>,
        keep: K,
        setup: S,
    ) -> Result<ApiThread, ApiError>
    where
        S: FnOnce() -> std::io::Result<F>,
        F: Future<Output = ()> + Send + 'static,
        K: Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| ApiError::Os("tokio runtime", e))?;
        let serve = {
            let _entered = runtime.enter();
            setup().map_err(|e| ApiError::Os("register with the runtime", e))?
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if let Some(hook) = on_start {
                    if let Err(e) = hook() {
                        log::error!("api: not serving: {e}");
                        return;
                    }
                }
                runtime.block_on(async {
                    tokio::select! {
                        _ = stopped => {}
                        () = serve => {}
                    }
                });
                // Ends every connection's task; then the socket file goes.
                drop(runtime);
                drop(keep);
            })
            .map_err(|e| ApiError::Os("spawn the API thread", e))?;
        Ok(ApiThread {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for ApiThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::warn!("api: the API thread panicked");
            }
        }
    }
}

/// The running API; dropping it stops the thread and removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    _thread: ApiThread,
}

async fn handle(device: Arc<dyn DeviceApi>, req: Request<Incoming>) -> FullResponse {
    let (parts, body) = req.into_parts();
    let reply = match read_body(body).await {
        Ok(body) => route(&*device, &parts.method, parts.uri.path(), &body),
        Err(reply) => reply,
    };
    log::debug!(
        "api: {} {} -> {}",
        parts.method,
        parts.uri.path(),
        reply.status
    );
    response(reply)
}

impl ApiServer {
    /// Serve the API for `device` at `endpoint` on thread `aiodma-api`.
    pub fn spawn(
        endpoint: Endpoint,
        device: Arc<dyn DeviceApi>,
        on_start: Option<StartHook>,
    ) -> Result<ApiServer, ApiError> {
        let handler = move |req| handle(device.clone(), req);
        log::info!("api: serving on {}", endpoint.describe());
        let thread = match endpoint {
            Endpoint::Socket(listener, guard) => {
                ApiThread::spawn("aiodma-api", on_start, guard, move || {
                    let listener = tokio::net::UnixListener::from_std(listener)?;
                    Ok(Box::pin(serve_socket(listener, handler))
                        as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>)
                })?
            }
            Endpoint::Port(node, file) => {
                ApiThread::spawn("aiodma-api", on_start, (), move || {
                    let port = PortStream::new(file)?;
                    Ok(Box::pin(async move {
                        // One HTTP connection for the VM's life: level 0 sends every request
                        // on it, one after the other.
                        match serve_stream(port, handler, false).await {
                            Ok(()) => log::debug!("api: level 0 closed {}", node.display()),
                            Err(e) => log::warn!("api: {}: {e}", node.display()),
                        }
                    })
                        as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>)
                })?
            }
        };
        Ok(ApiServer { _thread: thread })
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;

    use aiodma_device::engine::ControlError;
    use aiodma_device::fault::FaultRule;
    use aiodma_device::metrics::DeviceMetrics;

    use super::*;

    #[derive(Default)]
    struct Rules(Mutex<Vec<FaultRule>>);

    impl DeviceApi for Rules {
        fn faults(&self) -> Vec<FaultRule> {
            self.0.lock().unwrap().clone()
        }
        fn add_fault(&self, rule: FaultRule) -> Result<usize, ControlError> {
            let mut rules = self.0.lock().unwrap();
            rules.push(rule);
            Ok(rules.len() - 1)
        }
        fn remove_fault(&self, _index: usize) -> Result<FaultRule, ControlError> {
            Err(ControlError::Stopped)
        }
        fn clear_faults(&self) -> Result<(), ControlError> {
            Ok(())
        }
        fn request_reset(&self) -> Result<(), ControlError> {
            Ok(())
        }
        fn hang(&self) -> Result<(), ControlError> {
            Ok(())
        }
        fn pause(&self, _paused: bool) -> Result<(), ControlError> {
            Ok(())
        }
        fn metrics(&self) -> DeviceMetrics {
            DeviceMetrics::default()
        }
    }

    fn raw(path: &Path, request: &str) -> String {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn served_on_a_socket_until_dropped() {
        let dir = std::env::temp_dir().join(format!("aiodma-api-srv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let (listener, guard) = socket::bind(&path).unwrap();
        let started = Arc::new(Mutex::new(false));
        let flag = started.clone();
        let hook: StartHook = Box::new(move || {
            *flag.lock().unwrap() = true;
            Ok(())
        });
        let server = ApiServer::spawn(
            Endpoint::Socket(listener, guard),
            Arc::new(Rules::default()),
            Some(hook),
        )
        .unwrap();
        let body = r#"{"rule":"error:every=1,op=write"}"#;
        let out = raw(
            &path,
            &format!(
                "PUT /faults HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        assert!(out.starts_with("HTTP/1.1 201 Created\r\n"), "{out}");
        assert!(out.contains("content-type: application/json"), "{out}");
        assert!(out.ends_with(r#"{"index":0}"#), "{out}");
        let out = raw(&path, "GET /faults HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(
            out.ends_with(r#"{"faults":["error:every=1,op=write"]}"#),
            "{out}"
        );
        let out = raw(
            &path,
            "DELETE /faults/0 HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        let out = raw(&path, "GARBAGE\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        let big = "x".repeat(super::super::routes::MAX_BODY + 1);
        let out = raw(
            &path,
            &format!(
                "PUT /faults HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{big}",
                big.len()
            ),
        );
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
        assert!(*started.lock().unwrap());
        drop(server);
        assert!(!path.exists(), "the socket file goes with the server");
        assert!(UnixStream::connect(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failing_hook_serves_nothing() {
        let dir = std::env::temp_dir().join(format!("aiodma-api-hook-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let (listener, guard) = socket::bind(&path).unwrap();
        let server = ApiServer::spawn(
            Endpoint::Socket(listener, guard),
            Arc::new(Rules::default()),
            Some(Box::new(|| Err("no filter".to_string()))),
        )
        .unwrap();
        // The thread ended at once: the listener is closed and its file removed.
        drop(server);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The API thread under its real seccomp filter (`--seccomp on`): a system call the
    /// filter lacks would end this test process with status 159.
    #[test]
    fn the_api_thread_serves_under_its_seccomp_filter() {
        use crate::api::client::{call, ApiCall};
        use crate::cli::{CtlCommand, FaultCommand};
        use crate::seccomp::{Filters, SeccompMode, ThreadKind};

        let filters = match Filters::new(SeccompMode::On) {
            Ok(Some(filters)) => filters,
            other => {
                eprintln!("skipped: no seccomp filters here: {other:?}");
                return;
            }
        };
        let dir = std::env::temp_dir().join(format!("aiodma-api-bpf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let (listener, guard) = socket::bind(&path).unwrap();
        let hook: StartHook =
            Box::new(move || filters.install(ThreadKind::Api).map_err(|e| e.to_string()));
        let server = ApiServer::spawn(
            Endpoint::Socket(listener, guard),
            Arc::new(Rules::default()),
            Some(hook),
        )
        .unwrap();
        let t = std::time::Duration::from_secs(10);
        for _ in 0..3 {
            let add = ApiCall::from_command(&CtlCommand::Fault(FaultCommand::Add {
                rule: "error:p=0.5".into(),
            }));
            assert_eq!(call(&path, &add, t).unwrap().status, 201);
            let list = ApiCall::from_command(&CtlCommand::Fault(FaultCommand::List));
            assert!(call(&path, &list, t).unwrap().body.contains("error:p=0.5"));
            let out = raw(&path, "GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n");
            assert!(out.starts_with("HTTP/1.1 404"), "{out}");
            // A client that goes away mid-request.
            let mut s = UnixStream::connect(&path).unwrap();
            s.write_all(b"PUT /faults HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
                .unwrap();
            drop(s);
        }
        drop(server);
        assert!(!path.exists(), "the filtered thread removed its socket");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
