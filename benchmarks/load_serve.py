"""A bounded loopback load test of ``cirlab serve``: concurrent clients for a fixed time, then a report.

It starts ``cirlab serve INDEX_DIR`` on a free loopback port (a subprocess, as a user would run it), prepares a
set of distinct queries (gallery references and uploaded images, several texts and every method the server
offers) and records each one's answer with a single client. Then:

1. baseline: 1 client sends queries back to back for ``--baseline-seconds``;
2. load: ``--clients`` concurrent clients (asyncio + httpx) do the same for ``--seconds``.

For both it reports requests/s, p50/p95/p99 latency, transport errors, 4xx and 5xx responses, and answers that
differ from the recorded one (results mixed between concurrent requests). Targets: 0 errors, 0 5xx, 0 mixed.
Only loopback addresses are ever contacted, and every client stops when the time is up.

Usage:
    python benchmarks/load_serve.py INDEX_DIR [--clients 32 --seconds 60 --baseline-seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

TEXTS = ["", "make it red", "add a small blue circle", "the same but green", "remove the triangle", "two squares"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cirlab.cli.main", "serve", str(index_dir), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"cirlab serve exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    sys.exit("cirlab serve did not answer within 120 s")


def make_queries(client: httpx.Client, n: int, seed: int) -> list[dict]:
    """Distinct requests: half pick a gallery image, half upload one (re-encoded, so its bytes are new)."""
    info = client.get("/api/info").json()
    rng = random.Random(seed)
    queries = []
    for i in range(n):
        item = rng.randrange(info["count"])
        form = {"text": rng.choice(TEXTS), "method": info["methods"][i % len(info["methods"])], "k": "12"}
        if i % 2:
            original = Image.open(io.BytesIO(client.get(f"/api/images/{item}").content)).convert("RGB")
            buf = io.BytesIO()
            original.rotate(90 * rng.randrange(1, 4)).save(buf, format="PNG")
            queries.append({"data": form, "files": {"image": ("upload.png", buf.getvalue(), "image/png")}})
        else:
            queries.append({"data": {**form, "gallery_id": str(item)}})
    return queries


def answer(body: dict) -> list[tuple[int, float]]:
    return [(r["id"], round(r["score"], 4)) for r in body["results"]]


async def run_clients(base: str, queries: list, expected: list, clients: int, seconds: float, seed: int) -> dict:
    stats = {"latencies": [], "errors": 0, "4xx": 0, "5xx": 0, "mixed": 0, "error_kinds": {}}
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(cid: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + cid)
        while time.monotonic() < deadline:
            i = rng.randrange(len(queries))
            start = time.perf_counter()
            try:
                response = await http.post("/api/search", **queries[i])
            except httpx.HTTPError as err:
                stats["errors"] += 1
                stats["error_kinds"][type(err).__name__] = stats["error_kinds"].get(type(err).__name__, 0) + 1
                continue
            stats["latencies"].append(time.perf_counter() - start)
            if response.status_code >= 500:
                stats["5xx"] += 1
            elif response.status_code >= 400:
                stats["4xx"] += 1
            elif answer(response.json()) != expected[i]:
                stats["mixed"] += 1

    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(client_loop(c, http) for c in range(clients)))
        stats["seconds"] = time.monotonic() - t0
    return stats


def report(name: str, stats: dict) -> dict:
    lat = np.asarray(stats["latencies"]) * 1000
    n = len(lat)
    row = {
        "requests": n,
        "rps": n / stats["seconds"],
        "p50": float(np.percentile(lat, 50)) if n else float("nan"),
        "p95": float(np.percentile(lat, 95)) if n else float("nan"),
        "p99": float(np.percentile(lat, 99)) if n else float("nan"),
    }
    print(
        f"{name:<22} {n:>8} {row['rps']:>8.1f} {row['p50']:>8.1f} {row['p95']:>8.1f} {row['p99']:>8.1f}"
        f" {stats['errors']:>7} {stats['4xx']:>5} {stats['5xx']:>5} {stats['mixed']:>6}"
    )
    if stats["error_kinds"]:
        print(f"{'':<22} transport errors: {stats['error_kinds']}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index_dir", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--baseline-seconds", type=float, default=10)
    parser.add_argument("--queries", type=int, default=48, help="distinct requests in the mix")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 600:
        sys.exit("keep the load bounded: 1-256 clients for at most 600 s")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(args.index_dir, port)
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            print(client.get("/api/info").json()["description"])
            queries = make_queries(client, args.queries, args.seed)
            expected = []
            for q in queries:
                response = client.post("/api/search", **q)
                response.raise_for_status()
                expected.append(answer(response.json()))
        print(
            f"{len(queries)} distinct queries recorded; baseline 1 client {args.baseline_seconds:.0f} s, "
            f"then {args.clients} clients {args.seconds:.0f} s, all on {base}"
        )
        print(
            f"{'':<22} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
            f" {'errors':>7} {'4xx':>5} {'5xx':>5} {'mixed':>6}"
        )
        base_stats = asyncio.run(run_clients(base, queries, expected, 1, args.baseline_seconds, args.seed))
        base_row = report("baseline (1 client)", base_stats)
        load_stats = asyncio.run(run_clients(base, queries, expected, args.clients, args.seconds, args.seed + 1))
        load_row = report(f"load ({args.clients} clients)", load_stats)
    finally:
        server.terminate()
        server.wait(30)
    print(
        f"under load: {load_row['rps'] / base_row['rps']:.2f}x the baseline's requests/s, "
        f"p50 {load_row['p50'] / base_row['p50']:.1f}x the baseline's (requests queue for the one model)"
    )
    bad = {k: load_stats[k] + base_stats[k] for k in ("errors", "5xx", "mixed")}
    if any(bad.values()):
        print(f"MISSED the 0/0/0 target: {bad}")
        sys.exit(1)
    print("target met: 0 transport errors, 0 5xx responses, 0 mixed results")


if __name__ == "__main__":
    main()
