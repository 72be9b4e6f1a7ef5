//! The consent pages in real headless Chromium, checked against the rules for screens free
//! of dark patterns (`consent_rules`): from the portal home, withdrawing takes two clicks
//! and ends on a signed receipt; the consent settings are one step from every portal page;
//! every page passes the portal checks; and the next decision under the consent is a denial.

use fantoccini::Locator;
use phr_consent::{DataCategory, Performer, PersonRef, Purpose, Recipient, Requested};
use phr_gateway::audit::{AccountRole, Agent};
use phr_gateway::consents::ConsentOutcome;

use crate::browser::Browser;
use crate::consent_rules::{
    assert_at_most, check_consent_screen, check_portal_page, links_reaching, ClickCounter,
};
use crate::helpers::{grant_consent, spawn_app, Engine, TestApp};

const PASSWORD: &str = "correct horse battery staple";

async fn granted(app: &TestApp) -> String {
    let performer = Performer::patient(&PersonRef::new("p-portal"));
    let categories = [DataCategory::Observations];
    grant_consent(
        app,
        "p-portal",
        performer,
        "demo-phr-app",
        &["PATRQT"],
        &categories,
        90,
    )
    .await
    .0
}

async fn assert_rules(client: &fantoccini::Client, page: &str) {
    let violations = check_portal_page(client).await;
    assert!(violations.is_empty(), "{page}: {violations:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawing_from_the_portal_takes_two_clicks_and_keeps_the_rules() {
    let app = spawn_app(Engine::Sqlite).await;
    app.gateway()
        .state
        .accounts
        .create(AccountRole::Patient, "hanako", PASSWORD, Some("p-portal"))
        .await
        .expect("account");
    let id = granted(&app).await;
    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&app.url("/portal")).await.expect("portal");
    c.find(Locator::Css("input[name=username]"))
        .await
        .expect("username")
        .send_keys("hanako")
        .await
        .expect("type");
    c.find(Locator::Css("input[name=password]"))
        .await
        .expect("password")
        .send_keys(PASSWORD)
        .await
        .expect("type");
    c.find(Locator::Css("button[type=submit]"))
        .await
        .expect("sign in")
        .click()
        .await
        .expect("click");
    c.wait()
        .for_element(Locator::Css("select[name=source_id]"))
        .await
        .expect("portal home");
    assert_rules(c, "portal home").await;
    assert!(
        links_reaching(c, "/portal/consents").await,
        "home → consents"
    );

    // From the signed-in home to done.
    let clicks = ClickCounter::new(c);
    clicks
        .click(Locator::Css("#nav-consents"))
        .await
        .expect("to consents");
    let row = c
        .wait()
        .for_element(Locator::Css(&format!("tr[data-consent='{id}']")))
        .await
        .expect("the consent is listed");
    assert!(row.text().await.expect("text").contains("デモPHRアプリ"));
    assert_rules(c, "consents").await;
    assert!(
        links_reaching(c, "/portal/consents").await,
        "consents → consents"
    );
    clicks
        .click(Locator::Css(&format!(
            "tr[data-consent='{id}'] button.withdraw"
        )))
        .await
        .expect("withdraw");
    let done = c
        .wait()
        .for_element(Locator::Css("#withdrawn"))
        .await
        .expect("done");
    assert!(done.text().await.expect("text").contains("撤回しました"));
    let receipt = c
        .find(Locator::Css("#receipt"))
        .await
        .expect("receipt")
        .text()
        .await
        .expect("text");
    assert_eq!(receipt.split('.').count(), 3, "a compact JWS: {receipt}");
    assert_rules(c, "withdrawn").await;
    assert!(
        links_reaching(c, "/portal/consents").await,
        "done → consents"
    );
    // Granting on the consent screen takes at least one purpose, one category and the
    // button: three clicks. Withdrawing took two.
    assert_at_most(clicks.take(), 2);

    // The very next decision under it is a denial.
    let state = &app.gateway().state;
    let purpose = state
        .consents
        .config()
        .purpose("PATRQT")
        .expect("purpose")
        .clone();
    let outcome = state
        .consents
        .decide(
            &Agent::system(),
            "p-portal",
            &Recipient::client("demo-phr-app"),
            &Purpose::new(&purpose.system, &purpose.code),
            Requested::Category(DataCategory::Observations),
        )
        .await
        .expect("decide");
    assert!(
        matches!(
            outcome,
            ConsentOutcome::Deny {
                reason: "withdrawn",
                ..
            }
        ),
        "{outcome:?}"
    );

    // The list now says so, and offers no second withdrawal.
    c.goto(&app.url("/portal/consents"))
        .await
        .expect("consents");
    let status = c
        .wait()
        .for_element(Locator::Css(&format!("tr[data-consent='{id}'] .status")))
        .await
        .expect("status")
        .text()
        .await
        .expect("text");
    assert!(status.contains("撤回済み"), "{status}");
    assert!(c
        .find(Locator::Css(&format!(
            "tr[data-consent='{id}'] button.withdraw"
        )))
        .await
        .is_err());
    c.goto(&app.url("/consent/notice")).await.expect("notice");
    assert_rules(c, "notice").await;
    browser.close().await;
    app.stop().await;
}

