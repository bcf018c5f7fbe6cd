"""Triton kernels of the fused contrastive sampler (semantics: ``safedecode/ops/reference.py``).

At most four launches per call, all on fixed geometry (no host sync, CUDA-graph capturable):

1. ``_stats_kernel``  (grid ``(B, C)``) per chunk: anchor max (plausibility mask) and, for
   ``rule="union"``, max and sum-exp of both branches. Only when some row needs it (the host knows:
   the union rule, or a ``beta`` that is not the scalar 0).
2. ``_score_kernel``  (grid ``(B, C)``) the combined score ``s`` (fp32, ``-inf`` = excluded) into a
   ``[B, V]`` buffer (skipped for greedy rows that need no distribution); per chunk: max ``s``, its
   first index, NaN / +inf / anchor-alive flags, and with a plausibility mask the vocabulary
   indices of its finite scores (a run per chunk) and their count. The only pass over the logits:
   the HBM-bound part.
3. ``_select_kernel`` (grid ``B``) one program per row finds the top-k and top-p thresholds, the
   final mass and draws the token. With a plausibility mask leaving at most ``GATHER_MAX`` finite
   scores (the ACD step) it gathers the score kernel's runs into the per-row candidate list and
   never reads the row; otherwise it reads ``s`` (L2-resident on a GPU) in at most two full-row
   passes: a 16-bucket histogram (a bucket is the exponent of ``|x|``), then the compaction of
   every token up to the first search's bucket (keys and indices, vocabulary order) into the
   per-row candidate list. The radix digits (4 bits, starting below the bits the threshold
   bucket's keys share, shrinking a scratch copy in place), top-p after top-k, the final mass and
   the draw (one tile) read only that list. Without top-k / top-p: one pass for the final mass.
   Greedy rows return at once.
4. ``_logprobs_kernel`` (grid ``(B, C)``) for ``contrastive_logprobs`` only: ``x - log Z`` on the
   final set, ``-inf`` elsewhere.

A token's key is the bit pattern of ``|x|`` (``x = (s - m) / T <= 0``): a smaller key is a larger
``x``, ties share a key. Top-k keeps the keys up to the k-th smallest; top-p the smallest key ``K``
with ``mass(key <= K) >= top_p * Z`` over the top-k survivors.

Compiled variants: integer arguments that differ per call or per row (``K``, ``anchor``, the output
mode) are not specialised, so a decode loop compiles 2 stats + 3 score kernels per logits dtype and
one select and one log-probs kernel (tile sizes depend on ``V`` only). The strides stay specialised:
their divisibility by 16 is what lets bf16/fp16 rows load as 16-byte vectors.

Precision: scores, ``x`` and log-probs are fp32 as in the reference (true division ``div_rn``).
Top-p bucket masses are fp32 sums within a tile, fp64 across tiles; the final-set mass and the draw
are fp64 throughout, as in the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))
MAXKEY = tl.constexpr(0x7FFFFFFF)  # "keep every key"
BIG = tl.constexpr(0x7FFFFFFF)  # "no index" for min-reductions
NB = tl.constexpr(16)  # bins of a histogram pass (buckets or a 4-bit digit)
EBASE = tl.constexpr(119)  # bucket j of |x| holds fp32 exponent EBASE + j (clamped at 0 and NB-1)
N_STATS = tl.constexpr(5)  # anchor max, branch-0 max, branch-0 sum-exp, branch-1 max, sum-exp
N_ROW = tl.constexpr(4)  # row record for the log-probs kernel: status, m, final key, log Z
N_TRACE = tl.constexpr(2)  # per row: full-row passes, elements read by the select kernel
GATHER_MAX = tl.constexpr(4096)  # plausible tokens the select gathers instead of reading its row
GT = tl.constexpr(64)  # lanes of a gather tile ([GT, CP] chunk lookup)

# Philox4x32-10 constants (see safedecode/ops/philox.py).
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
PHILOX_SALT = tl.constexpr(0x5AFEDEC0)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def philox_uniform(seed, step):
    """One float64 uniform in [0, 1) from int64 ``seed`` and ``step`` (Philox4x32-10)."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (step & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = (step * 0 + PHILOX_SALT).to(tl.uint32)
    c3 = (step * 0).to(tl.uint32)
    m0 = (step * 0 + PHILOX_M0).to(tl.uint32)
    m1 = (step * 0 + PHILOX_M1).to(tl.uint32)
    w0 = (step * 0 + PHILOX_W0).to(tl.uint32)
    w1 = (step * 0 + PHILOX_W1).to(tl.uint32)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + w0
            k1 = k1 + w1
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    hi = (c0 >> 5).to(tl.float64)  # 27 bits
    lo = (c1 >> 6).to(tl.float64)  # 26 bits
    return (hi * 67108864.0 + lo) * (1.0 / 9007199254740992.0)


