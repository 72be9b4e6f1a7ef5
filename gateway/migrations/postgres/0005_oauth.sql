-- The gateway's OAuth 2 authorisation server for PHR apps (PostgreSQL). Times are Unix
-- milliseconds. Codes and tokens are stored only as SHA-256 digests.

-- Apps (recipients) registered by an operator. Exactly one way to authenticate: a JWK Set
-- (private_key_jwt) or an Argon2id hash of a generated secret (client_secret_basic).
CREATE TABLE oauth_clients (
    id TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    redirect_uris TEXT NOT NULL,
    jwks TEXT,
    secret_hash TEXT,
    recipient_name TEXT NOT NULL,
    recipient_identifier TEXT NOT NULL,
    compliance_statement TEXT NOT NULL,
    compliance_declared_on TEXT NOT NULL,
    registered_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    CHECK ((jwks IS NULL) <> (secret_hash IS NULL))
);

-- Authorisation requests waiting for the patient's decision on the consent page; decided
-- once (approved or declined).
CREATE TABLE oauth_authorization_requests (
    id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL REFERENCES oauth_clients(id),
    redirect_uri TEXT NOT NULL,
    state TEXT NOT NULL,
    code_challenge TEXT NOT NULL,
    scopes TEXT NOT NULL,
    -- The gateway's issuer identifier, returned as `iss` with the answer (RFC 9207).
    issuer TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    decision TEXT CHECK (decision IN ('approved', 'declined')),
    decided_at BIGINT
);

-- Authorisation codes: one-time, short-lived, bound to client, redirect URI, PKCE
-- challenge, patient, consent and the granted scopes. `family_id` names every token
-- descended from the code.
CREATE TABLE oauth_codes (
    code_hash BYTEA PRIMARY KEY,
    request_id TEXT NOT NULL REFERENCES oauth_authorization_requests(id),
    client_id TEXT NOT NULL REFERENCES oauth_clients(id),
    redirect_uri TEXT NOT NULL,
    code_challenge TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    consent_id TEXT NOT NULL,
    scopes TEXT NOT NULL,
    family_id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX oauth_codes_by_consent ON oauth_codes (consent_id);

-- Access and refresh tokens. A refresh token is used once (rotation); `scopes` of a
-- refresh token is the whole original grant.
CREATE TABLE oauth_tokens (
    token_hash BYTEA PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('access', 'refresh')),
    client_id TEXT NOT NULL REFERENCES oauth_clients(id),
    patient_id TEXT,
    consent_id TEXT,
    scopes TEXT NOT NULL,
    family_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX oauth_tokens_by_family ON oauth_tokens (family_id);
CREATE INDEX oauth_tokens_by_consent ON oauth_tokens (consent_id);

-- `jti`s of accepted client assertions, shared by every gateway process: the UNIQUE key
-- refuses a replay. Rows past `expires_at` may be pruned.
CREATE TABLE oauth_assertion_jtis (
    client_id TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE INDEX oauth_assertion_jtis_by_expiry ON oauth_assertion_jtis (expires_at);
