"""Health and metrics of `run`: ``/healthz`` for readiness and ``/metrics`` in Prometheus text format.

``/healthz`` answers 200 only while this process is the leader, listening, and its last database round trip
worked; a hot standby answers 503 with ``"role": "standby"`` (alive, but not the one doing the work). The body is
JSON either way so an operator can read it with curl.

``hlf_actors.web`` serves both, next to the operations console.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Health", "Metrics", "ServiceState"]

_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class Metrics:
    """The service's Prometheus metrics, on a registry of its own (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.changes_seen = Counter(
            "hlf_changes_seen", "Events that asked for a sync (changes, force syncs, re-queues)", registry=r
        )
        self.attempts = Counter("hlf_patch_attempts", "PATCH attempts by outcome", ["outcome"], registry=r)
        self.dead_letters = Counter("hlf_dead_letters", "Operations dead-lettered", registry=r)
        self.latency = Histogram(
            "hlf_commit_to_portal_seconds",
            "From the change's commit to the portal's success answer",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("hlf_patches_in_flight", "PATCH requests in flight", registry=r)
        self.actors = Gauge("hlf_actors_alive", "Mentor actors alive", registry=r)
        self.queued = Gauge("hlf_mentors_queued", "Mentors waiting for an actor slot", registry=r)
        self.reconnects = Counter(
            "hlf_listener_reconnects", "Times the listener connection was re-established", registry=r
        )
        self.leader = Gauge("hlf_leader", "1 while this process is the leader", registry=r)
        self.circuit_open = Gauge("hlf_portal_circuit_open", "1 while the portal is considered down", registry=r)
        self.public_exposure = Histogram(
            "hlf_public_exposure_seconds",
            "From a change to the public website showing it (the listing probe)",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600),
            registry=r,
        )
        self.public_stale = Counter(
            "hlf_public_listing_stale", "Syncs the public website still disagreed with at the deadline", registry=r
        )
        self.public_unrecognised = Counter(
            "hlf_public_listing_unrecognised",
            "Listing fetches that could prove nothing (not the listing: sign-in, firewall, rows loaded by the browser)",
            registry=r,
        )
        self.notify_queue_usage = Gauge(
            "hlf_notification_queue_usage",
            "pg_notification_queue_usage(): the share of Postgres's NOTIFY queue in use (as of the last sweep)",
            registry=r,
        )
        self.polling = Gauge("hlf_polling", "1 while LISTEN does not work here and the inbox is polled", registry=r)
        self.incident_open = Gauge(
            "hlf_tenant_incident_open",
            "1 while a tenant-wide incident (by cause) holds every send; see `hlf-actors status`",
            ["cause"],
            registry=r,
        )
        self.incident_since = Gauge(
            "hlf_tenant_incident_since_seconds",
            "Unix time the open tenant-wide incident began; 0 when none",
            registry=r,
        )
        self.before_render: Callable[[], None] | None = None
        self.open_dead_letters = Gauge(
            "hlf_dead_letters_open", "Dead letters neither re-queued nor resolved (as of the last sweep)", registry=r
        )

    def render(self) -> bytes:
        if self.before_render is not None:
            self.before_render()
        return generate_latest(self.registry)


class Health(msgspec.Struct, frozen=True):
    status: str
    role: str
    listening: bool
    database: bool
    reconnects: int
    notifications: str = "listen"  # "listen", or "polling" where LISTEN does not work (PgBouncer, transaction pooling)
    # A tenant-wide incident holding every send: its cause, since when (ISO 8601), and what to fix. The process is
    # healthy (restarting it would not help), so the status stays "ok"; the body says what an operator must do.
    incident: str | None = None
    incident_since: str | None = None
    incident_fix: str | None = None
    alerts: str = "on"  # "off" when HLF_ALERTS=off: nobody is told about failures


@dataclass
class ServiceState:
    """What health checks, metrics and logs read about the running service."""

    listening: bool = False
    leader: bool = False
    reconnects: int = 0
    notifications: int = 0
    malformed_notifications: int = 0
    events_projected: int = 0
    database_ok: bool = False
    http_port: int | None = None
    polling: bool = False  # LISTEN does not work on this connection (PgBouncer in transaction pooling): poll
    notify_queue_usage: float = 0.0
