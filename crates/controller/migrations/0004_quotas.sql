-- Polydev controller schema, version 4: one CLI VM per user, enforced by the
-- database, and the per-account backoff after failed password logins.

-- A database that got two live CLI VMs for one user through the old
-- check-then-insert race is settled first: every such VM but the newest (the
-- one the API and the driver use) is moved to `stopping`, with its event, and
-- the driver then destroys it at its host.
-- dialect: sqlite
INSERT INTO events (at, subject_kind, subject_id, user_id, kind, from_state, to_state, detail)
SELECT CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER),
-- dialect: end
-- dialect: postgres
INSERT INTO events (at, subject_kind, subject_id, user_id, kind, from_state, to_state, detail)
SELECT CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT),
-- dialect: end
       'vm', v.id, v.user_id, 'state', v.state, 'stopping',
       '{"version":' || CAST(v.version + 1 AS TEXT) || ',"detail":"a second live CLI VM of this user (migration 4 keeps the newest)"}'
FROM vms v
WHERE v.kind = 'cli' AND v.state NOT IN ('stopping', 'destroyed', 'failed')
  AND EXISTS (SELECT 1 FROM vms n
              WHERE n.user_id = v.user_id AND n.kind = 'cli'
                AND n.state NOT IN ('stopping', 'destroyed', 'failed')
                AND (n.created_at > v.created_at OR (n.created_at = v.created_at AND n.id > v.id)));

UPDATE vms SET state = 'stopping', version = version + 1, deadline_at = NULL
WHERE kind = 'cli' AND state NOT IN ('stopping', 'destroyed', 'failed')
  AND EXISTS (SELECT 1 FROM vms n
              WHERE n.user_id = vms.user_id AND n.kind = 'cli'
                AND n.state NOT IN ('stopping', 'destroyed', 'failed')
                AND (n.created_at > vms.created_at OR (n.created_at = vms.created_at AND n.id > vms.id)));

-- At most one CLI VM per user that is not on its way out: concurrent creates
-- are settled by this index (the loser's INSERT fails and its transaction
-- rolls back), not by a check before the insert. `stopping` is left out
-- because a stopping VM never runs again.
CREATE UNIQUE INDEX vms_one_cli_per_user ON vms (user_id)
    WHERE kind = 'cli' AND state NOT IN ('stopping', 'destroyed', 'failed');

-- Failed password logins per submitted name (known or not, so the answer
-- does not tell which names exist), independent of the client address.
-- `until_at`: no password is checked for this name before then.
CREATE TABLE login_backoff (
    name       TEXT PRIMARY KEY,
    failures   BIGINT NOT NULL,
    until_at   BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
