//! `aiodma ctl`: one API request with hyper's HTTP/1 client, its answer printed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::cli::{CtlCommand, FaultCommand};

/// A request to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiCall {
    /// The method.
    pub method: Method,
    /// The path.
    pub path: String,
    /// A JSON body.
    pub body: Option<String>,
}

impl ApiCall {
    /// The request a `ctl` command makes.
    pub fn from_command(command: &CtlCommand) -> ApiCall {
        let call = |method, path: &str| ApiCall {
            method,
            path: path.to_string(),
            body: None,
        };
        match command {
            CtlCommand::Fault(FaultCommand::Add { rule }) => ApiCall {
                body: Some(serde_json::json!({ "rule": rule }).to_string()),
                ..call(Method::PUT, "/faults")
            },
            CtlCommand::Fault(FaultCommand::List) => call(Method::GET, "/faults"),
            CtlCommand::Fault(FaultCommand::Rm { index }) => {
                call(Method::DELETE, &format!("/faults/{index}"))
            }
            CtlCommand::Fault(FaultCommand::Clear) => call(Method::DELETE, "/faults"),
            CtlCommand::Reset => call(Method::PUT, "/device/reset"),
            CtlCommand::Hang => call(Method::PUT, "/device/hang"),
            CtlCommand::Pause => call(Method::PUT, "/device/pause"),
            CtlCommand::Resume => call(Method::PUT, "/device/resume"),
            CtlCommand::Metrics => call(Method::GET, "/metrics"),
        }
    }
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiAnswer {
    /// The status.
    pub status: StatusCode,
    /// The body (JSON, or empty).
    pub body: String,
}

impl ApiAnswer {
    /// For a failed request: the server's `{"error": ...}` message, else the status and body.
    pub fn error_message(&self) -> String {
        let reason = serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_string))
            .unwrap_or_else(|| self.body.trim().to_string());
        if reason.is_empty() {
            format!("HTTP {}", self.status)
        } else {
            format!("{reason} (HTTP {})", self.status.as_u16())
        }
    }
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Nothing listens at the socket.
    #[error("--sock {p}: cannot connect: {1} (is `aiodma run --api-sock {p}` running?)", p = .0.display())]
    Connect(PathBuf, std::io::Error),
    /// The HTTP exchange failed.
    #[error("--sock {}: {}", .0.display(), .1)]
    Http(PathBuf, hyper::Error),
    /// The request could not be built.
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    /// No answer in time.
    #[error("--sock {}: no answer within {} s", .0.display(), .1.as_secs())]
    Timeout(PathBuf, Duration),
    /// The runtime could not be created.
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
}

async fn exchange(sock: &Path, call: &ApiCall) -> Result<ApiAnswer, CtlError> {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| CtlError::Connect(sock.to_path_buf(), e))?;
    let http = |e| CtlError::Http(sock.to_path_buf(), e);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let connection = tokio::spawn(connection);
    let mut request = Request::builder()
        .method(call.method.clone())
        .uri(call.path.as_str())
        .header(HOST, "localhost");
    if call.body.is_some() {
        request = request.header(CONTENT_TYPE, "application/json");
    }
    let request = request.body(Full::new(Bytes::from(
        call.body.clone().unwrap_or_default(),
    )))?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    drop(sender);
    connection.abort();
    Ok(ApiAnswer {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Make `call` on the API at `sock`, waiting at most `timeout`.
pub fn call(sock: &Path, call: &ApiCall, timeout: Duration) -> Result<ApiAnswer, CtlError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(CtlError::Runtime)?;
    runtime.block_on(async {
        tokio::time::timeout(timeout, exchange(sock, call))
            .await
            .unwrap_or(Err(CtlError::Timeout(sock.to_path_buf(), timeout)))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::api::routes::FixedDevice;
    use crate::api::{socket, ApiServer, Endpoint};

    #[test]
    fn commands_map_to_requests() {
        let add = ApiCall::from_command(&CtlCommand::Fault(FaultCommand::Add {
            rule: "error:p=0.1".into(),
        }));
        assert_eq!(
            (add.method, add.path.as_str(), add.body.as_deref()),
            (Method::PUT, "/faults", Some(r#"{"rule":"error:p=0.1"}"#))
        );
        for (cmd, method, path) in [
            (
                CtlCommand::Fault(FaultCommand::List),
                Method::GET,
                "/faults",
            ),
            (
                CtlCommand::Fault(FaultCommand::Rm { index: 3 }),
                Method::DELETE,
                "/faults/3",
            ),
            (
                CtlCommand::Fault(FaultCommand::Clear),
                Method::DELETE,
                "/faults",
            ),
            (CtlCommand::Reset, Method::PUT, "/device/reset"),
            (CtlCommand::Hang, Method::PUT, "/device/hang"),
            (CtlCommand::Pause, Method::PUT, "/device/pause"),
            (CtlCommand::Resume, Method::PUT, "/device/resume"),
            (CtlCommand::Metrics, Method::GET, "/metrics"),
        ] {
            let call = ApiCall::from_command(&cmd);
            assert_eq!((call.method, call.path.as_str()), (method, path));
            assert_eq!(call.body, None);
        }
    }

    #[test]
    fn error_messages_come_from_the_body() {
        let a = ApiAnswer {
            status: StatusCode::BAD_REQUEST,
            body: r#"{"error":"fault 'x': unknown kind 'x'"}"#.into(),
        };
        assert_eq!(a.error_message(), "fault 'x': unknown kind 'x' (HTTP 400)");
        let a = ApiAnswer {
            status: StatusCode::BAD_GATEWAY,
            body: String::new(),
        };
        assert_eq!(a.error_message(), "HTTP 502 Bad Gateway");
    }

    #[test]
    fn the_client_talks_to_the_server() {
        let dir = std::env::temp_dir().join(format!("aiodma-api-cli-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let t = Duration::from_secs(10);
        let err = call(&path, &ApiCall::from_command(&CtlCommand::Reset), t).unwrap_err();
        assert!(matches!(err, CtlError::Connect(..)), "{err}");
        let (listener, guard) = socket::bind(&path).unwrap();
        let _server = ApiServer::spawn(
            Endpoint::Socket(listener, guard),
            Arc::new(FixedDevice {
                rule: "hang:after=3",
                added_at: 4,
            }),
            None,
        )
        .unwrap();
        let list = ApiCall::from_command(&CtlCommand::Fault(FaultCommand::List));
        let a = call(&path, &list, t).unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.body, r#"{"faults":["hang:after=3"]}"#);
        let add = ApiCall::from_command(&CtlCommand::Fault(FaultCommand::Add {
            rule: "delay:every=1,min=1ms,max=1ms".into(),
        }));
        assert_eq!(call(&path, &add, t).unwrap().body, r#"{"index":4}"#);
        let bad = ApiCall::from_command(&CtlCommand::Fault(FaultCommand::Add {
            rule: "nope".into(),
        }));
        let a = call(&path, &bad, t).unwrap();
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        assert!(a.error_message().starts_with("fault 'nope': unknown kind"));
        let rm = ApiCall::from_command(&CtlCommand::Fault(FaultCommand::Rm { index: 9 }));
        let a = call(&path, &rm, t).unwrap();
        assert_eq!(a.status, StatusCode::NOT_FOUND);
        let a = call(&path, &ApiCall::from_command(&CtlCommand::Pause), t).unwrap();
        assert_eq!((a.status, a.body.as_str()), (StatusCode::NO_CONTENT, ""));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
