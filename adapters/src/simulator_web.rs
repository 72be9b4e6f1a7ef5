//! HTTP plumbing both simulators share: form decoding and OAuth-style JSON answers on the
//! server side, and, for the scripted patients, a browser-like client that reads a page's
//! form and posts it back.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::source::Callback;

/// The pairs of a form body or query string, in order.
pub(crate) fn form_pairs(raw: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.as_bytes())
        .into_owned()
        .collect()
}

/// The first value of `name`.
pub(crate) fn first<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// A JSON answer that is never cached.
pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // Token responses must not be cached (RFC 6749 §5.1).
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An RFC 6749 error answer.
pub(crate) fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// 303 to `redirect_uri` with `parameters` added to its query (the authorisation answer).
/// The redirect URI was checked when the request came in; a bad one here is a plain 400.
pub(crate) fn redirect_to(redirect_uri: &str, parameters: &[(&str, &str)]) -> Response {
    let Ok(mut target) = url::Url::parse(redirect_uri) else {
        return (StatusCode::BAD_REQUEST, "redirect_uri is not a URL").into_response();
    };
    {
        let mut query = target.query_pairs_mut();
        for (name, value) in parameters {
            query.append_pair(name, value);
        }
    }
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(location) = HeaderValue::from_str(target.as_str()) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

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

/// A simulator's router served on its own task until `shutdown` (or drop).
pub(crate) struct BackgroundServer {
    stop_sender: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl BackgroundServer {
    pub(crate) fn serve(
        listener: tokio::net::TcpListener,
        app: axum::Router,
        name: &'static str,
    ) -> Self {
        let (stop_sender, stop_receiver) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let stopped = async {
                let _ = stop_receiver.await;
            };
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::error!(%error, simulator = name, "simulator stopped with an error");
            }
        });
        BackgroundServer {
            stop_sender: Some(stop_sender),
            server,
        }
    }

    /// Stops accepting, lets requests in flight finish (at most 5 s), then returns.
    pub(crate) async fn shutdown(mut self) {
        if let Some(sender) = self.stop_sender.take() {
            let _ = sender.send(());
        }
        let server = &mut self.server;
        if tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .is_err()
        {
            self.server.abort();
        }
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        // A simulator dropped without shutdown must not keep serving in the background.
        if self.stop_sender.is_some() {
            self.server.abort();
        }
    }
}
