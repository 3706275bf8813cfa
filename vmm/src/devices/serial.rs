//! COM1: a 16550 UART (vm-superio) whose output goes to the VMM's stdout and whose input comes
//! from the VMM's stdin; its interrupt is an irqfd on GSI 4.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// COM1 I/O base and length.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of UART registers.
pub const COM1_LEN: u16 = 8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// What the guest kernel prints when it panics.
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// An interrupt line backed by an eventfd that KVM turns into an interrupt (irqfd).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The console sink: forwards guest output to a writer and watches it for a kernel panic.
///
/// Output is line-buffered (flushed at each newline) unless `interactive`, where every byte is
/// flushed so prompts appear at once.
#[derive(Debug)]
pub struct ConsoleOut<W: Write> {
    out: W,
    interactive: bool,
    line: Vec<u8>,
    panicked: Arc<AtomicBool>,
}

impl<W: Write> ConsoleOut<W> {
    /// A console writing to `out`; `panicked` is set when the guest kernel panics.
    pub fn new(out: W, interactive: bool, panicked: Arc<AtomicBool>) -> Self {
        Self {
            out,
            interactive,
            line: Vec::with_capacity(256),
            panicked,
        }
    }

    fn end_of_line(&mut self) {
        if self
            .line
            .windows(PANIC_MARKER.len())
            .any(|w| w == PANIC_MARKER)
        {
            self.panicked.store(true, Ordering::SeqCst);
        }
        self.line.clear();
    }
}

impl<W: Write> Write for ConsoleOut<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write_all(buf)?;
        for &b in buf {
            if b == b'\n' {
                self.end_of_line();
                self.out.flush()?;
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        if self.interactive {
            self.out.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The UART on the port bus.
pub struct SerialDevice<W: Write + Send> {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleOut<W>>,
}

impl<W: Write + Send> std::fmt::Debug for SerialDevice<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut<W>) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Queue host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Flush buffered guest output.
    pub fn flush(&mut self) {
        if let Err(e) = self.uart.writer_mut().flush() {
            log::warn!("console flush failed: {e}");
        }
    }
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, value) {
                log::warn!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn console_forwards_and_detects_panic() {
        let panicked = Arc::new(AtomicBool::new(false));
        let mut out = ConsoleOut::new(Vec::new(), false, panicked.clone());
        out.write_all(b"hello\n[ 1.0] Kernel panic - not ").unwrap();
        assert!(!panicked.load(Ordering::SeqCst));
        out.write_all(b"syncing: Attempted to kill init!\n")
            .unwrap();
        assert!(panicked.load(Ordering::SeqCst));
        assert!(out.out.starts_with(b"hello\n[ 1.0] Kernel panic"));
    }

    #[test]
    fn uart_transmits_to_console() {
        let panicked = Arc::new(AtomicBool::new(false));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, ConsoleOut::new(Vec::new(), false, panicked));
        for b in b"ok\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(dev.uart.writer().out, b"ok\n");
    }
}
