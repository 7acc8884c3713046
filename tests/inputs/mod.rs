//! Deterministic input generation shared by the hostile-input and fuzz-target
//! tests: a seeded generator and a mutator, so any failure replays.

#![allow(dead_code)]

/// A small deterministic generator (xorshift64*), so failures replay.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A seed with a few bytes changed, cut, duplicated or extended: the kind
/// of input a fuzzer tries first.
pub fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..=rng.below(6) {
        match rng.below(5) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] = rng.next() as u8;
            }
            1 => d.truncate(rng.below(d.len() + 1)),
            2 => {
                let at = rng.below(d.len() + 1);
                let extra = rng.bytes(8);
                d.splice(at..at, extra);
            }
            3 if !d.is_empty() => {
                let from = rng.below(d.len());
                let to = from + rng.below(d.len() - from + 1);
                let copy = d[from..to].to_vec();
                d.extend(copy);
            }
            _ if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            _ => {}
        }
    }
    d
}
