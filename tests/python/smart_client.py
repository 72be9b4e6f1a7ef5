#!/usr/bin/env python3
"""A SMART on FHIR app against the gateway, with the real `fhirclient` library.

The library discovers the OAuth endpoints from `/fhir/metadata`, builds the authorisation
request (PKCE S256, `state`, `aud`), exchanges the code with `client_secret_basic`, and does
every FHIR read and search. This script only plays the patient's browser in between: it
opens the authorisation URL, signs in on the form the gateway shows, ticks one purpose and
the observation and demographics categories on the consent screen, and hands the redirect
back to the library.

Run by the end-to-end test `fhir_client`. Input (environment):
  SMART_GATEWAY_URL   the gateway's base URL (its FHIR base is <url>/fhir)
  SMART_CLIENT_ID, SMART_CLIENT_SECRET, SMART_REDIRECT_URI   the registered client
  SMART_USERNAME, SMART_PASSWORD   the patient's sign-in
  SMART_CA_BUNDLE     PEM file of the certificate(s) to trust for HTTPS
Output: one JSON summary on stdout. Exit 0 when every step did what a client expects,
2 when a step failed (the reason on stderr), 3 when a package is missing; an error the
library raises ends it with a traceback (exit 1).
"""

import html.parser
import json
import os
import sys
import urllib.parse

try:
    import requests
    import fhirclient
    from fhirclient import client as smart
    from fhirclient.models.bundle import Bundle
    from fhirclient.models.condition import Condition
    from fhirclient.models.observation import Observation
    from fhirclient.server import FHIRPermissionDeniedException
except ImportError as missing:
    print(
        f"smart_client.py: a required package is missing ({missing}); "
        "install them with: python3 -m pip install -r tests/python/requirements.txt",
        file=sys.stderr,
    )
    sys.exit(3)

# What the app asks for: the patient's context, who they are, and three resource types;
# the patient will agree to two of the three kinds of data.
SCOPE = "openid fhirUser patient/Patient.rs patient/Observation.rs patient/Condition.rs"
CHOSEN_CATEGORIES = ["demographics", "observations"]


class Failed(Exception):
    pass


def env(name):
    value = os.environ.get(name)
    if not value:
        raise Failed(f"environment variable {name} is not set")
    return value


class Forms(html.parser.HTMLParser):
    """The forms of a page: action, method, and their inputs (name, type, value, attrs)."""

    def __init__(self):
        super().__init__()
        self.forms = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.forms.append(
                {"action": attrs.get("action"), "method": attrs.get("method"), "inputs": []}
            )
        elif tag in ("input", "button") and self.forms:
            self.forms[-1]["inputs"].append(attrs)


def forms_of(page):
    parser = Forms()
    parser.feed(page)
    return parser.forms


def redirect_target(response, expected):
    if response.status_code not in (302, 303):
        raise Failed(
            f"{response.request.method} {response.url}: expected a redirect, got "
            f"{response.status_code}: {response.text[:500]}"
        )
    location = response.headers["Location"]
    if expected is not None and not location.startswith(expected):
        raise Failed(f"redirected to {location}, expected {expected}…")
    return location


def browser_consents(authorize_url, gateway, ca_bundle, username, password, redirect_uri):
    """The patient's browser: from the app's authorisation URL to the app's redirect."""
    browser = requests.Session()
    # The gateway is on this machine: no proxies or CA settings from the environment.
    browser.trust_env = False
    browser.verify = ca_bundle
    origin = {"Origin": gateway}

    screen_path = redirect_target(
        browser.get(authorize_url, allow_redirects=False), "/consent/authorize/"
    )
    screen_url = urllib.parse.urljoin(gateway, screen_path)

    # Not signed in yet: the screen offers the sign-in form that comes back to it.
    page = browser.get(screen_url)
    page.raise_for_status()
    sign_in = next((f for f in forms_of(page.text) if f["action"] == "/portal/login"), None)
    if sign_in is None:
        raise Failed("the consent screen did not offer a sign-in form")
    fields = {i["name"]: i.get("value", "") for i in sign_in["inputs"] if i.get("name")}
    fields.update({"username": username, "password": password})
    back = redirect_target(
        browser.post(
            urllib.parse.urljoin(gateway, sign_in["action"]),
            data=fields,
            headers=origin,
            allow_redirects=False,
        ),
        "/consent/authorize/",
    )
    if back != screen_path:
        raise Failed(f"sign-in led to {back}, not back to {screen_path}")

    # The consent screen itself: one box per purpose and per category, none ticked.
    page = browser.get(screen_url)
    page.raise_for_status()
    consent = next((f for f in forms_of(page.text) if f["action"] == screen_path), None)
    if consent is None:
        raise Failed("no consent form on the screen")
    boxes = [i for i in consent["inputs"] if i.get("type") == "checkbox"]
    if any("checked" in box for box in boxes):
        raise Failed("a box was ticked before the patient chose")
    purposes = [b for b in boxes if b.get("name") == "purpose"]
    offered = sorted(b["value"] for b in boxes if b.get("name") == "category")
    # The purpose the app needs for its basic service; nothing else.
    needed = [b["value"] for b in purposes if b.get("data-required") == "true"]
    if not needed:
        raise Failed("the screen marks no purpose as needed for the app's service")
    ends_on = next(i.get("value") for i in consent["inputs"] if i.get("name") == "ends_on")
    form = [("action", "grant"), ("ends_on", ends_on)]
    form += [("purpose", code) for code in needed]
    form += [("category", code) for code in CHOSEN_CATEGORIES]
    back_to_app = redirect_target(
        browser.post(screen_url, data=form, headers=origin, allow_redirects=False),
        redirect_uri,
    )
    return back_to_app, {"purposes": needed, "categories_offered": offered}


