"""Serving under load: output tokens/s and p50/p95 request latency at 1, 4, 16 and 64
concurrent clients, continuous batching (16 slots) against one request at a time (1 slot),
side by side in one run, plus time to first token at 1 client. A loopback load generator
(httpx, this process) against `lmforge serve` (another process); bounded count and time.

    python benchmarks/serve_load.py --checkpoint runs/sft_full [--requests 256 --max-tokens 64]

Each level runs twice: answers that end when the model ends them, and answers of exactly
--max-tokens tokens (`ignore_eos`, as serving benchmarks such as vLLM's fix output lengths).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time

import httpx
import torch

PROMPTS = ["Name three colors.", "What is the capital of France?", "Give me a synonym for happy.",
           "Rewrite this sentence in the passive voice: The cat chased the mouse.",
           "Explain what a noun is.", "Translate 'good morning' into Spanish."]  # fmt: skip


class Running:
    """`lmforge serve` with `slots` decode slots in its own process (the load generator's
    work does not share its interpreter) on a free loopback port."""

    def __init__(self, checkpoint: str, slots: int, threads: int | None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = [sys.executable, "-m", "lmforge", "serve", "--checkpoint", checkpoint,
                "--port", str(self.port), "--slots", str(slots), "--max-queue", "1024",
                "--log-level", "warning",
                *(["--threads", str(threads)] if threads else [])]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(60)


async def load(
    url: str, clients: int, requests: int, max_tokens: int, deadline_s: float, fixed: bool
):
    """`requests` chat requests over `clients` concurrent connections -> (tokens, wall s,
    latencies)."""
    latencies: list[float] = []
    tokens = 0
    todo = iter(range(requests))
    stop_at = time.perf_counter() + deadline_s

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in todo:
            if time.perf_counter() > stop_at:
                return
            body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": fixed}  # fmt: skip
            t0 = time.perf_counter()
            r = await http.post(f"{url}/v1/chat/completions", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(clients)))
    return tokens, time.perf_counter() - start, latencies


async def time_to_first_token(url: str, tries: int = 10) -> float:
    times = []
    async with httpx.AsyncClient(timeout=60) as http:
        for i in range(tries):
            body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": 16, "stream": True}  # fmt: skip
            t0 = time.perf_counter()
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if '"content"' in line:
                        times.append(time.perf_counter() - t0)
                        break
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=256, help="per level (at least 2x clients)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds per level")
    parser.add_argument("--server-threads", type=int, default=None, help="lmforge serve --threads")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.checkpoint}; "
          f"{args.max_tokens} max tokens, temperature 0.8")  # fmt: skip
    print(
        "| server | answers | clients | requests | output tok/s | p50 latency s | p95 latency s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    rates: dict[tuple[int, bool, int], float] = {}
    for slots in (16, 1):
        running = Running(args.checkpoint, slots, args.server_threads)
        url = f"http://127.0.0.1:{running.port}"
        try:
            if slots == 16:
                ttft = asyncio.run(time_to_first_token(url))
            for fixed in (False, True):
                for clients in map(int, args.clients.split(",")):
                    n = max(args.requests, 2 * clients)
                    tokens, wall, lat = asyncio.run(
                        load(url, clients, n, args.max_tokens, args.deadline, fixed)
                    )
                    rates[slots, fixed, clients] = tokens / wall
                    p95 = sorted(lat)[max(0, int(0.95 * len(lat)) - 1)]
                    name = "continuous batching (16 slots)" if slots == 16 else "one at a time"
                    answers = f"all {args.max_tokens} tokens" if fixed else "until they end"
                    print(f"| {name} | {answers} | {clients} | {len(lat)} | {tokens / wall:.0f} | "
                          f"{statistics.median(lat):.2f} | {p95:.2f} |", flush=True)  # fmt: skip
        finally:
            running.close()
    print(f"\ntime to first token at 1 client (median of 10): {ttft * 1000:.1f} ms")
    for fixed in (False, True):
        for clients in map(int, args.clients.split(",")):
            ratio = rates[16, fixed, clients] / rates[1, fixed, clients]
            answers = f"all {args.max_tokens} tokens" if fixed else "answers until they end"
            print(f"{answers}, {clients} clients: batching / one-at-a-time = {ratio:.2f}x")


if __name__ == "__main__":
    main()
