//! The sealed archive of a generation: age encryption to the offline recipient, decryption
//! with its identity, and the SHA-256 the manifest signs.

use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub(super) fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(|e| Error::io(path, e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        total += read as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// Creates an empty file only its owner can read (for a transient plaintext copy).
pub(super) fn create_private(path: &Path) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map_err(|e| Error::io(path, e))?;
    Ok(())
}

pub(super) fn encrypt(
    plain: &Path,
    archive: &Path,
    recipient: &age::x25519::Recipient,
) -> Result<()> {
    let mut input = std::fs::File::open(plain).map_err(|e| Error::io(plain, e))?;
    encrypt_from(&mut input, archive, recipient)
}

/// Encrypts everything `input` yields into `archive` (a stream: a dump piped from
/// `pg_dump` never touches the disk in the clear). An error reading `input` is reported
/// against `archive`.
pub(super) fn encrypt_from(
    input: &mut dyn Read,
    archive: &Path,
    recipient: &age::x25519::Recipient,
) -> Result<()> {
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient))
            .map_err(|_| Error::Crypto("cannot encrypt the backup"))?;
    let output = std::fs::File::create(archive).map_err(|e| Error::io(archive, e))?;
    let mut writer = encryptor
        .wrap_output(std::io::BufWriter::new(output))
        .map_err(|e| Error::io(archive, e))?;
    std::io::copy(input, &mut writer).map_err(|e| Error::io(archive, e))?;
    let mut inner = writer.finish().map_err(|e| Error::io(archive, e))?;
    inner.flush().map_err(|e| Error::io(archive, e))?;
    inner
        .into_inner()
        .map_err(|e| Error::io(archive, e.into_error()))?
        .sync_all()
        .map_err(|e| Error::io(archive, e))
}

/// `false` when the identity is not a recipient of the archive.
pub(super) fn decrypt(
    archive: &Path,
    restored: &Path,
    identity: &age::x25519::Identity,
) -> Result<bool> {
    let mut output = std::fs::File::create(restored).map_err(|e| Error::io(restored, e))?;
    let decrypted = decrypt_into(archive, &mut output, identity)?;
    if decrypted == Decrypted::All {
        output.sync_all().map_err(|e| Error::io(restored, e))?;
    }
    Ok(decrypted == Decrypted::All)
}

/// How far a decryption got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decrypted {
    /// The identity is not a recipient, or the stream did not authenticate.
    WrongKey,
    /// The writer refused more (e.g. `pg_restore` stopped): not the archive's fault.
    WriterClosed,
    All,
}

/// Decrypts `archive` into `output`, telling apart a key or archive that does not decrypt
/// from a writer that gave up.
pub(super) fn decrypt_into(
    archive: &Path,
    output: &mut dyn Write,
    identity: &age::x25519::Identity,
) -> Result<Decrypted> {
    let input = std::fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let decryptor = match age::Decryptor::new(std::io::BufReader::new(input)) {
        Ok(d) => d,
        Err(_) => return Ok(Decrypted::WrongKey),
    };
    let mut reader = match decryptor.decrypt(std::iter::once(identity as &dyn age::Identity)) {
        Ok(reader) => reader,
        Err(_) => return Ok(Decrypted::WrongKey),
    };
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(_) => return Ok(Decrypted::WrongKey),
        };
        if output.write_all(&buffer[..read]).is_err() {
            return Ok(Decrypted::WriterClosed);
        }
    }
    if output.flush().is_err() {
        return Ok(Decrypted::WriterClosed);
    }
    Ok(Decrypted::All)
}
