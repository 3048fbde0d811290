-- Telemetry rollups: per device, one row per minute and one per hour. `data` holds,
-- for each telemetry metric, the count, sum, min, max and a quantile sketch of the
-- samples in the interval (see services/monitoring/src/rollup.rs); rows of the same
-- key merge exactly, so late samples and wider intervals need no raw data. The ingest
-- writer folds each landed telemetry row in once, in the transaction that moves it
-- into `telemetry`.
CREATE TABLE telemetry_1m (
    device_id   TEXT NOT NULL,
    start_ms    BIGINT NOT NULL,
    samples     BIGINT NOT NULL,
    data        BLOB NOT NULL,
    PRIMARY KEY (device_id, start_ms)
);

CREATE TABLE telemetry_1h (
    device_id   TEXT NOT NULL,
    start_ms    BIGINT NOT NULL,
    samples     BIGINT NOT NULL,
    data        BLOB NOT NULL,
    PRIMARY KEY (device_id, start_ms)
);
