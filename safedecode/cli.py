"""The `safedecode` command line (typer + rich)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from safedecode.cli_errors import fail as _fail

app = typer.Typer(help="safedecode: decoding-time safety alignment that costs no throughput.",
                  no_args_is_help=True, add_completion=False, rich_markup_mode="markdown")



def _number_or_word(text: str | None) -> float | str | None:
    """``--gate`` / ``--window``: a number or a word such as ``off``."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _read_prompts(prompt: str | None, file: Path | None) -> list[str]:
    if (prompt is None) == (file is None):
        _fail("give exactly one of PROMPT or --file")
    if prompt is not None:
        return [prompt]
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"--file: cannot read {file}: {exc}")
    prompts = []
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        if file.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                _fail(f"--file: line {n}: invalid JSON ({exc})")
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                _fail(f"--file: line {n}: expected an object with a 'prompt' string")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        _fail(f"--file: {file} has no prompts")
    return prompts


def _token_logprobs(tok, r) -> list[dict]:
    """Each generated token with its log-prob and its step's best tokens (``--logprobs``)."""
    tops = r.top_logprobs or [[]] * len(r.token_ids)
    return [{"token": tok.decode([t]), "id": t, "logprob": lp,
             "top": [{"token": tok.decode([u]), "id": u, "logprob": ulp} for u, ulp in best]}
            for t, lp, best in zip(r.token_ids, r.logprobs or [], tops, strict=False)]


def _search_progress(bar, task, name: str):
    """A search's ``on_step`` callback that shows its step (the bar itself advances as
    requests finish)."""
    steps = [0]

    def on_step(done: int, total: int) -> None:
        steps[0] += 1
        bar.update(task, description=f"{name}: search step {steps[0]}")
    return on_step


def _one_method(entry: str) -> tuple[str, dict]:
    """``--method`` as a name and its own knobs (``name:key=value[:key=value]``, as ``eval``
    takes one method)."""
    from safedecode.eval.runner import parse_methods

    try:
        parsed = parse_methods(entry)
    except ValueError as exc:  # eval's option is --methods
        raise ValueError(str(exc).replace("--methods:", "--method:", 1)) from None
    if len(parsed) != 1:
        raise ValueError(f"--method: one method, got {len(parsed)} in {entry!r}")
    choices = [k for k, v in parsed[0].kwargs.items()  # a reward's keyword lists hold '|'
               if k != "reward" and isinstance(v, str) and "|" in v]
    if choices:
        raise ValueError(f"--method: {choices[0]}= lists choices ('|'), which `safedecode "
                         "tune` compares; give one value")
    return parsed[0].name, dict(parsed[0].kwargs)


