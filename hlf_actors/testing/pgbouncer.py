"""A real PgBouncer in transaction pooling mode in front of a test database, for the tests that show what the
service does behind one (LISTEN silently does nothing, a session advisory lock is not ours across transactions).

    with PgBouncer(db_url, workdir) as bouncer:
        bouncer.url       the same database, through PgBouncer on a free 127.0.0.1 port
        bouncer.log_text()

It runs Debian's ``pgbouncer`` binary (``apt-get install pgbouncer``; ``.ci/run`` installs it) with a config written
to ``workdir``: ``auth_type = any`` (every client logs in as the database's own user, so no password file),
``pool_mode = transaction``, its log on its stdout. PgBouncer refuses to run as root, so as root it is started with
``-u postgres`` (or ``nobody``). Starting fails with a ``PgBouncerError`` that says why —
never a skip: a test that needs PgBouncer and cannot have it has not shown anything.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Self

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .http_server import Running, free_port

__all__ = ["PgBouncer", "PgBouncerError"]


class PgBouncerError(RuntimeError):
    """PgBouncer could not be started; the message says why and how to get it."""


def _quote(value: str) -> str:
    """A value in PgBouncer's [databases] connect string (libpq style)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_PING = "SELECT 1"


class PgBouncer(Running):
    def __init__(self, db_url: str, workdir: Path, *, pool_mode: str = "transaction") -> None:
        self._target = conninfo_to_dict(db_url)
        self._workdir = workdir
        self._pool_mode = pool_mode
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = workdir / "pgbouncer.log"
        target: dict[str, Any] = dict(self._target)
        target.update(host="127.0.0.1", port=str(self.port))
        target.pop("password", None)  # PgBouncer logs in to the server; clients need none (auth_type = any)
        self.url = make_conninfo("", **target)

    def start(self) -> Self:
        binary = shutil.which("pgbouncer") or next(
            (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).is_file()), None
        )
        if binary is None:
            raise PgBouncerError(
                "pgbouncer is not installed: `apt-get install -y pgbouncer` (.ci/run does this when it is missing)"
            )
        self._workdir.mkdir(parents=True, exist_ok=True)
        server = {k: str(v) for k, v in self._target.items() if k in ("host", "port", "user", "password") and v}
        server.setdefault("host", "127.0.0.1")
        connect = " ".join(f"{k}={_quote(v)}" for k, v in server.items())
        config = self._workdir / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = {connect}\n"
            "\n[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = any\n"
            f"pool_mode = {self._pool_mode}\n"
            "max_client_conn = 500\n"
            "default_pool_size = 40\n"
            # psycopg sends no such parameter by default, but libpq URLs with options= would be refused without it.
            "ignore_startup_parameters = extra_float_digits,options\n"
        )
        command = [binary]
        if os.geteuid() == 0:  # "PgBouncer should not run as root"
            user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
            if user is None:
                raise PgBouncerError("running as root and neither a postgres nor a nobody user exists for pgbouncer -u")
            command += ["-u", user]  # it reads its config before it switches: the files may stay root's own
        command.append(str(config))
        log = self._log_path.open("ab")
        try:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        self._wait_ready(timeout=10.0)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise PgBouncerError(
                    f"pgbouncer exited with status {self._process.returncode} at start:\n{self.log_text()[-2000:]}"
                )
            try:
                with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
                    conn.execute(_PING)
                return
            except psycopg.OperationalError as err:
                last = err
                time.sleep(0.05)
        self.stop()
        raise PgBouncerError(
            f"pgbouncer did not accept a connection within {timeout:.0f}s ({last}):\n{self.log_text()}"
        )

    def log_text(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
