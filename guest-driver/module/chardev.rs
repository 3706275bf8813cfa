// SPDX-License-Identifier: GPL-2.0
//! `/dev/aiodmaN`: a misc device with its own `file_operations`.
//!
//! Linux 7.3's `MiscDevice` abstraction has no `llseek` or `fsync`, which a file-like device
//! needs, so this module registers the `struct miscdevice` itself; the trampolines below are the
//! only code that converts the C file-operation arguments.

use core::ffi::{c_int, c_uint, c_void};

use kernel::{
    bindings, error::to_result, prelude::*, sync::Arc, types::ForeignOwnable, types::Opaque,
};

use crate::{
    abi,
    dev::AioDev,
    iocb::{KiocbRef, FMODE_CAN_ODIRECT, FMODE_NOWAIT},
    submit::{iter_len, SubmitFlags, Submitted},
};

/// Per-open-file state: the device it talks to.
pub(crate) struct OpenFile {
    dev: Arc<AioDev>,
}

impl OpenFile {
    /// The device behind this file.
    pub(crate) fn dev(&self) -> &AioDev {
        &self.dev
    }
}

/// A registered `/dev/aiodmaN`.
#[pin_data(PinnedDrop)]
pub(crate) struct Chardev {
    #[pin]
    misc: Opaque<bindings::miscdevice>,
    dev: Arc<AioDev>,
}

// SAFETY: `misc_deregister` may run on any thread; the device handle is `Sync`.
unsafe impl Send for Chardev {}
// SAFETY: no `&self` method mutates the registration.
unsafe impl Sync for Chardev {}

impl Chardev {
    /// Register `/dev/<name>` for `dev`.
    pub(crate) fn register(name: &'static CStr, dev: Arc<AioDev>) -> impl PinInit<Self, Error> {
        try_pin_init!(Self {
            dev,
            misc <- Opaque::try_ffi_init(move |slot: *mut bindings::miscdevice| {
                // SAFETY: `slot` is ours to initialise; zero is a valid `miscdevice`.
                unsafe {
                    slot.write(pin_init::zeroed());
                    (*slot).minor = bindings::MISC_DYNAMIC_MINOR as c_int;
                    (*slot).name = name.as_char_ptr();
                    (*slot).fops = &FOPS.0;
                    (*slot).mode = 0o600;
                }
                // SAFETY: the slot is pinned and deregistered in `drop` before it is freed.
                to_result(unsafe { bindings::misc_register(slot) })
            }),
        })
    }
}

#[pinned_drop]
impl PinnedDrop for Chardev {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: registered by `register` (the initializer only succeeds once it is).
        unsafe { bindings::misc_deregister(self.misc.get()) };
    }
}

/// The file operations table; `Sync` because it is immutable after compilation.
struct Fops(bindings::file_operations);
// SAFETY: the table is never written; its raw pointers (the module) are valid for the module's
// lifetime, during which the table is used.
unsafe impl Sync for Fops {}

static FOPS: Fops = Fops(bindings::file_operations {
    owner: kernel::module::this_module::<crate::LocalModule>().as_ptr(),
    open: Some(open),
    release: Some(release),
    read_iter: Some(read_iter),
    write_iter: Some(write_iter),
    llseek: Some(llseek),
    fsync: Some(fsync),
    unlocked_ioctl: Some(ioctl),
    // `DeviceInfo` has the same layout for 32-bit callers, and on x86-64 a compat pointer is
    // the plain value (what `compat_ptr_ioctl` does, which is NULL without CONFIG_COMPAT).
    compat_ioctl: Some(ioctl),
    ..pin_init::zeroed()
});

