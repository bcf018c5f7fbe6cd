"""The TA-SFT loss: cross-entropy on safe rows, Earth Mover's Distance on harmful rows, fused with
the lm_head matmul so that the ``[T, V]`` logits never exist.

**The EMD to a one-hot target is exact and O(V·d).** With the semantic ground cost
``C_ij = 1 − cos(e_i, e_j)`` between token embeddings, the only transport plan from the model's
distribution ``p`` to the point mass ``δ(y)`` moves each ``p_i`` from ``i`` to ``y``, so::

    EMD_C(p, δ(y)) = Σ_i p_i C_iy = 1 − (Σ_i p_i ê_i) · ê_y          (ê = unit-normalised e)

No ``V × V`` cost matrix and no optimal-transport solver: one extra matmul (the target rows of
``Ê`` against ``Ê``) per chunk. The TA-SFT paper (arXiv 2412.06843) also proposes a lower bound
on the EMD for speed; its statement was not reachable from this project (only the abstract), and
for one-hot targets the exact value above costs no more than a bound would, so only the exact
form is implemented.

The loss of a batch of scored positions is ``Σ_t ce_weight_t · CE_t + emd_weight_t · EMD_t``.
TA-SFT puts ``1/N_safe`` on the safe positions' CE and ``−λ/N_harm`` on the harmful positions'
EMD (pushed *up*: the model moves its mass to tokens semantically far from the harmful ones; EMD
is bounded by 2, so unlike a negative CE the objective cannot run off to −∞).

- :func:`reference_loss` materialises the logits (the definition; tests compare against it).
- :func:`fused_linear_emd_loss` walks the positions in chunks: logits of the chunk, loss and the
  gradient w.r.t. those logits (the chunk's buffer is overwritten with it), then
  ``grad_hidden = g·W`` and ``grad_W += gᵀ·h``; backward only scales the stored gradients (as
  Liger-Kernel's fused linear cross-entropy does). The per-row pass runs in a Triton kernel
  (``triton_kernels/linear_emd.py``, on a GPU or under ``TRITON_INTERPRET=1``) or in torch ops
  (CPU). Peak extra memory: one chunk of ``rows × V`` fp32 (two with EMD rows; 64 MiB each),
  flat in T and V.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32): rows per chunk = this // V
BACKENDS = ("auto", "torch", "triton")


@dataclass
class SemanticCost:
    """The semantic ground cost ``1 − cos(e_i, e_j)``, kept as the unit-normalised token
    embeddings ``unit [V, d]`` (fp32) of the model it was built from (``fingerprint``)."""

    unit: torch.Tensor
    fingerprint: str

    @classmethod
    def from_model(cls, model) -> SemanticCost:
        from safedecode.models import embedding_fingerprint

        emb = model.get_input_embeddings().weight.detach().float()
        return cls(F.normalize(emb, dim=-1), embedding_fingerprint(model))

    def check(self, model) -> None:
        """Raise ``ValueError`` if this cost was built from another model's embeddings."""
        from safedecode.models import embedding_fingerprint

        fp = embedding_fingerprint(model)
        if fp != self.fingerprint:
            raise ValueError(f"cost matrix: built from the token embeddings of another model "
                             f"(fingerprint {self.fingerprint}, this model {fp})")

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        save_file({"unit": self.unit.contiguous()}, str(path),
                  metadata={"format": "safedecode-semantic-cost/1",
                            "embedding_fingerprint": self.fingerprint})
        return path

    @classmethod
    def load(cls, path: str | Path) -> SemanticCost:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                unit = f.get_tensor("unit")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error
            raise ValueError(f"cost matrix: cannot read {path}: {exc}") from exc
        if meta.get("format") != "safedecode-semantic-cost/1" or unit.dim() != 2:
            raise ValueError(f"cost matrix: {path} is not a safedecode semantic-cost file")
        return cls(unit.float(), meta.get("embedding_fingerprint", "?"))


def _check(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
           ce_weight: torch.Tensor, emd_weight: torch.Tensor, unit: torch.Tensor,
           bias: torch.Tensor | None) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear-EMD loss: hidden [N, d] and weight [V, d] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    n, v = hidden.shape[0], weight.shape[0]
    if unit.dim() != 2 or unit.shape[0] != v:
        raise ValueError(f"linear-EMD loss: the cost matrix covers {unit.shape[0]} tokens but the "
                         f"lm_head has {v} (a cost matrix from another model?)")
    for name, t in (("target", target), ("ce_weight", ce_weight), ("emd_weight", emd_weight)):
        if t.shape != (n,):
            raise ValueError(f"linear-EMD loss: {name} must have shape ({n},), got "
                             f"{tuple(t.shape)}")
    if target.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"linear-EMD loss: target must be integer token ids, got {target.dtype}")
    if n and (int(target.min()) < 0 or int(target.max()) >= v):
        raise ValueError(f"linear-EMD loss: target ids must be in [0, {v}), got "
                         f"[{int(target.min())}, {int(target.max())}]")
    for name, t in (("ce_weight", ce_weight), ("emd_weight", emd_weight)):
        if not torch.isfinite(t).all():
            raise ValueError(f"linear-EMD loss: {name} has non-finite values")
    if bias is not None and bias.shape != (v,):
        raise ValueError(f"linear-EMD loss: bias must have shape ({v},), got {tuple(bias.shape)}")


