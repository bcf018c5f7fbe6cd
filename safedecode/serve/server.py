"""Building the served models from a spec, and running the app (uvicorn, or Ray Serve replicas).

A :class:`ServeSpec` is plain data (it travels to Ray replicas): the model, the methods, engine
sizes. :func:`build_app` loads the model once and makes one engine per method; every
``model x method`` pair is a model id ``<name>:<method>``.
"""

from __future__ import annotations

import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safedecode.engine.cache import PREFIX_STORE_BYTES, TURN_STORE_BYTES

from .app import ServedModel, ServerConfig, create_app

DEFAULT_NAME = "smollm2-135m"


@dataclass
class ServeSpec:
    model: str = "default"
    methods: list[str] = field(default_factory=lambda: ["plain"])
    method_kwargs: dict = field(default_factory=dict)  # alpha / beta / prompts / route's knobs
    adapter: str | None = None  # a LoRA adapter merged into the model (e.g. "ta-sft")
    name: str | None = None  # the base of the model ids (default: from the model path)
    max_seqs: int = 8
    max_len: int | None = None
    max_queue: int = 256
    max_prefill_tokens: int | None = None
    packed: bool = True  # decode + prefill in one forward (Engine(packed=))
    prefix_store_mb: int = PREFIX_STORE_BYTES // 2**20  # per served method: prefix KV kept
    turn_store_mb: int = TURN_STORE_BYTES // 2**20  # ... and finished requests' KV
    reward_thread: bool = True  # route / deal: the reward model scores beside the engine loop
    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    api_key: str | None = None
    request_timeout: float = 600.0
    default_max_tokens: int = 256

    def base_name(self) -> str:
        if self.name:
            return self.name
        if self.model in ("default", ""):
            return DEFAULT_NAME
        p = Path(self.model)
        return (p.stem if p.suffix == ".gguf" else p.name).lower()

    def to_dict(self) -> dict:
        return asdict(self)


CPU_PREFILL_BUDGET = 32  # benchmarks/results/serve_budget_s33: the p99 inter-token latency tail


def prefill_budget(given: int | None, device: str) -> int | None:
    """``max_prefill_tokens`` for a server on ``device`` asked for ``given`` (None: the
    device's default — :data:`CPU_PREFILL_BUDGET` on a CPU, where a step costs in proportion
    to its tokens, no limit on a GPU; 0: no limit)."""
    if given is None:
        return CPU_PREFILL_BUDGET if device == "cpu" else None
    return given or None


def _method_kwargs(name: str, kwargs: dict) -> dict:
    """The subset of ``kwargs`` that method ``name`` takes."""
    import inspect

    from safedecode import methods

    if name not in methods.REGISTRY:
        raise ValueError(f"--method: unknown {name!r}; choose from {sorted(methods.REGISTRY)}")
    accepted = inspect.signature(methods.REGISTRY[name]).parameters
    passes_on = any(p.kind is p.VAR_KEYWORD for p in accepted.values())  # to a search's base
    return {k: v for k, v in kwargs.items() if (passes_on or k in accepted) and v is not None}


def parse_served(entries: list[str], shared: dict) -> list[tuple[str, dict]]:
    """``--method`` entries (``name`` or ``name:key=value[:key=value]``, as ``safedecode eval``
    takes them: ``deal:reward=harmless:k=4``) as ``(name, kwargs)``: ``shared`` (the CLI's
    knobs) where the method takes them, the entry's own on top."""
    from safedecode.eval.runner import parse_methods

    if not entries:
        raise ValueError("--method: give at least one method")
    parsed = [m for e in entries for m in parse_methods(e)]
    names = [m.name for m in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"--method: a method is given twice in {entries} (each is served as "
                         "<name>:<method>)")
    return [(m.name, {**_method_kwargs(m.name, shared), **m.kwargs}) for m in parsed]


