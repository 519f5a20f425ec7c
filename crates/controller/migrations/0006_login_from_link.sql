-- Polydev controller schema, version 6: login sessions remember whether a
-- one-time login link started them.

-- An administrator's login link is how a person who lost their password
-- gets back in: the session it starts may set a new password without the
-- old one (every session of the account ends when it does). 0: started by
-- a password.
ALTER TABLE login_sessions ADD COLUMN from_link BIGINT NOT NULL DEFAULT 0;
