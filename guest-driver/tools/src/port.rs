//! One-byte writes to the VMM's platform ports (see `abi::platform`).

use std::io;

/// Write `value` to I/O port `port`. Needs CAP_SYS_RAWIO (root in the guest).
pub fn outb(port: u16, value: u8) -> io::Result<()> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    let rc = unsafe { libc::ioperm(u64::from(port), 1, 1) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the port is one of the VMM's platform ports, which have no side effect on this
    // process's memory; ioperm above granted access, so `out` cannot fault.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
    Ok(())
}
