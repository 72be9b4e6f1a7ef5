//! The portal's authorisation side: the card-reading and consent screens, `/token`
//! (authorization_code + PKCE S256, refresh_token) and `/revoke`, both authenticated with
//! `private_key_jwt`, and the linkages they create.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};
use serde_json::json;
use time::OffsetDateTime;

use super::data::{format_instant, PortalPerson};
use super::SimulatorState;
use crate::oauth::{self, pkce_matches, random_url_token};
use crate::self_info::{Category, Linkage};
use crate::simulator_web::{first, form_pairs, json_response, oauth_error, redirect_to};

/// Between the card reading and the consent buttons.
const TICKET_LIFETIME: Duration = Duration::from_secs(600);
const CODE_LIFETIME: Duration = Duration::from_secs(60);

const PAGE_STYLE: &str = "body{font-family:sans-serif;max-width:34rem;margin:2rem auto;padding:0 1rem}\
label{display:block;margin-top:1rem}input[type=text],input[type=password]{width:100%;padding:.4rem}\
.error{color:#a00}.proxy{border:1px solid #333;padding:.5rem}.choices{display:flex;gap:1rem;margin-top:1.5rem}\
.choices button,.read{flex:1;font-size:1rem;padding:.6rem;border:1px solid #333;background:#fff;color:#000}";

/// One authorisation of one client for one person's categories.
#[derive(Debug, Clone)]
pub(crate) struct PortalLinkage {
    pub(crate) subject: String,
    pub(crate) scopes: Vec<String>,
    pub(crate) expires_at: OffsetDateTime,
    pub(crate) revoked: bool,
}

/// What a bearer token may do.
#[derive(Debug, Clone)]
pub(crate) struct AccessGrant {
    pub(crate) linkage_id: String,
    pub(crate) expires_at: Instant,
}

#[derive(Default)]
pub(crate) struct AuthState {
    tickets: HashMap<String, CardTicket>,
    codes: HashMap<String, IssuedCode>,
    pub(crate) linkages: HashMap<String, PortalLinkage>,
    access_tokens: HashMap<String, AccessGrant>,
    refresh_tokens: HashMap<String, String>,
    used_jtis: HashMap<String, i64>,
}

impl AuthState {
    pub(crate) fn expire_linkages(&mut self) {
        let past = OffsetDateTime::now_utc() - time::Duration::seconds(1);
        for linkage in self.linkages.values_mut() {
            linkage.expires_at = past;
        }
    }

    pub(crate) fn expire_access_tokens(&mut self) {
        let past = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        for grant in self.access_tokens.values_mut() {
            grant.expires_at = past;
        }
    }

    /// The linkage behind a live bearer token.
    pub(crate) fn linkage_of(&self, token: &str) -> Option<PortalLinkage> {
        let grant = self
            .access_tokens
            .get(token)
            .filter(|grant| grant.expires_at > Instant::now())?;
        self.linkages
            .get(&grant.linkage_id)
            .filter(|linkage| !linkage.revoked)
            .cloned()
    }
}

struct CardTicket {
    subject: String,
    /// A proxy choosing at the portal: the persons (number, subject) they may act for.
    proxy_choices: Vec<(usize, String)>,
    request: AuthorizeRequest,
    expires_at: Instant,
}

struct IssuedCode {
    subject: String,
    request: AuthorizeRequest,
    expires_at: Instant,
}

/// `GET /authorize`'s parameters, carried through the card and consent forms.
#[derive(Debug, Clone)]
struct AuthorizeRequest {
    redirect_uri: String,
    state: String,
    code_challenge: String,
    categories: Vec<Category>,
    linkage: Linkage,
    represented: Option<String>,
}

