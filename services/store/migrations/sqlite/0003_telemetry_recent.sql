-- Newly ingested telemetry lands here first: a small table whose (device_id, seq)
-- index spans a few pages, so a commit touches few pages whatever the number of
-- devices. The ingest writer moves the rows into `telemetry` about once a second, in
-- (device_id, seq) order, touching each device's pages once per move instead of once
-- per commit.
CREATE TABLE telemetry_recent (
    device_id   TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    first_ms    BIGINT NOT NULL,
    last_ms     BIGINT NOT NULL,
    samples     BIGINT NOT NULL,
    payload     BLOB NOT NULL,
    PRIMARY KEY (device_id, seq)
);
