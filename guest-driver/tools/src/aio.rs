//! The Linux AIO (libaio) system calls on the kernel ABI directly: `io_setup`, `io_submit`,
//! `io_getevents`, `io_cancel`, `io_destroy`. No libaio library is needed in the guest.

use std::io;
use std::os::fd::RawFd;

/// `IOCB_CMD_PREAD`.
pub const CMD_PREAD: u16 = 0;
/// `IOCB_CMD_PWRITE`.
pub const CMD_PWRITE: u16 = 1;
/// `IOCB_CMD_FDSYNC`.
pub const CMD_FDSYNC: u16 = 3;
/// `IOCB_CMD_PREADV`.
pub const CMD_PREADV: u16 = 7;
/// `IOCB_CMD_PWRITEV`.
pub const CMD_PWRITEV: u16 = 8;

/// `struct iocb` (include/uapi/linux/aio_abi.h, little-endian layout).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Iocb {
    /// Returned in `IoEvent::data`.
    pub data: u64,
    /// Filled by the kernel.
    pub key: u32,
    /// `RWF_*` flags.
    pub rw_flags: u32,
    /// `CMD_*`.
    pub opcode: u16,
    /// I/O priority.
    pub reqprio: i16,
    /// File descriptor.
    pub fildes: u32,
    /// Buffer (or iovec array for the vectored commands).
    pub buf: u64,
    /// Bytes (or iovec count).
    pub nbytes: u64,
    /// File offset.
    pub offset: i64,
    /// Reserved.
    pub reserved2: u64,
    /// `IOCB_FLAG_*`.
    pub flags: u32,
    /// eventfd for `IOCB_FLAG_RESFD`.
    pub resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IoEvent {
    /// The iocb's `data`.
    pub data: u64,
    /// The iocb's address.
    pub obj: u64,
    /// Bytes or a negative errno.
    pub res: i64,
    /// Secondary result.
    pub res2: i64,
}

const _: () = assert!(std::mem::size_of::<Iocb>() == 64);
const _: () = assert!(std::mem::size_of::<IoEvent>() == 32);

/// An AIO context.
#[derive(Debug)]
pub struct Context(libc::c_ulong);

fn check(rc: libc::c_long) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

impl Context {
    /// `io_setup(nr_events)`.
    pub fn new(nr_events: u32) -> io::Result<Self> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the context id into `ctx`.
        check(unsafe { libc::syscall(libc::SYS_io_setup, nr_events, &mut ctx) })?;
        Ok(Context(ctx))
    }

    /// `io_submit`: returns how many were queued.
    ///
    /// # Safety
    /// Every pointer refers to an iocb whose buffers stay alive and untouched until its event
    /// is reaped (or the context is destroyed).
    pub unsafe fn submit(&self, iocbs: &mut [*mut Iocb]) -> io::Result<usize> {
        // SAFETY: the caller's contract.
        check(unsafe {
            libc::syscall(
                libc::SYS_io_submit,
                self.0,
                iocbs.len() as libc::c_long,
                iocbs.as_mut_ptr(),
            )
        })
    }

    /// `io_getevents(min, events.len())`, waiting at most `timeout` (None: forever).
    pub fn get_events(
        &self,
        min: usize,
        events: &mut [IoEvent],
        timeout: Option<std::time::Duration>,
    ) -> io::Result<usize> {
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs() as _,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let tsp = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `events` has room for `events.len()` entries; `tsp` is null or valid.
        check(unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                self.0,
                min as libc::c_long,
                events.len() as libc::c_long,
                events.as_mut_ptr(),
                tsp,
            )
        })
    }

    /// `io_cancel`.
    ///
    /// # Safety
    /// `iocb` was submitted on this context and is still alive.
    pub unsafe fn cancel(&self, iocb: *mut Iocb) -> io::Result<()> {
        let mut ev = IoEvent::default();
        // SAFETY: the caller's contract; `ev` is writable.
        check(unsafe { libc::syscall(libc::SYS_io_cancel, self.0, iocb, &mut ev) }).map(|_| ())
    }

    /// An iocb for `fd`.
    pub fn iocb(fd: RawFd, opcode: u16, buf: u64, nbytes: u64, offset: i64, data: u64) -> Iocb {
        Iocb {
            data,
            opcode,
            fildes: fd as u32,
            buf,
            nbytes,
            offset,
            ..Default::default()
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: destroying our own context; it waits for in-flight requests.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.0) };
    }
}
