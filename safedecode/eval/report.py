"""Reports of an evaluation run: ``results.json`` (lm-evaluation-harness style), ``results.md``,
``refusal.png`` (harmful vs benign refusal per method, with 95% Wilson intervals) and
``examples.md`` (a few generations per method).

``results.json``: ``results[task]`` with ``task = "<dataset>@<method>"`` holds flat metrics named
``"<metric>,<filter>"`` as lm-evaluation-harness does — ``refusal_rate,keyword``,
``refusal_rate_stderr,keyword``, ``refusal_rate_ci95,keyword`` ([lo, hi]),
``refusal_rate_count,keyword``; harm judges give ``harmful_rate,<judge>``; judge-free metrics use
the filter ``none``: ``ppl,none``, ``ppl_median,none``, ``eos_rate,none``, ``length_rate,none``,
``mean_tokens,none``, ``tokens_per_s,none``, ``latency_s_p50,none``, ...; for each refusal
judge, ``nonanswer_rate,<judge>`` (with ``_ci95`` and ``_count``): the share of answers the judge
does not count as refusals that still do not answer — stubs, garbled text, loops
(:func:`~.metrics.non_answer`; ``nonanswer_kinds,<judge>`` counts each). ``summary[method]``
pools each label (``harmful``, ``benign``) over data sets; ``categories[task][category]`` splits a
task by category; ``config``, ``versions``, ``judges`` and ``n-samples`` describe the run.
"""

from __future__ import annotations

import json
import math
import platform
import textwrap
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from safedecode.judges import Judge

from .metrics import (
    GARBLED_PPL,
    NON_ANSWER_KINDS,
    SHORT_TOKENS,
    mean,
    non_answer,
    quantile,
    rate,
    stderr,
    throughput,
)

LABEL_ORDER = ("harmful", "benign", "unlabelled")


def _label(rec: dict) -> str:
    return rec.get("label") or "unlabelled"


def group_metrics(recs: Sequence[dict], verdicts: dict[str, dict[str, dict]],
                  judges: Sequence[Judge], ppl: dict[str, dict] | None,
                  speed: bool = True) -> dict:
    """The flat metrics of a group of generation records."""
    m: dict = {"n": len(recs)}
    for j in judges:
        r = rate(verdicts[j.name][x["key"]]["flag"] for x in recs)
        if r is None:
            continue
        name = f"{j.metric}_rate"
        m[f"{name},{j.name}"] = r.rate
        m[f"{name}_stderr,{j.name}"] = r.stderr
        m[f"{name}_ci95,{j.name}"] = [r.lo, r.hi]
        m[f"{name}_count,{j.name}"] = r.k
        if r.k:  # flagged answers cut by the token limit (a refusal that keeps generating)
            m[f"capped_{name},{j.name}"] = sum(
                verdicts[j.name][x["key"]]["flag"] and x["finish_reason"] == "length"
                for x in recs) / r.k
        if j.metric == "refusal":
            kinds = [None if verdicts[j.name][x["key"]]["flag"] else _non_answer(x, ppl)
                     for x in recs]
            nr = rate(k is not None for k in kinds)
            m[f"nonanswer_rate,{j.name}"] = nr.rate
            m[f"nonanswer_rate_ci95,{j.name}"] = [nr.lo, nr.hi]
            m[f"nonanswer_rate_count,{j.name}"] = nr.k
            m[f"nonanswer_kinds,{j.name}"] = {k: kinds.count(k) for k in NON_ANSWER_KINDS}
    for what, reason in (("eos_rate", "eos"), ("length_rate", "length")):
        r = rate(x["finish_reason"] == reason for x in recs)
        if r is not None:
            m[f"{what},none"], m[f"{what}_stderr,none"] = r.rate, r.stderr
            m[f"{what}_ci95,none"] = [r.lo, r.hi]
    m["mean_tokens,none"] = mean(x["new_tokens"] for x in recs)
    m["mean_tokens_stderr,none"] = stderr(x["new_tokens"] for x in recs)
    m["mean_chars,none"] = mean(len(x["response"]) for x in recs)
    if ppl is not None:
        vals = [ppl[x["key"]] for x in recs]
        tokens = sum(v["tokens"] for v in vals)
        m["ppl,none"] = math.exp(sum(v["nll"] for v in vals) / tokens) if tokens else None
        m["ppl_median,none"] = quantile([v["ppl"] for v in vals if v["ppl"] is not None], 0.5)
    if speed and recs:
        for k, v in throughput(recs).items():
            if k in ("tokens_per_s", "latency_s_mean", "latency_s_p50", "latency_s_p90"):
                m[f"{k},none"] = v
    return m


