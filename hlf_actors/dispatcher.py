"""The dispatcher: routes wake-ups to the mentors' actors, spawning them on demand and within a bound.

An actor is a task per mentor with work (``actor.py``); the dispatcher keeps at most ``max_actors`` alive, queues
further mentors in arrival order, and hands each new actor the last seq its mentor's previous actor recorded, so a
read taken before that outcome is never trusted.
"""

from __future__ import annotations

from uuid import UUID

import anyio
from anyio.abc import TaskGroup

from .actor import Actor, Runtime, Work

__all__ = ["Dispatcher"]


class Dispatcher:
    """Routes wake-ups to actors, spawning them on demand. At most ``max_actors`` live at once; wake-ups for
    further mentors wait in arrival order (the portal could not serve them any sooner anyway)."""

    def __init__(self, runtime: Runtime, task_group: TaskGroup, *, max_actors: int = 2000) -> None:
        self._rt = runtime
        self._tg = task_group
        self._max = max_actors
        self._actors: dict[UUID, Actor] = {}
        self._waiting: dict[UUID, Work | None] = {}
        # recorded_seq of actors that retired since the current drain began: a read that drain took before such an
        # actor's last outcome must not be trusted by the mentor's next actor (see forget_retired).
        self._retired: dict[UUID, int] = {}
        self.spawned = 0
        self._all_done = anyio.Event()

    @property
    def alive(self) -> int:
        return len(self._actors)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def has_actor(self, mentor_id: UUID) -> bool:
        return mentor_id in self._actors

    def wake(self, mentor_id: UUID, work: Work | None = None) -> None:
        """Wake the mentor's actor, spawning it if need be; ``work`` is its work as just read, if known."""
        actor = self._actors.get(mentor_id)
        if actor is not None:
            actor.mailbox.put(work)
        elif len(self._actors) < self._max:
            self._spawn(mentor_id, work)
        else:
            self._waiting[mentor_id] = work  # a mentor already waiting keeps its place, with the newest work

    def _crowded(self) -> bool:
        """Whether mentors wait for an actor slot: then idle actors retire at once to make room."""
        return bool(self._waiting)

    def forget_retired(self) -> None:
        """Called as a drain begins: every read it hands out is taken after the retirements so far, so it includes
        those actors' last outcomes."""
        self._retired.clear()

    def _spawn(self, mentor_id: UUID, work: Work | None = None) -> None:
        actor = Actor(mentor_id, self._rt, recorded_seq=self._retired.pop(mentor_id, 0), crowded=self._crowded)
        actor.mailbox.put(work)
        self._actors[mentor_id] = actor
        self.spawned += 1
        self._tg.start_soon(self._host, actor, name=f"actor-{mentor_id}")

    async def _host(self, actor: Actor) -> None:
        try:
            with actor.cancel_scope:
                await actor.run()
        finally:
            # No await between the actor's last look at its mailbox and this: a wake-up cannot slip in between.
            del self._actors[actor.mentor_id]
            if actor.recorded_seq:
                self._retired[actor.mentor_id] = actor.recorded_seq
            if not self._actors:
                self._all_done.set()
            if actor.mailbox.take() and not self._rt.stopping:
                self._spawn(actor.mentor_id, actor.mailbox.work)
            while self._waiting and len(self._actors) < self._max and not self._rt.stopping:
                next_id = next(iter(self._waiting))
                self._spawn(next_id, self._waiting.pop(next_id))

    def wake_all(self) -> None:
        for actor in self._actors.values():
            actor.mailbox.put()

    def cancel_all(self) -> None:
        self._waiting.clear()
        for actor in list(self._actors.values()):
            actor.cancel_scope.cancel()

    async def drained(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for every actor to finish; True if they all did."""
        with anyio.move_on_after(timeout):
            while self._actors:
                self._all_done = anyio.Event()
                await self._all_done.wait()
        return not self._actors
