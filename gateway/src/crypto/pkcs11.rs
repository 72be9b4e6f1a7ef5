//! The KEK on a PKCS#11 token (an HSM, or SoftHSM2 for tests and small sites): an AES-256
//! key generated on the token as sensitive and non-extractable, used for AES-GCM there. The
//! data keys travel to the token to be wrapped or unwrapped; the KEK never leaves it, so it
//! cannot be escrowed as a file (use the token's own backup or a second token).
//!
//! Wrapped form: `0x02 || iv(12) || ciphertext+tag`, with the same associated data as the
//! file KEK (the patient), so a wrapped key moved to another row does not unwrap.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use rand::RngCore;
use zeroize::Zeroizing;

use super::kek_provider::KekProvider;
use crate::config::Pkcs11Config;
use crate::error::{Error, Result};

const FORMAT_PKCS11_GCM: u8 = 0x02;
const IV_LEN: usize = 12;

/// One initialised context per module and process: PKCS#11 allows `C_Initialize` once.
fn context(module: &Path) -> Result<Pkcs11> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut contexts = CONTEXTS
        .get_or_init(Mutex::default)
        .lock()
        .map_err(|_| Error::Crypto("PKCS#11 context lock poisoned"))?;
    if let Some(ctx) = contexts.get(module) {
        return Ok(ctx.clone());
    }
    let fail = |what: &str, e: cryptoki::error::Error| {
        Error::config(
            "keys.pkcs11.module",
            format!("{}: {what}: {e}", module.display()),
        )
    };
    let ctx = Pkcs11::new(module).map_err(|e| fail("cannot load the module", e))?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| fail("C_Initialize failed", e))?;
    contexts.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// A KEK held on a PKCS#11 token.
pub struct Pkcs11Kek {
    session: Mutex<Session>,
    key: ObjectHandle,
    key_id: String,
}

/// What [`Pkcs11Kek::open`] found or made.
pub struct Opened {
    pub kek: Pkcs11Kek,
    /// The key was generated on the token now (audited as a key generation).
    pub created: bool,
}

