//! Rotating the key-encryption key: every data key is re-wrapped under a new KEK in one
//! key-store transaction; no PHI is re-encrypted. The steps are ordered so that a crash at
//! any point loses nothing and the rotation can simply be run again:
//!
//! 1. the new KEK is written to `<kek>.next` (0600, synced) — or, resuming, read from there;
//! 2. one transaction re-wraps each data key (a key already under the new KEK is left);
//! 3. the old KEK is renamed to `<kek>.retired-<unix seconds>` (kept for key-store backups
//!    made before the rotation, until their retention ends) and `<kek>.next` becomes `<kek>`.
//!
//! While `<kek>.next` exists the gateway refuses to start (see `check_no_interrupted`), so
//! it never generates a fresh KEK in the moment between the two renames.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::key_file;
use super::FileKek;
use crate::error::{Error, Result};

/// Where an interrupted or running rotation keeps the new KEK.
pub fn next_path(kek_path: &Path) -> PathBuf {
    with_suffix(kek_path, ".next")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Refuses to start while a rotation is unfinished.
pub fn check_no_interrupted(kek_path: &Path) -> Result<()> {
    let next = next_path(kek_path);
    if next.exists() {
        return Err(Error::KeyFile {
            path: next,
            reason: "a key-encryption key rotation was interrupted; run `phr-gateway keys rotate-kek` again to finish it".into(),
        });
    }
    Ok(())
}

/// The KEKs a rotation works with: the one in force (`old`) and the one replacing it.
pub struct RotationKeys {
    old: Zeroizing<Vec<u8>>,
    new: Zeroizing<Vec<u8>>,
    /// Where the old KEK was read from (the KEK file, or after a crash between the renames,
    /// the newest retired file).
    old_path: PathBuf,
}

/// Step 1: the new KEK (created, or read back when resuming) and the old one.
pub fn prepare(kek_path: &Path) -> Result<RotationKeys> {
    let next = next_path(kek_path);
    let new_bytes = if next.exists() {
        key_file::load(&next, super::envelope::KEY_LEN)?
    } else {
        let mut bytes = Zeroizing::new(vec![0u8; super::envelope::KEY_LEN]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        let mut encoded = Zeroizing::new(hex::encode(&*bytes));
        encoded.push('\n');
        key_file::write_private(&next, encoded.as_bytes())?;
        bytes
    };
    let old_path = if kek_path.exists() {
        kek_path.to_path_buf()
    } else {
        newest_retired(kek_path)?.ok_or_else(|| Error::KeyFile {
            path: kek_path.into(),
            reason: "no key-encryption key to rotate from".into(),
        })?
    };
    let old_bytes = key_file::load(&old_path, super::envelope::KEY_LEN)?;
    Ok(RotationKeys {
        old: old_bytes,
        new: new_bytes,
        old_path,
    })
}

impl RotationKeys {
    pub fn old(&self) -> Result<FileKek> {
        FileKek::from_bytes(&self.old)
    }

    pub fn new_kek(&self) -> Result<FileKek> {
        FileKek::from_bytes(&self.new)
    }
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub rewrapped: u64,
    /// Already under the new KEK (a resumed rotation).
    pub already: u64,
    /// Where the old KEK now is (keep it as long as key-store backups made before today).
    pub retired: PathBuf,
}

/// Rotates the KEK of the configured key store. Every gateway process using that key store
/// must be stopped first: a running one keeps the old KEK in memory.
pub async fn rotate(config: &crate::config::Config) -> Result<Rotated> {
    super::escrow::refuse_token_kek(config)?;
    let kek_path = config.kek_path();
    let keys = prepare(&kek_path)?;
    let store =
        crate::keystore::KeyStore::open(config, &config.database_url(), keys.old()?).await?;
    let (rewrapped, already) = store.rewrap_all(&keys.old()?, &keys.new_kek()?).await?;
    store.close().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let retired = install(&kek_path, &keys, now)?;
    Ok(Rotated {
        rewrapped,
        already,
        retired,
    })
}

/// Step 3, after the key store committed: retire the old KEK and put the new one in place.
pub fn install(kek_path: &Path, keys: &RotationKeys, now_secs: u64) -> Result<PathBuf> {
    let retired = with_suffix(kek_path, &format!(".retired-{now_secs}"));
    if keys.old_path == kek_path {
        std::fs::rename(kek_path, &retired).map_err(|e| Error::io(kek_path, e))?;
    }
    let next = next_path(kek_path);
    std::fs::rename(&next, kek_path).map_err(|e| Error::io(&next, e))?;
    if let Some(dir) = kek_path.parent() {
        // The renames must survive a power cut before the rotation is reported done.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, e))?;
    }
    Ok(if keys.old_path == kek_path {
        retired
    } else {
        keys.old_path.clone()
    })
}

fn newest_retired(kek_path: &Path) -> Result<Option<PathBuf>> {
    let Some(dir) = kek_path.parent() else {
        return Ok(None);
    };
    let Some(stem) = kek_path.file_name().and_then(|n| n.to_str()) else {
        return Ok(None);
    };
    let prefix = format!("{stem}.retired-");
    let mut newest: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(stamp) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if newest.as_ref().is_none_or(|(best, _)| stamp > *best) {
            newest = Some((stamp, entry.path()));
        }
    }
    Ok(newest.map(|(_, path)| path))
}
