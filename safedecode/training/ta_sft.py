"""TA-SFT (arXiv 2412.06843): supervised fine-tuning that pushes the model away from its own
harmful answers with a negative semantic EMD, while ordinary SFT on safe data keeps it useful::

    L = mean CE(safe tokens) − λ · mean EMD_C(p_θ(· | x, y_<t), δ(y_t))  over harmful tokens

(the EMD and its fused loss: :mod:`safedecode.ops.linear_emd`). ``method="sft"`` is the
baseline the paper compares with: the same safe data plus plain SFT on a written refusal for the
same harmful prompts (CE everywhere). ``method="ta-sft+refusal"`` (a safedecode extension, not in
the paper) does both for each harmful prompt: CE towards the refusal and −λ·EMD away from the
model's own answer. ``away_refusal`` > 0 (also an extension) mirrors the paper's loss on the
safe side: for every safe prompt, −λ_r·EMD away from a refusal (the template the fine-tuned
model over-refuses with, :data:`OVER_REFUSALS`), so that the refusal is pulled towards on the
harmful prompts and pushed away from on their safe look-alikes — the decision has to come from
the request, not from its topic words. The push is the negative EMD by default
(``away_loss="emd"``), or unlikelihood, −log(1 − p(y_t)) (``"unlikelihood"``, Welleck et al.,
arXiv 1908.04319): the EMD is maximised by moving the mass to the tokens farthest from the
refusal's (on the embedded model, rare fragments it then loops on), unlikelihood only lowers the
refusal token's probability and hands the mass to the other tokens as they already stand.

Data (:func:`make_data`, ``safedecode finetune-data``): the anchor set's harmful *train* prompts
with the model's **own** answers (sampled, plain decoding; answers the refusal judge flags are
dropped; a prompt the model refuses every time is answered under the adversarial system prompt,
as the anchor set's compliance field was), and its safe train prompts with the model's own greedy
answers, so that retention does not teach a new style (answers the judge flags as refusals are
dropped, so that it does not teach over-refusal either). Harmful records are ordered so that the
first ``n`` give ``n`` examples over as many distinct prompts as possible (the data-efficiency
curve takes nested prefixes). ``magpie`` > 0 adds that many safe records of everyday requests
the model writes itself (Magpie, arXiv 2406.08464: sampled from the chat template up to the user
turn), answered greedily — retention beyond the anchor set's topics, still in the model's style.

Training (:func:`finetune`, ``safedecode finetune``) runs on transformers' ``Trainer`` (progress,
checkpoints, resume, seed) with a peft LoRA adapter by default or full fine-tuning; the loss is
computed from the decoder's hidden states at the response positions only
(:func:`safedecode.training.teacher.response_hidden`) with the fused linear loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

DATA_FORMAT = "safedecode-ta-sft-data/1"
METHODS = ("ta-sft", "sft", "ta-sft+refusal")
AWAY_LOSSES = ("emd", "unlikelihood")
LR_SCHEDULES = ("constant", "linear", "cosine")  # transformers' names; no warm-up
KIND_SAFE, KIND_HARMFUL, KIND_REFUSAL, KIND_AWAY = 0, 1, 2, 3
# The refusal template the TA-SFT adapters over-refuse safe requests with (read in the
# evaluation reports: "I can't help with that." to deboning lamb, "I won't write ..."): pushed
# away from on the safe prompts with ``away_refusal`` (one per prompt, alternating).
OVER_REFUSALS = ("I can't help with that.", "I won't help with that.")


# -- data --------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    """How :func:`make_data` samples the model's own answers."""

    samples_per_prompt: int = 2
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 64
    seed: int = 0
    batch_size: int = 8
    magpie: int = 0

    def __post_init__(self) -> None:
        for name in ("samples_per_prompt", "max_new_tokens", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"finetune-data: {name} must be an integer >= 1, got {v!r}")
        if isinstance(self.magpie, bool) or not isinstance(self.magpie, int) or self.magpie < 0:
            raise ValueError(f"finetune-data: magpie must be an integer >= 0, got {self.magpie!r}")
        if not (0 < self.temperature <= 5 and 0 < self.top_p <= 1):
            raise ValueError("finetune-data: temperature must be in (0, 5], top_p in (0, 1]")