/// The whole demo in the browser: the demo app sends the patient to the consent screen
/// (which keeps every rule), the patient grants two of three purposes, the app reads, the
/// patient withdraws from the portal in fewer clicks than granting took, and the app's next
/// call is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_app_reads_until_the_patient_withdraws() {
    let app = spawn_app(Engine::Sqlite).await;
    let credentials = phr_gateway::demo::seed(&app.gateway().state)
        .await
        .expect("demo accounts");
    // The demo operator signs in as printed: the password, then a code for the TOTP secret.
    let login: serde_json::Value = app
        .client
        .post(app.url("/auth/login"))
        .json(&serde_json::json!({"username": credentials.operator.0, "password": credentials.operator.1}))
        .send()
        .await
        .expect("operator login")
        .json()
        .await
        .expect("json");
    assert_eq!(login["stage"], "second-factor");
    let operator = login["token"].as_str().expect("token");
    let proved = app
        .client
        .post(app.url("/auth/second-factor/totp"))
        .bearer_auth(operator)
        .json(&serde_json::json!({"code": crate::helpers::totp_code(&credentials.operator_totp)}))
        .send()
        .await
        .expect("second factor");
    assert_eq!(proved.status(), 200);
    let phr_app = phr_gateway::demo::start_phr_app(app.gateway())
        .await
        .expect("demo app");
    let browser = Browser::start().await;
    let c = &browser.client;

    c.goto(&phr_app.base_url).await.expect("app");
    c.wait()
        .for_element(Locator::Css("#connect"))
        .await
        .expect("connect link")
        .click()
        .await
        .expect("connect");
    // The gateway asks the patient to sign in first, then shows the consent screen.
    c.wait()
        .for_element(Locator::Css("input[name=username]"))
        .await
        .expect("sign-in")
        .send_keys(&credentials.patient.0)
        .await
        .expect("type");
    c.find(Locator::Css("input[name=password]"))
        .await
        .expect("password")
        .send_keys(&credentials.patient.1)
        .await
        .expect("type");
    c.find(Locator::Css("button[type=submit]"))
        .await
        .expect("submit")
        .click()
        .await
        .expect("sign in");
    c.wait()
        .for_element(Locator::Css("button.choice.accept"))
        .await
        .expect("consent screen");
    let violations = check_consent_screen(c).await;
    assert!(violations.is_empty(), "consent screen: {violations:?}");

    // Granting: two of the three purposes, one kind of data, agree.
    let clicks = ClickCounter::new(c);
    for css in [
        "input[name=purpose][value=PATRQT]",
        "input[name=purpose][value=TREAT]",
        "input[name=category][value=demographics]",
        "button.choice.accept",
    ] {
        clicks.click(Locator::Css(css)).await.expect(css);
    }
    let granting = clicks.take();
    let status = c
        .wait()
        .for_element(Locator::Css("#read-status"))
        .await
        .expect("the app read")
        .text()
        .await
        .expect("text");
    assert!(status.contains("200"), "{status}");
    let body = c
        .find(Locator::Css("#read-body"))
        .await
        .expect("body")
        .text()
        .await
        .expect("text");
    assert!(body.contains("デモ 花子"), "{body}");

    // The provider's backend exports in bulk: only what the patient agreed to (demographics).
    c.find(Locator::Css("#bulk"))
        .await
        .expect("bulk link")
        .click()
        .await
        .expect("bulk export");
    let rows = bulk_rows(c).await;
    assert!(
        rows.iter().any(|row| row.contains("Patient")),
        "the Patient is exported: {rows:?}"
    );
    assert!(
        rows.iter().all(|row| !row.contains("Observation")),
        "observations were not agreed to: {rows:?}"
    );

    // Withdrawing from the portal home: fewer clicks than granting, at most three.
    c.goto(&app.url("/portal")).await.expect("portal");
    c.wait()
        .for_element(Locator::Css("#nav-consents"))
        .await
        .expect("portal home");
    clicks
        .click(Locator::Css("#nav-consents"))
        .await
        .expect("consents");
    clicks
        .click(Locator::Css("button.choice.withdraw"))
        .await
        .expect("withdraw");
    c.wait()
        .for_element(Locator::Css("#withdrawn"))
        .await
        .expect("withdrawn");
    let withdrawing = clicks.take();
    assert_at_most(withdrawing, granting.min(3));

    // The app's next call is refused.
    c.goto(&format!("{}/read", phr_app.base_url))
        .await
        .expect("read again");
    let status = c
        .wait()
        .for_element(Locator::Css("#read-status"))
        .await
        .expect("status")
        .text()
        .await
        .expect("text");
    assert!(status.contains("401"), "{status}");
    // And the next bulk export holds nothing of the patient.
    c.goto(&phr_app.base_url).await.expect("app");
    c.wait()
        .for_element(Locator::Css("#bulk"))
        .await
        .expect("bulk link")
        .click()
        .await
        .expect("bulk export");
    let mut rows = bulk_rows(c).await;
    for _ in 0..50 {
        if rows.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        rows = bulk_rows(c).await;
    }
    assert!(rows.is_empty(), "nothing after the withdrawal: {rows:?}");
    browser.close().await;
    phr_app.shutdown().await;
    app.stop().await;
}

