"""Scale-out on Ray Serve: each replica is one process with one engine loop (the same app as
``safedecode serve``); Ray's proxy spreads requests over the replicas.

Local: ``safedecode serve --ray --replicas 2`` starts Ray on 127.0.0.1 (:mod:`.ray_local`). A
cluster:
``ray start --head`` on one node, ``ray start --address=<head>:6379`` on the others, then
``serve run safedecode.serve.ray_app:app model=default methods=plain,acd replicas=4`` on the head
(``app`` is an application builder; ``serve run`` passes ``key=value`` arguments to it).
"""

from __future__ import annotations

import os

from ray import serve

from safedecode.eval.runner import split_spec

from .app import replica_id
from .server import ServeSpec, build_app, prefill_budget


@serve.ingress()
class SafedecodeReplica:
    """One replica: the models of a :class:`ServeSpec` behind the OpenAI-compatible app."""

    def __init__(self, spec: dict) -> None:
        if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":  # a loopback-only node
            from .ray_local import bind_replica_grpc_to_loopback

            bind_replica_grpc_to_loopback()
        self.spec = ServeSpec(**spec)
        self.asgi = build_app(self.spec)
        self.replica = replica_id()

    def __serve_build_asgi_app__(self):
        return self.asgi


def deployment(spec: ServeSpec, replicas: int, *, cpus_per_replica: float = 1.0):
    """The bound Ray Serve application for ``spec`` with ``replicas`` replicas."""
    if replicas < 1:
        raise ValueError(f"--replicas: must be >= 1, got {replicas}")
    actor = {"num_cpus": cpus_per_replica}
    if spec.device.startswith("cuda"):  # replicas share the GPU(s) Ray sees
        actor["num_gpus"] = 1.0 / replicas
    dep = serve.deployment(SafedecodeReplica, name="safedecode", num_replicas=replicas,
                           ray_actor_options=actor,
                           max_ongoing_requests=max(8, spec.max_seqs + spec.max_queue))
    return dep.bind(spec.to_dict())


def app(args: dict):
    """Application builder for ``serve run safedecode.serve.ray_app:app key=value ...``:
    ``model``, ``methods`` (comma-separated), ``replicas``, ``max_seqs``, ``name``,
    ``max_prefill_tokens`` (default: as ``safedecode serve``, 32 on a CPU)."""
    budget = args.get("max_prefill_tokens")
    spec = ServeSpec(model=args.get("model", "default"),
                     methods=[m for m in split_spec(args.get("methods", "plain"), ",") if m],
                     name=args.get("name"), max_seqs=int(args.get("max_seqs", 8)),
                     max_prefill_tokens=prefill_budget(None if budget is None else int(budget),
                                                       "cpu"))
    return deployment(spec, int(args.get("replicas", 1)),
                      cpus_per_replica=float(args.get("cpus_per_replica", 1)))