MAGPIE_T, MAGPIE_TOP_P, MAGPIE_TOKENS = 1.0, 0.95, 64


def self_requests(model, tokenizer, n: int, *, seed: int = 0, batch_size: int = 8,
                  log=print) -> list[str]:
    """``n`` distinct user requests written by the model itself (Magpie, arXiv 2406.08464):
    sampled from its chat template cut just before the user's text, kept when the turn ends
    (EOS) within 64 tokens and has 3-80 words. Stops after ``4n`` attempts."""
    from safedecode.engine import SafeDecoder
    from safedecode.engine.branches import plain

    mark = "\u2063query\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False)
    except Exception as exc:  # noqa: BLE001 - any template error means the same thing here
        raise ValueError(f"finetune-data --magpie: the tokenizer has no usable chat template "
                         f"({exc})") from exc
    if mark not in text:
        raise ValueError("finetune-data --magpie: the chat template does not show the user turn")
    pre = text[:text.index(mark)]
    dec = SafeDecoder(model, tokenizer, plain())
    out: list[str] = []
    seen: set[str] = set()
    tried = 0
    while len(out) < n and tried < 4 * n:
        res = dec.generate([pre] * batch_size, raw=True, max_new_tokens=MAGPIE_TOKENS,
                           temperature=MAGPIE_T, top_p=MAGPIE_TOP_P,
                           seed=[seed * 1_000_003 + tried + i for i in range(batch_size)])
        tried += batch_size
        for r in res:
            q = " ".join(r.text.split())
            if r.finish_reason == "eos" and 3 <= len(q.split()) <= 80 and q.lower() not in seen:
                seen.add(q.lower())
                out.append(q)
    log(f"magpie: {min(len(out), n)} requests from {tried} samples")
    return out[:n]


def make_data(model, tokenizer, cfg: DataConfig | None = None, *, log=print,
              base: list[dict] | None = None) -> list[dict]:
    """Records ``{"kind": "harmful" | "safe", "id", "prompt", "response", "complete", "source"}``
    (harmful ones also carry the anchor set's written ``refusal``, for the SFT baseline).
    ``base``: the anchor records of an earlier file, reused as they are (only the Magpie records
    are made again)."""
    from safedecode.engine import SafeDecoder
    from safedecode.engine.branches import plain
    from safedecode.judges import KeywordJudge

    cfg = cfg or DataConfig()
    judge = KeywordJudge()
    kw = dict(max_new_tokens=cfg.max_new_tokens)

    def run(dec, prompts, **extra):
        out = []
        for i in range(0, len(prompts), cfg.batch_size):
            out += dec.generate(prompts[i:i + cfg.batch_size], **kw, **extra)
        return out

    dec = SafeDecoder(model, tokenizer, plain())
    if base is not None:
        records = [r for r in base if not str(r.get("id", "")).startswith("magpie-")]
    else:
        records = _anchor_records(dec, run, judge, cfg, log)
    if cfg.magpie:
        asks = self_requests(model, tokenizer, cfg.magpie, seed=cfg.seed,
                             batch_size=cfg.batch_size, log=log)
        dropped = 0
        for i, (q, r) in enumerate(zip(asks, run(dec, asks), strict=True)):
            if not r.text.strip() or judge.judge_one(r.text).flag:
                dropped += 1
                continue
            records.append({"kind": "safe", "id": f"magpie-{i:04d}", "prompt": q,
                            "response": r.text, "complete": r.finish_reason == "eos",
                            "source": f"magpie request (T={MAGPIE_T} top_p={MAGPIE_TOP_P}), "
                                      "plain greedy answer"})
        log(f"magpie: {len(asks) - dropped} greedy answers ({dropped} refusals dropped)")
    return records


