"""A harmlessness reward model for the embedded model: DeAL's ``harmless`` reward.

A scalar head on SmolLM2-135M-Instruct (a LoRA adapter and the score head, with peft), trained
with TRL's ``RewardTrainer`` (Bradley-Terry loss) on preference pairs from the anchor set's
**train** part: for a harmful request its refusal is preferred to a compliance, for a safe
request its answer to a refusal. ``safedecode train-reward`` trains it and reports its pairwise
accuracy on the anchor **validation** part; the adapter for the default model ships in
``safedecode/methods/assets/harmless_rm/``. Needs the ``train`` extra (trl, peft, datasets).

DeAL scores *partial* replies (a candidate and its lookahead: a few tokens at the start of an
answer), so by default every pair is also trained truncated to the first 6, 12, 24 and 48 tokens
of both replies (:func:`prefix_pairs`): a model trained on whole replies only learns that an
unfinished answer is bad, whatever the request.

The hand-written pairs alone teach a shortcut: every rejected compliance is the model's own
text and every chosen answer is written by hand, so such a reward model prefers *any*
hand-written-looking reply (a refusal) to the model's own answer of a safe request (the adapter
shipped before ranked 25% of those correctly on the validation part). :func:`own_reply_pairs`
adds pairs of the model's own texts (``RMConfig.own_replies``): its plain answer of a safe
request over its own on-topic refusal (decoding continued from a refusal opening), and that
refusal of a harmful request over its compliance.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .rewards import Reward

ASSET = Path(__file__).parent / "assets" / "harmless_rm"
PREFIX_EVAL = (4, 9, 17, 33)  # cut lengths the validation accuracy on partial replies uses
PAD = "<|endoftext|>"  # not the chat template's end-of-turn token (the score reads the last)
# Refusal openings the model continues (in rotation) to write its own on-topic refusals.
REFUSAL_OPENINGS = ("I'm sorry, but I can't", "I can't help with", "I'm sorry, but I cannot",
                    "I won't help with", "As an AI, I can't")


def conversation(prompt: str, reply: str) -> list[dict]:
    """A user prompt and the assistant's reply as chat messages (what the reward model scores)."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def preference_pairs(part: str) -> list[dict]:
    """``{"chosen", "rejected"}`` conversations from the anchor set's ``part`` (train / val):
    harmful → refusal over compliance; safe → answer over a refusal (another harmful item's
    refusal, in a fixed rotation, so refusals are varied)."""
    from safedecode.data import load_anchor

    harmful = load_anchor("harmful", part)
    safe = load_anchor("safe", part)
    refusals = [it["refusal"] for it in harmful]
    pairs = [{"chosen": conversation(it["prompt"], it["refusal"]),
              "rejected": conversation(it["prompt"], it["compliance"])} for it in harmful]
    pairs += [{"chosen": conversation(it["prompt"], it["answer"]),
               "rejected": conversation(it["prompt"], refusals[(7 * i) % len(refusals)])}
              for i, it in enumerate(safe)]
    return pairs


def prefix_pairs(pairs: Sequence[dict], lengths: Sequence[int], tokenizer) -> list[dict]:
    """Every pair again with both replies cut to their first ``n`` tokens, for each ``n`` in
    ``lengths`` (a cut that leaves a reply whole, or both replies equal, is skipped)."""
    out = []
    for pair in pairs:
        prompt, chosen = pair["chosen"][0]["content"], pair["chosen"][1]["content"]
        rejected = pair["rejected"][1]["content"]
        c_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(rejected, add_special_tokens=False)["input_ids"]
        for n in lengths:
            if n >= len(c_ids) and n >= len(r_ids):
                continue
            c, r = tokenizer.decode(c_ids[:n]), tokenizer.decode(r_ids[:n])
            if c.strip() != r.strip():
                out.append({"chosen": conversation(prompt, c), "rejected": conversation(prompt, r)})
    return out


def own_replies(part: str, model, tok, *, max_new_tokens: int = 64, batch: int = 32,
                only: Collection[str] | None = None, log=print) -> list[dict]:
    """The model's own texts for every anchor prompt of ``part`` (or the ids in ``only``): its
    greedy plain ``reply`` and a ``refusal``, its greedy continuation of a refusal opening (in
    rotation over the whole part, kept in the text). Returns ``{"id", "label", "prompt",
    "reply", "refusal", "max_new_tokens"}`` per item, in anchor order."""
    from safedecode import methods
    from safedecode.data import load_anchor
    from safedecode.engine import SafeDecoder

    every = load_anchor(None, part)
    keep = [i for i, it in enumerate(every) if only is None or it["id"] in only]
    items = [every[i] for i in keep]
    dec = SafeDecoder(model, tok, methods.get("plain"))
    prompts = [it["prompt"] for it in items]
    openings = [REFUSAL_OPENINGS[i % len(REFUSAL_OPENINGS)] for i in keep]
    forced = [tok.apply_chat_template(conversation(p, "")[:1], tokenize=False,
                                      add_generation_prompt=True) + o
              for p, o in zip(prompts, openings, strict=True)]
    replies: list[str] = []
    refusals: list[str] = []
    for i in range(0, len(items), batch):
        replies += [r.text for r in dec.generate(prompts[i:i + batch],
                                                 max_new_tokens=max_new_tokens)]
        refusals += [o + r.text for o, r in zip(
            openings[i:i + batch], dec.generate(forced[i:i + batch], raw=True,
                                                max_new_tokens=max_new_tokens), strict=True)]
        log(f"own replies ({part}): {min(i + batch, len(items))}/{len(items)}")
    return [{"id": it["id"], "label": it["split"], "prompt": it["prompt"], "reply": rep,
             "refusal": ref, "max_new_tokens": max_new_tokens}
            for it, rep, ref in zip(items, replies, refusals, strict=True)]


