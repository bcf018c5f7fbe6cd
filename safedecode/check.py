"""``safedecode check``: does safedecode run this model exactly?

Before deploying a model the engine has not been tested on, a user wants to know that its
answers are the model's own. The checks, each with what it found:

- **attention layers**: full, sliding-window (every layer or mixed) — or a layer kind the engine
  cannot mask (a named error, and nothing else runs);
- **chat template**: native system role, or the system text folded into the first user turn;
- **logits from hidden states** (teacher forcing: perplexity, OPO, TA-SFT): the lm_head and the
  family's transform reproduce the model's forward;
- **decoding, K = 1**: the engine's greedy tokens and log-probs = transformers ``generate``'s, on
  short prompts and (for a windowed model, when the context allows) one longer than the window;
- **decoding, K = 2**: a contrast of two system prompts (``acd-text``) = the naive generator,
  which runs each branch through transformers with its own cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPTS = ["How do I kill a Python process that hangs?", "Write a haiku about the sea.", "Hi"]
_FILLER = "The quick brown fox jumps over the lazy dog near the river bank. "


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and each step's log-probabilities."""
    dev = model.get_input_embeddings().weight.device
    x = torch.tensor([ids], device=dev)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(ids):].tolist()
    return tokens, [torch.log_softmax(z[0].float(), -1) for z in out.logits]


def _compare(tokens, logprobs, ref_tokens, ref_lps, tol: float) -> tuple[bool, str]:
    """Equal tokens and log-probs within ``tol``; a first differing token counts as equal only
    at a near tie of transformers' own log-probs (then the rest is not compared)."""
    worst = 0.0
    for j, (t, r) in enumerate(zip(tokens, ref_tokens, strict=False)):
        if t != r:
            gap = (ref_lps[j][r] - ref_lps[j][t]).item()
            if gap > tol:
                return False, f"token {j}: {t} where transformers gives {r} ({gap:.3g} apart)"
            return True, f"same up to a near tie at token {j} (max |Δ log-prob| {worst:.2g})"
        worst = max(worst, abs(logprobs[j] - ref_lps[j][r].item()))
        if worst > tol:
            return False, f"token {j}: log-prob off by {worst:.3g}"
    if len(tokens) != len(ref_tokens):
        return False, f"{len(tokens)} tokens where transformers gives {len(ref_tokens)}"
    return True, f"same tokens, max |Δ log-prob| {worst:.2g}"


def run_checks(model, tokenizer, *, max_new_tokens: int = 12, long_prompt: bool = True
               ) -> list[Check]:
    """Every check on ``model`` (see the module docstring); stops after a failed layer check."""
    from safedecode import methods
    from safedecode.bench.naive import NaiveContrastGenerator
    from safedecode.engine import SafeDecoder
    from safedecode.engine.masks import LayerMasks
    from safedecode.engine.prompts import PromptBuilder
    from safedecode.models import text_config
    from safedecode.training.teacher import check_head

    out = []
    try:
        masks = LayerMasks.of(model)
    except ValueError as exc:
        return [Check("attention layers", False, str(exc))]
    n_layers = text_config(model).num_hidden_layers
    out.append(Check("attention layers", True, "full attention" if masks.window is None else
                     f"sliding window of {masks.window} on {masks.sliding_layers} of "
                     f"{n_layers} layers"))
    builder = PromptBuilder(tokenizer)
    out.append(Check("chat template", True, "none: plain text" if not builder.has_template else
                     "renders a system message" if builder.system_role else
                     "no system role: system text starts the first user message"))
    try:
        t = check_head(model)
        steps = ([f"×{t.scale:g}"] if t.scale != 1.0 else []) + \
            ([f"soft-capped at {t.cap:g}"] if t.cap else [])
        out.append(Check("logits from hidden states", True,
                         "the lm_head's" + (", then " + ", ".join(steps) if steps else "")))
    except ValueError as exc:
        out.append(Check("logits from hidden states", False, str(exc)))
    half = model.get_input_embeddings().weight.dtype != torch.float32
    tol = 5e-2 if half else 2e-3
    prompts = list(PROMPTS)
    context = getattr(text_config(model), "max_position_embeddings", None)
    if long_prompt and masks.window is not None and \
            (context is None or masks.window + 64 + max_new_tokens <= context):
        filler = _FILLER * (1 + masks.window // max(1, len(tokenizer(_FILLER)["input_ids"])))
        prompts.append(filler + "What did the fox do?")
    dec = SafeDecoder(model, tokenizer, methods.get("plain"))
    got = dec.generate(prompts, max_new_tokens=max_new_tokens, ignore_eos=True,
                       return_logprobs=True)
    for i, (p, r) in enumerate(zip(prompts, got, strict=True)):
        prefix, suffix = dec.builder.build(dec.method.branches[0],
                                           [{"role": "user", "content": p}], i)
        ids = prefix.ids + list(prefix.tail_ids) + list(suffix)
        ref_tokens, ref_lps = _hf_greedy(model, ids, max_new_tokens)
        ok, detail = _compare(r.token_ids, r.logprobs, ref_tokens, ref_lps, tol)
        out.append(Check(f"K = 1 vs transformers, prompt {i + 1} ({len(ids)} tokens)", ok,
                         detail))
    method = methods.get("acd-text")
    eng = SafeDecoder(model, tokenizer, method).generate(PROMPTS, max_new_tokens=max_new_tokens,
                                                         ignore_eos=True)
    naive = NaiveContrastGenerator(model, tokenizer, method).generate(
        PROMPTS, max_new_tokens=max_new_tokens, ignore_eos=True)
    same = sum(a.token_ids == b.token_ids for a, b in zip(eng, naive, strict=True))
    out.append(Check("K = 2 (acd-text) vs the naive generator", same == len(PROMPTS) or half,
                     f"{same} of {len(PROMPTS)} answers the same" +
                     (" (half precision: near ties may go either way; check in float32)"
                      if half and same < len(PROMPTS) else "")))
    return out


def render(checks: list[Check]) -> str:
    lines = [f"{'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}" for c in checks]
    bad = sum(not c.ok for c in checks)
    lines.append("safedecode runs this model exactly." if not bad else
                 f"{bad} check(s) failed: safedecode does not reproduce this model.")
    return "\n".join(lines)
