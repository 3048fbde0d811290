-- Electronic signatures of recipes.
--
-- A person who signs has an ed25519 key per trust-root role (recipe-author,
-- recipe-approver). The private key is sealed under a key derived from the person's
-- password (argon2id, AES-256-GCM): the server cannot sign for anyone who does not
-- type their password at that moment.
CREATE TABLE signing_keys (
    key_id      TEXT PRIMARY KEY NOT NULL,
    person_id   TEXT NOT NULL REFERENCES people (id),
    role        TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    sealed_key  TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    revoked_ms  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX signing_keys_person ON signing_keys (person_id, role);

-- Every trust root version, so a device holding an old one gets the chain.
CREATE TABLE trust_roots (
    version     BIGINT PRIMARY KEY NOT NULL,
    document    TEXT NOT NULL,
    created_ms  BIGINT NOT NULL
);

-- Recipe versions. body is the encoded nanofleet.device.v1.Recipe, the exact bytes
-- the signatures cover; digest is its hex SHA-256.
CREATE TABLE recipes (
    recipe_id        TEXT NOT NULL,
    version          BIGINT NOT NULL,
    name             TEXT NOT NULL,
    status           TEXT NOT NULL,
    body             BLOB NOT NULL,
    digest           TEXT NOT NULL,
    created_by       TEXT NOT NULL,
    created_ms       BIGINT NOT NULL,
    released_ms      BIGINT NOT NULL DEFAULT 0,
    rejected_by      TEXT NOT NULL DEFAULT '',
    rejected_reason  TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (recipe_id, version)
);

-- One signature per meaning; envelope is the encoded DSSE envelope sent to devices.
CREATE TABLE recipe_signatures (
    recipe_id     TEXT NOT NULL,
    version       BIGINT NOT NULL,
    meaning       TEXT NOT NULL,
    signer_id     TEXT NOT NULL,
    printed_name  TEXT NOT NULL,
    key_id        TEXT NOT NULL,
    signed_ms     BIGINT NOT NULL,
    envelope      BLOB NOT NULL,
    PRIMARY KEY (recipe_id, version, meaning),
    FOREIGN KEY (recipe_id, version) REFERENCES recipes (recipe_id, version)
);

-- Per device and released version: sent, and what the device answered.
CREATE TABLE recipe_deliveries (
    device_id    TEXT NOT NULL,
    recipe_id    TEXT NOT NULL,
    version      BIGINT NOT NULL,
    state        TEXT NOT NULL,
    code         TEXT NOT NULL DEFAULT '',
    reason       TEXT NOT NULL DEFAULT '',
    sent_ms      BIGINT NOT NULL DEFAULT 0,
    answered_ms  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, recipe_id, version)
);
CREATE INDEX recipe_deliveries_recipe ON recipe_deliveries (recipe_id, version);

-- A released version never changes, and signatures are never edited or removed.
CREATE TRIGGER recipes_released_immutable BEFORE UPDATE ON recipes
WHEN OLD.status IN ('released', 'rejected')
BEGIN
    SELECT RAISE(ABORT, 'released and rejected recipe versions are immutable');
END;

CREATE TRIGGER recipes_signed_kept BEFORE DELETE ON recipes
WHEN OLD.status <> 'draft'
BEGIN
    SELECT RAISE(ABORT, 'signed recipe versions are kept');
END;

CREATE TRIGGER recipe_signatures_no_update BEFORE UPDATE ON recipe_signatures
BEGIN
    SELECT RAISE(ABORT, 'signatures are immutable');
END;

CREATE TRIGGER recipe_signatures_no_delete BEFORE DELETE ON recipe_signatures
BEGIN
    SELECT RAISE(ABORT, 'signatures are immutable');
END;
