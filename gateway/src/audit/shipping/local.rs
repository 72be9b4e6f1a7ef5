//! The default sink: a local directory. Not ransomware-resilient (anyone with this host's
//! privileges can rewrite it); it still catches a rewrite of the database alone.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{async_trait, AuditSink, PutOutcome};
use crate::error::{Error, Result};

pub struct LocalSink {
    dir: PathBuf,
}

impl LocalSink {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LocalSink { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `key`; keys are ours, but a key that could leave the directory is refused.
    fn path_of(&self, key: &str) -> Result<PathBuf> {
        let safe = !key.is_empty()
            && !key.starts_with('/')
            && key
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..")
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
        if !safe {
            return Err(Error::Audit(format!("audit sink: bad key {key:?}")));
        }
        Ok(self.dir.join(key))
    }
}

fn create_dirs(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))
}

/// Writes a temporary file, then links it under its name: linking fails if the name exists,
/// so an object appears whole or not at all and is never replaced.
fn put_file(path: &Path, bytes: &[u8]) -> Result<PutOutcome> {
    let parent = path
        .parent()
        .ok_or_else(|| Error::Audit(format!("audit sink: {} has no parent", path.display())))?;
    create_dirs(parent)?;
    if path.exists() {
        return Ok(PutOutcome::AlreadyExists);
    }
    let tmp = parent.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            // The new name is durable only once its directory is.
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(parent, e))?;
            Ok(PutOutcome::Created)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(PutOutcome::AlreadyExists),
        Err(e) => Err(Error::io(path, e)),
    }
}

#[async_trait]
impl AuditSink for LocalSink {
    fn describe(&self) -> String {
        format!("local directory {}", self.dir.display())
    }

    fn is_write_once(&self) -> bool {
        false
    }

    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<PutOutcome> {
        let path = self.path_of(key)?;
        tokio::task::spawn_blocking(move || put_file(&path, &bytes))
            .await
            .map_err(|e| Error::Audit(format!("audit sink write task: {e}")))?
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path_of(key)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        // Our keys have one directory level: `leaves/…`, `checkpoints/…`.
        let (dir_part, name_prefix) = match prefix.rsplit_once('/') {
            Some((dir, name)) => (dir, name),
            None => ("", prefix),
        };
        let dir = if dir_part.is_empty() {
            self.dir.clone()
        } else {
            self.path_of(dir_part)?
        };
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(dir, e)),
        };
        let mut keys = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(|e| Error::io(&dir, e))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.starts_with(name_prefix) {
                continue;
            }
            keys.push(if dir_part.is_empty() {
                name
            } else {
                format!("{dir_part}/{name}")
            });
        }
        keys.sort();
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn creates_once_private_and_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LocalSink::new(dir.path().join("shipped"));
        let key = "leaves/00000000000000000000.ndjson";
        assert_eq!(
            sink.put_if_absent(key, b"first".to_vec()).await.unwrap(),
            PutOutcome::Created
        );
        assert_eq!(
            sink.put_if_absent(key, b"second".to_vec()).await.unwrap(),
            PutOutcome::AlreadyExists
        );
        assert_eq!(sink.get(key).await.unwrap().as_deref(), Some(&b"first"[..]));
        assert_eq!(sink.get("leaves/none").await.unwrap(), None);
        assert_eq!(sink.list("leaves/").await.unwrap(), vec![key.to_string()]);
        assert!(sink.list("checkpoints/").await.unwrap().is_empty());
        let file_mode = std::fs::metadata(sink.dir().join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(file_mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(sink.dir().join("leaves"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert!(!sink.is_write_once());
    }

    #[tokio::test]
    async fn keys_cannot_leave_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LocalSink::new(dir.path());
        for key in ["../x", "/etc/passwd", "a//b", "leaves/../../x", ""] {
            assert!(sink.put_if_absent(key, Vec::new()).await.is_err(), "{key}");
        }
    }
}
