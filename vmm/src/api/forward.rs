//! Level 0's side of the API in the emulated host.
//!
//! A socket that the VMM in level 1 created would exist only in level 1 (its files reach the
//! host through 9p, which carries no sockets). So level 0 listens at `--api-sock PATH` itself
//! and relays each request over a virtio-serial port: QEMU connects the port's chardev to a
//! socket in the job directory ([`Forwarder::start`] listens there before QEMU starts), and
//! the VMM inside serves HTTP on the port ([`Endpoint::Port`](super::Endpoint::Port)). The
//! link is one keep-alive HTTP/1.1 connection for the VM's life: requests from any number of
//! clients take turns on it, each parsed here by hyper's server and re-sent by hyper's client
//! (so only whole, well-formed requests cross). Requests sent before the VMM inside opens the
//! port wait in the link (QEMU reads nothing for a port the guest has not opened); once the
//! link is gone (the VM stopped), clients get 503.

use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{ALLOW, CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::http::{read_body, response, serve_socket, FullResponse};
use super::routes::Reply;
use super::server::ApiThread;
use super::socket;
use super::ApiError;

/// The link to the VMM inside: `None` once it is gone.
type Link = Arc<Mutex<Option<SendRequest<Full<Bytes>>>>>;

/// Level 0's relay; dropping it stops it and removes the socket file.
#[derive(Debug)]
pub struct Forwarder {
    _thread: ApiThread,
}

fn gone(why: impl std::fmt::Display) -> FullResponse {
    response(Reply::error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the VM is not running: {why}"),
    ))
}

/// Send one request over the link and return the VMM's response.
async fn relay(link: Link, req: Request<Incoming>) -> FullResponse {
    let (parts, body) = req.into_parts();
    let body = match read_body(body).await {
        Ok(body) => body,
        Err(reply) => return response(reply),
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), ToString::to_string);
    let mut builder = Request::builder()
        .method(parts.method)
        .uri(path)
        .header(HOST, "localhost");
    if let Some(kind) = parts.headers.get(CONTENT_TYPE) {
        builder = builder.header(CONTENT_TYPE, kind);
    }
    let inner = match builder.body(Full::new(body)) {
        Ok(inner) => inner,
        Err(e) => {
            return response(Reply::error(
                StatusCode::BAD_REQUEST,
                format!("cannot relay the request: {e}"),
            ))
        }
    };
    // One request at a time on the link.
    let mut slot = link.lock().await;
    let Some(sender) = slot.as_mut() else {
        return gone("no link to the emulated host");
    };
    let answer = async {
        sender.ready().await?;
        let resp = sender.send_request(inner).await?;
        let (parts, body) = resp.into_parts();
        Ok::<_, hyper::Error>((parts, body.collect().await?.to_bytes()))
    };
    match answer.await {
        Ok((parts, body)) => {
            let mut out = hyper::Response::new(Full::new(body));
            *out.status_mut() = parts.status;
            for name in [CONTENT_TYPE, ALLOW] {
                if let Some(value) = parts.headers.get(&name) {
                    out.headers_mut().insert(name, value.clone());
                }
            }
            out
        }
        Err(e) => {
            *slot = None;
            log::debug!("api: the link to the emulated host ended: {e}");
            gone(e)
        }
    }
}

/// Wait for QEMU on `link_listener`, then open the HTTP connection over it. `slot` is the
/// link's, held until the link is up, so requests wait for it.
async fn connect(
    link_listener: UnixListener,
    mut slot: OwnedMutexGuard<Option<SendRequest<Full<Bytes>>>>,
) {
    let stream = match link_listener.accept().await {
        Ok((stream, _)) => stream,
        Err(e) => {
            log::warn!("api: QEMU did not connect the API port: {e}");
            return;
        }
    };
    drop(link_listener);
    match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok((sender, connection)) => {
            *slot = Some(sender);
            drop(slot);
            if let Err(e) = connection.await {
                log::debug!("api: link: {e}");
            }
        }
        Err(e) => log::warn!("api: link to the emulated host: {e}"),
    }
}

