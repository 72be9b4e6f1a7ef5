//! Passkeys and the second factor in the portal, in real headless Chromium with a virtual
//! authenticator: register a passkey (recovery codes shown once), sign in with it alone,
//! and after a password the portal asks for the second factor, which the passkey gives.

use fantoccini::Locator;
use phr_gateway::audit::AccountRole;

use crate::browser::Browser;
use crate::helpers::{spawn_app, totp_code, Engine, PASSWORD};
use crate::portal::{click, fill, text_of, wait_text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passkey_is_registered_and_signs_the_patient_in() {
    let app = spawn_app(Engine::Sqlite).await;
    app.gateway()
        .state
        .accounts
        .create(AccountRole::Patient, "hanako", PASSWORD, Some("p-passkey"))
        .await
        .expect("account");
    let browser = Browser::start().await;
    browser.add_virtual_authenticator().await;
    let c = &browser.client;

    c.goto(&app.url("/portal")).await.expect("portal");
    fill(c, "input[name=username]", "hanako").await;
    fill(c, "input[name=password]", PASSWORD).await;
    click(c, "form[action='/portal/login'] button[type=submit]").await;
    click(c, "#nav-security").await;
    fill(c, "#passkey-name", "this laptop").await;
    fill(c, "#passkey-password", PASSWORD).await;
    click(c, "#register-passkey").await;
    wait_text(c, "#passkey-message", "Passkey registered: this laptop").await;
    let codes = text_of(c, "#recovery-codes").await;
    assert_eq!(codes.lines().count(), 10, "{codes}");

    // Signed out, the passkey alone signs in.
    c.delete_all_cookies().await.expect("sign out");
    c.goto(&app.url("/portal")).await.expect("portal");
    fill(c, "input[name=username]", "hanako").await;
    click(c, "#passkey-sign-in").await;
    wait_text(c, "nav", "Sign-in security").await;

    // With the password, the portal asks for the second factor; the passkey gives it.
    c.delete_all_cookies().await.expect("sign out");
    c.goto(&app.url("/portal")).await.expect("portal");
    fill(c, "input[name=username]", "hanako").await;
    fill(c, "input[name=password]", PASSWORD).await;
    click(c, "form[action='/portal/login'] button[type=submit]").await;
    click(c, "#use-passkey").await;
    wait_text(c, "nav", "Sign-in security").await;
    let methods = app
        .gateway()
        .state
        .accounts
        .live_sessions()
        .await
        .expect("sessions")
        .into_iter()
        .map(|s| s.method)
        .collect::<Vec<_>>();
    assert!(methods.contains(&"passkey".to_string()), "{methods:?}");
    assert!(
        methods.contains(&"password+passkey".to_string()),
        "{methods:?}"
    );
    browser.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticator_app_is_set_up_in_the_portal_and_asked_for() {
    let app = spawn_app(Engine::Sqlite).await;
    app.gateway()
        .state
        .accounts
        .create(AccountRole::Patient, "taro", PASSWORD, Some("p-totp"))
        .await
        .expect("account");
    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&app.url("/portal")).await.expect("portal");
    fill(c, "input[name=username]", "taro").await;
    fill(c, "input[name=password]", PASSWORD).await;
    click(c, "form[action='/portal/login'] button[type=submit]").await;
    click(c, "#nav-security").await;
    fill(
        c,
        "form[action='/portal/security/totp'] input[name=password]",
        PASSWORD,
    )
    .await;
    click(c, "form[action='/portal/security/totp'] button").await;
    let secret = text_of(c, "#totp-secret").await;
    fill(c, "input[name=code]", &totp_code(&secret)).await;
    click(c, "form[action='/portal/security/totp/confirm'] button").await;
    wait_text(c, "#totp-done", "enter a code after your password").await;
    assert_eq!(text_of(c, "#recovery-codes").await.lines().count(), 10);

    c.delete_all_cookies().await.expect("sign out");
    c.goto(&app.url("/portal")).await.expect("portal");
    fill(c, "input[name=username]", "taro").await;
    fill(c, "input[name=password]", PASSWORD).await;
    click(c, "form[action='/portal/login'] button[type=submit]").await;
    // Not in yet: the second-factor form, and the portal home is not shown.
    fill(c, "input[name=code]", "000000").await;
    click(c, "form[action='/portal/second-factor'] button").await;
    wait_text(c, "p[role=alert]", "Wrong or already used code").await;
    assert!(c.find(Locator::Css("#nav-security")).await.is_err());
    let next_step = {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        phr_gateway::mfa::totp::code_at_base32(&secret, now + 30).expect("code")
    };
    fill(c, "input[name=code]", &next_step).await;
    click(c, "form[action='/portal/second-factor'] button").await;
    wait_text(c, "nav", "Sign-in security").await;
    browser.close().await;
    app.stop().await;
}
