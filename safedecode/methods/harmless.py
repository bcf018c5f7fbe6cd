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
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .rewards import Reward

ASSET = Path(__file__).parent / "assets" / "harmless_rm"
PREFIX_EVAL = (4, 9, 17, 33)  # cut lengths the validation accuracy on partial replies uses
PAD = "<|endoftext|>"  # not the chat template's end-of-turn token (the score reads the last)


def _chat(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def preference_pairs(part: str) -> list[dict]:
    """``{"chosen", "rejected"}`` conversations from the anchor set's ``part`` (train / val):
    harmful → refusal over compliance; safe → answer over a refusal (another harmful item's
    refusal, in a fixed rotation, so refusals are varied)."""
    from safedecode.data import load_anchor

    harmful = load_anchor("harmful", part)
    safe = load_anchor("safe", part)
    refusals = [it["refusal"] for it in harmful]
    pairs = [{"chosen": _chat(it["prompt"], it["refusal"]),
              "rejected": _chat(it["prompt"], it["compliance"])} for it in harmful]
    pairs += [{"chosen": _chat(it["prompt"], it["answer"]),
               "rejected": _chat(it["prompt"], refusals[(7 * i) % len(refusals)])}
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
                out.append({"chosen": _chat(prompt, c), "rejected": _chat(prompt, r)})
    return out


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class RMConfig:
    epochs: float = 3.0
    lr: float = 1e-3
    lora_r: int = 8
    mlp: bool = False  # LoRA on the MLP too (more capacity, a 5x larger adapter)
    batch_size: int = 8
    max_length: int = 384
    seed: int = 0
    prefixes: tuple[int, ...] = (6, 12, 24, 48)  # also train on replies cut to these lengths

    def __post_init__(self) -> None:
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.prefixes):
            raise ValueError(f"prefixes: token counts >= 1, got {self.prefixes!r}")


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
    train = whole + prefix_pairs(whole, cfg.prefixes, tok)
    val = preference_pairs("val")
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
    val_prefix = prefix_pairs(val, PREFIX_EVAL, rm.tok)
    metrics = {"config": asdict(cfg), "train_pairs": len(train),
               "train_s": time.perf_counter() - t0,
               "train_accuracy": pairwise_accuracy(rm, whole),
               "val_accuracy": pairwise_accuracy(rm, val), "val_pairs": len(val),
               "val_prefix_accuracy": pairwise_accuracy(rm, val_prefix),
               "val_prefix_pairs": len(val_prefix), "val_prefix_lengths": list(PREFIX_EVAL)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(json.dumps({k: v for k, v in metrics.items() if k != "config"}))
    return metrics


def pairwise_accuracy(rm: HarmlessReward, pairs: Sequence[dict]) -> float:
    """Share of pairs whose chosen reply scores above the rejected one."""
    prompts = [p["chosen"][0]["content"] for p in pairs]
    chosen = rm(prompts, [p["chosen"][1]["content"] for p in pairs])
    rejected = rm(prompts, [p["rejected"][1]["content"] for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


class HarmlessReward(Reward):
    """The trained reward model's scalar score of (prompt, reply) as a chat."""

    name = "harmless"

    def __init__(self, path: str | None = None, *, model_path: str | None = None,
                 batch_size: int = 16) -> None:
        import torch
        from peft import PeftModel

        path = path or str(ASSET)
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"harmless reward: no adapter in {path} (train one with "
                             "`safedecode train-reward --out DIR`)")
        self.path = path
        base, tok = _base(model_path)
        self.model = PeftModel.from_pretrained(base, path).merge_and_unload().eval()
        self.tok, self.batch_size, self.torch = tok, batch_size, torch

    def key(self) -> str:
        import hashlib

        blob = (Path(self.path) / "adapter_model.safetensors").read_bytes()
        return f"harmless:{hashlib.sha256(blob).hexdigest()[:16]}"

    def __call__(self, prompts, texts) -> list[float]:
        torch = self.torch
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            ids = [self.tok.apply_chat_template(_chat(p, t), tokenize=True,
                                                return_dict=True)["input_ids"]
                   for p, t in zip(prompts[i:i + self.batch_size],
                                   texts[i:i + self.batch_size], strict=True)]
            width = max(map(len, ids))
            pad = self.tok.pad_token_id
            batch = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for j, seq in enumerate(ids):
                batch[j, :len(seq)] = torch.tensor(seq)
                mask[j, :len(seq)] = 1
            with torch.no_grad():
                out += self.model(input_ids=batch, attention_mask=mask).logits[:, 0].tolist()
        return out


def harmlessness_reward(path: str | None = None) -> HarmlessReward:
    """The ``harmless`` reward: the shipped adapter (or one at ``path``)."""
    return HarmlessReward(path)
