-- Polydev controller schema, version 9: custody of delivered credentials.

-- When the sealed version's tokens were last obtained (sign-in or a
-- refresh written back from the holder), ms; NULL before this migration.
ALTER TABLE credentials ADD COLUMN refreshed_at BIGINT;
-- When the sealed version's access token expires, ms, when its files say
-- (`expires_at`, `expiresAt`, `expiry_date`, …); NULL: not readable.
ALTER TABLE credentials ADD COLUMN expires_at BIGINT;
-- `ok`, or `needs_login` once the credential is known dead (a refresh
-- refused, the CLI blanked its tokens): only a new sign-in revives it.
ALTER TABLE credentials ADD COLUMN status TEXT NOT NULL DEFAULT 'ok';
-- Why it needs a login (never a secret).
ALTER TABLE credentials ADD COLUMN status_reason TEXT;
