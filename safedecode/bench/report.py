"""Results on disk: JSON + markdown + PNG plots, and the README's generated performance section."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from safedecode.bench.machine import BenchError, describe, git_commit, machine_line

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
DEVICES = ("cpu", "cuda")
GEN_LABELS = {"hf_plain": "transformers `generate` (1 branch)",
              "hf_cfg": "transformers CFG (2 branches)", "naive_k2": "naive K=2",
              "sd_k2_noprefix": "safedecode K=2, no prefix cache",
              "sd_k2_torchgemm": "safedecode K=2, torch GEMM", "sd_k2": "safedecode K=2"}
# The published targets: (key, threshold).
OP_TARGET, PLAIN_TARGET, NAIVE_TARGET, PREFILL_TARGET, PREFILL_B = 10.0, 1.0, 2.0, 3.0, 32
BW_TARGET, BW_MIN_B = 0.5, 8  # fraction of the copy bandwidth the op reads logits at, B >= 8


def stamp(result: dict, *, device: str, quick: bool, command: str, argv: list[str]) -> dict:
    """The run header every result carries: command, machine, time, commit."""
    machine = describe(device)
    machine["torch_threads"] = result.get("threads", machine["torch_threads"])  # as run
    head = {"device": device, "quick": quick, "command": command, "argv": argv,
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "machine": machine}
    return {"benchmark": result["benchmark"], **head,
            **{k: v for k, v in result.items() if k != "benchmark"}}


def write_result(result: dict, out: Path) -> list[Path]:
    """Write ``<benchmark>_<device>.{json,md,png}`` under ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{result['benchmark']}_{result['device']}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    render(result, stem)
    return paths


def write_script_result(out: Path, name: str, result: dict, script: str, markdown,
                        argv: list[str], device: str = "cpu") -> Path:
    """A benchmark script's ``<name>.json`` and ``<name>.md`` in ``out``: ``result`` gets its
    reproducing ``command`` (``python <script> <argv>``), the markdown is
    ``markdown(result, command, machine line)``. Returns the markdown's path."""
    import shlex

    command = shlex.join(["python", script, *argv])
    result["command"] = command
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = out / f"{name}.md"
    md.write_text(markdown(result, command, machine_line(describe(device))))
    print(f"wrote {md}")
    return md


def render(result: dict, stem: Path) -> None:
    """(Re)write the markdown and the plot of one result next to its JSON."""
    if result["benchmark"] == "ops":
        stem.with_suffix(".md").write_text(ops_markdown(result))
        plot_ops(result, stem.with_suffix(".png"))
    elif result["benchmark"] == "generate":
        stem.with_suffix(".md").write_text(generate_markdown(result))
        plot_generate(result, stem.with_suffix(".png"))
    else:
        raise BenchError(f"{stem}.json: unknown benchmark {result['benchmark']!r}")


def load(path: Path) -> dict:
    """Read a result JSON, with a clear error for a missing or malformed file."""
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path}: cannot read a benchmark result ({exc})") from exc
    if not isinstance(res, dict) or "rows" not in res or "benchmark" not in res:
        raise BenchError(f"{path}: not a benchmark result (no 'benchmark' / 'rows')")
    return res


# ---------------------------------------------------------------------------------- markdown --

def _header(r: dict, title: str) -> list[str]:
    when = ", ".join(x for x in (r.get("timestamp"), r.get("git_commit") and
                                 f"commit {r['git_commit'][:12]}") if x)
    lines = [f"# {title} ({r['device']}{', quick run' if r.get('quick') else ''})", "",
             f"`{r['command']}`" + (f" ({when})" if when else ""), "",
             f"Machine: {machine_line(r['machine'])}."]
    if r.get("copy_bandwidth_GBps"):
        lines[-1] += (f" Copy bandwidth measured in the same run: "
                      f"**{r['copy_bandwidth_GBps']:.1f} GB/s** (read + write).")
    return lines + [""]


def op_impls(r: dict) -> list[str]:
    """Contenders timed in an op result, fused first."""
    names = [k[:-3] for k in r["rows"][0] if k.endswith("_us")]
    return sorted(names, key=lambda n: n != "fused")  # stable: the run's order otherwise


