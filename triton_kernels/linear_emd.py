"""Triton kernel of the fused linear CE / EMD loss (semantics: ``safedecode.training.emd``).

One program per row of a chunk of logits ``z [n, V]`` (fp32). Three streaming passes over the
vocabulary in ``BLOCK`` tiles:

1. online max and sum-exp: ``lse``; the cross-entropy ``lse - z[y]``;
2. (``HAS_EMD``) the EMD to the one-hot target, ``Σ_i p_i (1 - c_i)`` with ``c`` the row's cosine
   similarities to the target token (``[n, V]``, precomputed by a matmul);
3. the gradient of the row's weighted loss ``wce·CE + wemd·EMD`` w.r.t. its logits, written over
   ``z`` in place: ``wce·(p - onehot(y)) + wemd·p·((1 - c) - EMD)``.

The caller multiplies the gradient by the lm_head weight (matmuls stay on cuBLAS), so no ``[T, V]``
buffer ever exists: only the chunk's.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _linear_emd_rows(z_ptr, c_ptr, tgt_ptr, wce_ptr, wemd_ptr, loss_ptr, V, stride_z, stride_c,
                     HAS_EMD: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + r * stride_z
    c_row = c_ptr + r * stride_c
    y = tl.load(tgt_ptr + r)
    wce = tl.load(wce_ptr + r)
    wemd = tl.load(wemd_ptr + r)
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    loss = wce * (lse - tl.load(z_row + y))
    emd = 0.0
    if HAS_EMD:
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < V
            x = tl.load(z_row + offs, mask=ok, other=float("-inf"))
            c = tl.load(c_row + offs, mask=ok, other=1.0)
            emd += tl.sum(tl.exp(x - lse) * (1.0 - c), 0)
        loss += wemd * emd
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < V
        x = tl.load(z_row + offs, mask=ok, other=float("-inf"))
        p = tl.exp(x - lse)
        g = wce * (p - tl.where(offs == y, 1.0, 0.0))
        if HAS_EMD:
            c = tl.load(c_row + offs, mask=ok, other=1.0)
            g += wemd * p * ((1.0 - c) - emd)
        tl.store(z_row + offs, g, mask=ok)
    tl.store(loss_ptr + r, loss)
