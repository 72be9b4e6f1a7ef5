//! A scripted person at the portal's screens, over HTTP as a browser would: reads the
//! card (number and PIN), then consents or declines. Tests and the gateway's end-to-end
//! tests link a person with it.

use crate::simulator_web::{browser_client, post_form, read_form};

/// What the person saw and where the portal sent the browser.
#[derive(Debug, Clone)]
pub struct PortalVisit {
    /// The consent screen's HTML (names the represented person for proxy access).
    pub consent_page: String,
    /// The redirect: the gateway's callback URL with `code` and `state`, or `error`.
    pub location: String,
}

fn hidden_fields(inputs: Vec<(String, String, String)>) -> Vec<(String, String)> {
    inputs
        .into_iter()
        .filter(|(kind, _, _)| kind == "hidden")
        .map(|(_, name, value)| (name, value))
        .collect()
}

/// Opens `authorize_url`, reads the card with `pin`, and consents (or declines).
pub async fn read_card_and_decide(
    authorize_url: &str,
    card_number: &str,
    pin: &str,
    consent: bool,
) -> Result<PortalVisit, String> {
    visit(authorize_url, card_number, pin, None, consent).await
}

/// As [`read_card_and_decide`], for a registered proxy who chooses at the portal, on the
/// consent screen, the person (by number) they act for.
pub async fn read_card_choose_and_decide(
    authorize_url: &str,
    card_number: &str,
    pin: &str,
    represented_number: usize,
    consent: bool,
) -> Result<PortalVisit, String> {
    visit(
        authorize_url,
        card_number,
        pin,
        Some(represented_number),
        consent,
    )
    .await
}

async fn visit(
    authorize_url: &str,
    card_number: &str,
    pin: &str,
    represented_number: Option<usize>,
    consent: bool,
) -> Result<PortalVisit, String> {
    let client = browser_client()?;
    let card_page = client
        .get(authorize_url)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if card_page.status() != 200 {
        return Err(format!("authorise page answered {}", card_page.status()));
    }
    let html = card_page.text().await.map_err(|e| e.to_string())?;
    let (action, inputs) = read_form(&html)?;
    let mut fields = hidden_fields(inputs);
    fields.push(("card_number".into(), card_number.into()));
    fields.push(("pin".into(), pin.into()));
    let consent_response = post_form(&client, &action, &fields).await?;
    if consent_response.status() != 200 {
        return Err(format!(
            "card reading answered {}",
            consent_response.status()
        ));
    }
    let consent_page = consent_response.text().await.map_err(|e| e.to_string())?;
    let (action, inputs) = read_form(&consent_page)?;
    let mut fields = hidden_fields(inputs);
    let decision = if consent { "consent" } else { "decline" };
    fields.push(("decision".into(), decision.into()));
    if let Some(number) = represented_number {
        fields.push(("represented_number".into(), number.to_string()));
    }
    let redirect = post_form(&client, &action, &fields).await?;
    if redirect.status() != 303 {
        return Err(format!("decision answered {}", redirect.status()));
    }
    let location = redirect
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| "no redirect location".to_string())?;
    Ok(PortalVisit {
        consent_page,
        location,
    })
}
