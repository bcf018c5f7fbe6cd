"""A single-node Ray instance that listens on 127.0.0.1 only, and serving on it.

``ray.init(_node_ip_address="127.0.0.1")`` alone still resolves the loopback address to the
machine's network address (agents listen there, gRPC servers on every interface). Ray's
single-node switch ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (named for the platforms where it is
the default) keeps the node IP at 127.0.0.1, and then every Ray server binds to it. It must be
set before ``ray`` is imported, so this module imports ray only inside its functions.
"""

from __future__ import annotations

import os

LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def start_local_ray(num_cpus: int) -> None:
    """Start Ray on this machine, on 127.0.0.1 only (no dashboard, no usage stats)."""
    import sys

    if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise RuntimeError("ray was imported before start_local_ray(): set "
                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 first, or it may listen on "
                           "the machine's network address")
    os.environ.update(LOCAL_ENV)
    import ray

    ray.init(_node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=False,
             log_to_driver=False, configure_logging=False)


def run_local(spec, replicas: int, host: str, port: int, *,
              cpus_per_replica: float = 1.0) -> None:
    """Serve ``spec`` with ``replicas`` Ray Serve replicas on a local Ray until SIGTERM/SIGINT."""
    import signal
    import threading

    start_local_ray(max(2, int(replicas * cpus_per_replica) + 1))
    import ray
    from ray import serve

    from .ray_app import deployment

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


def bind_replica_grpc_to_loopback() -> None:
    """Ray Serve (2.60) binds each replica's inter-deployment gRPC server to ``[::]:0`` whatever
    the node IP; on a loopback-only node, bind it to 127.0.0.1 instead. Called in the replica
    before Ray starts that server (after the deployment's constructor)."""
    try:
        from ray.serve._private import replica
    except ImportError:  # pragma: no cover - another Ray layout: nothing to patch
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_loopback", False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port._loopback = True
    replica.add_port_to_grpc_server = add_port
