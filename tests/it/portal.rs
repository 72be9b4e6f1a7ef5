//! The patient portal in real headless Chromium.

use fantoccini::Locator;
use phr_gateway::audit::AccountRole;

use crate::browser::Browser;
use crate::helpers::{spawn_app, Engine};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_and_nothing_is_chosen_in_advance() {
    let app = spawn_app(Engine::Sqlite).await;
    app.gateway()
        .state
        .accounts
        .create(
            AccountRole::Patient,
            "hanako",
            "correct horse battery staple",
            Some("p-portal"),
        )
        .await
        .expect("account");
    let browser = Browser::start().await;
    let c = &browser.client;
    c.goto(&app.url("/portal")).await.expect("open portal");
    c.find(Locator::Css("input[name=username]"))
        .await
        .expect("form")
        .send_keys("hanako")
        .await
        .expect("type");
    c.find(Locator::Css("input[name=password]"))
        .await
        .expect("form")
        .send_keys("wrong password!!")
        .await
        .expect("type");
    c.find(Locator::Css("button[type=submit]"))
        .await
        .expect("button")
        .click()
        .await
        .expect("submit");
    let alert = c
        .find(Locator::Css("[role=alert]"))
        .await
        .unwrap_or_else(|_| panic!("no error shown"))
        .text()
        .await
        .expect("text");
    assert!(alert.contains("パスワードが違います"), "{alert}");

    c.find(Locator::Css("input[name=username]"))
        .await
        .expect("form")
        .send_keys("hanako")
        .await
        .expect("type");
    c.find(Locator::Css("input[name=password]"))
        .await
        .expect("form")
        .send_keys("correct horse battery staple")
        .await
        .expect("type");
    c.find(Locator::Css("button[type=submit]"))
        .await
        .expect("button")
        .click()
        .await
        .expect("submit");
    let heading = c
        .find(Locator::Css("h1"))
        .await
        .expect("h1")
        .text()
        .await
        .expect("text");
    assert!(heading.contains("データ取得の指示"), "{heading}");
    // Nothing pre-chosen: every category unticked, no source selected.
    let boxes = c
        .find_all(Locator::Css("input[name=category]"))
        .await
        .expect("boxes");
    assert_eq!(boxes.len(), phr_consent::DataCategory::ALL.len());
    for checkbox in boxes {
        assert!(
            !checkbox.is_selected().await.expect("state"),
            "a category is pre-ticked"
        );
    }
    let selected = c
        .execute(
            "return document.querySelector('select[name=source_id]').value",
            vec![],
        )
        .await
        .expect("select");
    assert_eq!(selected, serde_json::json!(""));
    browser.close().await;
    app.stop().await;
}