/// # Safety
/// Called by the VFS for a file of our misc device (`misc_open` set `private_data` to the
/// `struct miscdevice`, which is the `misc` field of a pinned `Chardev`).
unsafe extern "C" fn open(inode: *mut bindings::inode, file: *mut bindings::file) -> c_int {
    // SAFETY: valid arguments of an open call.
    let ret = unsafe { bindings::generic_file_open(inode, file) };
    if ret != 0 {
        return ret;
    }
    // SAFETY: see the function's safety contract; `misc` is the first field's inner value, so
    // container_of recovers the `Chardev`, which `misc_open` keeps registered during this call.
    let chardev = unsafe {
        let misc = (*file).private_data.cast::<bindings::miscdevice>();
        &*kernel::container_of!(Opaque::cast_from(misc).cast_mut(), Chardev, misc)
    };
    let of = match Arc::new(
        OpenFile {
            dev: chardev.dev.clone(),
        },
        GFP_KERNEL,
    ) {
        Ok(of) => of,
        Err(e) => return Error::from(e).to_errno(),
    };
    // SAFETY: nobody else sees the file yet; the VFS checks FMODE_CAN_ODIRECT after ->open.
    unsafe {
        (*file).f_mode |= FMODE_NOWAIT | FMODE_CAN_ODIRECT;
        (*file).private_data = of.into_foreign();
    }
    0
}

/// # Safety
/// The file's last reference is gone; `private_data` is our `Arc<OpenFile>`.
unsafe extern "C" fn release(_inode: *mut bindings::inode, file: *mut bindings::file) -> c_int {
    // SAFETY: set by `open`, released exactly once here.
    drop(unsafe { Arc::<OpenFile>::from_foreign((*file).private_data) });
    0
}

/// # Safety
/// `data` is the `private_data` of one of our open files, which outlives the borrow.
unsafe fn borrow_file<'a>(data: *mut c_void) -> &'a OpenFile {
    // SAFETY: see the function's contract.
    let arc = unsafe { Arc::<OpenFile>::borrow(data) };
    // SAFETY: the file (and so the Arc) is alive for the whole file operation.
    unsafe { &*core::ptr::from_ref::<OpenFile>(&arc) }
}

/// # Safety
/// `kiocb` and `iter` are the live arguments of a `read_iter`/`write_iter` call on one of our
/// files.
unsafe fn rw(kiocb: *mut bindings::kiocb, iter: *mut bindings::iov_iter, op: u32) -> isize {
    // SAFETY: the VFS passes the live kiocb of this call.
    let Some(k) = (unsafe { KiocbRef::new(kiocb) }) else {
        return EINVAL.to_errno() as isize;
    };
    // SAFETY: the kiocb's file is one of ours.
    let of = unsafe { borrow_file(k.private_data()) };
    let flags = SubmitFlags {
        nowait: k.nowait(),
        dsync: k.dsync(),
    };
    if k.is_sync() {
        // SAFETY: the caller's contract.
        return unsafe { rw_sync(&of.dev, k, iter, op, flags) };
    }
    crate::kdebug!(
        "kiocb {:p}: submitted async op {} pos {}\n",
        kiocb,
        op,
        k.pos()
    );
    // SAFETY: `iter` and `k` are this call's; `submit` queues the kiocb (we return
    // -EIOCBQUEUED) or leaves it to aio/io_uring when it returns anything else.
    match unsafe { of.dev.submit(op, k.pos(), Some(iter), Some(k), flags) } {
        Ok(Submitted::Done(n)) => {
            k.advance(n);
            n as isize
        }
        Ok(Submitted::Queued) => EIOCBQUEUED.to_errno() as isize,
        Err(e) => {
            crate::kdebug!("kiocb {:p}: not queued: {:?}\n", kiocb, e);
            e.to_errno() as isize
        }
    }
}

/// A synchronous transfer, in as many device requests as it takes: a request covers at most
/// `MAX_REQUEST_BYTES`, and the caller sees one transfer. Signals do not cut it short (only a
/// fatal one ends it); a short count comes back only at the end of the device, on an error
/// after some progress, or when the device returned fewer bytes than a request asked for (the
/// iterator went past them, so the transfer ends there).
///
/// # Safety
/// `iter` is the live iterator of this call.
unsafe fn rw_sync(
    dev: &AioDev,
    k: KiocbRef,
    iter: *mut bindings::iov_iter,
    op: u32,
    flags: SubmitFlags,
) -> isize {
    let mut total = 0usize;
    loop {
        let pos = k.pos() + total as i64;
        // SAFETY: `iter` is the live iterator of this call.
        let before = unsafe { iter_len(iter) };
        // SAFETY: `iter` is the live iterator of this call; no kiocb is handed over.
        match unsafe { dev.submit(op, pos, Some(iter), None, flags) } {
            Ok(Submitted::Done(n)) => {
                total += n;
                // SAFETY: as above.
                let left = unsafe { iter_len(iter) };
                // The request took `before - left` bytes of the iterator; fewer came back.
                if n == 0 || left == 0 || n < before.saturating_sub(left) {
                    break;
                }
            }
            Ok(Submitted::Queued) => break,
            Err(e) if total == 0 => return e.to_errno() as isize,
            Err(_) => break,
        }
    }
    k.advance(total);
    total as isize
}

