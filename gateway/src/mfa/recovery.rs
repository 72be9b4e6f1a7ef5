//! Single-use recovery codes: ten random codes shown once at enrolment; only their hashes
//! are kept. A code is 80 random bits, so a plain SHA-256 is enough (no dictionary to try).

use rand::RngCore;
use sha2::{Digest, Sha256};

pub const CODES_PER_SET: usize = 10;
/// Crockford-style alphabet: no I, L, O or U to misread.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A fresh set of codes, formatted `XXXX-XXXX-XXXX-XXXX` for reading aloud or writing down.
pub fn new_codes() -> Vec<String> {
    (0..CODES_PER_SET).map(|_| new_code()).collect()
}

fn new_code() -> String {
    let mut bytes = [0u8; 10];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let mut bits: u128 = 0;
    for b in bytes {
        bits = (bits << 8) | u128::from(b);
    }
    let chars: Vec<u8> = (0..16)
        .map(|i| ALPHABET[((bits >> (5 * (15 - i))) & 31) as usize])
        .collect();
    chars
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("-")
}

/// The stored form: SHA-256 of the code with separators and case ignored.
pub fn hash(code: &str) -> Vec<u8> {
    let normalised: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    Sha256::digest(normalised.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_well_formed_and_hash_leniently() {
        let codes = new_codes();
        assert_eq!(codes.len(), CODES_PER_SET);
        let unique: std::collections::HashSet<_> = codes.iter().collect();
        assert_eq!(unique.len(), CODES_PER_SET);
        for code in &codes {
            assert_eq!(code.len(), 19, "{code}");
            assert!(code
                .chars()
                .all(|c| c == '-' || ALPHABET.contains(&(c as u8))));
            assert_eq!(hash(code), hash(&code.to_lowercase().replace('-', " ")));
        }
        assert_ne!(hash(&codes[0]), hash(&codes[1]));
    }
}
