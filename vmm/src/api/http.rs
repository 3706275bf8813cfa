//! HTTP plumbing shared by the VMM's server and level 0's forwarder: bodies read within
//! [`MAX_BODY`], replies turned into responses, connections served by hyper's HTTP/1 server.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;

use super::routes::{Reply, MAX_BODY};

/// A response with a complete body.
pub(crate) type FullResponse = Response<Full<Bytes>>;

/// How long a client on the socket may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The request body, or the reply that refuses it (413 past [`MAX_BODY`], 400 if unreadable).
pub(crate) async fn read_body(body: Incoming) -> Result<Bytes, Reply> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {MAX_BODY} bytes"),
        )),
        Err(e) => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        )),
    }
}

/// `reply` as an HTTP response (`Content-Type: application/json` when it has a body).
pub(crate) fn response(reply: Reply) -> FullResponse {
    let has_body = reply.body.is_some();
    let mut resp = Response::new(
        reply
            .body
            .map(Bytes::from)
            .map(Full::new)
            .unwrap_or_default(),
    );
    *resp.status_mut() = reply.status;
    if has_body {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    if let Some(allow) = reply.allow {
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
    }
    resp
}

/// Serve HTTP/1 requests on one byte stream with `handler` until the peer closes it or an
/// error ends it. `timeout`: bound the time a request's headers may take (for clients on the
/// socket; not for the emulated host's link, which waits idle between requests).
pub(crate) async fn serve_stream<I, H, F>(
    io: I,
    handler: H,
    timeout: bool,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = FullResponse> + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    if timeout {
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT);
    }
    let service = service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(req).await) }
    });
    builder.serve_connection(TokioIo::new(io), service).await
}

/// Accept connections on `listener` forever, each served by [`serve_stream`] in its own task.
pub(crate) async fn serve_socket<H, F>(listener: UnixListener, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = FullResponse> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_stream(stream, handler, true).await {
                        log::debug!("api: connection: {e}");
                    }
                });
            }
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning.
                log::warn!("api: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_become_responses() {
        let r = response(Reply::error(StatusCode::NOT_FOUND, "no"));
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        assert!(r.headers().get(ALLOW).is_none());
        let r = response(Reply {
            status: StatusCode::NO_CONTENT,
            body: None,
            allow: Some("PUT"),
        });
        assert!(r.headers().get(CONTENT_TYPE).is_none());
        assert_eq!(r.headers()[ALLOW], "PUT");
    }
}
