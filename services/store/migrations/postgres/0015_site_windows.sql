-- A site's maintenance window for soft firmware rollouts, in the site's time zone
-- ("Mon-Fri 01:00-05:00", several separated by ";"); empty: always open.
ALTER TABLE sites ADD COLUMN maintenance_window TEXT NOT NULL DEFAULT '';
