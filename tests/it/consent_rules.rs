//! Rule checks for consent screens free of dark patterns, measured in the rendered page of a
//! real headless Chromium.
//!
//! Every check takes a [`fantoccini::Client`] that has already been navigated to the page
//! under test; how the page is served (the gateway, a fixture, a `data:` URL) is up to the
//! caller. The checks read the page through `client.execute` scripts that return JSON:
//! computed styles, `getBoundingClientRect`, form state, visible text. Nothing on the page is
//! clicked or changed.
//!
//! # Page conventions the checks rely on
//!
//! - Choice controls (accept, decline, withdraw, change) are `<button class="choice …">`;
//!   accept also has class `accept`, decline `decline`, withdraw `withdraw`.
//! - Optional purposes are `input[type=checkbox]` or `input[type=radio]`; a required purpose
//!   carries `data-required="true"` on its input and is never pre-ticked either.
//! - Each purpose is one `input[name=purpose]` inside its own row carrying
//!   `data-purpose="<code>"`.
//! - The notice is an element with class `notice`.
//! - The document language is set: `<html lang="ja">` (or `en`).
//!
//! "Visible" below means: connected, not hidden by `display`, `visibility` or `opacity: 0`
//! (`Element.checkVisibility`), and with a non-empty bounding box.
//!
//! # Rules and how each is measured
//!
//! - **R1 withdrawing takes no more clicks than granting.** The caller drives both flows
//!   through a [`ClickCounter`] and compares the counts with [`assert_at_most`] (or
//!   [`check_r1`]).
//! - **R2 nothing optional is pre-selected** ([`check_r2`]). After load, every
//!   `input[type=checkbox]` and `input[type=radio]` has `.checked == false` and
//!   `.defaultChecked == false` — hidden ones and required ones included. In every `<select>`,
//!   no option is selected (currently or by default) unless it is a placeholder (disabled, or
//!   with an empty value); a `<select>` without a placeholder selects its first option, which
//!   counts as a pre-selection. Custom controls (`role=checkbox|switch|radio|…` with
//!   `aria-checked="true"` or `aria-selected="true"`, and `aria-pressed="true"`) count too.
//!   Pre-filled text or date inputs (such as a default end date) are not selections.
//! - **R3 the same control for every choice** ([`check_r3`]). All visible `.choice` elements
//!   have the same tag; the same computed `font-family`, `font-size` and `font-weight`; the
//!   same rendered width and height (±1 px); the same effective opacity; and either the same
//!   foreground and effective background colours or the same contrast ratio (±0.1). Each has
//!   a contrast ratio of at least 4.5:1. Contrast is WCAG 2.x: relative luminance of the
//!   computed `color` against the effective background, found by compositing the
//!   `background-color` of the element and its ancestors (transparent layers see through) over
//!   white; a foreground with alpha or an element with opacity below 1 is blended over that
//!   background first. Background images and gradients are not modelled. For each visible
//!   `.accept`, the first visible `.decline` after it in the document must sit side by side
//!   with it: the same top (±2 px), accept to the left, not overlapping, at most
//!   [`MAX_PAIR_GAP_PX`] apart. A decline that only comes before the accept in the document
//!   violates the order.
//! - **R4 a plain decline is always offered** ([`check_r4`]). If a visible `.accept` exists, a
//!   visible `.decline` exists whose visible text contains a refusal ([`REFUSAL_PHRASES`]) and
//!   no postponement ([`POSTPONEMENT_PHRASES`]): 「あとで」 or "Not now" is not a refusal, and
//!   neither is a refusal framed as one for now.
//! - **R5 no confirmshaming or pressure** ([`check_r5`]). The visible text of the page
//!   (`document.body.innerText`, plus the values of visible `input` buttons and the options of
//!   visible `<select>`s) contains none of [`PRESSURE_PHRASES_JA`] or [`PRESSURE_PHRASES_EN`].
//!   Legal terms that merely contain a listed character sequence ([`PRESSURE_EXEMPT_TERMS`],
//!   such as 毀損) are removed first.
//! - **R7 no bundling of purposes** ([`check_r7`]). The number of `input[name=purpose]` equals
//!   the number of `[data-purpose]` rows; each row holds exactly one purpose input (the row
//!   nearest to an input is its row); no purpose input carries a `data-purposes` attribute
//!   listing more than one code; every purpose input has a `<label>` of its own, containing no
//!   other form control.
//! - **R8 the notice comes before the action, in the patient's language** ([`check_r8`]).
//!   `document.documentElement.lang` has primary subtag `ja` or `en` ([`PAGE_LANGUAGES`]); a
//!   visible `.notice` with text in that language's script (kana or kanji for `ja`, Latin for
//!   `en`) exists, precedes the first visible `.choice` in document order, and its top is above
//!   that control's top. [`check_r8_lang`] checks the language alone.
//! - **R9 no double negatives** ([`check_r9`]). The text of labels, buttons, legends, options,
//!   summaries, `role=button|checkbox|switch|radio` elements, `[data-purpose]` rows, `input`
//!   buttons' values and these elements' `aria-label`s contains none of
//!   [`DOUBLE_NEGATIVES_JA`] or [`DOUBLE_NEGATIVES_EN`].
//! - **R10 every page can be reached** ([`links_reaching`]): the caller crawls; this tells
//!   whether the current page has a visible link to a path.
//!
//! Text matching (R4, R5, R9) is done on normalised text: lower-cased, typographic quotes made
//! straight, and every run of white space (including U+3000) collapsed to one space.
//!
//! [`check_consent_screen`] runs R2, R3, R4, R5, R7, R8 and R9; [`check_portal_page`] runs
//! R2, R3, R5, R8 (language only) and R9.

