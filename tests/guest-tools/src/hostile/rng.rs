//! A small deterministic generator for garbage (xorshift64*): the tool needs
//! no crate for randomness, and a seed printed at the start makes a run
//! repeatable.

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // xorshift must not start at 0.
        Self(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A value a register fuzzer should try: boundary values, the virtio
    /// status bits in order, small numbers and plain random bits.
    pub fn garbage(&mut self) -> u64 {
        const SPECIAL: [u64; 16] = [
            0,
            1,
            2,
            3,
            0xb,
            0xf,
            0x40,
            0x80,
            0xff,
            0x100,
            0xffff,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            0x8000_0000_0000_0000,
            u64::MAX,
        ];
        match self.below(4) {
            0 | 1 => SPECIAL[usize::from(self.next_u64().to_le_bytes()[0] & 0xf)],
            2 => self.below(0x1000),
            _ => self.next_u64(),
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
