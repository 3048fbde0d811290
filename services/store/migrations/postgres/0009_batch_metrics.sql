-- What monitoring reads from each batch record: the strata it belongs to and the
-- measured quality attributes and process signals, one row per batch. Derived from
-- the signed record (batch_records.envelope), so it can always be rebuilt from it;
-- seq orders rows by arrival so a reader can follow the table by tailing it.
CREATE TABLE batch_metrics (
    seq BIGSERIAL PRIMARY KEY,
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
    size_nm            DOUBLE PRECISION,
    pdi                DOUBLE PRECISION,
    encapsulation_pct  DOUBLE PRECISION,
    ph                 DOUBLE PRECISION,
    yield_pct          DOUBLE PRECISION,
    flow_cv            DOUBLE PRECISION,
    max_pressure_mbar  DOUBLE PRECISION,
    frr_error_pct      DOUBLE PRECISION,
    alarms             BIGINT NOT NULL
);

-- A recipe version's release criteria per attribute, as the devices applied them:
-- the specification limits capability is computed against.
CREATE TABLE quality_limits (
    recipe_id      TEXT NOT NULL,
    recipe_version BIGINT NOT NULL,
    attribute      TEXT NOT NULL,
    lo             DOUBLE PRECISION,
    hi             DOUBLE PRECISION,
    PRIMARY KEY (recipe_id, recipe_version, attribute)
);
