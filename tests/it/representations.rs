//! Acting for someone else, end to end on both engines: an operator registers a parent for
//! a child and a registered proxy; the parent acts for the child (their consent records say
//! who acted); at the age of majority the parent can no longer act and the child is asked
//! to keep or withdraw each consent the parent gave.

use phr_consent::{DataCategory, Performer, PersonRef, Representation};
use phr_gateway::audit::AccountRole;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::both_engines;
use crate::helpers::{
    count, get_json, grant_consent, leaves_containing, spawn_app, Engine, TestApp,
};

both_engines!(
    a_parent_acts_for_a_child_until_majority,
    bad_representations_are_refused,
    changing_a_consent_for_someone_else_needs_a_step_up,
);

/// A birth date `years` ago plus `plus_days`, by the calendar in Japan (as the gateway counts).
fn years_ago(years: i64, plus_days: i64) -> String {
    let jst = time::UtcOffset::from_hms(9, 0, 0).expect("offset");
    let today = time::OffsetDateTime::now_utc().to_offset(jst).date();
    let born = today
        .replace_year(today.year() - years as i32)
        .unwrap_or(today)
        + time::Duration::days(plus_days);
    born.to_string()
}

async fn register(app: &TestApp, operator: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/operator/representations"))
        .bearer_auth(operator)
        .json(&body)
        .send()
        .await
        .expect("register")
}

/// The parent grants, for the child, on the consent screen.
async fn grant_by_parent(app: &TestApp) -> String {
    let performer = Performer {
        person: PersonRef::new("p-hanako"),
        representation: Representation::ParentOfDependent,
    };
    let categories = [DataCategory::Immunizations];
    grant_consent(
        app,
        "p-child",
        performer,
        "school-app",
        &["PATRQT"],
        &categories,
        200,
    )
    .await
    .0
}

async fn a_parent_acts_for_a_child_until_majority(engine: Engine) {
    let app = spawn_app(engine).await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    let parent = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    // Turns 18 tomorrow: still a dependent today.
    let registered = register(
        &app,
        &operator,
        json!({"representative_patient_id": "p-hanako", "represented_patient_id": "p-child",
               "kind": "parent-of-dependent", "represented_birth_date": years_ago(18, 1)}),
    )
    .await;
    assert_eq!(registered.status(), StatusCode::CREATED);
    let listed = get_json(&app, "/api/representations", &parent).await;
    assert!(leaves_containing(&app, "whom this patient may act for").await >= 1);
    assert_eq!(listed[0]["represented_patient_id"], "p-child", "{listed}");

    // Acting for the child: the child's consents, and the records say who acted.
    let id = grant_by_parent(&app).await;
    let as_parent = |path: &str| {
        app.client
            .get(app.url(path))
            .bearer_auth(&parent)
            .header("acting-for", "p-child")
    };
    let childs: Value = as_parent("/api/consents")
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(childs.as_array().map(Vec::len), Some(1));
    let own = get_json(&app, "/api/consents", &parent).await;
    assert_eq!(
        own.as_array().map(Vec::len),
        Some(0),
        "the parent's own list is separate"
    );
    let detail: Value = as_parent(&format!("/api/consents/{id}"))
        .send()
        .await
        .expect("detail")
        .json()
        .await
        .expect("json");
    assert_eq!(detail["fhir"]["patient"]["reference"], "Patient/p-child");
    assert!(
        detail["fhir"]["performer"].to_string().contains("p-hanako"),
        "{}",
        detail["fhir"]
    );

    // The portal's choice travels in a cookie; browsers on HTTP/2 send each cookie in its
    // own header field, and every field counts.
    let split: Value = app
        .client
        .get(app.url("/api/consents"))
        .header("cookie", format!("__Host-phr_session={parent}"))
        .header("cookie", "__Host-phr_acting_for=p-child")
        .send()
        .await
        .expect("split cookies")
        .json()
        .await
        .expect("json");
    assert_eq!(split.as_array().map(Vec::len), Some(1), "{split}");

    // Someone the parent does not represent.
    let stranger = app
        .client
        .get(app.url("/api/consents"))
        .bearer_auth(&parent)
        .header("acting-for", "p-someone")
        .send()
        .await
        .expect("stranger");
    assert_eq!(stranger.status(), StatusCode::FORBIDDEN);

    // The child comes of age (the birth date moves a day back, as the calendar would).
    sqlx::query("UPDATE representations SET represented_birth_date = $1")
        .bind(years_ago(18, 0))
        .execute(app.gateway().state.db.write_pool())
        .await
        .expect("birthday");
    let after = as_parent("/api/consents").send().await.expect("list");
    assert_eq!(
        after.status(),
        StatusCode::FORBIDDEN,
        "representation ended"
    );
    assert_eq!(
        count(
            &app,
            "SELECT COUNT(*) FROM representations WHERE status = 'ended'"
        )
        .await,
        1
    );

    // The child, now acting for themself, is asked to keep or withdraw it.
    let child = app
        .sign_in(AccountRole::Patient, "child", Some("p-child"))
        .await;
    let listed = get_json(&app, "/api/consents", &child).await;
    assert_eq!(listed[0]["needs_confirmation"], true, "{listed}");
    let kept = app
        .client
        .post(app.url(&format!("/api/consents/{id}/confirm")))
        .bearer_auth(&child)
        .send()
        .await
        .expect("confirm");
    assert_eq!(kept.status(), StatusCode::OK);
    let kept: Value = kept.json().await.expect("json");
    assert_eq!(kept["consent"]["needs_confirmation"], false);
    assert_eq!(kept["consent"]["version"], 2);
    assert_eq!(kept["consent"]["status"], "active");
    // Confirming twice is a conflict.
    let again = app
        .client
        .post(app.url(&format!("/api/consents/{id}/confirm")))
        .bearer_auth(&child)
        .send()
        .await
        .expect("confirm again");
    assert_eq!(again.status(), StatusCode::CONFLICT);

    // A registered proxy does not end by age.
    let registered = register(
        &app,
        &operator,
        json!({"representative_patient_id": "p-hanako", "represented_patient_id": "p-grandma",
               "kind": "registered-proxy"}),
    )
    .await;
    assert_eq!(registered.status(), StatusCode::CREATED);
    let proxy = app
        .client
        .get(app.url("/api/consents"))
        .bearer_auth(&parent)
        .header("acting-for", "p-grandma")
        .send()
        .await
        .expect("proxy");
    assert_eq!(proxy.status(), StatusCode::OK);
}

