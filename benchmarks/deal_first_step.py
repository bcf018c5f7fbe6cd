"""DeAL's first search step, traced: every candidate's ``log P``, reward ``h`` and score.

For the anchor **validation** items named on the command line (e.g. safe items DeAL refuses),
prints the first step's candidates (the candidate token and its lookahead) with ``log P`` under
the final (mixture) distribution, ``h`` and ``log P + λ·h``, then the answer. Diagnosis only:
it wraps ``deal._select`` to see the scores.

    python benchmarks/deal_first_step.py ADAPTER_DIR[,ADAPTER_DIR...] s042,s048 [LAM]
"""

from __future__ import annotations

import importlib
import sys

from safedecode.data import load_anchor
from safedecode.engine import SafeDecoder
from safedecode.eval.runner import parse_methods
from safedecode.models import load_model

SPEC = ("deal:chunk=8:lookahead=8:horizon=24:base=acd:k=4:propose=2:"
        "reward=[harmless:path={rm}]:lam={lam}:mix=0.25")
deal_mod = importlib.import_module("safedecode.methods.deal")
_select = deal_mod._select
_first = {"step": True}


def _traced(engine, cands, prompts, spec, finished, *rest):
    if _first["step"]:
        for i, cs in cands.items():
            texts, lps = [], []
            for c in cs:
                r = finished.get(c.id)
                texts.append(r.text if r else engine.text(c.id))
                lps.append(sum((r.logprobs if r else engine.logprobs(c.id))[:c.committed + 1]))
            for text, lp, h in zip(texts, lps, spec.reward([prompts[i]] * len(cs), texts),
                                   strict=True):
                print(f"   log P {lp:7.2f}  h {h:7.2f}  score {lp + spec.lam * h:7.2f}  "
                      f"{text[:70]!r}")
        _first["step"] = False
    return _select(engine, cands, prompts, spec, finished, *rest)


def main(rms: str, ids: str, lam: str = "0.5") -> None:
    deal_mod._select = _traced
    model, tok = load_model("default")
    items = {it["id"]: it for it in load_anchor(None, "val")}
    for rm in rms.split(","):
        dec = SafeDecoder(model, tok, parse_methods(SPEC.format(rm=rm, lam=lam))[0].build())
        for i in ids.split(","):
            _first["step"] = True
            print(f"== {rm} {i}: {items[i]['prompt'][:80]!r}")
            print("  ->", repr(dec.generate([items[i]["prompt"]], max_new_tokens=64)[0].text[:120]))


if __name__ == "__main__":
    main(*sys.argv[1:])