impl Forwarder {
    /// Listen at `api_sock` (as the VMM would: see [`socket::bind`]) and at `link_path` for
    /// QEMU's chardev, then relay on thread `aiodma-api-relay`.
    pub fn start(api_sock: &Path, link_path: &Path) -> Result<Forwarder, ApiError> {
        let (listener, guard) = socket::bind(api_sock)?;
        let link_listener = std::os::unix::net::UnixListener::bind(link_path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| ApiError::Os("listen for QEMU's API port", e))?;
        log::debug!(
            "api: relaying {} to the emulated host through {}",
            api_sock.display(),
            link_path.display()
        );
        let thread = ApiThread::spawn("aiodma-api-relay", None, guard, move || {
            let listener = UnixListener::from_std(listener)?;
            let link_listener = UnixListener::from_std(link_listener)?;
            let link: Link = Arc::new(Mutex::new(None));
            Ok(async move {
                let handler = {
                    let link = link.clone();
                    move |req| relay(link.clone(), req)
                };
                let slot = link.clone().lock_owned().await;
                let link_task = tokio::spawn(connect(link_listener, slot));
                serve_socket(listener, handler).await;
                link_task.abort();
            })
        })?;
        Ok(Forwarder { _thread: thread })
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::OwnedFd;
    use std::time::Duration;

    use super::*;
    use crate::api::client::{call, ApiCall};
    use crate::api::routes::FixedDevice;
    use crate::api::{ApiServer, Endpoint};
    use crate::cli::{CtlCommand, FaultCommand};

    /// Level 0's relay in front of the VMM's server on the "port" (here the far end of the
    /// link socket, as QEMU would connect it), clients on the API socket.
    #[test]
    fn requests_cross_the_link_and_a_lost_link_is_503() {
        let dir = std::env::temp_dir().join(format!("aiodma-api-fwd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (api, link) = (dir.join("api.sock"), dir.join("link.sock"));
        let forwarder = Forwarder::start(&api, &link).unwrap();
        let t = Duration::from_secs(20);
        let list = ApiCall::from_command(&CtlCommand::Fault(FaultCommand::List));

        // A request before the VMM is there waits for it.
        let early = {
            let api = api.clone();
            let list = list.clone();
            std::thread::spawn(move || call(&api, &list, t))
        };
        std::thread::sleep(Duration::from_millis(200));
        let qemu = std::os::unix::net::UnixStream::connect(&link).unwrap();
        qemu.set_nonblocking(true).unwrap();
        let port = File::from(OwnedFd::from(qemu));
        let inner = ApiServer::spawn(
            Endpoint::Port("/dev/vport0p1".into(), port),
            Arc::new(FixedDevice {
                rule: "error:every=1,op=write",
                added_at: 1,
            }),
            None,
        )
        .unwrap();
        let a = early.join().unwrap().unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.body, r#"{"faults":["error:every=1,op=write"]}"#);

        // Several clients at once take turns on the link.
        let clients: Vec<_> = (0..8)
            .map(|i| {
                let api = api.clone();
                std::thread::spawn(move || {
                    let cmd = if i % 2 == 0 {
                        CtlCommand::Fault(FaultCommand::Rm { index: i })
                    } else {
                        CtlCommand::Fault(FaultCommand::Add {
                            rule: "delay:every=1,min=1ms,max=1ms".into(),
                        })
                    };
                    call(&api, &ApiCall::from_command(&cmd), t).unwrap()
                })
            })
            .collect();
        for (i, c) in clients.into_iter().enumerate() {
            let a = c.join().unwrap();
            if i % 2 == 0 {
                assert_eq!(a.status, StatusCode::NOT_FOUND);
                assert_eq!(
                    a.error_message(),
                    format!("no fault rule {i} (there are 1) (HTTP 404)")
                );
            } else {
                assert_eq!(
                    (a.status, a.body.as_str()),
                    (StatusCode::CREATED, r#"{"index":1}"#)
                );
            }
        }
        let a = call(&api, &ApiCall::from_command(&CtlCommand::Hang), t).unwrap();
        assert_eq!(a.status, StatusCode::NO_CONTENT);
        let post = ApiCall {
            method: hyper::Method::POST,
            ..ApiCall::from_command(&CtlCommand::Metrics)
        };
        let a = call(&api, &post, t).unwrap();
        assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);

        // The VM stops: its end of the link closes.
        drop(inner);
        let a = call(&api, &list, t).unwrap();
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            a.error_message().starts_with("the VM is not running"),
            "{a:?}"
        );
        drop(forwarder);
        assert!(!api.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