/// # Safety
/// VFS `read_iter` contract for one of our files.
unsafe extern "C" fn read_iter(k: *mut bindings::kiocb, iter: *mut bindings::iov_iter) -> isize {
    // SAFETY: the VFS contract of this function.
    unsafe { rw(k, iter, abi::op::READ) }
}

/// # Safety
/// VFS `write_iter` contract for one of our files.
unsafe extern "C" fn write_iter(k: *mut bindings::kiocb, iter: *mut bindings::iov_iter) -> isize {
    // SAFETY: the VFS contract of this function.
    unsafe { rw(k, iter, abi::op::WRITE) }
}

/// # Safety
/// VFS `llseek` contract for one of our files.
unsafe extern "C" fn llseek(file: *mut bindings::file, offset: i64, whence: c_int) -> i64 {
    // SAFETY: one of our files.
    let of = unsafe { borrow_file((*file).private_data) };
    let size = of.dev.config.capacity as i64;
    // SAFETY: valid file; fixed_size_llseek handles SEEK_SET/CUR/END against `size`.
    unsafe { bindings::fixed_size_llseek(file, offset, whence, size) }
}

/// # Safety
/// VFS `fsync` contract for one of our files.
unsafe extern "C" fn fsync(
    file: *mut bindings::file,
    _start: i64,
    _end: i64,
    _datasync: c_int,
) -> c_int {
    // SAFETY: one of our files.
    let of = unsafe { borrow_file((*file).private_data) };
    if of.dev.features & abi::feature::FLUSH == 0 {
        return 0;
    }
    // SAFETY: no iterator and no kiocb: a synchronous FLUSH.
    match unsafe {
        of.dev
            .submit(abi::op::FLUSH, 0, None, None, SubmitFlags::default())
    } {
        Ok(_) => 0,
        Err(e) => e.to_errno(),
    }
}

/// # Safety
/// VFS `unlocked_ioctl` contract for one of our files.
unsafe extern "C" fn ioctl(file: *mut bindings::file, cmd: c_uint, arg: usize) -> isize {
    // SAFETY: one of our files.
    let of = unsafe { borrow_file((*file).private_data) };
    match cmd {
        abi::ioctl::INFO => {
            let s = &of.dev.stats;
            use kernel::sync::atomic::Relaxed as R;
            let info = abi::DeviceInfo {
                abi_version: abi::ABI_VERSION,
                num_queues: u32::from(of.dev.config.num_queues),
                capacity: of.dev.config.capacity,
                features: of.dev.features,
                max_transfer: of.dev.config.max_transfer,
                max_segments: of.dev.config.max_segments,
                submitted: s.submitted.load(R),
                timeouts: s.timeouts.load(R),
                cancels: s.cancels.load(R),
                resets: s.resets.load(R),
                async_completions: s.async_completions.load(R),
                sync_completions: s.sync_completions.load(R),
                errors: s.errors.load(R),
                bytes: s.bytes.load(R),
            };
            let size = core::mem::size_of::<abi::DeviceInfo>();
            // SAFETY: `info` is a plain repr(C) value of `size` bytes.
            let left = unsafe {
                bindings::_copy_to_user(
                    arg as *mut c_void,
                    (&raw const info).cast::<c_void>(),
                    size,
                )
            };
            if left != 0 {
                EFAULT.to_errno() as isize
            } else {
                0
            }
        }
        _ => ENOTTY.to_errno() as isize,
    }
}