@triton.jit
def _tile_x(s_row, offs, mask, m, t_eff):
    """x = (s - m) / T of a tile, its radix key and validity (-inf scores are not valid)."""
    s = tl.load(s_row + offs, mask=mask, other=NEG_INF)
    valid = mask & (s > NEG_INF)
    x = tl.where(valid, tl.math.div_rn(s - m, t_eff), NEG_INF)
    key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # |x| bits: monotone in -x
    return x, key, valid


@triton.jit
def _neg_x(key):
    """x back from its key (x <= 0, so x = -|x| exactly)."""
    return -(key.to(tl.float32, bitcast=True))


@triton.jit
def _pick(hc, hm, target, MASS: tl.constexpr):
    """The bin holding the target rank (counts) or mass (top-p): (bin, count or mass before it,
    tokens in it). Rounding can leave a mass target above the total: then the last non-empty bin."""
    bins = tl.arange(0, NB)
    if MASS:
        cum = tl.cumsum(hm, axis=0)
        d = tl.min(tl.where((cum >= target) & (hc > 0), bins, NB))
        d = tl.where(d == NB, tl.max(tl.where(hc > 0, bins, -1)), d)
        before = tl.sum(tl.where(bins < d, hm, 0.0))
    else:
        cum = tl.cumsum(hc, axis=0)
        d = tl.min(tl.where(cum >= target, bins, NB))
        before = tl.sum(tl.where(bins < d, hc, 0)).to(tl.float64)
    in_bin = tl.sum(tl.where(bins == d, hc, 0))
    return d, before, in_bin


@triton.jit
def _bucket(key):
    """Bucket of a key: the fp32 exponent of |x|, clamped to NB bins (monotone in the key)."""
    return tl.minimum(tl.maximum((key >> 23) - EBASE, 0), NB - 1)


@triton.jit
def _upper(d):
    """Largest key of bucket d."""
    return tl.where(d == NB - 1, MAXKEY, ((EBASE + d + 1) << 23) - 1)


@triton.jit
def _load_cand(s_row, keys, idx, offs, n, m, t_eff, from_buf):
    """x, key, validity and vocabulary index of candidate positions ``offs``: the compacted
    buffer (keys / idx, ``n`` entries) when ``from_buf``, else the row itself (``n`` = V)."""
    ok = offs < n
    if from_buf:
        key = tl.load(keys + offs, mask=ok, other=0)
        vi = tl.load(idx + offs, mask=ok, other=0).to(tl.int64)
        x = tl.where(ok, _neg_x(key), NEG_INF)
        valid = ok
    else:
        x, key, valid = _tile_x(s_row, offs, ok, m, t_eff)
        vi = offs.to(tl.int64)
    return x, key, valid, vi


