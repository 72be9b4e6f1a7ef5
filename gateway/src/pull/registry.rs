//! The sources this gateway can pull from, by id, and their availability (degraded mode:
//! a source that is down leaves its jobs waiting; patients see since when).

use std::collections::BTreeMap;
use std::sync::Arc;

use phr_adapters::fhir_r4::{BackendKey, FhirR4Config, FhirR4Source};
use phr_adapters::self_info::{Category, SelfInfoConfig, SelfInfoSource};
use phr_adapters::Source;

use crate::config::{SourceAuth, SourceConfig, SourceKind};
use sqlx::{AnyConnection, Row};

use crate::error::{Error, Result};
use crate::store::{now_millis, Database};

/// What the gateway shows about a source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SourceInfo {
    pub id: String,
    pub kind: String,
    pub display_name: String,
}

/// A source that is down or in maintenance, and since when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unavailability {
    pub source_id: String,
    pub since: i64,
    pub reason: String,
}

#[derive(Clone, Default)]
pub struct SourceRegistry {
    sources: BTreeMap<String, (SourceInfo, Arc<dyn Source>)>,
}

impl SourceRegistry {
    pub fn new() -> Self {
        SourceRegistry::default()
    }

    pub fn add(&mut self, info: SourceInfo, source: Arc<dyn Source>) {
        self.sources.insert(info.id.clone(), (info, source));
    }

    pub fn get(&self, id: &str) -> Result<(&SourceInfo, Arc<dyn Source>)> {
        self.sources
            .get(id)
            .map(|(info, source)| (info, source.clone()))
            .ok_or_else(|| Error::NotFound(format!("source {id}")))
    }

    pub fn infos(&self) -> Vec<SourceInfo> {
        self.sources
            .values()
            .map(|(info, _)| info.clone())
            .collect()
    }

    /// The sources named in the configuration; `backend_key` signs Backend Services
    /// client assertions (the key published in the gateway's JWKS).
    pub fn from_config(sources: &[SourceConfig], backend_key: &BackendKey) -> Result<Self> {
        let mut registry = SourceRegistry::new();
        for config in sources {
            let source: Arc<dyn Source> = match config.kind {
                SourceKind::FhirR4 => {
                    let mut fhir =
                        FhirR4Config::new(&config.id, &config.base_url, &config.client_id);
                    if let Some(page_size) = config.page_size {
                        fhir.page_size = page_size;
                    }
                    if let Some(limit) = config.max_concurrent_requests {
                        fhir.max_concurrent_requests = limit;
                    }
                    if config.auth == SourceAuth::BackendServices {
                        fhir.backend_key = Some(backend_key.clone());
                    }
                    Arc::new(FhirR4Source::new(fhir).map_err(|e| {
                        Error::config(format!("sources.{}", config.id), e.to_string())
                    })?)
                }
                SourceKind::SelfInfo => {
                    let mut portal = SelfInfoConfig::new(
                        &config.id,
                        &config.base_url,
                        &config.client_id,
                        backend_key.clone(),
                    );
                    if let Some(page_size) = config.page_size {
                        portal.page_size = page_size;
                    }
                    if let Some(limit) = config.max_concurrent_requests {
                        portal.max_concurrent_requests = limit;
                    }
                    if let Some(scopes) = &config.portal_categories {
                        portal.enabled_categories = scopes
                            .iter()
                            .map(|scope| {
                                Category::from_scope(scope).ok_or_else(|| {
                                    Error::config(
                                        format!("sources.{}.portal_categories", config.id),
                                        format!("unknown portal category {scope:?}"),
                                    )
                                })
                            })
                            .collect::<Result<_>>()?;
                    }
                    Arc::new(SelfInfoSource::new(portal).map_err(|e| {
                        Error::config(format!("sources.{}", config.id), e.to_string())
                    })?)
                }
            };
            registry.add(
                SourceInfo {
                    id: config.id.clone(),
                    kind: config.kind.code().into(),
                    display_name: config.display_name.clone(),
                },
                source,
            );
        }
        Ok(registry)
    }

    /// Records the configured sources in the database (for foreign keys and availability).
    pub async fn sync(&self, db: &Database) -> Result<()> {
        for (info, _) in self.sources.values() {
            sqlx::query(
                "INSERT INTO sources (id, kind, display_name, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE SET kind = excluded.kind,
                     display_name = excluded.display_name",
            )
            .bind(&info.id)
            .bind(&info.kind)
            .bind(&info.display_name)
            .bind(now_millis())
            .execute(db.write_pool())
            .await?;
        }
        Ok(())
    }
}

/// Marks a source down (keeps the first time it was seen down).
pub async fn mark_unavailable(db: &Database, source_id: &str, reason: &str) -> Result<()> {
    sqlx::query(
        "UPDATE sources SET unavailable_since = COALESCE(unavailable_since, $1),
             unavailable_reason = $2 WHERE id = $3",
    )
    .bind(now_millis())
    .bind(reason)
    .bind(source_id)
    .execute(db.write_pool())
    .await?;
    Ok(())
}

pub async fn mark_available(db: &Database, source_id: &str) -> Result<()> {
    let mut conn = db.write_pool().acquire().await?;
    mark_available_in(&mut conn, source_id).await
}

/// `mark_available` in the caller's transaction (a pull's last page commits it).
pub async fn mark_available_in(conn: &mut AnyConnection, source_id: &str) -> Result<()> {
    sqlx::query(
        "UPDATE sources SET unavailable_since = NULL, unavailable_reason = NULL
         WHERE id = $1 AND unavailable_since IS NOT NULL",
    )
    .bind(source_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Since when (RFC 3339) `source_id` has been down, if it is.
pub fn unavailable_since(down: &[Unavailability], source_id: &str) -> Option<String> {
    down.iter()
        .find(|d| d.source_id == source_id)
        .map(|d| crate::store::millis_to_rfc3339(d.since))
}

pub async fn unavailable_sources(db: &Database) -> Result<Vec<Unavailability>> {
    let rows = sqlx::query(
        "SELECT id, unavailable_since, unavailable_reason FROM sources
         WHERE unavailable_since IS NOT NULL ORDER BY id",
    )
    .fetch_all(db.read_pool())
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Unavailability {
                source_id: row.try_get(0)?,
                since: row.try_get(1)?,
                reason: row.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
            })
        })
        .collect()
}