def ops_markdown(r: dict) -> str:
    """The op result as a markdown page."""
    impls = op_impls(r)
    others = [n for n in impls if n != "fused"]
    fb = r["rows"][0].get("fused_backend", "fused")
    p = r.get("params", {})
    lines = _header(r, "Op benchmark") + [
        f"K = 2, weights [1, -{p.get('alpha', 0.5)}], temperature {p.get('temperature')}, top-k "
        f"{p.get('top_k')}, top-p {p.get('top_p')}; whole calls, median (min-max) us. `fused` = "
        f"{fb}; `naive` = reference backend (PyTorch); `hf` = log_softmax + transformers warpers "
        "+ multinomial" + ("; `flashinfer` = PyTorch contrast + FlashInfer "
                           "`top_k_top_p_sampling_from_logits`" if "flashinfer" in impls else "")
        + ". GB/s = bytes of logits read / fused time.", "",
        "| V | B | beta | dtype | " + " | ".join(f"{n} us" for n in impls) + " | "
        + " | ".join(f"x {n}" for n in others) + " | fused GB/s | % copy bw |",
        "|" + "---:|" * (4 + len(impls) + len(others) + 2)]
    for x in r["rows"]:
        cells = [str(x["V"]), str(x["B"]), str(x["beta"]), x.get("dtype", "float32")]
        for n in impls:
            cells.append(f"{x[f'{n}_us']:.1f} ({x[f'{n}_us_min']:.1f}-{x[f'{n}_us_max']:.1f})")
        cells += [f"{x[f'speedup_vs_{n}']:.1f}" for n in others]
        cells += [f"{x['fused_GBps']:.2f}", f"{100 * x['fused_frac_copy_bw']:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def weight_gbps(r: dict, row: dict, name: str) -> float:
    """Model-weight bandwidth of a contender: weight bytes x decoding steps per second."""
    if f"{name}_weight_GBps" in row:
        return row[f"{name}_weight_GBps"]
    return r["weight_MB"] * 2**20 * row[f"{name}_tok_s"] / row["B"] / 1e9


def gen_methods(r: dict) -> list[str]:
    return [m for m in GEN_LABELS if f"{m}_tok_s" in r["rows"][0]]


def generate_markdown(r: dict) -> str:
    """The generation result as a markdown page."""
    ms = gen_methods(r)
    n_new = r["rows"][0].get("new_tokens", 128)
    lines = _header(r, f"Generation benchmark, {r['model']}") + [
        f"Weights: {r['weight_MB']:.0f} MB. Tokens/s over whole calls (prefill included), "
        f"{n_new} new tokens per request, EOS ignored; K = 2 is ACD-style contrast with text "
        "prompts; `hf_cfg` is transformers' `guidance_scale` + `negative_prompt_ids`. Weight "
        "GB/s = weight bytes x decoding steps/s (gpt-fast's figure).", "",
        "| B | mode | " + " | ".join(ms) + " | sd/hf plain | sd/naive | sd/hf cfg "
        "| weight GB/s (hf plain / sd) | peak MB (hf plain / sd) |",
        "|---:|---|" + "---:|" * (len(ms) + 5)]
    for x in r["rows"]:
        cells = [str(x["B"]), x["mode"]] + [f"{x[f'{m}_tok_s']:.1f}" for m in ms]
        cells += [f"{x['sd_k2_vs_hf_plain']:.2f}", f"{x['sd_k2_vs_naive_k2']:.2f}",
                  f"{x['sd_k2_vs_hf_cfg']:.2f}",
                  f"{weight_gbps(r, x, 'hf_plain'):.1f} / {weight_gbps(r, x, 'sd_k2'):.1f}",
                  f"{x['hf_plain_peak_MB']:.0f} / {x['sd_k2_peak_MB']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if "sd_k2_s_min" in r["rows"][0]:
        lines += ["", "Seconds per call, median (min-max):", "",
                  "| B | mode | " + " | ".join(ms) + " |", "|---:|---|" + "---:|" * len(ms)]
        for x in r["rows"]:
            lines.append(f"| {x['B']} | {x['mode']} | " + " | ".join(
                f"{x[f'{m}_s']:.2f} ({x[f'{m}_s_min']:.2f}-{x[f'{m}_s_max']:.2f})"
                for m in ms) + " |")
    p = r["prefill"]
    lines += ["", f"Prefill of {p['B']} requests, K = 2: shared prefixes {p['shared_s']:.3f} s, "
              f"unshared {p['unshared_s']:.3f} s: **{p['speedup']:.2f}x**.", ""]
    lines += [_early_line(r), ""]
    c = r.get("compiled")
    if c:
        lines += [f"`SafeDecoder(compile=True)`, B = 1 greedy, K = 2: "
                  f"{c['sd_k2_compiled_tok_s']:.1f} tok/s vs eager {c['sd_k2_tok_s']:.1f} and "
                  f"transformers `generate` (K = 1) {c['hf_plain_tok_s']:.1f}: "
                  f"**{c['compiled_vs_hf_plain']:.2f}x** plain `generate`, "
                  f"{c['compiled_vs_eager']:.2f}x eager (first call, compiling: "
                  f"{c['first_call_s']:.0f} s).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- plots --

def _figure(ncols: int, width: float = 6.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.2), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _plain_ticks(ax, xs: list[float]) -> None:
    """Ticks at the measured x values and plain numbers on both log axes."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xticks(xs, [f"{x / 1000:.0f}k" if x >= 1000 else f"{x:g}" for x in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}"
                                               if f"{y:.1e}"[0] in "25" else ""))


def plot_ops(r: dict, path: Path) -> None:
    """Speedup of the fused op vs batch size and vs vocabulary size (largest beta)."""
    beta = max(x["beta"] for x in r["rows"])
    rows = [x for x in r["rows"] if x["beta"] == beta]
    others = [n for n in op_impls(r) if n not in ("fused",)]
    fig, (ax_b, ax_v) = _figure(2)
    styles = {"naive": "-", "hf": "--", "flashinfer": ":", "triton": "-."}
    for ax, key, series, label in ((ax_b, "B", "V", "batch size B"),
                                   (ax_v, "V", "B", "vocabulary size V")):
        for s in sorted({x[series] for x in rows}):
            pts = sorted((x[key], x) for x in rows if x[series] == s)
            for j, n in enumerate(others):
                line = ax.plot([p[0] for p in pts], [p[1][f"speedup_vs_{n}"] for p in pts],
                               styles.get(n, "-"), marker="os^v"[j % 4],
                               label=f"{series}={s}, vs {n}")
                if j == 0:
                    color = line[0].get_color()
                else:
                    line[0].set_color(color)
        ax.axhline(OP_TARGET, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_ticks(ax, sorted({x[key] for x in rows}))
        ax.set_xlabel(label)
        ax.set_ylabel("speedup of the fused op (x)")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"Fused contrastive sampling ({r['rows'][0].get('fused_backend', 'fused')}), "
                 f"K=2, beta={beta}, {r['device']}: {r['machine']['cpu']}", fontsize=9)
    fig.savefig(path, dpi=110)


def plot_generate(r: dict, path: Path) -> None:
    """Tokens/s per method, grouped by (batch size, mode)."""
    ms = gen_methods(r)
    fig, (ax,) = _figure(1, width=9.0)
    n, width = len(ms), 0.8 / len(ms)
    for j, m in enumerate(ms):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(r["rows"]))]
        ax.bar(xs, [x[f"{m}_tok_s"] for x in r["rows"]], width, label=GEN_LABELS[m])
    ax.set_xticks(range(len(r["rows"])),
                  [f"B={x['B']}\n{x['mode']}" for x in r["rows"]])
    ax.set_ylabel("tokens/s (higher is better)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"Generation, {r['model']}, {r['rows'][0].get('new_tokens')} new tokens, "
                 f"{r['device']}: {r['machine']['cpu']}", fontsize=9)
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------- targets --

def _x(v: float, fmt: str) -> str:
    return fmt.format(v) + "×"


def _range(vals: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = _x(min(vals), fmt), _x(max(vals), fmt)
    return lo if lo == hi else f"{lo}–{hi}"


def _verdict(name: str, vals: list[tuple[float, str]], threshold: float, what: str,
             fmt: str = "{:.2f}") -> dict:
    """A target met when every case reaches ``threshold``; the text gives the measured range."""
    nums = [v for v, _ in vals]
    below = [(v, d) for v, d in vals if v < threshold]
    met = not below
    text = f"{name}: **{'met' if met else 'not met'}**: {what} {_range(nums, fmt)}"
    if below:
        low = min(below)
        text += (f"; below {threshold:g}× in {len(below)} of {len(vals)} cases (lowest "
                 f"{_x(low[0], fmt)} at {low[1]})")
    else:
        text += {1: " in the one case", 2: " in both cases"}.get(len(vals),
                                                                 f" in all {len(vals)} cases")
    return {"target": name, "met": met, "min": min(nums), "max": max(nums), "text": text + "."}


def _bandwidth_verdict(ops: dict) -> dict:
    """The op reads logits at >= BW_TARGET of the copy bandwidth for every case with B >= 8."""
    name = f"Op ≥ {100 * BW_TARGET:.0f} % of the measured copy bandwidth at B ≥ {BW_MIN_B}"
    big = [x for x in ops["rows"] if x["B"] >= BW_MIN_B]
    if not big:
        return {"target": name, "met": None, "min": 0.0, "max": 0.0,
                "text": f"{name}: **not assessed** by this run (no case with B ≥ {BW_MIN_B})."}
    pct = [100 * x["fused_frac_copy_bw"] for x in big]
    below = [x for x in big if x["fused_frac_copy_bw"] < BW_TARGET]
    text = (f"{name}: **{'not met' if below else 'met'}**: {min(pct):.0f}–{max(pct):.0f} % of "
            f"{ops['copy_bandwidth_GBps']:.1f} GB/s")
    if below:
        low = min(below, key=lambda x: x["fused_frac_copy_bw"])
        text += (f"; below in {len(below)} of {len(big)} cases (lowest "
                 f"{100 * low['fused_frac_copy_bw']:.0f} % at V = {low['V']}, B = {low['B']}, "
                 f"β = {low['beta']})")
    else:
        text += f" in all {len(big)} cases"
    return {"target": name, "met": not below, "min": min(pct), "max": max(pct),
            "text": text + ". One step's logits stay in the last-level cache between calls (as "
            "they are right after the lm_head writes them), hence figures above 100 %."}


def targets(ops: dict | None, gen: dict | None) -> list[dict]:
    """Met / not met for each published target, computed from the numbers."""
    out = []
    if ops:
        vals = [(x["speedup_vs_naive"], f"V = {x['V']}, B = {x['B']}, β = {x['beta']}")
                for x in ops["rows"]]
        fb = ops["rows"][0].get("fused_backend", "fused")
        out.append(_verdict(f"Op ≥ {OP_TARGET:g}× the naive pipeline", vals, OP_TARGET,
                            f"the fused {fb} op is faster than the reference pipeline by",
                            "{:.0f}"))
        out.append(_bandwidth_verdict(ops))
    if gen:
        desc = [f"B = {x['B']} {x['mode']}" for x in gen["rows"]]
        for key, thr, label in (
                ("sd_k2_vs_hf_plain", PLAIN_TARGET, "plain transformers `generate`"),
                ("sd_k2_vs_naive_k2", NAIVE_TARGET, "the naive two-pass contrast")):
            vals = [(x[key], d) for x, d in zip(gen["rows"], desc, strict=True)]
            out.append(_verdict(f"K = 2 generation ≥ {thr:.1f}× {label}", vals, thr,
                                "safedecode K = 2 runs at"))
        p = gen["prefill"]
        name = f"Prefix sharing ≥ {PREFILL_TARGET:g}× faster prefill at B = {PREFILL_B}"
        if p["B"] != PREFILL_B:
            out.append({"target": name, "met": None, "min": p["speedup"], "max": p["speedup"],
                        "text": f"{name}: **not assessed** by this run: it prefilled B = {p['B']} "
                                f"({p['speedup']:.2f}× faster with shared prefixes)."})
        else:
            met = p["speedup"] >= PREFILL_TARGET
            out.append({"target": name, "met": met, "min": p["speedup"], "max": p["speedup"],
                        "text": f"{name}: **{'met' if met else 'not met'}**: "
                                f"{p['speedup']:.2f}× ({p['shared_s']:.2f} s with shared "
                                f"prefixes vs {p['unshared_s']:.2f} s without)."})
    return out


# ------------------------------------------------------------------------------------ README --

def find_results(results: Path) -> dict[str, dict[str, dict]]:
    """{device: {"ops": result, "generate": result}} for the result JSONs under ``results``."""
    found: dict[str, dict[str, dict]] = {}
    for dev in DEVICES:
        for bench in ("ops", "generate"):
            path = results / f"{bench}_{dev}.json"
            if path.is_file():
                found.setdefault(dev, {})[bench] = load(path)
    if not found:
        raise BenchError(f"--out: no ops_<device>.json / generate_<device>.json in {results}; "
                         "run `safedecode bench all` first")
    return found


def _ops_table(r: dict) -> list[str]:
    beta = max(x["beta"] for x in r["rows"])
    others = [n for n in op_impls(r) if n != "fused"]
    lines = [f"| V | B | fused ({r['rows'][0].get('fused_backend')}) µs | "
             + " | ".join(f"× {n}" for n in others) + " | GB/s (% of copy) |",
             "|" + "---:|" * (3 + len(others) + 1)]
    for x in r["rows"]:
        if x["beta"] == beta:
            lines.append(f"| {x['V']} | {x['B']} | {x['fused_us']:.0f} | " + " | ".join(
                f"{x[f'speedup_vs_{n}']:.1f}" for n in others)
                + f" | {x['fused_GBps']:.1f} ({100 * x['fused_frac_copy_bw']:.0f} %) |")
    return lines


def _gen_table(r: dict) -> list[str]:
    ms = gen_methods(r)
    lines = ["| B | mode | " + " | ".join(GEN_LABELS[m] for m in ms) + " |",
             "|---:|---|" + "---:|" * len(ms)]
    for x in r["rows"]:
        cells = [f"{x[f'{m}_tok_s']:.1f}" for m in ms]
        cells[-1] = (f"**{x['sd_k2_tok_s']:.1f}** ({x['sd_k2_vs_hf_plain']:.2f}× plain, "
                     f"{x['sd_k2_vs_naive_k2']:.2f}× naive)")
        lines.append(f"| {x['B']} | {x['mode']} | " + " | ".join(cells) + " |")
    return lines


def _link(path: Path, readme_dir: Path) -> str:
    return Path(os.path.relpath(path, readme_dir)).as_posix()


def _span(vals: list[float], fmt: str) -> str:
    lo, hi = fmt.format(min(vals)), fmt.format(max(vals))
    return lo if lo == hi else f"{lo}–{hi}"


def _ops_text(ops: dict, rel: str, dev: str) -> list[str]:
    rows, p = ops["rows"], ops.get("params", {})
    big = [x for x in rows if x["B"] >= 8] or rows
    vs = sorted({x["V"] for x in rows})
    bs = ", ".join(str(b) for b in sorted({x["B"] for x in rows}))
    betas = ", ".join(str(b) for b in sorted({x["beta"] for x in rows}))
    naive = _range([x["speedup_vs_naive"] for x in rows], "{:.0f}")
    text = (f"**Ops** (`{ops['command']}`): one decoding step, K = 2, temperature "
            f"{p.get('temperature')}, top-k {p.get('top_k')}, top-p {p.get('top_p')}, V from "
            f"{vs[0]} to {vs[-1]}, B ∈ {{{bs}}}, β ∈ {{{betas}}}; medians of whole calls. The "
            f"fused op is **{naive} faster** than the naive PyTorch pipeline and "
            f"{_range([x['speedup_vs_hf'] for x in rows], '{:.0f}')} faster than log_softmax + "
            "transformers' warpers + multinomial")
    if "speedup_vs_flashinfer" in rows[0]:
        text += (f", {_range([x['speedup_vs_flashinfer'] for x in rows], '{:.1f}')} vs PyTorch "
                 "contrast + FlashInfer's sampler")
    text += (f". It reads logits at {_span([x['fused_GBps'] for x in big], '{:.1f}')} GB/s at "
             f"B ≥ 8, {_span([100 * x['fused_frac_copy_bw'] for x in big], '{:.0f}')} % of the "
             f"{ops['copy_bandwidth_GBps']:.1f} GB/s copy bandwidth measured in the same run "
             f"(table: β = {max(x['beta'] for x in rows)}).")
    return ["", text, "", *_ops_table(ops), "", f"![op speedup vs B and V]({rel}/ops_{dev}.png)"]


def _early_line(r: dict) -> str:
    """The early-finish sentence (results before the request-level engine: compaction)."""
    if "early_finish" in r:
        e = r["early_finish"]
        return (f"Early finish (4 of 8 requests stop after a few tokens and free their slots): "
                f"{e['mixed_s']:.2f} s vs the 4 long requests alone {e['long_only_s']:.2f} s "
                f"(x{e['overhead']:.2f}).")
    c = r["compaction"]
    return (f"Compaction (4 of 8 requests stop early): dropping finished rows "
            f"{c['compact_s']:.2f} s vs keeping them masked {c['masked_s']:.2f} s "
            f"(x{c['speedup']:.2f}).")


def _gen_text(gen: dict, rel: str, dev: str) -> list[str]:
    sd_bw = [weight_gbps(gen, x, "sd_k2") for x in gen["rows"]]
    text = (f"**Generation** (`{gen['command']}`): {gen['model']}, "
            f"{gen['rows'][0].get('new_tokens')} new tokens per request (EOS ignored), tokens/s "
            f"of whole calls, prefill included. safedecode K = 2 reads the model weights at "
            f"{_span(sd_bw, '{:.1f}')} GB/s (weight bytes × steps/s)"
            + (f", copy bandwidth {gen['copy_bandwidth_GBps']:.1f} GB/s"
               if gen.get("copy_bandwidth_GBps") else "")
            + ". " + _early_line(gen) + _gemm_note(gen))
    return ["", text, "", *_gen_table(gen), "", f"![tokens/s per method]({rel}/generate_{dev}.png)"]


def _gemm_note(gen: dict) -> str:
    """What the small-M GEMM contributes, when the run has the torch-GEMM contender."""
    rows = gen["rows"]
    if "sd_k2_torchgemm_tok_s" not in rows[0]:
        return ""
    if gen.get("config", {}).get("device", "cpu") != "cpu":  # the small-M GEMM is CPU-only
        return (" (Column \"torch GEMM\" is the same engine as safedecode K=2 here: the small-M "
                "GEMM runs on CPUs only.)")
    torch_vs_plain = [x["sd_k2_torchgemm_tok_s"] / x["hf_plain_tok_s"] for x in rows]
    gain = [x["sd_k2_tok_s"] / x["sd_k2_torchgemm_tok_s"] for x in rows]
    return (" The engine's small-M GEMM for the linear layers is worth "
            f"{_span(gain, '{:.2f}')}× (column \"torch GEMM\": the same engine on torch's "
            f"GEMM, {_span(torch_vs_plain, '{:.2f}')}× plain `generate`).")


def readme_section(results: Path, readme_dir: Path) -> str:
    """The README performance section (between the markers) from the results under ``results``."""
    found = find_results(results)
    rel = _link(results, readme_dir)
    lines = [START, "<!-- generated by `safedecode bench report` from the JSON results; edit "
             "safedecode/bench/report.py, not this text -->",
             f"## Performance (full tables in [`{rel}/`]({rel}/))", "",
             "Reproduce it in one command: `safedecode bench all` (`--quick`: a one-minute smoke "
             "run; `--device cuda`: the Triton and CUDA backends on a GPU; `--model PATH`: "
             "generation on another local model), then `safedecode "
             "bench report` rewrites this section from the JSON results. The same cases as "
             "pytest-benchmark tests: `pytest benchmarks/ --benchmark-only`. Every ratio is "
             "measured inside one run."]
    for dev, res in found.items():
        any_r = next(iter(res.values()))
        lines += ["", f"### {dev}: {machine_line(any_r['machine'])}"]
        if any(r.get("quick") for r in res.values()):
            lines += ["", "*Quick run: smoke-test figures, not the published numbers.*"]
        ops, gen = res.get("ops"), res.get("generate")
        if ops:
            lines += _ops_text(ops, rel, dev)
        if gen:
            lines += _gen_text(gen, rel, dev)
        lines += ["", "Targets:", ""] + [f"- {t['text']}" for t in targets(ops, gen)]
    return "\n".join(lines + ["", END])


def update_readme(readme: Path, results: Path) -> str:
    """Rewrite the text between the perf markers of ``readme``; returns the new section."""
    try:
        text = readme.read_text()
    except OSError as exc:
        raise BenchError(f"--readme: cannot read {readme} ({exc})") from exc
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise BenchError(f"--readme: {readme} has no '{START}' ... '{END}' section to rewrite")
    section = readme_section(results, readme.resolve().parent)
    readme.write_text(text[:i] + section + text[j + len(END):])
    return section
