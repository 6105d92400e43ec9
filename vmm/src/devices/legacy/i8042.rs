//! The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status and
//! command): the PC's reset line, and the keyboard through which the VMM
//! sends Ctrl-Alt-Del to ask the guest to shut down.
//!
//! vm-superio's `I8042Device` only models the reset command and has no
//! keyboard buffer or interrupt, so this device follows Firecracker's: a
//! small output buffer, the controller configuration byte, and IRQ 1.
//!
//! There is no AUX (mouse) port, and the device says so the way Linux's
//! i8042 driver asks: the AUX interface test reports the clock line stuck.
//! (The loopback command is not modelled: its byte reaches the keyboard,
//! which acknowledges it, and the driver sees no AUX data.) Without that
//! answer the driver takes the port for a working one, toggles its disable
//! bit a hundred times and waits 250 ms for an IRQ 12 that never comes, in
//! an initcall every boot waits for. The keyboard answers GET ID with an
//! MF2 keyboard's id, so atkbd's probe does not wait out its timeout either.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

const OFS_DATA: u64 = 0;
const OFS_STATUS: u64 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
const KBD_TEST_OK: u8 = 0x00;
/// AUX interface test result: clock line stuck low (no AUX port).
const AUX_TEST_CLOCK_LOW: u8 = 0x01;
const KBD_GET_ID: u8 = 0xf2;
/// An MF2 keyboard's id, after the acknowledgement of GET ID.
const KBD_ID_MF2: [u8; 2] = [0xab, 0x83];
const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_BAT_OK: u8 = 0xaa;

/// Status: output buffer full.
const SB_OUT_DATA_AVAIL: u8 = 0x01;
/// Status: the last write was a command (next data byte is its argument).
const SB_I8042_CMD_DATA: u8 = 0x08;
/// Status: keyboard not inhibited.
const SB_KBD_ENABLED: u8 = 0x10;

/// Configuration byte: keyboard interrupt enabled, POST passed.
const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;

/// Ctrl, Alt and Delete make codes in scan code set 2 (translation is off).
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

const BUF_SIZE: usize = 16;

/// Errors from injecting keys.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("i8042 output buffer is full")]
    BufferFull,
    #[error("cannot raise the keyboard interrupt: {0}")]
    Irq(#[source] std::io::Error),
}

/// The i8042 controller on the port I/O bus (at 0x60, 5 ports).
pub struct I8042Device {
    reset_evt: EventFd,
    kbd_irq: EventFd,
    status: u8,
    control: u8,
    outp: u8,
    /// The command waiting for its data byte, if any.
    cmd: Option<u8>,
    buf: VecDeque<u8>,
}

impl I8042Device {
    /// A controller signalling `reset_evt` on the reset command and raising
    /// `kbd_irq` (an irqfd for IRQ 1) when it has output.
    pub fn new(reset_evt: EventFd, kbd_irq: EventFd) -> Self {
        Self {
            reset_evt,
            kbd_irq,
            status: SB_KBD_ENABLED,
            control: CB_POST_OK | CB_KBD_INT,
            outp: 0,
            cmd: None,
            buf: VecDeque::with_capacity(BUF_SIZE),
        }
    }

