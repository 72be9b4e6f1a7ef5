//! Configuration errors stop start-up before anything is opened.

use crate::helpers::{build_error, Engine, TestEnv};

type Adjust = Box<dyn Fn(&mut phr_gateway::Config)>;

#[tokio::test]
async fn invalid_config_stops_start_naming_the_key() {
    let env = TestEnv::new(Engine::Sqlite).await;
    let cases: Vec<(&str, Adjust)> = vec![
        (
            "sessions.absolute_timeout_secs",
            Box::new(|c| c.sessions.absolute_timeout_secs = 1),
        ),
        (
            "http.body_limit_bytes",
            Box::new(|c| c.http.body_limit_bytes = 0),
        ),
        (
            "database.url",
            Box::new(|c| c.database.url = Some("mysql://x".into())),
        ),
        (
            "database.key_store_schema",
            Box::new(|c| c.database.key_store_schema = "x; DROP".into()),
        ),
        (
            "tls",
            Box::new(|c| c.tls.cert_file = Some("/tmp/only-a-cert.pem".into())),
        ),
    ];
    for (key, adjust) in cases {
        let mut config = env.config();
        adjust(&mut config);
        let err = build_error(config).await;
        assert!(err.contains(key), "{key}: {err}");
        assert!(
            !env.config().data_dir.join("gateway.db").exists(),
            "{key}: nothing opened"
        );
    }
}
