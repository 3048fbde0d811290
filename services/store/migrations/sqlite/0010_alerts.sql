-- Monitoring alerts. While an alert is active (open or acknowledged) the same
-- condition raises no new alert: it bumps occurrences and last_seen_ms, so a silent
-- device or a drifting chart is one alert, not one per evaluation. evidence holds
-- the encoded nanofleet.v1.AlertEvidence (the rule, the limits and the points).
CREATE TABLE alerts (
    alert_id         TEXT PRIMARY KEY NOT NULL,
    dedup_key        TEXT NOT NULL,
    kind             TEXT NOT NULL,
    state            TEXT NOT NULL,
    subject          TEXT NOT NULL,
    site_id          TEXT NOT NULL,
    title            TEXT NOT NULL,
    evidence         BLOB NOT NULL,
    raised_ms        BIGINT NOT NULL,
    last_seen_ms     BIGINT NOT NULL,
    occurrences      BIGINT NOT NULL,
    acknowledged_by  TEXT NOT NULL DEFAULT '',
    acknowledged_ms  BIGINT NOT NULL DEFAULT 0,
    note             TEXT NOT NULL DEFAULT '',
    resolved_ms      BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX alerts_active ON alerts (dedup_key) WHERE state <> 'resolved';
CREATE INDEX alerts_raised ON alerts (raised_ms);

-- Where background evaluators stopped (e.g. the last batch_metrics.seq evaluated),
-- so a restart neither repeats nor skips work.
CREATE TABLE monitor_cursors (
    name  TEXT PRIMARY KEY NOT NULL,
    value BIGINT NOT NULL
);