impl AuthorizeRequest {
    fn from_pairs(pairs: &[(String, String)], server: &SimulatorState) -> Result<Self, String> {
        let field = |name: &str| first(pairs, name).unwrap_or_default().to_string();
        if field("response_type") != "code" {
            return Err("response_type must be code".into());
        }
        if field("client_id") != server.config.client_id {
            return Err("unknown client_id".into());
        }
        let redirect_uri = field("redirect_uri");
        match url::Url::parse(&redirect_uri) {
            Ok(url) if url.scheme() == "https" || url.scheme() == "http" => {}
            _ => return Err("redirect_uri must be an absolute http(s) URL".into()),
        }
        let state = field("state");
        if state.is_empty() {
            return Err("state is required".into());
        }
        let code_challenge = field("code_challenge");
        if code_challenge.is_empty() || field("code_challenge_method") != "S256" {
            return Err("PKCE with code_challenge_method=S256 is required".into());
        }
        let mut categories = Vec::new();
        for scope in field("scope").split_whitespace() {
            let category = Category::from_scope(scope)
                .filter(|category| server.offers(*category))
                .ok_or_else(|| format!("scope {scope:?} is not offered"))?;
            if !categories.contains(&category) {
                categories.push(category);
            }
        }
        if categories.is_empty() {
            return Err("scope is required".into());
        }
        let linkage = Linkage::parse(&field("linkage")).ok_or("linkage must be period or once")?;
        let represented = first(pairs, "represented")
            .filter(|value| !value.is_empty())
            .map(str::to_string);
        Ok(AuthorizeRequest {
            redirect_uri,
            state,
            code_challenge,
            categories,
            linkage,
            represented,
        })
    }

    fn hidden_fields(&self, client_id: &str) -> Vec<(&'static str, String)> {
        let scope: Vec<&str> = self.categories.iter().map(|c| c.scope()).collect();
        let mut fields = vec![
            ("response_type", "code".to_string()),
            ("client_id", client_id.to_string()),
            ("redirect_uri", self.redirect_uri.clone()),
            ("state", self.state.clone()),
            ("code_challenge", self.code_challenge.clone()),
            ("code_challenge_method", "S256".to_string()),
            ("scope", scope.join(" ")),
            ("linkage", self.linkage.as_str().to_string()),
        ];
        if let Some(represented) = &self.represented {
            fields.push(("represented", represented.clone()));
        }
        fields
    }
}

fn category_label(category: Category) -> &'static str {
    match category {
        Category::SpecificCheckup => "特定健診情報",
        Category::Medication => "薬剤情報",
        Category::Immunization => "予防接種情報",
        Category::InfantCheckup => "乳幼児健診情報",
        Category::MedicalCost => "医療費通知情報",
        Category::SchoolCheckup => "学校健診情報",
    }
}

fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="ja" {
            head { meta charset="utf-8"; title { (title) } style { (PAGE_STYLE) } }
            body { main { (body) } }
        }
    }
}

fn error_page(status: StatusCode, message: &str) -> Response {
    let body = html! { h1 { "手続きを続けられません" } p.error role="alert" { (message) } };
    (status, Html(page("エラー", body).into_string())).into_response()
}

fn card_page(server: &SimulatorState, request: &AuthorizeRequest, error: Option<&str>) -> Markup {
    let body = html! {
        h1 { "マイナンバーカードの読み取り" }
        p { "サービス「" (server.config.client_id) "」があなたの情報の取得を求めています。本人確認のため、マイナンバーカードを読み取ってください。" }
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form method="post" action={ (server.base_url) "/authorize/card" } {
            @for (name, value) in request.hidden_fields(&server.config.client_id) {
                input type="hidden" name=(name) value=(value);
            }
            label for="card_number" { "カード（シミュレーション）" }
            input #card_number type="text" name="card_number" autocomplete="off" required;
            label for="pin" { "利用者証明用電子証明書の暗証番号（数字4桁）" }
            input #pin type="password" name="pin" inputmode="numeric" autocomplete="off" required;
            p { button.read type="submit" { "読み取る" } }
        }
    };
    page("カードの読み取り", body)
}

