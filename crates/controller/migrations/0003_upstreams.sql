-- Polydev controller schema, version 3: upstream proxy assignment (issue 4 §3).
-- A user's port on one of the operator's upstream providers (a port is a
-- stable outbound IP): one assignment per user, one user per (provider, port).
-- Replaces version 1's single-range `upstream_port_assignments`, whose rows
-- move to the provider named "default".

CREATE TABLE upstream_assignments (
    user_id     TEXT PRIMARY KEY REFERENCES users (id),
    provider    TEXT NOT NULL,
    port        BIGINT NOT NULL,
    -- 1 when an operator chose the port (`polydev upstream pin`).
    pinned      BIGINT NOT NULL DEFAULT 0,
    assigned_at BIGINT NOT NULL,
    UNIQUE (provider, port)
);

-- Released ports: nobody but their previous user gets them before `until_at`.
CREATE TABLE upstream_quarantine (
    provider    TEXT NOT NULL,
    port        BIGINT NOT NULL,
    user_id     TEXT NOT NULL,
    released_at BIGINT NOT NULL,
    until_at    BIGINT NOT NULL,
    PRIMARY KEY (provider, port)
);
CREATE INDEX upstream_quarantine_until ON upstream_quarantine (until_at);

INSERT INTO upstream_assignments (user_id, provider, port, pinned, assigned_at)
    SELECT user_id, 'default', port, 0, assigned_at FROM upstream_port_assignments;
DROP TABLE upstream_port_assignments;
