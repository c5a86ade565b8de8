"""The HTTP side of `run`: ``/healthz``, ``/metrics`` and the operations console, on one port (HLF_HTTP_PORT).

Starlette routes and uvicorn serves, inside `run`'s own event loop: a task in the service's task group like any other,
so the console reads the same state the service keeps and stops when the service stops. uvicorn's own signal
handlers are switched off: `run` already turns SIGTERM into a graceful stop, and a second handler would swallow it.

    GET /healthz   200 while leader, listening and the database answers; 503 otherwise (JSON either way)
    GET /metrics   Prometheus text format
    /…             the console (``hlf_actors.console``) when sign-in is configured; 404 when it is not
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import anyio
import msgspec
import uvicorn
from loguru import logger
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp

from .metrics import Health, Metrics

__all__ = ["build_app", "serve_http"]

_SHUTDOWN_GRACE_S = 2


def build_app(health: Callable[[], Health], metrics: Metrics, console: ASGIApp | None = None) -> Starlette:
    async def healthz(_request: Request) -> Response:
        h = health()
        body = msgspec.json.encode(h) + b"\n"
        return Response(body, status_code=200 if h.status == "ok" else 503, media_type="application/json")

    async def prometheus(_request: Request) -> Response:
        # generate_latest is quick and CPU-only; the event loop can afford it.
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    routes: list[BaseRoute] = [Route("/healthz", healthz), Route("/metrics", prometheus)]
    if console is not None:
        routes.append(Mount("/", app=console))
    return Starlette(routes=routes)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # `run` owns SIGTERM/SIGINT (graceful stop of the actors); uvicorn is stopped through should_exit.
        yield


async def serve_http(
    host: str,
    port: int,
    app: ASGIApp,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the bound port through ``task_status`` (useful with port 0)."""
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    bound = int(sock.getsockname()[1])
    config = uvicorn.Config(
        app,
        lifespan="off",
        http="h11",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=_SHUTDOWN_GRACE_S,
    )
    server = _Server(config)
    stopped = anyio.Event()

    async def serve() -> None:
        # Shielded: a cancelled task would leave uvicorn's connections open; it stops through should_exit instead.
        with anyio.CancelScope(shield=True):
            try:
                await server.serve(sockets=[sock])
            finally:
                stopped.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve, name="http")
            while not server.started:
                if stopped.is_set():
                    raise OSError(f"the HTTP server on {host}:{bound} did not start")
                await anyio.sleep(0.005)
            logger.info("health and metrics on http://{}:{}/healthz and /metrics", host, bound)
            task_status.started(bound)
            try:
                await anyio.sleep_forever()
            finally:
                server.should_exit = True
    finally:
        sock.close()
