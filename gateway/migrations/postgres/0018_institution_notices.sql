-- Vulnerability and end-of-life notices are also pushed to the institutions and recipients
-- that registered a webhook endpoint (their OAuth client): such a delivery names the client,
-- which is the signed event's audience. Operators' deliveries leave it NULL.
ALTER TABLE alert_deliveries ADD COLUMN client_id TEXT REFERENCES oauth_clients(id);
