#!/usr/bin/env python3
"""Break-glass re-sync of mentors to the Dynamics portal with newly issued credentials (see hlf_actors.break_glass).

    scripts/break_glass_sync.py --all --client-secret-file /path/to/new-secret
    scripts/break_glass_sync.py MENTOR_ID ... --dry-run

The database and portal addresses come from the HLF_* environment (or .env), as for `hlf-actors run`.
"""

from __future__ import annotations

import sys

from hlf_actors.break_glass import main

if __name__ == "__main__":
    sys.exit(main())
