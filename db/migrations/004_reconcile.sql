-- Reconciliation and credential checks write events that belong to no mentor (reconcile_finished,
-- credential_check), and every check, every run and every `hlf-actors status` asks for "the newest one of kind X".
-- Without an index that is a backwards scan of the whole log whenever the kind is rare (on a fresh install: the
-- whole log); with this one it is a few pages. Only mentor-less events are indexed, a small part of the log.
CREATE INDEX event_log_global_kind_idx ON event_log (kind, seq) WHERE mentor_id IS NULL;
