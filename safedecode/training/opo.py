"""Opposite Prompt Optimization (ACD): train a safeguarding and an adversarial soft prompt.

The model is frozen; only the two prompt embeddings train. SP starts from the embeddings of a
safeguarding system prompt, AP from its opposite (each as long as its text's token count). With the
anchor set's harmful instructions paired with a refusal (D_HR) and with a compliant answer (D_HA),
and safe instructions with a helpful answer (D_S), and equal weights::

    L_SP = CE(D_HR) + UL(D_HA) + CE(D_S)        L_AP = CE(D_HA) + UL(D_HR) + CE(D_S)

CE is the mean negative log-likelihood of the response tokens (the prompt is not scored) and UL the
unlikelihood ``-log(1 - p(y_t))``. Every example is rendered in the model's chat template exactly as
at decoding time: the soft prompt stands in the system prompt's place
(:class:`safedecode.engine.prompts.PromptBuilder`), the response is the assistant turn up to and
including its end-of-turn token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from safedecode.engine.branches import Branch
from safedecode.engine.prompts import PromptBuilder
from safedecode.methods import prompts as text_prompts

TARGET_CHOICES = ("self", "data")
REFUSAL_CHOICES = ("fixed", "varied")
FIXED_REFUSAL = "I'm sorry, but I can't help with that."


@dataclass
class OPOConfig:
    """Training settings (saved with the prompts).

    ``safe_targets`` / ``compliance_targets``: ``"self"`` = the frozen model's own greedy answer
    (default template, no system prompt; cut at ``max_response_tokens``) so that the prompts keep
    the model's behaviour rather than learn a new style; ``"data"`` = the anchor set's ``answer``
    / ``compliance`` fields. ``refusal``: ``"fixed"`` = one refusal sentence (``refusal_text``) for
    every harmful prompt, ``"varied"`` = the anchor set's written refusals. ``part``: which part
    of the anchor set to train on (``"train"``; ``"all"`` only for a final refit).
    ``safe_refusal_ul``: also push SP away from refusing the safe instructions (an unlikelihood
    term on the refusal after each safe instruction; an extension, not in the ACD paper).
    ``steps`` (if set) overrides ``epochs``.
    """

    epochs: int = 5
    steps: int | None = None
    batch_size: int = 6  # harmful and safe instructions per step
    lr: float = 3e-3
    seed: int = 0
    max_response_tokens: int = 48
    safe_targets: str = "self"
    compliance_targets: str = "self"
    refusal: str = "fixed"
    refusal_text: str = FIXED_REFUSAL
    safe_refusal_ul: bool = False  # add UL(safe -> refusal) to L_SP (not in the paper)
    part: str = "train"
    safeguard_text: str = text_prompts.SAFEGUARD
    adversarial_text: str = text_prompts.ADVERSARIAL
    autocast_bf16: bool = True  # bf16 matmuls on the CPU (AMX/AVX512-BF16), fp32 prompts

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_response_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"OPOConfig.{name}: must be an integer >= 1, got {v!r}")
        if self.steps is not None and (isinstance(self.steps, bool)
                                       or not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"OPOConfig.steps: must be an integer >= 1 or None, got "
                             f"{self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"OPOConfig.lr: must be a finite number > 0, got {self.lr!r}")
        for name, choices in (("safe_targets", TARGET_CHOICES),
                              ("compliance_targets", TARGET_CHOICES),
                              ("refusal", REFUSAL_CHOICES), ("part", ("train", "all"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"OPOConfig.{name}: expected one of {choices}, got "
                                 f"{getattr(self, name)!r}")
        if not isinstance(self.safe_refusal_ul, bool):
            raise ValueError(f"OPOConfig.safe_refusal_ul: must be a bool, got "
                             f"{self.safe_refusal_ul!r}")
        if not isinstance(self.refusal_text, str) or not self.refusal_text.strip():
            raise ValueError("OPOConfig.refusal_text: must be a non-empty string")


@dataclass
class Example:
    """One instruction and one response's token ids (end-of-turn included)."""

    instruction: str
    response_ids: list[int]


