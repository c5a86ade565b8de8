"""hlf_actors side by side with Procrastinate, PGQueuer, a naive poller and the floors, in one run.

    scripts/bench.sh [--reps 3] [--mentors 2000] [--quick] ...     (makes .bench-venv, then runs this)
    .bench-venv/bin/python -m bench.peers ...                      (from the repository's root)

Every system runs against the same fake portal process (bench/peers/portal.py), on its own scratch database on
HLF_TEST_DATABASE_URL's server (else 127.0.0.1:5432 as postgres), dropped afterwards; the repetitions alternate the
order of the systems. Prints markdown tables and writes every raw figure to bench/results/<timestamp>.json.
What each phase measures: bench/peers/phases.py; how each system is set up: bench/peers/systems.py; both in
bench/peers/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from .phases import Settings, run_httpx_alone, run_listen_notify, run_memory, run_system
from .portal import PortalProcess
from .report import render, summarise
from .systems import SYSTEMS, before_tree, by_name

_FLOORS = ("listen_notify", "httpx")
_RESULTS = Path(__file__).resolve().parents[1] / "results"


def _admin_url() -> str:
    return os.environ.get("HLF_TEST_DATABASE_URL") or make_conninfo(
        host="127.0.0.1", port=5432, user="postgres", dbname="postgres"
    )


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("procrastinate", "pgqueuer", "psycopg", "httpx", "anyio", "hlf-actors"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "absent"
    return out


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions, alternating the order (default 3)")
    parser.add_argument("--mentors", type=int, default=2000, help="N: mentors, and changes per backlog/stream")
    parser.add_argument("--rate", type=float, default=100.0, help="paced changes per second (default 100)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the paced phase (default 10)")
    parser.add_argument("--delays", default="0,20", help="portal answer delays in ms (default 0,20)")
    parser.add_argument("--crash-changes", type=int, default=2000, help="backlog the crash test kills (0: none)")
    parser.add_argument("--crash-timeout", type=float, default=90.0, help="how long a restart is watched (s)")
    parser.add_argument("--memory-mentors", type=int, default=100_000, help="known mentors in the memory test")
    parser.add_argument("--memory-active", type=int, default=1000, help="of them changed once")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory test")
    parser.add_argument(
        "--systems",
        default=",".join([s.name for s in SYSTEMS] + list(_FLOORS)),
        help="comma-separated subset of: " + ", ".join([s.name for s in SYSTEMS] + list(_FLOORS)),
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 rep, 300 mentors, 3 s paced, small tests")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/<timestamp>.json)")
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="a checkout of an earlier commit (e.g. `git archive <commit> | tar -x -C DIR`): also run it, as "
        "hlf_before, right after hlf_actors, for a before/after in one run",
    )
    args = parser.parse_args()
    if args.quick:
        args.reps, args.mentors, args.seconds = 1, 300, 3.0
        args.crash_changes, args.crash_timeout = 300, 45.0
        args.memory_mentors, args.memory_active = 10_000, 200
    return args


def main() -> int:
    args = _parse()
    names = [n.strip() for n in args.systems.split(",") if n.strip() and n.strip() != "hlf_before"]
    if args.before is not None:
        os.environ["BENCH_BEFORE_TREE"] = str(args.before.resolve())
        before_tree()  # a wrong directory stops the run here, with one line, not after the first system
        at = names.index("hlf_actors") + 1 if "hlf_actors" in names else 0
        names.insert(at, "hlf_before")
        meta_before = str(args.before.resolve())
    else:
        meta_before = None
    unknown = [n for n in names if n not in _FLOORS and n not in {s.name for s in SYSTEMS}]
    if unknown:
        print(f"unknown system(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    delays = tuple(float(d) for d in args.delays.split(","))
    delay_keys = [f"{d:g}ms" for d in delays]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = Path(tempfile.mkdtemp(prefix=f"hlf-bench-peers-{stamp}-"))
    admin = _admin_url()
    with psycopg.connect(admin, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    settings = Settings(
        admin_url=admin,
        mentors=args.mentors,
        rate=args.rate,
        seconds=args.seconds,
        delays_ms=delays,
        crash_changes=args.crash_changes,
        crash_timeout_s=args.crash_timeout,
        logs=logs,
    )
    meta: dict[str, Any] = {
        "started": stamp,
        "cpus": os.cpu_count(),
        "postgres": str(row[0]).split()[0] if row else "?",
        "versions": _versions(),
        "reps": args.reps,
        "mentors": args.mentors,
        "rate": args.rate,
        "seconds": args.seconds,
        "delays_ms": list(delays),
        "crash_changes": min(args.crash_changes, args.mentors),
        "quick": args.quick,
        "load_before": _load(),
        "logs": str(logs),
        "before": meta_before,
    }
    print(f"bench.peers: logs in {logs}; load average {meta['load_before']}", file=sys.stderr)
    began = time.monotonic()
    reps: list[dict[str, Any]] = []
    with PortalProcess() as portal:
        for rep in range(args.reps):
            order = names if rep % 2 == 0 else list(reversed(names))
            result: dict[str, Any] = {"rep": rep + 1, "order": order, "systems": {}, "floors": {}}
            for name in order:
                tag = f"r{rep + 1}_{os.getpid()}"
                step = time.monotonic()
                print(f"  rep {rep + 1}/{args.reps}: {name} …", file=sys.stderr, flush=True)
                try:
                    if name == "listen_notify":
                        result["floors"][name] = run_listen_notify(settings, tag)
                    elif name == "httpx":
                        result["floors"][name] = run_httpx_alone(portal, settings, tag)
                    else:
                        result["systems"][name] = run_system(by_name(name), portal, settings, tag)
                except Exception as err:  # one system failing must not cost the others' figures
                    print(f"    {name} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                    result.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
                print(f"    {time.monotonic() - step:.0f} s", file=sys.stderr, flush=True)
            reps.append(result)
        if not args.no_memory:
            meta["memory"] = {}
            for name in [n for n in names if n not in _FLOORS and n != "minimal_loop"]:
                print(f"  memory: {name} …", file=sys.stderr, flush=True)
                try:
                    meta["memory"][name] = run_memory(
                        by_name(name), portal, settings, f"{os.getpid()}", args.memory_mentors, args.memory_active
                    )
                except Exception as err:
                    print(f"    {name} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                    meta["memory"][name] = {"error": f"{type(err).__name__}: {err}"}
    meta["errors"] = {f"rep {r['rep']}, {n}": e for r in reps for n, e in r.get("errors", {}).items()}
    meta["errors"].update({f"memory, {n}": m["error"] for n, m in meta.get("memory", {}).items() if "error" in m})
    meta["load_after"] = _load()
    meta["seconds_total"] = time.monotonic() - began
    summary = summarise(reps, delay_keys)
    table = render(summary, meta, delay_keys)
    print(table)
    out = args.out or _RESULTS / f"{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "reps": reps, "table": table}, indent=2))
    print(f"\nraw figures: {out} ({meta['seconds_total']:.0f} s in all)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
