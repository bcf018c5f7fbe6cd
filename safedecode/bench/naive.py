"""The "naive contrast" generator: what the seed papers' code does, kept for tests and benchmarks.

K separate forward passes per step, each branch with its own transformers ``DynamicCache`` over
the whole prompt (no shared prefix), then the reference op on the stacked logits. No batching
across branches, no compaction, no static cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from safedecode.engine.branches import Method
from safedecode.engine.cache import cache_kwargs
from safedecode.engine.engine import GenerationResult
from safedecode.engine.prompts import Prompt, PromptBuilder, normalise_prompt
from safedecode.ops import contrastive_sample


class NaiveContrastGenerator:
    """K sequential forward passes per step over K caches (the baseline to beat)."""

    def __init__(self, model, tokenizer, method: Method, *, backend: str = "reference") -> None:
        self.model, self.tok, self.method, self.backend = model, tokenizer, method, backend
        self.builder = PromptBuilder(tokenizer)
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device

    def _branch_inputs(self, k: int, msgs) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt embeddings [B, T, d] and attention mask [B, T] of branch k."""
        br = self.method.branches[k]
        seqs = []
        for i, m in enumerate(msgs):
            prefix, suffix = self.builder.build(br, m, i)
            suf = self.embed(torch.tensor(suffix, dtype=torch.long, device=self.device))
            seqs.append(torch.cat([prefix.embeds(self.embed), suf]) if len(prefix) else suf)
        t = max(s.shape[0] for s in seqs)
        emb = torch.zeros(len(seqs), t, seqs[0].shape[1], dtype=seqs[0].dtype, device=self.device)
        mask = torch.zeros(len(seqs), t, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            emb[i, t - s.shape[0]:] = s
            mask[i, t - s.shape[0]:] = 1
        return emb, mask

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, seed: int | None = 0,
                 ignore_eos: bool = False) -> list[GenerationResult]:
        t0 = time.perf_counter()
        if isinstance(prompts, str):
            prompts = [prompts]
        msgs = [normalise_prompt(p, i) for i, p in enumerate(prompts)]
        m, b = self.method, len(msgs)
        eos = set()
        for src in (getattr(self.model, "generation_config", None), self.tok):
            e = getattr(src, "eos_token_id", None)
            eos.update([e] if isinstance(e, int) else (e or []))
        if ignore_eos:
            eos = set()
        caches, masks, logits = [], [], []
        for k in range(m.k):
            emb, mask = self._branch_inputs(k, msgs)
            cache = DynamicCache()
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                             **cache_kwargs(self.model, cache))
            caches.append(cache)
            masks.append(mask)
            logits.append(out.logits[:, -1, :])
        outs: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        seeds = torch.full((b,), 0 if seed is None else seed, dtype=torch.long)
        for step in range(max_new_tokens):
            tokens = contrastive_sample(torch.stack(logits), list(m.weights), rule=m.rule,
                                        anchor=m.anchor, beta=m.beta, temperature=temperature,
                                        top_k=top_k, top_p=top_p, min_p=min_p, seed=seeds,
                                        step=step, backend=self.backend)
            for i, t in enumerate(tokens.tolist()):
                if not done[i]:
                    outs[i].append(t)
                    done[i] = t in eos
            if all(done) or step == max_new_tokens - 1:
                break
            logits = []
            for k in range(m.k):
                masks[k] = torch.cat([masks[k], masks[k].new_ones(b, 1)], dim=1)
                pos = masks[k].sum(-1, keepdim=True) - 1
                out = self.model(input_ids=tokens[:, None].to(self.device),
                                 attention_mask=masks[k], position_ids=pos,
                                 **cache_kwargs(self.model, caches[k]))
                logits.append(out.logits[:, -1, :])
        elapsed = time.perf_counter() - t0
        results = []
        for i in range(b):
            ids = [t for t in outs[i] if t not in eos]
            results.append(GenerationResult(
                text=self.tok.decode(ids, skip_special_tokens=True), token_ids=outs[i],
                finish_reason="eos" if outs[i] and outs[i][-1] in eos else "length",
                prompt_tokens=[], timing={"total_s": elapsed, "new_tokens": len(outs[i])}))
        return results
