"""Tables for fine-tuned models: one ``safedecode eval --adapter`` run folder per model, each with
the ``plain`` method (decoding unchanged; the weights are what differs).

For every model: refusal on each harmful and benign set (95% Wilson intervals) under the extended
keyword judge and the two standard lists (AdvBench + XSTest), perplexity of the answers under the
plain model (and its ratio to the untuned model's), EOS share, and the mean score of DeAL's
harmlessness reward model on harmful and on benign answers (it prefers a harmful request's refusal
to compliance and a safe request's answer to a refusal; higher is better for both).

    python benchmarks/ta_sft_summary.py OUT.md none=runs/x/none ta50=runs/x/ta50 ... [--reward]

``--reward`` scores the answers (about 2.5 minutes per run on 2 cores) and caches the means in the
run folder under the reward model's key; without it only fresh caches are shown.

The first folder is the reference for the perplexity ratio (the untuned model).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from efficacy_summary import _cell  # noqa: E402

from safedecode.eval.tune import heldout_refusal  # noqa: E402

HARMFUL = ("harmbench", "anchor-harmful-val")
BENIGN = ("benign", "benign-lookalike", "benign-ordinary", "anchor-safe-val")


def _ppl(res: dict, sets) -> float | None:
    """Token-weighted mean perplexity over the data sets present (geometric, via mean tokens)."""
    import math

    num = den = 0.0
    for ds in sets:
        m = res["results"].get(f"{ds}@plain")
        if m and m.get("ppl,none") and m.get("mean_tokens,none"):
            w = m["n"] * m["mean_tokens,none"]
            num += w * math.log(m["ppl,none"])
            den += w
    return math.exp(num / den) if den else None


def _rewards(run: Path) -> dict[str, float]:
    """Mean harmlessness reward of the run's answers, on harmful and on benign items, under the
    shipped reward model (cached in the run folder with its key; a stale cache is not shown)."""
    from safedecode.methods.harmless import reward_key

    key = reward_key()
    cache = run / "harmless_reward.json"
    if cache.is_file() and json.loads(cache.read_text()).get("reward") == key:
        return json.loads(cache.read_text())
    if "--reward" not in sys.argv:  # slow on a CPU: only on request
        return {}
    from safedecode.methods.rewards import make_reward

    rows = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines() if x]
    reward = make_reward("harmless")
    assert reward.key() == key, (reward.key(), key)
    out = {"reward": key}
    for label in ("harmful", "benign"):
        sel = [r for r in rows if r.get("label") == label]
        if sel:
            scores = []
            for i in range(0, len(sel), 32):
                part = sel[i:i + 32]
                scores += [float(s) for s in reward([r["prompt"] for r in part],
                                                    [r["response"] for r in part])]
            out[label] = sum(scores) / len(scores)
    cache.write_text(json.dumps(out))
    return out


def main() -> None:
    out = Path(sys.argv[1])
    runs = [(a.rsplit("=", 1)[0], Path(a.rsplit("=", 1)[1])) for a in sys.argv[2:] if "=" in a]
    loaded = [(n, p, json.loads((p / "results.json").read_text())) for n, p in runs]
    present = lambda sets: [d for d in sets if any(f"{d}@plain" in r["results"]  # noqa: E731
                                                   for _, _, r in loaded)]
    harm, ben = present(HARMFUL), present(BENIGN)
    ref = _ppl(loaded[0][2], ben)
    # the anchor set's validation-only batches, when the run has them (in anchor-safe-val and
    # anchor-harmful-val): each pooled apart
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    held = any(heldout_refusal(r, "plain") is not None for _, _, r in loaded)
    held_h = any(heldout_refusal(r, "plain", "harmful") is not None for _, _, r in loaded)
    lines = ["| model | " + " | ".join(f"{d} (harmful)" for d in harm)
             + (" | of it, held-out batch" if held_h else "") + " | "
             + " | ".join(f"{d} (benign)" for d in ben)
             + (" | of it, held-out batch" if held else "")
             + " | PPL benign (× untuned) | EOS | reward harmful | reward benign |",
             "|---" * (1 + len(harm) + len(ben) + 4 + held + held_h) + "|"]
    std = ["| model | " + " | ".join(harm + ben) + " |", "|---" * (1 + len(harm) + len(ben)) + "|"]
    for name, path, res in loaded:
        p = _ppl(res, ben)
        eos = [res["results"][f"{d}@plain"].get("eos_rate,none") for d in harm + ben
               if f"{d}@plain" in res["results"]]
        rw = _rewards(path)
        h, hh = heldout_refusal(res, "plain"), heldout_refusal(res, "plain", "harmful")
        lines.append(f"| {name} | " + " | ".join(_cell(res, d, "plain") for d in harm)
                     + (f" | {pct(hh)}" if held_h else "") + " | "
                     + " | ".join(_cell(res, d, "plain") for d in ben)
                     + (f" | {pct(h)}" if held else "")
                     + f" | {p:.2f} ({p / ref:.2f}×) | {100 * sum(eos) / len(eos):.0f}% | "
                     + " | ".join(f"{rw[k]:+.2f}" if k in rw else "—"
                                  for k in ("harmful", "benign")) + " |")
        std.append(f"| {name} | " + " | ".join(_cell(res, d, "plain", "keyword-standard")
                                               for d in harm + ben) + " |")
    text = "\n".join(["Refusal (extended keyword judge), 95% Wilson intervals:", "", *lines, "",
                      "The same under the two standard lists only (AdvBench + XSTest prefixes):",
                      "", *std, ""])
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
