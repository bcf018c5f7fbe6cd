"""The decode loop: K branches x B requests in one forward pass per step over one KV cache.

Rows are **branch-major**: row ``k * B + b`` is request b under branch k, so the step's logits
``[K*B, V]`` are viewed as ``[K, B, V]`` without a copy and handed to the fused op, whose token for
request b is appended to all K of its rows.

Cache layout (slots of every row): ``[ prefix region | suffix region | generated ]``. Branch k's
shared prefix KV (computed once, :class:`PrefixStore`) is right-aligned in the prefix region, the
request's suffix is right-aligned (left-padded) in the suffix region; padding slots are masked and
positions are explicit, so a row's tokens see exactly ``prefix_k + suffix_b + generated`` at
positions ``0, 1, 2, ...`` — the same computation as an unpadded, unshared run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from safedecode.ops import contrastive_sample
from safedecode.ops.params import prepare

from .branches import Method
from .cache import PreallocatedCache, PrefixStore, cache_kwargs
from .detokenizer import IncrementalDetokenizer
from .linear import small_gemm_linears
from .prompts import Prefix, Prompt, PromptBuilder, normalise_prompt


@dataclass
class GenerationResult:
    """One request's output."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" (a stop string or stop token) or "length"
    prompt_tokens: list[int]  # per branch: prefix + suffix length
    logprobs: list[float] | None = None
    timing: dict = field(default_factory=dict)


@dataclass
class StreamEvent:
    """A text delta of one request (``finish_reason`` set on its last event)."""

    index: int
    text: str
    token_id: int | None
    finish_reason: str | None = None


@dataclass
class _Request:
    index: int
    prompt_len: list[int]
    seed: int
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    t_done: float = 0.0
    detok: IncrementalDetokenizer | None = None


def check_sampling(method: Method, **sampling) -> None:
    """Validate decoding parameters with the op's own rules, before any forward pass."""
    prepare(torch.zeros(method.k, 1, 1), list(method.weights), rule=method.rule,
            anchor=method.anchor, beta=method.beta, seed=0, step=0, **sampling)


@dataclass
class TokenPrompts:
    """Already-rendered prompts: ``ids[k][b]`` is request b's token ids under branch k (no prefix
    sharing: used by :func:`safedecode.custom_generate`)."""

    ids: list[list[list[int]]]

    @property
    def batch(self) -> int:
        return len(self.ids[0])

    def built(self, k: int) -> list[list[tuple[Prefix, list[int]]]]:
        if len(self.ids) != k or any(len(x) != self.batch for x in self.ids):
            raise ValueError(f"expected prompt ids for {k} branches x {self.batch} requests")
        empty = Prefix("raw", [])
        out = []
        for kk, branch in enumerate(self.ids):
            for i, seq in enumerate(branch):
                if not seq:
                    raise ValueError(f"branch {kk}, request {i}: empty prompt")
            out.append([(empty, list(seq)) for seq in branch])
        return out


