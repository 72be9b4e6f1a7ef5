//! The committed OpenAPI document must be what the code generates.

#[test]
fn committed_openapi_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = phr_gateway::http::openapi::document();
    assert!(
        committed == generated,
        "openapi/openapi.json is out of date; regenerate it with\n  cargo run -p phr-gateway -- openapi --out openapi/openapi.json"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).expect("valid JSON");
    assert!(doc["paths"]["/healthz"].is_object());
    assert!(doc["paths"]["/auth/login"]["post"].is_object());
}