    /// Presses Ctrl-Alt-Del: the guest's request to reboot, which a guest
    /// set up for husk answers by shutting down.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if self.buf.len() + CTRL_ALT_DEL.len() > BUF_SIZE {
            return Err(I8042Error::BufferFull);
        }
        CTRL_ALT_DEL.iter().for_each(|b| self.push(*b));
        self.raise_irq()
    }

    /// The eventfd to register as irqfd for IRQ 1.
    pub fn kbd_irq(&self) -> &EventFd {
        &self.kbd_irq
    }

    fn push(&mut self, byte: u8) {
        if self.buf.len() < BUF_SIZE {
            self.buf.push_back(byte);
        }
        self.status |= SB_OUT_DATA_AVAIL;
    }

    fn push_and_raise(&mut self, byte: u8) {
        self.push(byte);
        if let Err(e) = self.raise_irq() {
            tracing::warn!("i8042: {e}");
        }
    }

    fn raise_irq(&self) -> Result<(), I8042Error> {
        if self.control & CB_KBD_INT != 0 {
            self.kbd_irq.write(1).map_err(I8042Error::Irq)?;
        }
        Ok(())
    }

    fn pop(&mut self) -> u8 {
        let byte = self.buf.pop_front().unwrap_or(0);
        if self.buf.is_empty() {
            self.status &= !SB_OUT_DATA_AVAIL;
        } else if let Err(e) = self.raise_irq() {
            tracing::warn!("i8042: {e}");
        }
        byte
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_RESET_CPU => {
                tracing::info!("guest requested a reset through the i8042");
                if let Err(e) = self.reset_evt.write(1) {
                    tracing::error!("i8042: cannot signal the reset: {e}");
                }
            }
            CMD_READ_CTR => {
                self.buf.clear();
                self.push_and_raise(self.control);
            }
            CMD_READ_OUTP => {
                self.buf.clear();
                self.push_and_raise(self.outp);
            }
            CMD_SELF_TEST => self.push_and_raise(SELF_TEST_OK),
            CMD_KBD_TEST => self.push_and_raise(KBD_TEST_OK),
            CMD_AUX_TEST => {
                self.buf.clear();
                self.push_and_raise(AUX_TEST_CLOCK_LOW);
            }
            CMD_WRITE_CTR | CMD_WRITE_OUTP => {
                self.status |= SB_I8042_CMD_DATA;
                self.cmd = Some(cmd);
            }
            // Enable/disable ports and the like have nothing to model.
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !SB_I8042_CMD_DATA;
        match self.cmd.take() {
            Some(CMD_WRITE_CTR) => self.control = value,
            Some(CMD_WRITE_OUTP) => self.outp = value,
            // A keyboard command: acknowledge it, and report a passed
            // self-test after a keyboard reset.
            _ => {
                self.push_and_raise(KBD_ACK);
                match value {
                    KBD_RESET => self.push(KBD_BAT_OK),
                    KBD_GET_ID => KBD_ID_MF2.iter().for_each(|b| self.push(*b)),
                    _ => {}
                }
            }
        }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(b) = data.first_mut() else { return };
        *b = match offset {
            OFS_DATA => self.pop(),
            OFS_STATUS => self.status,
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            OFS_STATUS => self.command(value),
            OFS_DATA => self.data(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042Device, EventFd, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = I8042Device::new(reset.try_clone().unwrap(), irq.try_clone().unwrap());
        (d, reset, irq)
    }

    fn read(d: &mut I8042Device, offset: u64) -> u8 {
        let mut b = [0u8];
        d.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_reset() {
        let (mut d, reset, _) = dev();
        d.write(OFS_STATUS, &[0x20]);
        assert!(reset.read().is_err(), "no reset yet");
        d.write(OFS_STATUS, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn ctrl_alt_del_is_readable_with_irq() {
        let (mut d, _, irq) = dev();
        assert_eq!(read(&mut d, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);
        d.trigger_ctrl_alt_del().unwrap();
        assert!(irq.read().unwrap() >= 1);
        let mut got = vec![];
        while read(&mut d, OFS_STATUS) & SB_OUT_DATA_AVAIL != 0 {
            got.push(read(&mut d, OFS_DATA));
        }
        assert_eq!(got, CTRL_ALT_DEL);
        for _ in 0..4 {
            d.trigger_ctrl_alt_del().unwrap();
        }
        assert!(matches!(
            d.trigger_ctrl_alt_del(),
            Err(I8042Error::BufferFull)
        ));
    }

    #[test]
    fn configuration_byte_and_keyboard_commands() {
        let (mut d, _, irq) = dev();
        d.write(OFS_STATUS, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, OFS_DATA), CB_POST_OK | CB_KBD_INT);
        d.write(OFS_STATUS, &[CMD_WRITE_CTR]);
        assert_ne!(read(&mut d, OFS_STATUS) & SB_I8042_CMD_DATA, 0);
        d.write(OFS_DATA, &[0x00]); // interrupts off
        d.write(OFS_STATUS, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, OFS_DATA), 0);
        while irq.read().is_ok() {}
        d.write(OFS_DATA, &[KBD_RESET]);
        assert!(irq.read().is_err(), "interrupts disabled in the CTR");
        assert_eq!(read(&mut d, OFS_DATA), KBD_ACK);
        assert_eq!(read(&mut d, OFS_DATA), KBD_BAT_OK);
        d.write(OFS_STATUS, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut d, OFS_DATA), SELF_TEST_OK);
        d.write(OFS_DATA, &[KBD_GET_ID]);
        assert_eq!(read(&mut d, OFS_DATA), KBD_ACK);
        assert_eq!(read(&mut d, OFS_DATA), 0xab);
        assert_eq!(read(&mut d, OFS_DATA), 0x83);
        assert_eq!(read(&mut d, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);
    }

    /// Linux's i8042_check_aux: the loopback of 0x5a must not come back
    /// as AUX data, and the AUX interface test must then fail at once (a
    /// non-zero code other than 0xfa/0xff), even with the keyboard's
    /// acknowledgement of the looped byte still in the buffer.
    #[test]
    fn no_aux_port_is_reported_at_once() {
        let (mut d, _, _) = dev();
        d.write(OFS_STATUS, &[0xd3]);
        d.write(OFS_DATA, &[0x5a]);
        let status = read(&mut d, OFS_STATUS);
        assert_ne!(status & SB_OUT_DATA_AVAIL, 0, "the driver does not wait");
        assert_eq!(status & 0x20, 0, "no AUX data");
        d.write(OFS_STATUS, &[CMD_AUX_TEST]);
        assert_eq!(read(&mut d, OFS_DATA), AUX_TEST_CLOCK_LOW);
        assert_eq!(read(&mut d, OFS_STATUS) & SB_OUT_DATA_AVAIL, 0);
    }
}
