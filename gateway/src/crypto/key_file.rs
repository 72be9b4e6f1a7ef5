//! Secret key files: generated at first start with mode 0600 inside a 0700 directory, and
//! refused when anyone but the owner may read them.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rand::RngCore;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Reads a hex-encoded key of `len` bytes, creating it if absent. `created` tells the caller
/// so it can audit the key's generation.
pub fn load_or_generate(path: &Path, len: usize) -> Result<(Zeroizing<Vec<u8>>, bool)> {
    if path.exists() {
        return Ok((load(path, len)?, false));
    }
    let mut key = Zeroizing::new(vec![0u8; len]);
    rand::rngs::OsRng.fill_bytes(&mut key);
    let mut encoded = Zeroizing::new(hex::encode(&*key));
    encoded.push('\n');
    write_private(path, encoded.as_bytes())?;
    Ok((key, true))
}

/// Refuses a secret file that anyone but its owner may read.
pub fn check_private(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::KeyFile {
            path: path.into(),
            reason: format!(
                "permissions {mode:04o} let others read it; run `chmod 600 {}`",
                path.display()
            ),
        });
    }
    Ok(())
}

/// Writes a new secret file with mode 0600 (in a 0700 directory); never overwrites.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(dir, e))?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.write_all(contents)
        .and_then(|_| file.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Reads an existing key file, refusing loose permissions and malformed content.
pub fn load(path: &Path, len: usize) -> Result<Zeroizing<Vec<u8>>> {
    check_private(path)?;
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| Error::io(path, e))?);
    let key = Zeroizing::new(hex::decode(text.trim()).map_err(|_| Error::KeyFile {
        path: path.into(),
        reason: "not a hex-encoded key".into(),
    })?);
    if key.len() != len {
        return Err(Error::KeyFile {
            path: path.into(),
            reason: format!("expected {len} bytes, found {}", key.len()),
        });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_with_owner_only_mode_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/kek.key");
        let (first, created) = load_or_generate(&path, 32).unwrap();
        assert!(created);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let (second, created) = load_or_generate(&path, 32).unwrap();
        assert!(!created);
        assert_eq!(*first, *second);
    }

    #[test]
    fn refuses_loose_permissions_wrong_length_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        load_or_generate(&path, 32).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&path, 32).unwrap_err().to_string();
        assert!(err.contains("0644") && err.contains("chmod 600"), "{err}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&path, 16)
            .unwrap_err()
            .to_string()
            .contains("expected 16 bytes"));
        fs::write(&path, "zz-not-hex").unwrap();
        assert!(load(&path, 32).unwrap_err().to_string().contains("hex"));
    }
}
