//! Encryption at rest: per-patient data keys wrapped by a key-encryption key (envelope
//! encryption, AES-256-GCM from RustCrypto), and the key files generated at first start.

pub mod envelope;
pub mod escrow;
pub mod kek_provider;
pub mod kek_rotation;
pub mod key_file;
pub mod pkcs11;

pub use envelope::{DataKey, Kek};
pub use kek_provider::{FileKek, KekProvider};
