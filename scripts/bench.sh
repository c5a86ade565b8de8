#!/usr/bin/env bash
# hlf_actors side by side with its peers (issue 13): make .bench-venv with the repository (editable) and the
# benchmarks' own dependencies (bench/requirements.txt), then run `python -m bench.peers` with the arguments given.
#   scripts/bench.sh            the full run: 3 repetitions, 2,000 mentors, 100,000 for memory
#   scripts/bench.sh --quick    a smoke run: 1 repetition, 300 mentors
#   scripts/bench.sh --help     every option
# Needs python3 >= 3.11 and a PostgreSQL: HLF_TEST_DATABASE_URL's server, else 127.0.0.1:5432 as postgres.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .bench-venv/bin/python ]; then
    "$PYTHON" -m venv .bench-venv
fi
stamp=.bench-venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ bench/requirements.txt -nt "$stamp" ]; then
    .bench-venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .bench-venv/bin/python -m pip install --quiet --disable-pip-version-check -e . -r bench/requirements.txt
    touch "$stamp"
fi
exec .bench-venv/bin/python -m bench.peers "$@"
