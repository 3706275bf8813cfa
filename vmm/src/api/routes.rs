//! The API's resources and what each method does to them, independent of HTTP plumbing: a
//! request (method, path, body) in, a [`Reply`] (status, JSON body) out.
//!
//! | method | path | does | success |
//! |---|---|---|---|
//! | GET | `/faults` | the rules in force, in order | 200 `{"faults":["error:p=0.1",...]}` |
//! | PUT | `/faults` | append `{"rule":"KIND:key=val,..."}` (`--fault` syntax) | 201 `{"index":N}` |
//! | DELETE | `/faults` | remove every rule | 204 |
//! | DELETE | `/faults/N` | remove rule N (later rules move up) | 204 |
//! | PUT | `/device/reset` | the device sets NEEDS_RESET (the driver resets it) | 204 |
//! | PUT | `/device/hang` | the device hangs until the driver resets it | 204 |
//! | PUT | `/device/pause`, `/device/resume` | stop / resume taking and completing requests | 204 |
//! | GET | `/metrics` | the device's counters (as `--metrics` writes under `device`) | 200 |
//!
//! Errors are one JSON line, `{"error":"..."}`: 400 for a bad body or rule, 404 for an unknown
//! path or rule index, 405 (with `Allow`) for a method a resource does not take, 413 for a body
//! over [`MAX_BODY`], 503 once the device has stopped.

use aiodma_device::engine::{ControlError, DeviceControl};
use aiodma_device::fault::FaultRule;
use aiodma_device::metrics::DeviceMetrics;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};

/// The largest request body taken (a fault rule is a few dozen bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// What the API can do to a running device; [`DeviceControl`] in the VMM, a fake in tests.
pub trait DeviceApi: Send + Sync {
    /// The fault rules in force.
    fn faults(&self) -> Vec<FaultRule>;
    /// Append a rule; its index.
    fn add_fault(&self, rule: FaultRule) -> Result<usize, ControlError>;
    /// Remove the rule at `index`.
    fn remove_fault(&self, index: usize) -> Result<FaultRule, ControlError>;
    /// Remove every rule.
    fn clear_faults(&self) -> Result<(), ControlError>;
    /// Ask the driver for a reset (NEEDS_RESET).
    fn request_reset(&self) -> Result<(), ControlError>;
    /// Hang until reset.
    fn hang(&self) -> Result<(), ControlError>;
    /// Pause (`true`) or resume (`false`).
    fn pause(&self, paused: bool) -> Result<(), ControlError>;
    /// The counters now.
    fn metrics(&self) -> DeviceMetrics;
}

impl DeviceApi for DeviceControl {
    fn faults(&self) -> Vec<FaultRule> {
        DeviceControl::faults(self)
    }
    fn add_fault(&self, rule: FaultRule) -> Result<usize, ControlError> {
        DeviceControl::add_fault(self, rule)
    }
    fn remove_fault(&self, index: usize) -> Result<FaultRule, ControlError> {
        DeviceControl::remove_fault(self, index)
    }
    fn clear_faults(&self) -> Result<(), ControlError> {
        DeviceControl::clear_faults(self)
    }
    fn request_reset(&self) -> Result<(), ControlError> {
        DeviceControl::request_reset(self)
    }
    fn hang(&self) -> Result<(), ControlError> {
        DeviceControl::hang(self)
    }
    fn pause(&self, paused: bool) -> Result<(), ControlError> {
        DeviceControl::pause(self, paused)
    }
    fn metrics(&self) -> DeviceMetrics {
        DeviceControl::metrics(self)
    }
}

/// A response before it becomes HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// A JSON document, or nothing (204).
    pub body: Option<String>,
    /// The methods the resource takes (with 405).
    pub allow: Option<&'static str>,
}

