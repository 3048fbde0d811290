-- Cartridge inventory: the catalogue (types, lots), serialised cartridges and their
-- events, shipments, the cartridge each batch used, recalls and deny lists.
--
-- A cartridge's row is the fold of its events (cartridge_events, append-only): the
-- server writes an event and the state it leaves in one transaction, guarded by the
-- row's version, so stock is derived from events and never edited by hand.
CREATE TABLE cartridge_types (
    gtin                TEXT PRIMARY KEY NOT NULL,
    name                TEXT NOT NULL,
    payload             TEXT NOT NULL,
    volume_ml           REAL NOT NULL,
    storage_class       TEXT NOT NULL,
    excursion_limit_min BIGINT NOT NULL,
    device_models       TEXT NOT NULL,
    lead_time_days      BIGINT NOT NULL,
    created_by          TEXT NOT NULL,
    created_ms          BIGINT NOT NULL
);

CREATE TABLE lots (
    gtin          TEXT NOT NULL REFERENCES cartridge_types (gtin),
    lot           TEXT NOT NULL,
    produced      TEXT NOT NULL,
    expires       TEXT NOT NULL,
    expires_ms    BIGINT NOT NULL,
    quantity      BIGINT NOT NULL,
    status        TEXT NOT NULL,
    status_reason TEXT NOT NULL DEFAULT '',
    status_by     TEXT NOT NULL DEFAULT '',
    status_ms     BIGINT NOT NULL,
    created_ms    BIGINT NOT NULL,
    PRIMARY KEY (gtin, lot)
);
CREATE INDEX lots_lot ON lots (lot);

CREATE TABLE cartridges (
    gtin        TEXT NOT NULL,
    serial      TEXT NOT NULL,
    lot         TEXT NOT NULL,
    status      TEXT NOT NULL,
    site_id     TEXT NOT NULL DEFAULT '',
    device_id   TEXT NOT NULL DEFAULT '',
    shipment_id TEXT NOT NULL DEFAULT '',
    location    TEXT NOT NULL DEFAULT '',
    batch_id    TEXT NOT NULL DEFAULT '',
    expires_ms  BIGINT NOT NULL,
    version     BIGINT NOT NULL,
    updated_ms  BIGINT NOT NULL,
    PRIMARY KEY (gtin, serial)
);
CREATE INDEX cartridges_site ON cartridges (site_id, status, gtin);
CREATE INDEX cartridges_lot ON cartridges (gtin, lot, status);
CREATE INDEX cartridges_shipment ON cartridges (shipment_id);

CREATE TABLE cartridge_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    gtin      TEXT NOT NULL,
    serial    TEXT NOT NULL,
    lot       TEXT NOT NULL,
    kind      TEXT NOT NULL,
    site_id   TEXT NOT NULL DEFAULT '',
    device_id TEXT NOT NULL DEFAULT '',
    at_ms     BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX cartridge_events_cartridge ON cartridge_events (gtin, serial, id);
CREATE INDEX cartridge_events_site_kind ON cartridge_events (site_id, kind, at_ms);

CREATE TRIGGER cartridge_events_no_update BEFORE UPDATE ON cartridge_events
BEGIN
    SELECT RAISE(ABORT, 'cartridge events are append-only');
END;
CREATE TRIGGER cartridge_events_no_delete BEFORE DELETE ON cartridge_events
BEGIN
    SELECT RAISE(ABORT, 'cartridge events are append-only');
END;

CREATE TABLE shipments (
    shipment_id       TEXT PRIMARY KEY NOT NULL,
    site_id           TEXT NOT NULL,
    gtin              TEXT NOT NULL,
    lot               TEXT NOT NULL,
    count             BIGINT NOT NULL,
    sent_by           TEXT NOT NULL,
    sent_ms           BIGINT NOT NULL,
    received_count    BIGINT NOT NULL DEFAULT 0,
    received_ms       BIGINT NOT NULL DEFAULT 0,
    readings          TEXT NOT NULL DEFAULT '',
    excursion_minutes REAL NOT NULL DEFAULT 0,
    blocked           BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX shipments_site ON shipments (site_id, sent_ms);

-- The cartridge each batch used, as the device's signed record names it: the trace
-- from a lot to its runs, prescriptions and patients.
CREATE TABLE batch_cartridges (
    batch_id          TEXT PRIMARY KEY NOT NULL,
    gtin              TEXT NOT NULL,
    lot               TEXT NOT NULL,
    serial            TEXT NOT NULL,
    device_id         TEXT NOT NULL,
    site_id           TEXT NOT NULL,
    prescription_id   TEXT NOT NULL,
    patient_pseudonym TEXT NOT NULL,
    started_ms        BIGINT NOT NULL
);
CREATE INDEX batch_cartridges_lot ON batch_cartridges (lot, gtin);

CREATE TABLE recalls (
    recall_id    TEXT PRIMARY KEY NOT NULL,
    gtin         TEXT NOT NULL,
    lot          TEXT NOT NULL,
    reason       TEXT NOT NULL,
    signer_id    TEXT NOT NULL,
    printed_name TEXT NOT NULL,
    signed_ms    BIGINT NOT NULL,
    deny_version BIGINT NOT NULL
);

-- Each deny list as signed (an encoded DSSE Envelope), newest the one in force.
CREATE TABLE deny_lists (
    version   BIGINT PRIMARY KEY NOT NULL,
    issued_ms BIGINT NOT NULL,
    signer_id TEXT NOT NULL,
    lots      BIGINT NOT NULL,
    cartridges BIGINT NOT NULL,
    envelope  BLOB NOT NULL
);

-- What each device last answered about a deny list.
CREATE TABLE deny_list_acks (
    device_id TEXT PRIMARY KEY NOT NULL,
    version   BIGINT NOT NULL,
    result    TEXT NOT NULL,
    code      TEXT NOT NULL DEFAULT '',
    reason    TEXT NOT NULL DEFAULT '',
    acked_ms  BIGINT NOT NULL
);
