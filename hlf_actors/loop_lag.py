"""How late the event loop is, for ``/healthz``.

/healthz fails once the event loop is ``LAG_LIMIT_S`` late: a hung or starved loop serves nobody, and a supervisor
should restart it. Measured by a task that sleeps ``_LAG_TICK_S`` and notes how late it woke.
"""

from __future__ import annotations

import anyio
from loguru import logger

__all__ = ["LAG_LIMIT_S", "LoopLag"]

LAG_LIMIT_S = 3.0
_LAG_TICK_S = 0.5


class LoopLag:
    """The lag monitor: ``watch`` runs as a task of the service, ``lag_s`` answers health checks."""

    def __init__(self) -> None:
        self._tick: float | None = None  # when the monitor last woke (anyio clock)
        self._lag_s = 0.0

    def lag_s(self) -> float:
        """How late the event loop is: the lag the monitor last measured, or, if the monitor itself is overdue, how
        overdue (a health request answered by a loop that just woke from a long stall sees that stall here)."""
        if self._tick is None:
            return 0.0
        overdue = anyio.current_time() - self._tick - _LAG_TICK_S
        return max(self._lag_s, overdue)

    async def watch(self) -> None:
        said = False
        while True:
            self._tick = anyio.current_time()
            await anyio.sleep(_LAG_TICK_S)
            self._lag_s = max(0.0, anyio.current_time() - self._tick - _LAG_TICK_S)
            if self._lag_s > LAG_LIMIT_S and not said:
                logger.warning("event loop {:.1f}s late: /healthz fails until it keeps time again", self._lag_s)
            said = self._lag_s > LAG_LIMIT_S
