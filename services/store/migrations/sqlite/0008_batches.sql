-- Runs and batch records.
--
-- A run request is what a pharmacist asked a device to do and what the device
-- answered. A batch record is the signed record a device emits when a run ends:
-- envelope holds the encoded SignedBatchRecord exactly as received (the device's
-- signature covers it); the other columns repeat what lists filter and sort by.
-- A decision is QA's release or rejection, bound to the record's digest.
CREATE TABLE run_requests (
    request_id     TEXT PRIMARY KEY NOT NULL,
    device_id      TEXT NOT NULL,
    site_id        TEXT NOT NULL,
    recipe_id      TEXT NOT NULL,
    recipe_version BIGINT NOT NULL,
    requested_by   TEXT NOT NULL,
    requested_ms   BIGINT NOT NULL,
    state          TEXT NOT NULL,
    code           TEXT NOT NULL DEFAULT '',
    reason         TEXT NOT NULL DEFAULT '',
    batch_id       TEXT NOT NULL DEFAULT '',
    answered_ms    BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX run_requests_device ON run_requests (device_id, requested_ms);

CREATE TABLE batch_records (
    batch_id           TEXT PRIMARY KEY NOT NULL,
    device_id          TEXT NOT NULL,
    site_id            TEXT NOT NULL,
    recipe_id          TEXT NOT NULL,
    recipe_version     BIGINT NOT NULL,
    started_ms         BIGINT NOT NULL,
    ended_ms           BIGINT NOT NULL,
    outcome            TEXT NOT NULL,
    qc_passed          BIGINT NOT NULL,
    started_by         TEXT NOT NULL,
    started_by_name    TEXT NOT NULL,
    cartridge_lot      TEXT NOT NULL,
    prescription_id    TEXT NOT NULL,
    certificate_serial TEXT NOT NULL,
    record_digest      TEXT NOT NULL,
    envelope           BLOB NOT NULL,
    received_ms        BIGINT NOT NULL
);
CREATE INDEX batch_records_site ON batch_records (site_id, started_ms);
CREATE INDEX batch_records_device ON batch_records (device_id, started_ms);
CREATE INDEX batch_records_started ON batch_records (started_ms);

CREATE TABLE batch_decisions (
    batch_id       TEXT PRIMARY KEY NOT NULL REFERENCES batch_records (batch_id),
    meaning        TEXT NOT NULL,
    signer_id      TEXT NOT NULL,
    printed_name   TEXT NOT NULL,
    reason         TEXT NOT NULL,
    signed_ms      BIGINT NOT NULL,
    record_digest  TEXT NOT NULL
);

-- Records and decisions are never edited or removed.
CREATE TRIGGER batch_records_no_update BEFORE UPDATE ON batch_records
BEGIN
    SELECT RAISE(ABORT, 'batch records are immutable');
END;

CREATE TRIGGER batch_records_no_delete BEFORE DELETE ON batch_records
BEGIN
    SELECT RAISE(ABORT, 'batch records are immutable');
END;

CREATE TRIGGER batch_decisions_no_update BEFORE UPDATE ON batch_decisions
BEGIN
    SELECT RAISE(ABORT, 'batch decisions are immutable');
END;

CREATE TRIGGER batch_decisions_no_delete BEFORE DELETE ON batch_decisions
BEGIN
    SELECT RAISE(ABORT, 'batch decisions are immutable');
END;
