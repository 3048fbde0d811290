-- People (operators), their API tokens and dashboard sessions. Only hashes of
-- passwords (argon2id) and of token and session secrets (SHA-256) are kept.
CREATE TABLE people (
    id               TEXT PRIMARY KEY NOT NULL,
    display_name     TEXT NOT NULL,
    role             TEXT NOT NULL,
    site_id          TEXT NOT NULL DEFAULT '',
    password_hash    TEXT NOT NULL,
    created_ms       BIGINT NOT NULL,
    disabled_ms      BIGINT NOT NULL DEFAULT 0,
    failed_logins    BIGINT NOT NULL DEFAULT 0,
    locked_until_ms  BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY NOT NULL,
    person_id    TEXT NOT NULL REFERENCES people (id),
    secret_hash  TEXT NOT NULL,
    description  TEXT NOT NULL DEFAULT '',
    created_ms   BIGINT NOT NULL,
    expires_ms   BIGINT NOT NULL,
    revoked_ms   BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX api_tokens_person ON api_tokens (person_id);

CREATE TABLE sessions (
    id           TEXT PRIMARY KEY NOT NULL,
    person_id    TEXT NOT NULL REFERENCES people (id),
    secret_hash  TEXT NOT NULL,
    created_ms   BIGINT NOT NULL,
    expires_ms   BIGINT NOT NULL,
    revoked_ms   BIGINT NOT NULL DEFAULT 0
);
