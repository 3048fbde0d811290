-- Firmware rollouts. `document` is the rollout's whole state as JSON (its spec,
-- waves and every device's last report; nanofleet-rollout's `Rollout`), written by
-- the scheduler after each change. `state` is kept beside it for listing.
CREATE TABLE rollouts (
    id          TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    target      TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    updated_ms  BIGINT NOT NULL,
    document    TEXT NOT NULL
);

CREATE INDEX rollouts_by_state ON rollouts (state, created_ms);
