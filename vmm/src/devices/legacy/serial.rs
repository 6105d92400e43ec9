//! The 8250 UART at 0x3f8 (COM1), from vm-superio: the guest's console.
//! Output goes to stdout, a file, or nowhere, within the console's limits
//! ([`BoundedConsole`]); its interrupt (IRQ 4) is an irqfd so KVM injects
//! it without a VMM round trip.
//!
//! The guest writes its console a byte per exit; the output is written out
//! a burst at a time ([`BurstWriter`]): at a newline, at [`BURST_MAX`]
//! bytes, or when the guest writes any register but the data register
//! (Linux restores IER after each console message, and the tty driver
//! clears the THR interrupt when it has nothing more to send). One write
//! system call a line instead of one a byte, which a nested VMM pays dearly.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::IrqEvt;
use crate::devices::bus::BusDevice;
use crate::guest_warn;
use crate::logger::console::{self, BoundedConsole};
use husk_vm_config::control::GuestFaultKind;
use husk_vm_config::{ConsoleLimits, SerialOutput};

/// Where serial output is written.
pub type SerialOut = Box<dyn Write + Send>;

/// Opens the serial output sink the config names, within `limits`.
pub fn open_output(output: &SerialOutput, limits: ConsoleLimits) -> io::Result<SerialOut> {
    let bounded = |w: SerialOut| -> SerialOut {
        Box::new(BoundedConsole::new(w, limits, &console::COUNTERS))
    };
    Ok(match output {
        SerialOutput::Stdout => bounded(Box::new(io::stdout())),
        SerialOutput::File(path) => bounded(Box::new(create_file(path)?)),
        SerialOutput::None => Box::new(io::sink()),
    })
}

fn create_file(path: &Path) -> io::Result<File> {
    File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
}

/// The UART's registers and receive FIFO, as a snapshot keeps them
/// (vm-superio's `SerialState`, which has no serde of its own).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Most console bytes held before they are written out.
pub const BURST_MAX: usize = 256;

/// The UART's output, held until the end of a burst (see the module docs).
pub struct BurstWriter {
    out: SerialOut,
    buf: Vec<u8>,
    /// Signalled when bytes start to be held, so the event loop writes out
    /// a partial line (a prompt, a guest that prints no newline) soon
    /// rather than never ([`SerialFlusher`]).
    wake: Option<EventFd>,
}

impl BurstWriter {
    fn new(out: SerialOut) -> Self {
        Self {
            out,
            buf: Vec::with_capacity(BURST_MAX),
            wake: None,
        }
    }

    /// Writes out what is held.
    fn end_burst(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let result = self
            .out
            .write_all(&self.buf)
            .and_then(|()| self.out.flush());
        self.buf.clear();
        result
    }
}

impl Write for BurstWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let was_empty = self.buf.is_empty();
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= BURST_MAX || bytes.contains(&b'\n') {
            self.end_burst()?;
        } else if was_empty {
            if let Some(wake) = &self.wake {
                // A full counter only means a wake-up is already pending.
                let _ = wake.write(1);
            }
        }
        Ok(bytes.len())
    }

    /// vm-superio flushes after every byte; the burst's end decides instead.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BurstWriter {
    fn drop(&mut self) {
        if let Err(e) = self.end_burst() {
            tracing::debug!("serial output at exit: {e}");
        }
    }
}

/// The UART's data register (THR/RBR, or DLL with DLAB set).
const DATA_REGISTER: u8 = 0;

/// The COM1 UART on the port I/O bus.
pub struct SerialDevice {
    serial: Serial<IrqEvt, NoEvents, BurstWriter>,
}

impl SerialDevice {
    /// A UART raising `irq_evt` and writing to `out`.
    pub fn new(irq_evt: EventFd, out: SerialOut) -> Self {
        Self {
            serial: Serial::new(IrqEvt(irq_evt), BurstWriter::new(out)),
        }
    }

