"""Training the harmlessness reward model (DeAL's and the router's ``harmless`` reward,
:class:`safedecode.methods.harmless.HarmlessReward`).

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
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from safedecode.methods.harmless import HarmlessReward, conversation, scalar_head_model

PREFIX_EVAL = (4, 9, 17, 33)  # cut lengths the validation accuracy on partial replies uses


# Refusal openings the model continues (in rotation) to write its own on-topic refusals.
REFUSAL_OPENINGS = ("I'm sorry, but I can't", "I can't help with", "I'm sorry, but I cannot",
                    "I won't help with", "As an AI, I can't")


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
    from safedecode.judges import make_judge

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
    model, tok = scalar_head_model(model_path)
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

