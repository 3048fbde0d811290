-- Enrollment and device certificates: sites get a time zone, devices a lifecycle
-- status, tokens and issued certificates are recorded.
ALTER TABLE sites ADD COLUMN time_zone TEXT NOT NULL DEFAULT 'UTC';

ALTER TABLE devices ADD COLUMN status TEXT NOT NULL DEFAULT 'active';
ALTER TABLE devices ADD COLUMN enrolled_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN hardware_serial TEXT NOT NULL DEFAULT '';
ALTER TABLE devices ADD COLUMN cert_not_after_ms BIGINT NOT NULL DEFAULT 0;

-- Only the SHA-256 of a token's secret is kept.
CREATE TABLE enroll_tokens (
    id            TEXT PRIMARY KEY NOT NULL,
    site_id       TEXT NOT NULL REFERENCES sites (id),
    device_id     TEXT NOT NULL DEFAULT '',
    replacement   BIGINT NOT NULL DEFAULT 0,
    secret_hash   TEXT NOT NULL,
    created_ms    BIGINT NOT NULL,
    expires_ms    BIGINT NOT NULL,
    uses_allowed  BIGINT NOT NULL,
    uses_left     BIGINT NOT NULL,
    created_by    TEXT NOT NULL,
    revoked_ms    BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX enroll_tokens_site ON enroll_tokens (site_id);

-- Every certificate issued to a device; revoked_ms is set on decommission and
-- replacement.
CREATE TABLE device_certs (
    serial        TEXT PRIMARY KEY NOT NULL,
    device_id     TEXT NOT NULL,
    not_before_ms BIGINT NOT NULL,
    not_after_ms  BIGINT NOT NULL,
    issued_ms     BIGINT NOT NULL,
    revoked_ms    BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX device_certs_device ON device_certs (device_id);
