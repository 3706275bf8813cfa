//! A vCPU and its thread: runs KVM_RUN and dispatches port and MMIO exits to the buses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::bus::Bus;
use crate::exit::{StopReason, StopSignal};

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
}

/// A configured vCPU, ready to run on its own thread.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    ctx: VcpuContext,
}

/// What to do after one exit.
enum Next {
    Continue,
    Stop(StopReason),
}

impl Vcpu {
    /// Wrap a configured vCPU fd.
    pub fn new(id: u8, fd: VcpuFd, ctx: VcpuContext) -> Self {
        Self { id, fd, ctx }
    }

    /// Start the vCPU on a thread named `vcpu<N>`.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || self.run())
    }

    fn run(mut self) {
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

    fn guest_stopped(&self) -> StopReason {
        if self.ctx.guest_panicked.load(Ordering::SeqCst) {
            StopReason::GuestPanicked
        } else {
            StopReason::GuestReset
        }
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
            VcpuExit::Shutdown => Next::Stop(self.guest_stopped()),
            VcpuExit::SystemEvent(kind, _) => {
                log::debug!("vCPU {id}: system event {kind}");
                Next::Stop(self.guest_stopped())
            }
            VcpuExit::FailEntry(reason, cpu) => Next::Stop(StopReason::VcpuFailed(format!(
                "vCPU {id}: KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x}, cpu {cpu})"
            ))),
            VcpuExit::InternalError => {
                // SAFETY: KVM filled the `internal` member of the union for this exit reason.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Next::Stop(StopReason::VcpuFailed(format!(
                    "vCPU {id}: KVM_EXIT_INTERNAL_ERROR (suberror {suberror}{})",
                    if suberror == 1 { ": emulation failure" } else { "" }
                )))
            }
            other => Next::Stop(StopReason::VcpuFailed(format!(
                "vCPU {id}: unexpected exit reason {other:?}"
            ))),
        }
    }
}