@app.command()
def generate(
    prompt: str | None = typer.Argument(None, help="The user message."),
    file: Path | None = typer.Option(None, "--file", "-f",
                                     help="A .txt (one prompt per line) or .jsonl ('prompt')."),
    method: str = typer.Option("plain", "--method", "-m",
                               help="plain, safe-prompt, acd, acd-text, acd-sp, self-cd, "
                                    "self-cd-sp, safeinfer, safeinfer-sa, safeinfer-sgds, "
                                    "deal, route; knobs as `eval` takes them "
                                    "('deal:base=acd:k=4') override the flags"),
    alpha: float | None = typer.Option(None, help="The method's contrast strength."),
    beta: float | None = typer.Option(None, help="Plausibility threshold in [0, 1]."),
    model: str = typer.Option("default", help="Local model folder / .gguf, or 'default'."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    frequency_penalty: float = typer.Option(
        0.0, "--frequency-penalty", help="Lower a token's logit by this per time it was "
        "generated, on every branch (OpenAI's, in [-2, 2])."),
    presence_penalty: float = typer.Option(
        0.0, "--presence-penalty", help="Lower a token's logit by this once it was generated."),
    repetition_penalty: float = typer.Option(
        1.0, "--repetition-penalty", help="transformers' repetition penalty (> 0, 1 = off) "
        "over each branch's prompt and the answer."),
    min_tokens: int = typer.Option(
        0, "--min-tokens", help="No end-of-sequence token (nor stop string) before this many "
        "new tokens."),
    bad_word: list[str] | None = typer.Option(
        None, "--bad-word", help="A word the answer may not contain (repeatable; banned "
        "token by token, as vLLM's bad_words)."),
    no_repeat_ngram_size: int = typer.Option(
        0, "--no-repeat-ngram-size", help="Never repeat an n-gram of the prompt and the answer "
        "(transformers'; 0 = off)."),
    seed: int | None = typer.Option(None, help="Seed of the sampling stream."),
    batch_size: int = typer.Option(8, "--batch-size", help="Requests decoded at once (the "
                                   "next joins as one ends)."),
    system: str | None = typer.Option(None, "--system", help="A system message for every "
                                      "prompt (a deployment's system prompt: it follows each "
                                      "branch's own prompt)."),
    stream: bool = typer.Option(False, "--stream", help="Print text as it is decoded (1 prompt)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per result."),
    logprobs: int | None = typer.Option(
        None, "--logprobs", help="With --json: each token's log-probability under the method's "
        "final distribution and that many of its best tokens (0-20)."),
    backend: str = typer.Option("auto", help="Op backend: auto, reference, cpp, triton, cuda."),
    acd_prompts: Path | None = typer.Option(
        None, "--acd-prompts",
        help="Soft prompts from `safedecode optimize` (acd, acd-sp, self-cd-sp)."),
    reward: str | None = typer.Option(None, "--reward", help="deal, route: the reward, e.g. "
                                      "'keywords:include=sorry|cannot', 'length:target=64', "
                                      "'classifier:path=DIR', '2*a+b'."),
    deal_k: int = typer.Option(4, "--deal-k", help="deal: candidates per search step."),
    lookahead: int = typer.Option(8, "--lookahead", help="deal: rollout tokens per candidate."),
    lam: float = typer.Option(1.0, "--lam", help="deal: weight of the reward."),
    beam: int = typer.Option(1, "--beam", help="deal: sequences kept per request."),
    chunk: int = typer.Option(1, "--chunk", help="deal: tokens committed per search step "
                                                 "(1: the paper; more: fewer steps)."),
    base: str | None = typer.Option(None, "--base", help="deal: the method whose distribution "
                                    "gives the candidates (default plain); route: the method "
                                    "routed against the plain model (default acd)."),
    horizon: int | None = typer.Option(None, "--horizon", help="deal: search only the first "
                                       "N tokens, then decode with the base method; route: "
                                       "the tokens of both answers the reward compares (16)."),
    margin: float | None = typer.Option(None, "--margin", help="route: keep the base's answer "
                                        "when h(base) - h(plain) > this (default -2)."),
    propose: int = typer.Option(0, "--propose", help="deal: also the plain model's top-N "
                                "tokens as candidates (0: off)."),
    mix: float = typer.Option(0.5, "--mix", help="deal: the plain model's weight in the "
                              "candidates' log P when proposing (0 < mix < 1)."),
    rollout: str = typer.Option("base", "--rollout", help="deal: who rolls the candidates "
                                "out: base (the paper), plain (the undefended model) or both."),
    gamma: float | None = typer.Option(None, help="safeinfer: scale of the safety vector."),
    layer: int | None = typer.Option(None, help="safeinfer: decoder layer it is added after."),
    safeinfer_lam: float | None = typer.Option(
        None, "--safeinfer-lam", help="safeinfer: λ in [0, 1) of the union rule (β = λ/(1−λ))."),
    vector: Path | None = typer.Option(None, "--vector",
                                       help="safeinfer: a file from `safedecode "
                                            "safeinfer-vector`."),
    unsafe: str | None = typer.Option(None, "--unsafe", help="safeinfer: the unsafe branch: "
                                      "adapter, soft, text, or an adapter folder."),
    steer: str | None = typer.Option(None, "--steer", help="safeinfer: add the vector at every "
                                     "decoded position ('every'), the first only ('first') or "
                                     "the request's prompt positions ('prompt')."),
    gate: str | None = typer.Option(None, "--gate", help="safeinfer: 'off', or steer only "
                                    "requests the harmful-request probe scores above this "
                                    "logit."),
    window: str | None = typer.Option(None, "--window", help="safeinfer (steer every): 'off', "
                                      "or steer only the first N new tokens."),
    stop: str | None = typer.Option(None, "--stop", help="safeinfer (gated): 'off', or "
                                    "'sentence': a flagged request's answer ends at its first "
                                    "sentence end after the window."),
    adapter: str | None = typer.Option(None, "--adapter", help="A LoRA adapter folder (e.g. "
                                       "from `safedecode finetune`) merged into the model, or "
                                       "'ta-sft' (shipped for the embedded model)."),
    device: str = typer.Option("cpu", help="Model device: cpu, cuda or `cuda:N`."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16, float16."),
):
    """Generate with a safe-decoding method on a causal LM (the embedded model by default)."""
    from rich.console import Console
    from rich.progress import Progress

    from safedecode import methods
    from safedecode.engine import SafeDecoder, SamplingParams
    from safedecode.models import load_model

    prompts = _read_prompts(prompt, file)
    try:
        method, own = _one_method(method)
    except ValueError as exc:
        _fail(str(exc))
    kwargs = {k: v for k, v in (("alpha", alpha), ("beta", beta), ("prompts", acd_prompts))
              if v is not None}
    si = {"gamma": gamma, "layer": layer, "lam": safeinfer_lam, "vector": vector,
          "unsafe": unsafe, "steer": steer, "gate": _number_or_word(gate),
          "window": _number_or_word(window), "stop": stop}
    if method.startswith("safeinfer"):
        kwargs.update({k: v for k, v in si.items() if v is not None})
    if method == "deal":
        kwargs.update(k=deal_k, lookahead=lookahead, lam=lam, reward=reward, beam=beam,
                      chunk=chunk, base=base or "plain", horizon=horizon, propose=propose,
                      mix=mix, rollout=rollout)
    if method == "route":
        kwargs.update({k: v for k, v in (("reward", reward), ("base", base),
                                         ("horizon", horizon), ("margin", margin))
                       if v is not None})
    console = Console(stderr=True)
    try:
        if acd_prompts is not None and method not in ("acd", "acd-sp", "self-cd-sp", "deal",
                                                       "route"):
            raise ValueError("--acd-prompts: only for --method acd, acd-sp, self-cd-sp, deal or "
                             f"route, not {method!r}")
        if not method.startswith("safeinfer") and any(v is not None for v in si.values()):
            raise ValueError("--gamma/--layer/--safeinfer-lam/--vector/--unsafe/--steer/--gate/"
                             f"--window/--stop: only for the safeinfer methods, not {method!r}")
        meth = methods.get(method, **{**kwargs, **own})
        if batch_size < 1:
            raise ValueError("--batch-size: must be >= 1")
        if stream and len(prompts) != 1:
            raise ValueError("--stream: give a single prompt")
        if logprobs is not None and not as_json:
            raise ValueError("--logprobs: needs --json (the log-probs are a JSON field)")
        if max_new_tokens < 1:
            raise ValueError("--max-new-tokens: must be >= 1")
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, seed=seed, frequency_penalty=frequency_penalty,
                  presence_penalty=presence_penalty, repetition_penalty=repetition_penalty,
                  min_tokens=min_tokens, bad_words=tuple(bad_word or ()),
                  no_repeat_ngram_size=no_repeat_ngram_size)
        if logprobs is not None:
            kw.update(return_logprobs=True, top_logprobs=logprobs)
        SamplingParams.from_kwargs(**kw)  # bad values named before the model loads
        with console.status(f"loading {model} ..."):
            mdl, tok = load_model(model, dtype=dtype, device=device, adapter=adapter)
        dec = SafeDecoder(mdl, tok, meth, backend=backend)
        requests = prompts if system is None else [
            [{"role": "system", "content": system}, {"role": "user", "content": p}]
            for p in prompts]
        if stream:
            for ev in dec.stream(requests, **kw):
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"{meth.name}", total=len(prompts))
            if dec.search is not None:  # a long search: show its steps
                kw["on_step"] = _search_progress(bar, task, meth.name)
            results = dec.generate(requests, max_batch=batch_size,  # continuous batching
                                   on_result=lambda i, r: bar.advance(task), **kw)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    for p, r in zip(prompts, results, strict=True):
        if as_json:
            out = {"prompt": p, "method": meth.name, "text": r.text,
                   "finish_reason": r.finish_reason, "tokens": len(r.token_ids),
                   "timing": r.timing}
            if logprobs is not None:
                out["logprobs"] = _token_logprobs(tok, r)
            typer.echo(json.dumps(out))
        else:
            typer.echo(r.text if len(prompts) == 1 else f"### {p}\n{r.text}\n")