mod fixtures;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use fantoccini::elements::Element;
use fantoccini::error::CmdError;
use fantoccini::{Client, Locator};
use serde_json::Value;

/// A broken rule, with what was measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleViolation {
    pub rule: &'static str,
    pub detail: String,
}

impl fmt::Display for RuleViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.rule, self.detail)
    }
}

/// The greatest horizontal gap between an accept and its decline that still counts as side by
/// side.
pub const MAX_PAIR_GAP_PX: f64 = 64.0;
/// The least contrast ratio of a choice control's text (WCAG 2.x AA, normal text).
pub const MIN_CONTRAST: f64 = 4.5;
/// Document languages a consent screen may be in (primary subtag of `<html lang>`).
pub const PAGE_LANGUAGES: &[&str] = &["ja", "en"];

/// A decline must contain one of these (R4).
pub const REFUSAL_PHRASES: &[&str] = &[
    "同意しない",
    "同意しません",
    "拒否",
    "decline",
    "don't agree",
    "do not agree",
    "disagree",
    "reject",
    "refuse",
];

/// A decline must contain none of these: they postpone instead of refusing (R4).
pub const POSTPONEMENT_PHRASES: &[&str] = &[
    "後で",
    "あとで",
    "今はしない",
    "今は同意しない",
    "また今度",
    "later",
    "not now",
    "not yet",
    "for now",
    "skip",
    "remind me",
];

/// Confirmshaming and pressure in Japanese (R5). Bare 損 and 限定 are not listed: 毀損 and
/// 利用目的を限定 are ordinary terms in a privacy notice.
pub const PRESSURE_PHRASES_JA: &[&str] = &[
    "本当に",
    "損する",
    "損します",
    "損をする",
    "損をします",
    "損ですよ",
    "今だけ",
    "期間限定",
    "数量限定",
    "限定特典",
    "お見逃し",
    "見逃さないで",
    "残りわずか",
    "急いで",
    "おすすめ",
    "お勧め",
    "オススメ",
    "推奨",
    "健康を守りたくない",
    "あとで後悔",
    "後で後悔",
    "後悔しますよ",
];

/// Confirmshaming and pressure in English (R5), matched case-insensitively.
pub const PRESSURE_PHRASES_EN: &[&str] = &[
    "are you sure",
    "miss out",
    "limited time",
    "only today",
    "today only",
    "hurry",
    "recommended",
    "don't care about your health",
    "no thanks, i",
    "you will lose",
    "you'll lose",
    "you will regret",
    "you'll regret",
    "last chance",
    "act now",
];

/// Terms removed from the text before R5 matching, because they contain a pressure phrase by
/// accident (毀損する contains 損する).
pub const PRESSURE_EXEMPT_TERMS: &[&str] =
    &["毀損", "き損", "破損", "欠損", "損害", "損傷", "損失"];

/// Double negatives in Japanese (R9).
pub const DOUBLE_NEGATIVES_JA: &[&str] = &[
    "しないことに同意しない",
    "同意しないことに同意",
    "ないわけではない",
    "不同意しない",
    "無効にしない",
    "拒否しない",
    "しないことを希望しない",
    "オプトアウトしない",
];

/// Double negatives in English (R9), matched case-insensitively.
pub const DOUBLE_NEGATIVES_EN: &[&str] = &[
    "not disagree",
    "don't disagree",
    "don't not",
    "do not not",
    "not to not",
    "uncheck to not",
    "untick to not",
    "unselect to not",
    "opt out of not",
    "don't opt out",
    "do not opt out",
    "not decline",
    "don't decline",
    "not refuse",
    "don't refuse",
];

/// Runs R2, R3, R4, R5, R7, R8 and R9 on the consent screen the client shows.
pub async fn check_consent_screen(client: &Client) -> Vec<RuleViolation> {
    let mut violations = Vec::new();
    violations.extend(check_r2(client).await);
    violations.extend(check_r3(client).await);
    violations.extend(check_r4(client).await);
    violations.extend(check_r5(client).await);
    violations.extend(check_r7(client).await);
    violations.extend(check_r8(client).await);
    violations.extend(check_r9(client).await);
    violations
}

