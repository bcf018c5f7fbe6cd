"""Where a routed engine's step time goes (the serve_route docs cite it): 16 closed-loop routed
requests (64-192 tokens, T 0.7) for 90 s in process, timing ``eng.step()`` and
``router.feed()`` (the reward inline) apart.

    .venv/bin/python benchmarks/results/serve_route/profile_steps.py   # ~2 min, 2 CPU cores
"""

from __future__ import annotations

import random
import statistics
import time

from safedecode import methods
from safedecode.engine import SafeDecoder, SamplingParams
from safedecode.engine.prompts import request_text
from safedecode.methods.route import Router
from safedecode.models import load_default


def q(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3


def main(streams: int = 16, seconds: float = 90.0) -> None:
    model, tok = load_default()
    spec = methods.get("route")
    eng = SafeDecoder(model, tok, spec).engine(max_seqs=2 * streams)
    router = Router(eng, spec)
    rng = random.Random(0)
    added = 0

    def add() -> None:
        nonlocal added
        prompt = f"Tell me about topic number {added} in detail, please."
        added += 1
        router.add(eng.build(prompt), request_text(prompt),
                   SamplingParams(max_new_tokens=rng.randint(64, 192), temperature=0.7,
                                  seed=added, ignore_eos=True))

    for _ in range(streams):
        add()
    steps, feeds, rewards, done = [], [], [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        outs = eng.step()
        t1 = time.perf_counter()
        pending = router.pending()
        pairs = router.feed(outs)
        t2 = time.perf_counter()
        steps.append(t1 - t0)
        feeds.append(t2 - t1)
        if router.pending() < pending:
            rewards.append((pending - router.pending(), t2 - t1))
        for _, result in pairs:
            if result is not None:
                done += 1
                add()
    total = [a + b for a, b in zip(steps, feeds, strict=True)]
    print(f"steps {len(steps)} done {done}")
    print(f"step  p50 {q(steps, .5):.0f} p90 {q(steps, .9):.0f} p99 {q(steps, .99):.0f} ms")
    print(f"step+feed p50 {q(total, .5):.0f} p90 {q(total, .9):.0f} p99 {q(total, .99):.0f} ms")
    print(f"reward calls {len(rewards)}: pairs/call "
          f"{statistics.mean(n for n, _ in rewards):.2f}, feed ms p50 "
          f"{q([t for _, t in rewards], .5):.0f} max {q([t for _, t in rewards], 1):.0f}")
    print(f"share of steps with a reward call {len(rewards) / len(steps):.2f}")


if __name__ == "__main__":
    main()
