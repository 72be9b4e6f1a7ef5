//! The key store: each patient's data key, wrapped by the key-encryption key, kept apart from
//! the main database (its own SQLite file, or its own PostgreSQL schema). Deleting a patient's
//! row crypto-shreds every copy of their data, backups of the main database included.

use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::{Executor, Row};

use crate::config::Config;
use crate::crypto::{DataKey, Kek};
use crate::error::{Error, Result};
use crate::store::{now_millis, Database, Engine, SessionSetup};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/keystore-sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/keystore-postgres");

#[derive(Clone)]
pub struct KeyStore {
    db: Database,
    kek: Arc<Kek>,
}

impl KeyStore {
    /// Opens the key store that goes with the main database at `main_url`.
    pub async fn open(config: &Config, main_url: &str, kek: Kek) -> Result<Self> {
        let url = match &config.database.key_store_url {
            Some(url) => url.clone(),
            None => match Engine::of_url(main_url)? {
                Engine::Sqlite => format!(
                    "sqlite://{}?mode=rwc",
                    config.data_dir.join("keys.db").display()
                ),
                Engine::Postgres => main_url.to_string(),
            },
        };
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
        Ok(KeyStore {
            db,
            kek: Arc::new(kek),
        })
    }

    /// The patient's data key, or `KeyMissing` once it has been shredded.
    pub async fn data_key(&self, patient_id: &str) -> Result<DataKey> {
        let row = sqlx::query("SELECT wrapped_key FROM data_keys WHERE patient_id = $1")
            .bind(patient_id)
            .fetch_optional(self.db.read_pool())
            .await?;
        let row = row.ok_or_else(|| Error::KeyMissing(patient_id.to_string()))?;
        let wrapped: Vec<u8> = row.try_get(0)?;
        self.kek.unwrap_data_key(patient_id, &wrapped)
    }

    /// The patient's data key, created on first use. `true` when it was created now.
    pub async fn data_key_or_create(&self, patient_id: &str) -> Result<(DataKey, bool)> {
        match self.data_key(patient_id).await {
            Ok(key) => return Ok((key, false)),
            Err(Error::KeyMissing(_)) => {}
            Err(e) => return Err(e),
        }
        let (_, wrapped) = self.kek.new_data_key(patient_id)?;
        let inserted = sqlx::query(
            "INSERT INTO data_keys (patient_id, wrapped_key, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (patient_id) DO NOTHING",
        )
        .bind(patient_id)
        .bind(wrapped)
        .bind(now_millis())
        .execute(self.db.write_pool())
        .await?
        .rows_affected();
        // A concurrent writer may have won the race: always use the stored key.
        Ok((self.data_key(patient_id).await?, inserted == 1))
    }

    /// Destroys the patient's data key so their stored data can never be decrypted again.
    /// On SQLite the deleted bytes are zeroed (`secure_delete`) and the WAL truncated; on
    /// PostgreSQL the table is rewritten so the old tuple leaves the table's files.
    pub async fn shred(&self, patient_id: &str) -> Result<bool> {
        let deleted = sqlx::query("DELETE FROM data_keys WHERE patient_id = $1")
            .bind(patient_id)
            .execute(self.db.write_pool())
            .await?
            .rows_affected();
        match self.db.engine() {
            Engine::Sqlite => {
                self.db
                    .write_pool()
                    .execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    .await?;
            }
            Engine::Postgres => {
                self.db
                    .write_pool()
                    .execute("VACUUM FULL data_keys")
                    .await?;
            }
        }
        Ok(deleted == 1)
    }

    pub async fn ping(&self) -> Result<()> {
        self.db.ping().await
    }

    pub async fn close(&self) {
        self.db.close().await
    }
}