/// The demo app's bulk-export result rows, once the table is there.
async fn bulk_rows(c: &fantoccini::Client) -> Vec<String> {
    c.wait()
        .for_element(Locator::Css("#bulk-result"))
        .await
        .expect("bulk result");
    let mut rows = Vec::new();
    for row in c
        .find_all(Locator::Css("#bulk-result tbody tr"))
        .await
        .expect("rows")
    {
        rows.push(row.text().await.unwrap_or_default());
    }
    rows
}

/// Every portal and consent page a patient can reach passes the portal checks, and each
/// signed-in page links to the consent settings (R10): sign-in, home, consents (with a
/// consent ending soon, one waiting for the patient's confirmation, and the switch to act
/// for a child), acting for the child, keeping a consent, withdrawing, and the notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_portal_and_consent_page_keeps_the_rules() {
    let app = spawn_app(Engine::Sqlite).await;
    let state = &app.gateway().state;
    state
        .accounts
        .create(AccountRole::Patient, "hanako", PASSWORD, Some("p-portal"))
        .await
        .expect("account");
    let jst = time::UtcOffset::from_hms(9, 0, 0).expect("offset");
    let born = time::OffsetDateTime::now_utc().to_offset(jst).date() - time::Duration::days(3650);
    state
        .representations
        .register(
            &Agent::system(),
            "p-portal",
            "p-kid",
            phr_consent::Representation::ParentOfDependent,
            Some(&born.to_string()),
        )
        .await
        .expect("representation");
    let ending = granted(&app).await;
    let waiting = granted(&app).await;
    // One ends within the reminder window; one was given by a representative whose
    // representation has ended (the patient is asked to keep or withdraw it).
    sqlx::query("UPDATE consents SET confirmation_requested_at = 1 WHERE id = $1")
        .bind(&waiting)
        .execute(state.db.write_pool())
        .await
        .expect("waiting");
    let ten_days = time::OffsetDateTime::now_utc() + time::Duration::days(10);
    let body: String =
        sqlx::query_scalar("SELECT body FROM consent_versions WHERE consent_id = $1")
            .bind(&ending)
            .fetch_one(state.db.read_pool())
            .await
            .expect("body");
    let mut body: serde_json::Value = serde_json::from_str(&body).expect("json");
    body["provision"]["period"]["end"] = serde_json::json!(ten_days
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format"));
    sqlx::query("UPDATE consent_versions SET body = $1 WHERE consent_id = $2")
        .bind(body.to_string())
        .bind(&ending)
        .execute(state.db.write_pool())
        .await
        .expect("ending");

    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&app.url("/portal")).await.expect("portal");
    c.wait()
        .for_element(Locator::Css("input[name=username]"))
        .await
        .expect("sign-in page");
    assert_rules(c, "sign-in").await;
    c.find(Locator::Css("input[name=username]"))
        .await
        .expect("username")
        .send_keys("hanako")
        .await
        .expect("type");
    c.find(Locator::Css("input[name=password]"))
        .await
        .expect("password")
        .send_keys(PASSWORD)
        .await
        .expect("type");
    c.find(Locator::Css("button[type=submit]"))
        .await
        .expect("submit")
        .click()
        .await
        .expect("sign in");
    c.wait()
        .for_element(Locator::Css("#nav-consents"))
        .await
        .expect("home");

    let reaches = |page: &'static str| async move {
        assert_rules(c, page).await;
        assert!(
            links_reaching(c, "/portal/consents").await,
            "{page} → consents"
        );
    };
    reaches("home").await;
    c.goto(&app.url("/portal/access-log"))
        .await
        .expect("access log");
    c.wait()
        .for_element(Locator::Css("#no-accesses"))
        .await
        .expect("the access log, empty");
    reaches("access log").await;
    c.goto(&app.url("/portal/consents"))
        .await
        .expect("consents");
    c.wait()
        .for_element(Locator::Css("#to-confirm"))
        .await
        .expect("waiting for confirmation");
    c.find(Locator::Css("#ending-soon"))
        .await
        .expect("ending soon is shown");
    reaches("consents").await;

    // Acting for the child: the child's (empty) consents, and a banner saying so.
    c.find(Locator::Css("button[data-acting-for='p-kid']"))
        .await
        .expect("the child is offered")
        .click()
        .await
        .expect("switch");
    c.wait()
        .for_element(Locator::Css("#acting-for"))
        .await
        .expect("acting for the child");
    c.find(Locator::Css("#no-consents"))
        .await
        .expect("the child's consents");
    reaches("acting for a child").await;
    c.find(Locator::Css("#acting-switch form button"))
        .await
        .expect("back to myself")
        .click()
        .await
        .expect("switch back");
    c.wait()
        .for_element(Locator::Css("#to-confirm"))
        .await
        .expect("own consents again");

    // Keeping the consent that waited for confirmation.
    c.wait()
        .for_element(Locator::Css(&format!(
            "[data-confirm='{waiting}'] button.accept"
        )))
        .await
        .expect("keep")
        .click()
        .await
        .expect("keep");
    c.wait()
        .for_element(Locator::Css("#kept"))
        .await
        .expect("kept");
    reaches("kept").await;

    // Narrowing the one ending soon: nothing pre-ticked, the same two controls.
    c.goto(&app.url(&format!("/portal/consents/{ending}/change")))
        .await
        .expect("change");
    c.wait()
        .for_element(Locator::Css("button.choice.accept"))
        .await
        .expect("change form");
    reaches("change").await;
    for css in [
        "input[name=purpose][value=PATRQT]",
        "input[name=category][value=observations]",
        "button.choice.accept",
    ] {
        c.find(Locator::Css(css))
            .await
            .expect(css)
            .click()
            .await
            .expect(css);
    }
    c.wait()
        .for_element(Locator::Css("#changed"))
        .await
        .expect("changed");
    reaches("changed").await;

    // Withdrawing the one ending soon.
    c.goto(&app.url("/portal/consents"))
        .await
        .expect("consents");
    c.wait()
        .for_element(Locator::Css(&format!(
            "tr[data-consent='{ending}'] button.withdraw"
        )))
        .await
        .expect("withdraw")
        .click()
        .await
        .expect("withdraw");
    c.wait()
        .for_element(Locator::Css("#withdrawn"))
        .await
        .expect("withdrawn");
    reaches("withdrawn").await;
    c.goto(&app.url("/consent/notice")).await.expect("notice");
    assert_rules(c, "notice").await;
    browser.close().await;
    app.stop().await;
}
