-- Polydev controller schema, version 7: prompt runs in a user's CLI VM and
-- what they printed.

-- One prompt run. `state`: queued, running, succeeded, failed, cancelled,
-- lost. `output_offset` is how many bytes of the run's output file in the
-- VM have been read into `run_events` (a restarted controller reads on from
-- there); `next_seq` numbers the run's events. `version` bumps on every
-- change (compare-and-swap, like vms and sessions).
CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    user_id          TEXT NOT NULL REFERENCES users (id),
    vm_id            TEXT NOT NULL,
    provider         TEXT NOT NULL,
    prompt           TEXT NOT NULL,
    cwd              TEXT NOT NULL,
    timeout_secs     BIGINT NOT NULL,
    state            TEXT NOT NULL,
    reason           TEXT,
    exit_code        BIGINT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    output_offset    BIGINT NOT NULL DEFAULT 0,
    next_seq         BIGINT NOT NULL DEFAULT 2,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    version          BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX runs_user_created ON runs (user_id, created_at, id);
CREATE INDEX runs_state ON runs (state);

-- A run's events, in order: each output line parsed (`source` = 'output',
-- `kind` = the JSON object's `type`, or 'raw'), with the line as printed;
-- and its state changes (`source` = 'state'). Deleted with their run by
-- retention.
CREATE TABLE run_events (
    id      {{AUTO_ID}},
    run_id  TEXT NOT NULL REFERENCES runs (id),
    user_id TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    at      BIGINT NOT NULL,
    source  TEXT NOT NULL,
    kind    TEXT NOT NULL,
    data    TEXT NOT NULL,
    raw     TEXT NOT NULL,
    UNIQUE (run_id, seq)
);
