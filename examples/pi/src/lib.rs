//! Monte-Carlo estimate of π: each task throws `samples` points into the unit
//! square from its own seed and counts those inside the quarter circle.

use serde::{Deserialize, Serialize};
use wasmgrid_guest::task;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hits {
    pub inside: u64,
    pub samples: u64,
}

#[task]
fn sample_pi(seed: u64, samples: u64) -> Hits {
    throw_darts(seed, samples)
}

pub fn throw_darts(seed: u64, samples: u64) -> Hits {
    let mut rng = Xoshiro256::new(seed);
    let mut inside = 0;
    for _ in 0..samples {
        let x = rng.next_f64();
        let y = rng.next_f64();
        if x * x + y * y < 1.0 {
            inside += 1;
        }
    }
    Hits { inside, samples }
}

/// π estimated from the hits of many tasks.
pub fn estimate(hits: &[Hits]) -> f64 {
    let inside: u64 = hits.iter().map(|h| h.inside).sum();
    let samples: u64 = hits.iter().map(|h| h.samples).sum();
    4.0 * inside as f64 / samples.max(1) as f64
}

/// xoshiro256** seeded through splitmix64: fast, and the same on every platform.
struct Xoshiro256([u64; 4]);

impl Xoshiro256 {
    fn new(seed: u64) -> Self {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Xoshiro256([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_is_close_to_pi() {
        let hits: Vec<Hits> = (0..10).map(|seed| throw_darts(seed, 100_000)).collect();
        assert!((estimate(&hits) - std::f64::consts::PI).abs() < 0.01);
    }

    #[test]
    fn same_seed_same_hits() {
        assert_eq!(throw_darts(7, 1000), throw_darts(7, 1000));
        assert_ne!(throw_darts(7, 1000), throw_darts(8, 1000));
    }
}
