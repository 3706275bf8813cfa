//! Small pieces shared by the `aiodma-aio` subcommands: aligned buffers, the seeded pattern and
//! PRNG, the INFO ioctl, errno names, bounded waits and latency percentiles.

use std::fs::{File, OpenOptions};
use std::os::fd::RawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc;
use std::time::Duration;

use crate::abi;

/// SplitMix64: a tiny deterministic PRNG.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// The byte that device position `pos` holds for `seed`.
pub fn pattern(seed: u64, pos: u64) -> u8 {
    let mut z = pos.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
    z ^= z >> 29;
    (z.wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 56) as u8
}

/// Open the device read-write with extra `open(2)` flags.
pub fn open_dev(path: &str, flags: i32) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))
}

/// The driver's INFO ioctl.
pub fn device_info(fd: RawFd) -> Result<abi::DeviceInfo, String> {
    let mut info = abi::DeviceInfo::default();
    // SAFETY: INFO writes exactly one DeviceInfo into the pointed-to value.
    let rc = unsafe { libc::ioctl(fd, abi::ioctl::INFO as _, &mut info as *mut abi::DeviceInfo) };
    if rc != 0 {
        return Err(format!("INFO ioctl: {}", std::io::Error::last_os_error()));
    }
    Ok(info)
}

/// The size of a device file: /dev/aiodma0 and block devices (a peer's /dev/vda) both report
/// it at SEEK_END.
pub fn device_size(fd: RawFd) -> Result<u64, String> {
    // SAFETY: lseek on a descriptor we hold; the position is put back before returning.
    let end = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
    // SAFETY: as above.
    let back = unsafe { libc::lseek(fd, 0, libc::SEEK_SET) };
    if end < 0 || back < 0 {
        return Err(format!("lseek: {}", std::io::Error::last_os_error()));
    }
    Ok(end as u64)
}

/// A zeroed heap buffer aligned to 4 KiB, handed to the kernel by raw pointer (asynchronous
/// requests write into it behind Rust's back, so it is never borrowed while one is in flight).
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain memory owned by this value; moving it between threads is fine.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes (at least one page is allocated).
    pub fn new(len: usize) -> Result<Self, String> {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096)
            .map_err(|e| format!("buffer of {len} bytes: {e}"))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(format!("out of memory allocating {len} bytes"));
        }
        Ok(Self { ptr, len, layout })
    }

    /// The start, for the kernel.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The contents (no request may be writing into the buffer).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The contents, writable (no request may be using the buffer).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Fill with the pattern of `seed` for device offset `offset`.
    pub fn fill_pattern(&mut self, seed: u64, offset: u64) {
        for (k, b) in self.bytes_mut().iter_mut().enumerate() {
            *b = pattern(seed, offset + k as u64);
        }
    }

    /// The first byte of `self[..n]` that differs from the pattern, if any.
    pub fn pattern_mismatch(&self, n: usize, seed: u64, offset: u64) -> Option<usize> {
        self.bytes()[..n.min(self.len)]
            .iter()
            .enumerate()
            .position(|(k, b)| *b != pattern(seed, offset + k as u64))
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// The symbolic name of an errno value (positive), or its number.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ETIME => "ETIME",
        libc::EALREADY => "EALREADY",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ECANCELED => "ECANCELED",
        libc::ENOENT => "ENOENT",
        512 => "ERESTARTSYS",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// A request result as the kernel reports it (bytes, or a negative errno) in words.
pub fn res_name(res: i64) -> String {
    if res < 0 {
        format!("-{}", errno_name((-res) as i32))
    } else {
        res.to_string()
    }
}

/// The result of a libc call returning -1/errno as `Ok(value)` or `Err(errno)`.
pub fn sys_result(rc: i64) -> Result<i64, i32> {
    if rc < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(rc)
    }
}

/// Run `f` on its own thread and wait at most `limit` for it. `None` means it is still running
/// (blocked); the thread is left behind.
pub fn bounded<T, F>(limit: Duration, f: F) -> Option<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new().spawn(move || {
        let _ = tx.send(f());
    });
    if spawned.is_err() {
        return None;
    }
    rx.recv_timeout(limit).ok()
}

/// Latency percentiles (nearest rank) of `samples` in nanoseconds, reported in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
}

impl Percentiles {
    /// Sorts `samples` in place.
    pub fn of(samples: &mut [u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1] as f64 / 1000.0
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
        }
    }
}

/// A bare-bones float/integer parser for durations given in seconds ("2", "0.5").
pub fn parse_secs(s: &str) -> Option<Duration> {
    let v: f64 = s.parse().ok()?;
    if v.is_finite() && v > 0.0 && v < 1e6 {
        Some(Duration::from_secs_f64(v))
    } else {
        None
    }
}

/// A size in bytes with an optional k/m/g suffix (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let lower = s.to_ascii_lowercase();
    let (num, mult) = match lower.trim_end_matches('b').chars().last()? {
        'k' => (&lower[..lower.find('k')?], 1u64 << 10),
        'm' => (&lower[..lower.find('m')?], 1 << 20),
        'g' => (&lower[..lower.find('g')?], 1 << 30),
        _ => (lower.as_str(), 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_percentiles() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("4KiB"), None);
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("x"), None);
        let mut v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!((p.p50, p.p99, p.p999), (500.0, 990.0, 999.0));
        assert_eq!(parse_secs("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_secs("-1"), None);
    }
}
