"""``safedecode serve``: the OpenAI-compatible server (uvicorn, or Ray Serve with ``--ray``)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from safedecode.cli_errors import fail


def serve_command(
    model: str = typer.Option("default", help="Local model folder / .gguf, or 'default'."),
    method: list[str] = typer.Option(["plain"], "--method", "-m",
                                     help="A method to serve (repeat for several); each is the "
                                          "model id <name>:<method>. Knobs as `safedecode "
                                          "eval` takes them: "
                                          "'deal:reward=harmless:k=4:chunk=8'."),
    alpha: float | None = typer.Option(None, help="Contrast strength (methods that take it)."),
    beta: float | None = typer.Option(None, help="Plausibility threshold (methods that take "
                                                 "it)."),
    acd_prompts: Path | None = typer.Option(None, "--acd-prompts",
                                            help="Soft prompts from `safedecode optimize`."),
    adapter: str | None = typer.Option(None, "--adapter", help="A LoRA adapter folder merged "
                                       "into the model ('ta-sft': the shipped TA-SFT adapter)."),
    base: str | None = typer.Option(None, "--base", help="route / deal: the method routed against "
                                                         "the plain model / searched over."),
    reward: str | None = typer.Option(None, "--reward", help="route / deal: the reward (route's "
                                                             "default: harmless)."),
    horizon: int | None = typer.Option(None, "--horizon", help="route: tokens decoded both ways "
                                                               "before the reward chooses; "
                                                               "deal: tokens searched."),
    margin: float | None = typer.Option(None, "--margin", help="route: keep the base's answer "
                                                               "when h(base) - h(plain) > margin."),
    reward_thread: bool | None = typer.Option(None, "--reward-thread/--reward-inline",
                                       help="route / deal: the reward model scores on a "
                                            "thread of its own while the engine steps "
                                            "(--reward-inline: between two steps, holding "
                                            "every stream up; default: a thread)."),
    name: str | None = typer.Option(None, "--name", help="Base of the model ids (default: "
                                                        "smollm2-135m or the folder name)."),
    host: str = typer.Option("127.0.0.1", help="Bind address (127.0.0.1 unless told)."),
    port: int = typer.Option(8000, help="Port (0: a free one, see --ready-file)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="SAFEDECODE_API_KEY",
                                       help="Require `Authorization: Bearer KEY` on /v1/."),
    max_seqs: int = typer.Option(8, "--max-seqs", help="Sequences decoded at once (n counts)."),
    max_len: int | None = typer.Option(None, "--max-len", help="Tokens per sequence (default: "
                                                              "the context, at most 2048)."),
    max_queue: int = typer.Option(256, "--max-queue", help="Waiting requests before 429."),
    max_prefill_tokens: int | None = typer.Option(
        None, "--max-prefill-tokens", help="Prompt tokens prefilled per step while others decode, "
                                           "long prompts in chunks (0: no limit; default: 32 on "
                                           "a CPU, where a step costs in proportion to its "
                                           "tokens, no limit on a GPU); small: shorter "
                                           "inter-token latency tails, later first tokens under "
                                           "a burst (benchmarks/results/serve_cpu)."),
    prefix_store_mb: int | None = typer.Option(
        None, "--prefix-store-mb", help="Branch-prefix KV kept across requests, per served "
                                        "method (MiB; default: the engine's, 512; the least "
                                        "recently used dropped first: requests with distinct "
                                        "system messages each bring their own prefixes)."),
    turn_store_mb: int | None = typer.Option(
        None, "--turn-store-mb", help="KV of finished requests kept, per served method (MiB; "
                                      "default 512; 0: none): a chat that grows prefills only "
                                      "its new turn, a request that starts like a finished one "
                                      "shares that start."),
    packed: bool = typer.Option(True, "--packed/--no-packed",
                                help="A step that admits requests decodes and prefills in one "
                                     "packed forward (--no-packed: two forwards)."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds per "
                                                                           "request."),
    default_max_tokens: int = typer.Option(256, "--default-max-tokens",
                                           help="max_tokens of chat requests that give none."),
    drain_timeout: float = typer.Option(60.0, "--drain-timeout",
                                        help="On SIGTERM, seconds to let requests finish."),
    backend: str = typer.Option("auto", help="Op backend: auto, reference, cpp, triton, cuda."),
    device: str = typer.Option("cpu", help="Model device: cpu, cuda or `cuda:N` (with "
                               "--ray, each replica gets 1/replicas of a GPU)."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16, float16."),
    ray: bool = typer.Option(False, "--ray", help="Serve on a local Ray Serve instance."),
    replicas: int = typer.Option(1, "--replicas", help="Ray Serve replicas (with --ray)."),
    ready_file: Path | None = typer.Option(None, "--ready-file",
                                           help="Write host:port here once listening."),
    log_level: str = typer.Option("info", "--log-level"),
):
    """Serve methods over HTTP with OpenAI's API (chat, completions, streaming, n, seed)."""
    try:
        from safedecode.serve import ServeSpec
        from safedecode.serve.server import prefill_budget

        for what, value, lo in (("--max-seqs", max_seqs, 1), ("--max-queue", max_queue, 0),
                                ("--default-max-tokens", default_max_tokens, 1),
                                ("--replicas", replicas, 1),
                                ("--max-prefill-tokens", max_prefill_tokens or 0, 0),
                                ("--prefix-store-mb", prefix_store_mb or 0, 0),
                                ("--turn-store-mb", turn_store_mb or 0, 0)):
            if value < lo:
                raise ValueError(f"{what}: must be >= {lo}, got {value}")
        from safedecode.eval.runner import parse_methods

        names = {m.name for entry in method for m in parse_methods(entry)}
        for knobs, takers in (((("--base", base), ("--reward", reward), ("--horizon", horizon),
                                ("--reward-thread/--reward-inline", reward_thread)),
                               ("route", "deal")),
                              ((("--margin", margin),), ("route",))):
            given = [f for f, v in knobs if v is not None]
            if given and not names & set(takers):
                raise ValueError(f"{'/'.join(given)}: only for --method "
                                 f"{' or '.join(takers)}")
        if not 0 <= port <= 65535:
            raise ValueError(f"--port: must be in [0, 65535], got {port}")
        if request_timeout <= 0:
            raise ValueError(f"--request-timeout: must be > 0, got {request_timeout}")
        from safedecode.models import check_device, check_dtype

        check_device(device)
        check_dtype(dtype)
        if acd_prompts is not None and not acd_prompts.is_file():
            raise ValueError(f"--acd-prompts: {acd_prompts} is not a file")
        spec = ServeSpec(model=model, methods=list(method),
                         method_kwargs={"alpha": alpha, "beta": beta,
                                        "prompts": str(acd_prompts) if acd_prompts else None,
                                        "base": base, "reward": reward, "horizon": horizon,
                                        "margin": margin},
                         adapter=adapter,
                         name=name, max_seqs=max_seqs, max_len=max_len, max_queue=max_queue,
                         max_prefill_tokens=prefill_budget(max_prefill_tokens, device),
                         packed=packed,
                         **({} if prefix_store_mb is None else
                            {"prefix_store_mb": prefix_store_mb}),
                         **({} if turn_store_mb is None else {"turn_store_mb": turn_store_mb}),
                         reward_thread=reward_thread is not False,
                         backend=backend, device=device, dtype=dtype,
                         api_key=api_key or os.environ.get(
                             "SAFEDECODE_API_KEY"), request_timeout=request_timeout,
                         default_max_tokens=default_max_tokens)
        if ray:
            from safedecode.serve.ray_local import run_local

            run_local(spec, replicas, host, port)
            return
        if replicas != 1:
            raise ValueError("--replicas: needs --ray")
        from safedecode.serve.server import run_uvicorn

        run_uvicorn(spec, host, port, log_level=log_level, drain_timeout=drain_timeout,
                    ready_file=ready_file)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        fail(str(exc))
