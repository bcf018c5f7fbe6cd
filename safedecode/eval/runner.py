"""Generation for the evaluation: every (method, data set item) once, cached and resumable.

Records go to ``generations.jsonl`` (one line per generation, flushed as it is made); a record's
``key`` hashes (model fingerprint, method fingerprint, data set, item id and prompt, decoding
parameters), so a re-run skips what is done and regenerates what changed. Perplexities and slow
judges' verdicts go to ``annotations.jsonl`` the same way.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from safedecode.engine.branches import Method
from safedecode.engine.engine import GenerationResult
from safedecode.judges import Judge
from safedecode.models import model_name

from .datasets import Dataset, Item
from .metrics import perplexity
from .store import JsonlStore

DECODING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed")


# -- identities ------------------------------------------------------------------------------
def _hash_value(h, obj, depth: int = 0) -> None:
    """Feed a stable description of ``obj`` (tensors by content, functions by code) to ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu", torch.float32).contiguous()
        h.update(f"T{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    elif depth < 4 and isinstance(obj, functools.partial):
        _hash_value(h, obj.func, depth + 1)
        for a in (*obj.args, *sorted(obj.keywords.items())):
            _hash_value(h, a, depth + 1)
    elif depth < 4 and callable(obj) and hasattr(obj, "__code__"):
        h.update(f"{obj.__module__}.{obj.__qualname__}".encode())
        h.update(obj.__code__.co_code)
        for cell in obj.__closure__ or ():
            try:
                _hash_value(h, cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                pass
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for x in obj:
            _hash_value(h, x, depth + 1)
    else:
        h.update(repr(obj).encode())


def method_fingerprint(method: Method) -> str:
    """Content hash of a method: rule, weights, anchor, β, and each branch's system prompt, soft
    prompt and hooks (stable across processes, unlike object ids)."""
    from safedecode.methods.deal import DeAL
    from safedecode.methods.route import Route

    h = hashlib.sha256()
    if isinstance(method, Route):  # its base, knobs and reward
        h.update(method_fingerprint(method.base).encode())
        h.update(repr((method.horizon, float(method.margin), method.reward.key())).encode())
        return "route-" + h.hexdigest()[:10]
    if isinstance(method, DeAL):  # a search: its base method, settings and reward
        h.update(method_fingerprint(method.base).encode())
        h.update(repr((method.k, method.lookahead, method.lam, method.beam, method.chunk,
                       method.reward.key())).encode())
        if method.horizon is not None:  # (absent: the keys of earlier runs stay valid)
            h.update(f"horizon={method.horizon}".encode())
        if method.propose:
            h.update(f"propose={method.propose}".encode())
        if (method.propose or method.rollout != "base") and method.mix != 0.5:
            h.update(f"mix={method.mix!r}".encode())
        if method.rollout != "base":
            h.update(f"rollout={method.rollout}".encode())
        return "deal-" + h.hexdigest()[:11]
    h.update(repr((method.name, method.rule, method.weights, method.anchor, method.beta)).encode())
    if method.contrast_gate is not None:  # (absent: earlier keys unchanged)
        h.update(f"contrast_gate={method.contrast_gate}:fallback={method.fallback}".encode())
    for b in method.branches:
        h.update(repr(b.system).encode())
        if b.soft_prompt is not None:
            _hash_value(h, b.soft_prompt)
        for hook in b.hooks:
            h.update(f"{hook.module}:{hook.positions}".encode())
            _hash_value(h, hook.fn)
            if hook.gate is not None:  # (absent: the keys of ungated hooks stay as they were)
                h.update(b"gate")
                _hash_value(h, hook.gate)
            if hook.window is not None or hook.stop is not None:  # likewise
                h.update(f"window={hook.window}:stop={hook.stop}".encode())
        if b.adapter is not None:
            h.update(b.adapter.key().encode())
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """A cheap content hash of a model: its config (less the transformers version that wrote
    it), the adapters merged into it and samples of a few parameter tensors."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = json.loads(cfg.to_json_string(use_diff=False))
        d.pop("transformers_version", None)  # a library upgrade is not another model
        h.update(json.dumps(d, sort_keys=True).encode())
    h.update(",".join(getattr(model, "safedecode_adapters", [])).encode())  # merged adapters
    params = list(model.parameters())
    for p in {0: params[0], 1: params[len(params) // 2], 2: params[-1]}.values():
        _hash_value(h, p.detach().reshape(-1)[:4096])
    return h.hexdigest()[:16]


def record_key(model_fp: str, method_fp: str, dataset: str, item: Item, decoding: dict) -> str:
    payload = [model_fp, method_fp, dataset, item.id, item.prompt,
               {k: decoding.get(k) for k in DECODING_KEYS}]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


# -- method specs ----------------------------------------------------------------------------
@dataclass
class MethodSpec:
    """A method by registry name, with keyword arguments; ``label`` names it in the reports."""

    name: str
    kwargs: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return ":".join([self.name, *(f"{k}={_quoted(v)}" for k, v in self.kwargs.items())])

    def build(self) -> Method:
        from safedecode import methods

        return methods.get(self.name, **self.kwargs)


def split_spec(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep``, except inside ``[...]`` (a value holding ``:``, ``,`` or ``|``
    itself, e.g. ``reward=[harmless:path=DIR]``)."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(depth - 1, 0)
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"--methods: unclosed '[' in {text!r}")
    return [*out, "".join(cur)]


def _quoted(value) -> str:
    text = str(value)
    return f"[{text}]" if any(c in text for c in ":,|") else text


def _literal(text: str):
    if text.startswith("[") and text.endswith("]"):
        return text[1:-1]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_methods(spec: str, overrides: dict | None = None) -> list[MethodSpec]:
    """``"plain,acd-text:alpha=1.0:beta=0.1"`` → method specs; a value in ``[...]`` is taken
    as it is (``deal:reward=[harmless:path=DIR]``). ``overrides`` (e.g. alpha) go to every
    method whose factory takes them and whose spec does not set them."""
    from safedecode import methods

    out = []
    for part in (p.strip() for p in split_spec(spec, ",")):
        if not part:
            continue
        name, *args = split_spec(part, ":")
        if name not in methods.REGISTRY:
            raise ValueError(f"--methods: unknown method {name!r}; choose from "
                             f"{sorted(methods.REGISTRY)}")
        kwargs = {}
        for a in args:
            key, eq, val = a.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"--methods: {part!r}: expected name:key=value[:key=value]")
            kwargs[key.strip()] = _literal(val.strip())
        params = inspect.signature(methods.REGISTRY[name]).parameters
        for k, v in (overrides or {}).items():
            if v is not None and k in params and k not in kwargs:
                kwargs[k] = v
        out.append(MethodSpec(name, kwargs))
    if not out:
        raise ValueError("--methods: no method given")
    labels = [m.label for m in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--methods: a method is listed twice ({labels})")
    return out


# -- generation ------------------------------------------------------------------------------
def _store_as_finished(store: JsonlStore, items: list, common: dict, progress, task):
    """An ``on_result(i, result)`` for :meth:`SafeDecoder.generate` over ``items`` ((data set,
    item, key) each) that stores each answer as it finishes: ``batch_size`` decode at once and
    the next joins as one ends (continuous batching), and an interrupted run keeps its work.
    ``batch_s``: the call's time until this answer finished."""
    t0 = time.perf_counter()

    def keep(i: int, r: GenerationResult) -> None:
        if r.error:  # generate() raises it once the others are stored
            return
        d, it, key = items[i]
        store.append({
            **common, "key": key, "dataset": d.name, "item_id": it.id,
            "category": it.category, "label": it.label, "prompt": it.prompt,
            "response": r.text, "token_ids": list(map(int, r.token_ids)),
            "finish_reason": r.finish_reason, "new_tokens": len(r.token_ids),
            "latency_s": r.timing.get("total_s"), "prefill_s": r.timing.get("prefill_s"),
            "decode_s": r.timing.get("decode_s"), "batch_s": time.perf_counter() - t0,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        store.sync()
        if task is not None:
            progress.advance(task, 1)
    return keep


def generate_all(model, tok, methods: dict[str, Method], datasets: Sequence[Dataset],
                 store: JsonlStore, *, decoding: dict, batch_size: int = 16,
                 backend: str = "auto", progress=None) -> list[dict]:
    """Generate every (method, item) not yet in ``store``; returns the records of this run, in
    method, data set and item order, each under this run's label (a cached record keeps the
    label it was generated under: a label may have meant other prompts or knobs then, and two
    labels may share one generation). ``progress``: a rich Progress (optional)."""
    from safedecode.engine import SafeDecoder

    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    decoding = {k: decoding[k] for k in DECODING_KEYS if k in decoding}
    model_fp = model_fingerprint(model)
    mname = model_name(model)
    wanted: list[tuple[str, str]] = []
    for label, method in methods.items():
        method_fp = method_fingerprint(method)
        keyed = [(ds, it, record_key(model_fp, method_fp, ds.name, it, decoding))
                 for ds in datasets for it in ds.items]
        wanted += [(label, k) for _, _, k in keyed]
        todo = [x for x in keyed if x[2] not in store]
        task = None
        if progress is not None:
            task = progress.add_task(label, total=len(keyed), completed=len(keyed) - len(todo))
        if not todo:
            continue
        dec = SafeDecoder(model, tok, method, backend=backend)
        lengths = {it.prompt: len(tok(it.prompt, add_special_tokens=False)["input_ids"])
                   for _, it, _ in todo}
        for ds in datasets:  # one data set at a time, shortest prompts first (less padding)
            mine = sorted((x for x in todo if x[0] is ds), key=lambda x: lengths[x[1].prompt])
            if not mine:
                continue
            common = {"model": mname, "model_fingerprint": model_fp, "method": label,
                      "method_fingerprint": method_fp, "batch": uuid.uuid4().hex[:12],
                      "batch_size": batch_size, "decoding": decoding}
            keep = _store_as_finished(store, mine, common, progress, task)
            dec.generate([it.prompt for _, it, _ in mine], max_batch=batch_size, on_result=keep,
                         **decoding)
    return [{**store[k], "method": label} for label, k in wanted]


# -- perplexity under the plain model --------------------------------------------------------
def response_nll(model, tok, prompts: Sequence[str], responses: Sequence[Sequence[int]],
                 batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each response's token ids given its
    prompt in the chat template with no system prompt, teacher-forced, in batches."""
    from safedecode.engine.prompts import PromptBuilder
    from safedecode.training.teacher import response_logprobs

    if len(prompts) != len(responses):
        raise ValueError("response_nll: prompts and responses differ in length")
    builder = PromptBuilder(tok)
    pairs = [(builder.encode(builder.render(None, [{"role": "user", "content": p}]), first=True),
              list(r)) for p, r in zip(prompts, responses, strict=True)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return [(-lp if n else 0.0, n) for lp, n in
            response_logprobs(model, pairs, batch_size=batch_size, pad_id=pad)]


def add_perplexity(model, tok, records: Sequence[dict], store: JsonlStore, *,
                   batch_size: int = 16, progress=None) -> dict[str, dict]:
    """Perplexity of every record's response under ``model`` (cached in ``store``)."""
    kind = f"ppl:{model_fingerprint(model)}"
    todo = [r for r in records if f"{r['key']}|{kind}" not in store]
    task = None
    if progress is not None and todo:
        task = progress.add_task("perplexity", total=len(todo))
    step = max(batch_size * 4, 1)
    for s in range(0, len(todo), step):
        chunk = todo[s:s + step]
        nll = response_nll(model, tok, [r["prompt"] for r in chunk],
                           [r["token_ids"] for r in chunk], batch_size)
        for r, (total, n) in zip(chunk, nll, strict=True):
            store.append({"key": f"{r['key']}|{kind}", "kind": "ppl",
                          "value": {"nll": total, "tokens": n, "ppl": perplexity(total, n)}})
        store.sync()
        if task is not None:
            progress.advance(task, len(chunk))
    return {r["key"]: store[f"{r['key']}|{kind}"]["value"] for r in records}


def judge_all(judge: Judge, records: Sequence[dict], store: JsonlStore | None = None,
              progress=None) -> dict[str, dict]:
    """Verdicts of ``judge`` on every record: ``{key: {"flag", "detail"}}``; slow judges'
    verdicts are cached in ``store``."""
    kind = f"judge:{judge.name}:{judge.fingerprint()}"
    cache = store if (store is not None and judge.cacheable) else None
    todo = [r for r in records if cache is None or f"{r['key']}|{kind}" not in cache]
    out: dict[str, dict] = {}
    task = None
    if progress is not None and judge.cacheable and todo:
        task = progress.add_task(f"judge {judge.name}", total=len(todo))
    step = 64
    for s in range(0, len(todo), step):
        chunk = todo[s:s + step]
        verdicts = judge([r["prompt"] for r in chunk], [r["response"] for r in chunk])
        for r, v in zip(chunk, verdicts, strict=True):
            value = {"flag": bool(v.flag), "detail": v.detail}
            out[r["key"]] = value
            if cache is not None:
                cache.append({"key": f"{r['key']}|{kind}", "kind": "judge", "value": value})
        if cache is not None:
            cache.sync()
        if task is not None:
            progress.advance(task, len(chunk))
    if cache is not None:
        for r in records:
            out.setdefault(r["key"], cache[f"{r['key']}|{kind}"]["value"])
    return out


# -- the whole evaluation ----------------------------------------------------------------------
def evaluate(model, tok, *, methods: Sequence[str | MethodSpec], datasets: Sequence[str | Dataset],
             out_dir, judges: Sequence[Judge] | None = None, limit: int | None = None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, seed: int = 0, batch_size: int = 16,
             backend: str = "auto", ppl: bool = True, n_examples: int = 3,
             progress=None, command: str | None = None, ppl_model=None) -> dict:
    """Generate (resuming from ``out_dir``), judge, measure and write the reports.

    ``methods``: specs such as ``"acd-text:alpha=1.0"``; ``datasets``: registered names, file
    paths or :class:`Dataset` objects. ``ppl_model`` scores the answers' perplexity (default
    ``model``; give the base model when ``model`` is fine-tuned, so fluency is measured under
    the plain model). Returns the ``results.json`` object.
    """
    from pathlib import Path

    from safedecode.judges import KeywordJudge

    from .datasets import load_dataset, subset
    from .report import write_reports

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: must be an integer >= 1, got {limit!r}")
    out = Path(out_dir)
    specs = [m if isinstance(m, MethodSpec) else parse_methods(m)[0] for m in methods]
    built = {s.label: s.build() for s in specs}
    sets = [d if isinstance(d, Dataset) else load_dataset(d, limit=limit) for d in datasets]
    sets = [Dataset(d.name, subset(d.items, limit), d.source, d.size or len(d.items))
            for d in sets]
    names = [d.name for d in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"datasets: two data sets have the same name ({names})")
    judges = list(judges) if judges else [KeywordJudge()]
    if len({j.name for j in judges}) != len(judges):
        raise ValueError("judges: two judges have the same name")
    decoding = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                "top_p": top_p, "min_p": min_p, "seed": seed}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with JsonlStore(out / "generations.jsonl") as gens, \
            JsonlStore(out / "annotations.jsonl") as notes:
        records = generate_all(model, tok, built, sets, gens, decoding=decoding,
                               batch_size=batch_size, backend=backend, progress=progress)
        ppls = add_perplexity(ppl_model if ppl_model is not None else model, tok, records,
                              notes, batch_size=batch_size, progress=progress) if ppl else None
        verdicts = {j.name: judge_all(j, records, notes, progress) for j in judges}
    config = {
        "model": model_name(model), "model_fingerprint": model_fingerprint(model),
        "methods": {s.label: {"name": s.name, "kwargs": s.kwargs,
                              "description": built[s.label].describe(),
                              "fingerprint": method_fingerprint(built[s.label])}
                    for s in specs},
        "datasets": {d.name: {"source": d.source, "size": d.size or len(d.items),
                              "evaluated": len(d.items), "labels": d.labels} for d in sets},
        "decoding": decoding, "batch_size": batch_size, "backend": backend, "limit": limit,
        "device": str(next(model.parameters()).device), "torch_threads": torch.get_num_threads(),
        "perplexity": "response tokens teacher-forced under the plain model "
                      f"{model_name(ppl_model if ppl_model is not None else model)} (user "
                      "prompt in the chat template, no system prompt)" if ppl else None,
        "command": command, "out_dir": str(out), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "wall_s_this_run": time.perf_counter() - t0,
    }
    paths = write_reports(records, verdicts, judges, ppls, config, out, n_examples)
    return json.loads(paths["json"].read_text(encoding="utf-8"))
