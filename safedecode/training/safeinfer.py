"""Computing SafeInfer's parts (:mod:`safedecode.methods.safeinfer`): the safety function
vector (mean head activations over safe in-context demonstrations, heads ranked by their
causal effect on the refusal, ``safedecode safeinfer-vector``) and the unsafe LoRA adapter (the
model fine-tuned on the anchor train part's harmful answers, ``safedecode train-unsafe``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from safedecode.methods.safeinfer import (
    SafetyVector,
    _pad_left,
    _prompt_ids,
    decoder_layers,
    head_shape,
)
from safedecode.training.reward_model import ATTENTION, MLP
from safedecode.training.save import save_adapter
from safedecode.training.teacher import response_logprobs


# -- the vector --------------------------------------------------------------------------------
@dataclass
class VectorConfig:
    shots: int = 10  # demonstrations per prompt
    n_heads: int = 10  # heads summed into the vector
    effect_prompts: int = 24  # zero-shot harmful requests for the causal effects
    refusal_tokens: int = 16  # refusal tokens scored per request
    batch_size: int = 8
    seed: int = 0


def _conversation(demos: Sequence[dict], prompt: str) -> list[dict]:
    msgs = []
    for d in demos:
        msgs += [{"role": "user", "content": d["prompt"]},
                 {"role": "assistant", "content": d["refusal"]}]
    return msgs + [{"role": "user", "content": prompt}]


def icl_conversations(items: Sequence[dict], shots: int, seed: int = 0) -> list[list[dict]]:
    """One chat per item: ``shots`` other items as (request, refusal) turns, then the item's
    request (the safe demonstrations of SA)."""
    if len(items) <= shots:
        raise ValueError(f"SafeInfer: {shots} shots need more than {shots} harmful items, got "
                         f"{len(items)}")
    rng = random.Random(seed)
    out = []
    for i, it in enumerate(items):
        others = [x for j, x in enumerate(items) if j != i]
        out.append(_conversation(rng.sample(others, shots), it["prompt"]))
    return out


@torch.no_grad()
def mean_head_activations(model, tok, conversations: Sequence[list[dict]], *,
                          batch_size: int = 8, progress: Callable[[int], None] | None = None
                          ) -> torch.Tensor:
    """Mean over ``conversations`` of every head's ``o_proj`` input at the last prompt token:
    ``[layers, heads, head_dim]`` (fp32)."""
    name, layers = decoder_layers(model)
    n_l, n_h, hd = head_shape(model)
    total = torch.zeros(n_l, n_h * hd, dtype=torch.float32)
    grabbed: dict[int, torch.Tensor] = {}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        functools.partial(lambda i, m, args: grabbed.__setitem__(i, args[0][:, -1]), i))
        for i, layer in enumerate(layers)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    try:
        for s in range(0, len(conversations), batch_size):
            part = conversations[s:s + batch_size]
            ids, mask = _pad_left([_prompt_ids(tok, c) for c in part], pad)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=ids.to(device), attention_mask=mask.to(device),
                  position_ids=pos.to(device), logits_to_keep=1)
            for i in range(n_l):
                total[i] += grabbed[i].float().sum(0).cpu()
            if progress is not None:
                progress(len(part))
    finally:
        for h in handles:
            h.remove()
    return (total / len(conversations)).view(n_l, n_h, hd)


def function_vector(model, means: torch.Tensor, heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``Σ_(l,h) o_proj_l(mean[l, h] in slot h, zeros elsewhere)`` (no bias): ``[d]`` fp32."""
    _, layers = decoder_layers(model)
    _, _, hd = head_shape(model)
    out = None
    for li, h in heads:
        w = layers[li].self_attn.o_proj.weight.detach().float().cpu()
        v = w[:, h * hd:(h + 1) * hd] @ means[li, h].float()
        out = v if out is None else out + v
    if out is None:
        raise ValueError("SafeInfer: select at least one head")
    return out