fn consent_page(
    server: &SimulatorState,
    request: &AuthorizeRequest,
    card_holder: &PortalPerson,
    represented: Option<&PortalPerson>,
    choices: &[PortalPerson],
    ticket: &str,
) -> Markup {
    let linkage = match request.linkage {
        Linkage::Period => format!(
            "期間連携（最長{}日間、継続して取得されます）",
            server.config.linkage_period.as_secs() / 86_400
        ),
        Linkage::Once => "今回のみ".to_string(),
    };
    let body = html! {
        h1 { (card_holder.display_name) " 様" }
        @if let Some(represented) = represented {
            p.proxy { "代理人として、" strong { (represented.display_name) " 様" } "の情報の提供に同意します。" }
        }
        p { "次の情報をサービス「" (server.config.client_id) "」に提供しますか。" }
        ul {
            @for category in &request.categories {
                li { (category_label(*category)) }
            }
        }
        p { "連携の期間: " (linkage) }
        form method="post" action={ (server.base_url) "/authorize/decision" } {
            input type="hidden" name="ticket" value=(ticket);
            @if !choices.is_empty() {
                fieldset.proxy {
                    legend { "代理人として、どなたの情報を提供しますか。" }
                    @for person in choices {
                        label {
                            input type="radio" name="represented_number" value=(person.number);
                            " " (person.display_name) " 様"
                        }
                    }
                }
            }
            // Both answers look the same: the screen must not steer the person.
            div.choices {
                button type="submit" name="decision" value="consent" { "同意する" }
                button type="submit" name="decision" value="decline" { "同意しない" }
            }
        }
    };
    page("情報提供への同意", body)
}

pub(crate) async fn authorize_page(
    State(server): State<Arc<SimulatorState>>,
    RawQuery(query): RawQuery,
) -> Response {
    let pairs = form_pairs(query.as_deref().unwrap_or_default());
    match AuthorizeRequest::from_pairs(&pairs, &server) {
        Ok(request) => Html(card_page(&server, &request, None).into_string()).into_response(),
        Err(message) => error_page(StatusCode::BAD_REQUEST, &message),
    }
}

pub(crate) async fn read_card(State(server): State<Arc<SimulatorState>>, body: String) -> Response {
    let pairs = form_pairs(&body);
    let request = match AuthorizeRequest::from_pairs(&pairs, &server) {
        Ok(request) => request,
        Err(message) => return error_page(StatusCode::BAD_REQUEST, &message),
    };
    let card_number = first(&pairs, "card_number").unwrap_or_default();
    let pin = first(&pairs, "pin").unwrap_or_default();
    let (card_holder, represented) = {
        let store = server.store();
        let holder = store
            .person_by_card(card_number)
            .filter(|person| oauth::constant_time_eq(&person.pin, pin))
            .cloned();
        let represented = request
            .represented
            .as_deref()
            .filter(|value| *value != crate::self_info::CHOOSE_AT_PORTAL)
            .map(|card| store.person_by_card(card).cloned());
        (holder, represented)
    };
    let choosing = request.represented.as_deref() == Some(crate::self_info::CHOOSE_AT_PORTAL);
    let Some(card_holder) = card_holder else {
        let page = card_page(
            &server,
            &request,
            Some("カードを読み取れないか、暗証番号が違います。"),
        );
        return (StatusCode::UNAUTHORIZED, Html(page.into_string())).into_response();
    };
    let represented = match represented {
        None => None,
        Some(Some(person)) if card_holder.represents.contains(&person.number) => Some(person),
        Some(_) => {
            return error_page(
                StatusCode::FORBIDDEN,
                "この方の代理人として登録されていません。",
            )
        }
    };
    let subject = represented
        .as_ref()
        .map_or(card_holder.subject.clone(), |person| person.subject.clone());
    let choices: Vec<PortalPerson> = if choosing {
        let store = server.store();
        card_holder
            .represents
            .iter()
            .filter_map(|number| store.person(*number).cloned())
            .collect()
    } else {
        Vec::new()
    };
    if choosing && choices.is_empty() {
        return error_page(
            StatusCode::FORBIDDEN,
            "代理人として登録されている方がいません。",
        );
    }
    let ticket = random_url_token();
    let page = consent_page(
        &server,
        &request,
        &card_holder,
        represented.as_ref(),
        &choices,
        &ticket,
    );
    server.auth().tickets.insert(
        ticket,
        CardTicket {
            subject,
            proxy_choices: choices
                .iter()
                .map(|person| (person.number, person.subject.clone()))
                .collect(),
            request,
            expires_at: Instant::now() + TICKET_LIFETIME,
        },
    );
    Html(page.into_string()).into_response()
}

