"""A bounded closed-loop load client for ``safedecode serve`` (asyncio + httpx, 127.0.0.1).

``concurrency`` clients each send streaming chat requests back to back until ``requests`` have
been sent in all or ``time_limit`` seconds have passed (whichever comes first: the loop always
stops by itself). Request ``i`` asks for ``max_tokens * (1 + spread * u_i)`` tokens, ``u_i``
uniform in [-1, 1] (seeded), so the clients fall out of step and new prompts are prefilled while
other streams decode, as in real traffic (``spread=0``: every request the same length). Per
request it records the time to the first content chunk and the gaps between content chunks
(inter-token latency; one token per chunk as the server streams).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

PROMPTS = [
    "Explain how a rainbow forms.", "Write a short poem about autumn.",
    "What are three tips for learning a new language?", "Describe the water cycle.",
    "How does a bicycle stay upright?", "Give me a recipe for pancakes.",
    "Why do cats purr?", "Summarise the plot of a heist movie you invent.",
    "What is photosynthesis?", "How do I start running as a beginner?",
    "Explain what a database index is.", "List some ways to save energy at home.",
]


@dataclass
class LevelResult:
    concurrency: int
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {"concurrency": self.concurrency, "requests": self.requests,
                "errors": self.errors, "tokens": self.tokens, "wall_s": self.wall_s,
                "tok_s": self.tokens / self.wall_s if self.wall_s else 0.0,
                "ttft_p50_s": percentile(self.ttft, 50), "ttft_p99_s": percentile(self.ttft, 99),
                "itl_p50_s": percentile(self.itl, 50), "itl_p99_s": percentile(self.itl, 99)}


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation); NaN for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def _one(client: httpx.AsyncClient, body: dict, res: LevelResult) -> None:
    t0 = time.perf_counter()
    last = None
    n = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            res.errors += 1
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                res.errors += 1
                return
            if not any(c["delta"].get("content") for c in chunk.get("choices", [])):
                continue
            now = time.perf_counter()
            if last is None:
                res.ttft.append(now - t0)
            else:
                res.itl.append(now - last)
            last = now
            n += 1
    res.tokens += n
    res.requests += 1


async def run_level(url: str, model: str, concurrency: int, requests: int, max_tokens: int,
                    *, time_limit: float = 300.0, api_key: str | None = None,
                    seed: int = 0, spread: float = 0.0) -> LevelResult:
    """``requests`` streaming chats (about ``max_tokens`` each, see the module docstring; EOS
    ignored) from ``concurrency`` closed-loop clients, stopping at ``time_limit`` seconds."""
    if not 0 <= spread < 1:
        raise ValueError(f"spread: must be in [0, 1), got {spread}")
    rng = random.Random(seed)
    lengths = [max(1, round(max_tokens * (1 + spread * rng.uniform(-1, 1))))
               for _ in range(requests)]
    if not url.startswith(("http://127.0.0.1", "http://localhost")):
        raise ValueError(f"url: the load client talks to 127.0.0.1 only, got {url!r}")
    res = LevelResult(concurrency)
    counter = iter(range(requests))
    deadline = time.perf_counter() + time_limit
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            body = {"model": model, "max_tokens": lengths[i], "temperature": 0.7,
                    "seed": seed + i, "stream": True, "ignore_eos": True,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            await _one(client, body, res)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=time_limit + 60, limits=limits,
                                 headers=headers) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop(client)
                                                for _ in range(concurrency))),
                               time_limit + 120)
        res.wall_s = time.perf_counter() - t0
    return res
