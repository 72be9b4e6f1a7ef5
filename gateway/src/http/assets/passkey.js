// Passkeys in the portal: sign in, prove the second factor, or register a passkey, through
// the gateway's JSON API and the browser's WebAuthn (navigator.credentials). Served from
// our own origin so the pages' Content-Security-Policy can stay `script-src 'self'`.
"use strict";

// webauthn options carry `null` for absent members; WebAuthn's JSON parsers want them absent.
function withoutNulls(value) {
  if (Array.isArray(value)) return value.map(withoutNulls);
  if (value && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) {
      if (v !== null && v !== undefined) out[k] = withoutNulls(v);
    }
    return out;
  }
  return value;
}

async function postJson(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "content-type": "application/json" },
    credentials: "same-origin",
    body: JSON.stringify(body),
  });
  const text = await response.text();
  const json = text ? JSON.parse(text) : {};
  if (!response.ok) throw new Error(json.detail || response.statusText);
  return json;
}

async function assertion(challenge) {
  const options = PublicKeyCredential.parseRequestOptionsFromJSON(
    withoutNulls(challenge.options.publicKey));
  const credential = await navigator.credentials.get({ publicKey: options });
  return credential.toJSON();
}

function say(message) {
  const box = document.getElementById("passkey-message");
  if (box) box.textContent = message;
}

function next() {
  const field = document.querySelector("input[name=next]");
  return (field && field.value) || "/portal";
}

async function signIn() {
  const username = document.querySelector("input[name=username]").value;
  if (!username) { say("ユーザー名を入力してください / Enter your username"); return; }
  const challenge = await postJson("/auth/passkey/start", { username });
  const credential = await assertion(challenge);
  await postJson("/auth/passkey/finish", { username, ceremony: challenge.ceremony, credential });
  window.location.assign(next());
}

async function secondFactor() {
  const challenge = await postJson("/auth/second-factor/passkey/start", {});
  const credential = await assertion(challenge);
  await postJson("/auth/second-factor/passkey/finish", { ceremony: challenge.ceremony, credential });
  window.location.assign(next());
}

async function register() {
  const password = document.getElementById("passkey-password").value;
  const name = document.getElementById("passkey-name").value;
  const challenge = await postJson("/auth/factors/passkeys/start", { password });
  const options = PublicKeyCredential.parseCreationOptionsFromJSON(
    withoutNulls(challenge.options.publicKey));
  const created = await navigator.credentials.create({ publicKey: options });
  const result = await postJson("/auth/factors/passkeys/finish", {
    ceremony: challenge.ceremony, name, credential: created.toJSON(),
  });
  const codes = result.recovery_codes || [];
  const list = document.getElementById("recovery-codes");
  if (list && codes.length) {
    list.replaceChildren(...codes.map((c) => { const li = document.createElement("li"); li.textContent = c; return li; }));
    list.hidden = false;
  }
  say("パスキーを登録しました / Passkey registered: " + result.passkey.name);
}

const actions = { "sign-in": signIn, "second-factor": secondFactor, "register": register };
for (const button of document.querySelectorAll("button[data-passkey]")) {
  button.addEventListener("click", (event) => {
    event.preventDefault();
    const action = actions[button.dataset.passkey];
    if (!window.PublicKeyCredential) { say("このブラウザーはパスキーに対応していません / This browser has no passkeys"); return; }
    action().catch((e) => say("パスキーを使えませんでした / The passkey did not work: " + e.message));
  });
}