@triton.jit
def _radix(keys, n, work, d, limit, rem, MASS: tl.constexpr, TILE: tl.constexpr):
    """Threshold key inside bucket ``d``: the keys of ``keys[0:n]`` in that bucket with
    ``key <= limit`` are compacted into ``work``, then 4-bit digits (below the bits they all share)
    are histogrammed, each pass keeping in place the keys of the previous pass's chosen digit.
    ``rem``: rank (MASS=0) or mass (MASS=1) still wanted inside the bucket. Returns (K, reads)."""
    lanes = tl.arange(0, TILE)
    bins = tl.arange(0, NB)
    w = tl.zeros([], tl.int32)
    lo = tl.zeros([], tl.int32) + MAXKEY
    hi = tl.zeros([], tl.int32)
    for t in range(0, n, TILE):
        offs = t + lanes
        ok = offs < n
        key = tl.load(keys + offs, mask=ok, other=0)
        sel = ok & (_bucket(key) == d) & (key <= limit)
        pos = w + tl.cumsum(sel.to(tl.int32), axis=0) - 1
        tl.store(work + pos, key, mask=sel)
        w += tl.sum(sel.to(tl.int32))
        lo = tl.minimum(lo, tl.min(tl.where(sel, key, MAXKEY)))
        hi = tl.maximum(hi, tl.max(tl.where(sel, key, 0)))
    tl.debug_barrier()
    reads = tl.zeros([], tl.int64) + n
    n = w
    result = hi  # every key of the bucket equal: all tied at the threshold
    diff = lo ^ hi
    top = tl.zeros([], tl.int32)
    for i in tl.static_range(31):
        top = tl.where((diff >> i) != 0, i + 1, top)
    prefix = hi & ~((1 << top) - 1)  # keys of one bucket share bit 30: top <= 30
    active = diff != 0
    pshift = tl.zeros([], tl.int32)
    pmask = tl.zeros([], tl.int32)  # no filter on the first pass
    pd = tl.zeros([], tl.int32)
    for _it in range(8):
        if active:
            shift = tl.maximum(top - 4, 0)
            dmask = (1 << (top - shift)) - 1
            hc = tl.zeros([NB], tl.int32)
            hm = tl.zeros([NB], tl.float64)
            w = tl.zeros([], tl.int32)
            for t in range(0, n, TILE):
                offs = t + lanes
                ok = offs < n
                key = tl.load(work + offs, mask=ok, other=0)
                sel = ok & (((key >> pshift) & pmask) == pd)
                pos = w + tl.cumsum(sel.to(tl.int32), axis=0) - 1
                tl.store(work + pos, key, mask=sel)
                w += tl.sum(sel.to(tl.int32))
                dig = (key >> shift) & dmask
                hit = (dig[:, None] == bins[None, :]) & sel[:, None]
                hc += tl.sum(hit.to(tl.int32), axis=0)
                if MASS:
                    e = tl.exp(_neg_x(key))
                    hm += tl.sum(tl.where(hit, e[:, None], 0.0), axis=0).to(tl.float64)
            tl.debug_barrier()
            reads += n
            n = w
            dd, before, in_bin = _pick(hc, hm, rem, MASS)
            rem = rem - before
            if MASS:
                fin = (in_bin == 1) | (shift == 0)
            else:
                fin = (in_bin.to(tl.float64) == rem) | (shift == 0)
            prefix = prefix | (dd << shift)
            result = tl.where(fin, prefix | ((1 << shift) - 1), result)
            active = fin == 0
            pshift = shift
            pmask = dmask
            pd = dd
            top = shift
    return result, reads


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["anchor"])
def _stats_kernel(logits, sk, sb, stats, anchor, V, C, CHUNK: tl.constexpr, RULE: tl.constexpr,
                  TILE: tl.constexpr):
    """Per chunk: anchor max; for the union rule also max and sum-exp of branches 0 and 1."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    row = logits + b * sb
    start = c.to(tl.int64) * CHUNK
    lanes = tl.arange(0, TILE)
    amax = tl.full([TILE], NEG_INF, tl.float32)
    m0 = NEG_INF + tl.zeros([], tl.float32)
    s0 = tl.zeros([], tl.float32)
    m1 = NEG_INF + tl.zeros([], tl.float32)
    s1 = tl.zeros([], tl.float32)
    for t in range(0, CHUNK, TILE):
        offs = start + t + lanes
        mask = offs < V
        za = tl.load(row + anchor * sk + offs, mask=mask, other=NEG_INF)
        amax = tl.maximum(amax, za.to(tl.float32))
        if RULE == 1:
            z0 = tl.load(row + offs, mask=mask, other=NEG_INF).to(tl.float32)
            z1 = tl.load(row + sk + offs, mask=mask, other=NEG_INF).to(tl.float32)
            n0 = tl.maximum(m0, tl.max(z0))
            n1 = tl.maximum(m1, tl.max(z1))
            r0 = tl.where(n0 > NEG_INF, n0, 0.0)  # all -inf so far: nothing to rescale
            r1 = tl.where(n1 > NEG_INF, n1, 0.0)
            s0 = s0 * tl.exp(m0 - r0) + tl.sum(tl.exp(z0 - r0))
            s1 = s1 * tl.exp(m1 - r1) + tl.sum(tl.exp(z1 - r1))
            m0 = n0
            m1 = n1
    out = stats + (b * C + c) * N_STATS
    tl.store(out + 0, tl.max(amax))
    tl.store(out + 1, m0)
    tl.store(out + 2, s0)
    tl.store(out + 3, m1)
    tl.store(out + 4, s1)


@triton.jit
def _log_softmax_shift(stats_row, C, j, CP: tl.constexpr):
    """Row max M and log-sum-exp offset L of branch j from per-chunk (max, sum-exp) partials."""
    ci = tl.arange(0, CP)
    ok = ci < C
    mc = tl.load(stats_row + ci * N_STATS + 1 + 2 * j, mask=ok, other=NEG_INF)
    sc = tl.load(stats_row + ci * N_STATS + 2 + 2 * j, mask=ok, other=0.0)
    mx = tl.max(mc)
    r = tl.where(mx > NEG_INF, mx, 0.0)
    tot = tl.sum(tl.where(mc > NEG_INF, sc * tl.exp(mc - r), 0.0))
    return mx, tl.log(tot)


@triton.jit(do_not_specialize=["K", "anchor", "need_mode"])
def _score_kernel(logits, sk, sb, weights, log_beta, temperature, stats, S, spart, sarg, sflag,
                  fidx, fcnt, K, anchor, need_mode, V, C, CHUNK: tl.constexpr,
                  RULE: tl.constexpr, USE_STATS: tl.constexpr, COMPACT: tl.constexpr,
                  CP: tl.constexpr, TILE: tl.constexpr):
    """Score s (fp32, -inf = excluded) into S; per chunk: max s, its first index and flags (1: NaN,
    2: +inf, 4: some anchor logit is not -inf). Rows that only need the argmax skip the store.
    With a plausibility mask (COMPACT) the chunk's finite scores are few: their vocabulary
    indices go to ``fidx`` (the chunk's own run, in order) and their number to ``fcnt``, so the
    select kernel can gather them instead of reading the row."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    row = logits + b * sb
    stats_row = stats + b * C * N_STATS
    if USE_STATS:  # plausibility: keep z_a >= max z_a + log(beta)
        ci = tl.arange(0, CP)
        amax = tl.max(tl.load(stats_row + ci * N_STATS, mask=ci < C, other=NEG_INF))
        thr = amax + tl.load(log_beta + b)
    else:  # beta = 0 on every row (known on the host): no mask, no stats pass
        thr = NEG_INF
    if RULE == 1:
        mx0, lse0 = _log_softmax_shift(stats_row, C, 0, CP)
        mx1, lse1 = _log_softmax_shift(stats_row, C, 1, CP)
        gamma = tl.load(weights + b * 2 + 1)
    store_s = ((need_mode != 0) | (tl.load(temperature + b) > 0.0)).to(tl.int32)
    start = c.to(tl.int64) * CHUNK
    lanes = tl.arange(0, TILE)
    best = NEG_INF + tl.zeros([], tl.float32)
    best_i = tl.zeros([], tl.int64) + BIG
    flags = tl.zeros([TILE], tl.int32)
    s_row = S + b * V
    nfin = tl.zeros([], tl.int32)
    for t in range(0, CHUNK, TILE):
        offs = start + t + lanes
        mask = offs < V
        if RULE == 0:
            s = tl.zeros([TILE], tl.float32)
            excl = offs < 0
            za = s
            for k in range(K):
                z = tl.load(row + k * sk + offs, mask=mask, other=0.0).to(tl.float32)
                flags |= tl.where(z != z, 1, 0) | tl.where(z == float("inf"), 2, 0)  # noqa: PLR0124
                w = tl.load(weights + b * K + k)
                on = (w + tl.zeros_like(z)) != 0.0  # (compare as a vector: interpreter quirk)
                s = tl.where(on, s + w * z, s)  # no FMA: enable_fp_fusion=False at launch
                excl |= on & (z == NEG_INF)
                za = tl.where((k + tl.zeros_like(offs)) == anchor, z, za)
        else:
            z0 = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
            z1 = tl.load(row + sk + offs, mask=mask, other=0.0).to(tl.float32)
            flags |= tl.where(z0 != z0, 1, 0) | tl.where(z0 == float("inf"), 2, 0)  # noqa: PLR0124
            flags |= tl.where(z1 != z1, 1, 0) | tl.where(z1 == float("inf"), 2, 0)  # noqa: PLR0124
            lp0 = (z0 - mx0) - lse0
            lp1 = (z1 - mx1) - lse1
            on = (gamma + tl.zeros_like(z0)) != 0.0
            s = tl.where(on, lp0 + gamma * tl.minimum(lp0 - lp1, 0.0), lp0)
            excl = (z0 == NEG_INF) | (on & (z1 == NEG_INF))
            za = tl.where((anchor + tl.zeros_like(offs)) == 0, z0, z1)
        flags |= tl.where(mask & (za != NEG_INF), 4, 0)  # the anchor is not all -inf
        excl |= (za == NEG_INF) | (za < thr)
        s = tl.where(excl, NEG_INF, s)
        tl.store(s_row + offs, s, mask=mask & ((store_s + tl.zeros_like(offs)) != 0))
        if COMPACT:
            fin = mask & (s > NEG_INF)
            pos = nfin + tl.cumsum(fin.to(tl.int32), axis=0) - 1
            tl.store(fidx + b * V + start + pos, offs.to(tl.int32),
                     mask=fin & ((store_s + tl.zeros_like(offs)) != 0))
            nfin += tl.sum(fin.to(tl.int32))
        sv = tl.where(mask, s, NEG_INF)
        tmax = tl.max(sv)
        targ = tl.min(tl.where(mask & (sv == tmax), offs, BIG))
        better = tmax > best
        best_i = tl.where(better, targ, best_i)
        best = tl.where(better, tmax, best)
    out = b * C + c
    if COMPACT:
        tl.store(fcnt + out, nfin)
    tl.store(spart + out, best)
    tl.store(sarg + out, best_i)
    tl.store(sflag + out, tl.max(flags & 1) | tl.max(flags & 2) | tl.max(flags & 4))


@triton.jit(do_not_specialize=["need_mode"])
def _select_kernel(S, spart, sarg, sflag, temperature, top_k, top_p, log_min_p, seed, step,
                   ckey, cidx, work, fcnt, rows, trace, tokens, logprobs, status_out, need_mode,
                   V, C, CP: tl.constexpr, NT: tl.constexpr, TILE: tl.constexpr,
                   CHUNK: tl.constexpr, GATHER: tl.constexpr):
    """One program per row: status, thresholds, final mass, then the token (need_mode 0: sample,
    1: sample + log-prob) or the row record of the log-probs kernel (need_mode 2).

    With top-k or top-p on, two passes over the row: a bucket histogram (counts, and masses for
    top-p), then the compaction of every token up to the first search's bucket (keys and indices,
    vocabulary order) into ``ckey`` / ``cidx``; the searches, the final mass and the draw then
    read only that candidate list (``work``: the radix passes' scratch). With a plausibility mask
    (GATHER) and at most GATHER_MAX finite scores, no pass over the row at all: the score
    kernel's per-chunk runs of finite indices (in ``work``, counts in ``fcnt``) are gathered into
    the list, in vocabulary order, with their histogram (the list then holds every finite token,
    a superset of the buckets up to the search's: every later step filters by key)."""
    b = tl.program_id(0).to(tl.int64)
    ci = tl.arange(0, CP)
    ok = ci < C
    smax = tl.load(spart + b * C + ci, mask=ok, other=NEG_INF)
    m = tl.max(smax)
    greedy = tl.min(tl.load(sarg + b * C + ci, mask=ok & (smax == m), other=BIG))
    fl = tl.load(sflag + b * C + ci, mask=ok, other=0)
    status = tl.where(tl.max(fl & 1) > 0, 1,
                      tl.where(tl.max(fl & 2) > 0, 2,
                               tl.where(tl.max(fl & 4) == 0, 3, tl.where(m == NEG_INF, 4, 0))))
    temp = tl.load(temperature + b)
    t_eff = tl.where(temp > 0.0, temp, 1.0)
    need = (status == 0) & ((temp > 0.0) | (need_mode != 0))
    s_row = S + b * V
    keys = ckey + b * V
    idx = cidx + b * V
    wrk = work + b * V
    lanes = tl.arange(0, TILE)
    bins = tl.arange(0, NB)
    passes = tl.zeros([], tl.int32)
    reads = tl.zeros([], tl.int64)
    kf = tl.zeros([], tl.int32) + MAXKEY
    z = tl.zeros([], tl.float64)
    tm = tl.zeros([NT], tl.float64)  # final mass per tile of the source: the draw scans one tile
    ti = tl.arange(0, NT)
    n = tl.zeros([], tl.int32) + V  # entries of the source (the row, or the candidate list)
    from_buf = tl.zeros([], tl.int32)
    if need:
        k = tl.load(top_k + b)
        p = tl.load(top_p + b)
        k_act = (k > 0) & (k < V)
        p_act = p < 1.0
        if k_act | p_act:
            hc = tl.zeros([NB], tl.int32)
            hm = tl.zeros([NB], tl.float64)
            nf = tl.zeros([], tl.int32) + GATHER_MAX + 1  # no gather unless GATHER sets it
            cnt = tl.zeros([CP], tl.int32)
            incl = cnt
            if GATHER:
                cnt = tl.load(fcnt + b * C + ci, mask=ok, other=0)
                incl = tl.cumsum(cnt, axis=0)
                nf = tl.sum(cnt)
            gathered = nf <= GATHER_MAX
            if gathered:
                # The score kernel's runs of finite indices, gathered in chunk (= vocabulary)
                # order; their histogram on the way. No read of the row.
                glanes = tl.arange(0, GT)
                excl = incl - cnt
                for t in range(0, nf, GT):
                    pos = t + glanes
                    inl = pos < nf
                    j = tl.sum((pos[:, None] >= incl[None, :]).to(tl.int32), axis=1)
                    base = tl.sum(tl.where(ci[None, :] == j[:, None], excl[None, :], 0), axis=1)
                    src = j.to(tl.int64) * CHUNK + (pos - base)
                    vi = tl.load(work + b * V + src, mask=inl, other=0)
                    x, key, valid = _tile_x(s_row, vi, inl, m, t_eff)
                    tl.store(keys + pos, key, mask=inl)
                    tl.store(idx + pos, vi, mask=inl)
                    hit = (_bucket(key)[:, None] == bins[None, :]) & valid[:, None]
                    hc += tl.sum(hit.to(tl.int32), axis=0)
                    if p_act & (k_act == 0):
                        hm += tl.sum(tl.where(hit, tl.exp(x)[:, None], 0.0),
                                     axis=0).to(tl.float64)
                tl.debug_barrier()
                reads += nf
            else:
                # Pass 1 over the row: bucket histograms of every valid token.
                for t in range(0, V, TILE):
                    offs = t + lanes
                    x, key, valid = _tile_x(s_row, offs, offs < V, m, t_eff)
                    hit = (_bucket(key)[:, None] == bins[None, :]) & valid[:, None]
                    hc += tl.sum(hit.to(tl.int32), axis=0)
                    if p_act & (k_act == 0):
                        hm += tl.sum(tl.where(hit, tl.exp(x)[:, None], 0.0),
                                     axis=0).to(tl.float64)
            total = tl.sum(hc)
            target = tl.zeros([], tl.float64)
            if k_act:
                d, before, in_bin = _pick(hc, hm, k.to(tl.float64), False)
                d = tl.where(total <= k, NB - 1, d)  # k >= valid tokens: keep them all
            else:
                target = p.to(tl.float64) * tl.sum(hm)
                d, before, in_bin = _pick(hc, hm, target, True)
            if gathered:
                n = nf
            else:
                # Pass 2 over the row: compact every token of buckets <= d (vocabulary order).
                w = tl.zeros([], tl.int32)
                for t in range(0, V, TILE):
                    offs = t + lanes
                    x, key, valid = _tile_x(s_row, offs, offs < V, m, t_eff)
                    sel = valid & (_bucket(key) <= d)
                    pos = w + tl.cumsum(sel.to(tl.int32), axis=0) - 1
                    tl.store(keys + pos, key, mask=sel)
                    tl.store(idx + pos, offs, mask=sel)
                    w += tl.sum(sel.to(tl.int32))
                tl.debug_barrier()
                passes += 2
                reads += 2 * V
                n = w
            from_buf += 1
            if k_act:
                rem = k.to(tl.float64) - before
                if (total > k) & (in_bin.to(tl.float64) != rem):
                    kf, r1 = _radix(keys, n, wrk, d, MAXKEY, rem, False, TILE)
                    reads += r1
                else:
                    kf = tl.where(total <= k, MAXKEY, _upper(d))
            if p_act:
                if k_act:  # top-p over the top-k survivors: bucket masses from the list
                    hc = tl.zeros([NB], tl.int32)
                    hm = tl.zeros([NB], tl.float64)
                    for t in range(0, n, TILE):
                        offs = t + lanes
                        inb = offs < n
                        key = tl.load(keys + offs, mask=inb, other=0)
                        inp = inb & (key <= kf)
                        hit = (_bucket(key)[:, None] == bins[None, :]) & inp[:, None]
                        hc += tl.sum(hit.to(tl.int32), axis=0)
                        e = tl.exp(_neg_x(key))
                        hm += tl.sum(tl.where(hit, e[:, None], 0.0), axis=0).to(tl.float64)
                    reads += n
                    target = p.to(tl.float64) * tl.sum(hm)
                    d, before, in_bin = _pick(hc, hm, target, True)
                rem = target - before
                if in_bin == 1:
                    kp = _upper(d)
                else:
                    kp, r2 = _radix(keys, n, wrk, d, kf, rem, True, TILE)
                    reads += r2
                kf = tl.minimum(kf, kp)
        else:
            passes += 1
        lmp = tl.load(log_min_p + b)
        for t in range(0, n, TILE):
            offs = t + lanes
            x, key, valid, vi = _load_cand(s_row, keys, idx, offs, n, m, t_eff, from_buf != 0)
            keep = valid & (key <= kf) & (x >= lmp)
            mt = tl.sum(tl.where(keep, tl.exp(x), 0.0).to(tl.float64))
            tm = tl.where(ti == t // TILE, mt, tm)
        reads += n
        z = tl.sum(tm)
    if need_mode == 2:
        rec = rows + b * N_ROW
        tl.store(rec + 0, status.to(tl.float64))
        tl.store(rec + 1, m.to(tl.float64))
        tl.store(rec + 2, kf.to(tl.float64))
        tl.store(rec + 3, tl.log(tl.where(z > 0.0, z, 1.0).to(tl.float32)).to(tl.float64))
    else:
        tok = greedy
        if need & (temp > 0.0):
            u = philox_uniform(tl.load(seed + b), tl.load(step + b))
            target = u * z
            cum = tl.cumsum(tm, axis=0)
            ct = tl.min(tl.where((cum > target) & (tm > 0.0), ti, BIG))
            ct = tl.where(ct == BIG, tl.max(tl.where(tm > 0.0, ti, -1)), ct)
            run = tl.sum(tl.where(ti == ct - 1, cum, 0.0))
            lmp = tl.load(log_min_p + b)
            offs = ct * TILE + lanes
            x, key, valid, vi = _load_cand(s_row, keys, idx, offs, n, m, t_eff, from_buf != 0)
            keep = valid & (key <= kf) & (x >= lmp)
            e = tl.where(keep, tl.exp(x), 0.0).to(tl.float64)
            csum = run + tl.cumsum(e, axis=0)
            first = tl.min(tl.where((csum > target) & (e > 0.0), vi, BIG))
            last = tl.max(tl.where(e > 0.0, vi, -1))
            tok = tl.where(first == BIG, last, first)
            reads += TILE
        tok = tl.where(status == 0, tok, -1)
        tl.store(tokens + b, tok)
        if need_mode == 1:
            x_tok = tl.math.div_rn(tl.load(s_row + tl.maximum(tok, 0)) - m, t_eff)
            lp = x_tok - tl.log(z.to(tl.float32))
            tl.store(logprobs + b, tl.where(status == 0, lp, float("nan")))
    tl.store(status_out + b, status)
    tl.store(trace + b * N_TRACE, passes.to(tl.int64))
    tl.store(trace + b * N_TRACE + 1, reads)


@triton.jit
def _logprobs_kernel(S, rows, temperature, log_min_p, out, V, CHUNK: tl.constexpr,
                     TILE: tl.constexpr):
    """out[b, v] = x - log Z_final on the final set, -inf elsewhere and on bad rows (may overwrite
    S in place)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    rec = rows + b * N_ROW
    m = tl.load(rec + 1).to(tl.float32)
    kf = tl.where(tl.load(rec + 0) == 0.0, tl.load(rec + 2).to(tl.int32), -1)  # bad: keys >= 0
    log_z = tl.load(rec + 3).to(tl.float32)
    temp = tl.load(temperature + b)
    t_eff = tl.where(temp > 0.0, temp, 1.0)
    lmp = tl.load(log_min_p + b)
    s_row = S + b * V
    o_row = out + b * V
    start = c.to(tl.int64) * CHUNK
    lanes = tl.arange(0, TILE)
    for t in range(0, CHUNK, TILE):
        offs = start + t + lanes
        mask = offs < V
        x, key, valid = _tile_x(s_row, offs, mask, m, t_eff)
        keep = valid & (key <= kf) & (x >= lmp)
        tl.store(o_row + offs, tl.where(keep, x - log_z, NEG_INF), mask=mask)


@triton.jit
def _philox_kernel(seed, step, out, N, BLOCK: tl.constexpr):
    """Test hook: the Philox uniform of each (seed, step) pair."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    u = philox_uniform(tl.load(seed + i, mask=ok, other=0), tl.load(step + i, mask=ok, other=0))
    tl.store(out + i, u, mask=ok)