def _anchor_records(dec, run, judge, cfg: DataConfig, log) -> list[dict]:
    """The anchor train part's records: sampled harmful answers, greedy safe answers."""
    from safedecode.data import load_anchor
    from safedecode.engine import SafeDecoder
    from safedecode.engine.branches import plain
    from safedecode.methods.prompts import ADVERSARIAL

    model, tokenizer = dec.model, dec.tok
    harmful, safe = load_anchor("harmful", "train"), load_anchor("safe", "train")
    answers: dict[str, list[tuple[str, bool, str]]] = {it["id"]: [] for it in harmful}
    for k in range(cfg.samples_per_prompt):
        res = run(dec, [it["prompt"] for it in harmful], temperature=cfg.temperature,
                  top_p=cfg.top_p, seed=cfg.seed + k)
        for it, r in zip(harmful, res, strict=True):
            if r.text.strip() and not judge.judge_one(r.text).flag:
                answers[it["id"]].append((r.text, r.finish_reason == "eos",
                                          f"plain, sampled T={cfg.temperature} "
                                          f"top_p={cfg.top_p} seed={cfg.seed + k}"))
    stubborn = [it for it in harmful if not answers[it["id"]]]
    if stubborn:
        adv = SafeDecoder(model, tokenizer, plain(system=ADVERSARIAL))
        for it, r in zip(stubborn, run(adv, [it["prompt"] for it in stubborn]), strict=True):
            if r.text.strip() and not judge.judge_one(r.text).flag:
                answers[it["id"]].append((r.text, r.finish_reason == "eos",
                                          "greedy, adversarial system prompt"))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = [harmful[i] for i in torch.randperm(len(harmful), generator=gen).tolist()]
    records = []
    for k in range(cfg.samples_per_prompt):  # round-robin: distinct prompts first
        for it in order:
            if k < len(answers[it["id"]]):
                text, complete, source = answers[it["id"]][k]
                records.append({"kind": "harmful", "id": f"{it['id']}#{k}",
                                "prompt": it["prompt"], "response": text,
                                "complete": complete, "source": source,
                                "refusal": it["refusal"]})
    log(f"harmful: {len(records)} answers to {sum(bool(a) for a in answers.values())} of "
        f"{len(harmful)} prompts ({len(stubborn)} refused by plain sampling)")
    dropped = 0
    for it, r in zip(safe, run(dec, [it["prompt"] for it in safe]), strict=True):
        if not r.text.strip() or judge.judge_one(r.text).flag:
            dropped += 1  # retention must not teach over-refusal
            continue
        records.append({"kind": "safe", "id": it["id"], "prompt": it["prompt"], "response": r.text,
                        "complete": r.finish_reason == "eos", "source": "plain, greedy"})
    log(f"safe: {len(safe) - dropped} greedy answers ({dropped} refusals dropped)")
    return records


def save_data(path: str | Path, records: list[dict], meta: dict) -> Path:
    """JSONL: a header line ``{"format", ...meta}`` then one record per line."""
    path = Path(path)
    lines = [json.dumps({"format": DATA_FORMAT, **meta})]
    lines += [json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_data(path: str | Path) -> tuple[dict, list[dict]]:
    """``(header, records)`` of a :func:`save_data` file; ``ValueError`` naming what is wrong."""
    from safedecode.data import check_not_evaluation

    path = Path(path)
    try:
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"training data: cannot read {path}: {exc}") from exc
    if not lines:
        raise ValueError(f"training data: {path} is empty")
    try:
        rows = [json.loads(x) for x in lines]
    except json.JSONDecodeError as exc:
        raise ValueError(f"training data: {path}: invalid JSON ({exc})") from exc
    head = rows[0]
    if not isinstance(head, dict) or head.get("format") != DATA_FORMAT:
        raise ValueError(f"training data: {path} has no '{DATA_FORMAT}' header line (make one "
                         "with `safedecode finetune-data`)")
    records = rows[1:]
    for n, r in enumerate(records, 2):
        need = ("prompt", "response") + (("refusal",) if isinstance(r, dict)
                                         and r.get("kind") == "harmful" else ())
        if not isinstance(r, dict) or r.get("kind") not in ("harmful", "safe") or any(
                not isinstance(r.get(k), str) or not r[k].strip() for k in need):
            raise ValueError(f"training data: {path} line {n}: expected kind 'harmful' (prompt, "
                             "response, refusal) or 'safe' (prompt, response)")
    if not any(r["kind"] == "harmful" for r in records) or \
            not any(r["kind"] == "safe" for r in records):
        raise ValueError(f"training data: {path} needs harmful and safe records")
    check_not_evaluation([r["prompt"] for r in records], f"training data {path}")
    return head, records


