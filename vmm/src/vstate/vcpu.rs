//! A vCPU and its thread: runs KVM_RUN and dispatches port and MMIO exits to the buses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::bus::Bus;
use crate::exit::{StopReason, StopSignal};
use crate::seccomp::{Filters, ThreadKind};

/// Everything a vCPU thread needs besides its file descriptor.
#[derive(Debug, Clone)]
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where to report that the VM must stop.
    pub stop: Arc<StopSignal>,
    /// Set by the console when the guest kernel printed a panic.
    pub guest_panicked: Arc<AtomicBool>,
    /// The filters each vCPU thread installs before its first KVM_RUN (`None`: `--seccomp off`).
    pub seccomp: Option<Arc<Filters>>,
}

/// A configured vCPU, ready to run on its own thread.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    ctx: VcpuContext,
    /// Spurious "exit during event delivery" errors in a row (see [`Vcpu::spurious_vectoring`]).
    spurious_vectoring: u32,
}

/// Most spurious event-delivery exits in a row before the vCPU gives up.
const MAX_SPURIOUS_VECTORING: u32 = 16;

/// What to do after one exit.
enum Next {
    Continue,
    Stop(StopReason),
}

impl Vcpu {
    /// Wrap a configured vCPU fd.
    pub fn new(id: u8, fd: VcpuFd, ctx: VcpuContext) -> Self {
        Self {
            id,
            fd,
            ctx,
            spurious_vectoring: 0,
        }
    }

    /// Start the vCPU on a thread named `vcpu<N>`.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        if let Some(filters) = &self.ctx.seccomp {
            if let Err(e) = filters.install(ThreadKind::Vcpu) {
                self.ctx.stop.stop(StopReason::SeccompFailed(e.to_string()));
                return;
            }
        }
        loop {
            let next = self.run_once();
            if let Next::Stop(reason) = next {
                self.ctx.stop.stop(reason);
                return;
            }
            if self.ctx.stop.reason().is_some() {
                return;
            }
        }
    }

    /// A shutdown exit is a triple fault (or a `reboot=t` reboot): record where the vCPU was,
    /// so an unexpected guest reset can be traced.
    fn log_shutdown_state(&self) {
        if self.ctx.guest_panicked.load(Ordering::SeqCst) {
            return;
        }
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => {
                log::warn!(
                "vCPU {}: shutdown exit (triple fault or reboot) at rip {:#x} rsp {:#x} cr2 {:#x} \
                 cr3 {:#x} idt {:#x}/{:#x} rflags {:#x}",
                self.id, r.rip, r.rsp, s.cr2, s.cr3, s.idt.base, s.idt.limit, r.rflags
            )
            }
            (r, s) => log::warn!(
                "vCPU {}: shutdown exit; registers unavailable ({:?} / {:?})",
                self.id,
                r.err(),
                s.err()
            ),
        }
    }

    fn guest_stopped(&self) -> StopReason {
        if self.ctx.guest_panicked.load(Ordering::SeqCst) {
            StopReason::GuestPanicked
        } else {
            StopReason::GuestReset
        }
    }

    /// Whether an "exit during event delivery" (KVM_INTERNAL_ERROR_DELIVERY_EV) is spurious:
    /// KVM holds no event for re-injection, so the guest was not vectoring one.
    ///
    /// QEMU's TCG emulation of SVM (the emulated host) clears only the valid bit of EVENTINJ
    /// after it delivers an event in guest mode and copies the rest into EXITINTINFO at the next
    /// #VMEXIT, while KVM (7.x) refuses to emulate MMIO when EXITINTINFO's type bits are non-zero.
    /// So the first MMIO access after, e.g., a guest page fault or a virtual interrupt exits with
    /// this error although nothing is being delivered. The access was not performed; running
    /// the vCPU again retries it with a clean EXITINTINFO.
    fn spurious_vectoring(&self) -> bool {
        match self.fd.get_vcpu_events() {
            Ok(ev) => {
                ev.exception.injected == 0 && ev.interrupt.injected == 0 && ev.nmi.injected == 0
            }
            Err(_) => false,
        }
    }

    fn internal_error(&mut self) -> Next {
        let id = self.id;
        // SAFETY: KVM filled the `internal` member of the union for this exit reason.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let suberror = internal.suberror;
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..n]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        if suberror == kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV
            && self.spurious_vectoring < MAX_SPURIOUS_VECTORING
            && self.spurious_vectoring()
        {
            self.spurious_vectoring += 1;
            log::debug!(
                "vCPU {id}: spurious exit during event delivery (data [{}]); retrying",
                data.join(", ")
            );
            return Next::Continue;
        }
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or_default();
        Next::Stop(StopReason::VcpuFailed(format!(
            "vCPU {id}: KVM_EXIT_INTERNAL_ERROR (suberror {suberror}{}) at rip {rip:#x}, \
             data [{}]",
            match suberror {
                1 => ": emulation failure",
                3 => ": exit during event delivery",
                _ => "",
            },
            data.join(", ")
        )))
    }

    fn run_once(&mut self) -> Next {
        let id = self.id;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Next::Continue
            }
            Err(e) => {
                return Next::Stop(StopReason::VcpuFailed(format!("vCPU {id}: KVM_RUN: {e}")))
            }
        };
        if !matches!(exit, VcpuExit::InternalError) {
            self.spurious_vectoring = 0;
        }
        match exit {
            VcpuExit::IoOut(port, data) => {
                if !self.ctx.pio.write(u64::from(port), data) {
                    log::trace!("vCPU {id}: unclaimed port write {port:#x}");
                }
                Next::Continue
            }
            VcpuExit::IoIn(port, data) => {
                if !self.ctx.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                Next::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !self.ctx.mmio.write(addr, data) {
                    log::debug!("vCPU {id}: unclaimed MMIO write {addr:#x}");
                }
                Next::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                Next::Continue
            }
            // With the in-kernel irqchip HLT does not reach userspace; if it does, re-entering
            // lets KVM deliver the next interrupt.
            VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Next::Continue,
            VcpuExit::Shutdown => {
                self.log_shutdown_state();
                Next::Stop(self.guest_stopped())
            }
            VcpuExit::SystemEvent(kind, _) => {
                log::debug!("vCPU {id}: system event {kind}");
                Next::Stop(self.guest_stopped())
            }
            VcpuExit::FailEntry(reason, cpu) => Next::Stop(StopReason::VcpuFailed(format!(
                "vCPU {id}: KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x}, cpu {cpu})"
            ))),
            VcpuExit::InternalError => self.internal_error(),
            other => Next::Stop(StopReason::VcpuFailed(format!(
                "vCPU {id}: unexpected exit reason {other:?}"
            ))),
        }
    }
}
