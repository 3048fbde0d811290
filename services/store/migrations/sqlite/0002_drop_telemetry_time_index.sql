-- Telemetry is read along its primary key (device_id, seq); the time index only cost writes.
DROP INDEX IF EXISTS telemetry_device_time;
