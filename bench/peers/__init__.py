"""hlf_actors measured side by side with general Postgres job queues and with the floors of its stack (issue 13).

Run ``scripts/bench.sh`` (or ``python -m bench.peers`` in ``.bench-venv``); see README.md beside this file.
"""