    /// A UART restored from a snapshot's registers; a receive FIFO past
    /// the UART's size is refused.
    pub fn from_snapshot(
        irq_evt: EventFd,
        out: SerialOut,
        state: &SerialSnapshot,
    ) -> Result<Self, String> {
        Serial::from_state(
            &SerialState::from(state),
            IrqEvt(irq_evt),
            NoEvents,
            BurstWriter::new(out),
        )
        .map(|serial| Self { serial })
        .map_err(|e| format!("serial state: {e:?}"))
    }

    /// Signals `wake` whenever output starts to be held; a [`SerialFlusher`]
    /// on the same eventfd writes it out.
    pub fn set_flush_wake(&mut self, wake: EventFd) {
        self.serial.writer_mut().wake = Some(wake);
    }

    /// Writes out the output held, if any.
    pub fn end_burst(&mut self) -> io::Result<()> {
        self.serial.writer_mut().end_burst()
    }

    /// The UART's registers and FIFO, for a snapshot.
    pub fn snapshot(&self) -> SerialSnapshot {
        self.serial.state().into()
    }

    /// The eventfd to register as irqfd for the UART's IRQ.
    pub fn irq_evt(&self) -> &EventFd {
        &self.serial.interrupt_evt().0
    }

    /// Queues input bytes for the guest to read; returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("serial input dropped: {e}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // The UART's registers are bytes; wider accesses read zero.
        if let ([b], Ok(offset)) = (data, u8::try_from(offset)) {
            *b = self.serial.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([b], Ok(offset)) = (data, u8::try_from(offset)) {
            if let Err(e) = self.serial.write(offset, *b) {
                // Losing console output must not stop the guest.
                guest_warn!(GuestFaultKind::Console, "serial output: {e}");
            }
            if offset != DATA_REGISTER {
                if let Err(e) = self.serial.writer_mut().end_burst() {
                    guest_warn!(GuestFaultKind::Console, "serial output: {e}");
                }
            }
        }
    }
}

/// Writes out a partial burst from the event loop: the vCPU signals the
/// eventfd when bytes start to be held, and by the time the loop runs the
/// rest of the line has usually followed. One wake-up per burst, not per
/// byte, and no output is held past the loop's next turn.
pub struct SerialFlusher {
    serial: Arc<Mutex<SerialDevice>>,
    wake: EventFd,
}

impl SerialFlusher {
    pub fn new(serial: Arc<Mutex<SerialDevice>>, wake: EventFd) -> Self {
        Self { serial, wake }
    }
}

impl MutEventSubscriber for SerialFlusher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            tracing::warn!("serial output flushes only at line ends: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.wake.read();
        let mut serial = match self.serial.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = serial.end_burst() {
            guest_warn!(GuestFaultKind::Console, "serial output: {e}");
        }
    }
}

/// Feeds the VMM's stdin to the guest console, for interactive use (only
/// set up when stdin is a terminal). Input that finds the UART's FIFO full
/// is dropped, as on a real serial line.
pub struct SerialStdin {
    serial: Arc<Mutex<SerialDevice>>,
}

const STDIN_FD: i32 = libc::STDIN_FILENO;

impl SerialStdin {
    /// A stdin reader for `serial`, if stdin is a terminal.
    pub fn for_terminal(serial: Arc<Mutex<SerialDevice>>) -> Option<Self> {
        // SAFETY: isatty only inspects the file descriptor.
        let tty = unsafe { libc::isatty(STDIN_FD) } == 1;
        tty.then_some(Self { serial })
    }
}