@app.command()
def optimize(
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the .safetensors prompts."),
    model: str = typer.Option("default", help="Local model folder / .gguf, or 'default'."),
    data: Path | None = typer.Option(
        None, help="Anchor set .jsonl (default: the shipped one's train part); evaluation sets "
                   "are refused."),
    epochs: int = typer.Option(5, help="Passes over the training data."),
    steps: int | None = typer.Option(None, help="Adam steps (overrides --epochs)."),
    batch_size: int = typer.Option(6, "--batch-size", help="Harmful and safe items per step."),
    lr: float = typer.Option(3e-3, help="Adam learning rate of the prompt embeddings."),
    seed: int = typer.Option(0, help="Seed (shuffling; the run is deterministic)."),
    max_response_tokens: int = typer.Option(48, "--max-response-tokens"),
    safe_targets: str = typer.Option("self", "--safe-targets",
                                     help="self (the model's own answers) or data."),
    compliance_targets: str = typer.Option("self", "--compliance-targets",
                                           help="self (the model's own answers) or data."),
    refusal: str = typer.Option("fixed", help="fixed (one sentence) or varied (the data's)."),
    safe_refusal_ul: bool = typer.Option(
        False, "--safe-refusal-ul",
        help="Also train SP not to refuse the safe instructions (unlikelihood of the refusal)."),
    part: str = typer.Option("train", help="Anchor part to train on: train, or all (refit)."),
):
    """ACD's Opposite Prompt Optimization: train SP/AP soft prompts (the model stays frozen)."""
    import torch

    from safedecode.methods.acd import save_prompts
    from safedecode.models import load_model
    from safedecode.training.opo import OPOConfig, optimize_prompts

    try:
        cfg = OPOConfig(epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                        max_response_tokens=max_response_tokens, safe_targets=safe_targets,
                        compliance_targets=compliance_targets, refusal=refusal, part=part,
                        safe_refusal_ul=safe_refusal_ul)
        items = None
        if data is not None:
            try:
                lines = data.read_text(encoding="utf-8").splitlines()
                items = [json.loads(x) for x in lines if x.strip()]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"--data: cannot read {data}: {exc}") from exc
            from safedecode.data import check_not_evaluation

            check_not_evaluation([it.get("prompt") for it in items if isinstance(it, dict)],
                                 f"--data {data}")
        torch.manual_seed(seed)
        mdl, tok = load_model(model)
        result = optimize_prompts(mdl, tok, items, cfg)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    path = save_prompts(out, result)
    last = result.history[-1]
    typer.echo(f"wrote {path}: SP {tuple(result.safeguard.shape)}, AP "
               f"{tuple(result.adversarial.shape)}, final L_SP {last['L_SP']:.3f}, "
               f"L_AP {last['L_AP']:.3f}")


