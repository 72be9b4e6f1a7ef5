//! The HTTP API through the real server over TLS: sign-in, sessions, operator-only
//! endpoints, streaming, and clear errors for bad input.

use phr_gateway::audit::AccountRole;
use reqwest::header;
use reqwest::StatusCode;

use crate::both_engines;
use crate::helpers::{leaves_containing, spawn_app, spawn_app_with, Engine, TestApp, TestEnv};

both_engines!(
    health_and_readiness_over_tls,
    login_session_and_logout,
    failed_logins_are_audited_and_lock_the_account,
    operator_endpoints_need_an_operator,
    patient_stream_returns_own_resources_and_is_audited,
    bad_input_gets_clear_errors_never_500,
    idle_sessions_expire,
    absolute_timeout_ends_a_busy_session,
    forwarded_for_is_believed_only_from_trusted_proxies,
);

async fn leaves_matching(app: &TestApp, needle: &str) -> usize {
    leaves_containing(app, needle).await as usize
}

fn assert_problem(response: &reqwest::Response, status: StatusCode) {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json",
        "{status} must be problem+json"
    );
}

async fn health_and_readiness_over_tls(engine: Engine) {
    let app = spawn_app(engine).await;
    let response = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "req-123")
        .send()
        .await
        .expect("healthz");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(
        headers["x-request-id"], "req-123",
        "request ids are propagated"
    );
    assert!(headers["strict-transport-security"]
        .to_str()
        .expect("hsts")
        .contains("max-age="));
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers["content-security-policy"]
        .to_str()
        .expect("csp")
        .contains("frame-ancestors 'none'"));
    assert_eq!(
        response.json::<serde_json::Value>().await.expect("json")["status"],
        "ok"
    );

    let ready = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    let generated = app.client.get(app.url("/nope")).send().await.expect("404");
    assert!(
        generated.headers().contains_key("x-request-id"),
        "a request id is generated"
    );
    app.stop().await;
}