impl Reply {
    fn json(status: StatusCode, value: &impl Serialize) -> Reply {
        match serde_json::to_string(value) {
            Ok(body) => Reply {
                status,
                body: Some(body),
                allow: None,
            },
            Err(e) => Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the response: {e}"),
            ),
        }
    }

    fn no_content() -> Reply {
        Reply {
            status: StatusCode::NO_CONTENT,
            body: None,
            allow: None,
        }
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: StatusCode, message: impl Into<String>) -> Reply {
        let body = serde_json::json!({ "error": message.into() }).to_string();
        Reply {
            status,
            body: Some(body),
            allow: None,
        }
    }

    fn method_not_allowed(method: &Method, path: &str, allow: &'static str) -> Reply {
        Reply {
            allow: Some(allow),
            ..Reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} does not take {method} (it takes {allow})"),
            )
        }
    }
}

/// `GET /faults`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FaultList {
    /// Each rule in `--fault` syntax.
    pub faults: Vec<String>,
}

/// `PUT /faults` body.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NewFault {
    /// The rule in `--fault` syntax.
    pub rule: String,
}

/// `PUT /faults` reply.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FaultIndex {
    /// Where the rule went.
    pub index: usize,
}

fn control_error(e: ControlError) -> Reply {
    match e {
        ControlError::NoSuchRule { .. } => Reply::error(StatusCode::NOT_FOUND, e.to_string()),
        ControlError::Stopped => Reply::error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Either `ok` or the error's reply.
fn done(result: Result<(), ControlError>) -> Reply {
    match result {
        Ok(()) => Reply::no_content(),
        Err(e) => control_error(e),
    }
}

fn add_fault(device: &dyn DeviceApi, body: &[u8]) -> Reply {
    let new: NewFault = match serde_json::from_slice(body) {
        Ok(new) => new,
        Err(e) => {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                format!("expected a body {{\"rule\":\"KIND:key=val,...\"}}: {e}"),
            )
        }
    };
    let rule = match FaultRule::parse(&new.rule) {
        Ok(rule) => rule,
        Err(e) => return Reply::error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let text = rule.to_string();
    match device.add_fault(rule) {
        Ok(index) => {
            log::info!("api: fault rule {index} added: {text}");
            Reply::json(StatusCode::CREATED, &FaultIndex { index })
        }
        Err(e) => control_error(e),
    }
}

fn remove_fault(device: &dyn DeviceApi, index: &str) -> Reply {
    let Ok(index) = index.parse::<usize>() else {
        return Reply::error(
            StatusCode::NOT_FOUND,
            format!("no fault rule '{index}' (rules are numbered from 0)"),
        );
    };
    match device.remove_fault(index) {
        Ok(rule) => {
            log::info!("api: fault rule {index} removed: {rule}");
            Reply::no_content()
        }
        Err(e) => control_error(e),
    }
}

/// Serve one request. `path` is the URI's path (no query).
pub fn route(device: &dyn DeviceApi, method: &Method, path: &str, body: &[u8]) -> Reply {
    let m = method;
    match path {
        "/faults" => match *m {
            Method::GET => Reply::json(
                StatusCode::OK,
                &FaultList {
                    faults: device.faults().iter().map(ToString::to_string).collect(),
                },
            ),
            Method::PUT => add_fault(device, body),
            Method::DELETE => {
                let result = device.clear_faults();
                if result.is_ok() {
                    log::info!("api: every fault rule removed");
                }
                done(result)
            }
            _ => Reply::method_not_allowed(m, path, "GET, PUT, DELETE"),
        },
        "/metrics" => match *m {
            Method::GET => Reply::json(StatusCode::OK, &device.metrics()),
            _ => Reply::method_not_allowed(m, path, "GET"),
        },
        "/device/reset" | "/device/hang" | "/device/pause" | "/device/resume" => {
            if *m != Method::PUT {
                return Reply::method_not_allowed(m, path, "PUT");
            }
            log::info!("api: {}", &path["/device/".len()..]);
            done(match path {
                "/device/reset" => device.request_reset(),
                "/device/hang" => device.hang(),
                "/device/pause" => device.pause(true),
                _ => device.pause(false),
            })
        }
        _ => match path.strip_prefix("/faults/") {
            Some(index) if !index.is_empty() && !index.contains('/') => match *m {
                Method::DELETE => remove_fault(device, index),
                _ => Reply::method_not_allowed(m, path, "DELETE"),
            },
            _ => Reply::error(StatusCode::NOT_FOUND, format!("no such resource: {path}")),
        },
    }
}

/// A device for tests of the transport layers (client, relay): a fixed rule list, a fixed
/// index for added rules, no rule to remove, every other call a success.
#[cfg(test)]
pub(crate) struct FixedDevice {
    /// The one rule `faults` lists.
    pub rule: &'static str,
    /// The index `add_fault` answers.
    pub added_at: usize,
}

#[cfg(test)]
impl DeviceApi for FixedDevice {
    fn faults(&self) -> Vec<FaultRule> {
        vec![FaultRule::parse(self.rule).unwrap_or_else(|e| panic!("{e}"))]
    }
    fn add_fault(&self, _rule: FaultRule) -> Result<usize, ControlError> {
        Ok(self.added_at)
    }
    fn remove_fault(&self, index: usize) -> Result<FaultRule, ControlError> {
        Err(ControlError::NoSuchRule { index, count: 1 })
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records what the API asked for.
    #[derive(Default)]
    struct Fake {
        rules: Mutex<Vec<FaultRule>>,
        calls: Mutex<Vec<String>>,
        stopped: bool,
    }

    impl Fake {
        fn call(&self, what: &str) -> Result<(), ControlError> {
            if self.stopped {
                return Err(ControlError::Stopped);
            }
            self.calls.lock().unwrap().push(what.to_string());
            Ok(())
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl DeviceApi for Fake {
        fn faults(&self) -> Vec<FaultRule> {
            self.rules.lock().unwrap().clone()
        }
        fn add_fault(&self, rule: FaultRule) -> Result<usize, ControlError> {
            self.call("add")?;
            let mut rules = self.rules.lock().unwrap();
            rules.push(rule);
            Ok(rules.len() - 1)
        }
        fn remove_fault(&self, index: usize) -> Result<FaultRule, ControlError> {
            self.call("remove")?;
            let mut rules = self.rules.lock().unwrap();
            if index >= rules.len() {
                return Err(ControlError::NoSuchRule {
                    index,
                    count: rules.len(),
                });
            }
            Ok(rules.remove(index))
        }
        fn clear_faults(&self) -> Result<(), ControlError> {
            self.call("clear")?;
            self.rules.lock().unwrap().clear();
            Ok(())
        }
        fn request_reset(&self) -> Result<(), ControlError> {
            self.call("reset")
        }
        fn hang(&self) -> Result<(), ControlError> {
            self.call("hang")
        }
        fn pause(&self, paused: bool) -> Result<(), ControlError> {
            self.call(if paused { "pause" } else { "resume" })
        }
        fn metrics(&self) -> DeviceMetrics {
            let mut m = DeviceMetrics::default();
            m.faults.error = 7;
            m
        }
    }

    fn body(reply: &Reply) -> serde_json::Value {
        serde_json::from_str(reply.body.as_deref().unwrap()).unwrap()
    }

    #[test]
    fn faults_are_added_listed_and_removed() {
        let dev = Fake::default();
        let r = route(&dev, &Method::GET, "/faults", b"");
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(body(&r), serde_json::json!({ "faults": [] }));

        let r = route(&dev, &Method::PUT, "/faults", br#"{"rule":"error:p=0.1"}"#);
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(body(&r), serde_json::json!({ "index": 0 }));
        let r = route(
            &dev,
            &Method::PUT,
            "/faults",
            br#"{"rule":" delay:every=2,min=1ms,max=2ms "}"#,
        );
        assert_eq!(body(&r), serde_json::json!({ "index": 1 }));
        let listed = body(&route(&dev, &Method::GET, "/faults", b""));
        let listed: Vec<FaultRule> = listed["faults"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| FaultRule::parse(s.as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(
            listed,
            vec![
                FaultRule::parse("error:p=0.1").unwrap(),
                FaultRule::parse("delay:every=2,min=1ms,max=2ms").unwrap()
            ]
        );

        let r = route(&dev, &Method::DELETE, "/faults/0", b"");
        assert_eq!((r.status, r.body), (StatusCode::NO_CONTENT, None));
        assert_eq!(dev.faults().len(), 1);
        let r = route(&dev, &Method::DELETE, "/faults/5", b"");
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(body(&r)["error"], "no fault rule 5 (there are 1)");
        let r = route(&dev, &Method::DELETE, "/faults", b"");
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        assert!(dev.faults().is_empty());
        assert_eq!(dev.calls(), ["add", "add", "remove", "remove", "clear"]);
    }

    #[test]
    fn bad_rules_and_bodies_are_400_with_one_line() {
        let dev = Fake::default();
        for (req, needle) in [
            (
                &br#"{"rule":"explode:p=1"}"#[..],
                "fault 'explode:p=1': unknown kind",
            ),
            (br#"{"rule":"error:p=2"}"#, "fault 'error:p=2'"),
            (br#"{"rule":""}"#, "empty rule"),
            (b"error:p=0.1", "expected a body"),
            (br#"{"rule":"error:p=0.1","x":1}"#, "unknown field"),
            (br#"{"rule":5}"#, "expected a body"),
            (b"", "expected a body"),
        ] {
            let r = route(&dev, &Method::PUT, "/faults", req);
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{req:?}");
            let text = r.body.clone().unwrap();
            assert!(!text.contains('\n'), "{text}");
            let msg = body(&r)["error"].as_str().unwrap().to_string();
            assert!(msg.contains(needle), "{msg}");
        }
        assert!(dev.calls().is_empty());
    }

    #[test]
    fn device_actions_take_put_only() {
        let dev = Fake::default();
        for (path, call) in [
            ("/device/reset", "reset"),
            ("/device/hang", "hang"),
            ("/device/pause", "pause"),
            ("/device/resume", "resume"),
        ] {
            let r = route(&dev, &Method::PUT, path, b"");
            assert_eq!(r.status, StatusCode::NO_CONTENT, "{path}");
            assert_eq!(dev.calls().last().unwrap(), call);
            let r = route(&dev, &Method::GET, path, b"");
            assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
            assert_eq!(r.allow, Some("PUT"));
        }
        assert_eq!(dev.calls().len(), 4);
    }

    #[test]
    fn metrics_are_the_device_json() {
        let dev = Fake::default();
        let r = route(&dev, &Method::GET, "/metrics", b"");
        assert_eq!(r.status, StatusCode::OK);
        let v = body(&r);
        assert_eq!(v["faults"]["error"], 7);
        assert!(v["requests"]["write"]["requests"].is_u64());
        let r = route(&dev, &Method::POST, "/metrics", b"");
        assert_eq!(
            (r.status, r.allow),
            (StatusCode::METHOD_NOT_ALLOWED, Some("GET"))
        );
    }

    #[test]
    fn unknown_paths_and_methods() {
        let dev = Fake::default();
        for path in [
            "/",
            "/fault",
            "/faults/",
            "/faults/x",
            "/faults/1/2",
            "/device",
            "/x/y",
        ] {
            let r = route(&dev, &Method::GET, path, b"");
            let expected = if path == "/faults/x" {
                StatusCode::METHOD_NOT_ALLOWED
            } else {
                StatusCode::NOT_FOUND
            };
            assert_eq!(r.status, expected, "{path}");
        }
        let r = route(&dev, &Method::DELETE, "/faults/x", b"");
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(body(&r)["error"].as_str().unwrap().contains("'x'"));
        let r = route(&dev, &Method::POST, "/faults", b"{}");
        assert_eq!(r.allow, Some("GET, PUT, DELETE"));
        assert!(body(&r)["error"]
            .as_str()
            .unwrap()
            .contains("/faults does not take POST"));
    }

    #[test]
    fn a_stopped_device_is_503() {
        let dev = Fake {
            stopped: true,
            ..Fake::default()
        };
        let r = route(&dev, &Method::PUT, "/device/reset", b"");
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(&r)["error"], "the device has stopped");
        let r = route(&dev, &Method::PUT, "/faults", br#"{"rule":"error:p=1"}"#);
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
