//! Shared set-up for the bench binaries: a gateway on a fresh SQLite or PostgreSQL database.

#![allow(dead_code)]

use std::time::Instant;

// The gateway binary's allocator (src/main.rs), so the figures are the shipped binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use phr_gateway::config::{Config, LogFormat};
use phr_gateway::store::resources::{NewResource, SourceIdentity};
use phr_gateway::store::Engine;
use phr_gateway::Gateway;
use sqlx::Executor;

pub struct BenchEnv {
    pub engine: Engine,
    _dir: tempfile::TempDir,
    pub config: Config,
    pg_database: Option<String>,
}

fn postgres_url() -> String {
    std::env::var("PHR_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

impl BenchEnv {
    /// `None` when the engine is not reachable (PostgreSQL not running).
    pub async fn new(engine: Engine) -> Option<BenchEnv> {
        let dir = tempfile::tempdir().ok()?;
        let mut config = Config {
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".parse().ok()?,
            insecure_http: true,
            ..Config::default()
        };
        config.log.format = LogFormat::Pretty;
        let mut pg_database = None;
        if engine == Engine::Postgres {
            sqlx::any::install_default_drivers();
            let admin = sqlx::AnyPool::connect(&postgres_url()).await.ok()?;
            let name = format!("phr_bench_{}", uuid::Uuid::new_v4().simple());
            admin
                .execute(format!("CREATE DATABASE {name}").as_str())
                .await
                .ok()?;
            admin.close().await;
            let base = postgres_url();
            let i = base.rfind('/')?;
            config.database.url = Some(format!("{}/{name}", &base[..i]));
            pg_database = Some(name);
        }
        Some(BenchEnv {
            engine,
            _dir: dir,
            config,
            pg_database,
        })
    }

    pub async fn gateway(&self) -> Gateway {
        match Gateway::build(self.config.clone()).await {
            Ok(g) => g,
            Err(e) => panic!("gateway: {e}"),
        }
    }

    pub async fn cleanup(self) {
        if let Some(name) = &self.pg_database {
            if let Ok(admin) = sqlx::AnyPool::connect(&postgres_url()).await {
                let _ = admin
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await;
                admin.close().await;
            }
        }
    }
}

/// A small blood-pressure Observation, the `n`th of the patient's from the source `bench`
/// (the FHIR API and export benches read these).
pub fn blood_pressure(patient_id: &str, n: usize) -> NewResource {
    NewResource {
        patient_id: patient_id.to_string(),
        category: "observations".into(),
        source: SourceIdentity {
            source: "bench".into(),
            resource_type: "Observation".into(),
            source_resource_id: format!("o-{n}"),
            version_id: Some("1".into()),
        },
        body: serde_json::json!({
            "resourceType": "Observation",
            "id": format!("o-{n}"),
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "subject": {"reference": "Patient/p"},
            "effectiveDateTime": "2026-04-01",
            "valueQuantity": {"value": 100 + n % 60, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}
        })
        .to_string()
        .into_bytes(),
    }
}

/// Runs `f` and returns (result, seconds).
pub async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, f64) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed().as_secs_f64())
}

/// Resident memory of this process now, in KiB (Linux).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub fn engines() -> Vec<Engine> {
    match std::env::var("PHR_BENCH_ENGINES").as_deref() {
        Ok("sqlite") => vec![Engine::Sqlite],
        Ok("postgres") => vec![Engine::Postgres],
        _ => vec![Engine::Sqlite, Engine::Postgres],
    }
}

/// Wall time spent inside each named `debug` span, summed over a run (`PHR_BENCH_SPANS=1`):
/// where a pipeline's time goes, e.g. how long pull pages wait for the single writer.
#[derive(Clone, Default)]
pub struct SpanTimes(
    std::sync::Arc<
        std::sync::Mutex<std::collections::BTreeMap<&'static str, (u64, std::time::Duration)>>,
    >,
);

impl SpanTimes {
    /// Installs the recorder when `PHR_BENCH_SPANS=1`.
    pub fn install() -> Option<SpanTimes> {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::Layer;
        if std::env::var("PHR_BENCH_SPANS").as_deref() != Ok("1") {
            return None;
        }
        let times = SpanTimes::default();
        let subscriber = tracing_subscriber::registry().with(
            times
                .clone()
                .with_filter(tracing_subscriber::filter::LevelFilter::DEBUG),
        );
        tracing::subscriber::set_global_default(subscriber).ok()?;
        Some(times)
    }

    /// Prints and clears the sums.
    pub fn report(&self, label: &str) {
        let Ok(mut times) = self.0.lock() else {
            return;
        };
        for (name, (count, total)) in std::mem::take(&mut *times) {
            println!(
                "  {label}: {name:<20} {count:>7} × {:>8.1} µs = {:>7.2} s",
                total.as_secs_f64() * 1e6 / count.max(1) as f64,
                total.as_secs_f64()
            );
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for SpanTimes
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        _attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Instant::now());
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(started) = span.extensions().get::<Instant>().copied() else {
            return;
        };
        if let Ok(mut times) = self.0.lock() {
            let entry = times.entry(span.name()).or_default();
            entry.0 += 1;
            entry.1 += started.elapsed();
        }
    }
}