/// Runs R2, R3, R5, R8 (language only) and R9 on the portal page the client shows.
pub async fn check_portal_page(client: &Client) -> Vec<RuleViolation> {
    let mut violations = Vec::new();
    violations.extend(check_r2(client).await);
    violations.extend(check_r3(client).await);
    violations.extend(check_r5(client).await);
    violations.extend(check_r8_lang(client).await);
    violations.extend(check_r9(client).await);
    violations
}

/// R1: `clicks` to withdraw (or change) against the `limit` it took to grant.
pub fn check_r1(clicks: usize, limit: usize) -> Option<RuleViolation> {
    (clicks > limit).then(|| RuleViolation {
        rule: "R1",
        detail: format!("{clicks} clicks where granting took {limit}"),
    })
}

/// R1: panics unless `clicks <= limit`.
pub fn assert_at_most(clicks: usize, limit: usize) {
    if let Some(violation) = check_r1(clicks, limit) {
        panic!("{violation}");
    }
}

/// Clicks through a client and counts them, so a test can compare the clicks of two flows.
pub struct ClickCounter<'a> {
    client: &'a Client,
    clicks: AtomicUsize,
}

impl<'a> ClickCounter<'a> {
    pub fn new(client: &'a Client) -> Self {
        ClickCounter {
            client,
            clicks: AtomicUsize::new(0),
        }
    }

    /// Waits for the element, clicks it, and counts the click.
    pub async fn click(&self, locator: Locator<'_>) -> Result<(), CmdError> {
        let element = self.client.wait().for_element(locator).await?;
        self.click_element(element).await
    }

