-- The public listing probe (hlf_actors/listing_probe.py) reads recent successes and its own verdicts by time: on
-- becoming leader (which successes still wait for the website) and in `hlf-actors status` (the last day's window).
CREATE INDEX event_log_probe_idx ON event_log (kind, recorded_at)
    WHERE kind IN ('attempt_succeeded', 'public_listing_confirmed', 'public_listing_stale');
