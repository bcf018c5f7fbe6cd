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
from safedecode.engine.engine import GenerationResult, eos_ids, mixture_logprob
from safedecode.engine.prompts import Prompt, PromptBuilder, normalise_prompt
from safedecode.ops import contrastive_sample


def _results(tok, outs: list[list[int]], eos, elapsed: float) -> list[GenerationResult]:
    """One result per token list (EOS kept in the ids, dropped from the text)."""
    return [GenerationResult(
        text=tok.decode([t for t in o if t not in eos], skip_special_tokens=True), token_ids=o,
        finish_reason="eos" if o and o[-1] in eos else "length", prompt_tokens=[],
        timing={"total_s": elapsed, "new_tokens": len(o)}) for o in outs]


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
        return _results(self.tok, outs, eos, time.perf_counter() - t0)


class NaiveDeAL:
    """DeAL as the public implementation runs it: one request at a time, and at every search
    step the whole context prefilled again — once for the candidates, once more for each
    candidate's rollout (K branch passes each, a fresh cache per rollout). Greedy rollouts, beam
    1. The baseline of the DeAL benchmark and the reference of its exactness tests (``propose``
    too: the plain branch's top tokens join the candidates, log P under the mixture; and
    ``rollout="plain"``: rollouts by the plain branch's greedy tokens, log P under the same
    mixture; ``"both"``: each candidate rolled out both ways, the copies after the base's)."""

    def __init__(self, model, tokenizer, spec, *, backend: str = "reference") -> None:
        if spec.beam != 1:
            raise ValueError("beam: the naive DeAL baseline searches with beam 1")
        self.spec, self.model, self.tok = spec, model, tokenizer
        self.gen = NaiveContrastGenerator(model, tokenizer, spec.engine_method, backend=backend)
        self.backend = backend

    def _final(self, logits: list[torch.Tensor]) -> torch.Tensor:
        from safedecode.ops import contrastive_logprobs

        m = self.spec.engine_method
        return contrastive_logprobs(torch.stack(logits), list(m.weights), rule=m.rule,
                                    anchor=m.anchor, beta=m.beta, temperature=1.0,
                                    backend=self.backend)[0]

    @torch.no_grad()
    def _run(self, embs: list[torch.Tensor], ids: list[int], n: int, eos: set[int],
             follow: bool = False) -> tuple[list[int], list[float], torch.Tensor,
                                            list[torch.Tensor]]:
        """Prefill prompt + ``ids`` per branch (fresh caches), then up to ``n`` greedy tokens
        (``follow``: the plain branch's, log-probs under the mixture). Returns (tokens, their
        log-probs, the final log-distribution after ``ids``, the branches' logits there)."""
        gen, model = self.gen, self.model
        caches, logits = [], []
        for emb in embs:
            x = emb
            if ids:
                x = torch.cat([emb, gen.embed(torch.tensor(ids, device=gen.device))])
            cache = DynamicCache()
            pos = torch.arange(x.shape[0], device=gen.device)[None]
            out = model(inputs_embeds=x[None], position_ids=pos, **cache_kwargs(model, cache))
            caches.append(cache)
            logits.append(out.logits[:, -1, :])
        first, first_logits = self._final(logits), logits
        lp, toks, lps = first, [], []
        lengths = [e.shape[0] + len(ids) for e in embs]
        for _ in range(n):
            if follow:
                q = torch.log_softmax(logits[self.spec.proposal_branch][0].float(), dim=-1)
                t = int(torch.sort(q, descending=True, stable=True).indices[0])
                idx = torch.tensor([t])
                lps.append(float(mixture_logprob(lp[idx], q[idx], self.spec.mix)[0]))
            else:
                t = int(torch.sort(lp, descending=True, stable=True).indices[0])
                lps.append(float(lp[t]))
            toks.append(t)
            if t in eos:
                break
            logits = []
            for k, cache in enumerate(caches):
                out = model(input_ids=torch.tensor([[t]], device=gen.device),
                            position_ids=torch.tensor([[lengths[k]]], device=gen.device),
                            **cache_kwargs(model, cache))
                lengths[k] += 1
                logits.append(out.logits[:, -1, :])
            lp = self._final(logits)
        return toks, lps, first, first_logits

    @torch.no_grad()
    def generate(self, prompt: Prompt, *, max_new_tokens: int = 128) -> GenerationResult:
        spec, t0 = self.spec, time.perf_counter()
        msgs = normalise_prompt(prompt, 0)
        embs = [self.gen._branch_inputs(k, [msgs])[0][0] for k in range(spec.engine_method.k)]
        eos: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.tok):
            e = getattr(src, "eos_token_id", None)
            eos.update([e] if isinstance(e, int) else (e or []))

        def text_of(ids: list[int]) -> str:
            return self.tok.decode([t for t in ids if t not in eos], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)

        user = msgs[-1]["content"] if isinstance(prompt, str) else next(
            m["content"] for m in reversed(msgs) if m["role"] == "user")
        committed: list[int] = []
        lps: list[float] = []
        while True:
            _, _, first, z = self._run(embs, committed, 0, eos)
            top_lp, top_tok = torch.sort(first, descending=True, stable=True)
            cands = [(int(t), float(v)) for t, v in zip(top_tok[:spec.k], top_lp[:spec.k],
                                                         strict=True) if v != float("-inf")]
            if spec.propose:  # the plain branch's top tokens too; log P under the mixture
                q = torch.log_softmax(z[spec.proposal_branch][0].float(), dim=-1)
                extra = [int(t) for t in torch.sort(q, descending=True, stable=True).indices
                         [:spec.propose]]
                toks = [t for t, _ in cands] + [t for t in extra
                                                 if t not in {c for c, _ in cands}]
                idx = torch.tensor(toks)
                mix = mixture_logprob(first[idx], q[idx], spec.mix)
                cands = list(zip(toks, mix.double().tolist(), strict=True))
            scored = []
            policies = {"base": (False,), "plain": (True,), "both": (False, True)}[spec.rollout]
            tries = [(f, c, c_lp) for f in policies for c, c_lp in cands]
            for rank, (follow, c, c_lp) in enumerate(tries):
                seq, seq_lps = [*committed, c], [*lps, c_lp]
                roll, roll_lps = [], []
                rolls = c not in eos and len(seq) < max_new_tokens
                if spec.rollout == "both" and follow and not rolls:
                    continue  # a finished candidate has no plain copy
                if rolls:
                    roll, roll_lps, *_ = self._run(
                        embs, seq, min(spec.lookahead, max_new_tokens - len(seq)), eos,
                        follow=follow)
                full = seq + roll
                h = spec.reward([user], [text_of(full)])[0]
                ended = (full[-1] in eos) or len(full) >= max_new_tokens
                scored.append((-(sum(seq_lps) + spec.lam * h), rank, full, seq_lps + roll_lps,
                               ended, len(seq)))
            _, _, full, full_lps, ended, base = min(scored, key=lambda x: (x[0], x[1]))
            if ended:
                return GenerationResult(
                    text=text_of(full), token_ids=full,
                    finish_reason="eos" if full[-1] in eos else "length", prompt_tokens=[],
                    logprobs=full_lps, timing={"total_s": time.perf_counter() - t0,
                                               "new_tokens": len(full)})
            n = min(base - 1 + spec.chunk, len(full))
            committed, lps = full[:n], full_lps[:n]
            if spec.horizon is not None and n >= spec.horizon:  # the base decodes the rest
                roll, roll_lps, *_ = self._run(embs, committed, max_new_tokens - n, eos)
                full, full_lps = committed + roll, lps + roll_lps
                return GenerationResult(
                    text=text_of(full), token_ids=full,
                    finish_reason="eos" if full[-1] in eos else "length", prompt_tokens=[],
                    logprobs=full_lps, timing={"total_s": time.perf_counter() - t0,
                                               "new_tokens": len(full)})