async fn bad_representations_are_refused(engine: Engine) {
    let app = spawn_app(engine).await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    let patient = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    for body in [
        json!({"representative_patient_id": "p-hanako", "represented_patient_id": "p-child", "kind": "friend"}),
        json!({"representative_patient_id": "p-hanako", "represented_patient_id": "p-child", "kind": "parent-of-dependent"}),
        json!({"representative_patient_id": "p-hanako", "represented_patient_id": "p-child", "kind": "parent-of-dependent", "represented_birth_date": "yesterday"}),
        json!({"representative_patient_id": "p-hanako", "represented_patient_id": "p-adult", "kind": "parent-of-dependent", "represented_birth_date": years_ago(30, 0)}),
        json!({"representative_patient_id": "p-hanako", "represented_patient_id": "p-hanako", "kind": "registered-proxy"}),
    ] {
        let response = register(&app, &operator, body.clone()).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    // The portal's switch refuses someone the patient does not represent.
    let switched = app
        .client
        .post(app.url("/portal/acting-for"))
        .bearer_auth(&patient)
        .header("origin", app.base.clone())
        .form(&[("patient_id", "p-child")])
        .send()
        .await
        .expect("switch");
    assert_eq!(switched.status(), StatusCode::FORBIDDEN);

    // Only operators register.
    let response = register(
        &app,
        &patient,
        json!({"representative_patient_id": "p-hanako", "represented_patient_id": "p-child", "kind": "registered-proxy"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(count(&app, "SELECT COUNT(*) FROM representations").await, 0);
}

/// A representative widening or changing a consent for someone else proves themself again;
/// withdrawing for them stays one action.
async fn changing_a_consent_for_someone_else_needs_a_step_up(engine: Engine) {
    let app = spawn_app(engine).await;
    let operator = app.sign_in(AccountRole::Operator, "op", None).await;
    let parent = app
        .sign_in(AccountRole::Patient, "hanako", Some("p-hanako"))
        .await;
    let registered = register(
        &app,
        &operator,
        json!({"representative_patient_id": "p-hanako", "represented_patient_id": "p-child",
               "kind": "parent-of-dependent", "represented_birth_date": years_ago(10, 0)}),
    )
    .await;
    assert_eq!(registered.status(), StatusCode::CREATED);
    let id = grant_by_parent(&app).await;
    let ends_on = years_ago(-1, -30);
    let change = |body: Value| {
        app.client
            .post(app.url(&format!("/api/consents/{id}/change")))
            .bearer_auth(&parent)
            .header("acting-for", "p-child")
            .json(&body)
            .send()
    };
    let terms =
        json!({"purposes": ["PATRQT"], "categories": ["immunizations"], "ends_on": ends_on});
    let refused = change(terms.clone()).await.expect("change");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let mut wrong = terms.clone();
    wrong["password"] = json!("not my password");
    assert_eq!(
        change(wrong).await.expect("change").status(),
        StatusCode::UNAUTHORIZED
    );
    let mut confirmed = terms;
    confirmed["password"] = json!(crate::helpers::PASSWORD);
    let changed = change(confirmed).await.expect("change");
    assert_eq!(
        changed.status(),
        StatusCode::OK,
        "{:?}",
        changed.text().await
    );
    assert!(
        leaves_containing(
            &app,
            "step-up re-authentication for changing a consent for someone else"
        )
        .await
            >= 1
    );

    let withdrawn = app
        .client
        .post(app.url(&format!("/api/consents/{id}/withdraw")))
        .bearer_auth(&parent)
        .header("acting-for", "p-child")
        .send()
        .await
        .expect("withdraw");
    assert_eq!(withdrawn.status(), StatusCode::OK);
    app.stop().await;
}