def reference_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                   ce_weight: torch.Tensor, emd_weight: torch.Tensor, unit: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_t ce_weight_t·CE_t + emd_weight_t·EMD_t`` with the full logits materialised (fp32
    softmax; fp64 for fp64 inputs): the definition the fused loss is checked against."""
    _check(hidden, weight, target, ce_weight, emd_weight, unit, bias)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = F.linear(hidden, weight, bias).to(acc)
    lp = torch.log_softmax(logits, dim=-1)
    ce = -lp.gather(1, target[:, None].long())[:, 0]
    u = unit.to(acc)
    cost = 1.0 - u[target.long()] @ u.T  # [N, V]: C_{i, y_t} for every token i
    emd = (lp.exp() * cost).sum(-1)
    return (ce_weight.to(acc) * ce + emd_weight.to(acc) * emd).sum()


def _rows_torch(z: torch.Tensor, c: torch.Tensor | None, target: torch.Tensor,
                wce: torch.Tensor, wemd: torch.Tensor) -> torch.Tensor:
    """Per-row loss; ``z`` (fp32 logits) is overwritten with d(loss)/d(logits)."""
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    rows = torch.arange(z.shape[0], device=z.device)
    loss = wce * (lse[:, 0] - z[rows, target])
    p = z.sub_(lse).exp_()  # z now holds p
    if c is not None:
        cost = c.neg_().add_(1.0)  # c now holds 1 - cos
        emd = (p * cost).sum(-1)
        loss = loss + wemd * emd
        cost.sub_(emd[:, None]).mul_(p).mul_(wemd[:, None])  # wemd·p·(cost − EMD)
        p.mul_(wce[:, None]).add_(cost)
    else:
        p.mul_(wce[:, None])
    p[rows, target] -= wce
    return loss


_KERNELS = None


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        try:
            from safedecode.triton_kernels import linear_emd as mod
        except ImportError:  # source checkout without the package mapping
            path = Path(__file__).resolve().parents[2] / "triton_kernels" / "linear_emd.py"
            spec = importlib.util.spec_from_file_location("_safedecode_linear_emd", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        _KERNELS = mod
    return _KERNELS


def _rows_triton(z: torch.Tensor, c: torch.Tensor | None, target: torch.Tensor,
                 wce: torch.Tensor, wemd: torch.Tensor) -> torch.Tensor:
    k = _kernels()
    n, v = z.shape
    loss = torch.empty(n, dtype=torch.float32, device=z.device)
    block = 4096 if z.device.type == "cuda" else min(1 << 14, 1 << (v - 1).bit_length())
    k._linear_emd_rows[(n,)](z, z if c is None else c, target, wce, wemd, loss, v, z.stride(0),
                             0 if c is None else c.stride(0), HAS_EMD=c is not None, BLOCK=block)
    return loss


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"linear-EMD loss: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("linear-EMD loss: the triton backend needs a CUDA device or "
                         "TRITON_INTERPRET=1 (set before importing triton)")
    return backend


class _FusedLinearEMD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ce_weight, emd_weight, unit, rows, backend):
        n, d = hidden.shape
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        gh = torch.empty_like(hidden) if need_h else None
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        wce = ce_weight.to(acc).contiguous()
        wemd = emd_weight.to(acc).contiguous()
        tgt = target.long().contiguous()
        u = unit.to(weight.dtype) if unit.dtype != weight.dtype else unit
        has_emd = wemd != 0
        run = _rows_triton if backend == "triton" and acc == torch.float32 else _rows_torch
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            h = hidden[s:e]
            z = F.linear(h, weight, bias).to(acc).contiguous()
            c = (u[tgt[s:e]] @ u.T).to(acc).contiguous() if bool(has_emd[s:e].any()) else None
            total += run(z, c, tgt[s:e], wce[s:e], wemd[s:e]).sum()
            g = z.to(weight.dtype)
            if need_h:
                gh[s:e] = g @ weight
            if need_w:
                if gw.dtype == g.dtype:
                    gw.addmm_(g.T, h)
                else:
                    gw += (g.T @ h).to(acc)
            if need_b:
                gb += z.sum(0)
        ctx.save_for_backward(gh, None if gw is None else gw.to(weight.dtype),
                              None if gb is None else gb.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.saved_tensors
        if bool(grad_out == 1):  # the usual case (the loss itself): no copies
            return (gh, gw, gb, None, None, None, None, None, None)
        out = [None if t is None else (t * grad_out.to(t.dtype)) for t in (gh, gw, gb)]
        return (*out, None, None, None, None, None, None)


def fused_linear_emd_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                          ce_weight: torch.Tensor, emd_weight: torch.Tensor, unit: torch.Tensor,
                          *, bias: torch.Tensor | None = None, chunk_rows: int | None = None,
                          backend: str = "auto") -> torch.Tensor:
    """:func:`reference_loss` without materialising the logits (see the module docstring).

    ``hidden [N, d]`` final hidden states at the scored positions, ``weight [V, d]`` the lm_head,
    ``target [N]`` next-token ids, ``ce_weight`` / ``emd_weight [N]`` per-position weights,
    ``unit [V, d]`` unit-normalised embeddings (:class:`SemanticCost`). Differentiable in
    ``hidden``, ``weight`` and ``bias`` (whichever require grad). ``chunk_rows`` defaults to
    ``CHUNK_ELEMENTS // V``; ``backend``: ``auto`` (Triton on CUDA, torch ops elsewhere),
    ``torch`` or ``triton``."""
    _check(hidden, weight, target, ce_weight, emd_weight, unit, bias)
    be = _pick_backend(backend, hidden.device)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or chunk_rows < 1):
        raise ValueError(f"linear-EMD loss: chunk_rows must be >= 1, got {chunk_rows!r}")
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0).float()
    return _FusedLinearEMD.apply(hidden, weight, bias, target, ce_weight, emd_weight,
                                 unit.to(hidden.device), rows, be)