async fn login_session_and_logout(engine: Engine) {
    let app = spawn_app(engine).await;
    let token = app
        .sign_in(AccountRole::Patient, "hanako", Some("patient-1"))
        .await;

    let me = app
        .client
        .get(app.url("/auth/session"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("session");
    assert_eq!(me.status(), 200);
    let body: serde_json::Value = me.json().await.expect("json");
    assert_eq!(body["role"], "patient");
    assert!(
        body.get("token").is_none(),
        "the token is only shown at login"
    );

    // The cookie works as well as the bearer token, and is locked down.
    let login = app
        .client
        .post(app.url("/auth/login"))
        .json(
            &serde_json::json!({"username": "hanako", "password": "correct horse battery staple"}),
        )
        .send()
        .await
        .expect("login");
    let cookie = login.headers()[header::SET_COOKIE]
        .to_str()
        .expect("cookie")
        .to_string();
    for attribute in [
        "__Host-phr_session=",
        "Secure",
        "HttpOnly",
        "SameSite=Lax",
        "Path=/",
    ] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    let pair = cookie.split(';').next().expect("pair").to_string();
    let by_cookie = app
        .client
        .get(app.url("/auth/session"))
        .header(header::COOKIE, pair)
        .send()
        .await
        .expect("cookie session");
    assert_eq!(by_cookie.status(), 200);

    let logout = app
        .client
        .post(app.url("/auth/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("logout");
    assert_eq!(logout.status(), 204);
    let after = app
        .client
        .get(app.url("/auth/session"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("after logout");
    assert_problem(&after, StatusCode::UNAUTHORIZED);
    assert!(
        leaves_matching(&app, "\"code\":\"110122\"").await >= 2,
        "logins audited"
    );
    assert_eq!(
        leaves_matching(&app, "\"code\":\"110123\"").await,
        1,
        "logout audited"
    );
    app.stop().await;
}

async fn failed_logins_are_audited_and_lock_the_account(engine: Engine) {
    let app = spawn_app(engine).await;
    app.gateway()
        .state
        .accounts
        .create(
            AccountRole::Operator,
            "ops",
            "correct horse battery staple",
            None,
        )
        .await
        .expect("account");
    let attempt = |password: &'static str| {
        app.client
            .post(app.url("/auth/login"))
            .json(&serde_json::json!({"username": "ops", "password": password}))
            .send()
    };
    for _ in 0..5 {
        let response = attempt("wrong password!").await.expect("attempt");
        assert_problem(&response, StatusCode::UNAUTHORIZED);
    }
    // Locked now: even the right password is refused, with Retry-After.
    let locked = attempt("correct horse battery staple")
        .await
        .expect("locked");
    assert_problem(&locked, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = locked.headers()[header::RETRY_AFTER]
        .to_str()
        .expect("retry-after")
        .parse()
        .expect("secs");
    assert!(retry > 0 && retry <= 300, "{retry}");
    // Unknown users get the same answer as wrong passwords.
    let unknown = app
        .client
        .post(app.url("/auth/login"))
        .json(&serde_json::json!({"username": "nobody", "password": "whatever it is"}))
        .send()
        .await
        .expect("unknown");
    assert_problem(&unknown, StatusCode::UNAUTHORIZED);
    let failures = leaves_matching(&app, "\"outcome\":\"4\"").await;
    assert_eq!(failures, 7, "every failed login is audited");
    app.stop().await;
}

async fn operator_endpoints_need_an_operator(engine: Engine) {
    let app = spawn_app(engine).await;
    let patient = app
        .sign_in(AccountRole::Patient, "pat", Some("patient-9"))
        .await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    let anonymous = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("anon");
    assert_problem(&anonymous, StatusCode::UNAUTHORIZED);
    let as_patient = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(&patient)
        .send()
        .await
        .expect("patient");
    assert_problem(&as_patient, StatusCode::FORBIDDEN);
    let as_operator = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(&operator)
        .send()
        .await
        .expect("op");
    assert_eq!(as_operator.status(), 200);
    let text = as_operator.text().await.expect("text");
    assert!(text.contains("phr_gateway_http_requests_total"), "{text}");
    assert!(text.contains("phr_gateway_audit_tree_size"));

    app.gateway()
        .state
        .audit
        .sequence(true)
        .await
        .expect("checkpoint");
    let checkpoint = app
        .client
        .get(app.url("/operator/audit/checkpoint"))
        .bearer_auth(&operator)
        .send()
        .await
        .expect("checkpoint");
    assert_eq!(checkpoint.status(), 200);
    let note = checkpoint.text().await.expect("note");
    assert!(app.gateway().state.audit.verifier().verify(&note).is_ok());
    let by_patient = app
        .client
        .get(app.url("/operator/audit/checkpoint"))
        .bearer_auth(&patient)
        .send()
        .await
        .expect("patient");
    assert_problem(&by_patient, StatusCode::FORBIDDEN);
    app.stop().await;
}

async fn patient_stream_returns_own_resources_and_is_audited(engine: Engine) {
    let app = spawn_app(engine).await;
    let token = app
        .sign_in(
            AccountRole::Patient,
            "demo",
            Some(phr_gateway::demo::DEMO_PATIENT_ID),
        )
        .await;
    let other = app
        .sign_in(AccountRole::Patient, "other", Some("someone-else"))
        .await;
    phr_gateway::demo::seed(&app.gateway().state)
        .await
        .expect("seed demo data");
    let response = app
        .client
        .get(app.url("/patient/resources"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/fhir+ndjson"
    );
    let text = response.text().await.expect("body");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 5);
    assert!(lines.iter().any(|l| l["resourceType"] == "Patient"));
    assert_eq!(
        leaves_matching(&app, "search-type").await,
        1,
        "the read is audited"
    );

    // Someone else's session sees none of it (no data key yet: their record is empty).
    let theirs = app
        .client
        .get(app.url("/patient/resources"))
        .bearer_auth(&other)
        .send()
        .await
        .expect("other");
    assert!(theirs.status() == StatusCode::GONE || theirs.status() == 200);
    let body = theirs.text().await.expect("body");
    assert!(!body.contains("Observation"));

    // After crypto-shredding, the patient's data is gone: a clear 410, not a 500.
    app.gateway()
        .state
        .resources
        .shred_patient(
            &phr_gateway::audit::Agent::system(),
            phr_gateway::demo::DEMO_PATIENT_ID,
        )
        .await
        .expect("shred");
    let gone = app
        .client
        .get(app.url("/patient/resources"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("gone");
    assert_problem(&gone, StatusCode::GONE);
    app.stop().await;
}

async fn bad_input_gets_clear_errors_never_500(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let app = spawn_app_with(env, |c| c.http.body_limit_bytes = 4096).await;
    let login = app.url("/auth/login");
    let json = "application/json";
    let cases: Vec<(&str, Vec<u8>, &str, StatusCode)> = vec![
        (
            "malformed JSON",
            b"{\"username\":".to_vec(),
            json,
            StatusCode::BAD_REQUEST,
        ),
        (
            "non-UTF-8",
            vec![b'{', b'"', 0xff, 0xfe, b'"', b'}'],
            json,
            StatusCode::BAD_REQUEST,
        ),
        (
            "wrong shape",
            b"{\"username\": 5}".to_vec(),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "unknown field",
            b"{\"username\":\"a\",\"password\":\"b\",\"admin\":true}".to_vec(),
            json,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "not JSON at all",
            b"username=a".to_vec(),
            "application/x-www-form-urlencoded",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "oversized",
            vec![b' '; 10_000],
            json,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (name, body, content_type, status) in cases {
        let response = app
            .client
            .post(&login)
            .header(header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .expect(name);
        assert_eq!(response.status(), status, "{name}");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json",
            "{name}"
        );
        let problem: serde_json::Value = response.json().await.expect(name);
        assert_eq!(problem["status"], status.as_u16(), "{name}");
        assert!(
            !problem["detail"].as_str().unwrap_or("").is_empty(),
            "{name}"
        );
    }
    let not_found = app
        .client
        .get(app.url("/no/such/path"))
        .send()
        .await
        .expect("404");
    assert_problem(&not_found, StatusCode::NOT_FOUND);
    let wrong_method = app
        .client
        .delete(app.url("/healthz"))
        .send()
        .await
        .expect("405");
    assert_problem(&wrong_method, StatusCode::METHOD_NOT_ALLOWED);
    let bad_token = app
        .client
        .get(app.url("/auth/session"))
        .header(
            header::AUTHORIZATION,
            header::HeaderValue::from_bytes(b"Bearer \xff\xfegarbage").expect("opaque bytes"),
        )
        .send()
        .await
        .expect("bad token");
    assert_problem(&bad_token, StatusCode::UNAUTHORIZED);

    // FHIR paths answer with OperationOutcome: a read without a token, and an
    // interaction not supported yet.
    let unauthenticated = app
        .client
        .get(app.url("/fhir/Patient/x"))
        .send()
        .await
        .expect("fhir");
    assert_eq!(unauthenticated.status(), 401);
    let outcome: serde_json::Value = unauthenticated.json().await.expect("json");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let fhir = app
        .client
        .delete(app.url("/fhir/Encounter/x"))
        .send()
        .await
        .expect("fhir");
    assert_eq!(fhir.status(), 405);
    assert_eq!(
        fhir.headers()[header::CONTENT_TYPE],
        "application/fhir+json"
    );
    let outcome: serde_json::Value = fhir.json().await.expect("json");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let fhir_big = app
        .client
        .post(app.url("/fhir/Observation"))
        .header(header::CONTENT_TYPE, "application/fhir+json")
        .body(vec![b' '; 10_000])
        .send()
        .await
        .expect("fhir big");
    assert_eq!(fhir_big.status(), 413);
    let outcome: serde_json::Value = fhir_big.json().await.expect("json");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "too-costly");

    // The server is still healthy after all that.
    let health = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
    app.stop().await;
}

async fn idle_sessions_expire(engine: Engine) {
    let env = TestEnv::new(engine).await;
    let app = spawn_app_with(env, |c| c.sessions.idle_timeout_secs = 1).await;
    let token = app
        .sign_in(AccountRole::Patient, "sleepy", Some("p-sleepy"))
        .await;
    let fresh = app
        .client
        .get(app.url("/auth/session"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("fresh");
    assert_eq!(fresh.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let idle = app
        .client
        .get(app.url("/auth/session"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("idle");
    assert_problem(&idle, StatusCode::UNAUTHORIZED);
    let detail: serde_json::Value = idle.json().await.expect("json");
    assert!(detail["detail"]
        .as_str()
        .expect("detail")
        .contains("inactivity"));
    app.stop().await;
}

async fn absolute_timeout_ends_a_busy_session(engine: Engine) {
    let app = spawn_app(engine).await;
    let token = app.sign_in(AccountRole::Operator, "busy", None).await;
    let ok = app
        .client
        .get(app.url("/auth/session"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("ok");
    assert_eq!(ok.status(), 200);
    // Move the session's absolute end into the past, as if eight hours had gone by.
    sqlx::query("UPDATE sessions SET expires_at = $1")
        .bind(phr_gateway::store::now_millis() - 1)
        .execute(app.gateway().state.db.write_pool())
        .await
        .expect("expire");
    let ended = app
        .client
        .get(app.url("/auth/session"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("ended");
    assert_problem(&ended, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

async fn forwarded_for_is_believed_only_from_trusted_proxies(engine: Engine) {
    for (trusted, expected) in [(false, "127.0.0.1"), (true, "203.0.113.7")] {
        let env = TestEnv::new(engine).await;
        let app = spawn_app_with(env, |c| {
            if trusted {
                c.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
            }
        })
        .await;
        app.gateway()
            .state
            .accounts
            .create(
                AccountRole::Patient,
                "op",
                "correct horse battery staple",
                Some("p-forwarded"),
            )
            .await
            .expect("account");
        let response = app
            .client
            .post(app.url("/auth/login"))
            .header("x-forwarded-for", "198.51.100.1, 203.0.113.7")
            .json(
                &serde_json::json!({"username": "op", "password": "correct horse battery staple"}),
            )
            .send()
            .await
            .expect("login");
        assert_eq!(response.status(), 200);
        let needle = format!("\"address\":\"{expected}\"");
        assert_eq!(leaves_matching(&app, &needle).await, 1, "trusted={trusted}");
        app.stop().await;
    }
}
