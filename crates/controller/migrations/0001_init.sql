-- Polydev controller schema, version 1.
-- One migration set for SQLite and PostgreSQL. The runner (src/store/migrate.rs)
-- substitutes {{AUTO_ID}} and {{BLOB}} per dialect and keeps only the blocks
-- between `-- dialect: <name>` and `-- dialect: end` that match; everything else
-- is portable SQL. Timestamps are milliseconds since the Unix epoch (BIGINT) so
-- both dialects compare and sort them the same way.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    role          TEXT NOT NULL CHECK (role IN ('user', 'admin')),
    password_hash TEXT,
    created_at    BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    token_hash   TEXT NOT NULL UNIQUE,
    scopes       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    revoked_at   BIGINT,
    last_used_at BIGINT
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

CREATE TABLE hosts (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    address           TEXT NOT NULL,
    vcpus             BIGINT NOT NULL,
    memory_mib        BIGINT NOT NULL,
    state             TEXT NOT NULL,
    last_heartbeat_at BIGINT,
    created_at        BIGINT NOT NULL
);

CREATE TABLE vms (
    id             TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL REFERENCES users (id),
    kind           TEXT NOT NULL CHECK (kind IN ('browser', 'cli')),
    host_id        TEXT REFERENCES hosts (id),
    host_vm_id     TEXT,
    state          TEXT NOT NULL,
    state_since    BIGINT NOT NULL,
    deadline_at    BIGINT,
    attempts       BIGINT NOT NULL,
    failure_reason TEXT,
    failure_detail TEXT,
    version        BIGINT NOT NULL,
    created_at     BIGINT NOT NULL
);
CREATE INDEX vms_user ON vms (user_id);
CREATE INDEX vms_state ON vms (state);

CREATE TABLE sessions (
    id             TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL REFERENCES users (id),
    provider       TEXT NOT NULL,
    browser_vm_id  TEXT REFERENCES vms (id),
    state          TEXT NOT NULL,
    state_since    BIGINT NOT NULL,
    deadline_at    BIGINT,
    attempts       BIGINT NOT NULL,
    failure_reason TEXT,
    failure_detail TEXT,
    version        BIGINT NOT NULL,
    created_at     BIGINT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE INDEX sessions_state ON sessions (state);

-- One sealed record per (user, provider); `version` is part of the record's
-- associated data, so it increases on every new plaintext.
CREATE TABLE credentials (
    user_id     TEXT NOT NULL REFERENCES users (id),
    provider    TEXT NOT NULL,
    version     BIGINT NOT NULL,
    key_id      TEXT NOT NULL,
    wrapped_key {{BLOB}} NOT NULL,
    nonce       {{BLOB}} NOT NULL,
    ciphertext  {{BLOB}} NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (user_id, provider)
);
CREATE INDEX credentials_key ON credentials (key_id);

-- A user's upstream proxy port is a stable outbound IP: never shared.
CREATE TABLE upstream_port_assignments (
    port        BIGINT PRIMARY KEY,
    user_id     TEXT NOT NULL UNIQUE REFERENCES users (id),
    assigned_at BIGINT NOT NULL
);

-- The audit trail and every session's timeline. Append-only: enforced below.
CREATE TABLE events (
    id           {{AUTO_ID}},
    at           BIGINT NOT NULL,
    subject_kind TEXT NOT NULL,
    subject_id   TEXT NOT NULL,
    user_id      TEXT,
    kind         TEXT NOT NULL,
    from_state   TEXT,
    to_state     TEXT,
    detail       TEXT NOT NULL
);
CREATE INDEX events_subject ON events (subject_kind, subject_id, id);

-- dialect: sqlite
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
-- dialect: end

-- dialect: postgres
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'events are append-only'; END;
$$;
CREATE TRIGGER events_no_change BEFORE UPDATE OR DELETE ON events
FOR EACH ROW EXECUTE FUNCTION events_append_only();
-- dialect: end
