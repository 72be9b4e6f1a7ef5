//! The audit signing keys over time. A rotation retires the signing key at a tree size: every
//! checkpoint up to that size is signed by the old key, every later one by the new key, and
//! the leaf announcing the new key (a key transition record) lies inside the last checkpoint
//! the old key signed, so the old key vouches for its successor in the log itself.
//!
//! The retired keys' public halves are kept in `<audit signing key file>.history`, one line
//! per retired key, oldest first:
//!
//! ```text
//! <last tree size it signed> <tree index of the transition leaf> <verifier key>
//! ```
//!
//! The file holds public keys only; losing it means old checkpoints cannot be checked until
//! the verifier keys kept off-site are put back.

use std::path::{Path, PathBuf};

use super::checkpoint::{NoteError, NoteVerifier};
use crate::error::{Error, Result};

/// A signing key that was retired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetiredKey {
    pub verifier: NoteVerifier,
    /// The largest checkpoint size it signed.
    pub last_size: u64,
    /// The leaf naming its successor.
    pub transition_leaf: u64,
}

/// Every verifier key the log was ever signed with, and which tree sizes each signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierRing {
    retired: Vec<RetiredKey>,
    current: NoteVerifier,
}

impl From<NoteVerifier> for VerifierRing {
    fn from(current: NoteVerifier) -> Self {
        VerifierRing {
            retired: Vec::new(),
            current,
        }
    }
}

impl From<&NoteVerifier> for VerifierRing {
    fn from(current: &NoteVerifier) -> Self {
        current.clone().into()
    }
}

impl From<&VerifierRing> for VerifierRing {
    fn from(ring: &VerifierRing) -> Self {
        ring.clone()
    }
}

/// The history file beside the signing key.
pub fn history_path(signing_key_path: &Path) -> PathBuf {
    let mut name = signing_key_path.as_os_str().to_os_string();
    name.push(".history");
    PathBuf::from(name)
}

impl VerifierRing {
    pub fn new(retired: Vec<RetiredKey>, current: NoteVerifier) -> Self {
        VerifierRing { retired, current }
    }

    /// Reads the history file (absent: no rotation yet) and adds the current key.
    pub fn load(history: &Path, current: NoteVerifier) -> Result<Self> {
        let text = match std::fs::read_to_string(history) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(history, e)),
        };
        Ok(VerifierRing {
            retired: parse_history(&text).map_err(|reason| Error::KeyFile {
                path: history.into(),
                reason,
            })?,
            current,
        })
    }

    pub fn current(&self) -> &NoteVerifier {
        &self.current
    }

    pub fn retired(&self) -> &[RetiredKey] {
        &self.retired
    }

    /// The key that must have signed the checkpoint of `size`.
    pub fn for_size(&self, size: u64) -> &NoteVerifier {
        self.retired
            .iter()
            .find(|k| size <= k.last_size)
            .map_or(&self.current, |k| &k.verifier)
    }

    /// The next key after retired key `i` (the one its transition leaf must name).
    pub fn successor(&self, i: usize) -> &NoteVerifier {
        self.retired
            .get(i + 1)
            .map_or(&self.current, |k| &k.verifier)
    }

    /// Verifies a note signed by any key of the ring (a trusted checkpoint, an escrow
    /// header, a manifest), newest key first.
    pub fn verify_any(&self, note: &str) -> Result<String, NoteError> {
        let mut first_error = None;
        for verifier in
            std::iter::once(&self.current).chain(self.retired.iter().rev().map(|k| &k.verifier))
        {
            match verifier.verify(note) {
                Ok(text) => return Ok(text),
                Err(e @ NoteError::BadSignature(_)) => return Err(e),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(NoteError::MalformedNote("no verifier key")))
    }

    /// The history file's text.
    pub fn history_text(&self) -> String {
        self.retired
            .iter()
            .map(|k| {
                format!(
                    "{} {} {}\n",
                    k.last_size,
                    k.transition_leaf,
                    k.verifier.verifier_key()
                )
            })
            .collect()
    }
}

fn parse_history(text: &str) -> std::result::Result<Vec<RetiredKey>, String> {
    let mut retired: Vec<RetiredKey> = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |why: &str| format!("line {}: {why}", n + 1);
        let mut parts = line.split_whitespace();
        let (Some(size), Some(leaf), Some(vkey), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad(
                "expected `<last size> <transition leaf> <verifier key>`",
            ));
        };
        let last_size: u64 = size.parse().map_err(|_| bad("size is not a number"))?;
        let transition_leaf: u64 = leaf.parse().map_err(|_| bad("leaf is not a number"))?;
        if transition_leaf >= last_size {
            return Err(bad(
                "the transition leaf must lie inside the last signed size",
            ));
        }
        if retired.last().is_some_and(|k| k.last_size >= last_size) {
            return Err(bad("sizes must increase"));
        }
        let verifier = NoteVerifier::from_verifier_key(vkey).map_err(|e| bad(&e.to_string()))?;
        retired.push(RetiredKey {
            verifier,
            last_size,
            transition_leaf,
        });
    }
    Ok(retired)
}

/// The detail text of a key transition leaf; `audit verify` looks for the new key in it.
pub fn transition_detail(old: &NoteVerifier, new: &NoteVerifier) -> String {
    format!(
        "audit signing key transition: checkpoints after this one are signed by {} (retiring {})",
        new.verifier_key(),
        old.verifier_key()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::NoteSigner;
    use ed25519_dalek::SigningKey;

    fn signer(seed: u8) -> NoteSigner {
        NoteSigner::new("log.example/audit", SigningKey::from_bytes(&[seed; 32])).unwrap()
    }

    #[test]
    fn each_size_has_exactly_one_key_and_history_round_trips() {
        let (a, b, c) = (signer(1), signer(2), signer(3));
        let ring = VerifierRing::new(
            vec![
                RetiredKey {
                    verifier: a.verifier(),
                    last_size: 10,
                    transition_leaf: 9,
                },
                RetiredKey {
                    verifier: b.verifier(),
                    last_size: 20,
                    transition_leaf: 18,
                },
            ],
            c.verifier(),
        );
        for (size, key) in [(0, &a), (10, &a), (11, &b), (20, &b), (21, &c), (999, &c)] {
            assert_eq!(ring.for_size(size), &key.verifier(), "size {size}");
        }
        assert_eq!(ring.successor(0), &b.verifier());
        assert_eq!(ring.successor(1), &c.verifier());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h");
        std::fs::write(&path, ring.history_text()).unwrap();
        assert_eq!(VerifierRing::load(&path, c.verifier()).unwrap(), ring);
        let note = a.sign("hello\n");
        assert_eq!(ring.verify_any(&note).unwrap(), "hello\n");
        assert!(VerifierRing::from(c.verifier()).verify_any(&note).is_err());
    }

    #[test]
    fn malformed_histories_are_refused() {
        let v = signer(1).verifier().verifier_key();
        for bad in [
            format!("10 {v}\n"),
            format!("x 1 {v}\n"),
            format!("10 10 {v}\n"),
            format!("10 1 {v}\n5 1 {v}\n"),
            "10 1 not-a-key\n".to_string(),
        ] {
            assert!(parse_history(&bad).is_err(), "{bad}");
        }
    }
}