    /// Clicks an element already found, and counts the click.
    pub async fn click_element(&self, element: Element) -> Result<(), CmdError> {
        element.click().await?;
        self.clicks.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Clicks counted so far.
    pub fn count(&self) -> usize {
        self.clicks.load(Ordering::SeqCst)
    }

    /// Returns the count and starts again from zero (one counter for several flows).
    pub fn take(&self) -> usize {
        self.clicks.swap(0, Ordering::SeqCst)
    }
}

/// R10: whether the current page has a visible link (`a[href]`, `area[href]`) to
/// `target_path`. Links are resolved against the page; the path is compared, and the query
/// too when `target_path` has one. Fragments are ignored.
pub async fn links_reaching(client: &Client, target_path: &str) -> bool {
    let script = format!(
        "{PRELUDE}
        const target = arguments[0];
        const wantQuery = target.includes('?');
        const pathOf = (href) => {{
          try {{
            const u = new URL(href, document.baseURI);
            return wantQuery ? u.pathname + u.search : u.pathname;
          }} catch (_) {{
            const noHash = href.split('#')[0];
            return wantQuery ? noHash : noHash.split('?')[0];
          }}
        }};
        return Array.from(document.querySelectorAll('a[href], area[href]'))
          .filter((a) => a.tagName === 'AREA' || visible(a))
          .some((a) => pathOf(a.getAttribute('href')) === target);"
    );
    matches!(
        client
            .execute(&script, vec![Value::from(target_path)])
            .await,
        Ok(Value::Bool(true))
    )
}

/// R2: nothing is pre-selected.
pub async fn check_r2(client: &Client) -> Option<RuleViolation> {
    let script = format!(
        "{PRELUDE}
        const problems = [];
        for (const i of document.querySelectorAll('input[type=checkbox], input[type=radio]')) {{
          if (i.checked || i.defaultChecked) {{
            problems.push(`${{describe(i)}} (name=${{i.name}}, value=${{i.value}}) is ` +
              (i.checked ? 'checked' : 'checked by default'));
          }}
        }}
        for (const s of document.querySelectorAll('select')) {{
          for (const o of s.options) {{
            if ((o.selected || o.defaultSelected) && !(o.disabled || o.value === '')) {{
              problems.push(`select[name=${{s.name}}] has \"${{o.text.trim()}}\" selected`);
            }}
          }}
        }}
        const toggles = '[role=checkbox], [role=switch], [role=radio], ' +
          '[role=menuitemcheckbox], [role=menuitemradio]';
        for (const e of document.querySelectorAll(toggles)) {{
          if (e.getAttribute('aria-checked') === 'true') problems.push(`${{describe(e)}} is aria-checked`);
        }}
        for (const e of document.querySelectorAll('[role=option][aria-selected=true]')) {{
          problems.push(`${{describe(e)}} is aria-selected`);
        }}
        for (const e of document.querySelectorAll('[aria-pressed=true]')) {{
          problems.push(`${{describe(e)}} is aria-pressed`);
        }}
        return problems;"
    );
    problems_to_violation("R2", run(client, &script).await)
}

/// R3: every choice is the same control, and accept and decline sit side by side.
pub async fn check_r3(client: &Client) -> Option<RuleViolation> {
    let script = format!(
        "{PRELUDE}
        return choices().map((el) => {{
          const s = getComputedStyle(el);
          const r = el.getBoundingClientRect();
          let opacity = 1;
          for (let e = el; e; e = e.parentElement) opacity *= parseFloat(getComputedStyle(e).opacity);
          const bg = effectiveBackground(el);
          const fgRaw = rgba(s.color);
          const fg = over([fgRaw[0], fgRaw[1], fgRaw[2], fgRaw[3] * opacity], bg);
          return {{
            desc: describe(el),
            tag: el.tagName.toLowerCase(),
            fontFamily: s.fontFamily,
            fontSize: s.fontSize,
            fontWeight: s.fontWeight,
            width: r.width, height: r.height, top: r.top, left: r.left, right: r.right,
            fg: fg.slice(0, 3).map(Math.round),
            bg: bg.slice(0, 3).map(Math.round),
            contrast: contrast(fg, bg),
            opacity,
            accept: el.classList.contains('accept'),
            decline: el.classList.contains('decline'),
          }};
        }});"
    );
    let controls = match run(client, &script).await {
        Ok(Value::Array(controls)) => controls,
        Ok(other) => return problems_to_violation("R3", Err(format!("unexpected {other}"))),
        Err(e) => return problems_to_violation("R3", Err(e)),
    };
    problems_to_violation("R3", Ok(Value::from(r3_problems(&controls))))
}

fn r3_problems(controls: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let text = |c: &Value, key: &str| c[key].as_str().unwrap_or_default().to_owned();
    let num = |c: &Value, key: &str| c[key].as_f64().unwrap_or(f64::NAN);
    let desc = |c: &Value| text(c, "desc");
    for c in controls {
        let ratio = num(c, "contrast");
        if !at_least(ratio, MIN_CONTRAST) {
            problems.push(format!(
                "{} has contrast {ratio:.2}:1 (fg {} on bg {}), below {MIN_CONTRAST}:1",
                desc(c),
                c["fg"],
                c["bg"]
            ));
        }
    }
    let Some(first) = controls.first() else {
        return problems;
    };
    for c in &controls[1..] {
        for key in ["tag", "fontFamily", "fontSize", "fontWeight"] {
            if text(c, key) != text(first, key) {
                problems.push(format!(
                    "{} has {key} {:?} but {} has {:?}",
                    desc(c),
                    text(c, key),
                    desc(first),
                    text(first, key)
                ));
            }
        }
        for key in ["width", "height"] {
            if !within(num(c, key), num(first, key), 1.0) {
                problems.push(format!(
                    "{} is {:.1}px in {key} but {} is {:.1}px",
                    desc(c),
                    num(c, key),
                    desc(first),
                    num(first, key)
                ));
            }
        }
        if !within(num(c, "opacity"), num(first, "opacity"), 0.01) {
            problems.push(format!(
                "{} has opacity {:.2} but {} has {:.2}",
                desc(c),
                num(c, "opacity"),
                desc(first),
                num(first, "opacity")
            ));
        }
        let same_colours = c["fg"] == first["fg"] && c["bg"] == first["bg"];
        if !same_colours && !within(num(c, "contrast"), num(first, "contrast"), 0.1) {
            problems.push(format!(
                "{} is {} on {} (contrast {:.2}) but {} is {} on {} (contrast {:.2})",
                desc(c),
                c["fg"],
                c["bg"],
                num(c, "contrast"),
                desc(first),
                first["fg"],
                first["bg"],
                num(first, "contrast")
            ));
        }
    }
    let is = |c: &Value, key: &str| c[key].as_bool().unwrap_or(false);
    for (i, accept) in controls.iter().enumerate().filter(|(_, c)| is(c, "accept")) {
        let Some(decline) = controls[i + 1..].iter().find(|c| is(c, "decline")) else {
            if let Some(decline) = controls[..i].iter().find(|c| is(c, "decline")) {
                problems.push(format!(
                    "{} comes before {} in the document; accept must come first",
                    desc(decline),
                    desc(accept)
                ));
            }
            continue;
        };
        if !within(num(accept, "top"), num(decline, "top"), 2.0) {
            problems.push(format!(
                "{} and {} are not on one row (tops {:.1}px and {:.1}px)",
                desc(accept),
                desc(decline),
                num(accept, "top"),
                num(decline, "top")
            ));
        }
        let gap = num(decline, "left") - num(accept, "right");
        if !at_least(gap, -1.0) {
            problems.push(format!(
                "{} is not to the left of {} (accept right {:.1}px, decline left {:.1}px)",
                desc(accept),
                desc(decline),
                num(accept, "right"),
                num(decline, "left")
            ));
        } else if gap > MAX_PAIR_GAP_PX {
            problems.push(format!(
                "{} and {} are {gap:.1}px apart, more than {MAX_PAIR_GAP_PX}px",
                desc(accept),
                desc(decline)
            ));
        }
    }
    problems
}

/// `a` and `b` differ by at most `tolerance` (false for a missing measurement, NaN).
fn within(a: f64, b: f64, tolerance: f64) -> bool {
    (a - b).abs() <= tolerance
}

/// `value >= min` (false for a missing measurement, NaN).
fn at_least(value: f64, min: f64) -> bool {
    value >= min
}

/// R4: an accept always comes with a plain decline.
pub async fn check_r4(client: &Client) -> Option<RuleViolation> {
    let script = format!(
        "{PRELUDE}
        const visibleChoices = choices();
        return {{
          accepts: visibleChoices.filter((el) => el.classList.contains('accept')).length,
          declines: visibleChoices.filter((el) => el.classList.contains('decline'))
            .map((el) => el.innerText || el.value || ''),
        }};"
    );
    let page = match run(client, &script).await {
        Ok(page) => page,
        Err(e) => return problems_to_violation("R4", Err(e)),
    };
    if page["accepts"].as_u64().unwrap_or(0) == 0 {
        return None;
    }
    let declines: Vec<&str> = page["declines"]
        .as_array()
        .map(|d| d.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if declines.is_empty() {
        return Some(RuleViolation {
            rule: "R4",
            detail: "the screen has an accept but no visible .decline".into(),
        });
    }
    if declines.iter().any(|d| is_plain_refusal(d)) {
        return None;
    }
    Some(RuleViolation {
        rule: "R4",
        detail: format!("no decline is a plain refusal; declines read {declines:?}"),
    })
}

/// Whether a decline's text refuses, and does not merely postpone.
pub fn is_plain_refusal(text: &str) -> bool {
    let text = normalize(text);
    !find_phrases(&text, REFUSAL_PHRASES).is_empty()
        && find_phrases(&text, POSTPONEMENT_PHRASES).is_empty()
}

/// R5: no confirmshaming or pressure wording in the visible text.
pub async fn check_r5(client: &Client) -> Option<RuleViolation> {
    let script = format!(
        "{PRELUDE}
        const parts = [document.body ? document.body.innerText : ''];
        for (const i of document.querySelectorAll(
            'input[type=submit], input[type=button], input[type=reset]')) {{
          if (visible(i)) parts.push(i.value);
        }}
        for (const s of document.querySelectorAll('select')) {{
          if (visible(s)) for (const o of s.options) parts.push(o.text);
        }}
        return parts.join('\\n');"
    );
    let text = match run(client, &script).await {
        Ok(Value::String(text)) => text,
        Ok(other) => return problems_to_violation("R5", Err(format!("unexpected {other}"))),
        Err(e) => return problems_to_violation("R5", Err(e)),
    };
    let found = pressure_phrases_in(&text);
    (!found.is_empty()).then(|| RuleViolation {
        rule: "R5",
        detail: format!("the page says {found:?}"),
    })
}

/// The pressure phrases found in `text`.
pub fn pressure_phrases_in(text: &str) -> Vec<&'static str> {
    let mut text = normalize(text);
    for term in PRESSURE_EXEMPT_TERMS {
        text = text.replace(term, " ");
    }
    let mut found = find_phrases(&text, PRESSURE_PHRASES_JA);
    found.extend(find_phrases(&text, PRESSURE_PHRASES_EN));
    found
}

/// R7: one input per purpose, each with a label of its own.
pub async fn check_r7(client: &Client) -> Option<RuleViolation> {
    let script = format!(
        "{PRELUDE}
        const problems = [];
        const inputs = Array.from(document.querySelectorAll('input[name=purpose]'));
        const rows = Array.from(document.querySelectorAll('[data-purpose]'));
        if (inputs.length !== rows.length) {{
          problems.push(`${{inputs.length}} purpose inputs but ${{rows.length}} [data-purpose] rows`);
        }}
        for (const row of rows) {{
          const own = inputs.filter((i) => i.closest('[data-purpose]') === row);
          if (own.length !== 1) {{
            problems.push(`row data-purpose=\"${{row.dataset.purpose}}\" holds ${{own.length}} purpose inputs`);
          }}
        }}
        for (const i of inputs) {{
          const name = `purpose input value=\"${{i.value}}\"`;
          if (!i.closest('[data-purpose]')) problems.push(`${{name}} is in no [data-purpose] row`);
          const codes = (i.dataset.purposes || '').split(/[\\s,]+/).filter((c) => c);
          if (codes.length > 1) problems.push(`${{name}} grants ${{codes.join(', ')}} at once`);
          if (i.labels.length === 0) problems.push(`${{name}} has no label`);
          for (const label of i.labels) {{
            const others = Array.from(label.querySelectorAll('input, select, textarea, button'))
              .filter((c) => c !== i);
            if (others.length > 0) {{
              problems.push(`the label of ${{name}} (\"${{label.innerText.trim()}}\") also holds ${{others.length}} other control(s)`);
            }}
          }}
        }}
        return problems;"
    );
    problems_to_violation("R7", run(client, &script).await)
}

/// R8: the page language is set, and a notice in it comes before the first choice.
pub async fn check_r8(client: &Client) -> Option<RuleViolation> {
    let script = format!(
        "{PRELUDE}
        const lang = (document.documentElement.lang || '').toLowerCase().split('-')[0];
        const scripts = {{ ja: /[\\u3040-\\u30ff\\u3400-\\u9fff]/, en: /[A-Za-z]{{2,}}/ }};
        const first = choices()[0] || null;
        const firstTop = first ? first.getBoundingClientRect().top : null;
        const notices = Array.from(document.querySelectorAll('.notice')).map((n) => {{
          const text = (n.innerText || '').trim();
          return {{
            visible: visible(n) && text.length > 0,
            inLanguage: !scripts[lang] || scripts[lang].test(text),
            before: !first ||
              !!(n.compareDocumentPosition(first) & Node.DOCUMENT_POSITION_FOLLOWING),
            above: !first || n.getBoundingClientRect().top < firstTop,
          }};
        }});
        return {{ lang: document.documentElement.lang || '', notices,
                  first: first ? describe(first) : null, firstTop }};"
    );
    let page = match run(client, &script).await {
        Ok(page) => page,
        Err(e) => return problems_to_violation("R8", Err(e)),
    };
    let mut problems = Vec::new();
    problems.extend(lang_problem(page["lang"].as_str().unwrap_or_default()));
    let notices = page["notices"].as_array().cloned().unwrap_or_default();
    let is = |n: &Value, key: &str| n[key].as_bool().unwrap_or(false);
    let first = page["first"].as_str().unwrap_or_default();
    let shown: Vec<&Value> = notices.iter().filter(|n| is(n, "visible")).collect();
    let in_language: Vec<&&Value> = shown.iter().filter(|n| is(n, "inLanguage")).collect();
    if notices.is_empty() {
        problems.push("the page has no .notice".into());
    } else if shown.is_empty() {
        problems.push("no .notice is visible with text".into());
    } else if in_language.is_empty() {
        problems.push(format!(
            "no visible .notice is written in the page language {:?}",
            page["lang"].as_str().unwrap_or_default()
        ));
    } else if !in_language.iter().any(|n| is(n, "before")) {
        problems.push(format!("the notice comes after {first} in the document"));
    } else if !in_language
        .iter()
        .any(|n| is(n, "before") && is(n, "above"))
    {
        problems.push(format!(
            "the notice is not above {first} on screen (whose top is {}px)",
            page["firstTop"]
        ));
    }
    problems_to_violation("R8", Ok(Value::from(problems)))
}

/// R8, language only: `<html lang>` is one of [`PAGE_LANGUAGES`].
pub async fn check_r8_lang(client: &Client) -> Option<RuleViolation> {
    match run(client, "return document.documentElement.lang || '';").await {
        Ok(Value::String(lang)) => {
            lang_problem(&lang).map(|detail| RuleViolation { rule: "R8", detail })
        }
        Ok(other) => problems_to_violation("R8", Err(format!("unexpected {other}"))),
        Err(e) => problems_to_violation("R8", Err(e)),
    }
}

fn lang_problem(lang: &str) -> Option<String> {
    let primary = lang.split('-').next().unwrap_or_default().to_lowercase();
    if lang.is_empty() {
        Some("<html> has no lang".into())
    } else if !PAGE_LANGUAGES.contains(&primary.as_str()) {
        Some(format!(
            "<html lang={lang:?}> is not one of {PAGE_LANGUAGES:?}"
        ))
    } else {
        None
    }
}

/// R9: no double negatives in labels or buttons.
pub async fn check_r9(client: &Client) -> Option<RuleViolation> {
    let script = format!(
        "{PRELUDE}
        const selector = 'label, button, legend, option, summary, [data-purpose], ' +
          '[role=button], [role=checkbox], [role=switch], [role=radio], ' +
          'input[type=submit], input[type=button], input[type=reset]';
        const texts = [];
        for (const e of document.querySelectorAll(selector)) {{
          const text = e.tagName === 'INPUT' ? e.value : (e.innerText || e.textContent || '');
          if (text.trim()) texts.push(text);
          const aria = e.getAttribute('aria-label');
          if (aria) texts.push(aria);
        }}
        return texts;"
    );
    let texts = match run(client, &script).await {
        Ok(Value::Array(texts)) => texts,
        Ok(other) => return problems_to_violation("R9", Err(format!("unexpected {other}"))),
        Err(e) => return problems_to_violation("R9", Err(e)),
    };
    let mut problems: Vec<String> = Vec::new();
    for text in texts.iter().filter_map(Value::as_str) {
        let found = double_negatives_in(text);
        let problem = format!("{:?} says {found:?}", normalize(text));
        // A label inside a purpose row is read twice; report it once.
        if !found.is_empty() && !problems.contains(&problem) {
            problems.push(problem);
        }
    }
    problems_to_violation("R9", Ok(Value::from(problems)))
}

/// The double negatives found in `text`.
pub fn double_negatives_in(text: &str) -> Vec<&'static str> {
    let text = normalize(text);
    let mut found = find_phrases(&text, DOUBLE_NEGATIVES_JA);
    found.extend(find_phrases(&text, DOUBLE_NEGATIVES_EN));
    found
}