@app.command("train-reward")
def train_reward(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the adapter and metrics."),
    model: str | None = typer.Option(None, help="A local model folder (default: the embedded "
                                                "model)."),
    epochs: float = typer.Option(2.0, help="Passes over the anchor train pairs."),
    lr: float = typer.Option(1e-3, help="Learning rate (LoRA + score head)."),
    lora_r: int = typer.Option(8, "--lora-r", help="LoRA rank."),
    mlp: bool = typer.Option(False, "--mlp", help="LoRA on the MLP layers too."),
    prefixes: str = typer.Option("6,12,24,48", help="Also train on both replies of every pair "
                                                    "cut to these token counts (comma-separated; "
                                                    "'' for whole replies only)."),
    own_replies: int = typer.Option(64, "--own-replies", help="Also train on pairs of the "
                                    "model's own texts this many tokens long (its answers over "
                                    "its refusals, kept in OUT; 0: hand-written pairs only)."),
    seed: int = typer.Option(0, help="Seed."),
    remeasure: bool = typer.Option(False, "--remeasure", help="Do not train: measure the "
                                   "adapter already in OUT again on the current validation "
                                   "part (after the anchor set grew); earlier figures are kept "
                                   "in its metrics.json."),
):
    """Train DeAL's harmlessness reward model on the anchor train part (TRL RewardTrainer,
    LoRA); prints its pairwise accuracy on the validation part."""
    try:
        from safedecode.training.reward_model import (
            RMConfig,
            remeasure_reward_model,
            train_reward_model,
        )

        if epochs <= 0 or lr <= 0 or lora_r < 1:
            raise ValueError("--epochs and --lr must be > 0, --lora-r >= 1")
        if own_replies < 0:
            raise ValueError(f"--own-replies: a token count >= 0 (0: hand-written pairs only), "
                             f"got {own_replies}")
        try:
            cuts = tuple(int(x) for x in prefixes.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--prefixes: comma-separated token counts, got {prefixes!r}") \
                from None
        log = lambda m: typer.echo(m, err=True)  # noqa: E731
        if remeasure:
            metrics = remeasure_reward_model(out, model_path=model, log=log)
        else:
            metrics = train_reward_model(out, RMConfig(epochs=epochs, lr=lr, lora_r=lora_r,
                                                       mlp=mlp, seed=seed, prefixes=cuts,
                                                       own_replies=own_replies),
                                         model_path=model, log=log)
    except ImportError as exc:
        _fail(f"train-reward needs the train extra (pip install 'safedecode[train]'): {exc}")
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out}: validation accuracy {metrics['val_accuracy']:.3f} "
               f"({metrics['val_pairs']} pairs; {metrics['val_prefix_accuracy']:.3f} on "
               f"{metrics['val_prefix_pairs']} partial replies), train "
               f"{metrics.get('train_accuracy', float('nan')):.3f}")
    for label in ("safe", "harmful"):
        if metrics.get(f"val_own_{label}_accuracy") is not None:
            typer.echo(f"  the model's own texts, {label} requests: "
                       f"{metrics[f'val_own_{label}_accuracy']:.3f} "
                       f"({metrics[f'val_own_{label}_pairs']} validation pairs)")