def response_ids(builder: PromptBuilder, instruction: str, response: str,
                 max_tokens: int, *, closed: bool = True) -> list[int]:
    """The assistant turn's token ids as the chat template renders it, cut after end-of-turn
    (``closed=False``: without the end-of-turn, for a response that was cut off)."""
    tok = builder.tok
    user = [{"role": "user", "content": instruction}]
    if builder.has_template:
        head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                       tokenize=False)
        text = full[len(head):] if full.startswith(head) else response
    else:
        text = response
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    eos = tok.eos_token_id
    if eos in ids:
        ids = ids[:ids.index(eos) + 1]
    elif eos is not None:
        ids.append(eos)
    if not closed and eos is not None and ids and ids[-1] == eos:
        ids = ids[:-1]
    if len(ids) > max_tokens:  # keep the start (a refusal is decided in its first tokens)
        ids = ids[:max_tokens]
    return ids


def self_targets(model, tokenizer, prompts: list[str], max_tokens: int,
                 batch_size: int = 16) -> dict[str, list[int]]:
    """The frozen model's own greedy answers (token ids, end-of-turn included when reached),
    under its chat template with no system prompt, ``max_tokens`` at most."""
    from safedecode.engine import SafeDecoder
    from safedecode.engine.branches import plain

    dec = SafeDecoder(model, tokenizer, plain())
    todo = sorted(set(prompts))
    out: dict[str, list[int]] = {}
    with torch.no_grad():
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            for p, r in zip(chunk, dec.generate(chunk, max_new_tokens=max_tokens), strict=True):
                out[p] = list(map(int, r.token_ids))
    return out


def build_datasets(tokenizer, items: list[dict], max_tokens: int,
                   config: OPOConfig | None = None,
                   targets: dict[str, list[int]] | None = None) -> dict[str, list[Example]]:
    """D_HR, D_HA and D_S from anchor-set items (``split``, ``prompt``, ``refusal`` /
    ``compliance`` for harmful items, ``answer`` for safe ones). With ``config``, its target
    choices apply; ``targets`` holds the model's own answers (:func:`self_targets`) by prompt."""
    cfg = config or OPOConfig(safe_targets="data", compliance_targets="data", refusal="varied")
    builder = PromptBuilder(tokenizer)
    out: dict[str, list[Example]] = {"HR": [], "HA": [], "S": [], "SR": []}

    def own(prompt: str) -> list[int]:
        if targets is None or prompt not in targets or not targets[prompt]:
            raise ValueError(f"data: no model answer for {prompt[:60]!r} (self targets)")
        return list(targets[prompt][:max_tokens])

    for i, it in enumerate(items):
        split = it.get("split")
        need = (("refusal",) if cfg.refusal == "varied" else ()) + \
            (("compliance",) if cfg.compliance_targets == "data" else ()) \
            if split == "harmful" else (("answer",) if cfg.safe_targets == "data" else ())
        if split not in ("harmful", "safe") or not isinstance(it.get("prompt"), str) or \
                not it["prompt"].strip() or any(not isinstance(it.get(k), str)
                                                or not it[k].strip() for k in need):
            raise ValueError(f"data[{i}]: expected split 'harmful' (prompt, refusal, compliance) "
                             f"or 'safe' (prompt, answer), got keys {sorted(it)}")
        p = it["prompt"]
        if split == "harmful":
            refusal = it["refusal"] if cfg.refusal == "varied" else cfg.refusal_text
            out["HR"].append(Example(p, response_ids(builder, p, refusal, max_tokens)))
            out["HA"].append(Example(p, own(p) if cfg.compliance_targets == "self" else
                                     response_ids(builder, p, it["compliance"], max_tokens)))
        else:
            out["S"].append(Example(p, own(p) if cfg.safe_targets == "self" else
                                    response_ids(builder, p, it["answer"], max_tokens)))
            out["SR"].append(Example(p, response_ids(builder, p, cfg.refusal_text, max_tokens)))
    if not out["HR"] or not out["S"]:
        raise ValueError("data: needs at least one harmful and one safe item")
    return out