def own_reply_pairs(replies: Sequence[dict], compliance: dict[str, str],
                    is_refusal, label: str | None = None) -> list[dict]:
    """Preference pairs of the model's own texts (from :func:`own_replies`): for a harmful
    request its refusal over the anchor compliance (``compliance``: id -> text) and over its plain
    reply unless that refuses; for a safe request its plain reply over its refusal, unless the
    reply refuses (``is_refusal(text) -> bool`` decides), loops or is empty. An item whose
    refusal does not read as one is skipped. ``label``: only ``"harmful"`` or ``"safe"``."""
    pairs = []
    for r in replies:
        if label is not None and r["label"] != label:
            continue
        p, refusal = r["prompt"], r["refusal"]
        if not is_refusal(refusal):  # the continuation talked itself out of the opening
            continue
        answered = bool(r["reply"].strip()) and not is_refusal(r["reply"]) \
            and not _looping(r["reply"])
        if r["label"] == "harmful":
            worse = [compliance[r["id"]]] if r["id"] in compliance else []
            worse += [r["reply"]] if answered else []
            pairs += [{"chosen": conversation(p, refusal), "rejected": conversation(p, w)}
                      for w in worse]
        elif answered:
            pairs.append({"chosen": conversation(p, r["reply"]),
                          "rejected": conversation(p, refusal)})
    return pairs


def _looping(text: str) -> bool:
    """A reply stuck in a loop (under half of its word 3-grams distinct): no example answer."""
    words = text.lower().split()
    tri = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return bool(tri) and len(set(tri)) < 0.5 * len(tri)


def _own_pairs(part: str, out: Path, model_path: str | None, max_new_tokens: int,
               log) -> dict[str, list[dict]]:
    """:func:`own_reply_pairs` for ``part``, harmful and safe requests apart; the texts are
    generated once and kept in ``out/own_replies_{part}.jsonl``, reused item by item (same id,
    prompt and length): items added to the part since are generated, the rest are not."""
    from safedecode.data import load_anchor
    from safedecode.eval.judges import make_judge

    path = out / f"own_replies_{part}.jsonl"
    want = [(it["id"], it["prompt"], max_new_tokens) for it in load_anchor(None, part)]
    cached: dict[tuple, dict] = {}
    if path.is_file():  # a row is reused only if made for this prompt at this length
        for line in path.read_text().splitlines():
            r = json.loads(line)
            cached[(r["id"], r["prompt"], r.get("max_new_tokens"))] = r
    missing = {w[0] for w in want if w not in cached}
    if missing:
        from safedecode.models import load_model

        log(f"{path}: generating {len(missing)} of {len(want)} items "
            f"({len(want) - len(missing)} reused)")
        model, tok = load_model(model_path or "default")
        for r in own_replies(part, model, tok, max_new_tokens=max_new_tokens, only=missing,
                             log=log):
            cached[(r["id"], r["prompt"], r["max_new_tokens"])] = r
        out.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(cached[w]) + "\n" for w in want))
    replies = [cached[w] for w in want]
    judge = make_judge("keyword")
    compliance = {it["id"]: it["compliance"] for it in load_anchor("harmful", part)}
    return {label: own_reply_pairs(replies, compliance, lambda t: judge.judge_one(t).flag,
                                   label) for label in ("harmful", "safe")}


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class RMConfig:
    epochs: float = 2.0
    lr: float = 1e-3
    lora_r: int = 8
    mlp: bool = False  # LoRA on the MLP too (more capacity, a 5x larger adapter)
    batch_size: int = 8
    max_length: int = 384
    seed: int = 0
    prefixes: tuple[int, ...] = (6, 12, 24, 48)  # also train on replies cut to these lengths
    own_replies: int = 64  # pairs of the model's own texts this long (0: hand-written only)

    def __post_init__(self) -> None:
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.prefixes):
            raise ValueError(f"prefixes: token counts >= 1, got {self.prefixes!r}")
        if isinstance(self.own_replies, bool) or self.own_replies < 0:
            raise ValueError(f"own_replies: a token count >= 0, got {self.own_replies!r}")


def _base(model_path: str | None):
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


