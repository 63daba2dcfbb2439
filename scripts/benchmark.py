"""Latency and throughput of a running predictor over HTTP, for V1 and V2.

    uv run python scripts/benchmark.py --url http://127.0.0.1:8080

For each protocol, batch size (rows per request) and concurrency it sends the same
realistic generated transactions, checks every response (status, row count, outputs)
and prints p50/p95/p99 latency, requests/s and rows/s. A failed check is counted and
reported, never hidden; the exit code is 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass

import httpx

from predictor.codec import V2_INPUTS
from predictor.data import generate_transactions, transaction_payloads


@dataclass
class Result:
    protocol: str
    rows: int
    concurrency: int
    latencies_ms: list[float]
    wall_seconds: float
    failures: int

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies_ms) / self.wall_seconds


def v1_request(transactions: list[dict]) -> dict:
    return {"instances": transactions}


def v2_request(transactions: list[dict]) -> dict:
    return {
        "inputs": [
            {
                "name": name,
                "datatype": dtype,
                "shape": [len(transactions)],
                "data": [txn[name] for txn in transactions],
            }
            for name, dtype in V2_INPUTS.items()
        ]
    }


def check(protocol: str, response: httpx.Response, rows: int) -> bool:
    """A response counts only if it is a 200 with one sane answer per row."""
    if response.status_code != 200:
        return False
    body = response.json()
    if protocol == "v1":
        predictions = body.get("predictions", [])
        return len(predictions) == rows and all(
            0.0 <= p["fraud_probability"] <= 1.0 and isinstance(p["is_fraud"], bool)
            for p in predictions
        )
    outputs = {o["name"]: o["data"] for o in body.get("outputs", [])}
    probabilities = outputs.get("fraud_probability", [])
    return len(probabilities) == rows and len(outputs.get("is_fraud", [])) == rows


async def run(
    base_url: str,
    model: str,
    protocol: str,
    rows: int,
    concurrency: int,
    requests: int,
    payloads: list[dict],
    warmup: int = 50,
) -> Result:
    url = (
        f"{base_url}/v1/models/{model}:predict"
        if protocol == "v1"
        else f"{base_url}/v2/models/{model}/infer"
    )
    build = v1_request if protocol == "v1" else v2_request
    bodies = [
        build([payloads[(i * rows + j) % len(payloads)] for j in range(rows)]) for i in range(64)
    ]
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        for i in range(warmup):
            await client.post(url, json=bodies[i % len(bodies)])
        counter = iter(range(requests))

        async def worker() -> None:
            nonlocal failures
            for i in counter:
                started = time.perf_counter()
                try:
                    response = await client.post(url, json=bodies[i % len(bodies)])
                    ok = check(protocol, response, rows)
                except httpx.HTTPError:
                    ok = False
                latencies.append((time.perf_counter() - started) * 1000)
                failures += not ok

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return Result(protocol, rows, concurrency, latencies, wall, failures)


def table(results: list[Result]) -> str:
    header = (
        f"{'protocol':<8} {'rows':>5} {'conc':>4} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'req/s':>8} {'rows/s':>9} {'failed':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.protocol:<8} {r.rows:>5} {r.concurrency:>4} {len(r.latencies_ms):>8} "
            f"{r.percentile(50):>8.2f} {r.percentile(95):>8.2f} {r.percentile(99):>8.2f} "
            f"{r.requests_per_second:>8.0f} {r.requests_per_second * r.rows:>9.0f} "
            f"{r.failures:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="predictor base URL")
    parser.add_argument("--model", default="fraud-detector", help="model name")
    parser.add_argument("--protocols", nargs="+", default=["v1", "v2"], choices=["v1", "v2"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 100], help="rows per request")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--requests", type=int, default=1000, help="requests per combination")
    args = parser.parse_args(argv)

    payloads = transaction_payloads(generate_transactions(rows=2_000, fraud_rate=0.05, seed=1))
    results = []
    for protocol in args.protocols:
        for rows in args.rows:
            for concurrency in args.concurrency:
                result = asyncio.run(
                    run(args.url, args.model, protocol, rows, concurrency, args.requests, payloads)
                )
                results.append(result)
                print(
                    f"{protocol} rows={rows} c={concurrency}: "
                    f"p50 {statistics.median(result.latencies_ms):.2f} ms",
                    file=sys.stderr,
                )
    print(table(results))
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