def init_soft_prompt(model, tokenizer, text: str) -> torch.Tensor:
    """[n, d] fp32 embeddings of ``text``'s tokens (n = its token count)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    emb = model.get_input_embeddings()
    with torch.no_grad():
        return emb(torch.tensor(ids, device=emb.weight.device)).float().clone()


def response_distributions(model, builder: PromptBuilder, soft: torch.Tensor,
                           examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """Teacher-forced next-token log-distributions at every response token under ``soft`` as
    system prompt: ``(lp [N, V], target [N], row [N])`` with N the batch's response tokens and
    ``row`` the example each belongs to. Differentiable in ``soft``."""
    from .teacher import head_logits, pack, response_hidden

    emb = model.get_input_embeddings()
    dev, dt = emb.weight.device, emb.weight.dtype
    branch = Branch(soft_prompt=torch.zeros(soft.shape))  # ids do not depend on the values
    pairs, soft_at = [], []
    for ex in examples:
        prefix, suffix = builder.build(branch, [{"role": "user", "content": ex.instruction}], 0)
        soft_at.append(len(prefix.ids))
        pairs.append((list(prefix.ids) + [0] * soft.shape[0] + list(prefix.tail_ids) + suffix,
                      ex.response_ids))
    packed = pack(pairs).to(dev)
    x = emb(packed.ids)
    n = soft.shape[0]
    idx = (packed.prompt_start + torch.tensor(soft_at, device=dev))[:, None] + \
        torch.arange(n, device=dev)  # [B, n]: where each row's soft prompt goes
    x = x.index_put((torch.arange(len(pairs), device=dev)[:, None].expand(-1, n), idx),
                    soft.to(dt).expand(len(pairs), -1, -1))
    h = response_hidden(model, packed, inputs_embeds=x)
    logits = head_logits(model, h).float()
    return torch.log_softmax(logits, dim=-1), packed.targets, packed.example


def response_logprobs(model, builder: PromptBuilder, soft: torch.Tensor,
                      examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every response token under ``soft`` as system prompt: ``(lp [N], row [N])``
    (see :func:`response_distributions`)."""
    lp, tgt, row = response_distributions(model, builder, soft, examples)
    return lp.gather(1, tgt[:, None])[:, 0], row


