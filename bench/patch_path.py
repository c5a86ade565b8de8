"""The PATCH path alone, A/B in one run (issue 25): CPU and wall time per ``DynamicsClient.set_listed`` through
httpx (the path every request took before) and through httpcore directly (``DynamicsClient._patch``), on asyncio
and on uvloop, beside httpx alone (the floor of bench/peers), all against bench/peers' fake portal.

``raw_asyncio+uvloop`` is no HTTP library at all: the same PATCH bytes written to ten keep-alive asyncio streams
and the 204 read back by hand, with no timeouts, no TLS and no error handling: not a client, only the floor of
Python, the event loop and the socket under the other variants.

Each variant runs in its own subprocess, in turn, ``--rounds`` times (so a noisy neighbour hits them alike), ten
requests in flight as in the service; the figures are medians over the rounds.

    .bench-venv/bin/python -m bench.patch_path [--requests 3000] [--rounds 3]

Prints one markdown table: variant, requests/s, CPU µs per request (user + system of the variant's process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from uuid import uuid4

VARIANTS = (
    "httpx_alone",
    "httpx_path",
    "httpcore_path",
    "httpx_path+uvloop",
    "httpcore_path+uvloop",
    "httpcore_path+uvloop+httpcore_pool",
    "raw_asyncio+uvloop",
)


async def _client_run(variant: str, portal_env: dict[str, str], requests: int) -> dict[str, float]:
    import httpx

    from hlf_actors.config import load_config
    from hlf_actors.dynamics import DynamicsClient

    records = [uuid4() for _ in range(requests)]
    if variant == "raw_asyncio":
        return await _raw(portal_env, records)
    if variant == "httpx_alone":
        base = f"{portal_env['HLF_DYNAMICS_URL']}/api/data/v9.2/{portal_env['HLF_DYNAMICS_ENTITY_SET']}"
        async with httpx.AsyncClient(
            limits=httpx.Limits(max_connections=10, max_keepalive_connections=10), timeout=30.0
        ) as http:

            async def one(record: object) -> None:
                (await http.patch(f"{base}({record})", json={"hlf_publiclisting": True})).raise_for_status()

            return await _drive(one, records)
    config = load_config({"HLF_DATABASE_URL": "postgresql://unused/x", **portal_env}, dotenv=None)
    client = DynamicsClient(config)
    if variant.startswith("httpx_path"):
        client._pool = None  # the way every request went before: through httpx
    if variant.endswith("httpcore_pool"):
        import httpcore

        assert client._pool is not None
        client._pool.__class__ = httpcore.AsyncConnectionPool  # httpcore's own bookkeeping, not http_transport._Pool
    try:

        async def one(record: object) -> None:
            assert isinstance(record, type(records[0]))
            await client.set_listed(record, True)

        return await _drive(one, records)
    finally:
        await client.aclose()


async def _raw(portal_env: dict[str, str], records: list[object]) -> dict[str, float]:
    from urllib.parse import urlsplit

    url = urlsplit(portal_env["HLF_DYNAMICS_URL"])
    path = f"/api/data/v9.2/{portal_env['HLF_DYNAMICS_ENTITY_SET']}"
    body = b'{"hlf_publiclisting":true}'
    connections = [await asyncio.open_connection(url.hostname, url.port) for _ in range(10)]

    def worker(index: int) -> object:
        reader, writer = connections[index]

        async def one(record: object) -> None:
            head = (
                f"PATCH {path}({record}) HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer bench\r\n"
                f"If-Match: *\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode() + body)
            answer = await reader.readuntil(b"\r\n\r\n")
            if not answer.startswith(b"HTTP/1.1 204"):
                raise RuntimeError(answer[:40])

        return one

    senders = [worker(i) for i in range(10)]

    async def run(mine: list[object], send: object) -> None:
        for record in mine:
            await send(record)  # type: ignore[operator]

    await asyncio.gather(*(run([uuid4()], senders[i]) for i in range(10)))
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(run(records[i::10], senders[i]) for i in range(10)))
    result = {"cpu_s": time.process_time() - cpu0, "seconds": time.monotonic() - wall0, "requests": len(records)}
    for _, writer in connections:
        writer.close()
    return result


async def _drive(one: object, records: list[object]) -> dict[str, float]:
    from collections.abc import Awaitable, Callable

    send: Callable[[object], Awaitable[None]] = one  # type: ignore[assignment]

    async def worker(mine: list[object]) -> None:
        for record in mine:
            await send(record)

    await asyncio.gather(*(worker([uuid4()]) for _ in range(10)))  # token, connections
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(worker(records[i::10]) for i in range(10)))
    return {"cpu_s": time.process_time() - cpu0, "seconds": time.monotonic() - wall0, "requests": len(records)}


def _child(variant: str, env_json: str, requests: int) -> None:
    env = json.loads(env_json)
    if "+uvloop" in variant:
        import uvloop

        result = uvloop.run(_client_run(variant.replace("+uvloop", ""), env, requests))
    else:
        result = asyncio.run(_client_run(variant, env, requests))
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.requests)
        return
    from .peers.portal import PortalProcess

    figures: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    with PortalProcess() as portal:
        env = json.dumps(portal.env())
        for _ in range(args.rounds):
            for variant in VARIANTS:
                argv = ["-m", "bench.patch_path", "--requests", str(args.requests), "--child", variant, env]
                out = subprocess.run(
                    [sys.executable, *argv],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                figures[variant].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.requests} PATCHes, ten in flight, median of {args.rounds} rounds\n")
    print("| variant | requests/s | CPU µs/request |\n|---|---|---|")
    for variant, runs in figures.items():
        rate = statistics.median(r["requests"] / r["seconds"] for r in runs)
        cpu = statistics.median(r["cpu_s"] / r["requests"] * 1e6 for r in runs)
        print(f"| {variant} | {rate:,.0f} | {cpu:,.0f} |")


if __name__ == "__main__":
    main()