def main():
    gateway = env("SMART_GATEWAY_URL").rstrip("/")
    ca_bundle = env("SMART_CA_BUNDLE")
    redirect_uri = env("SMART_REDIRECT_URI")

    app = smart.FHIRClient(
        settings={
            "app_id": env("SMART_CLIENT_ID"),
            "app_secret": env("SMART_CLIENT_SECRET"),
            "api_base": f"{gateway}/fhir",
            "redirect_uri": redirect_uri,
            "scope": SCOPE,
        }
    )
    app.server.session.trust_env = False
    app.server.session.verify = ca_bundle

    # Discovery from the CapabilityStatement; nothing is authorised yet.
    if app.prepare():
        raise Failed("the client thinks it is authorised before any authorisation")
    authorize_url = app.authorize_url
    request = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(authorize_url).query))
    if request.get("code_challenge_method") != "S256":
        raise Failed(f"the library did not ask with PKCE S256: {request}")

    callback, screen = browser_consents(
        authorize_url, gateway, ca_bundle, env("SMART_USERNAME"), env("SMART_PASSWORD"),
        redirect_uri,
    )
    # The library checks `state` and exchanges the code (client_secret_basic, PKCE verifier).
    app.handle_callback(callback)
    if not app.ready or not app.patient_id:
        raise Failed(f"no token or no patient context after the exchange: {app.launch_context}")

    patient = app.patient
    if patient is None:
        raise Failed(f"Patient/{app.patient_id} could not be read")

    # Small pages, so the library follows `next` links.
    observations = []
    observation_pages = 0
    search = Observation.where({"patient": app.patient_id, "_count": "2"})
    for page in search.perform_iter(app.server):
        observation_pages += 1
        observations += [entry.resource for entry in page.entry or []]

    # Conditions were asked for but not consented to: the search is refused.
    condition_status = None
    condition_outcome = None
    try:
        found = list(Condition.where({"patient": app.patient_id}).perform_resources_iter(app.server))
        condition_status = 200
        condition_outcome = f"{len(found)} conditions returned"
    except FHIRPermissionDeniedException as refused:
        condition_status = refused.response.status_code
        condition_outcome = refused.response.json().get("resourceType")

    # Patient/$everything, every page, through the library's Bundle model.
    everything = {}
    bundle = Bundle.read_from(f"Patient/{app.patient_id}/$everything?_count=2", app.server)
    pages = 0
    while bundle is not None:
        pages += 1
        if pages > 50:
            raise Failed("$everything paging never ends")
        for entry in bundle.entry or []:
            kind = entry.resource.resource_type
            everything[kind] = everything.get(kind, 0) + 1
        following = [link.url for link in bundle.link or [] if link.relation == "next"]
        bundle = Bundle.read_from(following[0], app.server) if following else None

    summary = {
        "library": f"fhirclient {fhirclient.__version__}",
        "authorize_request": {
            "code_challenge_method": request.get("code_challenge_method"),
            "aud": request.get("aud"),
            "scope": request.get("scope"),
        },
        "consent_screen": screen,
        "granted_scope": app.launch_context.get("scope"),
        "patient_id": app.patient_id,
        "patient_name": [n.text for n in patient.name or [] if n.text],
        "observations": len(observations),
        "observation_pages": observation_pages,
        "observation_codes": sorted(
            c.code for o in observations for c in (o.code.coding or []) if c.code
        ),
        "observation_subjects": sorted({o.subject.reference for o in observations}),
        "condition_search": {"status": condition_status, "body": condition_outcome},
        "everything": everything,
        "everything_pages": pages,
    }
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    try:
        main()
    except Failed as failure:
        print(f"smart_client.py: {failure}", file=sys.stderr)
        sys.exit(2)