def build_models(spec: ServeSpec) -> list[ServedModel]:
    """Load the model once; one engine per method (they share the weights)."""
    from safedecode import methods
    from safedecode.engine import SafeDecoder
    from safedecode.models import load_model, model_name

    built = [(name, methods.get(name, **kwargs))
             for name, kwargs in parse_served(spec.methods, spec.method_kwargs)]
    for name, meth in built:
        if isinstance(meth, methods.DeAL) and meth.sequences_per_request > spec.max_seqs:
            raise ValueError(f"--max-seqs: a {name} answer holds up to "
                             f"{meth.sequences_per_request} sequences ({meth.describe()}); "
                             f"--max-seqs is {spec.max_seqs}")
    model, tok = load_model(spec.model, dtype=spec.dtype, device=spec.device,
                            adapter=spec.adapter)
    base = spec.base_name()
    served, scorer = [], None
    for name, spec_method in built:
        deal = isinstance(spec_method, methods.DeAL)
        eng = SafeDecoder(model, tok, spec_method, backend=spec.backend,
                          prefix_store_bytes=spec.prefix_store_mb * 2**20,
                          turn_store_bytes=spec.turn_store_mb * 2**20).engine(
            max_seqs=spec.max_seqs, max_len=spec.max_len, max_queue=spec.max_queue,
            max_prefill_tokens=spec.max_prefill_tokens, packed=spec.packed,
            drop_rows=False if deal else None)  # DeAL's proposals read every branch's logits
        meth = eng.method
        router = None
        if deal or isinstance(spec_method, methods.Route):
            from concurrent.futures import ThreadPoolExecutor

            from safedecode.methods.deal import Searcher
            from safedecode.methods.route import Router

            if spec.reward_thread and scorer is None:  # one thread: reward calls never overlap
                scorer = ThreadPoolExecutor(1, thread_name_prefix="safedecode-reward")
            router = (Searcher if deal else Router)(
                eng, spec_method, scorer=scorer if spec.reward_thread else None)
        info = {"base_model": model_name(model), "method": meth.name, "k": meth.k,
                "rule": meth.rule, "weights": list(meth.weights), "anchor": meth.anchor,
                "beta": meth.beta, "branches": [b.name or (b.system and "system prompt")
                                                or ("soft prompt" if b.soft_prompt is not None
                                                    else "plain") for b in meth.branches],
                "max_seqs": spec.max_seqs, "max_len": eng.max_len,
                "max_prefill_tokens": spec.max_prefill_tokens,
                "packed": eng.runner.can_pack,
                "backend": eng.runner.backend, "device": spec.device, "dtype": spec.dtype,
                "adapter": spec.adapter}
        if router is not None:
            info["deal" if deal else "route"] = spec_method.describe()
            info["reward_thread"] = spec.reward_thread
        served.append(ServedModel(f"{base}:{name}", eng, info, router))
    return served


def build_app(spec: ServeSpec):
    """The FastAPI app for ``spec`` (models loaded now)."""
    cfg = ServerConfig(api_key=spec.api_key, request_timeout=spec.request_timeout,
                       default_max_tokens=spec.default_max_tokens)
    return create_app(build_models(spec), cfg)


def run_uvicorn(spec: ServeSpec, host: str, port: int, *, log_level: str = "info",
                drain_timeout: float = 60.0, ready_file: Path | None = None) -> None:
    """Serve until SIGTERM / SIGINT; in-flight requests finish first (up to
    ``drain_timeout`` s), then the engine loop stops."""
    import uvicorn

    app = build_app(spec)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout)
    server = uvicorn.Server(config)
    if ready_file is not None:
        _announce_port(server, ready_file)
    # uvicorn re-raises the SIGTERM / SIGINT it drained on with the handler that was there
    # before it: a no-op one makes a drained shutdown exit 0 rather than die by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()


def _announce_port(server, ready_file: Path) -> None:
    """Write ``host:port`` to ``ready_file`` once uvicorn listens (port 0 picks a free one)."""
    startup = server.startup

    async def startup_and_announce(sockets=None):
        await startup(sockets=sockets)
        for srv in server.servers:
            for sock in srv.sockets:
                host, port = sock.getsockname()[:2]
                tmp = ready_file.with_suffix(".tmp")
                tmp.write_text(f"{host}:{port}\n")
                tmp.replace(ready_file)
                return

    server.startup = startup_and_announce
