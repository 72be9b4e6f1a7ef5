//! The operator pages in real headless Chromium: password, then a TOTP code (a wrong one is
//! refused on the page), then the home page with an overdue break-glass use at the top,
//! reviewed through its form; a passkey registered there is then the second factor.

use fantoccini::Locator;
use phr_gateway::audit::AccountRole;

use crate::browser::Browser;
use crate::helpers::{spawn_app_with, totp_code, Engine, TestEnv, PASSWORD};
use crate::portal::{click, fill, text_of, wait_text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_signs_in_with_totp_and_reviews_a_break_glass_use() {
    let app = spawn_app_with(TestEnv::new(Engine::Sqlite).await, |config| {
        // Nothing listens on port 9: the identity provider is "down", so break-glass opens.
        config.break_glass.normal_login_probe_url = Some("http://127.0.0.1:9/health".into());
        config.break_glass.review_within_hours = 0;
    })
    .await;
    let state = &app.gateway().state;
    let operator = state
        .accounts
        .create(AccountRole::Operator, "op-browser", PASSWORD, None)
        .await
        .expect("operator");
    let secret = state
        .second_factors
        .provision_totp(&operator)
        .await
        .expect("totp")
        .secret;
    let (_, glass_secret) = state
        .break_glass
        .create_account("glass")
        .await
        .expect("glass");
    state
        .break_glass
        .start(
            "glass",
            &glass_secret,
            "identity provider outage, ticket INC-42",
            None,
        )
        .await
        .expect("break-glass use");

    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&app.url("/operator")).await.expect("open");
    fill(c, "input[name=username]", "op-browser").await;
    fill(c, "input[name=password]", PASSWORD).await;
    click(c, "button[type=submit]").await;

    // The password alone leads to the second-factor form, not the home page.
    fill(c, "input[name=code]", "000000").await;
    click(c, "form[action='/operator/second-factor'] button").await;
    wait_text(c, "p[role=alert]", "Wrong or already used code").await;
    assert!(c.find(Locator::Css("#break-glass-reviews")).await.is_err());

    fill(c, "input[name=code]", &totp_code(&secret)).await;
    click(c, "form[action='/operator/second-factor'] button").await;
    let reviews = wait_text(c, "#break-glass-reviews", "INC-42").await;
    assert!(reviews.contains("Overdue"), "{reviews}");
    assert!(
        reviews.contains("identity provider unreachable"),
        "{reviews}"
    );

    fill(
        c,
        "textarea[name=note]",
        "Checked the ticket; one unlock, as stated.",
    )
    .await;
    click(c, "#break-glass-reviews button[type=submit]").await;
    wait_text(c, "#break-glass-reviews", "None").await;
    let sessions = text_of(c, "#sessions").await;
    assert!(sessions.contains("op-browser"), "{sessions}");
    let uses = state.break_glass.uses().await.expect("uses");
    assert!(uses[0].reviewed_at.is_some());
    assert_eq!(
        uses[0].review_note.as_deref(),
        Some("Checked the ticket; one unlock, as stated.")
    );

    // A passkey registered on the home page (Chromium's virtual authenticator) then serves
    // as the second factor after the password.
    browser.add_virtual_authenticator().await;
    fill(c, "#passkey-name", "ops laptop").await;
    fill(c, "#passkey-password", PASSWORD).await;
    click(c, "#register-passkey").await;
    wait_text(c, "#passkey-message", "Passkey registered: ops laptop").await;
    c.delete_all_cookies().await.expect("sign out");
    c.goto(&app.url("/operator")).await.expect("open");
    fill(c, "input[name=username]", "op-browser").await;
    fill(c, "input[name=password]", PASSWORD).await;
    click(c, "button[type=submit]").await;
    click(c, "#use-passkey").await;
    wait_text(c, "#second-factors", "ops laptop").await;
    let methods: Vec<String> = state
        .accounts
        .live_sessions()
        .await
        .expect("sessions")
        .into_iter()
        .map(|s| s.method)
        .collect();
    assert!(
        methods.contains(&"password+passkey".to_string()),
        "{methods:?}"
    );
    browser.close().await;
    app.stop().await;
}
