"""The harmlessness reward model for the embedded model: DeAL's and the router's ``harmless``
reward (:class:`HarmlessReward`).

A scalar head on SmolLM2-135M-Instruct (a LoRA adapter and the score head, with peft), trained
with TRL's ``RewardTrainer`` on preference pairs from the anchor set's **train** part — for a
harmful request its refusal over a compliance, for a safe request its answer over a refusal
(:mod:`safedecode.training.reward_model`, ``safedecode train-reward``). The adapter for the
default model ships in ``safedecode/methods/assets/harmless_rm/``. Needs the ``train`` extra
(peft).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from .rewards import Reward

ASSET = Path(__file__).parent / "assets" / "harmless_rm"
PAD = "<|endoftext|>"  # not the chat template's end-of-turn token (the score reads the last)


def conversation(prompt: str, reply: str) -> list[dict]:
    """A user prompt and the assistant's reply as chat messages (what the reward model scores)."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def scalar_head_model(model_path: str | None):
    """The model (default: the embedded one) with a one-label sequence-classification head on
    the causal model's own body, and its tokenizer (padded with :data:`PAD`)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from safedecode.models import default_model_dir, quiet_loading

    quiet_loading()
    path = model_path or str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    if PAD in tok.get_vocab():
        tok.pad_token = PAD
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    # A model with tied embeddings stores them once, as lm_head: the classification class has
    # no lm_head, so its embeddings would be freshly (randomly) initialised. Take the causal
    # model's body instead.
    causal = AutoModelForCausalLM.from_pretrained(path)
    body = model.base_model_prefix
    getattr(model, body).load_state_dict(getattr(causal, body).state_dict())
    del causal
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def reward_key(path: str | Path | None = None) -> str:
    """The reward model's identity (a hash of its weights), without loading it: a cache of its
    scores is fresh only under the same key."""
    import hashlib

    blob = (Path(path or ASSET) / "adapter_model.safetensors").read_bytes()
    return f"harmless:{hashlib.sha256(blob).hexdigest()[:16]}"


class PrefixStore:
    """Each key's last token prefix and its KV (per layer ``(keys, values)``, ``[heads,
    tokens, dim]``), at most ``size`` keys, the least recently used dropped first (0: none)."""

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"keep_prefixes: a number of prompts >= 0, got {size!r}")
        self.size = size
        self._items: OrderedDict[str, tuple[list[int], list]] = OrderedDict()
        self._lock = threading.Lock()  # a reward thread and the caller's may both score

    def get(self, key: str, ids: Sequence[int]) -> tuple[int, list | None]:
        """How many leading tokens of ``ids`` the stored prefix of ``key`` covers, and its KV."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return 0, None
            self._items.move_to_end(key)
        n = len(os.path.commonprefix([item[0], list(ids)]))
        return (n, item[1]) if n else (0, None)

    def put(self, key: str, ids: Sequence[int], kv: list) -> None:
        if not self.size:
            return
        with self._lock:
            self._items[key] = (list(ids), kv)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class HarmlessReward(Reward):
    """The trained reward model's scalar score of (prompt, reply) as a chat.

    Texts scored against the same prompt (a router's two beginnings, DeAL's candidates and
    their rollouts) share their chat-formatted prompt and often a committed reply prefix: with
    ``share_prefix`` (the default) each group's longest common token prefix is run once and its
    KV cache is reused for every text's own tail, so a call costs the distinct tokens, not the
    total. Scores equal the unshared forward's (``share_prefix=False``) up to float rounding.

    Across calls, each prompt's last shared prefix stays stored (``keep_prefixes`` prompts, least
    recently scored dropped first): a DeAL answer's next search step runs only the reply it
    committed since, not its chat-formatted prompt again. A stored prefix is reused only as far
    as its token ids match."""

    name = "harmless"

    def __init__(self, path: str | None = None, *, model_path: str | None = None,
                 batch_size: int = 16, share_prefix: bool = True,
                 keep_prefixes: int = 32) -> None:
        import torch
        from peft import PeftModel

        path = path or str(ASSET)
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"harmless reward: no adapter in {path} (train one with "
                             "`safedecode train-reward --out DIR`)")
        self.path = path
        base, tok = scalar_head_model(model_path)
        with warnings.catch_warnings():  # peft asks transformers a name it deprecates
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            self.model = PeftModel.from_pretrained(base, path).merge_and_unload().eval()
        self.tok, self.batch_size, self.torch = tok, batch_size, torch
        self.share_prefix = share_prefix
        self.prefixes = PrefixStore(keep_prefixes)

    def key(self) -> str:
        return reward_key(self.path)

    def to(self, device) -> HarmlessReward:
        self.model.to(device)
        self.prefixes.clear()  # stored on the old device
        return self

    def __call__(self, prompts, texts) -> list[float]:
        if len(prompts) != len(texts):
            raise ValueError(f"harmless reward: {len(prompts)} prompts for {len(texts)} texts")
        ids = [self.tok.apply_chat_template(conversation(p, t), tokenize=True,
                                            return_dict=True)["input_ids"]
               for p, t in zip(prompts, texts, strict=True)]
        if self.share_prefix and self._can_share():
            return self._score_shared(ids, prompts)
        return self._score(ids)

    def _can_share(self) -> bool:
        """Prefix sharing needs a decoder's score head and full attention in every layer: a
        sliding-window layer's cache drops old columns, and its window would count the holes
        of a row's columns (such models score every text whole)."""
        from safedecode.engine.masks import LayerMasks

        if not isinstance(getattr(self.model, "score", None), self.torch.nn.Linear):
            return False
        try:
            return LayerMasks.of(self.model).window is None
        except ValueError:  # layer kinds the engine does not mask: the model's own path
            return False

    def _pad(self, seqs: Sequence[Sequence[int]]):
        """Right-padded ``[n, width]`` ids and their attention mask."""
        torch = self.torch
        batch = torch.full((len(seqs), max(map(len, seqs))), self.tok.pad_token_id,
                           dtype=torch.long)
        mask = torch.zeros_like(batch)
        for j, seq in enumerate(seqs):
            batch[j, :len(seq)] = torch.tensor(seq)
            mask[j, :len(seq)] = 1
        device = self.model.device  # built on the host, moved once
        return batch.to(device), mask.to(device)

    def _score(self, ids: list[list[int]]) -> list[float]:
        """Every text's whole sequence, batches of like lengths."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [0.0] * len(ids)
        for i in range(0, len(order), self.batch_size):
            rows = order[i:i + self.batch_size]
            batch, mask = self._pad([ids[r] for r in rows])
            with self.torch.no_grad():
                scores = self.model(input_ids=batch,
                                    attention_mask=mask).logits[:, 0].float().tolist()
            for r, score in zip(rows, scores, strict=True):
                out[r] = score
        return out

    def _run_prefixes(self, keys: list[str], prefixes: list[list[int]]):
        """The KV cache of every prefix (a row each; ``keys[g]``'s prompt) and its attention
        mask ``[n, columns]``: what each prompt's stored prefix covers is copied in, the rest
        runs in one forward (rows right-padded, so a row's columns may have holes), and every
        prefix is stored for the next call."""
        from transformers.cache_utils import DynamicCache

        from safedecode.engine.cache import cache_kwargs

        torch, body = self.torch, self.model.base_model
        stored = [self.prefixes.get(k, ids) for k, ids in zip(keys, prefixes, strict=True)]
        done = [n for n, _ in stored]
        width = max(done)
        device = self.model.device
        past_mask = torch.zeros(len(keys), width, dtype=torch.long, device=device)
        cache = None
        if width:
            layers = []
            for layer in range(len(next(kv for _, kv in stored if kv is not None))):
                k0, v0 = next(kv[layer] for _, kv in stored if kv is not None)
                k = k0.new_zeros(len(keys), k0.shape[0], width, k0.shape[-1])
                v = v0.new_zeros(len(keys), v0.shape[0], width, v0.shape[-1])
                for g, (n, kv) in enumerate(stored):
                    if n:
                        k[g, :, :n] = kv[layer][0][:, :n]
                        v[g, :, :n] = kv[layer][1][:, :n]
                layers.append((k, v))
            cache = DynamicCache(ddp_cache_data=layers)
            for g, n in enumerate(done):
                past_mask[g, :n] = 1
        rest = [ids[n:] for ids, n in zip(prefixes, done, strict=True)]
        if any(rest):
            run, run_mask = self._pad(rest)
            positions = torch.tensor(done, device=device)[:, None] + \
                torch.arange(run.shape[1], device=device)[None, :]
            mask = torch.cat([past_mask, run_mask], 1)
            past = cache_kwargs(body, cache) if cache is not None else {"use_cache": True}
            cache = body(input_ids=run, attention_mask=mask, position_ids=positions,
                         **past).past_key_values
        else:
            mask = past_mask
        for g, (key, ids) in enumerate(zip(keys, prefixes, strict=True)):
            if not self.prefixes.size:
                break
            cols = torch.cat([torch.arange(done[g], device=device),
                              width + torch.arange(len(rest[g]), device=device)])
            self.prefixes.put(key, ids, [(lay.keys[g].index_select(1, cols),
                                          lay.values[g].index_select(1, cols))
                                         for lay in cache.layers])
        return cache, mask

    def _score_shared(self, ids: list[list[int]], prompts) -> list[float]:
        """Texts grouped by prompt; per group its common prefix once, then every tail over its
        cache (at least one token each: the score reads the last token's state)."""
        from safedecode.engine.cache import cache_kwargs

        torch = self.torch
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        cuts = {p: min(len(os.path.commonprefix([ids[r] for r in rows])),
                       min(len(ids[r]) for r in rows) - 1) for p, rows in groups.items()}
        out = [0.0] * len(ids)
        alone = [r for p in groups if not cuts[p] for r in groups[p]]  # nothing to share
        for r, score in zip(alone, self._score([ids[r] for r in alone]), strict=True):
            out[r] = score
        order = sorted((p for p in groups if cuts[p]), key=lambda p: cuts[p])  # like lengths
        body, head = self.model.base_model, self.model.score
        chunk: list[str] = []
        for n, p in enumerate(order):
            chunk.append(p)
            rows = sum(len(groups[q]) for q in chunk)
            if n + 1 < len(order) and rows + len(groups[order[n + 1]]) <= self.batch_size:
                continue
            prefixes = [ids[groups[q][0]][:cuts[q]] for q in chunk]
            members = [(g, r) for g, q in enumerate(chunk) for r in groups[q]]
            tails = [ids[r][cuts[chunk[g]]:] for g, r in members]
            with torch.no_grad():
                cache, pre_mask = self._run_prefixes(chunk, prefixes)
                device = pre_mask.device
                pick = torch.tensor([g for g, _ in members], device=device)
                cache.reorder_cache(pick)
                past_mask = pre_mask[pick]
                tail, tail_mask = self._pad(tails)
                start = torch.tensor([cuts[chunk[g]] for g, _ in members], device=device)
                positions = start[:, None] + torch.arange(tail.shape[1], device=device)[None, :]
                hidden = body(input_ids=tail, attention_mask=torch.cat([past_mask, tail_mask], 1),
                              position_ids=positions,
                              **cache_kwargs(body, cache)).last_hidden_state
                last = tail_mask.sum(1) - 1
                at = torch.arange(len(members), device=device)
                scores = head(hidden[at, last])[:, 0].float().tolist()
            for (_, r), score in zip(members, scores, strict=True):
                out[r] = score
            chunk = []
        return out


def harmlessness_reward(path: str | None = None, **kwargs) -> HarmlessReward:
    """The ``harmless`` reward: the shipped adapter (or one at ``path``); ``kwargs`` as
    :class:`HarmlessReward` takes them."""
    return HarmlessReward(path, **kwargs)
