//! A scripted patient at the simulator's login and consent pages, over HTTP as a browser
//! would, so tests and the gateway's end-to-end tests can link a patient without a person.
//! (The pages themselves are real HTML forms; a headless browser drives them the same way.)

use crate::source::Callback;

/// An HTTP client like the source's own (rustls with the ring provider).
pub fn browser_client() -> Result<reqwest::Client, String> {
    crate::http::client_builder(&[])
        .map_err(|e| e.to_string())?
        .build()
        .map_err(|e| e.to_string())
}

fn unescape_html(value: &str) -> String {
    value
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn attribute(tag: &str, name: &str) -> Option<String> {
    let marker = format!(" {name}=\"");
    let start = tag.find(&marker)? + marker.len();
    let length = tag[start..].find('"')?;
    Some(unescape_html(&tag[start..start + length]))
}

/// An `<input>` as (type, name, value).
pub type FormInput = (String, String, String);

/// The first form's action and its inputs.
pub fn read_form(html: &str) -> Result<(String, Vec<FormInput>), String> {
    let form_start = html.find("<form").ok_or("page has no form")?;
    let form_tag_end = form_start + html[form_start..].find('>').ok_or("form tag unclosed")?;
    let action =
        attribute(&html[form_start..=form_tag_end], "action").ok_or("form has no action")?;
    let mut inputs = Vec::new();
    let mut rest = &html[form_tag_end..];
    while let Some(start) = rest.find("<input") {
        let end = start + rest[start..].find('>').ok_or("input tag unclosed")?;
        let tag = &rest[start..=end];
        inputs.push((
            attribute(tag, "type").unwrap_or_default(),
            attribute(tag, "name").unwrap_or_default(),
            attribute(tag, "value").unwrap_or_default(),
        ));
        rest = &rest[end..];
    }
    Ok((action, inputs))
}

fn form_body(fields: &[(String, String)]) -> String {
    let mut serializer = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in fields {
        serializer.append_pair(name, value);
    }
    serializer.finish()
}

pub async fn post_form(
    client: &reqwest::Client,
    url: &str,
    fields: &[(String, String)],
) -> Result<reqwest::Response, String> {
    client
        .post(url)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(form_body(fields))
        .send()
        .await
        .map_err(|e| e.to_string())
}

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

/// The `Callback` carried by a redirect URL.
pub fn callback_from_redirect(location: &str) -> Result<Callback, String> {
    let location = url::Url::parse(location).map_err(|e| e.to_string())?;
    let parameter = |name: &str| {
        location
            .query_pairs()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    };
    Ok(Callback {
        code: parameter("code"),
        state: parameter("state"),
        error: parameter("error"),
        error_description: parameter("error_description"),
    })
}
