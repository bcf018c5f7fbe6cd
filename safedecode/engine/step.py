"""The model side of a decode step: branch prefixes, prefill of new sequences, the decode forward
and the fused sampling op, on a :class:`~.state.DecodeState`.

Per decode step the device does: one forward over the running rows (attention width bucketed,
mask and KV read as views when the slots are consecutive), one op call, and in-place updates of
the state; nothing is read back here. The engine reads the packed ``[tokens; status; logprobs]``
of a step with one transfer (:meth:`ModelStep.sample`). A step that admits new sequences runs
their prefill and the running rows' decode as one packed forward (:meth:`ModelStep.packed`,
:mod:`.packed`) where the method allows, else :meth:`~ModelStep.decode` then
:meth:`~ModelStep.prefill`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import torch

from safedecode.models import text_config
from safedecode.ops import contrastive_logprobs, contrastive_sample_with_status
from safedecode.ops.linear import eager_forwards, op_forwards, routed

from .branches import BranchHook, Method
from .cache import TURN_STORE_BYTES, PrefixStore, SlotCache, cache_kwargs
from .masks import LayerMasks
from .packed import PackPlan, packed_attention_on
from .prompts import Prefix
from .state import DecodeState, round_up
from .stops import SentenceStop

Built = Sequence[tuple[Prefix, list[int]]]  # per branch: (shared prefix, suffix ids)


class CompiledDecode:
    """The decode forward under ``torch.compile`` (static shapes: every step of a batch has
    the same row count and attention width, so one graph serves them all; a new batch shape
    compiles once more). Linear layers of fp32 CPU models run the small-M GEMM as the opaque
    operator ``safedecode::linear_small`` (no graph break). Shared by every engine of one
    :class:`~safedecode.engine.SafeDecoder`, so graphs are reused across calls."""

    def __init__(self, model, method: Method, small_gemm: bool) -> None:
        if any(br.hooks or br.adapter is not None for br in method.branches):
            raise ValueError("compile: methods with branch hooks or adapters run eagerly only "
                             "(compile=False)")
        self.model = model
        cpu = model.get_input_embeddings().weight.device.type == "cpu"
        self.forwards = op_forwards(model) if small_gemm and cpu else {}
        self.cache_arg = next(iter(cache_kwargs(model, None)))  # resolved outside the graph
        self.fn = torch.compile(self._call, dynamic=False)

    def _call(self, ids, mask, pos, cache):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         **{self.cache_arg: cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def __call__(self, ids, mask, pos, cache: SlotCache) -> torch.Tensor:
        with routed(self.forwards):
            return self.fn(ids, mask, pos, cache)


def adjust_coefficients(method: Method) -> torch.Tensor:
    """``[K]``: how much of a request's logit bias and penalties each branch's logits take so
    that the op's final score moves by exactly them and the anchor (the plausibility mask) by
    them too. Linear rule: the anchor 1, the other weighted branches the least-norm share of
    ``1 - w_anchor`` (``c_k = (1 - w_a) w_k / sum w_j^2``), weight-0 branches 0. The union rule
    (SafeInfer) has no such share (its score is not linear in the logits): both branches take
    them whole — the union of the two adjusted distributions."""
    w = torch.tensor(method.weights, dtype=torch.float32)
    if method.rule != "linear":
        return torch.ones_like(w)
    a = method.anchor
    others = w.clone()
    others[a] = 0.0
    norm = float((others * others).sum())
    c = others * ((1.0 - float(w[a])) / norm) if norm > 0 else torch.zeros_like(w)
    c[a] = 1.0
    return c


def answer_positions(a: int, b: int, longest: int, e: int) -> range:
    """Of a prompt whose rows end with ``e`` given answer tokens (``longest`` tokens on its
    longest row, answer included), the positions (counted on the longest row; rows are aligned
    at their ends) in chunk ``a .. b`` whose logits score those tokens: the answer's ``j``-th
    token is scored at ``longest - e - 1 + j``. The last position scores the token after them
    (the step's own)."""
    return range(max(a, longest - e - 1), min(b, longest - 1)) if e else range(0)


class ModelStep:
    """Runs ``model`` for the rows of a :class:`DecodeState` (see the module docstring)."""

    def __init__(self, model, method: Method, *, backend: str = "auto",
                 prefix_cache: bool = True, small_gemm: bool = True,
                 prefixes: PrefixStore | None = None, pad_id: int = 0,
                 compiled: CompiledDecode | None = None, pack: bool = True,
                 turns: PrefixStore | None = None) -> None:
        self.model, self.method, self.backend = model, method, backend
        self.pack: bool | None = None if pack else False  # None: not tried yet
        self.prefix_cache = prefix_cache
        self.prefixes = prefixes if prefixes is not None else PrefixStore()
        # finished chat requests' prompt + answer KV, which their next turn may extend
        self.turns = turns if turns is not None else PrefixStore(TURN_STORE_BYTES)
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.small_gemm = small_gemm and self.device.type == "cpu"
        self._gemm = eager_forwards(model) if self.small_gemm else {}  # built once
        self.pad_id = pad_id
        cfg = text_config(model)
        self.masks = LayerMasks.of(model)  # sliding windows (a ValueError for other kinds)
        self.num_layers = cfg.num_hidden_layers
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.weights = list(method.weights)
        self.adjust_coef = adjust_coefficients(method).to(self.device)
        self._hook_rows: dict[int, slice] = {}
        self._prompt_mask: torch.Tensor | None = None  # [rows, t]: the suffix positions
        self._prompt_hooks = any(h.positions == "prompt" for br in method.branches
                                 for h in br.hooks)
        self._gated = any(h.gate is not None for br in method.branches for h in br.hooks)
        self._gate_on: torch.Tensor | None = None
        self._windowed = any(h.window for br in method.branches for h in br.hooks)
        self._steps: torch.Tensor | None = None  # [rows] new tokens so far (windowed hooks)
        self.stop: SentenceStop | None = None  # set by the engine (it knows the tokenizer)
        self.adapters = {k: br.adapter.to(self.device, self.dtype)
                         for k, br in enumerate(method.branches) if br.adapter is not None}
        self._effects = {phase: self._branch_effects(phase)
                         for phase in ("prefix", "prefill", "decode")}  # built once
        self.compiled = compiled
        # a gated contrast (Method.contrast_gate): once a sequence's gate is decided, its decode
        # forwards run only the rows the op reads (gate on: the weighted branches; off: the
        # fallback) — off for engines whose caller reads other branches' logits (DeAL)
        self.drop_rows = method.contrast_gate is not None and compiled is None
        m = method
        if m.contrast_gate is not None:
            fb = m.anchor if m.fallback is None else m.fallback
            self._need = {True: tuple(k for k in range(m.k) if m.weights[k] != 0
                                      or k == m.anchor),
                          False: (fb,)}
        self._sparse: dict[tuple, tuple] = {}  # (slots, rows) -> the step's index tensors

    # -- forward with per-branch hooks -----------------------------------------------------
    @contextlib.contextmanager
    def _forward_context(self, hook_rows: dict[int, slice], phase: str = "decode",
                         prompt_mask: torch.Tensor | None = None,
                         gate_on: torch.Tensor | None = None,
                         steps: torch.Tensor | None = None) -> Iterator[None]:
        """Install the branches' effects for one forward whose rows of branch k are
        ``hook_rows[k]``. ``phase``: ``"prefix"`` (a shared prefix: no decoded position),
        ``"prefill"`` (its last position decodes the first token) or ``"decode"``.
        ``prompt_mask`` (prefill): ``[rows, t]``, the positions ``"prompt"`` hooks act on.
        ``gate_on``: the gated hooks' decisions for this forward's rows (at prefill a copy the
        hooks write, stored back into :class:`DecodeState` after the forward; later steps read
        it). ``steps`` (decode, windowed hooks): each row's new tokens so far."""
        self._hook_rows, self._prompt_mask, self._gate_on = hook_rows, prompt_mask, gate_on
        self._steps = steps
        handles = [module.register_forward_hook(fn) for module, fn in self._effects[phase]]
        try:
            with routed(self._gemm):
                yield
        finally:
            for h in handles:
                h.remove()
            self._hook_rows, self._prompt_mask, self._gate_on = {}, None, None
            self._steps = None

    def _branch_effects(self, phase: str) -> list[tuple[torch.nn.Module, Callable]]:
        """(module, forward hook) of every branch effect that acts in ``phase``: hooks by their
        positions, adapters in every phase."""
        out = []
        for k, br in enumerate(self.method.branches):
            for hook in br.hooks:
                if (phase == "prefix" and hook.positions != "all") or \
                        (phase == "decode" and hook.positions in ("first", "prompt")):
                    continue
                try:
                    module = self.model.get_submodule(hook.module)
                except AttributeError:
                    raise ValueError(f"branch {k} ({br.name or 'branch'}): its hook's module "
                                     f"{hook.module!r} is not in the model") from None
                out.append((module, self._make_hook(k, hook, phase)))
        for k, adapter in self.adapters.items():
            out += [(self.model.get_submodule(name), self._make_adapter_hook(k, adapter, name))
                    for name in adapter.layers]
        return out

    def _make_hook(self, k: int, hook: BranchHook, phase: str):
        positions, gate, window = hook.positions, hook.gate, hook.window

        def run(module, args, output):
            rows = self._hook_rows.get(k)
            if rows is None:
                return output
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            fn, on = hook.fn, None
            if gate is not None:  # judged at prefill, kept with the rows for later steps
                if phase == "prefill":
                    self._gate_on[rows] = gate(h[rows, -1]).to(torch.bool)
                on = self._gate_on[rows]
            if window is not None and phase == "decode":  # fed token j decodes token j + 1
                inside = self._steps[rows] < window
                on = inside if on is None else on & inside
            if on is not None:
                def fn(x, on=on[:, None, None]):
                    return torch.where(on, hook.fn(x), x)
            if positions == "all":
                h[rows] = fn(h[rows])
            elif positions == "prompt":
                hs = h[rows]
                keep = self._prompt_mask[rows][..., None]
                h[rows] = torch.where(keep, fn(hs), hs)
            else:
                h[rows, -1:] = fn(h[rows, -1:])
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return run

    def _make_adapter_hook(self, k: int, adapter, name: str):
        def run(module, args, output):
            rows = self._hook_rows.get(k)
            if rows is None:
                return output
            if output.requires_grad:
                output = output.clone()
            output[rows] += adapter.delta(name, args[0][rows])
            return output
        return run

    def _branch_rows(self) -> dict[int, slice]:
        kb = self.method.k
        return {k: slice(k, None, kb) for k in range(kb)}

    def _forward(self, cache: SlotCache, hook_rows, phase: str = "decode",
                 prompt_mask: torch.Tensor | None = None, gate_on: torch.Tensor | None = None,
                 steps: torch.Tensor | None = None, keep: int = 1, **inputs) -> torch.Tensor:
        """The model's logits at each row's last position ``[rows, V]`` (``keep`` > 1: its last
        ``keep`` positions, ``[rows, keep, V]``)."""
        with self._forward_context(hook_rows, phase, prompt_mask, gate_on, steps):
            out = self.model(**inputs, **cache_kwargs(self.model, cache), logits_to_keep=keep)
        return out.logits[:, -1, :] if keep == 1 else out.logits[:, -keep:, :]

    # -- prefixes ---------------------------------------------------------------------------
    def prefix_kv(self, k: int, prefix: Prefix) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Branch ``k``'s prefix KV per layer ``[1, H, P, D]``, computed once per store."""
        return self.prefix_kvs({k: [prefix]})[prefix.key]

    def prefix_kvs(self, by_branch: dict[int, Sequence[Prefix]]
                   ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The prefix KVs of each branch ``k``'s ``by_branch[k]``, by key (a key names its
        branch); the ones not stored are computed together in one forward (rows left-padded to
        the longest, each branch's rows under its effects), each that extends a stored prefix
        (``Prefix.bases``: a growing chat's history, a longer common start) only from the
        base's end, on top of the base's KV."""
        out, todo, hook_rows, seen = {}, [], {}, set()
        for k, prefixes in by_branch.items():
            first = len(todo)
            for p in prefixes:
                if p.key in self.prefixes:
                    out[p.key] = self.prefixes.get(p.key)
                elif p.key not in out and p.key not in seen:
                    seen.add(p.key)
                    todo.append(p)
            if len(todo) > first:
                hook_rows[k] = slice(first, len(todo))
        if not todo:
            return out
        dev, n_rows = self.device, len(todo)
        picks = [self._base(p) for p in todo]
        bases = [pick[2] if pick else 0 for pick in picks]
        ends = [len(p) for p in todo]
        t, attend = max(e - b for e, b in zip(ends, bases, strict=True)), max(ends)
        cache = SlotCache(self.num_layers, n_rows, attend)
        cols = torch.full((n_rows, t), cache.sink, dtype=torch.long)
        emb = torch.zeros(n_rows, t, self.embed.weight.shape[1], dtype=self.embed.weight.dtype,
                          device=dev)
        for r, (p, b, e) in enumerate(zip(todo, bases, ends, strict=True)):
            if b:  # the base's first b columns (it may go on differently)
                cache.write_prefix(torch.tensor([r], device=dev), [
                    (k_[:, :, :b], v_[:, :, :b]) for k_, v_ in picks[r][0].get(picks[r][1])])
            cols[r, t - (e - b):] = torch.arange(b, e)
            emb[r, t - (e - b):] = p.embeds(self.embed)[b:]
        mask, q_cols = self._padded_mask(cols, cache.sink, attend)
        cache.bind(slice(0, n_rows), torch.arange(n_rows, device=dev), cols.to(dev), attend)
        self._forward(cache, hook_rows, phase="prefix", inputs_embeds=emb,
                      position_ids=q_cols.to(dev), attention_mask=mask)
        self.prefixes.forwards += 1
        for r, (p, b, e) in enumerate(zip(todo, bases, ends, strict=True)):
            kv = cache.read(r, e)
            self.prefixes.put(p.key, kv, computed=e - b)
            out[p.key] = kv
            if b and picks[r][3]:
                picks[r][0].demote(picks[r][1])
        return out

    def prefix_missing(self, built: Built) -> list[tuple[int, Prefix]]:
        """The branches (index, prefix) of one sequence whose prefix KV is not stored."""
        if not self.prefix_cache:
            return []
        return [(k, p) for k, (p, _) in enumerate(built) if len(p) and p.key not in self.prefixes]

    def advance_prefix(self, k: int, prefix: Prefix, budget: int) -> int:
        """Compute up to ``budget`` more columns of branch ``k``'s ``prefix`` (chunked
        prefill of a long prefix while others decode): on top of its part computed so far (a
        store entry of its own, dropped once extended) or of its best stored base; stored
        whole under its key once done. Returns the columns computed."""
        done = self.prefixes.partial.get(prefix.key)
        part = f"{prefix.key}#{done}" if done is not None else None
        if part is None or part not in self.prefixes:
            pick = self._base(prefix)
            done, part = (pick[2] if pick else 0), None
        bases = ((part, done, True), *prefix.bases) if part else prefix.bases
        cut = prefix.cut(done + max(1, budget), "")
        whole = len(cut) >= len(prefix)
        step = replace(prefix if whole else cut, bases=bases,
                       key=prefix.key if whole else f"{prefix.key}#{len(cut)}")
        before = self.prefixes.computed_tokens
        self.prefix_kvs({k: [step]})
        if part is not None:
            self.prefixes.drop(part)
        if whole:
            self.prefixes.partial.pop(prefix.key, None)
        else:
            self.prefixes.partial[prefix.key] = len(cut)
        return self.prefixes.computed_tokens - before

    def _base(self, prefix: Prefix) -> tuple[PrefixStore, str, int, bool] | None:
        """The first of ``prefix.bases`` still stored: (its store, key, columns to take,
        spent), or None."""
        for key, n, spent in prefix.bases:
            for store in (self.turns, self.prefixes):
                if key in store:
                    return store, key, min(n, len(prefix) - 1), spent
        return None

    def _padded_mask(self, cols: torch.Tensor, sink: int, attend: int):
        """For left-padded rows whose tokens sit at columns ``cols`` ``[rows, t]`` (``sink``:
        padding): the model's attention mask over the first ``attend`` columns (causal, the
        model's windows applied; a padding query sees column 0 only, so its row stays finite)
        and the query columns (padding: 0)."""
        j = torch.arange(attend)
        real = cols < sink
        allowed = (j[None, None, :] <= cols[:, :, None]) & real[:, :, None]
        allowed[:, :, 0] |= ~real
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(
            ~allowed, torch.finfo(self.dtype).min)[:, None]
        q_cols = torch.where(real, cols, 0)
        return self.masks(mask.to(self.device), q_cols), q_cols

    # -- prefill ----------------------------------------------------------------------------
    def _prompt_rows(self, state: DecodeState, slots: tuple[int, ...], built: list[Built],
                     write: list[bool] | None = None):
        """Write the shared prefixes of new sequences ``slots`` into their rows (those with
        ``write[i]``; default all); returns per row (sequence-major) the column its new tokens
        start at, their ids and the soft prefix they start with (None: ids only)."""
        kb, dev = self.method.k, self.device
        shared = self.prefix_cache
        starts, seqs, soft = [], [], []
        groups: dict[tuple[int, str], tuple[Prefix, list[int]]] = {}
        for i, per_branch in enumerate(built):
            for k, (prefix, suffix) in enumerate(per_branch):
                r = slots[i] * kb + k
                if shared:
                    if len(prefix) and (write is None or write[i]):
                        groups.setdefault((k, prefix.key), (prefix, []))[1].append(r)
                    starts.append(len(prefix))
                    seqs.append(list(suffix))
                    soft.append(None)
                else:
                    starts.append(0)
                    if prefix.soft is None:
                        seqs.append(prefix.ids + list(prefix.tail_ids) + list(suffix))
                        soft.append(None)
                    else:
                        seqs.append(list(suffix))
                        soft.append(prefix)
        by_branch: dict[int, list[Prefix]] = {}
        for (k, _), (prefix, _rows) in groups.items():
            by_branch.setdefault(k, []).append(prefix)
        kv = self.prefix_kvs(by_branch)  # one forward for all branches
        for (_, key), (_, r) in groups.items():
            state.cache.write_prefix(torch.tensor(r, dtype=torch.long, device=dev), kv[key])
        return starts, seqs, soft

    def prompt_lengths(self, built: Built) -> list[int]:
        """New tokens (soft prefix included) per branch row of one sequence's prompt: what
        its prefill feeds after the shared prefix."""
        if self.prefix_cache:
            return [len(suffix) for _, suffix in built]
        return [len(p) + len(x) for p, x in built]  # len(p): soft, ids and tail together

    def prefill(self, state: DecodeState, slots: tuple[int, ...], built: list[Built],
                extra: Sequence[int] | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Write the prompts of new sequences ``slots`` (``built[i][k]`` = prefix and suffix of
        sequence i under branch k) into their rows; returns their next-token logits [n, K, V].
        ``extra[i]`` = e > 0: also the logits ``[e, K, V]`` of sequence i's e positions before
        its last (a scored answer's tokens fed with the prompt: :meth:`forced_scores`), as a
        second value (one per sequence, None where e = 0)."""
        kb, dev = self.method.k, self.device
        rows, index, _ = state.layout(slots)
        starts, seqs, soft = self._prompt_rows(state, slots, built)
        lengths = [len(s) + (len(p) if p is not None else 0) for s, p in zip(seqs, soft,
                                                                               strict=True)]
        t = max(lengths)
        n_rows = len(seqs)
        cols = torch.full((n_rows, t), state.cache.sink, dtype=torch.long)
        pos = torch.zeros(n_rows, t, dtype=torch.long)
        ids = torch.full((n_rows, t), self.pad_id, dtype=torch.long)
        for r, (st, seq, n) in enumerate(zip(starts, seqs, lengths, strict=True)):
            cols[r, t - n:] = torch.arange(st, st + n)
            pos[r, t - n:] = torch.arange(st, st + n)
            if soft[r] is None:
                ids[r, t - n:] = torch.tensor(seq, dtype=torch.long)
        ends = [st + n for st, n in zip(starts, lengths, strict=True)]
        attend = min(state.columns, round_up(max(ends)))
        mask, _ = self._padded_mask(cols, state.cache.sink, attend)
        if self.max_positions:
            pos.clamp_(max=self.max_positions - 1)
        inputs: dict = {"input_ids": ids.to(dev)}
        if any(p is not None for p in soft):
            emb = self.embed(ids.to(dev))
            for r, p in enumerate(soft):
                if p is not None:
                    n = lengths[r]
                    emb[r, t - n:] = torch.cat([p.embeds(self.embed), self.embed(
                        torch.tensor(seqs[r], dtype=torch.long, device=dev))])
            inputs = {"inputs_embeds": emb}
        for i, s in enumerate(slots):
            state.set_rows(s, [ends[i * kb + k] for k in range(kb)])
        cols = cols.to(dev)
        state.cache.bind(rows, index, cols, attend)
        prompt_mask = None
        if self._prompt_hooks:  # each row's suffix: its last len(suffix) positions
            own = torch.tensor([len(suffix) for per_branch in built for _, suffix in per_branch])
            prompt_mask = (torch.arange(t)[None] >= t - own[:, None]).to(dev)
        gate_on = state.gate_on[index].clone() if self._gated else None  # the hooks write it
        most = max(extra) if extra else 0
        logits = self._forward(state.cache, self._branch_rows(), phase="prefill",
                               prompt_mask=prompt_mask, gate_on=gate_on, keep=most + 1,
                               attention_mask=mask, position_ids=pos.to(dev), **inputs)
        if gate_on is not None:
            state.gate_on[index] = gate_on
        if extra is None:
            return logits.view(len(slots), kb, -1)
        if not most:
            return logits.view(len(slots), kb, -1), [None] * len(slots)
        extras = [logits[i * kb:(i + 1) * kb, most - e:most].transpose(0, 1) if e else None
                  for i, e in enumerate(extra)]  # rows end-aligned: their last positions
        return logits[:, -1].reshape(len(slots), kb, -1), extras

    # -- decode and prefill in one forward ---------------------------------------------------
    @property
    def can_pack(self) -> bool:
        """Whether :meth:`packed` may run: not switched off, the routing check not failed, the
        model on SDPA attention (the packed function is SDPA per group; eager or other kernels
        may carry model-specific terms such as soft-capping) and no branch hooks or adapters
        (they index rows of a padded batch)."""
        return self.pack is not False and not self._effects["prefill"] \
            and not self._effects["decode"] \
            and getattr(self.model.config, "_attn_implementation", None) == "sdpa"

    def packed(self, state: DecodeState, running: tuple[int, ...], new: tuple[int, ...],
               built: list[Built], chunks: list[tuple[int, int]] | None = None,
               extra: Sequence[int] | None = None
               ) -> tuple[torch.Tensor | None, torch.Tensor, list | None] | None:
        """Decode ``running`` and prefill ``new`` in one packed forward (:mod:`.packed`);
        returns their logits ``([n_run, K, V] or None, [n_done, K, V], extras)``, or None
        (nothing done) when this model's attention did not route through the packed function
        on the first try — the caller then runs :meth:`decode` and :meth:`prefill`.
        ``extra``: as :meth:`prefill`'s (the last ``extra[i]`` tokens of each of sequence i's
        rows are its given answer); ``extras`` then has one entry per new sequence: the logits
        ``[m, K, V]`` of the answer positions this chunk feeds (:func:`answer_positions`;
        None where none), or None without ``extra``.

        ``chunks[i] = (a, b)``: feed only part of sequence i's prompt (chunked prefill). Its
        rows are aligned at their ends (a row ``d`` tokens shorter than the longest starts
        ``d`` later), ``a .. b`` counts on the longest row, and the logits come back only for
        the sequences whose chunk ends their prompt (``b`` = the longest row's length), in
        order. Default: every prompt whole."""
        kb, dev, dt = self.method.k, self.device, self.dtype
        neg = torch.finfo(dt).min
        n_dec, dec_rows, dec_attend, dec_mask, dec_slid = 0, None, 0, None, None
        tok_rows, tok_cols, tok_ids = [], [], []
        if running:
            dec_rows, index, sidx = state.layout(running)
            dec_attend = state.attend(running, extra=1)
            cols = state.lens[index]
            state.bias.index_put_((index, cols), torch.zeros((), dtype=dt, device=dev))
            dec_mask = state.bias[dec_rows, :dec_attend][:, None, None, :]
            dec_slid = self.masks.slide(dec_mask, cols[:, None])
            n_dec = len(running) * kb
            tok_rows.append(index)
            tok_cols.append(cols)
            tok_ids.append(state.last[sidx].repeat_interleave(kb))
        if chunks is None:
            chunks = [(0, max(self.prompt_lengths(b))) for b in built]
        starts, seqs, soft = self._prompt_rows(state, new, built, [a == 0 for a, _ in chunks])
        lengths = [n for b in built for n in self.prompt_lengths(b)]  # the engine's measure
        spans, done = [], []  # per row: [lo, hi) of its own tokens fed now
        for i in range(len(new)):
            a, b = chunks[i]
            longest = max(lengths[i * kb:(i + 1) * kb])
            done.append(b == longest)
            for n in lengths[i * kb:(i + 1) * kb]:
                shift = longest - n
                spans.append((max(0, a - shift), max(0, b - shift)))
        ends = [st + hi for st, (_, hi) in zip(starts, spans, strict=True)]
        n_rows, t = len(seqs), max(1, *(hi - lo for lo, hi in spans))
        pf_tok = torch.zeros(n_rows, t, dtype=torch.long)
        pf_valid = torch.zeros(n_rows, t, dtype=torch.bool)
        q_cols = torch.zeros(n_rows, t, dtype=torch.long)  # padding queries: column 0
        offset, last, ids, cols_pf, soft_at = n_dec, [], [], [], []
        for r, (st, q, n, (lo, hi)) in enumerate(zip(starts, seqs, lengths, spans,
                                                     strict=True)):
            m = hi - lo
            pf_tok[r] = offset
            pf_tok[r, :m] = torch.arange(offset, offset + m)
            pf_valid[r, :m] = True
            q_cols[r, :m] = torch.arange(st + lo, st + hi)
            cols_pf.append(q_cols[r, :m])
            pad = n - len(q)  # a soft prefix's places: embedded below
            ids += [self.pad_id if j < pad else q[j - pad] for j in range(lo, hi)]
            soft_at.append(offset)
            offset += m
            last.append(offset - 1)
        # a row with no token in this chunk (shorter than its sequence's longest, which it
        # joins later) points its padding at the packed tokens' end: a token that exists
        pf_tok.clamp_(max=offset - 1)
        pf_attend = min(state.columns, round_up(max(ends)))
        allowed = torch.arange(pf_attend)[None, None, :] <= q_cols[:, :, None]
        pf_mask = torch.zeros(allowed.shape, dtype=dt).masked_fill_(~allowed, neg)[:, None]
        pf_rows, pf_index, _ = state.layout(new)
        tok_rows.append(pf_index.repeat_interleave(
            torch.tensor([hi - lo for lo, hi in spans], device=dev)))
        tok_cols.append(torch.cat(cols_pf).to(dev))
        tok_ids.append(torch.tensor(ids, dtype=torch.long, device=dev))
        index, cols = torch.cat(tok_rows), torch.cat(tok_cols)
        pf_mask = pf_mask.to(dev)
        plan = PackPlan(n_dec, dec_rows, dec_attend, dec_mask, pf_rows, pf_tok.to(dev),
                        pf_valid.to(dev), pf_attend, pf_mask, window=self.masks.window,
                        dec_slid=dec_slid, pf_slid=self.masks.slide(pf_mask, q_cols))
        pos = cols.clamp(max=self.max_positions - 1) if self.max_positions else cols
        inputs: dict = {"input_ids": torch.cat(tok_ids)[None]}
        if any(p is not None for p in soft):
            emb = self.embed(inputs["input_ids"])
            for r, p in enumerate(soft):
                lo, hi = spans[r]
                if p is not None and lo < len(p):
                    emb[0, soft_at[r]:soft_at[r] + min(hi, len(p)) - lo] = \
                        p.embeds(self.embed)[lo:hi]
            inputs = {"inputs_embeds": emb}
        fed_answer = [answer_positions(*chunks[i], max(lengths[i * kb:(i + 1) * kb]), e)
                      for i, e in enumerate(extra or ())]  # a scored answer's, this chunk
        more = [last[i * kb + k] - (chunks[i][1] - 1 - c)  # row ends at the chunk's end
                for i, cs in enumerate(fed_answer) for c in cs for k in range(kb)]
        keep = torch.cat([torch.arange(n_dec), torch.tensor(
            [last[i * kb + k] for i in range(len(new)) if done[i] for k in range(kb)] + more,
            dtype=torch.long)]).to(dev)
        for i, slot in enumerate(new):
            state.set_rows(slot, [ends[i * kb + k] for k in range(kb)])
        state.cache.bind(index, index, cols, 0, packed=True)
        try:
            with packed_attention_on(self.model), routed(self._gemm):
                out = self.model(**inputs, attention_mask=torch.zeros(1, 1, 1, 1, dtype=dt,
                                                                      device=dev),
                                 position_ids=pos[None], **cache_kwargs(self.model,
                                                                        state.cache),
                                 logits_to_keep=keep, safedecode_pack=plan)
            routed_ok = plan.calls == self.num_layers and \
                plan.slid_calls == self.masks.sliding_layers
            error = None if routed_ok else (
                f"{plan.calls} of {self.num_layers} layers ran the packed attention, "
                f"{plan.slid_calls} of {self.masks.sliding_layers} with a sliding window")
        except (RuntimeError, TypeError, ValueError, KeyError) as exc:
            if self.pack:
                raise
            routed_ok, error = False, f"{type(exc).__name__}: {exc}"
        if not routed_ok:
            if self.pack:
                raise RuntimeError(f"packed forward: {error}")
            warnings.warn(f"safedecode: this model cannot run packed decode+prefill forwards "
                          f"({error}); using two forwards per admission step", stacklevel=2)
            self.pack = False
            return None
        self.pack = True
        logits = out.logits[0]
        if running:
            state.advance(running, dec_rows, state.layout(running)[1])
        dec = logits[:n_dec].view(len(running), kb, -1) if running else None
        at = n_dec + sum(done) * kb
        pre = logits[n_dec:at].view(sum(done), kb, logits.shape[-1])
        if extra is None:
            return dec, pre, None
        extras = []
        for cs in fed_answer:
            m = len(cs)
            extras.append(logits[at:at + m * kb].view(m, kb, -1) if m else None)
            at += m * kb
        return dec, pre, extras

    # -- decode -----------------------------------------------------------------------------
    def live_rows(self, state: DecodeState, slots: tuple[int, ...]) -> tuple[int, ...] | None:
        """The rows of ``slots`` a decode step must run (see ``drop_rows``), or None for all.
        A sequence's gate comes back with its first step's tokens (:meth:`sample`); one not
        known yet is read here (a sequence decoded outside :class:`Engine.step`)."""
        if not self.drop_rows:
            return None
        kb, gate = self.method.k, state.host_gate
        unknown = [s for s in slots if gate[s] is None]
        if unknown:
            g = self.method.contrast_gate
            on = state.gate_on[torch.tensor([s * kb + g for s in unknown],
                                            device=self.device)].tolist()
            for s, v in zip(unknown, on, strict=True):
                gate[s] = bool(v)
        rows = tuple(s * kb + j for s in slots for j in self._need[gate[s]])
        return None if len(rows) == len(slots) * kb else rows

    def branches_run(self, state: DecodeState, slot: int) -> tuple[int, ...] | None:
        """The branches whose rows sequence ``slot``'s decode steps ran (their KV whole), or
        None for all (see ``drop_rows``)."""
        gate = state.host_gate[slot] if self.drop_rows else None
        return None if gate is None else self._need[gate]

    def _sparse_layout(self, slots: tuple[int, ...], rows: tuple[int, ...]) -> tuple:
        """``(index, slot of each row, out position of each row, hook rows per branch)``."""
        hit = self._sparse.get((slots, rows))
        if hit is not None:
            return hit
        kb, dev = self.method.k, self.device
        at = {s: i for i, s in enumerate(slots)}
        index = torch.tensor(rows, dtype=torch.long, device=dev)
        out = torch.tensor([at[r // kb] * kb + r % kb for r in rows], dtype=torch.long,
                           device=dev)
        hook_rows = {k: torch.tensor([p for p, r in enumerate(rows) if r % kb == k],
                                     dtype=torch.long, device=dev)
                     for k in range(kb) if any(r % kb == k for r in rows)}
        hit = (index, index // kb, out, hook_rows)
        if len(self._sparse) > 64:
            self._sparse.clear()
        self._sparse[(slots, rows)] = hit
        return hit

    def _decode_rows(self, state: DecodeState, slots: tuple[int, ...],
                     rows: tuple[int, ...]) -> torch.Tensor:
        """:meth:`decode` over ``rows`` only; the other rows' logits are 0 (the op and the
        contrast gate do not read them)."""
        kb = self.method.k
        index, sidx, out, hook_rows = self._sparse_layout(slots, rows)
        attend = state.attend(slots, extra=1)
        cols = state.lens[index]
        state.bias.index_put_((index, cols), torch.zeros((), dtype=self.dtype,
                                                         device=self.device))
        cols = cols[:, None]
        start = self.masks.start(state.shortest(rows)) if self.masks.window is not None else 0
        mask = self.masks(state.bias[index, :attend][:, None, None, :], cols, start)
        state.cache.bind(index, index, cols, attend, start=start)
        logits = self._forward(state.cache, hook_rows, input_ids=state.last[sidx][:, None],
                               attention_mask=mask, position_ids=cols,
                               gate_on=state.gate_on[index] if self._gated else None,
                               steps=state.step[sidx] if self._windowed else None)
        state.advance_rows(rows, index)
        full = logits.new_zeros(len(slots) * kb, logits.shape[-1])
        full[out] = logits
        return full.view(len(slots), kb, -1)

    def decode(self, state: DecodeState, slots: tuple[int, ...]) -> torch.Tensor:
        """Feed each sequence's last sampled token; returns the next-token logits [n, K, V]."""
        live = self.live_rows(state, slots)
        if live is not None:
            return self._decode_rows(state, slots, live)
        kb = self.method.k
        rows, index, sidx = state.layout(slots)
        attend = state.attend(slots, extra=1)
        cols = state.lens[index]
        state.bias.index_put_((index, cols), torch.zeros((), dtype=self.dtype,
                                                         device=self.device))
        ids = state.last[sidx].repeat_interleave(kb)[:, None]
        start = 0
        if self.compiled is not None:  # static shapes: attend over every column (masked)
            attend = state.columns
        elif self.masks.window is not None:  # windowed layers read the columns a query sees
            start = self.masks.start(min(state.shortest(state.rows_of(s)) for s in slots))
        cols = cols[:, None]
        mask = self.masks(state.bias[rows, :attend][:, None, None, :], cols, start)
        state.cache.bind(rows, index, cols, attend, start=start)
        if self.compiled is not None:
            logits = self.compiled(ids, mask, cols, state.cache)
        else:
            logits = self._forward(state.cache, self._branch_rows(), input_ids=ids,
                                   attention_mask=mask, position_ids=cols,
                                   gate_on=state.gate_on[index] if self._gated else None,
                                   steps=state.step[sidx].repeat_interleave(kb)
                                   if self._windowed else None)
        state.advance(slots, rows, index)
        return logits.view(len(slots), kb, -1)

    # -- sampling ---------------------------------------------------------------------------
    def gate_contrast(self, state: DecodeState, slots: tuple[int, ...], logits: torch.Tensor
                      ) -> torch.Tensor:
        """``[n, K, V]`` logits of ``slots`` with :attr:`Method.contrast_gate` applied: for the
        requests whose gate did not hold, the fallback branch's logits in the anchor's place and
        the other weighted branches uniform (linear rule) or the fallback's (union rule), so the
        op gives the fallback's distribution; weight-0 branches (DeAL's proposals) kept."""
        m = self.method
        if m.contrast_gate is None:
            return logits
        _, _, sidx = state.layout(slots)
        on = state.gate_on[sidx * m.k + m.contrast_gate][:, None, None]
        a = m.anchor
        fb = logits[:, (a if m.fallback is None else m.fallback):][:, :1]
        other = fb if m.rule == "union" else torch.zeros_like(fb)
        off = torch.cat([fb if k == a else logits[:, k:k + 1] if w == 0 else other
                         for k, w in enumerate(m.weights)], dim=1)
        return torch.where(on, logits, off)

    def _final(self, logits: torch.Tensor, knobs: dict) -> torch.Tensor:
        """``[n, V]``: each row's final log-distribution (rows with bad logits: all -inf)."""
        return contrastive_logprobs(logits.permute(1, 0, 2), self.weights, check_inputs=False,
                                    **knobs)

    @staticmethod
    def _top(lp: torch.Tensor, top: int) -> list[torch.Tensor]:
        """The ``top`` best tokens of each row of ``lp``: ``top`` rows of ids and ``top`` of
        log-probs, ``[top, n]`` each."""
        vals, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)
        ids, order = ids.sort(dim=-1)  # ties: lowest id first, as the greedy choice
        vals = vals.gather(1, order)
        vals, order = vals.sort(dim=-1, descending=True, stable=True)
        ids = ids.gather(1, order)
        return [*ids.double().T, *vals.double().T]

    def forced_scores(self, state: DecodeState, slots: tuple[int, ...],
                      logits: list[torch.Tensor], tokens: list[list[int]], top: int = 0
                      ) -> torch.Tensor:
        """The given ``tokens[i]`` of sequence ``slots[i]`` scored at the positions whose
        logits ``[e_i, K, V]`` the prefill kept (:meth:`prefill`'s ``extra``): ``[1 (+ 2 top),
        Σ e_i]`` float64 — each token's log-prob under the final distribution (the same op as
        :meth:`sample`'s ``forced``; the sequences have no penalties or bans), then ``top``
        rows of the best ids and ``top`` of their log-probs."""
        m = self.method
        _, _, sidx = state.layout(slots)
        rep = torch.tensor([len(t) for t in tokens], device=sidx.device)
        idx = sidx.repeat_interleave(rep)
        knobs = dict(rule=m.rule, anchor=m.anchor, beta=m.beta,
                     temperature=state.temperature[idx], top_k=state.top_k[idx],
                     top_p=state.top_p[idx], min_p=state.min_p[idx], backend=self.backend)
        final = self._final(torch.cat(logits), knobs)
        given = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long,
                             device=final.device)
        parts = [final.gather(1, given[:, None])[:, 0].double()]
        if top:
            parts += self._top(final, top)
        return torch.stack(parts)

    @property
    def scores_in_prefill(self) -> bool:
        """Whether a scored answer's tokens may be fed with its prompt and scored from that
        forward's logits: no branch hooks or adapters (a prefill and a decode step would run
        them differently), no contrast gate, no sentence-stop rule."""
        return not self._effects["prefill"] and not self._effects["decode"] \
            and self.method.contrast_gate is None and self.stop is None

    def sample(self, state: DecodeState, slots: tuple[int, ...], logits: torch.Tensor,
               logprobs: bool, top: int = 0, forced: torch.Tensor | None = None,
               bans: tuple[list[int], list[int]] | None = None,
               biases: tuple[list[int], list[int], list[float]] | None = None
               ) -> torch.Tensor:
        """One token per sequence from its ``[n, K, V]`` logits; records it as the sequence's
        next input and advances its step. Returns ``[tokens; status (; logprobs)
        (; top ids; top log-probs)]`` as one float64 tensor on the device (the caller reads it
        back with one transfer); ``top`` > 0 adds the ``top`` most likely tokens of each row's
        final distribution (``top`` rows of ids, then ``top`` of log-probs, best first, lowest
        id first on ties; ``-inf`` past the final set). ``forced`` (``[n]``, -1: sample): the
        token each row takes instead of sampling (scoring a given text), its log-prob under
        the final distribution (``-inf`` where that excludes it). ``bans`` / ``biases``:
        this step's ``(rows, token ids)`` excluded and ``(rows, token ids, values)`` biased
        besides the slots' own (:meth:`DecodeState.adjust`)."""
        m = self.method
        _, _, sidx = state.layout(slots)
        logits = state.adjust(slots, sidx, logits, self.adjust_coef, bans, biases)
        knobs = dict(rule=m.rule, anchor=m.anchor, beta=m.beta,
                     temperature=state.temperature[sidx], top_k=state.top_k[sidx],
                     top_p=state.top_p[sidx], min_p=state.min_p[sidx], backend=self.backend)
        tokens, lps, status = contrastive_sample_with_status(
            logits.permute(1, 0, 2), self.weights, seed=state.seed[sidx],
            step=state.step[sidx], return_logprobs=logprobs, **knobs)
        final = self._final(logits, knobs) if top or forced is not None else None
        if forced is not None:
            on = forced >= 0
            given = forced.clamp(min=0)
            tokens = torch.where(on & (status == 0), given, tokens)
            if logprobs:
                lps = torch.where(on, final.gather(1, given[:, None])[:, 0], lps)
        if self.stop is not None:  # a flagged answer that has just ended a sentence ends
            cut = self.stop.apply(state, sidx, m.k) & (status == 0) \
                & (state.step[sidx] >= state.min_tokens[sidx])
            if forced is not None:
                cut &= forced < 0
            tokens = torch.where(cut, self.stop.eos, tokens)
            if logprobs:
                lps = torch.where(cut, 0.0, lps)  # the rule leaves it no other token
        state.last[sidx] = tokens.clamp(min=0)
        state.record(sidx, tokens)
        state.step.index_add_(0, sidx, torch.ones_like(sidx))
        parts = [tokens.double(), status.double()]
        if logprobs:
            parts.append(lps.double())
        if top:
            parts += self._top(final, top)
        if self.drop_rows:  # each sequence's gate, read with the step (DecodeState.host_gate)
            parts.append(state.gate_on[sidx * m.k + m.contrast_gate].double())
        return torch.stack(parts)