/// Lower-cased, typographic quotes made straight, white space runs collapsed to one space.
fn normalize(text: &str) -> String {
    let straight: String = text
        .chars()
        .map(|c| match c {
            '\u{2018}' | '\u{2019}' | '\u{2032}' | '\u{ff07}' => '\'',
            c if c.is_whitespace() => ' ',
            c => c,
        })
        .collect();
    straight
        .split(' ')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn find_phrases(normalized: &str, phrases: &[&'static str]) -> Vec<&'static str> {
    phrases
        .iter()
        .copied()
        .filter(|p| normalized.contains(&p.to_lowercase()))
        .collect()
}

async fn run(client: &Client, script: &str) -> Result<Value, String> {
    client
        .execute(script, Vec::new())
        .await
        .map_err(|e| format!("the check could not run in the page: {e}"))
}

/// A list of problems (or a failure to measure) as at most one violation.
fn problems_to_violation(
    rule: &'static str,
    result: Result<Value, String>,
) -> Option<RuleViolation> {
    let problems: Vec<String> = match result {
        Ok(Value::Array(problems)) => problems
            .into_iter()
            .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned))
            .collect(),
        Ok(other) => vec![format!("unexpected result {other}")],
        Err(e) => vec![e],
    };
    (!problems.is_empty()).then(|| RuleViolation {
        rule,
        detail: problems.join("; "),
    })
}

/// Shared page-side helpers for the check scripts.
const PRELUDE: &str = r#"
const visible = (el) => {
  if (!el || !el.isConnected) return false;
  if (typeof el.checkVisibility === 'function' &&
      !el.checkVisibility({ opacityProperty: true, visibilityProperty: true })) return false;
  const r = el.getBoundingClientRect();
  return r.width > 0 && r.height > 0;
};
const canvas = document.createElement('canvas');
canvas.width = 1; canvas.height = 1;
const paint = canvas.getContext('2d', { willReadFrequently: true });
const rgba = (css) => {
  const m = /^rgba?\(\s*([\d.]+)[,\s]+([\d.]+)[,\s]+([\d.]+)(?:\s*[,\/]\s*([\d.]+)(%?))?\s*\)$/.exec(css);
  if (m) {
    const a = m[4] === undefined ? 1 : parseFloat(m[4]) / (m[5] ? 100 : 1);
    return [parseFloat(m[1]), parseFloat(m[2]), parseFloat(m[3]), a];
  }
  paint.clearRect(0, 0, 1, 1);
  paint.fillStyle = '#000';
  paint.fillStyle = css;
  paint.fillRect(0, 0, 1, 1);
  const d = paint.getImageData(0, 0, 1, 1).data;
  return [d[0], d[1], d[2], d[3] / 255];
};
const over = (top, bottom) =>
  [0, 1, 2].map((i) => top[i] * top[3] + bottom[i] * (1 - top[3])).concat([1]);
const effectiveBackground = (el) => {
  const layers = [];
  for (let e = el; e; e = e.parentElement) {
    const c = rgba(getComputedStyle(e).backgroundColor);
    if (c[3] > 0) layers.push(c);
    if (c[3] >= 1) break;
  }
  let bg = [255, 255, 255, 1];
  for (let i = layers.length - 1; i >= 0; i--) bg = over(layers[i], bg);
  return bg;
};
const luminance = (c) => {
  const f = (v) => {
    v /= 255;
    return v <= 0.04045 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
  };
  return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]);
};
const contrast = (a, b) => {
  const x = luminance(a), y = luminance(b);
  return (Math.max(x, y) + 0.05) / (Math.min(x, y) + 0.05);
};
const describe = (el) => {
  const classes = typeof el.className === 'string' && el.className.trim()
    ? '.' + el.className.trim().split(/\s+/).join('.') : '';
  const control = ['INPUT', 'SELECT', 'TEXTAREA'].includes(el.tagName);
  let text = control ? '' : (el.innerText || '').trim();
  if (!text && el.labels && el.labels[0]) text = el.labels[0].innerText.trim();
  if (!text) text = el.value || el.getAttribute('aria-label') || '';
  return el.tagName.toLowerCase() + classes + ' "' + text.replace(/\s+/g, ' ').slice(0, 40) + '"';
};
const choices = () => Array.from(document.querySelectorAll('.choice')).filter(visible);
"#;

