"""The `run` process: leadership, the listener, the projector that drains the inbox, and the actors.

    LISTEN connection (dedicated, autocommit)          pool connections
    ─────────────────────────────────────────          ───────────────────────────────────────────────────
    pg_try_advisory_lock(leader)  ── standby until held
    LISTEN hlf_events
    catch up ──────────────────────────────────────▶   drain hlf_inbox → fold into projections (one tx a batch)
    each NOTIFY ── sets the wake flag ─────────────▶   wake the actor of every mentor left pending/retrying
    every sweep_interval_s ── catch up again        ▶   (anything a NOTIFY never told us about is found here)

NOTIFY is lost while we are disconnected, so after every (re)connect the service re-reads the inbox and every open
mentor before trusting notifications again; a periodic sweep repeats that, so nothing depends on a notification
arriving. Losing the listener connection also loses the leadership lock: actors hold their next attempt until
leadership is back, and if another process took it meanwhile they are cancelled (their state is in the database).

`Service` builds the parts, starts them in one task group and stops them; each part has a module of its own:
``start_up.py`` (what is checked before any work), ``election.py`` (the leadership lock, fencing, the heartbeat),
``listener.py`` (the listener connection's loop), ``projector.py`` (the drain and the catch-up), ``loop_lag.py``
(how late the event loop is, for /healthz).
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID, uuid4

import anyio
import psycopg
from anyio.abc import TaskGroup
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from . import db, duplicates, nightly, writer
from .actor import Runtime
from .alerts import Alerting
from .circuit import Circuit
from .clock import Clock, SystemClock
from .config import Config
from .dispatcher import Dispatcher
from .dynamics import Portal
from .election import Election
from .errors import ConfigError
from .events import CircuitClosed, CircuitOpened, NewEvent, Operation
from .incidents import Incident, Incidents
from .leadership import LeaderOnly, Leadership
from .listener import Listener, StrayNotifies, connect_listener
from .listing_probe import ListingProbe
from .loop_lag import LAG_LIMIT_S, LoopLag
from .metrics import Health, Metrics, ServiceState
from .ops_channels import OpsChannel, open_ops_channels
from .projector import Projector
from .push import AlertSender
from .reconcile import reconcile_forever
from .recorder import Recorder
from .retry import default_jitter
from .start_up import behind_transaction_pooler, check_schema, wait_for_database

__all__ = ["Service"]


class Service:
    def __init__(
        self,
        config: Config,
        *,
        portal: Portal,
        alert_sender: AlertSender,
        clock: Clock | None = None,
        jitter: Callable[[], float] | None = default_jitter,
        idle_s: float = 2.0,  # an idle actor's linger; each holds ~70 objects the garbage collector walks
        standby_poll_s: float = 1.0,
        shutdown_grace_s: float = 10.0,
        max_actors: int = 2000,
        alert_retry_delays_s: tuple[float, ...] = (1.0, 5.0, 20.0),
        connect: Callable[[str], Awaitable[psycopg.AsyncConnection[Any]]] | None = None,
        ops_channels: Sequence[OpsChannel] | None = None,  # default: every channel the config names
        outbox_every_s: float = 5.0,
        outbox_backoff_s: tuple[float, float] = (5.0, 900.0),
        stray_report_s: float = 60.0,
    ) -> None:
        self.config = config
        self.state = ServiceState()
        self._url = config.require_database()
        self._portal = portal
        self._sender = alert_sender
        self._clock = clock or SystemClock()
        self._jitter = jitter if config.backoff_jitter else None
        self._idle_s = idle_s
        self._grace_s = shutdown_grace_s
        self._max_actors = max_actors
        self._alert_retry_delays_s = alert_retry_delays_s
        self._connect = connect or connect_listener
        self._ops_channels = ops_channels
        self._outbox_every_s = outbox_every_s
        self._outbox_backoff_s = outbox_backoff_s
        self._strays = StrayNotifies(stray_report_s)
        self._leadership = Leadership()
        # The application_name of this process's pool sessions: what a standby terminates to fence us.
        self._session_tag = f"hlf-actors run {uuid4().hex[:8]} pid {os.getpid()}"
        self._loop_lag = LoopLag()
        self._stop = anyio.Event()
        self._alerts_in_flight = 0
        self._alerts_done: anyio.Event | None = None
        self.runtime: Runtime | None = None
        self.dispatcher: Dispatcher | None = None
        self.probe: ListingProbe | None = None  # the public listing probe, when HLF_PUBLIC_LISTING_URL is set
        self.metrics = Metrics()
        self.metrics.before_render = self._refresh_gauges
        self._election = Election(
            config, self._leadership, self.state, session_tag=self._session_tag, standby_poll_s=standby_poll_s
        )
        self._projector = Projector(config, self._clock, self._leadership, self.state, self.metrics)
        self._listener = Listener(
            config,
            self._url,
            connect=self._connect,
            election=self._election,
            leadership=self._leadership,
            strays=self._strays,
            state=self.state,
            metrics=self.metrics,
            wake=self._projector.wake,
            catch_up=self._projector.catch_up,
        )

    def health(self) -> Health:
        s = self.state
        ok = s.leader and s.listening and s.database_ok and self.loop_lag_s() <= LAG_LIMIT_S
        role = "leader" if s.leader else ("standby" if s.database_ok else "starting")
        incident = self.runtime.incidents.incident if self.runtime is not None and s.leader else None
        return Health(
            status="ok" if ok else "unavailable",
            role=role,
            listening=s.listening,
            database=s.database_ok,
            reconnects=s.reconnects,
            notifications="polling" if s.polling else "listen",
            incident=incident.cause if incident else None,
            incident_since=incident.since.isoformat() if incident and incident.since else None,
            incident_fix=incident.fix if incident else None,
            alerts="off" if self.config.alerts_off else "on",
        )

    def loop_lag_s(self) -> float:
        """How late the event loop is (see ``loop_lag.py``)."""
        return self._loop_lag.lag_s()

    def _refresh_gauges(self) -> None:
        m = self.metrics
        m.leader.set(1 if self.state.leader else 0)
        if self.dispatcher is not None:
            m.actors.set(self.dispatcher.alive)
            m.queued.set(self.dispatcher.queued)
        if self.runtime is not None:
            m.circuit_open.set(1 if self.runtime.circuit.is_open else 0)
            self._show_incident(self.runtime.incidents.incident)

    def _show_incident(self, incident: Incident | None) -> None:
        m = self.metrics
        m.incident_open.clear()
        if incident is not None:
            m.incident_open.labels(incident.cause).set(1)
        m.incident_since.set(incident.since.timestamp() if incident and incident.since else 0)

    def request_stop(self) -> None:
        """Stop taking new work; in-flight PATCHes get the grace period to finish."""
        self._stop.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await wait_for_database(self._url)
        pooled = await behind_transaction_pooler(self._url, self._connect)
        async with db.pool(
            self._url,
            name="hlf-actors",
            min_size=2,
            max_size=self.config.portal_concurrency + 4,
            prepare=not pooled,
            application_name=self._session_tag,
            app_schema=self.config.app_schema,
        ) as pool:
            await check_schema(pool)
            self.state.database_ok = True
            async with self._open_ops_channels() as ops_channels, anyio.create_task_group() as tg:
                alerting = Alerting(
                    pool,
                    self._sender,
                    ops_topic=self.config.ops_topic,
                    retry_delays_s=self._alert_retry_delays_s,
                    ops_channels=ops_channels,
                    outbox_backoff_s=self._outbox_backoff_s,
                )
                if self.config.public_listing_url:
                    self.probe = ListingProbe(self.config, pool, alerting, self.metrics)
                runtime = self._runtime(pool, tg, alerting)
                dispatcher = Dispatcher(runtime, tg, max_actors=self._max_actors)
                self.runtime, self.dispatcher = runtime, dispatcher
                if self.config.http_port:  # first: a process that cannot serve its port must not lead for a moment
                    self.state.http_port = await self._serve_http(tg, pool, alerting)
                tg.start_soon(runtime.recorder.run, name="recorder")
                tg.start_soon(runtime.incidents.heal_forever, runtime.leadership.wait, name="incident healer")
                tg.start_soon(self._loop_lag.watch, name="loop lag")
                tg.start_soon(self._election.beat_forever, pool, dispatcher, name="leader heartbeat")
                tg.start_soon(self._listener.listen_forever, dispatcher, runtime.incidents, name="listener")
                tg.start_soon(self._projector.drain_forever, pool, dispatcher, name="projector")
                tg.start_soon(self._resend_alerts_when_leader, alerting, name="alert catch-up")
                tg.start_soon(
                    alerting.drain_outbox_forever, runtime.leadership.wait, self._outbox_every_s, name="ops outbox"
                )
                tg.start_soon(self._sweep_forever, name="sweeper")
                tg.start_soon(reconcile_forever, runtime, alerting, self._portal, name="reconciler")
                if self.probe is not None:
                    tg.start_soon(self.probe.run, runtime.leadership.wait, name="listing probe")
                tg.start_soon(
                    nightly.nightly_forever, pool, alerting, self.config, self._clock, runtime.leadership.wait
                )
                tg.start_soon(
                    functools.partial(duplicates.watch, app_schema=self.config.app_schema),
                    self._url,
                    pool,
                    alerting,
                    runtime.leadership.wait,
                    self.config.sweep_interval_s,
                    name="duplicate check",
                )
                task_status.started()
                await self._stop.wait()
                await self._shut_down(runtime, dispatcher)
                tg.cancel_scope.cancel()

    @asynccontextmanager
    async def _open_ops_channels(self) -> AsyncIterator[Sequence[OpsChannel]]:
        """The channels given, or every one the configuration names (then closed here at the end)."""
        if self._ops_channels is not None:
            yield self._ops_channels
            return
        async with open_ops_channels(self.config, self._sender) as built:
            yield built

    async def _serve_http(self, tg: TaskGroup, pool: AsyncConnectionPool[Any], alerting: Alerting) -> int:
        """Start /healthz, /metrics and the console; a port that cannot be bound is a configuration error (one line,
        exit 2). The usual cause is a second `run` on the same host, the hot standby, left on the default port."""
        from .web import build_app, serve_http  # Starlette and uvicorn load only when HLF_HTTP_PORT is on

        host, port = self.config.http_host, self.config.http_port
        console = None
        if self.config.console_enabled:
            from .console import Console  # templates and sign-in load only when the console is on

            runtime = self.runtime
            console = Console(
                self.config,
                pool=pool,
                portal=self._portal,
                alerting=alerting,
                health=self.health,
                clock=self._clock,
                leader_incidents=lambda: runtime.incidents if runtime is not None and self.state.leader else None,
            ).app()
        try:
            bound: int = await tg.start(serve_http, host, port, build_app(self.health, self.metrics, console))
        except OSError as err:
            raise ConfigError(
                f"HLF_HTTP_PORT: cannot listen on {host}:{port} ({err.strerror or err}); a second `run` on this "
                "host needs a port of its own (or HLF_HTTP_PORT=0)"
            ) from None
        return bound

    def _runtime(self, pool: AsyncConnectionPool[Any], tg: TaskGroup, alerting: Alerting) -> Runtime:
        def on_dead_letter(mentor_id: UUID, operation: Operation, dead_letter_id: int) -> None:
            tg.start_soon(
                self._guarded, alerting.sync_failure(mentor_id, operation, dead_letter_id), "sync-failure alert"
            )

        async def on_circuit(opened: bool, failing: int) -> None:
            payload = CircuitOpened(failing_mentors=failing) if opened else CircuitClosed()
            async with pool.connection() as conn, conn.transaction():
                await writer.append(conn, [NewEvent(None, payload)])
            if opened:
                data = {"type": "hlf_portal_outage", "failing_mentors": str(failing)}
                tg.start_soon(self._guarded, alerting.ops(data), "outage alert")

        cfg = self.config
        incidents = Incidents(cfg, pool, alerting, self._portal, on_change=self._show_incident)
        return Runtime(
            config=cfg,
            pool=pool,
            portal=LeaderOnly(self._portal, self._leadership),
            clock=self._clock,
            limiter=anyio.CapacityLimiter(cfg.portal_concurrency),
            recorder=Recorder(pool),
            circuit=Circuit(
                threshold=5,
                probe_base_s=cfg.backoff_base_ms / 1000,
                probe_cap_s=min(cfg.backoff_max_ms / 1000, 30.0),
                on_change=on_circuit,
            ),
            leadership=self._leadership,
            incidents=incidents,
            on_dead_letter=on_dead_letter,
            jitter=self._jitter,
            idle_s=self._idle_s,
            metrics=self.metrics,
            on_synced=self.probe.watch if self.probe is not None else (lambda mentor_id, operation, succeeded: None),
        )

    async def _guarded(self, job: Awaitable[None], what: str) -> None:
        self._alerts_in_flight += 1
        try:
            await job
        except Exception as err:  # an alert that cannot be sent must never take the service down
            logger.opt(exception=err).error("{} failed: {}", what, err)
        finally:
            self._alerts_in_flight -= 1
            if not self._alerts_in_flight and self._alerts_done is not None:
                self._alerts_done.set()

    async def _resend_alerts_when_leader(self, alerting: Alerting) -> None:
        assert self.runtime is not None
        await self.runtime.leadership.wait()
        try:
            sent = await alerting.resend_unsent()
        except Exception as err:  # the next leader will try again; syncing must go on
            logger.opt(exception=err).error("could not re-send pending alerts: {}", err)
            return
        if sent:
            logger.info("sent {} alert(s) left unsent by a previous run", sent)

    async def _sweep_forever(self) -> None:
        while True:
            await anyio.sleep(self.config.sweep_interval_s)
            self._strays.flush()
            self._projector.catch_up()

    # -- shutdown -----------------------------------------------------------------------------------------------

    async def _shut_down(self, runtime: Runtime, dispatcher: Dispatcher) -> None:
        runtime.stopping = True
        dispatcher.wake_all()
        busy = dispatcher.alive
        if busy:
            logger.info("stopping: waiting up to {:.0f}s for {} actor(s) to finish", self._grace_s, busy)
        deadline = anyio.current_time() + self._grace_s
        if not await dispatcher.drained(self._grace_s):
            logger.warning(
                "stopping: {} actor(s) still busy after the grace period; their work stays pending", dispatcher.alive
            )
        # An alert cut off between its push and its record would be pushed again by the next leader.
        with anyio.move_on_at(deadline):
            while self._alerts_in_flight:
                self._alerts_done = anyio.Event()
                await self._alerts_done.wait()
        if self._alerts_in_flight:
            logger.warning("stopping: {} alert(s) unfinished; the next leader sends them", self._alerts_in_flight)
        logger.info("stopped")
