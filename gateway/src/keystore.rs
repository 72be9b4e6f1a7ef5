//! The key store: each patient's data key, wrapped by the key-encryption key, kept apart from
//! the main database (its own SQLite file, or its own PostgreSQL schema). Deleting a patient's
//! row crypto-shreds every copy of their data, backups of the main database included.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::migrate::Migrator;
use sqlx::{Executor, Row};

use crate::config::Config;
use crate::crypto::kek_provider::{self, KekProvider};
use crate::crypto::DataKey;
use crate::error::{Error, Result};
use crate::store::{now_millis, Database, Engine, SessionSetup};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/keystore-sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/keystore-postgres");

#[derive(Clone)]
pub struct KeyStore {
    db: Database,
    /// The only thing that sees data keys unwrapped: a file KEK, an HSM, a KMS.
    kek: Arc<dyn KekProvider>,
    /// Unwrapped keys recently read, so a burst of reads of one patient's data does not
    /// go to the key store each time. Shredding evicts at once here; another process may
    /// hold a key up to [`KEY_CACHE_TTL`] longer, when the erased rows are already gone.
    /// Writes never use it: new data is sealed only under a key the store still holds.
    cache: Arc<std::sync::Mutex<HashMap<String, (Instant, DataKey)>>>,
}

/// How long an unwrapped key is reused for reads.
const KEY_CACHE_TTL: Duration = Duration::from_secs(30);
/// Most keys cached at once (the cache starts over when full).
const KEY_CACHE_SIZE: usize = 4096;

impl KeyStore {
    /// Opens the key store that goes with the main database at `main_url`.
    pub async fn open(
        config: &Config,
        main_url: &str,
        kek: impl KekProvider + 'static,
    ) -> Result<Self> {
        Self::open_with(config, main_url, Arc::new(kek)).await
    }

    /// `open` with a shared provider (an HSM session, a test double).
    pub async fn open_with(
        config: &Config,
        main_url: &str,
        kek: Arc<dyn KekProvider>,
    ) -> Result<Self> {
        let db = open_database(config, main_url).await?;
        Ok(KeyStore {
            db,
            kek,
            cache: Arc::default(),
        })
    }

    /// The patient's data key for reading (possibly from the cache), or `KeyMissing` once
    /// it has been shredded.
    pub async fn data_key(&self, patient_id: &str) -> Result<DataKey> {
        if let Some(key) = self.cached(patient_id) {
            return Ok(key);
        }
        let key = self.stored_key(patient_id).await?;
        self.remember(vec![(patient_id.to_string(), key.clone())]);
        Ok(key)
    }

    /// Reads the keys of many patients into the cache in one query per 500, so a job that
    /// goes through patients one by one (a Bulk export) does not read the key store for
    /// each. A patient without a key is left out; `data_key` reports it then.
    pub async fn warm(&self, patient_ids: &[&str]) -> Result<()> {
        let missing: Vec<&str> = patient_ids
            .iter()
            .copied()
            .filter(|id| self.cached(id).is_none())
            .collect();
        for chunk in missing.chunks(500) {
            let sql = format!(
                "SELECT patient_id, wrapped_key, kek_id FROM data_keys WHERE patient_id IN ({})",
                crate::store::list_placeholders(self.db.engine(), chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id.to_string());
            }
            let mut keys = Vec::with_capacity(chunk.len());
            for row in query.fetch_all(self.db.read_pool()).await? {
                let patient_id: String = row.try_get(0)?;
                let key = self.unwrap_stored(&patient_id, row.try_get(1)?, row.try_get(2)?)?;
                keys.push((patient_id, key));
            }
            self.remember(keys);
        }
        Ok(())
    }

    /// The patient's key from the cache, if it was read within [`KEY_CACHE_TTL`].
    fn cached(&self, patient_id: &str) -> Option<DataKey> {
        let cache = self.cache.lock().ok()?;
        let (at, key) = cache.get(patient_id)?;
        (at.elapsed() < KEY_CACHE_TTL).then(|| key.clone())
    }