class NaiveSafeInfer:
    """SafeInfer as its reference code runs it: the steered model and the unsafe model one after
    the other, each with its own KV cache over the whole prompt; the vector added by a global
    forward hook at the last position of every forward (here: to every row, not only the first);
    ``s = lp_b − β·relu(lp_u − lp_b)`` computed by hand in torch (not by the fused op). The
    baseline of the SafeInfer benchmark and the reference of its exactness tests.

    ``unsafe_model``: the unsafe model (e.g. the base model with the adapter merged), or the
    base model with ``unsafe_system`` as its system prompt."""

    def __init__(self, model, tokenizer, *, vector: torch.Tensor, module: str, gamma: float,
                 lam: float, unsafe_model=None, unsafe_system: str | None = None) -> None:
        from safedecode.engine.branches import plain

        self.model, self.tok = model, tokenizer
        self.unsafe = unsafe_model if unsafe_model is not None else model
        self.vector, self.module, self.gamma = vector, module, float(gamma)
        self.beta = lam / (1.0 - lam)
        self.gens = [NaiveContrastGenerator(model, tokenizer, plain()),
                     NaiveContrastGenerator(self.unsafe, tokenizer, plain(unsafe_system))]

    def _steer(self, module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[:, -1:] += self.gamma * self.vector.to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def _scores(self, logits_b: torch.Tensor, logits_u: torch.Tensor) -> torch.Tensor:
        lp_b = torch.log_softmax(logits_b.float(), -1)
        lp_u = torch.log_softmax(logits_u.float(), -1)
        return lp_b - self.beta * torch.relu(lp_u - lp_b)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int = 0) -> list[GenerationResult]:
        t0 = time.perf_counter()
        if isinstance(prompts, str):
            prompts = [prompts]
        msgs = [normalise_prompt(p, i) for i, p in enumerate(prompts)]
        b = len(msgs)
        eos = eos_ids(self.model, self.tok)
        gen = torch.Generator().manual_seed(seed)
        hook = self.model.get_submodule(self.module).register_forward_hook(self._steer)
        try:
            caches, masks, logits = [], [], []
            for g, mdl in zip(self.gens, (self.model, self.unsafe), strict=True):
                emb, mask = g._branch_inputs(0, msgs)
                cache = DynamicCache()
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                out = mdl(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                          **cache_kwargs(mdl, cache))
                caches.append(cache)
                masks.append(mask)
                logits.append(out.logits[:, -1, :])
            outs: list[list[int]] = [[] for _ in range(b)]
            done = [False] * b
            for step in range(max_new_tokens):
                s = self._scores(*logits)
                if temperature > 0:
                    probs = torch.softmax(s / temperature, -1)
                    tokens = torch.multinomial(probs, 1, generator=gen)[:, 0]
                else:
                    tokens = s.argmax(-1)
                for i, t in enumerate(tokens.tolist()):
                    if not done[i]:
                        outs[i].append(t)
                        done[i] = t in eos
                if all(done) or step == max_new_tokens - 1:
                    break
                logits = []
                for k, mdl in enumerate((self.model, self.unsafe)):
                    masks[k] = torch.cat([masks[k], masks[k].new_ones(b, 1)], dim=1)
                    pos = masks[k].sum(-1, keepdim=True) - 1
                    out = mdl(input_ids=tokens[:, None], attention_mask=masks[k],
                              position_ids=pos, **cache_kwargs(mdl, caches[k]))
                    logits.append(out.logits[:, -1, :])
        finally:
            hook.remove()
        return _results(self.tok, outs, eos, time.perf_counter() - t0)