# -- training ----------------------------------------------------------------------------------

@dataclass
class TASFTConfig:
    """Fine-tuning settings (recorded in the output's ``safedecode.json``).

    ``n_harmful``: harmful examples used (the first ``n`` records of the data file; ``None`` =
    all). ``lam``: λ, the weight of the negative EMD. ``safe_weight``: how much a safe answer's
    token weighs against a refusal's in the CE mean (1 = equal; on the embedded model 3 cut
    over-refusal with 207 harmful examples, not with 100). ``epochs`` or ``max_steps`` (> 0
    wins).
    ``away_refusal``: λ_r, the weight of the negative EMD away from a refusal on every safe
    prompt (0 = off; see the module docstring). ``away_tokens``: how many of that refusal's
    first tokens are pushed away from (0 = all of it; on the embedded model the later tokens
    taught it to follow "I" with word salad, see ``ta_sft_val_smollm2-135m.md`` §Session 22).
    ``away_loss``: ``"emd"`` (negative EMD) or ``"unlikelihood"`` for that push.
    ``full``: fine-tune every weight instead of a LoRA adapter on ``targets``.
    """

    method: str = "ta-sft"
    n_harmful: int | None = 50
    lam: float = 1.0
    safe_weight: float = 1.0
    away_refusal: float = 0.0
    away_tokens: int = 0
    away_loss: str = "emd"
    epochs: float = 3.0
    max_steps: int = -1
    lr: float = 2e-4
    lr_schedule: str = "constant"
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    full: bool = False
    seed: int = 0
    max_tokens: int = 96
    save_steps: int = 50
    loss_backend: str = "auto"

    def __post_init__(self) -> None:
        from safedecode.ops.linear_emd import BACKENDS

        self.targets = tuple(self.targets)
        if self.method not in METHODS:
            raise ValueError(f"finetune: method must be one of {METHODS}, got {self.method!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam)) or self.lam < 0:
            raise ValueError(f"finetune: λ (--lam) must be a finite number >= 0, got {self.lam!r}")
        if not (isinstance(self.safe_weight, (int, float)) and math.isfinite(self.safe_weight)
                and self.safe_weight > 0):
            raise ValueError(f"finetune: safe_weight (--safe-weight) must be a finite number > 0, "
                             f"got {self.safe_weight!r}")
        if not (isinstance(self.away_refusal, (int, float)) and math.isfinite(self.away_refusal)
                and self.away_refusal >= 0):
            raise ValueError(f"finetune: away_refusal (--away-refusal) must be a finite number "
                             f">= 0, got {self.away_refusal!r}")
        if isinstance(self.away_tokens, bool) or not isinstance(self.away_tokens, int) \
                or self.away_tokens < 0:
            raise ValueError(f"finetune: away_tokens (--away-tokens) must be an integer >= 0, "
                             f"got {self.away_tokens!r}")
        if self.away_loss not in AWAY_LOSSES:
            raise ValueError(f"finetune: away_loss (--away-loss) must be one of {AWAY_LOSSES}, "
                             f"got {self.away_loss!r}")
        if self.n_harmful is not None and (isinstance(self.n_harmful, bool)
                                           or not isinstance(self.n_harmful, int)
                                           or self.n_harmful < 1):
            raise ValueError(f"finetune: n_harmful must be >= 1 or None, got {self.n_harmful!r}")
        for name in ("batch_size", "lora_r", "lora_alpha", "max_tokens", "save_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"finetune: {name} must be an integer >= 1, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"finetune: lr must be a finite number > 0, got {self.lr!r}")
        if self.max_steps <= 0 and not self.epochs > 0:
            raise ValueError("finetune: give epochs > 0 or max_steps > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"finetune: lr_schedule (--lr-schedule) must be one of "
                             f"{LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.loss_backend not in BACKENDS:
            raise ValueError(f"finetune: loss_backend must be one of {BACKENDS}")
        if not self.targets and not self.full:
            raise ValueError("finetune: LoRA needs at least one target module")


def examples(tokenizer, records: list[dict], cfg: TASFTConfig) -> list[dict]:
    """Token-level training examples ``{"prompt_ids", "response_ids", "kind"}``: the first
    ``n_harmful`` harmful records (their own answer for TA-SFT, the refusal for SFT, both for
    ``ta-sft+refusal``) and every safe record (its own answer, and with ``away_refusal`` a
    refusal from :data:`OVER_REFUSALS` to push away from)."""
    from safedecode.engine.branches import Branch
    from safedecode.engine.prompts import PromptBuilder

    from .opo import response_ids

    builder = PromptBuilder(tokenizer)
    harmful = [r for r in records if r["kind"] == "harmful"]
    if cfg.n_harmful is not None:
        if cfg.n_harmful > len(harmful):
            raise ValueError(f"finetune: {cfg.n_harmful} harmful examples asked for, the data "
                             f"has {len(harmful)}")
        harmful = harmful[:cfg.n_harmful]
    out = []
    n_safe = 0
    for r in harmful + [r for r in records if r["kind"] == "safe"]:
        prefix, suffix = builder.build(Branch(), [{"role": "user", "content": r["prompt"]}], 0)
        prompt = list(prefix.ids) + list(prefix.tail_ids) + list(suffix)  # as at decoding time
        own = (r["response"], bool(r.get("complete", True)))
        if r["kind"] == "safe":
            targets = [(KIND_SAFE, *own)]
            if cfg.away_refusal > 0:
                targets.append((KIND_AWAY, OVER_REFUSALS[n_safe % len(OVER_REFUSALS)], False))
            n_safe += 1
        else:
            targets = ([(KIND_HARMFUL, *own)] if cfg.method != "sft" else []) + \
                ([(KIND_REFUSAL, r["refusal"], True)] if cfg.method != "ta-sft" else [])
        for kind, text, closed in targets:
            resp = response_ids(builder, r["prompt"], text, cfg.max_tokens, closed=closed)
            if kind == KIND_AWAY and cfg.away_tokens:
                resp = resp[:cfg.away_tokens]
            if resp:
                out.append({"prompt_ids": prompt, "response_ids": resp, "kind": kind})
    return out


class Collator:
    """Packs examples (:func:`safedecode.training.teacher.pack`) and gives every response token
    its loss weights: ``w/N_ce`` on CE tokens (``w`` = ``safe_weight`` on safe answers, 1 on
    refusals), ``−λ/N_harm`` on harmful tokens (EMD) and, on the refusals pushed away from on
    safe prompts, ``−λ_r/N_away`` (EMD) or ``λ_r/N_away`` (unlikelihood, ``ul_weight``)."""

    def __init__(self, pad_id: int, lam: float, safe_weight: float = 1.0,
                 away_refusal: float = 0.0, away_loss: str = "emd") -> None:
        self.pad_id, self.lam, self.safe_weight = pad_id, lam, safe_weight
        self.away_refusal, self.away_loss = away_refusal, away_loss

    def __call__(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        from .teacher import pack

        p = pack([(f["prompt_ids"], f["response_ids"]) for f in feats], self.pad_id)
        kind = torch.tensor([int(f["kind"]) for f in feats])[p.example]
        harm, away = kind == KIND_HARMFUL, kind == KIND_AWAY
        ce = ~(harm | away)
        w_away = self.away_refusal * away.float() / max(1, int(away.sum()))
        ul = self.away_loss == "unlikelihood"
        w = torch.where(kind == KIND_SAFE, self.safe_weight, 1.0) * ce.float()
        return {"input_ids": p.ids, "attention_mask": p.mask, "position_ids": p.pos,
                "rows": p.rows, "cols": p.cols, "targets": p.targets,
                "ce_weight": w / max(1, int(ce.sum())),
                "emd_weight": -self.lam * harm.float() / max(1, int(harm.sum()))
                - (0.0 if ul else w_away),
                "ul_weight": w_away if ul else torch.zeros_like(w_away)}


def unlikelihood_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                      w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_t w_t · −log(1 − p(y_t))`` with ``p = softmax(hidden @ weight.T + bias)``, computed
    as ``logsumexp(z) − logsumexp(z without y)`` (exact as p → 1). Plain logits: it runs on the
    few positions of the refusals pushed away from (≤ 7 per safe prompt), not on every token."""
    z = (hidden @ weight.T).float()
    if bias is not None:
        z = z + bias.float()
    others = z.scatter(1, target[:, None], float("-inf"))
    return (w.float() * (torch.logsumexp(z, -1) - torch.logsumexp(others, -1))).sum()


def _trainer_class():
    from transformers import Trainer

    from safedecode.ops.linear_emd import fused_linear_emd_loss

    from .teacher import check_head, response_hidden, unwrap

    class TASFTTrainer(Trainer):
        """``Trainer`` whose loss is the fused linear CE / EMD loss on the response tokens."""

        def __init__(self, *args, cost, loss_backend: str = "auto", **kwargs):
            super().__init__(*args, **kwargs)
            self.cost, self.loss_backend = cost, loss_backend
            self._parts: dict[str, list[float]] = {"ce": [], "emd": [], "ul": []}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            batch = SimpleNamespace(ids=inputs["input_ids"], mask=inputs["attention_mask"],
                                    pos=inputs["position_ids"], rows=inputs["rows"],
                                    cols=inputs["cols"])
            h = response_hidden(model, batch)
            head = unwrap(model).get_output_embeddings()
            scale = check_head(model).scale  # Cohere's / Granite's logit scale: folded into h
            if scale != 1.0:
                if head.bias is not None:
                    raise ValueError("finetune: a scaled lm_head with a bias is not supported")
                h = h * scale
            wce, wemd, tgt = inputs["ce_weight"], inputs["emd_weight"], inputs["targets"]
            loss = h.new_zeros((), dtype=torch.float32)
            for name, sel, w_ce, w_emd in (("ce", wce != 0, wce, torch.zeros_like(wemd)),
                                           ("emd", wemd != 0, torch.zeros_like(wce), wemd)):
                if bool(sel.any()):
                    part = fused_linear_emd_loss(
                        h[sel], head.weight, tgt[sel], w_ce[sel], w_emd[sel], self.cost.unit,
                        bias=head.bias, backend=self.loss_backend)
                    loss = loss + part
                    self._parts[name].append(float(part.detach()))
            wul = inputs.get("ul_weight")
            if wul is not None and bool((wul != 0).any()):
                sel = wul != 0
                part = unlikelihood_loss(h[sel], head.weight, tgt[sel], wul[sel], head.bias)
                loss = loss + part
                self._parts["ul"].append(float(part.detach()))
            return (loss, None) if return_outputs else loss

        def log(self, logs: dict, *args, **kwargs) -> None:
            if self._parts["ce"]:
                # CE over every CE token: safe answers (and refusals, for sft and
                # ta-sft+refusal), safe tokens weighted by safe_weight (a plain mean at 1)
                logs["ce"] = round(sum(self._parts["ce"]) / len(self._parts["ce"]), 4)
            if self._parts["emd"]:  # −λ·mean EMD (harmful) − λ_r·mean EMD (away)
                logs["neg_lam_emd"] = round(sum(self._parts["emd"]) / len(self._parts["emd"]), 4)
            if self._parts["ul"]:  # λ_r·mean unlikelihood (away, --away-loss unlikelihood)
                logs["lam_r_ul"] = round(sum(self._parts["ul"]) / len(self._parts["ul"]), 4)
            self._parts = {"ce": [], "emd": [], "ul": []}
            super().log(logs, *args, **kwargs)

    return TASFTTrainer


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _describe_checkpoints(ckpt: Path, meta: dict) -> None:
    """Write each ``checkpoint-N``'s own ``safedecode.json``: the run's metadata at step N."""
    for folder in sorted(ckpt.glob("checkpoint-*")):
        step = int(folder.name.rsplit("-", 1)[1])
        own = dict(meta, steps=step, checkpoint_of=str(ckpt.parent),
                   history=[h for h in meta["history"] if h.get("step", 0) <= step
                            and "loss" in h])
        own.pop("train_s", None)
        (folder / "safedecode.json").write_text(json.dumps(own, indent=2) + "\n")


def finetune(data_path: str | Path, out: str | Path, cfg: TASFTConfig | None = None, *,
             model_path: str | None = None, resume: bool = False, progress: bool = True,
             cost_path: str | Path | None = None, keep_checkpoints: bool = False,
             log=print) -> dict:
    """Fine-tune on a :func:`save_data` file; writes a peft adapter (or, with ``full``, the whole
    model and tokenizer) and ``safedecode.json`` (config, data hash, model fingerprint, loss
    history) to ``out``. Checkpoints go to ``out/checkpoints`` every ``save_steps`` steps;
    ``resume`` continues from the last one. They are removed after a finished run unless
    ``keep_checkpoints``: then every one is kept and gets its own ``safedecode.json`` (the run's
    metadata with its ``steps`` and the history up to it), so each loads as an adapter and a
    single run gives a curve over training length (with the constant schedule the checkpoint at
    step N is the run that stopped at N; a decaying one is not). Returns the recorded metadata."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

    from safedecode.models import (
        DEFAULT_NAME,
        default_model_dir,
        embedding_fingerprint,
        model_name,
        quiet_loading,
    )
    from safedecode.ops.linear_emd import SemanticCost

    from .save import save_adapter
    from .teacher import check_head

    cfg = cfg or TASFTConfig()
    data_path, out = Path(data_path), Path(out)
    header, records = load_data(data_path)
    ckpt = out / "checkpoints"
    if resume and not any(ckpt.glob("checkpoint-*")):
        raise ValueError(f"finetune --resume: no checkpoint in {ckpt}")
    quiet_loading()
    path = model_path or str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fingerprint = embedding_fingerprint(model)
    if header.get("embedding_fingerprint") not in (None, fingerprint):
        raise ValueError(f"training data: {data_path} holds answers of another model "
                         f"(fingerprint {header['embedding_fingerprint']}, this model "
                         f"{fingerprint})")
    cost = SemanticCost.load(cost_path) if cost_path is not None else \
        SemanticCost.from_model(model)
    cost.check(model)
    transform = check_head(model)
    if transform.cap is not None:
        raise ValueError(f"finetune: {type(model).__name__} soft-caps its logits "
                         f"(final_logit_softcapping {transform.cap}); TA-SFT's fused loss "
                         "computes the lm_head's logits without it")
    train = examples(tok, records, cfg)
    # seeded before the adapter exists: peft draws LoRA's A matrices from the global RNG, and
    # Trainer seeds only after (it would leave the initialisation to chance: same --seed,
    # different run)
    set_seed(cfg.seed)
    if cfg.full:
        model.train()
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
            target_modules=list(cfg.targets), task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(ckpt), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.lr, per_device_train_batch_size=cfg.batch_size, seed=cfg.seed,
        data_seed=cfg.seed, report_to=[], logging_steps=5, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=None if keep_checkpoints else 1,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress, remove_unused_columns=False, lr_scheduler_type=cfg.lr_schedule,
        warmup_steps=0, dataloader_num_workers=0)
    trainer = _trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(train),
                               data_collator=Collator(tok.pad_token_id, cfg.lam, cfg.safe_weight,
                                                     cfg.away_refusal, cfg.away_loss),
                               cost=cost, loss_backend=cfg.loss_backend)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    train_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    if cfg.full:
        trainer.model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
    else:
        save_adapter(trainer.model, out)
    counts = {k: sum(e["kind"] == v for e in train) for k, v in
              (("harmful", KIND_HARMFUL), ("refusal", KIND_REFUSAL), ("safe", KIND_SAFE),
               ("away", KIND_AWAY))}
    meta = {"format": "safedecode-finetune/1", "method": cfg.method,
            "embedding_fingerprint": fingerprint,
            "base_model": DEFAULT_NAME if model_path is None else model_name(model),
            "config": asdict(cfg), "data": str(data_path), "data_sha256": _sha(data_path),
            "examples": counts, "steps": trainer.state.global_step, "train_s": round(train_s, 1),
            "history": [h for h in trainer.state.log_history
                        if "loss" in h or "train_loss" in h]}
    (out / "safedecode.json").write_text(json.dumps(meta, indent=2) + "\n")
    if keep_checkpoints:
        _describe_checkpoints(ckpt, meta)
    else:
        shutil.rmtree(ckpt, ignore_errors=True)
    log(f"{cfg.method}: {trainer.state.global_step} steps in {train_s:.0f}s")
    return meta