def ce(lp: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens."""
    return -lp.mean()


def ul(lp: torch.Tensor) -> torch.Tensor:
    """Mean unlikelihood ``-log(1 - p)`` of the response tokens (stable near p = 1)."""
    return -torch.log(-torch.expm1(lp.clamp(max=-1e-6))).mean()


def _split_mean(lp: torch.Tensor, row: torch.Tensor, groups: list[int]) -> list[torch.Tensor]:
    """``lp``'s tokens divided into consecutive groups of ``groups[i]`` examples (by ``row``)."""
    out, lo = [], 0
    for n in groups:
        sel = (row >= lo) & (row < lo + n)
        out.append(lp[sel])
        lo += n
    return out


def opo_losses(model, builder: PromptBuilder, sp: torch.Tensor, ap: torch.Tensor,
               hr: list[Example], ha: list[Example], s: list[Example],
               sr: list[Example] | None = None) -> dict[str, torch.Tensor]:
    """``L_SP``, ``L_AP`` and their six terms on one batch (equal weights); one forward pass per
    soft prompt over the batch's HR, HA and S examples together. ``sr`` (safe instructions paired
    with the refusal) adds ``UL(D_SR)`` to ``L_SP``: SP must not refuse harmless requests."""
    out = {}
    sr = sr or []
    for name, soft in (("SP", sp), ("AP", ap)):
        extra = sr if name == "SP" else []
        lp, row = response_logprobs(model, builder, soft, hr + ha + s + extra)
        lp_hr, lp_ha, lp_s, lp_sr = _split_mean(lp, row, [len(hr), len(ha), len(s), len(extra)])
        if name == "SP":
            terms = {"CE_HR": ce(lp_hr), "UL_HA": ul(lp_ha), "CE_S": ce(lp_s)}
            if extra:
                terms["UL_SR"] = ul(lp_sr)
        else:
            terms = {"CE_HA": ce(lp_ha), "UL_HR": ul(lp_hr), "CE_S": ce(lp_s)}
        out[f"L_{name}"] = sum(terms.values())
        out.update({f"{name}.{k}": v for k, v in terms.items()})
    return out


def _batches(n: int, size: int, steps: int, gen: torch.Generator) -> list[list[int]]:
    """``steps`` batches of ``size`` indices cycling through shuffled ``range(n)``."""
    order: list[int] = []
    while len(order) < steps * size:
        order += torch.randperm(n, generator=gen).tolist()
    return [order[i * size:(i + 1) * size] for i in range(steps)]


def optimize_prompts(model, tokenizer, data: list[dict] | None = None,
                     config: OPOConfig | None = None, *, progress: bool = True):
    """Train SP and AP on ``data`` (default: the shipped anchor set); returns
    :class:`safedecode.methods.acd.ACDPrompts` with the loss history."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from safedecode.data import check_not_evaluation, load_anchor
    from safedecode.methods.acd import ACDPrompts
    from safedecode.models import embedding_fingerprint, model_name

    cfg = config or OPOConfig()
    if data is None:
        items = load_anchor(part=None if cfg.part == "all" else "train")
    else:
        items = list(data)
        check_not_evaluation([it.get("prompt") for it in items], "OPO training data")
    targets = None
    if "self" in (cfg.safe_targets, cfg.compliance_targets):
        want = [it["prompt"] for it in items if isinstance(it.get("prompt"), str) and (
            (it.get("split") == "safe" and cfg.safe_targets == "self")
            or (it.get("split") == "harmful" and cfg.compliance_targets == "self"))]
        targets = self_targets(model, tokenizer, want, cfg.max_response_tokens)
    sets = build_datasets(tokenizer, items, cfg.max_response_tokens, cfg, targets)
    builder = PromptBuilder(tokenizer)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    sp = init_soft_prompt(model, tokenizer, cfg.safeguard_text).requires_grad_(True)
    ap = init_soft_prompt(model, tokenizer, cfg.adversarial_text).requires_grad_(True)
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([sp, ap], lr=cfg.lr)
    n_h, n_s = len(sets["HR"]), len(sets["S"])
    per_epoch = math.ceil(max(n_h, n_s) / cfg.batch_size)
    steps = cfg.steps if cfg.steps is not None else per_epoch * cfg.epochs
    hb = _batches(n_h, min(cfg.batch_size, n_h), steps, gen)
    sb = _batches(n_s, min(cfg.batch_size, n_s), steps, gen)
    history: list[dict] = []
    cols = (TextColumn("OPO"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), TextColumn("{task.fields[losses]}"))
    try:
        with Progress(*cols, disable=not progress, transient=False) as bar:
            task = bar.add_task("opo", total=steps, losses="")
            for step in range(steps):
                hr = [sets["HR"][i] for i in hb[step]]
                ha = [sets["HA"][i] for i in hb[step]]
                s = [sets["S"][i] for i in sb[step]]
                sr = [sets["SR"][i] for i in sb[step]] if cfg.safe_refusal_ul else None
                with torch.autocast("cpu", dtype=torch.bfloat16,
                                    enabled=cfg.autocast_bf16 and sp.device.type == "cpu"):
                    losses = opo_losses(model, builder, sp, ap, hr, ha, s, sr)
                opt.zero_grad(set_to_none=True)
                (losses["L_SP"] + losses["L_AP"]).backward()
                opt.step()
                rec = {"step": step + 1,
                       **{k: round(float(v.detach()), 4) for k, v in losses.items()}}
                history.append(rec)
                bar.update(task, advance=1,
                           losses=f"L_SP {rec['L_SP']:.3f}  L_AP {rec['L_AP']:.3f}")
    finally:
        for p, r in zip(model.parameters(), req, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    conf = asdict(cfg) | {"data_items": len(items), "steps": steps,
                          "data_ids": [str(it.get("id", i)) for i, it in enumerate(items)]}
    return ACDPrompts(sp.detach().cpu(), ap.detach().cpu(), embedding_fingerprint(model),
                      model_name(model), conf, history)