    /// Keys just read from the store, for reuse (the cache starts over when full).
    fn remember(&self, keys: Vec<(String, DataKey)>) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() + keys.len() > KEY_CACHE_SIZE {
                cache.clear();
            }
            let at = Instant::now();
            for (patient_id, key) in keys {
                cache.insert(patient_id, (at, key));
            }
        }
    }

    /// The key as the store holds it now.
    async fn stored_key(&self, patient_id: &str) -> Result<DataKey> {
        let row = sqlx::query("SELECT wrapped_key, kek_id FROM data_keys WHERE patient_id = $1")
            .bind(patient_id)
            .fetch_optional(self.db.read_pool())
            .await?;
        let row = row.ok_or_else(|| Error::KeyMissing(patient_id.to_string()))?;
        self.unwrap_stored(patient_id, row.try_get(0)?, row.try_get(1)?)
    }

    /// A stored key (wrapped, and the id of the KEK that wrapped it) unwrapped.
    fn unwrap_stored(
        &self,
        patient_id: &str,
        wrapped: Vec<u8>,
        kek_id: Option<String>,
    ) -> Result<DataKey> {
        // A key under another KEK is a state to name, not a decryption failure to guess at.
        if let Some(kek_id) = kek_id {
            if kek_id != self.kek.key_id() {
                return Err(Error::KekMismatch {
                    wrapped_by: kek_id,
                    held: self.kek.key_id().to_string(),
                });
            }
        }
        DataKey::from_bytes(&self.kek.unwrap(patient_id, &wrapped)?)
    }

    /// The id of the KEK this key store wraps new keys with.
    pub fn kek_id(&self) -> &str {
        self.kek.key_id()
    }

    /// How many data keys each KEK wraps (`None`: recorded before ids were kept). More than
    /// one entry is a mixed state: a rotation not finished, or keys restored from elsewhere.
    pub async fn kek_ids(&self) -> Result<Vec<(Option<String>, u64)>> {
        let rows =
            sqlx::query("SELECT kek_id, COUNT(*) FROM data_keys GROUP BY kek_id ORDER BY kek_id")
                .fetch_all(self.db.read_pool())
                .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get::<i64, _>(1)? as u64)))
            .collect()
    }

    /// The patient's data key, created on first use. `true` when it was created now.
    pub async fn data_key_or_create(&self, patient_id: &str) -> Result<(DataKey, bool)> {
        match self.stored_key(patient_id).await {
            Ok(key) => return Ok((key, false)),
            Err(Error::KeyMissing(_)) => {}
            Err(e) => return Err(e),
        }
        let wrapped = kek_provider::new_data_key(&*self.kek, patient_id)?;
        let inserted = sqlx::query(
            "INSERT INTO data_keys (patient_id, wrapped_key, created_at, kek_id)
             VALUES ($1, $2, $3, $4) ON CONFLICT (patient_id) DO NOTHING",
        )
        .bind(patient_id)
        .bind(wrapped)
        .bind(now_millis())
        .bind(self.kek.key_id())
        .execute(self.db.write_pool())
        .await?
        .rows_affected();
        // A concurrent writer may have won the race: always use the stored key.
        Ok((self.stored_key(patient_id).await?, inserted == 1))
    }

    /// Every wrapped data key, by owner (for checks and tests; the keys stay wrapped).
    pub async fn wrapped_keys(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let rows = sqlx::query("SELECT patient_id, wrapped_key FROM data_keys ORDER BY patient_id")
            .fetch_all(self.db.read_pool())
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    /// Re-wraps every data key from `old` to `new` in one transaction (KEK rotation). A key
    /// already under `new` (a resumed rotation) is left as it is; a key under neither stops
    /// the rotation with nothing changed. Returns (re-wrapped, already under `new`).
    pub async fn rewrap_all(
        &self,
        old: &dyn KekProvider,
        new: &dyn KekProvider,
    ) -> Result<(u64, u64)> {
        let mut tx = self.db.begin().await?;
        let rows = sqlx::query("SELECT patient_id, wrapped_key FROM data_keys ORDER BY patient_id")
            .fetch_all(&mut *tx)
            .await?;
        let (mut rewrapped, mut already) = (0, 0);
        for row in rows {
            let patient_id: String = row.try_get(0)?;
            let wrapped: Vec<u8> = row.try_get(1)?;
            if new.unwrap(&patient_id, &wrapped).is_ok() {
                sqlx::query("UPDATE data_keys SET kek_id = $1 WHERE patient_id = $2")
                    .bind(new.key_id())
                    .bind(&patient_id)
                    .execute(&mut *tx)
                    .await?;
                already += 1;
                continue;
            }
            let rewrapped_key =
                kek_provider::rewrap(old, new, &patient_id, &wrapped).map_err(|_| {
                    Error::Crypto("a data key is wrapped by neither the old nor the new KEK")
                })?;
            sqlx::query("UPDATE data_keys SET wrapped_key = $1, kek_id = $2 WHERE patient_id = $3")
                .bind(rewrapped_key)
                .bind(new.key_id())
                .bind(&patient_id)
                .execute(&mut *tx)
                .await?;
            rewrapped += 1;
        }
        tx.commit().await?;
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
        Ok((rewrapped, already))
    }

    /// Destroys the patient's data key so their stored data can never be decrypted again.
    /// The erasure goes into `ledger` (the main database's erasure ledger) first, so that a
    /// key store restored from an older backup has it applied again (see
    /// [`reapply_erasures`]); a crash between the two leaves the key to be shredded then.
    /// On SQLite the deleted bytes are zeroed (`secure_delete`) and the WAL truncated; on
    /// PostgreSQL the table is rewritten so the old tuple leaves the table's files.
    pub async fn shred(&self, ledger: &Database, patient_id: &str) -> Result<bool> {
        record_erasure(ledger, patient_id, now_millis()).await?;
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(patient_id);
        }
        let deleted = sqlx::query("DELETE FROM data_keys WHERE patient_id = $1")
            .bind(patient_id)
            .execute(self.db.write_pool())
            .await?
            .rows_affected();
        compact(&self.db).await?;
        Ok(deleted == 1)
    }

    /// Applies the erasure ledger again (at every start, and after a key-store restore):
    /// see [`reapply_erasures`]. Returns how many keys were shredded now.
    pub async fn reapply_erasures(&self, ledger: &Database) -> Result<u64> {
        let shredded = reapply_erasures(ledger, &self.db).await?;
        if shredded > 0 {
            if let Ok(mut cache) = self.cache.lock() {
                cache.clear();
            }
        }
        Ok(shredded)
    }

    /// The key store's own database (for its backups).
    pub(crate) fn database(&self) -> &Database {
        &self.db
    }

    pub async fn ping(&self) -> Result<()> {
        self.db.ping().await
    }

    pub async fn close(&self) {
        self.db.close().await
    }
}

