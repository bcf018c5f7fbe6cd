"""Safety evaluation: what a method buys in refusals and what it costs in over-refusal,
fluency and speed, on your model and data.

Command line::

    safedecode eval --methods plain,safe-prompt,acd-text,self-cd --datasets harmbench,benign \\
        --limit 20 --model path/to/hf-model --out runs/eval1
    # re-run the same command to resume; add a user file: --datasets my.csv@benign
    # a classifier judge: --judges keyword,classifier --classifier path/to/llama-guard

Python::

    from safedecode.eval import evaluate
    from safedecode.models import load_model

    model, tok = load_model("default")
    res = evaluate(model, tok, methods=["plain", "self-cd:alpha=2.5"],
                   datasets=["harmbench", "benign"], limit=10, out_dir="runs/eval1")
    res["results"]["harmbench@plain"]["refusal_rate,keyword"]

Modules: :mod:`.datasets` (registry and file loaders), :mod:`safedecode.judges` (keyword and
classifier judges, shared with training), :mod:`.metrics` (Wilson intervals, speed),
:mod:`.store` (resumable JSONL), :mod:`.runner` (generation, perplexity, judging,
:func:`evaluate`), :mod:`.report` (results.json, results.md, refusal.png, examples.md),
:mod:`.cli` (``safedecode eval``).
"""

from __future__ import annotations

__all__ = ["evaluate"]


def __getattr__(name: str):
    if name == "evaluate":  # lazy: importing the package must not import torch
        from .runner import evaluate

        return evaluate
    raise AttributeError(f"module 'safedecode.eval' has no attribute {name!r}")
