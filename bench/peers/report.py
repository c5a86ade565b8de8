"""From the repetitions' raw figures to the markdown tables: median (min-max) per figure, and hlf_actors' ratios to
the best peer and to the floors, each beside the target issue 25 set for it (and, with ``--before``, beside the
same figure of the earlier checkout, ``hlf_before``)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["render", "summarise"]

PEERS = ("procrastinate", "pgqueuer", "poller")
_LABELS = {
    "hlf_actors": "**hlf_actors**",
    "hlf_before": "hlf_actors before (--before)",
    "procrastinate": "Procrastinate",
    "pgqueuer": "PGQueuer",
    "poller": "naive poller",
    "minimal_loop": "floor: minimal NOTIFY loop",
}


def _get(run: dict[str, Any], path: Sequence[str]) -> Any:
    node: Any = run
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _spread(values: Sequence[float | None]) -> dict[str, float] | None:
    numbers = [float(v) for v in values if v is not None and v == v]
    if not numbers:
        return None
    return {"median": statistics.median(numbers), "min": min(numbers), "max": max(numbers), "n": len(numbers)}


def summarise(reps: list[dict[str, Any]], delays: Sequence[str]) -> dict[str, Any]:
    """Median/min/max over the repetitions for every figure the tables show."""
    systems: dict[str, list[dict[str, Any]]] = {}
    for rep in reps:
        for name, run in rep["systems"].items():
            systems.setdefault(name, []).append(run)
    out: dict[str, Any] = {"systems": {}, "floors": {}}
    for name, runs in systems.items():
        figures: dict[str, Any] = {}
        for delay in delays:
            for phase, key in (
                ("paced", "p50_ms"),
                ("paced", "p99_ms"),
                ("paced", "max_ms"),
                ("paced", "cpu_ms_per_sync"),
                ("stream", "per_s"),
                ("stream", "cpu_ms_per_sync"),
                ("backlog", "per_s"),
            ):
                figures[f"{delay}.{phase}.{key}"] = _spread([_get(r, ["phases", delay, phase, key]) for r in runs])
        lost = dup = 0
        for r in runs:
            for phases in r.get("phases", {}).values():
                for figures_of_phase in phases.values():
                    lost += int(figures_of_phase.get("lost", 0))
                    dup += int(figures_of_phase.get("duplicates", 0))
        figures["lost"], figures["duplicates"] = lost, dup
        figures["peak_rss_mb"] = _spread([r.get("peak_rss_mb") for r in runs])
        crashes = [r["crash"] for r in runs if "crash" in r]
        if crashes:
            figures["crash"] = {
                "lost": sum(c["lost"] for c in crashes),
                "duplicates": _spread([c["duplicates"] for c in crashes]),
                "restart_to_first_patch_s": _spread([c.get("restart_to_first_patch_s") for c in crashes]),
                "restart_to_all_delivered_s": _spread([c["restart_to_all_delivered_s"] for c in crashes]),
                "stuck_wait_s": _spread([c["stuck_wait_s"] for c in crashes]),
                "restart_to_idle_s": _spread([c["restart_to_idle_s"] for c in crashes]),
                "undelivered_runs": sum(1 for c in crashes if c["restart_to_all_delivered_s"] is None),
                "runs": len(crashes),
                "timeout_s": crashes[0]["timeout_s"],
            }
        out["systems"][name] = figures
    notify = [rep["floors"]["listen_notify"] for rep in reps if "listen_notify" in rep.get("floors", {})]
    if notify:
        out["floors"]["listen_notify"] = {k: _spread([n[k] for n in notify]) for k in ("p50_ms", "p99_ms", "max_ms")}
    httpx = [rep["floors"]["httpx"] for rep in reps if "httpx" in rep.get("floors", {})]
    for delay in delays:
        rows = [h[delay] for h in httpx if delay in h]
        if rows:
            out["floors"][f"httpx.{delay}"] = {
                "per_s": _spread([r["per_s"] for r in rows]),
                "cpu_ms_per_request": _spread([r["cpu_ms_per_request"] for r in rows]),
            }
    return out


# -- rendering --------------------------------------------------------------------------------------------------


def _fmt(spread: dict[str, float] | None, digits: int = 1) -> str:
    if spread is None:
        return "—"
    median = f"{spread['median']:.{digits}f}"
    if spread["n"] < 2:
        return median
    return f"{median} ({spread['min']:.{digits}f}-{spread['max']:.{digits}f})"


def _median(spread: dict[str, float] | None) -> float | None:
    return None if spread is None else spread["median"]


def _best(summary: dict[str, Any], key: str, better: Callable[[float, float], bool]) -> tuple[str, float] | None:
    best: tuple[str, float] | None = None
    for name in PEERS:
        value = _median(summary["systems"].get(name, {}).get(key))
        if value is not None and (best is None or better(value, best[1])):
            best = (name, value)
    return best


def render(summary: dict[str, Any], meta: dict[str, Any], delays: Sequence[str]) -> str:
    systems = summary["systems"]
    floors = summary["floors"]
    reps = meta["reps"]
    lines = [
        f"## Sync benchmark: hlf_actors and its peers ({meta['cpus']} cores, PostgreSQL {meta['postgres']}, "
        f"{meta['mentors']:,} mentors, {reps} repetition{'s' if reps != 1 else ''}"
        f"{', median (min-max)' if reps > 1 else ''})",
        "",
        f"Load average before/after: {meta['load_before']} / {meta['load_after']}. Paced: {meta['rate']:g} changes/s "
        f"for {meta['seconds']:g} s. Backlog and stream: {meta['mentors']:,} changes. CPU: the worker's process "
        "tree, during the stream. Lost/dup: summed over every paced, stream and backlog phase of every repetition.",
    ]
    for delay in delays:
        lines += [
            "",
            f"### Portal answering after {delay}",
            "",
            "| system | paced p50 ms | p99 ms | max ms | backlog /s | stream /s | CPU ms/sync | peak RSS MB | "
            "lost | dup |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in ("hlf_actors", "hlf_before", *PEERS, "minimal_loop"):
            f = systems.get(name)
            if f is None:
                continue
            lines.append(
                f"| {_LABELS[name]} | {_fmt(f[f'{delay}.paced.p50_ms'], 2)} | {_fmt(f[f'{delay}.paced.p99_ms'], 1)} "
                f"| {_fmt(f[f'{delay}.paced.max_ms'], 1)} | {_fmt(f[f'{delay}.backlog.per_s'], 0)} "
                f"| {_fmt(f[f'{delay}.stream.per_s'], 0)} | {_fmt(f[f'{delay}.stream.cpu_ms_per_sync'], 2)} "
                f"| {_fmt(f['peak_rss_mb'], 0)} | {f['lost']} | {f['duplicates']} |"
            )
        notify = floors.get("listen_notify")
        if notify and delay == delays[0]:
            lines.append(
                f"| floor: LISTEN/NOTIFY round trip | {_fmt(notify['p50_ms'], 2)} | {_fmt(notify['p99_ms'], 2)} "
                f"| {_fmt(notify['max_ms'], 2)} | | | | | | |"
            )
        httpx = floors.get(f"httpx.{delay}")
        if httpx:
            lines.append(
                f"| floor: httpx alone (10 in flight) | | | | {_fmt(httpx['per_s'], 0)} | {_fmt(httpx['per_s'], 0)} "
                f"| {_fmt(httpx['cpu_ms_per_request'], 2)} | | | |"
            )
    crashed = [(n, systems[n]["crash"]) for n in ("hlf_actors", "hlf_before", *PEERS) if "crash" in systems.get(n, {})]
    if crashed:
        timeout = crashed[0][1]["timeout_s"]
        lines += [
            "",
            f"### Crash: SIGKILL of the worker half-way through a backlog of {meta['crash_changes']:,}, "
            f"restarted at once (portal 0 ms; watched for {timeout:.0f} s)",
            "",
            "| system | lost | dup | restart → first PATCH s | restart → all delivered s | "
            "of which waiting for stuck work s | restart → idle s |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, c in crashed:
            never = f" ({c['undelivered_runs']} of {c['runs']} runs never)" if c["undelivered_runs"] else ""
            lines.append(
                f"| {_LABELS[name]} | {c['lost']} | {_fmt(c['duplicates'], 0)} "
                f"| {_fmt(c.get('restart_to_first_patch_s'), 2)} "
                f"| {_fmt(c['restart_to_all_delivered_s'], 2)}{never} | {_fmt(c['stuck_wait_s'], 2)} "
                f"| {_fmt(c['restart_to_idle_s'], 2)} |"
            )
    memory = meta.get("memory") or {}
    measured = [m for m in memory.values() if "known" in m]
    if measured:
        any_run = measured[0]
        lines += [
            "",
            f"### Memory: {any_run['known']:,} mentors in the database, {any_run['active']:,} of them changed once",
            "",
            "| system | RSS when ready MB | peak RSS (VmHWM) MB | lost | dup |",
            "|---|---|---|---|---|",
        ]
        for name in ("hlf_actors", "hlf_before", *PEERS):
            m = memory.get(name)
            if m is None:
                continue
            if "error" in m:
                lines.append(f"| {_LABELS[name]} | {m['error']} | | | |")
                continue
            lines.append(
                f"| {_LABELS[name]} | {m['rss_ready_mb']:.0f} | {m['peak_rss_mb']:.0f} | {m['lost']} "
                f"| {m['duplicates']} |"
            )
    errors = meta.get("errors") or {}
    if errors:
        lines += ["", "### Failures (see the logs)", ""]
        lines += [f"- {name}: {text}" for name, text in errors.items()]
    lines += _ratios(summary, meta, delays)
    return "\n".join(lines)


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs == 0:
        return "—"
    return f"{ours / theirs:.2f}x"


def _ratios(summary: dict[str, Any], meta: dict[str, Any], delays: Sequence[str]) -> list[str]:
    """Issue 25's targets: hlf_actors against the floors of its own stack (the minimal loop, httpx alone)."""
    ours = summary["systems"].get("hlf_actors")
    if ours is None:
        return []
    before = summary["systems"].get("hlf_before") or {}
    floors = summary["floors"]
    lines = [
        "",
        "### hlf_actors against the floors of its stack and the best peer (medians; issue 25's targets)",
        "",
        "| figure | hlf_actors | before | best peer | floor | ours ÷ floor | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(value: float | None, digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    def row(label: str, key: str, lower: bool, floor: tuple[str, float | None], factor: float, target: str) -> None:
        value = _median(ours.get(key))
        best = _best(summary, key, (lambda a, b: a < b) if lower else (lambda a, b: a > b))
        best_text = f"{best[1]:.2f} ({_LABELS[best[0]]})" if best else "—"
        floor_text = f"{floor[1]:.2f} ({floor[0]})" if floor[1] is not None else "—"
        ok: bool | None = None
        if target and value is not None and floor[1] is not None:
            ok = value <= factor * floor[1] if lower else value >= factor * floor[1]
        met = "—" if ok is None else ("yes" if ok else "**no**")
        lines.append(
            f"| {label} | {cell(value)} | {cell(_median(before.get(key)))} | {best_text} | {floor_text} "
            f"| {_ratio(value, floor[1])} | {target} | {met} |"
        )

    for delay in delays:
        minimal = summary["systems"].get("minimal_loop", {})
        httpx = floors.get(f"httpx.{delay}") or {}
        ceiling = _median(httpx.get("per_s"))
        p50_floor = ("minimal loop", _median(minimal.get(f"{delay}.paced.p50_ms")))
        p99_floor = ("minimal loop", _median(minimal.get(f"{delay}.paced.p99_ms")))
        row(f"paced p50 ms, {delay}", f"{delay}.paced.p50_ms", True, p50_floor, 1.3, "≤ 1.3x minimal loop")
        row(f"paced p99 ms, {delay}", f"{delay}.paced.p99_ms", True, p99_floor, 2.0, "≤ 2x minimal loop")
        row(
            f"backlog /s, {delay}", f"{delay}.backlog.per_s", False, ("httpx alone", ceiling), 0.9, "≥ 0.9x httpx alone"
        )
        row(f"stream /s, {delay}", f"{delay}.stream.per_s", False, ("httpx alone", ceiling), 0.0, "")
        row(
            f"CPU ms/sync, {delay}",
            f"{delay}.stream.cpu_ms_per_sync",
            True,
            ("httpx alone", _median(httpx.get("cpu_ms_per_request"))),
            1.1,
            "≤ 1.1x httpx alone per request",
        )
    memory = meta.get("memory") or {}
    mine, earlier = memory.get("hlf_actors") or {}, memory.get("hlf_before") or {}
    if "peak_rss_mb" in mine:
        lines.append(
            f"| peak RSS MB, {mine['known']:,} known mentors | {mine['peak_rss_mb']:.0f} "
            f"| {cell(earlier.get('peak_rss_mb'), 0)} | | | | ≤ 55 MB "
            f"| {'yes' if mine['peak_rss_mb'] <= 55 else '**no**'} |"
        )
    peak = _median(ours.get("peak_rss_mb"))
    if peak is not None:
        lines.append(
            f"| peak RSS MB, paced/stream/backlog/crash runs | {peak:.0f} "
            f"| {cell(_median(before.get('peak_rss_mb')), 0)} | | | | ≤ 55 MB | {'yes' if peak <= 55 else '**no**'} |"
        )
    crash = ours.get("crash")
    if crash:
        recovery = _median(crash["restart_to_all_delivered_s"])
        dup = _median(crash["duplicates"])
        first = _median(crash.get("restart_to_first_patch_s"))
        earlier_crash = before.get("crash") or {}
        ok = crash["lost"] == 0 and crash["undelivered_runs"] == 0 and (dup or 0) <= 10
        lines.append(
            f"| crash of {meta['crash_changes']:,}: lost / dup / restart → all delivered s | {crash['lost']} / "
            f"{_fmt(crash['duplicates'], 0)} / {cell(recovery)} "
            f"| {cell(_median(earlier_crash.get('restart_to_all_delivered_s')))} | | | "
            f"| 0 lost, dup ≤ 10 (HLF_PORTAL_CONCURRENCY), ≤ 1.5 s "
            f"| {'yes' if ok and recovery is not None and recovery <= 1.5 else '**no**'} |"
        )
        lines.append(
            f"| process start → first PATCH s (the crash's restart) | {cell(first)} "
            f"| {cell(_median(earlier_crash.get('restart_to_first_patch_s')))} | | | | ≤ 0.4 s "
            f"| {'—' if first is None else ('yes' if first <= 0.4 else '**no**')} |"
        )
    return lines
