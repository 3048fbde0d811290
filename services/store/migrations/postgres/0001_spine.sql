-- Sites, devices with presence and last values, telemetry and events.
CREATE TABLE sites (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL,
    created_ms    BIGINT NOT NULL
);

CREATE TABLE devices (
    id                TEXT PRIMARY KEY NOT NULL,
    site_id           TEXT NOT NULL REFERENCES sites (id),
    model             TEXT NOT NULL DEFAULT '',
    firmware_version  TEXT NOT NULL DEFAULT '',
    online            BIGINT NOT NULL DEFAULT 0,
    session_id        TEXT NOT NULL DEFAULT '',
    connected_ms      BIGINT NOT NULL DEFAULT 0,
    last_seen_ms      BIGINT NOT NULL DEFAULT 0,
    telemetry_seq     BIGINT NOT NULL DEFAULT 0,
    last_sample_ms    BIGINT NOT NULL DEFAULT 0,
    last_sample       BYTEA
);
CREATE INDEX devices_site ON devices (site_id);

-- One row per telemetry batch as the device sent it; (device_id, seq) makes a re-sent
-- batch a no-op.
CREATE TABLE telemetry (
    device_id   TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    first_ms    BIGINT NOT NULL,
    last_ms     BIGINT NOT NULL,
    samples     BIGINT NOT NULL,
    payload     BYTEA NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX telemetry_device_time ON telemetry (device_id, last_ms);

CREATE TABLE events (
    device_id   TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    time_ms     BIGINT NOT NULL,
    payload     BYTEA NOT NULL,
    PRIMARY KEY (device_id, seq)
);

CREATE TABLE alarms (
    device_id   TEXT NOT NULL,
    code        BIGINT NOT NULL,
    line        BIGINT NOT NULL,
    priority    BIGINT NOT NULL,
    active      BIGINT NOT NULL,
    detail      TEXT NOT NULL,
    changed_ms  BIGINT NOT NULL,
    PRIMARY KEY (device_id, code, line)
);