pub(crate) async fn decision(State(server): State<Arc<SimulatorState>>, body: String) -> Response {
    let pairs = form_pairs(&body);
    let ticket = first(&pairs, "ticket").unwrap_or_default();
    let Some(ticket) = server.auth().tickets.remove(ticket) else {
        return error_page(StatusCode::BAD_REQUEST, "最初からやり直してください。");
    };
    if ticket.expires_at <= Instant::now() {
        return error_page(StatusCode::BAD_REQUEST, "最初からやり直してください。");
    }
    let request = ticket.request;
    if first(&pairs, "decision") != Some("consent") {
        return redirect_to(
            &request.redirect_uri,
            &[("error", "access_denied"), ("state", &request.state)],
        );
    }
    let subject = if ticket.proxy_choices.is_empty() {
        ticket.subject
    } else {
        let chosen = first(&pairs, "represented_number")
            .and_then(|number| number.parse::<usize>().ok())
            .and_then(|number| {
                ticket
                    .proxy_choices
                    .iter()
                    .find(|(n, _)| *n == number)
                    .map(|(_, subject)| subject.clone())
            });
        match chosen {
            Some(subject) => subject,
            None => {
                return error_page(
                    StatusCode::BAD_REQUEST,
                    "代理する方を選んでから、もう一度最初からやり直してください。",
                )
            }
        }
    };
    let code = random_url_token();
    let redirect_uri = request.redirect_uri.clone();
    let state = request.state.clone();
    server.auth().codes.insert(
        code.clone(),
        IssuedCode {
            subject,
            request,
            expires_at: Instant::now() + CODE_LIFETIME,
        },
    );
    redirect_to(&redirect_uri, &[("code", &code), ("state", &state)])
}

/// A 503 with `Retry-After` during unscheduled maintenance or a scheduled window.
pub(crate) fn maintenance_response(server: &SimulatorState) -> Option<Response> {
    let faults = server.faults().clone();
    let now = OffsetDateTime::now_utc();
    let window_end = faults
        .maintenance_windows
        .iter()
        .find(|(start, end)| *start <= now && now < *end)
        .map(|(_, end)| *end);
    let retry_after = match (faults.maintenance, window_end) {
        (_, Some(end)) => {
            Duration::try_from(end - now).unwrap_or_default() + Duration::from_secs(1)
        }
        (true, None) => faults.retry_after,
        (false, None) => return None,
    };
    server.count(|counters| &counters.maintenance_refusals);
    Some(retry_later(
        StatusCode::SERVICE_UNAVAILABLE,
        retry_after,
        "maintenance",
    ))
}

pub(crate) fn retry_later(status: StatusCode, retry_after: Duration, error: &str) -> Response {
    let mut response = json_response(status, &json!({ "error": error }));
    if let Ok(value) = retry_after.as_secs().to_string().parse() {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Checks the client's `private_key_jwt` assertion on a token or revoke request.
fn authenticate_client(
    server: &SimulatorState,
    pairs: &[(String, String)],
) -> Result<(), Box<Response>> {
    let token_url = format!("{}/token", server.base_url);
    let verified = oauth::verify_client_assertion(
        &oauth::RegisteredClientKey {
            client_id: &server.config.client_id,
            public_jwk: &server.config.client_public_jwk,
            token_url: &token_url,
        },
        first(pairs, "client_assertion_type"),
        first(pairs, "client_assertion"),
        &mut server.auth().used_jtis,
    );
    let refused = match verified {
        Ok(client_id) if first(pairs, "client_id").is_none_or(|sent| sent == client_id) => {
            return Ok(())
        }
        Ok(_) => "client_id differs from the assertion".to_string(),
        Err(reason) => reason,
    };
    server.count(|counters| &counters.refused_client_assertions);
    Err(Box::new(oauth_error(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        &refused,
    )))
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/x-www-form-urlencoded"))
}

pub(crate) async fn token(
    State(server): State<Arc<SimulatorState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(response) = maintenance_response(&server) {
        return response;
    }
    if !is_form(&headers) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "form body required",
        );
    }
    let pairs = form_pairs(&body);
    if let Err(response) = authenticate_client(&server, &pairs) {
        return *response;
    }
    match first(&pairs, "grant_type") {
        Some("authorization_code") => authorization_code_grant(&server, &pairs),
        Some("refresh_token") => refresh_token_grant(&server, &pairs),
        _ => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type not supported",
        ),
    }
}

