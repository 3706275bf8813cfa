//! What a forbidden system call looks like from outside: the SIGSYS handler of `--seccomp on`.
//!
//! A filter's mismatch action `Trap` sends SIGSYS to the offending thread. The handler writes one
//! line naming the thread and the system call (number and, from a small table, name) to stderr
//! and ends the process with [`EXIT_SECCOMP`]. It runs inside the filtered thread, so it may only
//! make system calls every filter allows (`write`, `exit_group`), and, being a signal handler,
//! must not allocate or take locks: the message is formatted into a stack buffer and the
//! thread's name comes from a constant-initialised thread-local set when the filter was
//! installed.

use std::cell::Cell;

use crate::exit::EXIT_SECCOMP;

/// Longest thread name kept (Linux's own limit is 15 bytes plus the NUL).
const NAME_LEN: usize = 16;

std::thread_local! {
    /// The calling thread's name, set by [`set_thread_name`]. Constant-initialised and without
    /// a destructor, so reading it is a plain TLS access, safe in a signal handler.
    static THREAD_NAME: Cell<[u8; NAME_LEN]> = const { Cell::new([0; NAME_LEN]) };
}

/// Remember the calling thread's name for the SIGSYS message.
pub(crate) fn set_thread_name(name: &str) {
    let mut buf = [0u8; NAME_LEN];
    for (d, s) in buf.iter_mut().zip(name.bytes()) {
        *d = s;
    }
    THREAD_NAME.with(|n| n.set(buf));
}

/// `si_code` of a SIGSYS raised by a seccomp filter (`SYS_SECCOMP`).
const SYS_SECCOMP: i32 = 1;

/// The SIGSYS fields of `siginfo_t` on Linux x86_64 (the `_sigsys` member of its union, which
/// the libc crate does not expose): signo, errno, code, padding to the 8-aligned union, then the
/// faulting instruction's address, the system call number and its audit architecture.
#[repr(C)]
#[allow(dead_code)] // every field gives the layout; the handler reads `code` and `syscall`
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: usize,
    syscall: i32,
    arch: u32,
}

/// Install the handler for the whole process (signal dispositions are per process).
pub(crate) fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the fields set below make it a SA_SIGINFO handler
    // with an empty mask; `on_sigsys` has the signature SA_SIGINFO requires.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigsys;
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; `SigsysInfo` is its
    // x86_64 layout for SIGSYS and no larger than `siginfo_t`.
    let (code, nr) = unsafe {
        let sys = &*info.cast::<SigsysInfo>();
        (sys.code, sys.syscall)
    };
    let name = THREAD_NAME.with(Cell::get);
    let mut buf = [0u8; 256];
    let len = if code == SYS_SECCOMP {
        format_message(&mut buf, &name, nr)
    } else {
        format_other(&mut buf, &name)
    };
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf[..len]` is initialised.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::_exit(i32::from(EXIT_SECCOMP));
    }
}

/// A fixed-size writer that drops what does not fit (no allocation: used in a signal handler).
struct Line<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Line<'_> {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            }
        }
    }

    fn push_name(&mut self, name: &[u8; NAME_LEN]) {
        let end = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        if end == 0 {
            self.push(b"?");
        } else {
            self.push(&name[..end]);
        }
    }

    fn push_number(&mut self, n: i32) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 10];
        let mut v = n.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The message for a system call the calling thread's filter forbids; returns its length.
pub(crate) fn format_message(buf: &mut [u8], thread: &[u8; NAME_LEN], nr: i32) -> usize {
    let mut line = Line { buf, len: 0 };
    line.push(b"aiodma: error: seccomp: thread '");
    line.push_name(thread);
    line.push(b"' made a forbidden system call: ");
    line.push_number(nr);
    line.push(b" (");
    line.push(
        super::names::name(i64::from(nr))
            .unwrap_or("unknown")
            .as_bytes(),
    );
    line.push(b"); exiting with status ");
    line.push_number(i32::from(EXIT_SECCOMP));
    line.push(b"\n");
    line.len
}

/// The message for a SIGSYS that no filter raised (e.g. `kill -SYS`).
fn format_other(buf: &mut [u8], thread: &[u8; NAME_LEN]) -> usize {
    let mut line = Line { buf, len: 0 };
    line.push(b"aiodma: error: thread '");
    line.push_name(thread);
    line.push(b"' received SIGSYS; exiting with status ");
    line.push_number(i32::from(EXIT_SECCOMP));
    line.push(b"\n");
    line.len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> [u8; NAME_LEN] {
        let mut n = [0u8; NAME_LEN];
        n[..s.len()].copy_from_slice(s.as_bytes());
        n
    }

    #[test]
    fn message_names_thread_and_syscall() {
        let mut buf = [0u8; 256];
        let len = format_message(&mut buf, &name("vcpu0"), 41);
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            "aiodma: error: seccomp: thread 'vcpu0' made a forbidden system call: 41 (socket); \
             exiting with status 159\n"
        );
        let len = format_message(&mut buf, &[0; NAME_LEN], 9999);
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(text.contains("thread '?'"), "{text}");
        assert!(text.contains("9999 (unknown)"), "{text}");
        let len = format_other(&mut buf, &name("main"));
        assert!(std::str::from_utf8(&buf[..len])
            .unwrap()
            .contains("'main' received SIGSYS"));
    }

    #[test]
    fn message_is_cut_not_overflowed() {
        let mut buf = [0u8; 20];
        let len = format_message(&mut buf, &name("aiodma-device"), -1);
        assert_eq!(len, 20);
        let mut line = Line {
            buf: &mut [0u8; 16],
            len: 0,
        };
        line.push_number(i32::MIN);
        line.push_number(0);
        assert_eq!(&line.buf[..line.len], b"-21474836480");
    }

    #[test]
    fn siginfo_layout_matches_the_kernel() {
        // The kernel's struct siginfo is 128 bytes; the SIGSYS fields must lie inside it at
        // their ABI offsets (union at 16: _call_addr, then _syscall at 24, _arch at 28).
        assert!(std::mem::size_of::<SigsysInfo>() <= std::mem::size_of::<libc::siginfo_t>());
        assert_eq!(std::mem::offset_of!(SigsysInfo, call_addr), 16);
        assert_eq!(std::mem::offset_of!(SigsysInfo, syscall), 24);
        assert_eq!(std::mem::offset_of!(SigsysInfo, arch), 28);
    }
}
