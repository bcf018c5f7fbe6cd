"""``safedecode eval``: run methods over data sets, judge, and write the reports."""

from __future__ import annotations

import copy
import shlex
import sys
import time
from pathlib import Path

import typer

from safedecode.cli_errors import fail as _fail


def _judges(names: str, keyword_lists: str, phrases_file: Path | None, classifier: Path | None,
            metric: str, positive: str | None, inputs: str, template: str | None, device: str):
    from safedecode.judges import make_judge

    wanted = [x.strip() for x in names.split(",") if x.strip()]
    if classifier is not None and "classifier" not in wanted:
        wanted.append("classifier")
    if not wanted:
        raise ValueError("--judges: give at least one judge")
    extra: list[str] = []
    if phrases_file is not None:
        try:
            text = phrases_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--refusal-phrases: cannot read {phrases_file}: {exc}") from exc
        extra = [x.strip() for x in text.splitlines() if x.strip()]
    out = []
    for name in dict.fromkeys(wanted):
        if name == "keyword":
            lists = [x.strip() for x in keyword_lists.split(",") if x.strip()]
            out.append(make_judge("keyword", lists=lists, extra=extra))
        elif name == "keyword-standard":
            out.append(make_judge(name))
        elif name == "classifier":
            out.append(make_judge("classifier", path=classifier, metric=metric,
                                  positive=positive, inputs=inputs, template=template,
                                  device=device))
        else:
            make_judge(name)  # raises the ValueError naming the choices
    return out


def _load(model: str, adapter: str | None, **kw):
    """``(model, tokenizer, base)``: ``base`` is the model before ``adapter`` was merged into a
    copy of it (the perplexity reference), None without an adapter."""
    from safedecode.models import load_model, model_name, shipped_adapter

    mdl, tok = load_model(model, **kw)
    if adapter is None:
        return mdl, tok, None
    from safedecode.engine.adapters import load_lora

    lora = load_lora(shipped_adapter(adapter))
    tuned = lora.merge_into(copy.deepcopy(mdl))
    tuned.safedecode_name = f"{model_name(mdl)}+{lora.name}"
    return tuned, tok, mdl


