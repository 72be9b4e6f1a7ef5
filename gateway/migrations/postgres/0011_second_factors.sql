-- Second factors (TOTP, passkeys, recovery codes), the stage a session has reached, and
-- break-glass (emergency) operator accounts with their reviewed uses. Times are Unix ms.

-- `stage`: 'second-factor' until the second factor is proven, then 'complete'.
-- `method`: how the session was established (password, password+totp, passkey, …).
ALTER TABLE sessions ADD COLUMN stage TEXT NOT NULL DEFAULT 'complete';
ALTER TABLE sessions ADD COLUMN method TEXT NOT NULL DEFAULT 'password';
ALTER TABLE sessions ADD COLUMN emergency_use_id TEXT;

-- 1 for break-glass accounts: they never sign in through the normal path.
ALTER TABLE accounts ADD COLUMN emergency BIGINT NOT NULL DEFAULT 0;

-- TOTP secrets are sealed with the account's own key; `last_step` refuses a code reused
-- within its step (RFC 6238 §5.2).
CREATE TABLE totp_factors (
    account_id TEXT PRIMARY KEY REFERENCES accounts(id),
    secret_sealed BYTEA,
    confirmed_at BIGINT,
    -- A new secret waiting for its first code; the confirmed one stays in force meanwhile.
    pending_sealed BYTEA,
    last_step BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

-- A passkey's public key and metadata (nothing secret); `counter` catches cloned keys.
CREATE TABLE passkeys (
    credential_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    passkey TEXT NOT NULL,
    counter BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT
);
CREATE INDEX passkeys_by_account ON passkeys (account_id);

CREATE TABLE recovery_codes (
    account_id TEXT NOT NULL REFERENCES accounts(id),
    code_hash BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    used_at BIGINT,
    PRIMARY KEY (account_id, code_hash)
);

-- A WebAuthn ceremony's server-side state between its start and finish (any process).
CREATE TABLE webauthn_ceremonies (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    kind TEXT NOT NULL CHECK (kind IN ('register', 'authenticate')),
    state TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- Each break-glass use: why, during which outage, until when, and its mandatory review.
CREATE TABLE emergency_uses (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    session_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    outage TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    ends_at BIGINT NOT NULL,
    actions BIGINT NOT NULL DEFAULT 0,
    reviewed_by TEXT REFERENCES accounts(id),
    reviewed_at BIGINT,
    review_note TEXT
);
CREATE INDEX emergency_uses_unreviewed ON emergency_uses (started_at) WHERE reviewed_at IS NULL;

-- The one-time secret of a break-glass account is spent by its use.
ALTER TABLE accounts ADD COLUMN secret_spent_at BIGINT;
