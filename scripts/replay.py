#!/usr/bin/env python3
"""Operators' wrapper for `hlf-actors replay`: rebuild the projections from event_log (``--verify``: only compare).

scripts/replay.py [--verify | --archive-before DAYS]
"""

from __future__ import annotations

import sys

from hlf_actors.cli import main

if __name__ == "__main__":
    sys.exit(main(["replay", *sys.argv[1:]]))
