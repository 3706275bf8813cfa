//! The system calls each kind of thread may make, with argument conditions where they are cheap
//! to state (ioctl request numbers, no executable mappings, signals only to this process).
//!
//! The lists were found by running every scenario of the test suite (file backing with and
//! without io_uring, memory backing, `--metrics` and SIGUSR1, terminal input, faults with
//! delay timers, resets, several queues and vCPUs, `aiodma bench`) under `strace -f` in the
//! emulated host and keeping what each thread did after its filter went in. Calls made only
//! while a thread starts (naming, signal stack, robust futex list, rseq) come before the filter
//! and are absent.

use std::collections::BTreeMap;

use kvm_bindings::{kvm_ioeventfd, kvm_irq_routing, kvm_regs, kvm_sregs, kvm_vcpu_events, KVMIO};
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

use super::{SeccompError, ThreadKind};

// The KVM ioctls a vCPU thread issues after start-up, numbered as in <linux/kvm.h>.
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);

/// The system calls of one thread kind: syscall number → rules (empty: allowed whatever the
/// arguments; otherwise allowed when any one rule matches).
pub(crate) type RuleMap = BTreeMap<i64, Vec<SeccompRule>>;

/// Builds a [`RuleMap`].
struct Rules(RuleMap);

impl Rules {
    /// Allow `nrs` whatever their arguments.
    fn allow(&mut self, nrs: &[libc::c_long]) {
        for &nr in nrs {
            self.0.insert(nr, Vec::new());
        }
    }

    /// Allow `nr` when one of `rules` matches.
    fn allow_if(&mut self, nr: libc::c_long, rules: Vec<SeccompRule>) {
        self.0.insert(nr, rules);
    }

    /// Allow `ioctl(fd, request, ...)` for these requests too.
    fn allow_ioctls(&mut self, requests: &[libc::c_ulong]) -> Result<(), SeccompError> {
        let rules = self.0.entry(libc::SYS_ioctl).or_default();
        for &r in requests {
            rules.push(arg_eq32(1, r)?);
        }
        Ok(())
    }
}

/// `arg == value`, comparing the low 32 bits (an ioctl request is an `unsigned int` in the
/// kernel, whatever the upper half of the register holds).
fn arg_eq32(arg: u8, value: u64) -> Result<SeccompRule, SeccompError> {
    Ok(SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])?)
}

/// `arg & PROT_EXEC == 0`: memory may be mapped or re-protected, but never made executable, so
/// a hijacked thread cannot turn data it wrote into code.
fn not_executable(arg: u8) -> Result<Vec<SeccompRule>, SeccompError> {
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?])?])
}

/// What every thread needs: the allocator (no executable memory), futexes (locks, channels),
/// logging (`write`; the logger asks whether stderr is a terminal with TCGETS), the clock (the
/// vDSO falls back to the system call on some clock sources), `abort` (signals to this process
/// only), thread exit (which drops what the thread owned, e.g. a vCPU's fd), and the SIGSYS
/// handler's own `write` and `exit_group`.
fn common(pid: u32) -> Result<Rules, SeccompError> {
    let mut r = Rules(RuleMap::new());
    r.allow_ioctls(&[libc::TCGETS])?;
    r.allow(&[
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getrandom,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    // glibc returns freed memory (and an exiting thread's stack) with MADV_DONTNEED only.
    r.allow_if(
        libc::SYS_madvise,
        vec![arg_eq32(2, libc::MADV_DONTNEED as u64)?],
    );
    r.allow_if(libc::SYS_mmap, not_executable(2)?);
    r.allow_if(libc::SYS_mprotect, not_executable(2)?);
    // abort() raises SIGABRT on the calling thread: tgkill(own pid, tid, sig).
    r.allow_if(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            u64::from(pid),
        )?])?],
    );
    Ok(r)
}