impl Pkcs11Kek {
    /// Logs in to the token labelled `token_label` and finds the AES key labelled
    /// `key_label`, generating it there (non-extractable) on first use.
    pub fn open(config: &Pkcs11Config) -> Result<Opened> {
        let ctx = context(&config.module)?;
        let token_error =
            |e: cryptoki::error::Error| Error::config("keys.pkcs11.token_label", e.to_string());
        let slot = ctx
            .get_slots_with_token()
            .map_err(token_error)?
            .into_iter()
            .find(|slot| {
                ctx.get_token_info(*slot)
                    .is_ok_and(|info| info.label().trim_end() == config.token_label)
            })
            .ok_or_else(|| {
                Error::config(
                    "keys.pkcs11.token_label",
                    format!(
                        "no token labelled {:?} in {}",
                        config.token_label,
                        config.module.display()
                    ),
                )
            })?;
        let pin = super::key_file::check_private(&config.pin_file)
            .and_then(|_| {
                std::fs::read_to_string(&config.pin_file)
                    .map_err(|e| Error::io(&config.pin_file, e))
            })
            .map(|text| AuthPin::new(text.trim().to_string().into()))?;
        let session = ctx.open_rw_session(slot).map_err(token_error)?;
        match session.login(UserType::User, Some(&pin)) {
            // PKCS#11 logins are per application: another session of this process (a second
            // gateway in one process, a CLI command's) already logged the user in.
            Ok(())
            | Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(e) => {
                return Err(Error::config(
                    "keys.pkcs11.pin_file",
                    format!("login to token {:?} refused: {e}", config.token_label),
                ))
            }
        }
        let label = config.key_label.as_bytes().to_vec();
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.clone()),
            ])
            .map_err(token_error)?;
        let (key, created) = match found.as_slice() {
            [key] => (*key, false),
            [] => {
                let mut id = [0u8; 8];
                rand::rngs::OsRng.fill_bytes(&mut id);
                let key = session
                    .generate_key(
                        &Mechanism::AesKeyGen,
                        &[
                            Attribute::Token(true),
                            Attribute::Private(true),
                            Attribute::Sensitive(true),
                            Attribute::Extractable(false),
                            Attribute::Encrypt(true),
                            Attribute::Decrypt(true),
                            Attribute::KeyType(KeyType::AES),
                            Attribute::ValueLen(32.into()),
                            Attribute::Label(label),
                            Attribute::Id(id.to_vec()),
                        ],
                    )
                    .map_err(|e| {
                        Error::config(
                            "keys.pkcs11",
                            format!("cannot generate the KEK on the token: {e}"),
                        )
                    })?;
                (key, true)
            }
            _ => {
                return Err(Error::config(
                    "keys.pkcs11.key_label",
                    format!(
                        "several keys on the token are labelled {:?}",
                        config.key_label
                    ),
                ))
            }
        };
        let id = session
            .get_attributes(key, &[AttributeType::Id])
            .ok()
            .and_then(|attrs| {
                attrs.into_iter().find_map(|a| match a {
                    Attribute::Id(id) => Some(hex::encode(id)),
                    _ => None,
                })
            })
            .unwrap_or_default();
        let kek = Pkcs11Kek {
            session: Mutex::new(session),
            key,
            key_id: format!("pkcs11:{}/{}/{id}", config.token_label, config.key_label),
        };
        if kek.extractable()? {
            return Err(Error::config(
                "keys.pkcs11.key_label",
                "the key on the token is extractable or not sensitive; a KEK must never leave the token",
            ));
        }
        Ok(Opened { kek, created })
    }

    /// Whether the token would let the key out (it must not).
    pub fn extractable(&self) -> Result<bool> {
        let session = self.session()?;
        let attrs = session
            .get_attributes(
                self.key,
                &[AttributeType::Extractable, AttributeType::Sensitive],
            )
            .map_err(|_| Error::Crypto("cannot read the KEK's attributes on the token"))?;
        let mut extractable = true;
        let mut sensitive = false;
        for attr in attrs {
            match attr {
                Attribute::Extractable(v) => extractable = v,
                Attribute::Sensitive(v) => sensitive = v,
                _ => {}
            }
        }
        Ok(extractable || !sensitive)
    }

    fn session(&self) -> Result<std::sync::MutexGuard<'_, Session>> {
        self.session
            .lock()
            .map_err(|_| Error::Crypto("PKCS#11 session lock poisoned"))
    }
}

impl KekProvider for Pkcs11Kek {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn wrap(&self, patient_id: &str, data_key: &[u8]) -> Result<Vec<u8>> {
        let mut iv = [0u8; IV_LEN];
        rand::rngs::OsRng.fill_bytes(&mut iv);
        let nonce = iv;
        let aad = super::envelope::wrap_aad(patient_id);
        let params = GcmParams::new(&mut iv, aad.as_bytes(), 128.into())
            .map_err(|_| Error::Crypto("AES-GCM parameters"))?;
        let sealed = self
            .session()?
            .encrypt(&Mechanism::AesGcm(params), self.key, data_key)
            .map_err(|_| Error::Crypto("the PKCS#11 token could not wrap the data key"))?;
        let mut out = Vec::with_capacity(1 + IV_LEN + sealed.len());
        out.push(FORMAT_PKCS11_GCM);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap(&self, patient_id: &str, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let (format, rest) = wrapped
            .split_first()
            .ok_or(Error::Crypto("empty wrapped key"))?;
        if *format != FORMAT_PKCS11_GCM || rest.len() < IV_LEN + 16 {
            return Err(Error::Crypto("not a key wrapped by a PKCS#11 KEK"));
        }
        let (nonce, sealed) = rest.split_at(IV_LEN);
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(nonce);
        let aad = super::envelope::wrap_aad(patient_id);
        let params = GcmParams::new(&mut iv, aad.as_bytes(), 128.into())
            .map_err(|_| Error::Crypto("AES-GCM parameters"))?;
        self.session()?
            .decrypt(&Mechanism::AesGcm(params), self.key, sealed)
            .map(Zeroizing::new)
            .map_err(|_| Error::Crypto("decryption failed: wrong key, wrong row or tampered data"))
    }
}
