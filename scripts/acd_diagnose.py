"""Why does ACD's contrast garble text? A per-token look at its greedy answers (issue 13).

ACD decodes ``s = lp_SP - alpha * lp_AP`` (plausibility mask from SP at ``beta``). For each answer
it writes on the anchor **validation** split, the answer is teacher-forced through SP and AP and
every chosen token is classified:

- *implausible*: SP alone gives it < 1% probability (the contrast picked a token that the anchor
  branch itself would almost never write: the source of high perplexity);
- *EOS overtaken*: SP's most likely next token is end-of-turn (SP would stop here) but the
  contrast chose another token (the answer keeps going after it should have ended).

    .venv/bin/python scripts/acd_diagnose.py --prompts FILE --alpha 0.5 --betas 0,0.1 \\
        --out benchmarks/results/acd_diagnosis.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from safedecode import methods
from safedecode.data import load_anchor
from safedecode.engine import SafeDecoder
from safedecode.engine.prompts import PromptBuilder
from safedecode.methods.acd import load_prompts
from safedecode.models import load_default
from safedecode.training.opo import Example, response_distributions


def diagnose(model, tok, prompts_file: str | None, alpha: float, beta: float,
             n_tokens: int) -> dict:
    pair = load_prompts(prompts_file, model=model)
    builder = PromptBuilder(tok)
    eos = tok.eos_token_id
    dec = SafeDecoder(model, tok, methods.ACD(pair, None, alpha, beta))
    out = {}
    for split in ("harmful", "safe"):
        qs = [x["prompt"] for x in load_anchor(split, "val")]
        res = []
        for i in range(0, len(qs), 16):
            res += dec.generate(qs[i:i + 16], max_new_tokens=n_tokens)
        exs = [Example(q, list(map(int, r.token_ids))) for q, r in zip(qs, res, strict=True)
               if r.token_ids]
        tot = implausible = overtaken = 0
        answers_overtaken = set()
        with torch.no_grad():
            for i in range(0, len(exs), 8):
                chunk = exs[i:i + 8]
                lp_sp, tgt, row = response_distributions(model, builder, pair.safeguard, chunk)
                lp_ap, _, _ = response_distributions(model, builder, pair.adversarial, chunk)
                p_chosen = lp_sp.gather(1, tgt[:, None])[:, 0].exp()
                implausible += int((p_chosen < 0.01).sum())
                over = (lp_sp.argmax(-1) == eos) & (tgt != eos)
                overtaken += int(over.sum())
                answers_overtaken.update((i + row[over]).tolist())
                tot += len(tgt)
        capped = sum(r.finish_reason == "length" for r in res)
        out[split] = {"answers": len(res), "tokens": tot, "implausible": implausible / tot,
                      "eos_overtaken": overtaken,
                      "answers_with_eos_overtaken": len(answers_overtaken),
                      "capped": capped, "example": res[0].text[:160]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default=None, help="ACD prompts file (default: the shipped)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--betas", default="0,0.1")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model, tok = load_default()
    lines = ["# ACD's contrast, token by token (anchor validation split)", "",
             f"Prompts: `{args.prompts or 'shipped'}`, alpha = {args.alpha}, greedy, "
             f"{args.max_new_tokens} new tokens. *Implausible*: the chosen token has < 1% "
             "probability under SP alone. *EOS overtaken*: SP's top token is end-of-turn but the "
             "contrast chose another.", "",
             "```bash", "python scripts/acd_diagnose.py --prompts "
             f"{args.prompts} --alpha {args.alpha} --betas {args.betas} "
             f"-n {args.max_new_tokens}", "```", "",
             "| beta | split | answers | tokens | implausible tokens | EOS overtaken (tokens / "
             "answers) | capped at the limit |", "|---|---|---:|---:|---:|---:|---:|"]
    for beta in (float(b) for b in args.betas.split(",")):
        d = diagnose(model, tok, args.prompts, args.alpha, beta, args.max_new_tokens)
        for split, r in d.items():
            lines.append(f"| {beta:g} | {split} | {r['answers']} | {r['tokens']} | "
                         f"{100 * r['implausible']:.1f}% | {r['eos_overtaken']} / "
                         f"{r['answers_with_eos_overtaken']} | {r['capped']} |")
            print(beta, split, r, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
