//! Rotating the audit signing key (`phr-gateway keys rotate-audit`) without orphaning a
//! single old checkpoint:
//!
//! 1. the new seed is written to `<key>.next` (0600) — or, resuming, read from there;
//! 2. with the old key still in force, a key transition leaf naming the new verifier key is
//!    recorded and a checkpoint covering it is signed by the old key;
//! 3. the old verifier key, the size of that checkpoint and the leaf's index are appended
//!    to `<key>.history` (public keys only);
//! 4. `<key>.next` replaces `<key>`: the old private key is gone, its public key stays.
//!
//! A crash after 3 leaves a history naming the key still in the file; start-up refuses that
//! state and running the rotation again finishes step 4. Every gateway process writing to
//! this log must be stopped first: a running one would keep signing with the old key.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use sqlx::Row;
use zeroize::Zeroizing;

use super::checkpoint::{NoteSigner, NoteVerifier};
use super::keyring::{history_path, transition_detail, RetiredKey, VerifierRing};
use super::{Agent, AuditEvent, EventKind};
use crate::config::Config;
use crate::crypto::key_file;
use crate::error::{Error, Result};

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub retired: String,
    pub current: String,
    /// The last checkpoint size the old key signed.
    pub last_size: u64,
    pub transition_leaf: u64,
}

fn next_path(key_path: &Path) -> PathBuf {
    let mut name = key_path.as_os_str().to_os_string();
    name.push(".next");
    PathBuf::from(name)
}

fn verifier_of(origin: &str, seed: &[u8]) -> Result<NoteVerifier> {
    let seed: [u8; 32] = seed
        .try_into()
        .map_err(|_| Error::Crypto("audit signing key must be 32 bytes"))?;
    Ok(NoteSigner::new(origin, SigningKey::from_bytes(&seed))
        .map_err(|e| Error::Audit(e.to_string()))?
        .verifier())
}

/// Refuses to start when a rotation stopped between writing the history and installing the
/// new key (the history already retires the key in the file).
pub fn check_no_interrupted(config: &Config, current: &VerifierRing) -> Result<()> {
    if current
        .retired()
        .last()
        .is_some_and(|k| &k.verifier == current.current())
    {
        return Err(Error::KeyFile {
            path: config.audit_signing_key_path(),
            reason: "an audit signing key rotation was interrupted; run `phr-gateway keys rotate-audit` again to finish it".into(),
        });
    }
    Ok(())
}

pub async fn rotate(config: &Config) -> Result<Rotated> {
    let key_path = config.audit_signing_key_path();
    let next = next_path(&key_path);
    let history = history_path(&key_path);
    let origin = &config.audit.origin;
    let old_seed = key_file::load(&key_path, 32)?;
    let old = verifier_of(origin, &old_seed)?;
    let new_seed = if next.exists() {
        key_file::load(&next, 32)?
    } else {
        let mut seed = Zeroizing::new(vec![0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        let mut encoded = Zeroizing::new(hex::encode(&*seed));
        encoded.push('\n');
        key_file::write_private(&next, encoded.as_bytes())?;
        seed
    };
    let new = verifier_of(origin, &new_seed)?;
    let ring = VerifierRing::load(&history, old.clone())?;
    let retired = match ring.retired().last() {
        // Resuming after step 3.
        Some(last) if last.verifier == old => last.clone(),
        _ => {
            let retired = sign_transition(config, &old, &new).await?;
            let mut keys = ring.retired().to_vec();
            keys.push(retired.clone());
            write_history(
                &history,
                &VerifierRing::new(keys, new.clone()).history_text(),
            )?;
            retired
        }
    };
    std::fs::rename(&next, &key_path).map_err(|e| Error::io(&next, e))?;
    sync_parent(&key_path)?;
    Ok(Rotated {
        retired: old.verifier_key(),
        current: new.verifier_key(),
        last_size: retired.last_size,
        transition_leaf: retired.transition_leaf,
    })
}

/// Step 2: the transition leaf and a checkpoint over it, both under the old key.
async fn sign_transition(
    config: &Config,
    old: &NoteVerifier,
    new: &NoteVerifier,
) -> Result<RetiredKey> {
    let mut offline = config.clone();
    offline.insecure_http = true;
    offline.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let gateway = crate::app::Gateway::build(offline).await?;
    let audit = gateway.state.audit.clone();
    if audit.verifier() != *old {
        return Err(Error::Audit(
            "the gateway did not load the key being retired".into(),
        ));
    }
    let event = AuditEvent::new(EventKind::SecurityConfiguration, Agent::system())
        .detail(transition_detail(old, new));
    let mut tx = gateway.state.db.begin().await?;
    super::record(&mut tx, &event).await?;
    tx.commit().await?;
    let outcome = audit.sequence(true).await?;
    let leaf = sqlx::query("SELECT tree_index FROM audit_leaves WHERE leaf_hash = $1")
        .bind(super::merkle::leaf_hash(&event.to_leaf()).to_vec())
        .fetch_one(audit.database().read_pool())
        .await?
        .try_get::<Option<i64>, _>(0)?
        .ok_or_else(|| Error::Audit("the transition leaf was not sequenced".into()))?;
    let checkpointed: Option<i64> = sqlx::query("SELECT MAX(tree_size) FROM audit_checkpoints")
        .fetch_one(audit.database().read_pool())
        .await?
        .try_get(0)?;
    let last_size = outcome.tree_size;
    if checkpointed != Some(last_size as i64) || leaf as u64 >= last_size {
        return Err(Error::Audit(
            "no checkpoint by the old key covers the transition leaf; is another gateway process writing to this log?".into(),
        ));
    }
    gateway.state.db.close().await;
    Ok(RetiredKey {
        verifier: old.clone(),
        last_size,
        transition_leaf: leaf as u64,
    })
}

fn write_history(path: &Path, text: &str) -> Result<()> {
    let mut temp = path.as_os_str().to_os_string();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    let _ = std::fs::remove_file(&temp);
    key_file::write_private(&temp, text.as_bytes())?;
    std::fs::rename(&temp, path).map_err(|e| Error::io(path, e))?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}
