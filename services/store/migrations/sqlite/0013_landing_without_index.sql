-- The landing table loses its (device_id, seq) key: rows are appended in arrival order
-- (by rowid), so a commit writes a few pages of it whatever the number of devices in
-- the commit. With the key, each row dirtied an index page of its own (the table
-- holds a few seconds of every device), and every dirty page goes to the log in full.
-- The ingest writer keeps the key in memory instead: it is the only writer of this
-- table, checks re-sends against it and sweeps the rows in key order.
CREATE TABLE telemetry_landing (
    device_id   TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    first_ms    BIGINT NOT NULL,
    last_ms     BIGINT NOT NULL,
    samples     BIGINT NOT NULL,
    payload     BLOB NOT NULL
);
INSERT INTO telemetry_landing (device_id, seq, first_ms, last_ms, samples, payload)
    SELECT device_id, seq, first_ms, last_ms, samples, payload FROM telemetry_recent ORDER BY device_id, seq;
DROP TABLE telemetry_recent;
ALTER TABLE telemetry_landing RENAME TO telemetry_recent;
