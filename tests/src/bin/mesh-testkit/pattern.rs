//! Deterministic byte streams, so both ends of a connection can check every byte without
//! sharing anything but a seed.

/// Seed of the bytes a client sends.
pub const CLIENT_SEED: u64 = 0x6d65_7368_636c_6e74;
/// Seed of the bytes a `halfclose` server sends back after the digest.
pub const SERVER_SEED: u64 = 0x6d65_7368_7372_7672;

/// An endless pseudo-random byte stream (xorshift64*). The stream is the same whatever
/// the sizes of the chunks it is read in, which matters because TCP re-chunks freely.
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        // xorshift must not start at zero.
        Self {
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut out = buf;
        // Finish a partly used word first, then copy whole words, then start a new one.
        while !out.is_empty() && self.used < 8 {
            out[0] = self.word[self.used];
            self.used += 1;
            out = &mut out[1..];
        }
        let mut chunks = out.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_word());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            self.word = self.next_word();
            let n = rest.len();
            rest.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }

    /// Checks that `got` is the next `got.len()` bytes of the stream; returns the offset
    /// (within `got`) of the first wrong byte.
    pub fn verify(&mut self, got: &[u8], scratch: &mut Vec<u8>) -> Result<(), usize> {
        scratch.resize(got.len(), 0);
        self.fill(scratch);
        match got.iter().zip(scratch.iter()).position(|(a, b)| a != b) {
            Some(i) => Err(i),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_stream() {
        let mut whole = vec![0u8; 1000];
        Pattern::new(7).fill(&mut whole);
        let mut pieces = Pattern::new(7);
        let mut got = Vec::new();
        for size in [1, 3, 8, 13, 0, 64, 5, 906] {
            let mut buf = vec![0u8; size];
            pieces.fill(&mut buf);
            got.extend_from_slice(&buf);
        }
        assert_eq!(got, whole);
        let mut scratch = Vec::new();
        assert_eq!(Pattern::new(7).verify(&whole[..10], &mut scratch), Ok(()));
        assert!(Pattern::new(8).verify(&whole[..10], &mut scratch).is_err());
    }
}
