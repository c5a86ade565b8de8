"""CPU per log line of `run`'s JSON output (issue 25): loguru's own ``serialize=True`` against the msgspec-built
lines of ``hlf_actors.logs`` (the same document), for the one line every sync writes, to /dev/null, A/B in one run.

    .venv/bin/python bench/log_line.py [--lines 50000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from loguru import logger

from hlf_actors.logs import setup_logging


def _per_line(lines: int) -> float:
    log = logger.bind(mentor_id="3d0c7a52-0000-4000-8000-0000000000f1")
    started = time.process_time()
    for _ in range(lines):
        log.info("{} sent (attempt {}, {} ms)", "restore", 1, 2.345)
    return (time.process_time() - started) / lines * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, list[float]] = {"loguru serialize=True": [], "hlf_actors.logs (msgspec)": []}
    with open("/dev/null", "w") as sink:
        for _ in range(args.rounds):
            setup_logging(stream=sink, json=True)
            figures["hlf_actors.logs (msgspec)"].append(_per_line(args.lines))
            logger.remove()
            logger.add(sink, serialize=True, format="{message}", backtrace=False, diagnose=False)
            figures["loguru serialize=True"].append(_per_line(args.lines))
    print(f"| JSON log line, {args.lines:,} lines, median of {args.rounds} | CPU µs/line |\n|---|---|")
    for name, runs in figures.items():
        print(f"| {name} | {statistics.median(runs):.1f} |")


if __name__ == "__main__":
    main()