impl MutEventSubscriber for SerialStdin {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(STDIN_FD, EventSet::IN)) {
            tracing::warn!("cannot watch stdin for serial input: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a local buffer of the length passed.
        let n = unsafe { libc::read(STDIN_FD, buf.as_mut_ptr().cast(), buf.len()) };
        let hung_up = events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR);
        let n = match usize::try_from(n) {
            Ok(n) if n > 0 && !hung_up => n,
            _ => {
                let err = io::Error::last_os_error();
                if n < 0 && err.kind() == io::ErrorKind::Interrupted {
                    return;
                }
                // EOF or error: stop watching stdin; the guest keeps running.
                let _ = ops.remove(Events::new_raw(STDIN_FD, EventSet::IN));
                return;
            }
        };
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        serial.enqueue_input(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writes_reach_output_and_raise_irq() {
        let out = Shared::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt.try_clone().unwrap(), Box::new(out.clone()));
        // IER: enable the "transmitter holding register empty" interrupt.
        dev.write(1, &[0x02]);
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert!(evt.read().unwrap() >= 1);
        // Wide accesses are ignored / read zero.
        dev.write(0, b"xy");
        assert_eq!(out.0.lock().unwrap().len(), 3);
        let mut wide = [0xffu8; 2];
        dev.read(5, &mut wide);
        assert_eq!(wide, [0, 0]);
        // LSR: transmitter empty bits set.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn input_is_readable_by_the_guest() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt, Box::new(io::sink()));
        assert_eq!(dev.enqueue_input(b"a"), 1);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
        // A full FIFO drops input instead of failing.
        let big = vec![b'x'; 1024];
        let took = dev.enqueue_input(&big);
        assert!(took > 0 && took < big.len());
        assert_eq!(dev.enqueue_input(b"y"), 0);
    }

    #[test]
    fn file_output_truncates() {
        let path = std::env::temp_dir().join(format!("husk-serial-{}", std::process::id()));
        std::fs::write(&path, b"old contents").unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = open_output(&SerialOutput::File(path.clone()), ConsoleLimits::default()).unwrap();
        let mut dev = SerialDevice::new(evt, out);
        dev.write(0, b"n");
        dev.write(1, &[0]); // IER: ends the burst
        assert_eq!(std::fs::read(&path).unwrap(), b"n");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn output_is_written_a_burst_at_a_time() {
        let out = Shared::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt, Box::new(out.clone()));
        let held = |out: &Shared| out.0.lock().unwrap().len();
        for b in b"$ " {
            dev.write(0, &[*b]);
        }
        assert_eq!(held(&out), 0, "a partial line is held");
        // Reads (the driver polling LSR) do not end a burst.
        dev.read(5, &mut [0u8]);
        assert_eq!(held(&out), 0);
        // Any register but the data register does.
        dev.write(1, &[0]);
        assert_eq!(&*out.0.lock().unwrap(), b"$ ");
        for b in b"ab\ncd" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"$ ab\n", "a newline ends a burst");
        // A burst without end is bounded.
        for _ in 0..BURST_MAX {
            dev.write(0, b"x");
        }
        assert_eq!(held(&out), 5 + BURST_MAX);
        dev.write(0, b"y");
        drop(dev);
        assert_eq!(
            held(&out),
            5 + BURST_MAX + 1 + 2,
            "dropping writes the rest"
        );
    }

    #[test]
    fn a_partial_line_wakes_the_event_loop_which_writes_it_out() {
        use event_manager::{EventManager, SubscriberOps};
        let out = Shared::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt, Box::new(out.clone()));
        dev.set_flush_wake(wake.try_clone().unwrap());
        let dev = Arc::new(Mutex::new(dev));
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        manager.add_subscriber(Arc::new(Mutex::new(SerialFlusher::new(dev.clone(), wake))));
        for b in b"login: " {
            dev.lock().unwrap().write(0, &[*b]);
        }
        assert!(out.0.lock().unwrap().is_empty(), "held until the loop runs");
        // One wake-up for the burst, however many bytes it has.
        assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(&*out.0.lock().unwrap(), b"login: ");
        assert_eq!(
            manager.run_with_timeout(0).unwrap(),
            0,
            "nothing more pending"
        );
    }
}