def _non_answer(rec: dict, ppl: dict[str, dict] | None) -> str | None:
    value = ppl.get(rec["key"], {}).get("ppl") if ppl is not None else None
    return non_answer(rec["response"], rec["new_tokens"], value)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("safedecode", "torch", "transformers", "garak"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def build_results(records: Sequence[dict], verdicts: dict[str, dict[str, dict]],
                  judges: Sequence[Judge], ppl: dict[str, dict] | None, config: dict) -> dict:
    """The ``results.json`` object of a run (see the module docstring)."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    results, categories, n_samples, summary = {}, {}, {}, {}
    for d in datasets:
        for meth in methods:
            recs = [r for r in records if r["dataset"] == d and r["method"] == meth]
            if not recs:
                continue
            task = f"{d}@{meth}"
            labels = sorted({_label(r) for r in recs})
            results[task] = {"alias": f"{d} ({meth})", "dataset": d, "method": meth,
                             "label": labels[0] if len(labels) == 1 else "mixed",
                             **group_metrics(recs, verdicts, judges, ppl)}
            n_samples[task] = {"original": config.get("datasets", {}).get(d, {}).get("size"),
                               "effective": len(recs)}
            cats = sorted({r["category"] for r in recs if r.get("category")})
            if cats:
                categories[task] = {c: group_metrics([r for r in recs if r.get("category") == c],
                                                     verdicts, judges, ppl, speed=False)
                                    for c in cats}
    for meth in methods:
        recs = [r for r in records if r["method"] == meth]
        summary[meth] = {lab: group_metrics([r for r in recs if _label(r) == lab], verdicts,
                                            judges, ppl, speed=False)
                         for lab in LABEL_ORDER if any(_label(r) == lab for r in recs)}
        summary[meth]["speed"] = throughput(recs)
    return {"results": results, "summary": summary, "categories": categories,
            "judges": {j.name: j.config() for j in judges}, "config": config,
            "versions": _versions(), "n-samples": n_samples}


# -- markdown ------------------------------------------------------------------------------
def _pct(m: dict, key: str, filt: str, ci: bool = True) -> str:
    if f"{key},{filt}" not in m or m[f"{key},{filt}"] is None:
        return "–"
    lo, hi = m.get(f"{key}_ci95,{filt}", [None, None]) if ci else (None, None)
    ci = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else ""
    return f"{100 * m[f'{key},{filt}']:.1f}%{ci}"


def _num(v, fmt: str = ".2f") -> str:
    return "–" if v is None else format(v, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def render_markdown(res: dict) -> str:
    """``results.md``: summary per method, then per task and per category."""
    cfg, judges = res["config"], res["judges"]
    rate_cols = [(f"{j['metric']}_rate", name) for name, j in judges.items()]
    dec = ", ".join(f"{k}={v}" for k, v in cfg.get("decoding", {}).items())
    lines = ["# Safety evaluation", "",
             f"- model: `{cfg.get('model')}` (fingerprint `{cfg.get('model_fingerprint')}`)",
             f"- decoding: {dec}; batch size {cfg.get('batch_size')}",
             "- judges: " + "; ".join(f"**{n}** ({_judge_text(j)})" for n, j in judges.items()),
             "- rates are percentages with 95% Wilson intervals; PPL: perplexity of the responses"
             " under the plain model (token-weighted); EOS / limit: share of responses ending "
             "with EOS / cut at max_new_tokens; non-answers: responses the refusal judge lets "
             f"through that are shorter than {SHORT_TOKENS} tokens, garbled (PPL > "
             f"{GARBLED_PPL:g}) or looping", ""]
    lines += ["## Per method", ""]
    header = ["method"]
    for key, name in rate_cols:
        header += [f"harmful {key.split('_')[0]} ({name})", f"benign {key.split('_')[0]} ({name})"]
    na = next((name for key, name in rate_cols if key == "refusal_rate"), None)
    if na is not None:
        header += [f"non-answers h / b ({na})"]
    header += ["PPL harmful", "PPL benign", "EOS", "limit", "mean tokens", "tokens/s",
               "latency p50 (s)"]
    rows = []
    for meth, s in res["summary"].items():
        h, b = s.get("harmful", {}), s.get("benign", {})
        pooled = [x for x in (h, b, s.get("unlabelled", {})) if x]
        row = [f"`{meth}`"]
        for key, name in rate_cols:
            row += [_pct(h, key, name), _pct(b, key, name)]
        if na is not None:
            row += [f"{_pct(h, 'nonanswer_rate', na, ci=False)} / "
                    f"{_pct(b, 'nonanswer_rate', na, ci=False)}"]
        n_all = sum(x["n"] for x in pooled) or 1
        eos = sum((x.get("eos_rate,none") or 0) * x["n"] for x in pooled) / n_all
        lim = sum((x.get("length_rate,none") or 0) * x["n"] for x in pooled) / n_all
        toks = sum((x.get("mean_tokens,none") or 0) * x["n"] for x in pooled) / n_all
        row += [_num(h.get("ppl,none")), _num(b.get("ppl,none")), f"{100 * eos:.0f}%",
                f"{100 * lim:.0f}%", f"{toks:.1f}", _num(s["speed"]["tokens_per_s"], ".1f"),
                _num(s["speed"]["latency_s_p50"])]
        rows.append(row)
    lines += _table(header, rows)
    lines += ["## Per data set", ""]
    header = ["data set", "method", "n"] + [f"{k} ({n})" for k, n in rate_cols] + [
        "PPL", "EOS", "limit", "mean tokens", "tokens/s"]
    rows = []
    for m in res["results"].values():
        rows.append([m["dataset"], f"`{m['method']}`", m["n"],
                     *(_pct(m, k, n) for k, n in rate_cols), _num(m.get("ppl,none")),
                     _pct(m, "eos_rate", "none", ci=False),
                     _pct(m, "length_rate", "none", ci=False),
                     _num(m.get("mean_tokens,none"), ".1f"),
                     _num(m.get("tokens_per_s,none"), ".1f")])
    lines += _table(header, rows)
    if res["categories"] and rate_cols:
        key, name = rate_cols[0]
        lines += [f"## Per category ({key}, judge {name})", ""]
        by_ds: dict[str, dict[str, dict]] = {}
        for task, cats in res["categories"].items():
            d, meth = res["results"][task]["dataset"], res["results"][task]["method"]
            by_ds.setdefault(d, {})[meth] = cats
        for d, per_method in by_ds.items():
            meths = list(per_method)
            cats = sorted({c for v in per_method.values() for c in v})
            rows = [[c, max(per_method[mm].get(c, {}).get("n", 0) for mm in meths),
                     *(_pct(per_method[mm].get(c, {}), key, name) for mm in meths)]
                    for c in cats]
            lines += [f"### {d}", ""] + _table(["category", "n", *(f"`{mm}`" for mm in meths)],
                                              rows)
    lines += ["Chart: [refusal.png](refusal.png) · examples: [examples.md](examples.md)", ""]
    return "\n".join(lines)


def _judge_text(j: dict) -> str:
    if j.get("type") == "keyword":
        return "phrase lists " + "+".join(j["lists"]) + (" + extra" if j.get("extra") else "")
    return f"{j.get('kind')} classifier `{j.get('path')}`, positive `{j.get('positive')}`"


def render_examples(records: Sequence[dict], verdicts: dict[str, dict[str, dict]],
                    n: int = 3, max_chars: int = 700) -> str:
    """``examples.md``: the same first ``n`` items of each label for every method."""
    lines = ["# Example generations", ""]
    first_method = records[0]["method"] if records else None
    picks = []
    for lab in LABEL_ORDER:
        items = [(r["dataset"], r["item_id"]) for r in records
                 if r["method"] == first_method and _label(r) == lab]
        picks += items[:n]
    by_id = {(r["method"], r["dataset"], r["item_id"]): r for r in records}
    for meth in dict.fromkeys(r["method"] for r in records):
        lines += [f"## `{meth}`", ""]
        for d, i in picks:
            r = by_id.get((meth, d, i))
            if r is None:
                continue
            judged = ", ".join(f"{name}: {'yes' if v[r['key']]['flag'] else 'no'}"
                               + (f" ({v[r['key']]['detail']})" if v[r["key"]]["detail"] else "")
                               for name, v in verdicts.items())
            text = r["response"] if len(r["response"]) <= max_chars else \
                r["response"][:max_chars] + " …"
            lines += [f"### {d} / {i} ({_label(r)})", "",
                      "> " + r["prompt"].replace("\n", "\n> "), "",
                      "````text", text.replace("````", "```\u200b`"), "````", "",
                      f"finish: {r['finish_reason']}, {r['new_tokens']} tokens; flagged — "
                      f"{judged}", ""]
    return "\n".join(lines)


# -- chart ---------------------------------------------------------------------------------
def plot_refusal(res: dict, path: str | Path) -> Path:
    """Harmful refusal (y) against benign refusal (x) per method, with 95% Wilson intervals;
    one panel per refusal judge (bars when only one label was evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = [n for n, j in res["judges"].items() if j["metric"] == "refusal"] or \
        list(res["judges"])
    fig, axes = plt.subplots(1, max(1, len(judges)), figsize=(5.5 * max(1, len(judges)), 4.6),
                             squeeze=False)
    for ax, name in zip(axes[0], judges, strict=False):
        key = f"{res['judges'][name]['metric']}_rate"
        pts = []
        for meth, s in res["summary"].items():
            h, b = s.get("harmful", {}), s.get("benign", {})
            pts.append((meth, h.get(f"{key},{name}"), h.get(f"{key}_ci95,{name}"),
                        b.get(f"{key},{name}"), b.get(f"{key}_ci95,{name}")))
        both = all(p[1] is not None and p[3] is not None for p in pts)
        if both:
            markers = "osD^vP*X"
            for i, (meth, y, yci, x, xci) in enumerate(pts):
                ax.errorbar(100 * x, 100 * y, xerr=[[100 * (x - xci[0])], [100 * (xci[1] - x)]],
                            yerr=[[100 * (y - yci[0])], [100 * (yci[1] - y)]],
                            fmt=markers[i % len(markers)], capsize=4, alpha=0.8, label=meth)
            what = key.replace("_", " ")
            ax.set_xlabel(f"benign {what} (over-refusal), % — lower is better")
            ax.set_ylabel(f"harmful {what}, % — higher is better")
            ax.set_xlim(-5, 105)
            ax.set_ylim(-5, 105)
            ax.legend(fontsize=7, loc="lower right")
        else:
            bars = [(f"{meth} ({lab})", v, ci) for meth, y, yci, x, xci in pts
                    for lab, v, ci in (("harmful", y, yci), ("benign", x, xci)) if v is not None]
            for i, (_, v, ci) in enumerate(bars):
                ax.bar(i, 100 * v, yerr=[[100 * (v - ci[0])], [100 * (ci[1] - v)]], capsize=4)
            ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=30, fontsize=8)
            ax.set_ylabel(f"{key}, %")
            ax.set_ylim(0, 105)
        ax.set_title(f"judge: {name}")
        ax.grid(alpha=0.3)
    title = f"{res['config'].get('model')}: refusal with 95% Wilson intervals"
    fig.suptitle(textwrap.fill(title, 70), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(records: Sequence[dict], verdicts: dict[str, dict[str, dict]],
                  judges: Sequence[Judge], ppl: dict[str, dict] | None, config: dict,
                  out_dir: str | Path, n_examples: int = 3) -> dict[str, Path]:
    """Write results.json, results.md, refusal.png and examples.md into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = build_results(records, verdicts, judges, ppl, config)
    paths = {"json": out / "results.json", "markdown": out / "results.md",
             "chart": out / "refusal.png", "examples": out / "examples.md"}
    paths["json"].write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")
    paths["markdown"].write_text(render_markdown(res), encoding="utf-8")
    paths["examples"].write_text(render_examples(records, verdicts, n_examples),
                                 encoding="utf-8")
    plot_refusal(res, paths["chart"])
    return paths