fn authorization_code_grant(server: &SimulatorState, pairs: &[(String, String)]) -> Response {
    let code = first(pairs, "code").unwrap_or_default();
    // Single use: taken out whatever happens next.
    let Some(issued) = server.auth().codes.remove(code) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "unknown or used code",
        );
    };
    if issued.expires_at <= Instant::now() {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "code expired");
    }
    if first(pairs, "redirect_uri") != Some(issued.request.redirect_uri.as_str()) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "redirect_uri differs",
        );
    }
    let verifier = first(pairs, "code_verifier").unwrap_or_default();
    if !pkce_matches("S256", &issued.request.code_challenge, verifier) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "PKCE verification failed",
        );
    }
    let scopes: Vec<String> = issued
        .request
        .categories
        .iter()
        .map(|category| category.scope().to_string())
        .collect();
    let expires_at = match issued.request.linkage {
        Linkage::Period => OffsetDateTime::now_utc() + server.config.linkage_period,
        // A one-off linkage ends with its access token.
        Linkage::Once => OffsetDateTime::now_utc() + server.config.access_token_lifetime,
    };
    let linkage_id = random_url_token();
    let refresh_token = (issued.request.linkage == Linkage::Period).then(random_url_token);
    {
        let mut auth = server.auth();
        auth.linkages.insert(
            linkage_id.clone(),
            PortalLinkage {
                subject: issued.subject,
                scopes,
                expires_at,
                revoked: false,
            },
        );
        if let Some(refresh_token) = &refresh_token {
            auth.refresh_tokens
                .insert(refresh_token.clone(), linkage_id.clone());
        }
    }
    issue_access_token(server, &linkage_id, refresh_token)
}

fn refresh_token_grant(server: &SimulatorState, pairs: &[(String, String)]) -> Response {
    let refresh_token = first(pairs, "refresh_token").unwrap_or_default();
    let linkage = {
        let auth = server.auth();
        auth.refresh_tokens
            .get(refresh_token)
            .and_then(|linkage_id| {
                auth.linkages
                    .get(linkage_id)
                    .map(|linkage| (linkage_id.clone(), linkage.clone()))
            })
    };
    let Some((linkage_id, linkage)) = linkage.filter(|(_, linkage)| !linkage.revoked) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "unknown refresh token",
        );
    };
    if linkage.expires_at <= OffsetDateTime::now_utc() {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "linkage expired");
    }
    // Not rotated: the response omits refresh_token, so the client keeps its own.
    issue_access_token(server, &linkage_id, None)
}

fn issue_access_token(
    server: &SimulatorState,
    linkage_id: &str,
    refresh_token: Option<String>,
) -> Response {
    let access_token = random_url_token();
    let lifetime = server.config.access_token_lifetime;
    let linkage = {
        let mut auth = server.auth();
        auth.access_tokens.insert(
            access_token.clone(),
            AccessGrant {
                linkage_id: linkage_id.to_string(),
                expires_at: Instant::now() + lifetime,
            },
        );
        auth.linkages.get(linkage_id).cloned()
    };
    let Some(linkage) = linkage else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "linkage ended");
    };
    server.count(|counters| &counters.tokens_issued);
    let mut body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": lifetime.as_secs(),
        "linkage_expires_at": format_instant(linkage.expires_at),
        "scope": linkage.scopes.join(" "),
        "subject": linkage.subject,
    });
    if let Some(refresh_token) = refresh_token {
        body["refresh_token"] = json!(refresh_token);
    }
    json_response(StatusCode::OK, &body)
}

/// Ends the linkage behind a refresh or access token, with all its tokens.
pub(crate) async fn revoke(
    State(server): State<Arc<SimulatorState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(response) = maintenance_response(&server) {
        return response;
    }
    if !is_form(&headers) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "form body required",
        );
    }
    let pairs = form_pairs(&body);
    if let Err(response) = authenticate_client(&server, &pairs) {
        return *response;
    }
    let token = first(&pairs, "token").unwrap_or_default();
    let mut auth = server.auth();
    let linkage_id = auth.refresh_tokens.get(token).cloned().or_else(|| {
        auth.access_tokens
            .get(token)
            .map(|grant| grant.linkage_id.clone())
    });
    if let Some(linkage_id) = linkage_id {
        if let Some(linkage) = auth.linkages.get_mut(&linkage_id) {
            linkage.revoked = true;
        }
        auth.access_tokens
            .retain(|_, grant| grant.linkage_id != linkage_id);
        auth.refresh_tokens.retain(|_, id| *id != linkage_id);
    }
    StatusCode::OK.into_response()
}
