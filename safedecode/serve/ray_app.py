"""Scale-out on Ray Serve: each replica is one process with one engine loop (the same app as
``safedecode serve``); Ray's proxy spreads requests over the replicas.

Local: ``safedecode serve --ray --replicas 2`` starts Ray on 127.0.0.1. A cluster:
``ray start --head`` on one node, ``ray start --address=<head>:6379`` on the others, then
``serve run safedecode.serve.ray_app:app model=default methods=plain,acd replicas=4`` on the head
(``app`` is an application builder; ``serve run`` passes ``key=value`` arguments to it).
"""

from __future__ import annotations

from ray import serve

from .server import ServeSpec, build_app, replica_id


@serve.ingress()
class SafedecodeReplica:
    """One replica: the models of a :class:`ServeSpec` behind the OpenAI-compatible app."""

    def __init__(self, spec: dict) -> None:
        self.spec = ServeSpec(**spec)
        self.asgi = build_app(self.spec)
        self.replica = replica_id()

    def __serve_build_asgi_app__(self):
        return self.asgi


def deployment(spec: ServeSpec, replicas: int, *, cpus_per_replica: float = 1.0):
    """The bound Ray Serve application for ``spec`` with ``replicas`` replicas."""
    if replicas < 1:
        raise ValueError(f"--replicas: must be >= 1, got {replicas}")
    dep = serve.deployment(SafedecodeReplica, name="safedecode", num_replicas=replicas,
                           ray_actor_options={"num_cpus": cpus_per_replica},
                           max_ongoing_requests=max(8, spec.max_seqs + spec.max_queue))
    return dep.bind(spec.to_dict())


def app(args: dict):
    """Application builder for ``serve run safedecode.serve.ray_app:app key=value ...``:
    ``model``, ``methods`` (comma-separated), ``replicas``, ``max_seqs``, ``name``."""
    spec = ServeSpec(model=args.get("model", "default"),
                     methods=[m for m in args.get("methods", "plain").split(",") if m],
                     name=args.get("name"), max_seqs=int(args.get("max_seqs", 8)))
    return deployment(spec, int(args.get("replicas", 1)),
                      cpus_per_replica=float(args.get("cpus_per_replica", 1)))


def run_local(spec: ServeSpec, replicas: int, host: str, port: int, *,
              cpus_per_replica: float = 1.0) -> None:
    """Start a local Ray instance bound to 127.0.0.1 and serve until interrupted."""
    import signal
    import threading

    import ray

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False,
             num_cpus=max(2, int(replicas * cpus_per_replica) + 1))
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(spec, replicas, cpus_per_replica=cpus_per_replica),
              name="safedecode", route_prefix="/")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"safedecode on Ray Serve: http://{host}:{port} ({replicas} replicas)", flush=True)
    done.wait()
    serve.shutdown()
    ray.shutdown()
