"""``safedecode bench ops|generate|all|report``: the typer command (heavy imports deferred)."""

from __future__ import annotations

import shlex
import sys
import time
from enum import Enum
from pathlib import Path

import typer

from safedecode.cli_errors import fail as _fail

DEFAULT_OUT = Path("benchmarks/results")
QUICK_OUT = DEFAULT_OUT / "quick"  # a quick run never overwrites the published results


class Suite(str, Enum):
    ops = "ops"
    generate = "generate"
    all = "all"
    report = "report"



def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _command(what: Suite, quick: bool, repeats: int | None, out: Path | None, device: str,
             batch: list[int] | None, dtype: str, threads: int | None,
             model: str | None = None, new_tokens: int | None = None) -> str:
    """The command line that reproduces this run."""
    parts = ["safedecode", "bench", what.value, "--device", device]
    parts += ["--quick"] if quick else []
    parts += ["--repeats", str(repeats)] if repeats is not None else []
    for b in batch or []:
        parts += ["--batch", str(b)]
    parts += ["--dtype", dtype] if dtype != "float32" else []
    parts += ["--threads", str(threads)] if threads is not None else []
    parts += ["--model", model] if model is not None else []
    parts += ["--new-tokens", str(new_tokens)] if new_tokens is not None else []
    parts += ["--out", str(out)] if out is not None else []
    return shlex.join(parts)


def bench_command(
    what: Suite = typer.Argument(Suite.all, help="ops, generate, all, or report (rewrite the "
                                 "markdown, plots and README section from the JSON results)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny grid and few tokens: a smoke run of "
                               "about a minute (results marked quick)."),
    repeats: int | None = typer.Option(None, "--repeats", help="Timed runs per generation case "
                                       "and minimum runs per op case (default 3 / 5; quick "
                                       "1 / 3)."),
    out: Path | None = typer.Option(None, "--out", help="Results folder (default "
                                    f"{DEFAULT_OUT}; with --quick {QUICK_OUT})."),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda (Triton and CUDA backends, "
                               "FlashInfer baseline when installed)."),
    batch: list[int] | None = typer.Option(None, "--batch", help="Batch sizes (repeat the option;"
                                           " default ops 1 8 64, generate 1 8)."),
    dtype: str = typer.Option("float32", "--dtype", help="Logits and model dtype: float32, "
                              "bfloat16 or float16."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch and the "
                                       "C++ op (default: torch's default)."),
    model: str | None = typer.Option(None, "--model", help="generate: a local model folder or "
                                     ".gguf file (default: the embedded SmolLM2-135M-Instruct)."),
    new_tokens: int | None = typer.Option(None, "--new-tokens", help="generate: new tokens per "
                                          "request (default 128; quick 8)."),
    readme: Path = typer.Option(Path("README.md"), "--readme", help="report: the README whose "
                                "`<!-- perf:start/end -->` section is rewritten."),
) -> None:
    """Benchmark the fused ops and generation against transformers and the naive pipelines."""
    from safedecode.bench import report
    from safedecode.bench.machine import BenchError

    out_dir = out if out is not None else (QUICK_OUT if quick else DEFAULT_OUT)
    try:
        if what is Suite.report:
            for res in report.find_results(out_dir).values():
                for r in res.values():
                    report.render(r, out_dir / f"{r['benchmark']}_{r['device']}")
            section = report.update_readme(readme, out_dir)
            _log(f"rewrote the performance section of {readme} from {out_dir}")
            typer.echo(section)
            return
        from safedecode.bench.machine import require_device

        require_device(device)
        if threads is not None and threads < 1:
            raise BenchError(f"--threads: must be >= 1, got {threads}")
        command = _command(what, quick, repeats, out, device, batch, dtype, threads, model,
                           new_tokens)
        results = _run_all(what, device, quick, batch, repeats, dtype, threads, model,
                           new_tokens)
        written = []
        for suite, res in results.items():
            results[suite] = report.stamp(res, device=device, quick=quick, command=command,
                                          argv=list(sys.argv))
            written += report.write_result(results[suite], out_dir)
    except (BenchError, ValueError, RuntimeError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo("wrote " + ", ".join(str(p) for p in written))
    for t in report.targets(results.get("ops"), results.get("generate")):
        typer.echo(f"- {t['text']}")


def _run_all(what: Suite, device: str, quick: bool, batch: list[int] | None,
             repeats: int | None, dtype: str, threads: int | None, model: str | None = None,
             new_tokens: int | None = None) -> dict[str, dict]:
    """Run the selected suites (with ``threads`` torch threads, restored afterwards)."""
    import torch

    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    results = {}
    try:
        for suite in ("ops", "generate"):
            if what.value in (suite, "all"):
                t0 = time.perf_counter()
                results[suite] = _run_suite(suite, device, quick, batch, repeats, dtype, model,
                                            new_tokens)
                results[suite]["wall_s"] = time.perf_counter() - t0
                # the machine block is written after the run: record the threads it used
                results[suite]["threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)
    return results


def _run_suite(suite: str, device: str, quick: bool, batch: list[int] | None,
               repeats: int | None, dtype: str, model: str | None = None,
               new_tokens: int | None = None) -> dict:
    if suite == "ops":
        from safedecode.bench.ops import OpsConfig, run_ops

        cfg = OpsConfig.make(device, quick=quick, batch=batch, repeats=repeats, dtype=dtype)
        return run_ops(cfg, log=_log)
    from safedecode.bench.generate import GenConfig, run_generate

    cfg = GenConfig.make(device, quick=quick, batch=batch, repeats=repeats, dtype=dtype,
                         model=model, new_tokens=new_tokens)
    return run_generate(cfg, log=_log)
