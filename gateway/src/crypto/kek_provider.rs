//! Where the key-encryption key lives. The key store only ever asks a [`KekProvider`] to wrap
//! or unwrap a data key, and records the provider's key id beside each wrapped key, so a KEK
//! held in a file, in an HSM or in a cloud KMS are interchangeable and a key store wrapped by
//! two KEKs at once (a rotation in progress, a restored backup) says so explicitly.

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::envelope::{Kek, KEY_LEN};
use crate::error::{Error, Result};

/// A key-encryption key that never has to leave its keeper: it wraps and unwraps data keys.
/// `patient_id` is bound to each wrapped key as associated data, so a wrapped key copied to
/// another patient's row does not unwrap.
pub trait KekProvider: Send + Sync {
    /// A stable, non-secret name of this KEK (`file:…`, `pkcs11:…`), stored with every key
    /// it wraps.
    fn key_id(&self) -> &str;

    /// Wraps a raw data key.
    fn wrap(&self, patient_id: &str, data_key: &[u8]) -> Result<Vec<u8>>;

    /// Unwraps a data key this KEK wrapped; fails on any other KEK's or a tampered one.
    fn unwrap(&self, patient_id: &str, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>>;
}

/// The default provider: a 32-byte AES-256-GCM KEK read from a 0600 file.
pub struct FileKek {
    kek: Kek,
    key_id: String,
}

impl FileKek {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Ok(FileKek {
            kek: Kek::from_bytes(bytes)?,
            key_id: file_key_id(bytes),
        })
    }
}

/// `file:` and 16 hex digits of a domain-separated SHA-256 of the key: tells KEKs apart in
/// the key store, escrow headers and audit events without revealing anything about the key.
pub fn file_key_id(key: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"phr-gateway/kek-id/v1\n")
        .chain_update(key)
        .finalize();
    format!("file:{}", hex::encode(&digest[..8]))
}

impl KekProvider for FileKek {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn wrap(&self, patient_id: &str, data_key: &[u8]) -> Result<Vec<u8>> {
        self.kek.wrap_raw(patient_id, data_key)
    }

    fn unwrap(&self, patient_id: &str, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        self.kek.unwrap_raw(patient_id, wrapped)
    }
}

/// A bare `Kek` (tests, tools) is a provider too; its id is that of the same key in a file
/// only when built through [`FileKek`], so prefer that.
impl KekProvider for Kek {
    fn key_id(&self) -> &str {
        "unnamed"
    }

    fn wrap(&self, patient_id: &str, data_key: &[u8]) -> Result<Vec<u8>> {
        self.wrap_raw(patient_id, data_key)
    }

    fn unwrap(&self, patient_id: &str, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        self.unwrap_raw(patient_id, wrapped)
    }
}

/// A fresh random data key, wrapped by `kek`.
pub fn new_data_key(kek: &dyn KekProvider, patient_id: &str) -> Result<Vec<u8>> {
    let mut raw = Zeroizing::new([0u8; KEY_LEN]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, raw.as_mut());
    kek.wrap(patient_id, raw.as_ref())
}

/// Re-wraps a data key from `from` to `to` (rotation; the data key itself stays the same).
pub fn rewrap(
    from: &dyn KekProvider,
    to: &dyn KekProvider,
    patient_id: &str,
    wrapped: &[u8],
) -> Result<Vec<u8>> {
    let raw = from.unwrap(patient_id, wrapped)?;
    if raw.len() != KEY_LEN {
        return Err(Error::Crypto("an unwrapped data key is not 32 bytes"));
    }
    to.wrap(patient_id, &raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_key_ids_are_stable_distinct_and_reveal_no_key_bytes() {
        let a = FileKek::from_bytes(&[1u8; 32]).unwrap();
        let again = FileKek::from_bytes(&[1u8; 32]).unwrap();
        let b = FileKek::from_bytes(&[2u8; 32]).unwrap();
        assert_eq!(a.key_id(), again.key_id());
        assert_ne!(a.key_id(), b.key_id());
        assert!(a.key_id().starts_with("file:") && a.key_id().len() == 5 + 16);
        assert!(!a.key_id().contains(&hex::encode([1u8; 8])));
    }

    #[test]
    fn rewrap_moves_a_key_between_providers_unchanged() {
        let (a, b) = (
            FileKek::from_bytes(&[1u8; 32]).unwrap(),
            FileKek::from_bytes(&[2u8; 32]).unwrap(),
        );
        let wrapped = new_data_key(&a, "p").unwrap();
        let moved = rewrap(&a, &b, "p", &wrapped).unwrap();
        assert_eq!(
            *a.unwrap("p", &wrapped).unwrap(),
            *b.unwrap("p", &moved).unwrap()
        );
        assert!(a.unwrap("p", &moved).is_err());
        assert!(b.unwrap("q", &moved).is_err(), "bound to its patient");
    }
}
