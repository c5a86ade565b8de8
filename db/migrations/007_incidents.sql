-- Tenant-wide incidents (issue 18): the service reads the newest tenant check, and the newest reconcile outcome,
-- on every start and every check. Partial indexes keep those reads off the whole log.
CREATE INDEX IF NOT EXISTS event_log_tenant_checks ON event_log (seq)
    WHERE mentor_id IS NULL AND kind = 'credential_check';
CREATE INDEX IF NOT EXISTS event_log_reconcile_outcomes ON event_log (seq)
    WHERE mentor_id IS NULL AND kind IN ('reconcile_finished', 'reconcile_aborted');
