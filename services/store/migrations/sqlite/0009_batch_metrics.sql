-- What monitoring reads from each batch record: the strata it belongs to and the
-- measured quality attributes and process signals, one row per batch. Derived from
-- the signed record (batch_records.envelope), so it can always be rebuilt from it;
-- seq orders rows by arrival so a reader can follow the table by tailing it.
CREATE TABLE batch_metrics (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id           TEXT NOT NULL UNIQUE REFERENCES batch_records (batch_id),
    device_id          TEXT NOT NULL,
    site_id            TEXT NOT NULL,
    model              TEXT NOT NULL,
    firmware_version   TEXT NOT NULL,
    recipe_id          TEXT NOT NULL,
    recipe_version     BIGINT NOT NULL,
    cartridge_lot      TEXT NOT NULL,
    ended_ms           BIGINT NOT NULL,
    outcome            TEXT NOT NULL,
    qc_passed          BIGINT NOT NULL,
    size_nm            REAL,
    pdi                REAL,
    encapsulation_pct  REAL,
    ph                 REAL,
    yield_pct          REAL,
    flow_cv            REAL,
    max_pressure_mbar  REAL,
    frr_error_pct      REAL,
    alarms             BIGINT NOT NULL
);

-- A recipe version's release criteria per attribute, as the devices applied them:
-- the specification limits capability is computed against.
CREATE TABLE quality_limits (
    recipe_id      TEXT NOT NULL,
    recipe_version BIGINT NOT NULL,
    attribute      TEXT NOT NULL,
    lo             REAL,
    hi             REAL,
    PRIMARY KEY (recipe_id, recipe_version, attribute)
);