def eval_command(
    methods: str | None = typer.Option(
        None, "--methods", "-m",
        help="Comma-separated methods (default: every registered one that builds with its "
             "defaults); name:key=value sets an argument, e.g. acd-text:alpha=1.0:beta=0.1."),
    datasets: str = typer.Option(
        "harmbench,benign", "--datasets", "-d",
        help="Comma-separated: harmbench, benign, anchor-harmful, anchor-safe, or a "
             ".jsonl/.csv/.txt file (FILE@harmful or FILE@benign labels it)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (re-run to resume)."),
    model: str = typer.Option("default", help="Local model folder / .gguf, or 'default'."),
    adapter: str | None = typer.Option(None, "--adapter", help="A LoRA adapter folder merged "
                                       "into the model, or 'ta-sft' (shipped); perplexity stays "
                                       "under the plain model."),
    limit: int | None = typer.Option(None, "--limit",
                                     help="N items of each data set, spread evenly."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, help="Seed of every request's sampling stream."),
    batch_size: int = typer.Option(16, "--batch-size", help="Requests decoded at once "
                                   "(continuous batching: the next joins as one ends)."),
    alpha: float | None = typer.Option(None, help="Contrast strength for methods that take it."),
    beta: float | None = typer.Option(None, help="Plausibility threshold for methods that "
                                                 "take it."),
    judges: str = typer.Option(
        "keyword,keyword-standard", "--judges",
        help="keyword (the lists of --keyword-lists), keyword-standard (AdvBench + XSTest "
             "only) and/or classifier."),
    keyword_lists: str = typer.Option("advbench,xstest,safedecode", "--keyword-lists",
                                      help="Phrase lists of the keyword judge."),
    refusal_phrases: Path | None = typer.Option(
        None, "--refusal-phrases", help="Extra refusal phrases, one per line (substrings)."),
    classifier: Path | None = typer.Option(
        None, "--classifier", help="Local HF classifier or causal-LM judge (Llama Guard)."),
    classifier_metric: str = typer.Option("refusal", "--classifier-metric",
                                          help="What its positive class means: refusal or "
                                               "harmful."),
    classifier_positive: str | None = typer.Option(
        None, "--classifier-positive", help="Positive label (or reply word, e.g. unsafe)."),
    classifier_inputs: str = typer.Option("response", "--classifier-inputs",
                                          help="response or pair (prompt + response)."),
    classifier_template: str | None = typer.Option(
        None, "--classifier-template", help="Judge prompt with {prompt} and {response}."),
    prompt_column: str = typer.Option("prompt", "--prompt-column",
                                      help="Prompt column of user .jsonl/.csv files."),
    no_ppl: bool = typer.Option(False, "--no-ppl", help="Skip the perplexity of responses."),
    examples: int = typer.Option(3, "--examples", help="Example generations per label."),
    backend: str = typer.Option("auto", help="Op backend: auto, reference, cpp, triton, cuda."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16, float16."),
    device: str = typer.Option("cpu", help="Model device, e.g. cpu or cuda."),
):
    """Measure refusals (harmful sets), over-refusals (benign sets), fluency and speed."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from safedecode import methods as methods_mod

    from .datasets import load_dataset
    from .runner import evaluate, parse_methods

    console = Console(stderr=True)
    t0 = time.perf_counter()
    try:
        if limit is not None and limit < 1:
            raise ValueError(f"--limit: must be >= 1, got {limit}")
        if batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
        specs = parse_methods(methods or ",".join(n for n in methods_mod.REGISTRY
                                                  if n not in ("deal", "route")),  # searches
                              {"alpha": alpha, "beta": beta})
        usable = []
        for s in specs:  # bad method arguments fail before the model loads
            try:
                s.build()
                usable.append(s)
            except (ValueError, OSError) as exc:
                if methods is not None:
                    raise
                console.print(f"[yellow]skipping method {s.label}: {exc}[/yellow]")
        specs = usable
        if not specs:
            raise ValueError("--methods: no registered method could be built")
        sets = [load_dataset(d.strip(), limit=limit, prompt_column=prompt_column)
                for d in datasets.split(",") if d.strip()]
        if not sets:
            raise ValueError("--datasets: give at least one data set")
        judge_objs = _judges(judges, keyword_lists, refusal_phrases, classifier,
                             classifier_metric, classifier_positive, classifier_inputs,
                             classifier_template, device)
        with console.status(f"loading {model} ..."):
            mdl, tok, base = _load(model, adapter, dtype=dtype, device=device)
        columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console) as bar:
            evaluate(mdl, tok, methods=specs, datasets=sets, out_dir=out, judges=judge_objs,
                     limit=limit, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size,
                     backend=backend, ppl=not no_ppl, n_examples=examples, progress=bar,
                     command=" ".join(["safedecode", *map(shlex.quote, sys.argv[1:])]),
                     ppl_model=base)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.secho(f"interrupted: finished generations are kept in {out}/generations.jsonl; "
                    "run the same command again to resume", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    md = (out / "results.md").read_text(encoding="utf-8")
    summary = md.split("## Per method", 1)[1].split("## Per data set", 1)[0].strip()
    typer.echo(summary)
    typer.echo(f"\nreports in {out}: results.json, results.md, refusal.png, examples.md "
               f"({time.perf_counter() - t0:.1f} s)")


def tune_command(
    methods: str = typer.Option(
        ..., "--methods", "-m",
        help="Grid of settings: name:key=v1|v2[:key=...], comma-separated, e.g. "
             "'acd:alpha=0.3|0.5|1:beta=0|0.1,self-cd-sp:alpha=0.3|0.6'. plain is added as the "
             "perplexity reference."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (re-run to resume)."),
    datasets: str = typer.Option(
        "anchor-harmful-val,anchor-safe-val", "--datasets", "-d",
        help="Tuning data: the anchor validation split (default) or your own files; evaluation "
             "sets (harmbench, benign, benign-lookalike, benign-ordinary) are refused."),
    record: Path | None = typer.Option(
        None, "--record", help="Write the chosen knobs into this file: an ACD prompts file "
                               "(acd, self-cd-sp) or a SafeInfer vector (safeinfer*)."),
    model: str = typer.Option("default", help="Local model folder / .gguf, or 'default'."),
    adapter: str | None = typer.Option(None, "--adapter", help="A LoRA adapter folder merged "
                                       "into the model, or 'ta-sft' (shipped): the grid (and "
                                       "plain, the reference) decode the adapted model; "
                                       "perplexity stays under the plain model."),
    limit: int | None = typer.Option(None, "--limit", help="N items of each data set."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, help="Seed of every request's sampling stream."),
    batch_size: int = typer.Option(16, "--batch-size", help="Requests decoded at once "
                                   "(continuous batching: the next joins as one ends)."),
    count_non_answers: bool = typer.Option(
        False, "--count-non-answers",
        help="Score a benign request answered by a stub (< 16 tokens), garbled text or a loop "
             "as if refused (default: only refusals count; the table shows both)."),
):
    """Choose knobs on the anchor validation split (never on an evaluation set)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .datasets import load_dataset
    from .tune import check_tuning_datasets, render, tune

    console = Console(stderr=True)
    names = [d.strip() for d in datasets.split(",") if d.strip()]
    command = " ".join(["safedecode", *map(shlex.quote, sys.argv[1:])])
    try:
        if limit is not None and limit < 1:
            raise ValueError(f"--limit: must be >= 1, got {limit}")
        check_tuning_datasets([load_dataset(d) for d in names])  # before the model loads
        with console.status(f"loading {model} ..."):
            mdl, tok, base = _load(model, adapter)
        with Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(),
                      console=console) as bar:
            sel = tune(mdl, tok, methods, out, datasets=names, limit=limit, record=record,
                       command=command, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, seed=seed, batch_size=batch_size, progress=bar,
                       ppl_model=base, count_non_answers=count_non_answers)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    typer.echo(render(sel, command, names))
    for name, row in sel["chosen"].items():
        typer.echo(f"chosen for {name}: {row['label']}")
    if record is not None:
        typer.echo(f"recorded in {record}")