/// The checks against their fixtures, in one browser session per test.
mod tests {
    use super::fixtures::{self, data_url};
    use super::*;
    use crate::browser::Browser;

    async fn open(client: &Client, html: &str) {
        client.goto(&data_url(html)).await.expect("open fixture");
    }

    fn rules(violations: &[RuleViolation]) -> Vec<&'static str> {
        violations.iter().map(|v| v.rule).collect()
    }

    #[tokio::test]
    async fn consent_fixtures_pass_or_fail_exactly_their_rule() {
        let browser = Browser::start().await;
        let c = &browser.client;

        open(c, &fixtures::conforming_consent_screen()).await;
        let violations = check_consent_screen(c).await;
        assert!(
            violations.is_empty(),
            "the conforming screen fails: {violations:#?}"
        );

        for (rule, name, html) in fixtures::violating_consent_screens() {
            open(c, &html).await;
            let violations = check_consent_screen(c).await;
            assert_eq!(
                rules(&violations),
                vec![rule],
                "{name} must fail {rule} and nothing else: {violations:#?}"
            );
            let single = match rule {
                "R2" => check_r2(c).await,
                "R3" => check_r3(c).await,
                "R4" => check_r4(c).await,
                "R5" => check_r5(c).await,
                "R7" => check_r7(c).await,
                "R8" => check_r8(c).await,
                "R9" => check_r9(c).await,
                other => panic!("no check for {other}"),
            };
            assert_eq!(single.as_ref(), violations.first(), "{name}");
        }
        browser.close().await;
    }

    #[tokio::test]
    async fn portal_checks_clicks_and_links() {
        let browser = Browser::start().await;
        let c = &browser.client;

        open(c, &fixtures::conforming_portal_page()).await;
        let violations = check_portal_page(c).await;
        assert!(
            violations.is_empty(),
            "the conforming portal fails: {violations:#?}"
        );
        assert!(links_reaching(c, "/portal/consents").await);
        assert!(links_reaching(c, "/portal/audit").await);
        assert!(links_reaching(c, "/portal/audit?page=1").await);
        assert!(!links_reaching(c, "/portal/audit?page=2").await);
        assert!(!links_reaching(c, "/portal/hidden").await, "a hidden link");
        assert!(!links_reaching(c, "/portal/export").await);

        open(c, &fixtures::violates_r3_unequal_controls()).await;
        assert_eq!(rules(&check_portal_page(c).await), vec!["R3"]);
        open(c, &fixtures::violates_r8_missing_lang()).await;
        assert_eq!(rules(&check_portal_page(c).await), vec!["R8"]);

        open(c, &fixtures::click_flow_page()).await;
        let counter = ClickCounter::new(c);
        counter
            .click(Locator::Css("input[value=care]"))
            .await
            .expect("tick");
        counter
            .click(Locator::Css(".choice.accept"))
            .await
            .expect("agree");
        let status = c.find(Locator::Css("#status")).await.expect("status");
        assert_eq!(status.text().await.expect("text"), "同意済み / Agreed");
        let grant = counter.take();
        let withdraw = c
            .find(Locator::Css(".choice.withdraw"))
            .await
            .expect("withdraw");
        counter.click_element(withdraw).await.expect("withdraw");
        assert_eq!(status.text().await.expect("text"), "撤回済み / Withdrawn");
        assert_eq!((grant, counter.count()), (2, 1));
        assert_at_most(counter.count(), grant);
        assert!(check_r1(grant, counter.count()).is_some());

        browser.close().await;
    }

    #[test]
    #[should_panic(expected = "R1: 3 clicks where granting took 2")]
    fn more_clicks_to_withdraw_fails() {
        assert_at_most(3, 2);
    }

    #[test]
    fn wording_is_matched_on_normalised_text() {
        assert!(is_plain_refusal("同意しない / Decline"));
        assert!(is_plain_refusal("Don\u{2019}t agree"));
        assert!(!is_plain_refusal("あとで / Later"));
        assert!(!is_plain_refusal("今は同意しない"));
        assert!(!is_plain_refusal("閉じる / Close"));
        assert_eq!(
            pressure_phrases_in("No thanks,\nI like risk"),
            ["no thanks, i"]
        );
        assert_eq!(pressure_phrases_in("ARE YOU  SURE?"), ["are you sure"]);
        assert!(pressure_phrases_in("漏えい、滅失又は毀損する事態を防ぎます。").is_empty());
        assert!(pressure_phrases_in("利用目的を限定して提供します").is_empty());
        assert_eq!(pressure_phrases_in("同意しないと損しますよ"), ["損します"]);
        assert_eq!(double_negatives_in("I do NOT disagree"), ["not disagree"]);
        assert!(double_negatives_in("同意しない / Decline").is_empty());
        assert_eq!(
            double_negatives_in("提供しないことに同意しない"),
            ["しないことに同意しない"]
        );
    }
}
