-- Alerts that reach a person (hlf_actors/alerting.py): dead device tokens are remembered so they are never
-- targeted again, and operations alerts that could not be sent wait in a durable outbox until they are.

-- A coordinator device FCM called dead (UNREGISTERED, INVALID_ARGUMENT about its token, SENDER_ID_MISMATCH).
-- Keyed by the device AND the token it had: when the app writes a new token for the device (UPDATE) or a new
-- device row (INSERT), no row here matches it any more and the device is live again. A service-owned table
-- rather than a column, so the app's table keeps only the columns of the contract. No foreign key to the app's
-- table: the service's schema must not depend on (or need REFERENCES on) the app's tables; a row whose device
-- the app deleted matches nothing and is harmless.
CREATE TABLE hlf_dead_devices (
    device_id       text NOT NULL,  -- coordinator_devices.id as text: the app's id may be a uuid or an integer
    fcm_token       text NOT NULL,
    organisation_id uuid NOT NULL,
    reason          text NOT NULL,  -- the FCM error code: UNREGISTERED, INVALID_ARGUMENT, SENDER_ID_MISMATCH
    marked_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (device_id, fcm_token)
);

-- One row per (ops alert, channel): "fcm" (HLF_OPS_TOPIC), "webhook" (HLF_OPS_WEBHOOK_URL), "email".
-- Written before the first attempt, so an alert survives a crash between deciding and sending. A row is sent
-- by whoever holds it: the process that raised the alert first (it leases the row with next_at), then the
-- leader's drain, with backoff, until delivered_at or, after 24 h, gave_up_at. The unique key makes the second
-- channel of one alert a second row, never a second alert.
CREATE TABLE hlf_ops_outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id     uuid NOT NULL,
    channel      text NOT NULL CHECK (channel IN ('fcm', 'webhook', 'email')),
    data         jsonb NOT NULL CHECK (jsonb_typeof(data) = 'object'),
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts     int NOT NULL DEFAULT 0,
    next_at      timestamptz NOT NULL,
    delivered_at timestamptz NULL,
    gave_up_at   timestamptz NULL,
    last_error   text NULL,
    UNIQUE (alert_id, channel)
);
CREATE INDEX hlf_ops_outbox_due_idx ON hlf_ops_outbox (next_at) WHERE delivered_at IS NULL AND gave_up_at IS NULL;
