//! Proof-of-work search: the nonces n in `[start, end)` for which
//! sha256(prefix ‖ decimal(n)) starts with at least `zero_bits` zero bits.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmgrid_guest::task;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Found {
    pub nonce: u64,
    /// The hash, as lowercase hex.
    pub hash: String,
}

#[task]
fn find_nonces(prefix: String, start: u64, end: u64, zero_bits: u32) -> Result<Vec<Found>, String> {
    if zero_bits > 256 {
        return Err(format!(
            "zero_bits is {zero_bits}, but a sha256 has only 256 bits"
        ));
    }
    if start > end {
        return Err(format!(
            "empty range: start ({start}) is greater than end ({end})"
        ));
    }
    Ok(search(prefix.as_bytes(), start, end, zero_bits))
}

pub fn search(prefix: &[u8], start: u64, end: u64, zero_bits: u32) -> Vec<Found> {
    let mut prefixed = Sha256::new();
    prefixed.update(prefix);
    let mut digits = itoa_buffer();
    (start..end)
        .filter_map(|nonce| {
            let mut hasher = prefixed.clone();
            hasher.update(decimal(nonce, &mut digits));
            let hash: [u8; 32] = hasher.finalize().into();
            (leading_zero_bits(&hash) >= zero_bits).then(|| Found {
                nonce,
                hash: to_hex(&hash),
            })
        })
        .collect()
}

pub fn leading_zero_bits(hash: &[u8]) -> u32 {
    let mut bits = 0;
    for &byte in hash {
        if byte == 0 {
            bits += 8;
        } else {
            return bits + byte.leading_zeros();
        }
    }
    bits
}

fn itoa_buffer() -> [u8; 20] {
    [0; 20]
}

fn decimal(mut n: u64, buffer: &mut [u8; 20]) -> &[u8] {
    let mut i = buffer.len();
    loop {
        i -= 1;
        buffer[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buffer[i..];
        }
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_leading_zero_bits() {
        assert_eq!(leading_zero_bits(&[0, 0, 0x0f, 0xff]), 20);
        assert_eq!(leading_zero_bits(&[0x80]), 0);
        assert_eq!(leading_zero_bits(&[0; 32]), 256);
    }

    #[test]
    fn found_hashes_really_have_the_zero_bits() {
        let found = search(b"wasmgrid", 0, 5000, 8);
        assert!(!found.is_empty());
        for f in &found {
            let hash = Sha256::digest(format!("wasmgrid{}", f.nonce));
            assert_eq!(to_hex(&hash), f.hash);
            assert!(leading_zero_bits(&hash) >= 8);
        }
    }

    #[test]
    fn decimal_writes_digits() {
        let mut buffer = itoa_buffer();
        assert_eq!(decimal(0, &mut buffer), b"0");
        assert_eq!(decimal(u64::MAX, &mut buffer), b"18446744073709551615");
    }
}