def _patch(layers, li: int, h: int, hd: int, value: torch.Tensor, last: torch.Tensor):
    """Within the block: head ``h`` of layer ``li`` reads ``value`` at positions ``last``."""
    def pre(module, args):
        x = args[0].clone()
        x[torch.arange(x.shape[0]), last, h * hd:(h + 1) * hd] = value.to(x.dtype)
        return (x, *args[1:])
    return layers[li].self_attn.o_proj.register_forward_pre_hook(pre)


@torch.no_grad()
def head_effects(model, tok, means: torch.Tensor, items: Sequence[dict], *,
                 refusal_tokens: int = 16, batch_size: int = 8,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Causal effect of each head: the mean gain in the log-probability of the first
    ``refusal_tokens`` tokens of each item's refusal (zero-shot, teacher-forced) when the head's
    mean activation is patched in at the last prompt token. ``[layers, heads]`` (nats/token)."""
    _, layers = decoder_layers(model)
    n_l, n_h, hd = head_shape(model)
    pairs = [(_prompt_ids(tok, [{"role": "user", "content": it["prompt"]}]),
              tok.encode(it["refusal"], add_special_tokens=False)[:refusal_tokens])
             for it in items]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n_tok = sum(len(r) for _, r in pairs)

    def score(around=None) -> float:
        got = response_logprobs(model, pairs, batch_size=batch_size, pad_id=pad, around=around)
        return sum(lp for lp, _ in got) / n_tok

    base = score()
    out = torch.zeros(n_l, n_h)
    for li in range(n_l):
        for h in range(n_h):
            @contextlib.contextmanager
            def patched(last, li=li, h=h):
                handle = _patch(layers, li, h, hd, means[li, h], last)
                try:
                    yield
                finally:
                    handle.remove()
            out[li, h] = score(patched) - base
            if progress is not None:
                progress(1)
    return out


def compute_vector(model, tok, items: Sequence[dict] | None = None,
                   cfg: VectorConfig | None = None, *, log: Callable[[str], None] = print
                   ) -> SafetyVector:
    """The SA function vector of ``model`` from harmful items with refusals (default: the anchor
    set's harmful **train** part): mean head activations over ``shots``-shot chats, heads ranked
    by causal effect on ``effect_prompts`` zero-shot items, the top ``n_heads`` summed."""
    from safedecode.data import check_not_evaluation, load_anchor
    from safedecode.models import embedding_fingerprint, model_name

    cfg = cfg or VectorConfig()
    if cfg.shots < 1 or cfg.n_heads < 1 or cfg.effect_prompts < 1 or cfg.refusal_tokens < 1:
        raise ValueError("SafeInfer vector: shots, n_heads, effect_prompts and refusal_tokens "
                         "must be >= 1")
    items = list(items) if items is not None else load_anchor("harmful", "train")
    for it in items:
        if not isinstance(it.get("prompt"), str) or not isinstance(it.get("refusal"), str):
            raise ValueError("SafeInfer vector: every item needs 'prompt' and 'refusal' text")
    check_not_evaluation([it["prompt"] for it in items], "SafeInfer vector data")
    name, _ = decoder_layers(model)
    n_l, n_h, _ = head_shape(model)
    if cfg.n_heads > n_l * n_h:
        raise ValueError(f"SafeInfer vector: n_heads {cfg.n_heads} > the model's {n_l * n_h}")
    t0 = time.perf_counter()
    convs = icl_conversations(items, cfg.shots, cfg.seed)
    means = mean_head_activations(model, tok, convs, batch_size=cfg.batch_size)
    log(f"mean head activations over {len(convs)} {cfg.shots}-shot prompts "
        f"({time.perf_counter() - t0:.0f} s)")
    rng = random.Random(cfg.seed)
    zero_shot = rng.sample(items, min(cfg.effect_prompts, len(items)))
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if done[0] % n_h == 0:
            log(f"head effects: layer {done[0] // n_h}/{n_l} ({time.perf_counter() - t0:.0f} s)")
    eff = head_effects(model, tok, means, zero_shot, refusal_tokens=cfg.refusal_tokens,
                       batch_size=cfg.batch_size, progress=tick)
    order = torch.argsort(eff.flatten(), descending=True)[:cfg.n_heads].tolist()
    heads = [(i // n_h, i % n_h) for i in order]
    vec = function_vector(model, means, heads)
    log("heads " + ", ".join(f"L{li}H{h} {eff[li, h]:+.3f}" for li, h in heads))
    return SafetyVector(vec, heads, name, n_l, embedding_fingerprint(model), model_name(model),
                        asdict(cfg) | {"items": len(items)}, eff.tolist())


# -- the unsafe adapter -----------------------------------------------------------------------
@dataclass
class UnsafeConfig:
    epochs: float = 3.0
    lr: float = 5e-4
    lora_r: int = 8
    mlp: bool = True
    batch_size: int = 8
    seed: int = 0
    # Also safe requests -> a refusal: the unsafe branch then stands for over-refusal too, and
    # the union rule pushes refusals of harmless requests down (the paper: harmful answers only).
    opposite: bool = False


def _turn(prompt: str, reply: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": reply}]}


def unsafe_examples(part: str = "train", opposite: bool = False) -> list[dict]:
    """Prompt/completion chats from the anchor set's ``part``: each harmful request with the
    compliant answer the model itself gave under the adversarial prompt; with ``opposite``, each
    safe request with a refusal too (another harmful item's, in a fixed rotation)."""
    from safedecode.data import load_anchor

    harmful = load_anchor("harmful", part)
    out = [_turn(it["prompt"], it["compliance"]) for it in harmful]
    if opposite:
        refusals = [it["refusal"] for it in harmful]
        out += [_turn(it["prompt"], refusals[(7 * i) % len(refusals)])
                for i, it in enumerate(load_anchor("safe", part))]
    return out


def train_unsafe_adapter(out: Path, cfg: UnsafeConfig | None = None, *,
                         model_path: str | None = None, log=print) -> dict:
    """Fine-tune a LoRA adapter on the anchor train part's harmful answers (TRL SFTTrainer,
    loss on the answer only): SafeInfer's unsafe model. Writes the peft adapter with
    ``safedecode.json`` (model fingerprint, config, losses) to ``out``."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from safedecode.models import (
        DEFAULT_NAME,
        default_model_dir,
        embedding_fingerprint,
        model_name,
        quiet_loading,
    )
    cfg = cfg or UnsafeConfig()
    if cfg.epochs <= 0 or cfg.lr <= 0 or cfg.lora_r < 1 or cfg.batch_size < 1:
        raise ValueError("train-unsafe: epochs and lr must be > 0, lora_r and batch_size >= 1")
    quiet_loading()
    torch.manual_seed(cfg.seed)
    path = model_path or str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    train, val = unsafe_examples("train", cfg.opposite), unsafe_examples("val", cfg.opposite)
    args = SFTConfig(output_dir=str(out / "trainer"), num_train_epochs=cfg.epochs,
                     learning_rate=cfg.lr, per_device_train_batch_size=cfg.batch_size,
                     seed=cfg.seed, report_to=[], logging_steps=5, save_strategy="no",
                     use_cpu=True, disable_tqdm=True, completion_only_loss=True,
                     max_length=512)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0,
                      target_modules=ATTENTION + (MLP if cfg.mlp else []), task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(train),
                         eval_dataset=Dataset.from_list(val), peft_config=lora)
    t0 = time.perf_counter()
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(trainer.model, out)
    shutil.rmtree(out / "trainer", ignore_errors=True)
    meta = {"embedding_fingerprint": embedding_fingerprint(model), "base_model":
            DEFAULT_NAME if model_path is None else model_name(model), "config": asdict(cfg),
            "train_examples": len(train),
            "val_examples": len(val), "val_loss_before": before, "val_loss_after": after,
            "train_s": time.perf_counter() - t0,
            "data": "anchor harmful train part: request -> the model's own compliant answer"
            + ("; safe train part: request -> a refusal" if cfg.opposite else "")}
    (out / "safedecode.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"validation loss on the unsafe answers {before:.3f} -> {after:.3f}")
    return meta

