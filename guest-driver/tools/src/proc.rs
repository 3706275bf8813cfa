//! Child processes and shared counters for the scenarios that need more than one process:
//! requests abandoned by a killed or exiting process (`abandon`), signal storms (`sigstorm`),
//! I/O across unbind (`churn`).
//!
//! Forking: [`fork`] is only called from a single-threaded process (none of these subcommands
//! starts a thread), so the child may allocate and use the standard library freely.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// Counters in anonymous shared memory: visible to the parent and every child forked after
/// they were created.
#[derive(Debug)]
pub struct Shared {
    ptr: *mut AtomicI64,
    len: usize,
}

impl Shared {
    /// `len` counters, all zero.
    pub fn new(len: usize) -> Result<Self, String> {
        let bytes = (len.max(1) * std::mem::size_of::<AtomicI64>()).next_multiple_of(4096);
        // SAFETY: a fresh anonymous shared mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap shared: {}", std::io::Error::last_os_error()));
        }
        Ok(Self {
            ptr: p.cast(),
            len: len.max(1),
        })
    }

    /// Counter `i` (counters past the end alias the last one, which callers never do).
    pub fn at(&self, i: usize) -> &AtomicI64 {
        let i = i.min(self.len - 1);
        // SAFETY: `i < len`; the mapping is zero-initialised, page-aligned and lives as long
        // as `self`; AtomicI64 has the layout of i64 and zero is a valid value.
        unsafe { &*self.ptr.add(i) }
    }

    /// Read counter `i`.
    pub fn get(&self, i: usize) -> i64 {
        self.at(i).load(Ordering::SeqCst)
    }

    /// Set counter `i`.
    pub fn set(&self, i: usize, v: i64) {
        self.at(i).store(v, Ordering::SeqCst)
    }

    /// Add to counter `i`.
    pub fn add(&self, i: usize, v: i64) {
        self.at(i).fetch_add(v, Ordering::SeqCst);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let bytes = (self.len * std::mem::size_of::<AtomicI64>()).next_multiple_of(4096);
        // SAFETY: unmapping our own mapping (a forked child keeps its own copy of it).
        unsafe { libc::munmap(self.ptr.cast(), bytes) };
    }
}

/// Milliseconds on the monotonic clock (comparable between processes).
pub fn now_ms() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is writable.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
}

/// A forked child, killed (and reaped if it can be) when dropped unfinished.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    status: Option<i32>,
}

/// Fork; the child runs `f` and leaves with `_exit` and its result.
///
/// The caller must be single-threaded (see the module comment).
pub fn fork<F: FnOnce() -> i32>(f: F) -> Result<Child, String> {
    // SAFETY: the process is single-threaded (module contract), so the child inherits
    // consistent allocator and stdio state.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        let code = f();
        // SAFETY: leaving the child without running the parent's destructors or atexit hooks.
        unsafe { libc::_exit(code) };
    }
    Ok(Child { pid, status: None })
}

impl Child {
    /// The process id.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Reap it if it has finished (non-blocking).
    pub fn try_wait(&mut self) -> Option<i32> {
        if self.status.is_none() {
            let mut st = 0;
            // SAFETY: waiting for our own child.
            let r = unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) };
            if r == self.pid {
                self.status = Some(st);
            }
        }
        self.status
    }

    /// Wait at most `limit` for it to finish; `None` if it is still running.
    pub fn wait_for(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Send `sig` (nothing once reaped).
    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: signalling our own, not yet reaped, child.
            unsafe { libc::kill(self.pid, sig) };
        }
    }

    /// SIGKILL it and wait at most `limit` for it to go; `None` if it did not (stuck in the
    /// kernel).
    pub fn kill(&mut self, limit: Duration) -> Option<i32> {
        self.signal(libc::SIGKILL);
        self.wait_for(limit)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.wait_for(Duration::from_millis(200));
        }
    }
}

/// A wait status in words: "exit 0", "signal 9".
pub fn status_name(st: i32) -> String {
    if libc::WIFEXITED(st) {
        format!("exit {}", libc::WEXITSTATUS(st))
    } else if libc::WIFSIGNALED(st) {
        format!("signal {}", libc::WTERMSIG(st))
    } else {
        format!("status {st:#x}")
    }
}

/// The calling thread's errno.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Run a program (busybox applet) with a bound: its exit status, or an error if it could not
/// start or did not finish within `limit` (it is killed then).
pub fn run_bounded(argv: &[&str], limit: Duration) -> Result<(i32, String), String> {
    let Some((prog, args)) = argv.split_first() else {
        return Err("empty command".into());
    };
    let mut child = std::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", argv.join(" ")))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                let out = child
                    .wait_with_output()
                    .map(|o| {
                        let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                        s += &String::from_utf8_lossy(&o.stderr);
                        s.trim().to_string()
                    })
                    .unwrap_or_default();
                return Ok((st.code().unwrap_or(-1), out));
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                return Err(format!(
                    "`{}` did not finish within {} ms",
                    argv.join(" "),
                    limit.as_millis()
                ));
            }
            Err(e) => return Err(format!("{}: {e}", argv.join(" "))),
        }
    }
}
