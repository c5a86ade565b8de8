"""The real ``hlf-actors run`` as a child process, for acceptance tests that drive the service from outside.

Why it exists: start-up, configuration from the environment, JSON logging, signals and a ``kill -9`` in the middle of
work are only honestly tested on the real process. This class starts ``python -m hlf_actors run`` with an
environment the test chooses, sends its stdout and stderr to one log file (not a TTY, so the service logs JSON lines)
and lets the test wait on what the process says, never on a fixed sleep.

    ServiceProcess(env, log_path)
      .start()           spawn; the child inherits PATH and friends, but no HLF_* variable the test did not give it
      .wait_leader(t)    poll the log for "leader: listening" (fails early, with the log, if the child died)
      .terminate(t)      SIGTERM, wait, return the exit status
      .kill()            SIGKILL, wait, return the exit status (-9)
      .log_text() / .log_records()
    with ServiceProcess(...) as service:   the child never outlives the block

The child runs in the log file's directory, so a developer's ``.env`` in the checkout never leaks into a test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["LEADER_LINE", "ServiceProcess", "service_env"]

LEADER_LINE = "leader: listening"
_POLL_S = 0.01
# The variables a parent shell may have set that would quietly point the child somewhere else.
_INHERITED_BUT_NOT_WANTED = ("GOOGLE_APPLICATION_CREDENTIALS",)


def service_env(
    database_url: str,
    portal_env: Mapping[str, str],
    fcm_env: Mapping[str, str] | None = None,
    **overrides: str,
) -> dict[str, str]:
    """The environment of a service under test: fast, exact backoff and no HTTP endpoint, plus ``overrides``."""
    return {
        "HLF_DATABASE_URL": database_url,
        **portal_env,
        **(fcm_env or {}),
        "HLF_BACKOFF_BASE_MS": "10",
        "HLF_BACKOFF_MAX_MS": "2000",
        "HLF_BACKOFF_JITTER": "off",
        "HLF_HTTP_PORT": "0",
        **overrides,
    }


class ServiceProcess:
    """One ``hlf-actors run`` child process and its log file."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, command: tuple[str, ...] = ("run",)) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.command = command
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> ServiceProcess:
        if self._process is not None:
            raise RuntimeError("this ServiceProcess was already started; make a new one to start again")
        inherited = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("HLF_") and name not in _INHERITED_BUT_NOT_WANTED
        }
        env = {**inherited, "PYTHONUNBUFFERED": "1", **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "hlf_actors", *self.command],
                env=env,
                cwd=self.log_path.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def returncode(self) -> int | None:
        """None while the child runs; its exit status once it has ended (negative: killed by that signal)."""
        return self._started().poll()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM (the service stops taking work and lets in-flight PATCHes finish), then wait for the exit."""
        process = self._started()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"hlf-actors (pid {process.pid}) did not exit within {timeout:.0f}s of SIGTERM\n{self.log_tail()}"
            ) from None

    def kill(self) -> int:
        """SIGKILL: the process dies on the spot, with whatever it had in flight."""
        process = self._started()
        if process.poll() is None:
            process.kill()
        return process.wait()

    def close(self, grace_s: float = 5.0) -> None:
        """Make sure the child is gone: SIGTERM, then SIGKILL after ``grace_s``. Safe to call more than once."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> ServiceProcess:
        return self if self._process is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- what it said ------------------------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        """The loguru records of the JSON lines in the log; anything else (a bare traceback) is left out."""
        records: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                decoded = json.loads(line)
            except ValueError:
                continue
            if isinstance(decoded, dict) and isinstance(decoded.get("record"), dict):
                records.append(decoded["record"])
        return records

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the log, JSON lines shown as "time level mentor message" for a human to read."""
        tail = [_readable(line) for line in self.log_text().splitlines()[-lines:]]
        return f"--- last {len(tail)} line(s) of {self.log_path} ---\n" + "\n".join(tail)

    def wait_for_log(self, fragment: str, *, count: int = 1, timeout: float = 15.0) -> None:
        """Wait until ``fragment`` occurs ``count`` times in the log; fail early, with the log, if the child ends."""
        process = self._started()
        deadline = time.monotonic() + timeout
        while self.log_text().count(fragment) < count:
            code = process.poll()
            if code is not None:
                raise AssertionError(
                    f"hlf-actors exited with status {code} before logging {fragment!r}\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"hlf-actors did not log {fragment!r} {count} time(s) within {timeout:.1f}s\n{self.log_tail()}"
                )
            time.sleep(_POLL_S)

    def wait_leader(self, timeout: float = 15.0) -> None:
        """Wait until this process holds leadership and listens: from then on it reacts to every change."""
        self.wait_for_log(LEADER_LINE, timeout=timeout)

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("start() the ServiceProcess first")
        return self._process


def _readable(line: str) -> str:
    try:
        record = json.loads(line)["record"]
        clock = str(record["time"]["repr"])[11:23]
        return f"{clock} {record['level']['name']:<7} {record['extra'].get('mentor_id') or '-':<36} {record['message']}"
    except (ValueError, TypeError, KeyError):
        return line
