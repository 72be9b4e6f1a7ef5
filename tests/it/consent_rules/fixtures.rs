//! Fixture pages for the consent rules: one screen that keeps every rule, and, for each rule,
//! a screen that differs from it only in the way that breaks that rule. The pages follow the
//! conventions of the checker (classes `choice`, `accept`, `decline`, `withdraw`, `notice`;
//! `input[name=purpose]` in `[data-purpose]` rows; `<html lang>`).

const STYLE: &str = "<style>
body{font-family:sans-serif;margin:1.5rem;max-width:44rem;color:#1a1a1a;background:#fff}
.notice{border-left:4px solid #174ea6;padding:.25rem 1rem;margin:0 0 1rem}
fieldset{border:1px solid #ccc;margin:0 0 1rem;padding:.5rem 1rem}
.purpose{margin:.4rem 0}
.choices{display:flex;gap:1rem;margin:1rem 0}
.choice{font:inherit;font-size:1rem;width:12rem;height:3rem;border:2px solid #174ea6;border-radius:4px;background:#fff;color:#174ea6;cursor:pointer}
</style>";

const NOTICE: &str = "<div class=\"notice\">
<p>あなたの診療データを、下で選んだ目的に限り、終了日まで提供します。同意は、同意したときと同じ手数でいつでも撤回できます。同意しなくても、診療やこのサービスの利用に影響はありません。</p>
<p lang=\"en\">Your records are shared only for the purposes you tick below, and only until the end date. You can withdraw at any time in as few steps as it took to agree. Declining has no effect on your care or on using this service.</p>
</div>";

const CARE_ROW: &str = "<div class=\"purpose\" data-purpose=\"care\"><label><input type=\"checkbox\" name=\"purpose\" value=\"care\" data-required=\"true\"> 診療のための提供（必須） / For your care (required)</label></div>";

const RESEARCH_ROW: &str = "<div class=\"purpose\" data-purpose=\"research\"><label><input type=\"checkbox\" name=\"purpose\" value=\"research\"> 研究のための提供（任意） / For research (optional)</label></div>";

const REMINDERS_ROW: &str = "<div class=\"purpose\" data-purpose=\"reminders\"><label><input type=\"checkbox\" name=\"purpose\" value=\"reminders\"> 服薬リマインダー（任意） / Medication reminders (optional)</label></div>";

const DECLINE_TEXT: &str = "同意しない / Decline";

/// A consent screen that keeps every rule: notice first, in Japanese; three purposes, each on
/// its own row and unticked (one required); a recipient select showing a disabled placeholder;
/// a default end date (not a selection); accept and decline as the same control, side by side.
pub fn conforming_consent_screen() -> String {
    format!(
        "<!DOCTYPE html>
<html lang=\"ja\">
<head>
<meta charset=\"utf-8\">
<title>データ提供への同意 / Consent to share your data</title>
{STYLE}
</head>
<body>
<h1>データ提供への同意 / Consent to share your data</h1>
{NOTICE}
<form method=\"post\" action=\"/consents\">
<fieldset>
<legend>提供の目的 / Purposes</legend>
{CARE_ROW}
{RESEARCH_ROW}
{REMINDERS_ROW}
</fieldset>
<fieldset>
<legend>提供先 / Recipient</legend>
<label>提供先 / Recipient
<select name=\"recipient\">
<option value=\"\" selected disabled>選んでください / Choose</option>
<option value=\"clinic-a\">Aクリニック / Clinic A</option>
<option value=\"pharmacy-b\">B薬局 / Pharmacy B</option>
</select></label>
</fieldset>
<fieldset>
<legend>期間 / Period</legend>
<label>終了日 / End date <input type=\"date\" name=\"until\" value=\"2027-03-31\"></label>
</fieldset>
<div class=\"choices\">
<button type=\"submit\" class=\"choice accept\" name=\"decision\" value=\"accept\">同意する / Agree</button>
<button type=\"submit\" class=\"choice decline\" name=\"decision\" value=\"decline\">{DECLINE_TEXT}</button>
</div>
</form>
</body>
</html>
"
    )
}

/// R2: the optional research purpose comes ticked.
pub fn violates_r2_preselected_optional() -> String {
    conforming_with("value=\"research\">", "value=\"research\" checked>")
}

/// R2: the recipient select comes with a real recipient chosen instead of the placeholder.
pub fn violates_r2_preselected_recipient() -> String {
    conforming_with(
        "<option value=\"clinic-a\">",
        "<option value=\"clinic-a\" selected>",
    )
}

/// R3: the decline is smaller, in a smaller font, and grey on grey.
pub fn violates_r3_unequal_controls() -> String {
    conforming_with(
        "</style>",
        ".choice.decline{font-size:.8rem;width:8rem;height:2.2rem;color:#999;background:#ddd;border-color:#ddd}\n</style>",
    )
}

/// R3: the decline is pushed below the accept instead of beside it.
pub fn violates_r3_decline_below() -> String {
    conforming_with("</style>", ".choices{flex-direction:column}\n</style>")
}

/// R4: the only way not to agree is 「あとで」 (later).
pub fn violates_r4_later_only() -> String {
    conforming_with(DECLINE_TEXT, "あとで / Later")
}

/// R5: the screen shames declining (「本当に同意しませんか？」).
pub fn violates_r5_confirmshaming() -> String {
    conforming_with(
        "</form>",
        "</form>\n<p>本当に同意しませんか？ / Are you sure you do not want to agree?</p>",
    )
}

/// R7: one checkbox grants the required care purpose and optional research together.
pub fn violates_r7_bundled_purposes() -> String {
    let html = conforming_with(RESEARCH_ROW, "");
    replace_once(
        &html,
        CARE_ROW,
        "<div class=\"purpose\" data-purpose=\"care\"><label><input type=\"checkbox\" name=\"purpose\" value=\"care\" data-required=\"true\" data-purposes=\"care research\"> 診療と研究のための提供（必須） / For your care and research (required)</label></div>",
    )
}

/// R7: one label (and row) holds the care and research checkboxes together.
pub fn violates_r7_shared_label() -> String {
    let html = conforming_with(RESEARCH_ROW, "");
    replace_once(
        &html,
        CARE_ROW,
        "<div class=\"purpose\" data-purpose=\"care\"><label><input type=\"checkbox\" name=\"purpose\" value=\"care\" data-required=\"true\"><input type=\"checkbox\" name=\"purpose\" value=\"research\"> 診療と研究のための提供 / For your care and research</label></div>",
    )
}

/// R8: the notice comes only after the choices.
pub fn violates_r8_notice_after_choices() -> String {
    let html = conforming_with(NOTICE, "");
    replace_once(&html, "</form>", &format!("</form>\n{NOTICE}"))
}

/// R8: the page does not say what language it is in.
pub fn violates_r8_missing_lang() -> String {
    conforming_with("<html lang=\"ja\">", "<html>")
}

/// R9: a purpose is worded as a double negative.
pub fn violates_r9_double_negative() -> String {
    conforming_with(
        "研究のための提供（任意） / For research (optional)",
        "研究のための提供をしないことに同意しない / I do not disagree with not sharing for research",
    )
}

/// Every violating consent screen: the rule it breaks, its name, the page.
pub fn violating_consent_screens() -> Vec<(&'static str, &'static str, String)> {
    macro_rules! screens {
        ($($rule:literal $name:ident,)*) => {
            vec![$(($rule, stringify!($name), $name())),*]
        };
    }
    screens![
        "R2" violates_r2_preselected_optional,
        "R2" violates_r2_preselected_recipient,
        "R3" violates_r3_unequal_controls,
        "R3" violates_r3_decline_below,
        "R4" violates_r4_later_only,
        "R5" violates_r5_confirmshaming,
        "R7" violates_r7_bundled_purposes,
        "R7" violates_r7_shared_label,
        "R8" violates_r8_notice_after_choices,
        "R8" violates_r8_missing_lang,
        "R9" violates_r9_double_negative,
    ]
}

/// A portal page that keeps the portal rules: Japanese, withdraw buttons alike, links to
/// `/portal/consents` and `/portal/audit?page=1`, and one link hidden from view.
pub fn conforming_portal_page() -> String {
    format!(
        "<!DOCTYPE html>
<html lang=\"ja\">
<head>
<meta charset=\"utf-8\">
<title>同意の一覧 / Your consents</title>
{STYLE}
</head>
<body>
<nav><a href=\"/portal\">ホーム / Home</a> · <a href=\"/portal/consents\">同意の一覧 / Your consents</a> · <a href=\"https://gateway.example/portal/audit?page=1#top\">閲覧の記録 / Access log</a> <a href=\"/portal/hidden\" hidden>非表示 / Hidden</a></nav>
<h1>同意の一覧 / Your consents</h1>
<table>
<tr><th>提供先 / Recipient</th><th>目的 / Purpose</th><th></th></tr>
<tr><td>Aクリニック / Clinic A</td><td>診療 / Care</td><td><form method=\"post\" action=\"/portal/consents/1/withdraw\"><button type=\"submit\" class=\"choice withdraw\">撤回する / Withdraw</button></form></td></tr>
<tr><td>B薬局 / Pharmacy B</td><td>服薬リマインダー / Reminders</td><td><form method=\"post\" action=\"/portal/consents/2/withdraw\"><button type=\"submit\" class=\"choice withdraw\">撤回する / Withdraw</button></form></td></tr>
</table>
</body>
</html>
"
    )
}

/// A self-contained grant-and-withdraw flow for click counting: tick the purpose, agree
/// (two clicks); withdraw (one click). The status line says where the flow is.
pub fn click_flow_page() -> String {
    format!(
        "<!DOCTYPE html>
<html lang=\"ja\">
<head>
<meta charset=\"utf-8\">
<title>同意と撤回 / Agree and withdraw</title>
{STYLE}
</head>
<body>
{NOTICE}
{CARE_ROW}
<p id=\"status\">未回答 / Not answered</p>
<div class=\"choices\">
<button type=\"button\" class=\"choice accept\">同意する / Agree</button>
<button type=\"button\" class=\"choice decline\">{DECLINE_TEXT}</button>
<button type=\"button\" class=\"choice withdraw\" hidden>撤回する / Withdraw</button>
</div>
<script>
const status = document.getElementById('status');
const withdraw = document.querySelector('.withdraw');
document.querySelector('.accept').addEventListener('click', () => {{
  if (!document.querySelector('input[value=care]').checked) return;
  status.textContent = '同意済み / Agreed';
  document.querySelector('.accept').hidden = true;
  document.querySelector('.decline').hidden = true;
  withdraw.hidden = false;
}});
withdraw.addEventListener('click', () => {{
  status.textContent = '撤回済み / Withdrawn';
}});
</script>
</body>
</html>
"
    )
}

/// The page as a `data:` URL, so a fixture needs no server.
pub fn data_url(html: &str) -> String {
    let mut url = String::from("data:text/html;charset=utf-8,");
    for byte in html.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            url.push(char::from(byte));
        } else {
            url.push_str(&format!("%{byte:02X}"));
        }
    }
    url
}

fn conforming_with(from: &str, to: &str) -> String {
    replace_once(&conforming_consent_screen(), from, to)
}

/// Replaces the one occurrence of `from`; a fixture that no longer changes anything fails.
fn replace_once(html: &str, from: &str, to: &str) -> String {
    assert_eq!(
        html.matches(from).count(),
        1,
        "fixture text {from:?} must occur exactly once"
    );
    html.replacen(from, to, 1)
}
