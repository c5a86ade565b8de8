-- Replay, duplicate findings and log hygiene (hlf_actors/replay.py, hlf_actors/duplicates.py).
--
--   event_log ──(archive: fold to the cut, copy, store snapshots, delete)──▶ event_log_archive
--       │                                                                   projection_snapshots (state at the cut)
--       └── replay = fold(snapshot, the events after its cut) ──▶ sync_status, dead_letters, duplicate_findings

-- Replay rebuilds from a snapshot and then re-folds the mentors whose events committed after it: "which events were
-- written by transactions not visible in snapshot S" is `xid >= pg_snapshot_xmin(S) AND NOT visible`, an index
-- range scan over the few newest transactions instead of a scan of the whole log.
CREATE INDEX event_log_xid_idx ON event_log (xid);

-- The projection of duplicate_detected events: one row per finding, keyed so that raising a finding twice is a
-- no-op. `alerted_at` is the ops-alert outbox (set once the alert went out), not part of the projection.
CREATE TABLE duplicate_findings (
    key         text PRIMARY KEY,      -- rule:mentor:natural key:first seq:duplicate seq
    rule        text NOT NULL,
    mentor_id   uuid NOT NULL,
    seqs        bigint[] NOT NULL,     -- the events that duplicate each other
    event_seq   bigint NOT NULL,       -- the duplicate_detected event that raised it
    detected_at timestamptz NOT NULL,
    alerted_at  timestamptz NULL
);
CREATE INDEX duplicate_findings_mentor_idx ON duplicate_findings (mentor_id);
CREATE INDEX duplicate_findings_unalerted_idx ON duplicate_findings (detected_at) WHERE alerted_at IS NULL;

-- Archived events: what `hlf-actors replay --archive-before DAYS` moved out of event_log. Same columns.
CREATE TABLE event_log_archive (
    seq         bigint PRIMARY KEY,
    mentor_id   uuid NULL,
    kind        text NOT NULL,
    version     smallint NOT NULL,
    data        jsonb NOT NULL,
    recorded_at timestamptz NOT NULL,
    xid         xid8 NOT NULL,
    archived_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_log_archive_mentor_idx ON event_log_archive (mentor_id, seq) WHERE mentor_id IS NOT NULL;

-- Each mentor's state at the archive cut, so that replay = fold(snapshot, the events left in event_log).
CREATE TABLE projection_snapshots (
    mentor_id  uuid PRIMARY KEY,
    cut_seq    bigint NOT NULL,        -- the newest archived event folded into it
    projection jsonb NOT NULL,         -- hlf_actors.projections.MentorProjection
    duplicates jsonb NOT NULL,         -- hlf_actors.duplicates.DuplicateState
    taken_at   timestamptz NOT NULL DEFAULT now()
);

-- The log stays append-only; the one exception is archival, and only for rows already in the archive and under
-- their mentor's projection snapshot, so a delete can never lose what replay needs. The checks are per statement
-- (the rows deleted, as a transition table, checked set-based): a row trigger doing two lookups per row cost 22 s
-- for a million events, all of it while the service's actors wait for the archival's table locks.
CREATE OR REPLACE FUNCTION hlf_event_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'event_log' AND TG_OP = 'DELETE' AND current_setting('hlf.archiving', true) = 'on' THEN
        RETURN NULL;  -- checked by hlf_event_log_deleted_only_archived once the rows are known
    END IF;
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE FUNCTION hlf_event_log_deleted_only_archived() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM gone g
        WHERE NOT EXISTS (SELECT 1 FROM event_log_archive a WHERE a.seq = g.seq)
           OR (g.mentor_id IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM projection_snapshots s WHERE s.mentor_id = g.mentor_id AND s.cut_seq >= g.seq))) THEN
        RAISE EXCEPTION 'event_log is append-only: DELETE is allowed only for archived events under a snapshot'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER event_log_append_only_rows ON event_log;
CREATE TRIGGER event_log_append_only_update BEFORE UPDATE ON event_log
    FOR EACH STATEMENT EXECUTE FUNCTION hlf_event_log_is_append_only();
CREATE TRIGGER event_log_append_only_delete BEFORE DELETE ON event_log
    FOR EACH STATEMENT EXECUTE FUNCTION hlf_event_log_is_append_only();
CREATE TRIGGER event_log_deleted_only_archived AFTER DELETE ON event_log
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION hlf_event_log_deleted_only_archived();

-- The archive itself is append-only.
CREATE TRIGGER event_log_archive_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON event_log_archive
    FOR EACH STATEMENT EXECUTE FUNCTION hlf_event_log_is_append_only();