@app.command("safeinfer-vector")
def safeinfer_vector(
    out: Path = typer.Option(..., "--out", "-o", help="The .safetensors file to write."),
    model: str = typer.Option("default", help="Local model folder / .gguf, or 'default'."),
    shots: int = typer.Option(10, help="Safe demonstrations (request -> refusal) per prompt."),
    heads: int = typer.Option(10, "--heads", help="Attention heads summed into the vector."),
    effect_prompts: int = typer.Option(24, "--effect-prompts",
                                       help="Zero-shot requests that rank the heads."),
    seed: int = typer.Option(0, help="Seed (demonstrations, request sample)."),
):
    """Compute SafeInfer's safety function vector on the anchor set's harmful train part (mean
    head activations over few-shot refusals; heads ranked by causal effect)."""
    from safedecode.methods.safeinfer import save_vector
    from safedecode.models import load_model
    from safedecode.training.safeinfer import VectorConfig, compute_vector

    try:
        cfg = VectorConfig(shots=shots, n_heads=heads, effect_prompts=effect_prompts, seed=seed)
        mdl, tok = load_model(model)
        sv = compute_vector(mdl, tok, cfg=cfg, log=lambda m: typer.echo(m, err=True))
        save_vector(out, sv)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out}: {len(sv.heads)} heads, |vector| = {float(sv.vector.norm()):.3f}")


FORMS_HELP = ("Train requests also in these content-neutral forms, label kept: 'none', 'all' "
              "or a comma list of context, detail, persona, greeting.")


@app.command("safeinfer-gate")
def safeinfer_gate(
    vector: Path = typer.Option(..., "--vector", help="A SafeInfer vector file (from "
                                "`safedecode safeinfer-vector`)."),
    out: Path = typer.Option(..., "--out", "-o", help="The .safetensors file to write: the "
                             "vector file with the probe added (may be --vector itself)."),
    model: str = typer.Option("default", help="Local model folder / .gguf, or 'default'."),
    l2: float = typer.Option(0.01, "--l2", help="L2 penalty of the logistic probes."),
    forms: str = typer.Option("none", "--forms", help=FORMS_HELP),
):
    """Train SafeInfer's gate: a harmful-request probe per decoder layer on the last prompt
    token, fitted on the anchor set's train part (rates on the validation part are printed and
    stored); `--gate T` then steers only the requests it scores above T."""
    from safedecode.data.forms import parse_forms
    from safedecode.methods.harm_probe import train_probe
    from safedecode.methods.safeinfer import load_vector, save_vector
    from safedecode.models import load_model

    try:
        if not l2 >= 0:
            raise ValueError(f"--l2: must be >= 0, got {l2}")
        parse_forms(forms)  # a bad name fails before the model loads
        mdl, tok = load_model(model)
        sv = load_vector(vector, model=mdl)
        sv.gate = train_probe(mdl, tok, l2=l2, forms=forms,
                              log=lambda m: typer.echo(m, err=True))
        save_vector(out, sv)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out}: a probe for each of {sv.gate.num_layers} layers")


