-- Polydev controller schema, version 5: which CLI VM holds each credential.

-- The CLI VM the credential's current version was delivered to: set in the
-- same transaction as the delivering session's `completed`, cleared when a
-- new version is sealed (not delivered yet) and when that VM is destroyed
-- or fails. NULL: held by no VM (the vault copy only).
ALTER TABLE credentials ADD COLUMN holder_vm_id TEXT;

-- Every VM that ends clears what it held: found by this index, not a scan.
CREATE INDEX credentials_holder ON credentials (holder_vm_id);
