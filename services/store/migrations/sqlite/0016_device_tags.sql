-- Labels operations gives devices ("icu", "beta-ring"), comma-separated and sorted;
-- firmware rollouts can select by them.
ALTER TABLE devices ADD COLUMN tags TEXT NOT NULL DEFAULT '';
