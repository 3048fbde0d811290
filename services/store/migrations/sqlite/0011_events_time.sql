-- The alarm-storm evaluation reads the events of the last minutes of every device.
CREATE INDEX events_time ON events (time_ms);
