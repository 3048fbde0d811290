-- The audit trail: one row per change of state, each holding the SHA-256 of the row
-- before it, so an edit, insertion or deletion anywhere breaks the chain from there on.
-- Rows are only ever inserted; the triggers below make an UPDATE or DELETE through
-- any SQL fail too, so tampering takes dropping them first (and still shows in the
-- chain).
CREATE TABLE audit_log (
    seq         BIGINT PRIMARY KEY NOT NULL,
    at_ms       BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    subject     TEXT NOT NULL,
    site_id     TEXT,
    reason      TEXT NOT NULL,
    old_value   TEXT,
    new_value   TEXT,
    prev_hash   BLOB NOT NULL,
    hash        BLOB NOT NULL
);
CREATE INDEX audit_log_actor ON audit_log (actor, seq);
CREATE INDEX audit_log_subject ON audit_log (subject, seq);
CREATE INDEX audit_log_site ON audit_log (site_id, seq);
CREATE INDEX audit_log_at ON audit_log (at_ms);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit records are append-only');
END;

CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit records are append-only');
END;

-- The newest record's seq and hash, in one row. Every append updates it first, which
-- serialises appends (the write lock on SQLite, a row lock on PostgreSQL) so that two
-- writers never chain onto the same record.
CREATE TABLE audit_head (
    id      BIGINT PRIMARY KEY NOT NULL CHECK (id = 1),
    seq     BIGINT NOT NULL,
    hash    BLOB NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, zeroblob(32));

-- Signed statements "the chain had this head at this seq", by a key held outside the
-- database: a deleted or rewritten tail no longer matches them.
CREATE TABLE audit_checkpoints (
    seq           BIGINT NOT NULL,
    head_hash     BLOB NOT NULL,
    signed_at_ms  BIGINT NOT NULL,
    key_id        TEXT NOT NULL,
    signature     BLOB NOT NULL,
    PRIMARY KEY (seq, key_id)
);

CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit checkpoints are append-only');
END;

CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit checkpoints are append-only');
END;