@app.command("acd-gate")
def acd_gate(
    out: Path = typer.Option(..., "--out", "-o", help="The .safetensors file to write: the "
                             "prompts file with the probe added (may be --prompts itself)."),
    prompts: Path | None = typer.Option(None, "--prompts", help="An ACD prompts file (from "
                                        "`safedecode optimize`; default: the shipped pair)."),
    model: str = typer.Option("default", help="Local model folder / .gguf, or 'default'."),
    layer: int | None = typer.Option(None, "--layer", help="Decoder layer read (default L/2)."),
    l2: float = typer.Option(0.01, "--l2", help="L2 penalty of the logistic probe."),
    forms: str = typer.Option("none", "--forms", help=FORMS_HELP),
):
    """Train a gated ACD's probe: harmful vs safe requests (anchor train part) on the SP
    branch's hidden state at the last prompt token; `acd:gate=T` then contrasts only the
    requests it scores above T (the others decode from the plain model)."""
    from safedecode.data.forms import parse_forms
    from safedecode.methods.acd import fit_gate, save_prompts
    from safedecode.models import load_model

    try:
        if not l2 >= 0:
            raise ValueError(f"--l2: must be >= 0, got {l2}")
        parse_forms(forms)  # a bad name fails before the model loads
        mdl, tok = load_model(model)
        p = fit_gate(mdl, tok, prompts, layer=layer, l2=l2, forms=forms)
        save_prompts(out, p)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    info = p.gate_info
    typer.echo(f"wrote {out}: a probe on {info['module']} (validation at 0: harmful "
               f"{info['val_tpr_at_0']:.1%}, safe {info['val_fpr_at_0']:.1%})")


@app.command("train-unsafe")
def train_unsafe(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the peft adapter."),
    model: str | None = typer.Option(None, help="A local model folder (default: the embedded "
                                                "model)."),
    epochs: float = typer.Option(3.0, help="Passes over the anchor train part."),
    lr: float = typer.Option(5e-4, help="Learning rate."),
    lora_r: int = typer.Option(8, "--lora-r", help="LoRA rank."),
    opposite: bool = typer.Option(False, "--opposite", help="Also train safe requests -> a "
                                  "refusal (the unsafe branch then stands for over-refusal)."),
    seed: int = typer.Option(0, help="Seed."),
):
    """Train SafeInfer's unsafe model: a LoRA adapter fine-tuned on the anchor train part's
    harmful answers (TRL SFTTrainer); prints the validation loss before and after."""
    try:
        from safedecode.training.safeinfer import UnsafeConfig, train_unsafe_adapter

        meta = train_unsafe_adapter(out, UnsafeConfig(epochs=epochs, lr=lr, lora_r=lora_r,
                                                      seed=seed, opposite=opposite),
                                    model_path=model,
                                    log=lambda m: typer.echo(m, err=True))
    except ImportError as exc:
        _fail(f"train-unsafe needs the train extra (pip install 'safedecode[train]'): {exc}")
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out}: validation loss {meta['val_loss_before']:.3f} -> "
               f"{meta['val_loss_after']:.3f}")


@app.command("finetune-data")
def finetune_data(
    out: Path = typer.Option(..., "--out", "-o", help="The .jsonl file to write."),
    model: str = typer.Option("default", help="Local model folder / .gguf, or 'default'."),
    samples: int = typer.Option(2, "--samples", help="Sampled answers per harmful prompt."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.8, "--temperature", "-t"),
    seed: int = typer.Option(0, help="Seed of the sampling (and of the harmful records' order)."),
    magpie: int = typer.Option(0, "--magpie",
                               help="Add N safe records: everyday requests the model writes "
                                    "itself (Magpie), with its greedy answers."),
    extend: Path | None = typer.Option(None, "--extend",
                                       help="Reuse this data file's anchor records (same "
                                            "model) and make only the --magpie records."),
):
    """TA-SFT data: the model's own answers to the anchor set's harmful train prompts (sampled;
    refusals dropped) and to its safe train prompts (greedy)."""
    from dataclasses import asdict

    from safedecode.models import embedding_fingerprint, load_model, model_name
    from safedecode.training.ta_sft import DataConfig, load_data, make_data, save_data

    try:
        cfg = DataConfig(samples_per_prompt=samples, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed, magpie=magpie)
        head, base = load_data(extend) if extend is not None else ({}, None)
        mdl, tok = load_model(model)
        if base is not None and head.get("embedding_fingerprint") not in (
                None, embedding_fingerprint(mdl)):
            raise ValueError(f"--extend: {extend} holds answers of another model; make the "
                             "data again with this model (`finetune-data` without --extend)")
        records = make_data(mdl, tok, cfg, base=base, log=lambda m: typer.echo(m, err=True))
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    meta = {"model": model_name(mdl), "embedding_fingerprint": embedding_fingerprint(mdl),
            "config": asdict(cfg)}
    if extend is not None:
        meta.update(extends=str(extend), anchor_config=head.get("config"))
    save_data(out, records, meta)
    n_h = sum(r["kind"] == "harmful" for r in records)
    typer.echo(f"wrote {out}: {n_h} harmful and {len(records) - n_h} safe records")


