//! AES-256-GCM envelope encryption. Every sealed value is `0x01 || nonce(12) || ciphertext+tag`
//! and is bound by its associated data to where it belongs (patient, resource, version), so a
//! ciphertext copied to another row does not decrypt.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

const FORMAT_V1: u8 = 0x01;
const NONCE_LEN: usize = 12;
pub const KEY_LEN: usize = 32;

/// The key-encryption key: wraps the data keys, never touches PHI directly.
pub struct Kek {
    cipher: Aes256Gcm,
}

/// One patient's data key. Random nonces are safe here: a key seals far fewer than 2^32 values.
#[derive(Clone)]
pub struct DataKey {
    cipher: Aes256Gcm,
}

impl Kek {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != KEY_LEN {
            return Err(Error::Crypto("key-encryption key must be 32 bytes"));
        }
        let cipher =
            Aes256Gcm::new_from_slice(bytes).map_err(|_| Error::Crypto("invalid key length"))?;
        Ok(Kek { cipher })
    }

    /// Makes a fresh data key and returns it with its wrapped form for the key store.
    pub fn new_data_key(&self, patient_id: &str) -> Result<(DataKey, Vec<u8>)> {
        let mut raw = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(raw.as_mut());
        let wrapped = seal(&self.cipher, wrap_aad(patient_id).as_bytes(), raw.as_ref())?;
        Ok((DataKey::from_bytes(raw.as_ref())?, wrapped))
    }

    /// A data key wrapped by this KEK, re-wrapped under `to` (KEK rotation; the data key
    /// itself, and so every value sealed with it, stays the same).
    pub fn rewrap(&self, patient_id: &str, wrapped: &[u8], to: &Kek) -> Result<Vec<u8>> {
        let aad = wrap_aad(patient_id);
        let raw = Zeroizing::new(open(&self.cipher, aad.as_bytes(), wrapped)?);
        seal(&to.cipher, aad.as_bytes(), &raw)
    }

    /// Whether this KEK wraps the given data key (AES-GCM authenticates it).
    pub fn wraps(&self, patient_id: &str, wrapped: &[u8]) -> bool {
        open(&self.cipher, wrap_aad(patient_id).as_bytes(), wrapped).is_ok()
    }

    /// Wraps raw data-key bytes (the [`super::KekProvider`] interface).
    pub fn wrap_raw(&self, patient_id: &str, raw: &[u8]) -> Result<Vec<u8>> {
        seal(&self.cipher, wrap_aad(patient_id).as_bytes(), raw)
    }

    /// Unwraps raw data-key bytes (the [`super::KekProvider`] interface).
    pub fn unwrap_raw(&self, patient_id: &str, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        Ok(Zeroizing::new(open(
            &self.cipher,
            wrap_aad(patient_id).as_bytes(),
            wrapped,
        )?))
    }

    pub fn unwrap_data_key(&self, patient_id: &str, wrapped: &[u8]) -> Result<DataKey> {
        let raw = Zeroizing::new(open(
            &self.cipher,
            wrap_aad(patient_id).as_bytes(),
            wrapped,
        )?);
        DataKey::from_bytes(&raw)
    }
}

impl DataKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let cipher =
            Aes256Gcm::new_from_slice(bytes).map_err(|_| Error::Crypto("invalid key length"))?;
        Ok(DataKey { cipher })
    }

    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        seal(&self.cipher, aad, plaintext)
    }

    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        open(&self.cipher, aad, sealed)
    }
}

pub(crate) fn wrap_aad(patient_id: &str) -> String {
    format!("phr-gateway/data-key/v1/{patient_id}")
}

fn seal(cipher: &Aes256Gcm, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| Error::Crypto("encryption failed"))?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

fn open(cipher: &Aes256Gcm, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
    let (version, rest) = sealed
        .split_first()
        .ok_or(Error::Crypto("empty ciphertext"))?;
    if *version != FORMAT_V1 || rest.len() < NONCE_LEN + 16 {
        return Err(Error::Crypto("unknown or truncated ciphertext format"));
    }
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| Error::Crypto("decryption failed: wrong key, wrong row or tampered data"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kek() -> Kek {
        Kek::from_bytes(&[7u8; 32]).unwrap()
    }

    #[test]
    fn wrapped_key_is_bound_to_its_patient() {
        let kek = kek();
        let (key, wrapped) = kek.new_data_key("p1").unwrap();
        let sealed = key.seal(b"r1", b"hello").unwrap();
        let again = kek.unwrap_data_key("p1", &wrapped).unwrap();
        assert_eq!(again.open(b"r1", &sealed).unwrap(), b"hello");
        assert!(kek.unwrap_data_key("p2", &wrapped).is_err());
        let other_kek = Kek::from_bytes(&[8u8; 32]).unwrap();
        assert!(other_kek.unwrap_data_key("p1", &wrapped).is_err());
    }

    #[test]
    fn wrong_length_kek_is_refused() {
        assert!(Kek::from_bytes(&[0u8; 16]).is_err());
    }

    proptest! {
        #[test]
        fn round_trips_and_detects_any_change(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            flip in any::<prop::sample::Index>(),
        ) {
            let (key, _) = kek().new_data_key("p").unwrap();
            let sealed = key.seal(b"aad", &body).unwrap();
            prop_assert_eq!(key.open(b"aad", &sealed).unwrap(), body);
            prop_assert!(key.open(b"other", &sealed).is_err());
            let mut tampered = sealed.clone();
            let i = flip.index(tampered.len());
            tampered[i] ^= 0x01;
            prop_assert!(key.open(b"aad", &tampered).is_err());
        }
    }
}
