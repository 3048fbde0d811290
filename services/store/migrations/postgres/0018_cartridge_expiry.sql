-- Finding the unused cartridges past their expiry without reading every cartridge.
CREATE INDEX cartridges_expiry ON cartridges (expires_ms, status);