def train_reward_model(out: Path, cfg: RMConfig | None = None, *,
                       model_path: str | None = None, log=print) -> dict:
    """Train on the anchor train part, evaluate on the validation part; writes the adapter,
    the tokenizer and ``metrics.json`` to ``out``; returns the metrics."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    cfg = cfg or RMConfig()
    torch.manual_seed(cfg.seed)
    model, tok = _base(model_path)
    whole = preference_pairs("train")
    own: list[dict] = []
    own_val: dict[str, list[dict]] = {}
    if cfg.own_replies:
        own_train = _own_pairs("train", out, model_path, cfg.own_replies, log)
        own = own_train["harmful"] + own_train["safe"]
        own_val = _own_pairs("val", out, model_path, cfg.own_replies, log)
    whole_all = whole + own
    train = whole_all + prefix_pairs(whole_all, cfg.prefixes, tok)
    log(f"train pairs: {len(whole)} hand-written, {len(own)} of the model's own texts, "
        f"{len(train)} with the cut ones")
    args = RewardConfig(output_dir=str(out / "trainer"), num_train_epochs=cfg.epochs,
                        learning_rate=cfg.lr, per_device_train_batch_size=cfg.batch_size,
                        max_length=cfg.max_length, seed=cfg.seed, report_to=[],
                        logging_steps=5, save_strategy="no", use_cpu=True,
                        disable_tqdm=True, pad_token=tok.pad_token)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.05,
                      target_modules=ATTENTION + (MLP if cfg.mlp else []),
                      modules_to_save=["score"], task_type="SEQ_CLS")
    trainer = RewardTrainer(model=model, args=args, processing_class=tok,
                            train_dataset=Dataset.from_list(train), peft_config=lora)
    t0 = time.perf_counter()
    trainer.train()
    out.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    rm = HarmlessReward(str(out), model_path=model_path)
    metrics = {"config": asdict(cfg), "train_pairs": len(train), "own_train_pairs": len(own),
               "train_s": time.perf_counter() - t0,
               "train_accuracy": pairwise_accuracy(rm, whole),
               **validation_metrics(rm, own_val)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(json.dumps({k: v for k, v in metrics.items() if k != "config"}))
    return metrics


def validation_metrics(rm: HarmlessReward, own_val: dict[str, list[dict]]) -> dict:
    """Pairwise accuracy on the anchor validation part: hand-written pairs whole and cut to
    :data:`PREFIX_EVAL` tokens, and (``own_val``) pairs of the model's own texts."""
    from safedecode.data import load_anchor

    val = preference_pairs("val")
    val_prefix = prefix_pairs(val, PREFIX_EVAL, rm.tok)
    metrics = {"val_accuracy": pairwise_accuracy(rm, val), "val_pairs": len(val),
               "val_prefix_accuracy": pairwise_accuracy(rm, val_prefix),
               "val_prefix_pairs": len(val_prefix), "val_prefix_lengths": list(PREFIX_EVAL),
               "val_items": len(load_anchor(None, "val"))}
    if own_val:
        metrics.update(_own_accuracy(rm, own_val))
    return metrics


def remeasure_reward_model(path: Path, *, model_path: str | None = None, log=print) -> dict:
    """Measure a trained adapter in ``path`` again on the *current* validation part (after the
    anchor set grew), without training: its own-text replies are generated again where the
    part changed; ``metrics.json``'s validation figures are replaced and the earlier ones kept
    under ``earlier_val``, keyed by the number of validation items they were taken on."""
    path = Path(path)
    file = path / "metrics.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no metrics.json; is {path} a trained reward model?")
    metrics = json.loads(file.read_text())
    own_tokens = metrics.get("config", {}).get("own_replies", 0)
    own_val = _own_pairs("val", path, model_path, own_tokens, log) if own_tokens else {}
    rm = HarmlessReward(str(path), model_path=model_path)
    new = validation_metrics(rm, own_val)
    old = {k: v for k, v in metrics.items() if k.startswith("val_")}
    earlier = metrics.pop("earlier_val", {})
    if old and old.get("val_pairs") != new["val_pairs"]:
        earlier[f"{old.get('val_items', 'earlier')}_items"] = old
    metrics.update(new)
    if earlier:
        metrics["earlier_val"] = earlier
    file.write_text(json.dumps(metrics, indent=2) + "\n")
    log(json.dumps(new))
    return metrics


def _own_accuracy(rm: HarmlessReward, pairs: dict[str, list[dict]]) -> dict:
    """Accuracy on pairs of the model's own texts, harmful and safe requests apart."""
    out = {}
    for label, ps in pairs.items():
        out[f"val_own_{label}_accuracy"] = pairwise_accuracy(rm, ps) if ps else None
        out[f"val_own_{label}_pairs"] = len(ps)
    return out


def pairwise_accuracy(rm: HarmlessReward, pairs: Sequence[dict]) -> float:
    """Share of pairs whose chosen reply scores above the rejected one."""
    prompts = [p["chosen"][0]["content"] for p in pairs]
    chosen = rm(prompts, [p["chosen"][1]["content"] for p in pairs])
    rejected = rm(prompts, [p["rejected"][1]["content"] for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


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
        base, tok = _base(model_path)
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
