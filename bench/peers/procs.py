"""One run of a worker under test as a child process: start, wait for its ready line, CPU, peak RSS, stop, kill.

CPU is utime + stime of the process and of every live descendant (/proc/<pid>/stat), in seconds; peak RSS is
VmHWM (/proc/<pid>/status) summed over the tree, read just before the process is stopped, since the kernel forgets
it at exit. Output goes to a log file, never to a pipe that could fill up and stall the worker. Linux only.

Profiling: with BENCH_PYSPY=<directory>, every worker gets ``py-spy record`` attached from outside (its own
process, not counted in the worker's CPU, but it competes for the same cores: figures from such a run are for
reading the profile, not for the table). Each profile is written when its worker exits, as collapsed stacks
(``<log name>.txt``, for flamegraph.pl or speedscope). Install it with ``.bench-venv/bin/pip install py-spy``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["Worker"]

_TICKS = os.sysconf("SC_CLK_TCK")


class Worker:
    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path, ready_line: str) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.ready_line = ready_line
        self._proc: subprocess.Popen[bytes] | None = None
        self._profiler: subprocess.Popen[bytes] | None = None  # py-spy, with BENCH_PYSPY
        self.started_at = 0.0
        self.peak_rss_mb = 0.0  # the largest VmHWM seen over the tree, updated by sample_peak()

    def start(self) -> Worker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.log_path.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started_at = time.monotonic()
        self._attach_profiler()
        return self

    def _attach_profiler(self) -> None:
        out_dir = os.environ.get("BENCH_PYSPY")
        if not out_dir:
            return
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(py_spy).is_file():
            raise RuntimeError("BENCH_PYSPY is set but py-spy is not installed: .bench-venv/bin/pip install py-spy")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        out = Path(out_dir) / f"{self.log_path.stem}.txt"
        with (Path(out_dir) / f"{self.log_path.stem}.py-spy.log").open("wb") as errors:
            self._profiler = subprocess.Popen(
                [py_spy, "record", "--pid", str(self.pid), "--rate", "250", "--format", "raw", "--output", str(out)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Wait for the ready line in the log; the seconds since start()."""
        deadline = time.monotonic() + timeout_s
        while self.ready_line not in self.log_path.read_text(errors="replace"):
            if not self.running:
                raise RuntimeError(f"{' '.join(self.argv[1:3])} exited before it was ready:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(self.argv[1:3])} not ready within {timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.01)
        return time.monotonic() - self.started_at

    def _tree(self) -> list[int]:
        """The process and its live descendants, by one pass over /proc."""
        if self._proc is None or self._proc.poll() is not None:
            return []
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree

    def cpu_s(self) -> float:
        """utime + stime of the tree so far, in seconds."""
        ticks = 0
        for pid in self._tree():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5): utime, stime
        return ticks / _TICKS

    def _status_kb(self, key: str) -> int:
        total = 0
        for pid in self._tree():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(key):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total

    def sample_peak(self) -> float:
        """VmHWM of the tree now (MB), remembered as the peak if it is the largest yet."""
        mb = self._status_kb("VmHWM:") / 1024
        self.peak_rss_mb = max(self.peak_rss_mb, mb)
        return mb

    def rss_mb(self) -> float:
        return self._status_kb("VmRSS:") / 1024

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (a graceful stop), then SIGKILL if it takes longer than ``timeout_s``."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self.sample_peak()
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._wait_for_profile()
        return self._proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole tree at once, as a crash or the OOM killer would."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self.sample_peak()
        for pid in reversed(self._tree()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        self._proc.wait()
        self._wait_for_profile()

    def _wait_for_profile(self) -> None:
        """py-spy writes its profile once the worker has exited: wait for it, so the file is whole."""
        if self._profiler is not None:
            self._profiler.wait(30)
            self._profiler = None
