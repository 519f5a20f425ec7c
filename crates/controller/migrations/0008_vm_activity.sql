-- Polydev controller schema, version 8: when a person last used each VM.

-- Milliseconds since the epoch of the last use of the VM that the idle
-- hibernation counts from: a terminal attached (refreshed while it stays
-- attached), a run or a delivery. NULL: never used since it was created;
-- the time it entered its state counts then. Written without a version
-- bump: a use is not a change of state and must not make the driver's
-- compare-and-swap on the row fail.
ALTER TABLE vms ADD COLUMN active_at BIGINT;

-- The idle check asks whether a VM has runs still going: by this index,
-- not a scan of every user's history.
CREATE INDEX runs_vm_state ON runs (vm_id, state);
