"""A linear probe for harmful requests on a model's hidden states: SafeInfer's gate.

On a small model SafeInfer's function vector is an unconditional "refuse" direction: it steers
harmless requests into a refusal as often as harmful ones. Conditional activation steering
(CAST, Lee et al., arXiv 2409.05907) adds the behaviour vector only when the prompt's hidden
state matches a *condition*. Here the condition is a logistic-regression probe per decoder
layer on the hidden state after that layer at the last prompt token (the position that decodes
the first new token, where ``steer="first"`` adds the vector), trained on the anchor set's
**train** part (harmful vs safe requests, the chat template's default system prompt, as the
amplified branch renders them). A row is steered when ``h · w_l + b_l > threshold``.

The probe's standardisation is folded into ``w_l`` and ``b_l``, so the gate costs one dot
product per row at prefill.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class HarmProbe:
    """Per-layer logistic probes: ``logit_l(h) = h · weight[l] + bias[l]`` (> 0: harmful)."""

    weight: torch.Tensor  # [L, d] fp32
    bias: torch.Tensor  # [L] fp32
    info: dict = field(default_factory=dict)  # data, regularisation, accuracies by layer

    def __post_init__(self) -> None:
        if self.weight.dim() != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"HarmProbe: expected weight [L, d] and bias [L], got "
                             f"{tuple(self.weight.shape)} and {tuple(self.bias.shape)}")
        if not (torch.isfinite(self.weight).all() and torch.isfinite(self.bias).all()):
            raise ValueError("HarmProbe: weight or bias holds NaN or inf")

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    def logit(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The probe's logit for hidden states ``h [..., d]`` after decoder layer ``layer``."""
        return h.float() @ self.weight[layer].to(h.device) + self.bias[layer].to(h.device)