/// Where the key store that goes with the main database at `main_url` is.
pub(crate) fn url_of(config: &Config, main_url: &str) -> Result<String> {
    Ok(match &config.database.key_store_url {
        Some(url) => url.clone(),
        None => match Engine::of_url(main_url)? {
            Engine::Sqlite => format!(
                "sqlite://{}?mode=rwc",
                config.data_dir.join("keys.db").display()
            ),
            Engine::Postgres => main_url.to_string(),
        },
    })
}

/// The key store's database, opened and migrated (no KEK needed: its rows stay wrapped).
pub(crate) async fn open_database(config: &Config, main_url: &str) -> Result<Database> {
    let url = url_of(config, main_url)?;
    let db = Database::connect_with(
        &url,
        config.database.max_connections.min(4),
        Duration::from_secs(config.database.connect_timeout_secs),
        SessionSetup::KeyStore {
            schema: config.database.key_store_schema.clone(),
        },
    )
    .await?;
    let migrator = match db.engine() {
        Engine::Sqlite => &SQLITE_MIGRATIONS,
        Engine::Postgres => &POSTGRES_MIGRATIONS,
    };
    db.migrate_with(migrator).await?;
    Ok(db)
}

/// Writes one erasure into the ledger (a later erasure of the same key id moves its time).
async fn record_erasure(ledger: &Database, key_id: &str, at: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO erased_data_keys (key_id, erased_at) VALUES ($1, $2)
         ON CONFLICT (key_id) DO UPDATE SET erased_at = excluded.erased_at",
    )
    .bind(key_id)
    .bind(at)
    .execute(ledger.write_pool())
    .await?;
    Ok(())
}

/// Shreds again every key in `key_store` that the ledger says was erased: a key whose id is
/// in the ledger and that was created no later than its erasure. A key made after the
/// erasure (the same patient using the gateway again) is a new key and stays.
pub(crate) async fn reapply_erasures(ledger: &Database, key_store: &Database) -> Result<u64> {
    let erased = sqlx::query("SELECT key_id, erased_at FROM erased_data_keys")
        .fetch_all(ledger.read_pool())
        .await?;
    if erased.is_empty() {
        return Ok(0);
    }
    let mut shredded = 0;
    let mut tx = key_store.begin().await?;
    for row in erased {
        let key_id: String = row.try_get(0)?;
        let erased_at: i64 = row.try_get(1)?;
        shredded += sqlx::query("DELETE FROM data_keys WHERE patient_id = $1 AND created_at <= $2")
            .bind(key_id)
            .bind(erased_at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    tx.commit().await?;
    if shredded > 0 {
        compact(key_store).await?;
    }
    Ok(shredded)
}

/// Makes deleted key rows leave the files (see [`KeyStore::shred`]).
async fn compact(key_store: &Database) -> Result<()> {
    let statement = match key_store.engine() {
        Engine::Sqlite => "PRAGMA wal_checkpoint(TRUNCATE)",
        Engine::Postgres => "VACUUM FULL data_keys",
    };
    key_store.write_pool().execute(statement).await?;
    Ok(())
}