class SafeDecoder:
    """Generate with a :class:`Method` on a Hugging Face causal LM.

    ``prefix_cache=False`` prefills every row's whole prompt (for comparison); ``compact=False``
    keeps finished requests' rows in the batch (masked) instead of dropping them;
    ``small_gemm=False`` leaves a CPU fp32 model's linear layers on torch's GEMM instead of
    safedecode's small-M GEMM for decode steps of <= 16 rows (see :mod:`.linear`).
    """

    def __init__(self, model, tokenizer, method: Method, *, backend: str = "auto",
                 prefix_cache: bool = True, compact: bool = True,
                 small_gemm: bool = True) -> None:
        if not isinstance(method, Method):
            raise ValueError(f"method: expected a safedecode Method, got {type(method).__name__}; "
                             "see safedecode.methods.get()")
        self.model, self.tok, self.method = model, tokenizer, method
        self.backend, self.prefix_cache, self.compact = backend, prefix_cache, compact
        self.small_gemm = small_gemm
        self.builder = PromptBuilder(tokenizer) if tokenizer is not None else None
        self.prefixes = PrefixStore()
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
            else model.config
        self.num_layers = cfg.num_hidden_layers
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self._row_slices: dict[int, slice] = {}
        self._hooks_installed = False
        for i, br in enumerate(method.branches):
            if br.soft_prompt is not None and br.soft_prompt.shape[1] != self.embed.weight.shape[1]:
                raise ValueError(f"method {method.name!r}: branch {i}'s soft prompt has width "
                                 f"{br.soft_prompt.shape[1]}, the model's embeddings "
                                 f"{self.embed.weight.shape[1]}")
            if br.fingerprint is not None:
                from safedecode.models import embedding_fingerprint, model_name

                here = embedding_fingerprint(model)
                if here != br.fingerprint:
                    raise ValueError(
                        f"method {method.name!r}: branch {i} ({br.name or 'soft prompt'}) was "
                        f"optimised for {br.trained_for or 'another model'} (embedding "
                        f"fingerprint {br.fingerprint}), but this model is {model_name(model)} "
                        f"(fingerprint {here}); optimise prompts for it with "
                        "`safedecode optimize --model ...`")

    # -- public API ------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, seed: int | Sequence[int] | None = None,
                 stop: Sequence[str | int] | None = None, return_logprobs: bool = False,
                 streamer=None, ignore_eos: bool = False) -> list[GenerationResult]:
        """Generate for each prompt (a string or chat messages); returns one result each.

        ``stop``: strings or token ids that end a request (besides EOS, unless ``ignore_eos``);
        ``seed``: one int for all requests or one per request; ``streamer``: a transformers
        streamer (``put``/``end``) for a single prompt.
        """
        events = self._run(prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed,
                           stop, return_logprobs, streamer, ignore_eos)
        for _ in events:
            pass
        return self._results

    def stream(self, prompts: Prompt | Sequence[Prompt], **kw) -> Iterator[StreamEvent]:
        """Like :meth:`generate`, but yields text deltas as they are decoded."""
        kw = {"max_new_tokens": 128, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
              "min_p": 0.0, "seed": None, "stop": None, "return_logprobs": False,
              "streamer": None, "ignore_eos": False, **kw}
        yield from self._run(prompts, kw["max_new_tokens"], kw["temperature"], kw["top_k"],
                             kw["top_p"], kw["min_p"], kw["seed"], kw["stop"],
                             kw["return_logprobs"], kw["streamer"], kw["ignore_eos"])

    # -- preparation -----------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.tok):
            e = getattr(src, "eos_token_id", None)
            if isinstance(e, int):
                ids.add(e)
            elif isinstance(e, (list, tuple)):
                ids.update(int(x) for x in e)
        return ids

    def _validate(self, prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stop):
        if isinstance(prompts, TokenPrompts):
            msgs = [None] * prompts.batch
        else:
            if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                            and isinstance(prompts[0], dict)):
                prompts = [prompts]
            if not isinstance(prompts, Sequence) or len(prompts) == 0:
                raise ValueError("prompts: expected a prompt or a non-empty list of prompts")
            msgs = [normalise_prompt(p, i) for i, p in enumerate(prompts)]
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be an integer >= 1, got {max_new_tokens!r}")
        b = len(msgs)
        if seed is None:
            seeds = torch.randint(0, 2**62, (b,)).tolist()
        elif isinstance(seed, int) and not isinstance(seed, bool):
            seeds = [seed] * b
        elif isinstance(seed, Sequence) and len(seed) == b and all(isinstance(s, int)
                                                                    for s in seed):
            seeds = list(seed)
        else:
            raise ValueError(f"seed: expected an int, None or {b} ints (one per prompt)")
        check_sampling(self.method, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p)
        stop_strings, stop_ids = [], set()
        for s in stop or ():
            if isinstance(s, str) and s:
                stop_strings.append(s)
            elif isinstance(s, int) and not isinstance(s, bool) and s >= 0:
                stop_ids.add(s)
            else:
                raise ValueError(f"stop: expected non-empty strings or token ids, got {s!r}")
        return msgs, seeds, stop_strings, stop_ids

    def _prefix_kv(self, k: int, prefix: Prefix):
        """The branch prefix's per-layer (keys, values) [1, H, P, D], computed once."""
        if prefix.key in self.prefixes:
            return self.prefixes.get(prefix.key)
        cache = PreallocatedCache(self.num_layers, 1, len(prefix))
        emb = prefix.embeds(self.embed)[None]
        pos = torch.arange(len(prefix), device=self.device)[None]
        self._row_slices = {k: slice(0, 1)}
        self.model(inputs_embeds=emb, position_ids=pos, **cache_kwargs(self.model, cache),
                   logits_to_keep=1)
        kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        self.prefixes.put(prefix.key, kv)
        return kv

    # -- hooks (per-branch forward hooks, e.g. SafeInfer's steering vector) --------------------
    def _install_hooks(self) -> list:
        handles = []
        for k, br in enumerate(self.method.branches):
            for hook in br.hooks:
                module = self.model.get_submodule(hook.module)
                handles.append(module.register_forward_hook(self._make_hook(k, hook.fn)))
        return handles

    def _make_hook(self, k: int, fn: Callable[[torch.Tensor], torch.Tensor]):
        def run(module, args, output):
            rows = self._row_slices.get(k)
            if rows is None:
                return output
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            h[rows] = fn(h[rows])
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return run

    # -- the loop --------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stop,
             return_logprobs, streamer, ignore_eos=False) -> Iterator[StreamEvent]:
        t0 = time.perf_counter()
        msgs, seeds, stop_strings, stop_ids = self._validate(
            prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stop)
        m, kb = self.method, self.method.k
        b = len(msgs)
        if isinstance(prompts, TokenPrompts):
            built = prompts.built(kb)
        else:
            built = [[self.builder.build(br, msgs[i], i) for i in range(b)] for br in m.branches]
        for i in range(b):
            for k in range(kb):
                prefix, suffix = built[k][i]
                total = len(prefix) + len(suffix) + max_new_tokens
                if self.max_positions and total > self.max_positions:
                    raise ValueError(
                        f"prompts[{i}]: {len(prefix) + len(suffix)} prompt tokens (branch {k}) + "
                        f"max_new_tokens={max_new_tokens} exceeds the model's context of "
                        f"{self.max_positions} tokens")
        if streamer is not None and b != 1:
            raise ValueError("streamer: transformers streamers take a single prompt (B=1)")
        self._true_eos = self._eos_ids()
        eos = (set() if ignore_eos else self._true_eos) | stop_ids
        reqs = [_Request(i, [len(built[k][i][0]) + len(built[k][i][1]) for k in range(kb)],
                         seeds[i], detok=IncrementalDetokenizer(self.tok, stop=stop_strings,
                                                               skip_ids=eos))
                for i in range(b)]
        self._results = []

        handles = self._install_hooks()
        try:
            with small_gemm_linears(self.model, self.small_gemm and self.device.type == "cpu"):
                cache, valid, pos, next_logits = self._prefill(built, b, max_new_tokens)
                t_prefill = time.perf_counter()
                if streamer is not None:
                    p, s = built[m.anchor][0]
                    streamer.put(torch.tensor([p.ids + list(p.tail_ids) + s]))
                yield from self._decode(cache, valid, pos, next_logits, reqs, max_new_tokens,
                                        temperature, top_k, top_p, min_p, eos, stop_strings,
                                        return_logprobs, streamer)
        finally:
            for h in handles:
                h.remove()
            self._row_slices = {}
        if streamer is not None:
            streamer.end()
        for r in reqs:
            decode_s = r.t_done - t_prefill
            self._results.append(GenerationResult(
                text=r.text, token_ids=r.out, finish_reason=r.finish or "length",
                prompt_tokens=r.prompt_len, logprobs=r.logprobs if return_logprobs else None,
                timing={"prefill_s": t_prefill - t0, "decode_s": decode_s,
                        "total_s": r.t_done - t0, "new_tokens": len(r.out),
                        "tokens_per_s": len(r.out) / decode_s if decode_s > 0 else float("inf")}))

    def _prefill(self, built, b: int, max_new_tokens: int):
        """Fill the cache with every row's prompt; returns (cache, valid, positions, logits)."""
        kb = self.method.k
        rows = kb * b
        pad = getattr(self.tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.model.generation_config, "pad_token_id", None) or 0
        shared = self.prefix_cache
        p_len = [len(built[k][0][0]) for k in range(kb)]
        if shared:
            p_max = max(p_len)
            s_max = max(len(built[k][i][1]) for k in range(kb) for i in range(b))
        else:
            p_max = 0
            s_max = max(len(built[k][i][0]) + len(built[k][i][1])
                        for k in range(kb) for i in range(b))
        cap = p_max + s_max + max_new_tokens
        cache = PreallocatedCache(self.num_layers, rows, cap)
        valid = torch.zeros(rows, cap, dtype=torch.bool, device=self.device)
        pos = torch.zeros(rows, dtype=torch.long, device=self.device)
        emb_rows = torch.zeros(rows, s_max, self.embed.weight.shape[1], dtype=self.dtype,
                               device=self.device)
        ids = torch.full((rows, s_max), pad, dtype=torch.long, device=self.device)
        positions = torch.zeros(rows, s_max, dtype=torch.long, device=self.device)
        use_embeds = False
        for k in range(kb):
            if shared and p_len[k]:
                kv = self._prefix_kv(k, built[k][0][0])
                self._write_prefix(cache, kv, k, b, p_max)
                valid[k * b:(k + 1) * b, p_max - p_len[k]:p_max] = True
            for i in range(b):
                r = k * b + i
                prefix, suffix = built[k][i]
                if shared:
                    seq_ids, start_pos = suffix, len(prefix)
                    n = len(seq_ids)
                    ids[r, s_max - n:] = torch.tensor(seq_ids, dtype=torch.long)
                else:
                    n = len(prefix) + len(suffix)
                    start_pos = 0
                    if prefix.soft is not None:
                        use_embeds = True
                        emb = torch.cat([prefix.embeds(self.embed), self.embed(
                            torch.tensor(suffix, dtype=torch.long, device=self.device))])
                        emb_rows[r, s_max - n:] = emb
                    ids[r, s_max - n:] = torch.tensor(
                        prefix.ids + list(prefix.tail_ids) + suffix if prefix.soft is None
                        else [pad] * n, dtype=torch.long)
                positions[r, s_max - n:] = torch.arange(start_pos, start_pos + n)
                valid[r, p_max + s_max - n:p_max + s_max] = True
                pos[r] = start_pos + n
        if use_embeds:  # fill the text rows' embeddings too
            text_rows = emb_rows.abs().sum(dim=(1, 2)) == 0
            emb_rows[text_rows] = self.embed(ids[text_rows])
        cache.set_length(p_max)
        mask = self._mask(valid, p_max, s_max)
        self._row_slices = {k: slice(k * b, (k + 1) * b) for k in range(kb)}
        inputs = {"inputs_embeds": emb_rows} if use_embeds else {"input_ids": ids}
        out = self.model(**inputs, attention_mask=mask, position_ids=positions,
                         **cache_kwargs(self.model, cache), logits_to_keep=1)
        return cache, valid, pos, out.logits[:, -1, :]

    @staticmethod
    def _write_prefix(cache: PreallocatedCache, kv, k: int, b: int, p_max: int) -> None:
        for layer, (pk, pv) in zip(cache.layers, kv, strict=True):
            if not layer.is_initialized:
                layer.allocate(pk.shape[1], pk.shape[-1], pv.shape[-1], pk.dtype, pk.device)
            n = pk.shape[2]
            layer.keys[k * b:(k + 1) * b, :, p_max - n:p_max] = pk
            layer.values[k * b:(k + 1) * b, :, p_max - n:p_max] = pv

    def _mask(self, valid: torch.Tensor, start: int, q: int) -> torch.Tensor:
        """Additive [rows, 1, q, start+q] mask: causal by slot, padding masked; a padding query
        attends to itself only (keeps its row finite)."""
        kv = start + q
        qi = torch.arange(start, kv, device=self.device)[:, None]
        kj = torch.arange(kv, device=self.device)[None, :]
        allowed = (kj <= qi)[None] & valid[:, None, :kv]
        allowed |= (kj == qi)[None]
        neg = torch.finfo(self.dtype).min
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device) \
            .masked_fill_(~allowed, neg)[:, None]

    def _decode(self, cache, valid, pos, logits, reqs, max_new_tokens, temperature, top_k, top_p,
                min_p, eos, stop_strings, return_logprobs, streamer) -> Iterator[StreamEvent]:
        m, kb = self.method, self.method.k
        active = list(range(len(reqs)))  # request indices, in row order
        weights = list(m.weights)
        # Per-step state kept as tensors and updated in place: the additive attention mask
        # (0 = visible), each request's seed, and its step (= tokens generated so far).
        bias = torch.zeros(valid.shape, dtype=self.dtype, device=self.device)
        bias.masked_fill_(~valid, torch.finfo(self.dtype).min)
        seeds = torch.tensor([r.seed for r in reqs], device=self.device)
        steps = torch.zeros(len(reqs), dtype=torch.long, device=self.device)
        while active:
            n_act = len(active)
            live = [j for j, i in enumerate(active) if reqs[i].finish is None]
            view = logits.view(kb, n_act, -1)
            res = contrastive_sample(view, weights, rule=m.rule, anchor=m.anchor, beta=m.beta,
                                     temperature=temperature, top_k=top_k, top_p=top_p,
                                     min_p=min_p, seed=seeds, step=steps,
                                     return_logprobs=return_logprobs, backend=self.backend)
            tokens, lps = res if return_logprobs else (res, None)
            tok_list = tokens.tolist()
            now = time.perf_counter()
            for j in live:
                r = reqs[active[j]]
                t = tok_list[j]
                r.out.append(t)
                if lps is not None:
                    r.logprobs.append(float(lps[j]))
                delta, reason = self._advance_text(r, t, eos, max_new_tokens)
                if reason:
                    r.finish, r.t_done = reason, now
                if streamer is not None:
                    streamer.put(torch.tensor([t]))
                yield StreamEvent(r.index, delta, t, reason)
            keep = [j for j, i in enumerate(active) if reqs[i].finish is None]
            if not keep:
                break
            if self.compact and len(keep) < n_act:
                rows = torch.tensor([k * n_act + j for k in range(kb) for j in keep],
                                    device=self.device)
                cache.select_rows(rows)
                kept = torch.tensor(keep, device=self.device)
                bias, pos, tokens = bias[rows], pos[rows], tokens[kept]
                seeds, steps = seeds[kept], steps[kept]
                active = [active[j] for j in keep]
                n_act = len(active)
                self._row_slices = {k: slice(k * n_act, (k + 1) * n_act) for k in range(kb)}
            slot = cache.length
            bias[:, slot] = 0.0
            out = self.model(input_ids=tokens.repeat(kb)[:, None],
                             attention_mask=bias[:, None, None, :slot + 1],
                             position_ids=pos[:, None], **cache_kwargs(self.model, cache))
            pos = pos + 1
            steps += 1
            logits = out.logits[:, -1, :]

    def _advance_text(self, r: _Request, token: int, eos: set[int],
                      max_new_tokens: int) -> tuple[str, str | None]:
        """Feed the request's new token to its detokeniser; returns (delta, finish reason)."""
        if token in eos:
            return r.detok.flush(), "eos" if token in self._true_eos else "stop"
        delta = r.detok.add(token)
        reason = "stop" if r.detok.stopped else (
            "length" if len(r.out) >= max_new_tokens else None)
        if reason is not None:
            delta += r.detok.flush()
        r.text = r.detok.text
        return delta, reason
