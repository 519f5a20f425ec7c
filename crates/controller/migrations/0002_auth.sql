-- Polydev controller schema, version 2: accounts and authorization.
-- `users` and `api_tokens` exist since version 1. Every secret below (cookie,
-- ticket, login link) is stored only as the hex SHA-256 of its value: the
-- values are 256-bit random, so a fast hash is enough and a database dump
-- grants nothing.

-- Dashboard login sessions (the `polydev_session` cookie).
CREATE TABLE login_sessions (
    id_hash      TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   BIGINT NOT NULL,
    -- Absolute end, fixed at login.
    expires_at   BIGINT NOT NULL,
    -- Idle expiry counts from here; refreshed (coarsely) on use.
    last_seen_at BIGINT NOT NULL
);
CREATE INDEX login_sessions_user ON login_sessions (user_id);
CREATE INDEX login_sessions_expires ON login_sessions (expires_at);

-- Single-use tickets for desktop/terminal WebSocket streams, bound to
-- (user, kind, resource).
CREATE TABLE stream_tickets (
    ticket_hash TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT
);
CREATE INDEX stream_tickets_expires ON stream_tickets (expires_at);

-- One-time login links (the first-start admin link).
CREATE TABLE login_links (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT
);

-- Accounts of externally issued JWTs: (issuer, subject) -> user.
CREATE TABLE external_identities (
    issuer     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    user_id    TEXT NOT NULL UNIQUE REFERENCES users (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (issuer, subject)
);
