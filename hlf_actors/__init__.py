"""hlf_actors keeps HLF's public mentor listing in the Dynamics 365 portal true to the mentor database.

Postgres is the source of truth and the bus: triggers append events and NOTIFY; one process listens and hands each
mentor's work to that mentor's actor, which PATCHes the portal and appends every attempt to ``event_log``.
"""

__version__ = "0.1.0"
