"""Scale-out on Ray Serve: a local Ray instance on 127.0.0.1 with 2 replicas answers requests
exactly as offline generate does, and Ray spreads them over both replicas."""

from __future__ import annotations

import asyncio
import os
import socket

import httpx
import pytest
from engine_fixtures import tiny_llama

from safedecode import methods
from safedecode.engine import SafeDecoder
from safedecode.serve.ray_local import LOCAL_ENV, start_local_ray

os.environ.update(LOCAL_ENV)  # before ray is imported: Ray listens on 127.0.0.1 only
ray = pytest.importorskip("ray", reason="the ray extra is part of `make setup` (dev)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_local():
    start_local_ray(num_cpus=3)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def test_two_replicas_answer_correctly_and_spread(ray_local, tiny_model_dir):
    from ray import serve

    from safedecode.serve.ray_app import deployment
    from safedecode.serve.server import ServeSpec

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    spec = ServeSpec(model=str(tiny_model_dir), methods=["acd-text"], name="tiny", max_seqs=4)
    serve.run(deployment(spec, 2, cpus_per_replica=1), name="safedecode", route_prefix="/")
    prompts = [f"Question {i}: why?" for i in range(16)]

    async def ask():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as h:
            return await asyncio.wait_for(asyncio.gather(*(h.post(
                "/v1/chat/completions", json={
                    "model": "tiny:acd-text", "messages": [{"role": "user", "content": p}],
                    "max_tokens": 8, "temperature": 0.8, "seed": i})
                for i, p in enumerate(prompts))), 180)

    replies = asyncio.run(ask())
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    model, tok = tiny_llama()
    refs = SafeDecoder(model, tok, methods.get("acd-text")).generate(
        prompts, max_new_tokens=8, temperature=0.8, seed=list(range(16)))
    assert [r.json()["choices"][0]["message"]["content"] for r in replies] == \
        [x.text for x in refs]
    replicas = {r.headers["x-safedecode-replica"] for r in replies}
    for _ in range(3):  # the router may keep a burst on one replica (it was seen once, loaded)
        if len(replicas) == 2:
            break
        replicas |= {r.headers["x-safedecode-replica"] for r in asyncio.run(ask())}
    assert len(replicas) == 2, replicas
    bad = _listening_beyond_loopback()
    assert bad == [], "\n".join(bad)


def _listening_beyond_loopback() -> list[str]:
    """TCP sockets of this process tree's Ray that listen on anything but 127.0.0.1."""
    import subprocess

    out = subprocess.run(["ss", "-ltnp"], check=False, capture_output=True, text=True).stdout
    bad = []
    for ln in out.splitlines():
        cols = ln.split()
        if len(cols) > 3 and any(x in ln for x in ("ray", "gcs_server")):
            if not cols[3].replace("[::ffff:", "").startswith("127.0.0.1"):
                bad.append(ln)
    return bad
