//! Runtime control (issue 12): `aiodma run --api-sock S` while the guest runs, driven with
//! `aiodma ctl --sock S` from here. On a machine without usable KVM the socket is level 0's,
//! relayed to the VMM inside the emulated host, so this covers that path too.

// Integration tests fail by panicking; helpers outside #[test] fns count too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use aiodma_tests::{aiodma_bin, stat, Guest, RunOutcome, TempDir};

/// How long a guest phase may take (boot included, in the emulated host on a busy machine).
const PHASE: Duration = Duration::from_secs(240);

/// What a background run printed so far, and whether it ended.
#[derive(Default)]
struct Output {
    stdout: String,
    stderr: String,
    closed: usize,
}

/// `aiodma run` in the background.
struct Running {
    child: Child,
    output: Arc<(Mutex<Output>, Condvar)>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(guest: &Guest, script: &str) -> Running {
        let mut child = guest
            .command(&["sh", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", aiodma_bin().display()));
        let output = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let pipe = |stream: Box<dyn Read + Send>, is_err: bool| {
            let output = output.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                    let text = String::from_utf8_lossy(&line).into_owned();
                    let (lock, cv) = &*output;
                    let mut out = lock.lock().unwrap();
                    if is_err {
                        out.stderr.push_str(&text);
                    } else {
                        out.stdout.push_str(&text);
                    }
                    cv.notify_all();
                    line.clear();
                }
                let (lock, cv) = &*output;
                lock.lock().unwrap().closed += 1;
                cv.notify_all();
            })
        };
        let readers = vec![
            pipe(Box::new(child.stdout.take().unwrap()), false),
            pipe(Box::new(child.stderr.take().unwrap()), true),
        ];
        Running {
            child,
            output,
            readers,
        }
    }

    /// Wait until the guest printed `line` (as a whole line). Err: the run ended first, or the
    /// time ran out.
    fn wait_for(&self, line: &str) -> Result<(), String> {
        let deadline = Instant::now() + PHASE;
        let (lock, cv) = &*self.output;
        let mut out = lock.lock().unwrap();
        loop {
            if out.stdout.lines().any(|l| l.trim_end() == line) {
                return Ok(());
            }
            if out.closed == 2 {
                return Err(format!("the run ended before the guest printed {line:?}"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no {line:?} within {} s", PHASE.as_secs()));
            }
            out = cv.wait_timeout(out, left).unwrap().0;
        }
    }

    /// Wait for the run to end (killing it past `PHASE`).
    fn finish(mut self) -> RunOutcome {
        let deadline = Instant::now() + PHASE;
        let code = loop {
            match self.child.try_wait().unwrap() {
                Some(status) => break status.code().unwrap_or(-1),
                None if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    break self.child.wait().unwrap().code().unwrap_or(-1);
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        let out = self.output.0.lock().unwrap();
        RunOutcome {
            code,
            stdout: out.stdout.clone(),
            stderr: out.stderr.clone(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A failed step: do not leave the VM running.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `aiodma ctl --sock SOCK ARGS...`.
fn ctl(sock: &Path, args: &[&str]) -> RunOutcome {
    let out = Command::new(aiodma_bin())
        .arg("ctl")
        .arg("--sock")
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    RunOutcome::from_output(out)
}

/// `ctl` that must succeed; its stdout.
fn ctl_ok(sock: &Path, args: &[&str]) -> Result<String, String> {
    let out = ctl(sock, args);
    if out.code == 0 {
        Ok(out.stdout)
    } else {
        Err(format!("ctl {args:?} failed\n{}", out.report()))
    }
}

/// A number in the device metrics JSON, by path (`["faults", "error"]`).
fn metric(json: &str, path: &[&str]) -> Result<u64, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("metrics {json:?}: {e}"))?;
    path.iter()
        .try_fold(&v, |v, key| v.get(key))
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| format!("no {path:?} in {json}"))
}

/// Run `scenario` against a background run of `script`; the run must then exit 0. A run the
/// emulated host broke (see `Guest::run`) is tried once more.
fn with_running_vm(
    guest: &Guest,
    script: &str,
    scenario: impl Fn(&Running) -> Result<(), String>,
) -> RunOutcome {
    for attempt in 1..=2 {
        let vm = Running::start(guest, script);
        let steps = scenario(&vm);
        let out = vm.finish();
        if let (Some(verdict), 1) = (out.emulated_host_failure(), attempt) {
            eprintln!("harness: {verdict}; running once more");
            continue;
        }
        if let Err(e) = steps {
            panic!("{e}\n{}", out.report());
        }
        return out
            .assert_code(0)
            .assert_stdout_contains("phase:done")
            .clone_outcome();
    }
    unreachable!()
}

/// `RunOutcome` is not `Clone`; the assertions above return a reference.
trait CloneOutcome {
    fn clone_outcome(&self) -> RunOutcome;
}

impl CloneOutcome for RunOutcome {
    fn clone_outcome(&self) -> RunOutcome {
        RunOutcome {
            code: self.code,
            stdout: self.stdout.clone(),
            stderr: self.stderr.clone(),
        }
    }
}

/// Guest helpers (no double quotes: the kernel command line cannot carry them): `w BLOCK`
/// writes one 4 KiB block; `resets` is the driver's reset count; `wait_until CMD...` retries
/// CMD every 0.1 s for at most 300 s, then fails the run (exit 10).
const GUEST_LIB: &str =
    "w() { dd if=/dev/zero of=/dev/aiodma0 bs=4k count=1 seek=$1 2>/dev/null; }; \
     resets() { aiodma-aio info | sed -n 's/^ *resets: //p' | tr -dc 0-9; }; \
     wait_until() { n=0; until $@; do n=$((n+1)); [ $n -lt 3000 ] || exit 10; sleep 0.1; done; }; \
     fails() { ! $@; }; ";

fn sock_in(dir: &TempDir) -> PathBuf {
    dir.0.join("api.sock")
}

#[test]
fn faults_reset_and_pause_change_a_running_device() {
    // Each phase waits for the host's change to show in the guest: writes start failing once
    // the error rule is in, work again once it is removed, the driver's reset counter moves
    // after a reset request, and a write stalls (then completes) across pause and resume.
    let script = format!(
        "{GUEST_LIB} \
         w 1 && echo phase:writes-ok; \
         wait_until fails w 2; echo phase:writes-failing; \
         wait_until w 3; before=$(resets); echo resets-before=$before; \
         echo phase:writes-ok-again; \
         moved() {{ [ $(resets) -gt $before ]; }}; wait_until moved; echo phase:reset-seen; \
         n=0; while :; do \
           w 4 & p=$!; sleep 1; \
           if kill -0 $p 2>/dev/null; then echo phase:stalled; wait $p && echo phase:resumed; break; fi; \
           wait $p; n=$((n+1)); [ $n -lt 300 ] || exit 11; \
         done; \
         aiodma-aio verify --engine libaio --requests 16 --qd 4 && echo phase:done"
    );
    let dir = TempDir::new("control");
    let sock = sock_in(&dir);
    let guest = Guest::default()
        .flag("--timeout")
        .flag("600")
        .flag("--api-sock")
        .flag(sock.to_str().unwrap())
        .flag("--fault")
        .flag("delay:every=1000,min=1us,max=1us")
        // Pausing for a few seconds must not look like a lost request to the driver.
        .flag("--append")
        .flag("aiodma.timeout_ms=60000");
    let out = with_running_vm(&guest, &script, |vm| {
        vm.wait_for("phase:writes-ok")?;
        let list = ctl_ok(&sock, &["fault", "list"])?;
        if !list.contains("\"faults\":[\"delay:") {
            return Err(format!("fault list: {list}"));
        }
        let added = ctl_ok(&sock, &["fault", "add", "error:every=1,op=write"])?;
        if added.trim() != r#"{"index":1}"# {
            return Err(format!("fault add: {added}"));
        }
        vm.wait_for("phase:writes-failing")?;
        let metrics = ctl_ok(&sock, &["metrics"])?;
        if metric(&metrics, &["faults", "error"])? == 0 {
            return Err(format!("no error fault counted: {metrics}"));
        }
        // A bad rule is refused with the reason; the VM runs on.
        let bad = ctl(&sock, &["fault", "add", "explode:p=1"]);
        if bad.code != 1 || !bad.stderr.contains("fault 'explode:p=1': unknown kind") {
            return Err(format!("bad rule\n{}", bad.report()));
        }
        let missing = ctl(&sock, &["fault", "rm", "7"]);
        if missing.code != 1 || !missing.stderr.contains("no fault rule 7 (there are 2)") {
            return Err(format!("rm 7\n{}", missing.report()));
        }
        let usage = ctl(&sock, &["fault", "rm", "first"]);
        if usage.code != 2 {
            return Err(format!("rm first\n{}", usage.report()));
        }
        ctl_ok(&sock, &["fault", "rm", "1"])?;
        vm.wait_for("phase:writes-ok-again")?;

        ctl_ok(&sock, &["reset"])?;
        vm.wait_for("phase:reset-seen")?;

        ctl_ok(&sock, &["pause"])?;
        vm.wait_for("phase:stalled")?;
        // Paused: the stalled write is not even taken from the queue.
        let writes = |m: &str| metric(m, &["requests", "write", "requests"]);
        let paused = writes(&ctl_ok(&sock, &["metrics"])?)?;
        std::thread::sleep(Duration::from_secs(1));
        let still = writes(&ctl_ok(&sock, &["metrics"])?)?;
        if still != paused {
            return Err(format!("writes moved while paused: {paused} -> {still}"));
        }
        ctl_ok(&sock, &["resume"])?;
        vm.wait_for("phase:resumed")?;
        let after = writes(&ctl_ok(&sock, &["metrics"])?)?;
        if after <= paused {
            return Err(format!("no write after resume: {paused} -> {after}"));
        }
        ctl_ok(&sock, &["fault", "clear"])?;
        let list = ctl_ok(&sock, &["fault", "list"])?;
        if list.trim() != r#"{"faults":[]}"# {
            return Err(format!("fault list after clear: {list}"));
        }
        Ok(())
    });
    out.assert_stderr_contains("api: fault rule 1 added: error:every=1,op=write");
    let before: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("resets-before="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no resets-before\n{}", out.report()));
    assert_eq!(before, 0, "{}", out.report());
    // The run is over: the socket is gone, and a client says so.
    assert!(!sock.exists(), "{} left behind", sock.display());
    let gone = ctl(&sock, &["metrics"]);
    assert_eq!(gone.code, 1, "{}", gone.report());
    assert!(gone.stderr.contains("cannot connect"), "{}", gone.report());
}

#[test]
fn a_hang_through_the_api_is_recovered_by_the_driver() {
    // A stale socket file (nobody listening) is replaced. The device hangs on request; the
    // guest's next write outlives the driver's timeout (500 ms), so the watchdog resets the
    // device, and I/O works again.
    let dir = TempDir::new("control-hang");
    let sock = sock_in(&dir);
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let script = format!(
        "{GUEST_LIB} \
         w 1 && echo phase:ready; \
         recovered() {{ w 2; [ $(resets) -ge 1 ]; }}; wait_until recovered; \
         echo phase:recovered; \
         aiodma-aio verify --engine uring --requests 8 --qd 2 && \
         aiodma-aio info | grep -e timeouts -e resets && echo phase:done"
    );
    let guest = Guest::default()
        .flag("--timeout")
        .flag("600")
        .flag("--api-sock")
        .flag(sock.to_str().unwrap())
        .flag("--append")
        .flag("aiodma.timeout_ms=500");
    let out = with_running_vm(&guest, &script, |vm| {
        vm.wait_for("phase:ready")?;
        ctl_ok(&sock, &["hang"])?;
        vm.wait_for("phase:recovered")?;
        let metrics = ctl_ok(&sock, &["metrics"])?;
        if metric(&metrics, &["faults", "hang"])? != 1 {
            return Err(format!("hang not counted: {metrics}"));
        }
        Ok(())
    });
    out.assert_stderr_contains("replacing the stale socket");
    assert!(stat(&out.stdout, "resets") >= 1, "{}", out.report());
    assert!(!sock.exists());
}

#[test]
fn a_socket_in_use_is_refused_before_the_vm_starts() {
    let dir = TempDir::new("control-busy");
    let sock = sock_in(&dir);
    let _live = UnixListener::bind(&sock).unwrap();
    let out = Guest::new()
        .flag("--api-sock")
        .flag(sock.to_str().unwrap())
        .run(&["true"]);
    out.assert_code(2)
        .assert_stderr_contains("another process is listening there");
    assert!(!out.stdout.contains("aiodma-l1: ready"), "{}", out.report());
    assert!(sock.exists(), "the other process's socket stays");

    let file = dir.0.join("plain");
    std::fs::write(&file, b"x").unwrap();
    let out = Guest::new()
        .flag("--api-sock")
        .flag(file.to_str().unwrap())
        .run(&["true"]);
    out.assert_code(2).assert_stderr_contains("is not a socket");
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    let out = Guest::new()
        .flag("--api-sock")
        .flag(sock.to_str().unwrap())
        .flag("--no-device")
        .run(&["true"]);
    out.assert_code(2);
}
