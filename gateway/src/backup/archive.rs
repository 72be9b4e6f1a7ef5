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

pub(super) fn encrypt(
    plain: &Path,
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
    let mut input = std::fs::File::open(plain).map_err(|e| Error::io(plain, e))?;
    std::io::copy(&mut input, &mut writer).map_err(|e| Error::io(archive, e))?;
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
    let input = std::fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let decryptor = match age::Decryptor::new(std::io::BufReader::new(input)) {
        Ok(d) => d,
        Err(_) => return Ok(false),
    };
    let mut reader = match decryptor.decrypt(std::iter::once(identity as &dyn age::Identity)) {
        Ok(reader) => reader,
        Err(_) => return Ok(false),
    };
    let mut output = std::fs::File::create(restored).map_err(|e| Error::io(restored, e))?;
    if std::io::copy(&mut reader, &mut output).is_err() {
        return Ok(false);
    }
    output.sync_all().map_err(|e| Error::io(restored, e))?;
    Ok(true)
}