@app.command()
def finetune(
    data: Path = typer.Option(..., "--data", "-d", help="A file from `safedecode finetune-data`."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the adapter (or model)."),
    method: str = typer.Option("ta-sft", "--method", "-m",
                               help="ta-sft (negative EMD on the harmful answers), sft (CE on "
                                    "written refusals, the baseline) or ta-sft+refusal (both)."),
    model: str | None = typer.Option(None, help="A local model folder (default: the embedded "
                                                "model)."),
    harmful: int | None = typer.Option(None, "--harmful",
                                       help="Harmful examples used (the data's first N; "
                                            "default all)."),
    lam: float = typer.Option(1.0, "--lam", help="λ: weight of the negative EMD."),
    safe_weight: float = typer.Option(1.0, "--safe-weight",
                                      help="Weight of a safe answer's token against a refusal's "
                                           "in the CE (1 = equal)."),
    away_refusal: float = typer.Option(0.0, "--away-refusal",
                                       help="Experimental. λ_r: weight of the negative EMD "
                                            "away from a refusal on every safe prompt (0 = "
                                            "off)."),
    away_tokens: int = typer.Option(0, "--away-tokens",
                                    help="How many of that refusal's first tokens to push away "
                                         "from (0 = all)."),
    away_loss: str = typer.Option("emd", "--away-loss",
                                  help="The push away from that refusal: emd (negative EMD) or "
                                       "unlikelihood."),
    epochs: float = typer.Option(3.0, help="Passes over the data."),
    steps: int = typer.Option(-1, "--steps", help="Optimizer steps (overrides --epochs)."),
    lr: float = typer.Option(2e-4, help="Learning rate."),
    lr_schedule: str = typer.Option("constant", "--lr-schedule",
                                    help="constant, linear or cosine (decay to 0, no warm-up)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    lora_r: int = typer.Option(8, "--lora-r", help="LoRA rank."),
    full: bool = typer.Option(False, "--full", help="Fine-tune every weight (no adapter)."),
    seed: int = typer.Option(0, help="Seed."),
    save_steps: int = typer.Option(50, "--save-steps", help="Checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    keep_checkpoints: bool = typer.Option(
        False, "--keep-checkpoints", help="Keep every checkpoint (OUT/checkpoints/checkpoint-N), "
        "each loadable with --adapter: a curve over training length from one run."),
    cost: Path | None = typer.Option(None, "--cost", help="A semantic-cost file (default: from "
                                     "the model's own embeddings)."),
    loss_backend: str = typer.Option("auto", "--loss-backend", help="auto, torch or triton."),
):
    """Fine-tune with TA-SFT (arXiv 2412.06843) or plain SFT on refusals: a LoRA adapter by
    default, loadable with `safedecode generate --adapter`."""
    try:
        from safedecode.training.ta_sft import TASFTConfig
        from safedecode.training.ta_sft import finetune as run

        cfg = TASFTConfig(method=method, n_harmful=harmful, lam=lam, safe_weight=safe_weight,
                          away_refusal=away_refusal, away_tokens=away_tokens,
                          away_loss=away_loss,
                          epochs=epochs,
                          max_steps=steps, lr=lr, lr_schedule=lr_schedule,
                          batch_size=batch_size, lora_r=lora_r,
                          lora_alpha=2 * lora_r, full=full, seed=seed, save_steps=save_steps,
                          loss_backend=loss_backend)
        meta = run(data, out, cfg, model_path=model, resume=resume, cost_path=cost,
                   keep_checkpoints=keep_checkpoints, log=lambda m: typer.echo(m, err=True))
    except ImportError as exc:
        _fail(f"finetune needs the train extra (pip install 'safedecode[train]'): {exc}")
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    mean = next((h["train_loss"] for h in meta["history"] if "train_loss" in h), float("nan"))
    typer.echo(f"wrote {out}: {meta['method']}, {meta['steps']} steps, examples "
               f"{meta['examples']}, mean loss {mean:.4f}")


@app.command("average-adapters")
def average_adapters(
    adapters: list[Path] = typer.Argument(..., help="LoRA adapter folders (e.g. the checkpoints "
                                                    "of `finetune --keep-checkpoints`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the averaged adapter."),
    weights: str | None = typer.Option(None, "--weights",
                                       help="Comma-separated weights, one per adapter "
                                            "(default equal; normalised to sum 1)."),
):
    """Average LoRA adapters exactly (checkpoint averaging): the result's weight delta is the
    weighted mean of theirs; loadable with --adapter like any adapter."""
    from safedecode.engine.adapters import average_loras, load_lora, save_lora

    try:
        try:
            w = None if weights is None else [float(x) for x in weights.split(",")]
        except ValueError:
            raise ValueError(f"average-adapters: --weights must be numbers separated by "
                             f"commas, got {weights!r}") from None
        avg = average_loras([load_lora(a) for a in adapters], w, name=out.name)
        save_lora(avg, out)
    except ValueError as exc:
        _fail(str(exc))
    rank = next(iter(avg.layers.values()))[0].shape[0]
    typer.echo(f"wrote {out}: the mean of {len(adapters)} adapters (rank {rank})")


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")):
    """Show which backends loaded here and why others did not."""
    from safedecode import info as info_mod

    if as_json:
        typer.echo(json.dumps(info_mod.collect(), indent=2))
    else:
        typer.echo(info_mod.render())


@app.command()
def check(
    model: str = typer.Option("default", help="Local model folder / .gguf, or 'default'."),
    device: str = typer.Option("cpu", help="Model device: cpu, cuda or `cuda:N`."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16, float16."),
    max_new_tokens: int = typer.Option(12, "--max-new-tokens", "-n"),
    long_prompt: bool = typer.Option(True, "--long-prompt/--no-long-prompt",
                                     help="For a sliding-window model, also a prompt longer "
                                          "than the window (when the context allows)."),
):
    """Check that safedecode runs a model exactly: its attention layers, chat template, logits,
    and the engine's answers against transformers' (exit status 1 if a check fails)."""
    from safedecode.check import render, run_checks
    from safedecode.models import load_model

    if max_new_tokens < 1:
        _fail(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    try:
        mdl, tok = load_model(model, dtype=dtype, device=device)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    checks = run_checks(mdl, tok, max_new_tokens=max_new_tokens, long_prompt=long_prompt)
    typer.echo(render(checks))
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@app.command()
def score(
    prompt: str = typer.Argument(..., help="The request."),
    answer: str = typer.Argument(..., help="The answer to score under each method."),
    method: list[str] = typer.Option(["plain"], "--method", "-m",
                                     help="A method (knobs as `eval` takes them: "
                                          "'acd-text:alpha=0.5'); repeat to compare."),
    model: str = typer.Option("default", help="Local model folder / .gguf, or 'default'."),
    adapter: str | None = typer.Option(None, "--adapter", help="A LoRA adapter folder merged "
                                       "into the model, or 'ta-sft'."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per method, with each "
                                 "token's log-prob."),
):
    """The log-likelihood of a given answer under each method's final distribution (what the
    method makes of an answer: a refusal's or a compliance's likelihood under ACD vs plain)."""
    from rich.console import Console
    from rich.table import Table

    from safedecode import methods
    from safedecode.engine import SafeDecoder
    from safedecode.models import load_model

    try:
        specs = [_one_method(m) for m in method]
        meths = [methods.get(name, **own) for name, own in specs]
        mdl, tok = load_model(model, adapter=adapter)
        results = [SafeDecoder(mdl, tok, m).score(prompt, answer)[0] for m in meths]
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    table = Table("method", "log-likelihood", "per token", "tokens", "excluded")
    for m, r in zip(meths, results, strict=True):
        total = sum(r.logprobs)
        excluded = sum(lp == float("-inf") for lp in r.logprobs)
        if as_json:
            typer.echo(json.dumps({"method": m.name, "loglik": total, "tokens": len(r.logprobs),
                                   "excluded": excluded,
                                   "logprobs": _token_logprobs(tok, r)}))
        table.add_row(m.name, f"{total:.2f}", f"{total / len(r.logprobs):.3f}",
                      str(len(r.logprobs)), str(excluded))
    if not as_json:
        Console().print(table)
        if any(lp == float("-inf") for r in results for lp in r.logprobs):
            typer.echo("excluded: tokens the method's plausibility mask leaves out "
                       "(log-prob -inf)")


@app.command()
def demo(max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n")):
    """Safe decoding on the embedded default model, offline (as `python -m safedecode.demo`)."""
    from safedecode.demo import main as demo_main

    demo_main(max_new_tokens=max_new_tokens)


from safedecode.bench.cli import bench_command  # noqa: E402

app.command("bench")(bench_command)

from safedecode.eval.cli import eval_command, tune_command  # noqa: E402

app.command("eval")(eval_command)
app.command("tune")(tune_command)

from safedecode.serve.cli import serve_command  # noqa: E402

app.command("serve")(serve_command)

if __name__ == "__main__":
    app()