/// The allow list of `kind` for the process `pid`.
pub(crate) fn rules(kind: ThreadKind, pid: u32) -> Result<RuleMap, SeccompError> {
    let mut r = common(pid)?;
    match kind {
        // KVM_RUN and the exits it returns: port and MMIO accesses reach the devices on this
        // thread (PCI BAR moves re-register ioeventfds, MSI-X table writes re-route GSIs, the
        // UART and MSI-X signal irqfds, the transport wakes the device thread); the register
        // reads only happen when the guest stops in an unexpected way.
        ThreadKind::Vcpu => r.allow_ioctls(&[
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_VCPU_EVENTS(),
            KVM_SET_GSI_ROUTING(),
            KVM_IOEVENTFD(),
        ])?,
        // The event loop over doorbell, control, completion and timer fds (all registered
        // during set-up, so no epoll_ctl), the delay timer, io_uring submission and reaping
        // (file backing; FLUSH is an io_uring fsync).
        ThreadKind::Device => r.allow(&[
            libc::SYS_read,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_timerfd_settime,
            libc::SYS_io_uring_enter,
        ]),
        // Copies between guest memory and the store: memory (no calls), or a file without
        // io_uring (pread/pwrite, fdatasync for FLUSH; the vectored twins too, which grant
        // nothing more).
        ThreadKind::BackendWorker => r.allow(&[
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fdatasync,
        ]),
        // The event loop (stop eventfd, terminal input, which it stops watching at EOF,
        // SIGUSR1's signalfd, the timeout), the metrics file (written to a new temporary
        // file, synced, renamed over the target, removed if that fails; /proc/self/status and
        // mincore measure memory), restoring the terminal.
        ThreadKind::Main => {
            r.allow(&[
                libc::SYS_read,
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                libc::SYS_openat,
                libc::SYS_fsync,
                libc::SYS_rename,
                libc::SYS_unlink,
                libc::SYS_statx,
                libc::SYS_mincore,
            ]);
            r.allow_ioctls(&[libc::TCSETS, libc::TCSETSW, libc::TCSETSF])?;
        }
        // The API's event loop (tokio, current thread): accepting connections on the socket
        // (registered and deregistered with epoll as they come and go), HTTP over them (or
        // over the emulated host's virtio-serial port), the runtime's eventfd waker, and at
        // the end removing the socket file (checked first, so another file there is left).
        // Debug builds of std check that a descriptor is open before closing it (F_GETFD).
        ThreadKind::Api => {
            r.allow_if(libc::SYS_fcntl, vec![arg_eq32(1, libc::F_GETFD as u64)?]);
            r.allow(&[
                libc::SYS_read,
                libc::SYS_writev,
                libc::SYS_recvfrom,
                libc::SYS_accept4,
                libc::SYS_shutdown,
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                libc::SYS_statx,
                libc::SYS_unlink,
            ]);
        }
    }
    Ok(r.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn madvise_only_gives_memory_back() {
        let map = rules(ThreadKind::Vcpu, 1).unwrap();
        assert_eq!(map[&libc::SYS_madvise].len(), 1);
        assert!(!map.contains_key(&libc::SYS_rt_sigreturn));
    }

    #[test]
    fn kvm_ioctl_numbers_match_linux() {
        // The values of <linux/kvm.h> on x86_64.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
        assert_eq!(KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
        assert_eq!(KVM_IOEVENTFD(), 0x4040_ae79);
    }

    #[test]
    fn every_kind_can_report_a_forbidden_call_and_exit() {
        for kind in ThreadKind::ALL {
            let map = rules(kind, 1).unwrap();
            for nr in [libc::SYS_write, libc::SYS_exit_group, libc::SYS_futex] {
                assert_eq!(map.get(&nr).map(Vec::len), Some(0), "{kind:?}: {nr}");
            }
        }
    }

    #[test]
    fn only_the_main_thread_opens_files_and_only_vcpus_run_kvm() {
        let main = rules(ThreadKind::Main, 1).unwrap();
        assert!(main.contains_key(&libc::SYS_openat));
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::Device,
            ThreadKind::BackendWorker,
            ThreadKind::Api,
        ] {
            let map = rules(kind, 1).unwrap();
            for nr in [
                libc::SYS_openat,
                libc::SYS_open,
                libc::SYS_execve,
                libc::SYS_socket,
                libc::SYS_clone,
                libc::SYS_clone3,
            ] {
                assert!(!map.contains_key(&nr), "{kind:?} allows {nr}");
            }
        }
        // TCGETS everywhere (the logger), the six KVM ioctls on vCPUs only.
        assert_eq!(
            rules(ThreadKind::Vcpu, 1).unwrap()[&libc::SYS_ioctl].len(),
            7
        );
        assert_eq!(
            rules(ThreadKind::Device, 1).unwrap()[&libc::SYS_ioctl].len(),
            1
        );
    }
}
