//! A scripted patient at the simulator's login and consent pages, over HTTP as a browser
//! would, so tests and the gateway's end-to-end tests can link a patient without a person.
//! (The pages themselves are real HTML forms; a headless browser drives them the same way.)

pub use crate::simulator_web::{
    browser_client, callback_from_redirect, post_form, read_form, FormInput,
};

/// Signs in at the simulator's authorise page and approves (or denies), keeping the scopes
/// `keep_scope` accepts. Returns where the hospital redirects the browser (the gateway's
/// callback URL with `code` and `state`, or `error`).
pub async fn sign_in_and_decide(
    authorize_url: &str,
    username: &str,
    password: &str,
    keep_scope: impl Fn(&str) -> bool,
    approve: bool,
) -> Result<String, String> {
    let client = browser_client()?;
    let login_page = client
        .get(authorize_url)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if login_page.status() != 200 {
        return Err(format!("authorise page answered {}", login_page.status()));
    }
    let html = login_page.text().await.map_err(|e| e.to_string())?;
    let (action, inputs) = read_form(&html)?;
    let mut fields: Vec<(String, String)> = inputs
        .into_iter()
        .filter(|(kind, _, _)| kind == "hidden")
        .map(|(_, name, value)| (name, value))
        .collect();
    fields.push(("username".into(), username.into()));
    fields.push(("password".into(), password.into()));
    let consent = post_form(&client, &action, &fields).await?;
    if consent.status() != 200 {
        return Err(format!("login answered {}", consent.status()));
    }
    let html = consent.text().await.map_err(|e| e.to_string())?;
    let (action, inputs) = read_form(&html)?;
    let mut fields: Vec<(String, String)> = inputs
        .into_iter()
        .filter(|(kind, name, value)| {
            kind == "hidden" || (kind == "checkbox" && name == "scope" && keep_scope(value))
        })
        .map(|(_, name, value)| (name, value))
        .collect();
    let decision = if approve { "approve" } else { "deny" };
    fields.push(("decision".into(), decision.into()));
    let redirect = post_form(&client, &action, &fields).await?;
    if redirect.status() != 303 {
        return Err(format!("decision answered {}", redirect.status()));
    }
    redirect
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| "no redirect location".to_string())
}