@torch.no_grad()
def last_token_states(model, tok, prompts: Sequence[str], *, batch_size: int = 8
                      ) -> torch.Tensor:
    """The hidden state after every decoder layer at the last prompt token of each prompt (one
    user turn, the template's default system prompt): ``[n, L, d]`` fp32."""
    from .safeinfer import _pad_left, _prompt_ids, decoder_layers

    _, layers = decoder_layers(model)
    grabbed: dict[int, torch.Tensor] = {}

    def grab(i, module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        grabbed[i] = h[:, -1].float().cpu()
    handles = [layer.register_forward_hook(functools.partial(grab, i))
               for i, layer in enumerate(layers)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out = []
    try:
        for s in range(0, len(prompts), batch_size):
            part = prompts[s:s + batch_size]
            ids, mask = _pad_left([_prompt_ids(tok, [{"role": "user", "content": p}])
                                   for p in part], pad)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=ids.to(device), attention_mask=mask.to(device),
                  position_ids=pos.to(device), logits_to_keep=1)
            out.append(torch.stack([grabbed[i] for i in range(len(layers))], 1))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 0.01, iters: int = 200
                 ) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression on standardised features (L-BFGS), returned in the
    original feature space: ``(w [d], b)`` with ``logit = x · w + b``."""
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"fit_logistic: expected x [n, d] and y [n], got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if not ((y == 0) | (y == 1)).all() or y.min() == y.max():
        raise ValueError("fit_logistic: y must hold 0 and 1, both present")
    if l2 < 0:
        raise ValueError(f"fit_logistic: l2 must be >= 0, got {l2}")
    x, y = x.double(), y.double()
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xn = (x - mu) / sd
    with torch.enable_grad():
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xn @ w + b, y) \
                + l2 * (w * w).sum()
            loss.backward()
            return loss
        opt.step(closure)
    w_, b_ = w.detach() / sd, b.detach() - (w.detach() * mu / sd).sum()
    return w_.float(), float(b_)


def _rates(logit: torch.Tensor, harmful: torch.Tensor) -> dict:
    pos = logit > 0
    return {"tpr": round(float(pos[harmful].float().mean()), 4),
            "fpr": round(float(pos[~harmful].float().mean()), 4)}


def train_probe(model, tok, *, l2: float = 0.01, batch_size: int = 8,
                forms: str | Sequence[str] | None = None, log=print) -> HarmProbe:
    """Fit the probe of every layer on the anchor set's train part (harmful = 1, safe = 0) —
    with ``forms``, also on every train request in each of those content-neutral forms
    (:mod:`safedecode.data.forms`) — and measure each on the validation part (rates at
    threshold 0, stored in ``info``)."""
    from safedecode.data import check_not_evaluation, load_anchor
    from safedecode.data.forms import in_forms, parse_forms

    forms = parse_forms(forms)
    parts = {p: load_anchor(part=p) for p in ("train", "val")}
    n_train = len(parts["train"])
    parts["train"] = in_forms(parts["train"], forms)
    states, labels = {}, {}
    for p, items in parts.items():
        prompts = [it["prompt"] for it in items]
        check_not_evaluation(prompts, "SafeInfer gate data")
        states[p] = last_token_states(model, tok, prompts, batch_size=batch_size)
        labels[p] = torch.tensor([it["split"] == "harmful" for it in items])
        log(f"hidden states of the {p} part: {len(items)} requests")
    n_l = states["train"].shape[1]
    ws, bs, by_layer = [], [], []
    for li in range(n_l):
        w, b = fit_logistic(states["train"][:, li], labels["train"].float(), l2)
        ws.append(w)
        bs.append(b)
        rates = {p: _rates(states[p][:, li] @ w + b, labels[p]) for p in parts}
        by_layer.append(rates)
        log(f"layer {li}: train tpr {rates['train']['tpr']:.3f} fpr {rates['train']['fpr']:.3f}"
            f" | validation tpr {rates['val']['tpr']:.3f} fpr {rates['val']['fpr']:.3f}")
    info = {"data": "anchor train part (harmful vs safe requests), last prompt token, "
                    "template default system prompt",
            "l2": l2, "train": n_train, "forms": list(forms), "val": len(parts["val"]),
            "rates_at_0": by_layer}
    return HarmProbe(torch.stack(ws), torch.tensor(bs, dtype=torch.float32), info)


def gated_add(h: torch.Tensor, vector: torch.Tensor, scale: float, weight: torch.Tensor,
              bias: float, threshold: float) -> torch.Tensor:
    """``h + scale · vector`` on the rows whose probe logit ``h · weight + bias`` exceeds
    ``threshold``; other rows unchanged (the gated steering hook's function, ``h [rows, t, d]``:
    each position is judged by its own state)."""
    on = (h.float() @ weight.to(h.device) + bias > threshold).to(h.dtype).unsqueeze(-1)
    return h + scale * on * vector.to(h.dtype).to(h.device)


def gated_add_rows(h: torch.Tensor, vector: torch.Tensor, scale: float, weight: torch.Tensor,
                   bias: float, threshold: float) -> torch.Tensor:
    """``h + scale · vector`` at every position of the rows whose probe logit *at the last
    position* exceeds ``threshold`` (``h [rows, t, d]``, left-padded: the last position is the
    last prompt token) — the gated hook of ``steer="prompt"``."""
    on = (h[:, -1:].float() @ weight.to(h.device) + bias > threshold).to(h.dtype).unsqueeze(-1)
    return h + scale * on * vector.to(h.dtype).to(h.device)


def probe_above(h: torch.Tensor, weight: torch.Tensor, bias: float, threshold: float
                ) -> torch.Tensor:
    """Whether each row's probe logit ``h · weight + bias`` exceeds ``threshold``
    (``h [rows, d]`` -> bool ``[rows]``): the engine-level gate of ``steer="every"``, judged
    once per request at prefill and kept for every decode step (:class:`BranchHook` ``gate``)."""
    return h.float() @ weight.to(h.device) + bias > threshold


@torch.no_grad()
def branch_last_states(model, tok, method, branch: int, module: str, prompts: Sequence[str], *,
                       batch_size: int = 16) -> torch.Tensor:
    """The output of ``module`` at the last prompt token of ``method``'s branch ``branch``, as
    the engine renders it (system text, soft prompt, adapter): ``[n, d]`` fp32. Read by a gated
    hook that steers nothing."""
    import dataclasses

    from safedecode.engine import BranchHook, SafeDecoder

    from .acd import _unchanged

    got: list[torch.Tensor] = []

    def grab(h: torch.Tensor) -> torch.Tensor:
        got.append(h.float().clone())
        return torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)

    br = method.branches[branch]
    hook = BranchHook(module, _unchanged, positions="first", gate=grab)
    branches = list(method.branches)
    branches[branch] = dataclasses.replace(br, hooks=(*br.hooks, hook))
    dec = SafeDecoder(model, tok, dataclasses.replace(method, branches=tuple(branches),
                                                      contrast_gate=None))
    for s in range(0, len(prompts), batch_size):
        dec.generate(list(prompts[s:s + batch_size]), max_new_tokens=1)
    return torch.cat(got).cpu()
