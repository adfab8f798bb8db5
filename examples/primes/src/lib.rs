//! Counts the primes in `[lo, hi)` with a segmented sieve of Eratosthenes.

use wasmgrid_guest::task;

/// Largest `hi` accepted: keeps the base sieve (√hi bytes) small.
pub const MAX_HI: u64 = 1 << 44;

const SEGMENT: usize = 1 << 15;

#[task]
fn count_primes(lo: u64, hi: u64) -> Result<u64, String> {
    if lo > hi {
        return Err(format!("empty range: lo ({lo}) is greater than hi ({hi})"));
    }
    if hi > MAX_HI {
        return Err(format!("hi ({hi}) is above the supported maximum {MAX_HI}"));
    }
    Ok(count_primes_in(lo, hi))
}

/// The number of primes p with lo <= p < hi.
pub fn count_primes_in(lo: u64, hi: u64) -> u64 {
    let lo = lo.max(2);
    if hi <= lo {
        return 0;
    }
    let base = small_primes(isqrt(hi - 1));
    let mut count = 0;
    let mut composite = vec![false; SEGMENT];
    let mut start = lo;
    while start < hi {
        let end = (start + SEGMENT as u64).min(hi);
        let segment = &mut composite[..(end - start) as usize];
        segment.fill(false);
        for &p in &base {
            let square = p * p;
            if square >= end {
                break;
            }
            // Offsets within the segment, in usize: wasm32 then indexes
            // with no 64-bit arithmetic in the loop.
            let mut offset = (square.max(start.div_ceil(p) * p) - start) as usize;
            let step = p as usize;
            while offset < segment.len() {
                segment[offset] = true;
                offset += step;
            }
        }
        count += segment.iter().filter(|&&c| !c).count() as u64;
        start = end;
    }
    count
}

fn small_primes(limit: u64) -> Vec<u64> {
    let limit = limit as usize;
    let mut composite = vec![false; limit + 1];
    let mut primes = Vec::new();
    for n in 2..=limit {
        if !composite[n] {
            primes.push(n as u64);
            let mut multiple = n * n;
            while multiple <= limit {
                composite[multiple] = true;
                multiple += n;
            }
        }
    }
    primes
}

fn isqrt(n: u64) -> u64 {
    let mut root = (n as f64).sqrt() as u64;
    while root * root > n {
        root -= 1;
    }
    while (root + 1) * (root + 1) <= n {
        root += 1;
    }
    root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_known_prime_counts() {
        assert_eq!(count_primes_in(0, 10), 4);
        assert_eq!(count_primes_in(0, 100), 25);
        assert_eq!(count_primes_in(0, 1_000_000), 78_498);
        assert_eq!(count_primes_in(10, 20), 4);
        assert_eq!(count_primes_in(999_900, 1_000_000), 8);
    }

    #[test]
    fn split_ranges_add_up() {
        let whole = count_primes_in(0, 200_000);
        let parts: u64 = (0..20)
            .map(|i| count_primes_in(i * 10_000, (i + 1) * 10_000))
            .sum();
        assert_eq!(whole, parts);
    }

    #[test]
    fn task_entry_decodes_and_rejects() {
        assert_eq!(task_entry("[0, 100]").unwrap(), "25");
        assert!(task_entry("[5, 1]").is_err());
    }
}
