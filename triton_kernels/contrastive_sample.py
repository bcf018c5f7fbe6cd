"""Triton kernels of the fused contrastive sampler (semantics: ``safedecode/ops/reference.py``).

The vocabulary of each row is cut into ``C`` chunks of ``CHUNK`` tokens and every streaming pass
runs on a ``(B, C)`` grid, so even a single row spreads over many programs. Passes talk through
tiny per-chunk buffers; a pass that needs a row-level value (a max, a histogram) re-reduces the
previous pass's ``C`` partials itself, identically in every program (no atomics, deterministic).

Launches per step (``ND`` radix digits of the 31-bit key; 8 with 4-bit digits):

1. ``_stats_kernel``  per chunk: anchor max (plausibility mask) and, for ``rule="union"``, max and
   sum-exp of both branches (their log-softmax). Skipped when no row needs it (host-known only).
2. ``_score_kernel``  the combined score ``s`` (fp32, ``-inf`` = excluded) into a ``[B, V]``
   buffer; per chunk: max of ``s``, its first index, NaN / +inf / anchor-alive flags.
3. ``_radix_kernel``  up to ``2 * ND`` passes. A token's key is the bit pattern of ``|x|``
   (``x = (s - m) / T <= 0``, so a smaller key is a larger ``x``; ties share a key). Passes of
   MODE 0 radix-select the k-th smallest key (count histograms, ``NB = 2^bits`` bins per chunk);
   MODE 1 finds the top-p cut, the smallest key ``K`` with ``mass(key <= K) >= top_p * Z`` over
   the top-k survivors (count + mass histograms). Each pass first folds the previous pass's
   histograms into the row state (one more digit resolved), then histograms the next digit of the
   tokens still in play. A search stops once its kept set is decided (the bin holds exactly the
   wanted tokens, a single token, or the last digit is reached); later passes then return at once.
4. ``_final_kernel``  last state update, then the fp64 mass of the final set per chunk.
5. ``_sample_kernel`` (grid ``B``): greedy token, or the Philox draw ``u``: finds the chunk where
   the cumulative mass crosses ``u * Z`` and scans only that chunk (``tl.cumsum``, fp64). Or
   ``_logprobs_kernel`` (grid ``(B, C)``) writes ``x - log Z`` on the final set, ``-inf`` elsewhere.

The row state lives in a small fp64 array ``state[slot, b, NS]`` (every field is exact in fp64);
launch number ``slot`` reads slot ``slot - 1``, and its program ``c == 0`` writes slot ``slot``.
Histograms ping-pong between two buffers by the parity of ``slot``.

Precision: scores, ``x`` and log-probs are fp32 as in the reference (true division ``div_rn``).
Top-p masses are fp32 sums within a radix tile (<= 4096 tokens), fp64 across tiles and chunks; the
final-set mass and the draw are fp64 throughout, as in the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))
MAXKEY = tl.constexpr(0x7FFFFFFF)  # "keep every key"
BIG = tl.constexpr(0x7FFFFFFF)  # "no index" for min-reductions

# Row-state fields.
F_STATUS = tl.constexpr(0)
F_M = tl.constexpr(1)  # max kept score s
F_GREEDY = tl.constexpr(2)  # first argmax of s
F_NEED = tl.constexpr(3)  # 1 when the final distribution is needed
F_KACT = tl.constexpr(4)  # top-k search still running
F_KPRE = tl.constexpr(5)  # top-k key prefix resolved so far
F_KREM = tl.constexpr(6)  # rank still wanted inside the prefix
F_KEYK = tl.constexpr(7)  # top-k keeps key <= KEYK
F_PACT = tl.constexpr(8)
F_PPRE = tl.constexpr(9)
F_PREM = tl.constexpr(10)  # mass still wanted inside the prefix (fp64)
F_KEYP = tl.constexpr(11)  # top-p keeps key <= KEYP
NS = tl.constexpr(16)

N_STATS = tl.constexpr(5)  # anchor max, branch-0 max, branch-0 sum-exp, branch-1 max, sum-exp

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
def _tile_x(s_row, offs, mask, m, t_eff, bad):
    """x = (s - m) / T of a tile, its radix key and validity (bad rows: x = 0 everywhere)."""
    s = tl.load(s_row + offs, mask=mask, other=NEG_INF)
    x = tl.math.div_rn(s - m, t_eff)
    valid = mask & (s > NEG_INF)
    x = tl.where(bad, 0.0, x)
    valid = tl.where(bad, mask, valid)
    x = tl.where(valid, x, NEG_INF)
    key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # |x| bits: monotone in -x
    return x, key, valid


@triton.jit
def _load_state(st):
    status = tl.load(st + F_STATUS).to(tl.int32)
    m = tl.load(st + F_M).to(tl.float32)
    greedy = tl.load(st + F_GREEDY).to(tl.int64)
    need = tl.load(st + F_NEED).to(tl.int32)
    k_act = tl.load(st + F_KACT).to(tl.int32)
    k_pre = tl.load(st + F_KPRE).to(tl.int32)
    k_rem = tl.load(st + F_KREM).to(tl.int32)
    key_k = tl.load(st + F_KEYK).to(tl.int32)
    p_act = tl.load(st + F_PACT).to(tl.int32)
    p_pre = tl.load(st + F_PPRE).to(tl.int32)
    p_rem = tl.load(st + F_PREM)
    key_p = tl.load(st + F_KEYP).to(tl.int32)
    return status, m, greedy, need, k_act, k_pre, k_rem, key_k, p_act, p_pre, p_rem, key_p


@triton.jit
def _store_state(st, status, m, greedy, need, k_act, k_pre, k_rem, key_k, p_act, p_pre, p_rem,
                 key_p):
    tl.store(st + F_STATUS, status.to(tl.float64))
    tl.store(st + F_M, m.to(tl.float64))
    tl.store(st + F_GREEDY, greedy.to(tl.float64))
    tl.store(st + F_NEED, need.to(tl.float64))
    tl.store(st + F_KACT, k_act.to(tl.float64))
    tl.store(st + F_KPRE, k_pre.to(tl.float64))
    tl.store(st + F_KREM, k_rem.to(tl.float64))
    tl.store(st + F_KEYK, key_k.to(tl.float64))
    tl.store(st + F_PACT, p_act.to(tl.float64))
    tl.store(st + F_PPRE, p_pre.to(tl.float64))
    tl.store(st + F_PREM, p_rem.to(tl.float64))
    tl.store(st + F_KEYP, key_p.to(tl.float64))


@triton.jit
def _row_hist(cnt_row, mass_row, C, CP: tl.constexpr, NB: tl.constexpr, MASS: tl.constexpr):
    """Sum the ``[C, NB]`` per-chunk histograms of one row (counts int32, masses fp64)."""
    ci = tl.arange(0, CP)[:, None]
    bi = tl.arange(0, NB)[None, :]
    ok = (ci < C) & (bi < NB)
    hc = tl.sum(tl.load(cnt_row + ci * NB + bi, mask=ok, other=0), axis=0)
    if MASS:
        hm = tl.sum(tl.load(mass_row + ci * NB + bi, mask=ok, other=0.0), axis=0)
    else:
        hm = tl.zeros([NB], dtype=tl.float64)
    return hc, hm


@triton.jit
def _update_topk(k_act, k_pre, k_rem, key_k, cnt_row, C, level, shift,
                 CP: tl.constexpr, NB: tl.constexpr):
    """Fold one count histogram into the top-k radix select (k-th smallest key)."""
    if k_act != 0:
        hc, _ = _row_hist(cnt_row, cnt_row, C, CP, NB, False)
        bins = tl.arange(0, NB)
        total = tl.sum(hc)
        cum = tl.cumsum(hc, axis=0)
        d = tl.min(tl.where(cum >= k_rem, bins, NB))
        before = tl.sum(tl.where(bins < d, hc, 0))
        in_bin = tl.sum(tl.where(bins == d, hc, 0))
        rem = k_rem - before
        pre = k_pre | (d << shift)
        if (level == 0) & (total <= k_rem):  # k >= number of valid tokens: keep them all
            k_act = 0
            key_k = MAXKEY
        elif (in_bin == rem) | (shift == 0):  # the k-th is the last key of this bin
            k_act = 0
            key_k = pre | ((1 << shift) - 1)
        else:
            k_pre = pre
            k_rem = rem
    return k_act, k_pre, k_rem, key_k


@triton.jit
def _update_topp(p_act, p_pre, p_rem, key_p, top_p, cnt_row, mass_row, C, level, shift,
                 CP: tl.constexpr, NB: tl.constexpr):
    """Fold one count + mass histogram into the top-p search (smallest key K: M(<= K) >= pZ)."""
    if p_act != 0:
        hc, hm = _row_hist(cnt_row, mass_row, C, CP, NB, True)
        bins = tl.arange(0, NB)
        cum = tl.cumsum(hm, axis=0)
        z = tl.sum(tl.where(bins == NB - 1, cum, 0.0))
        target = tl.where(level == 0, top_p.to(tl.float64) * z, p_rem)
        d = tl.min(tl.where((cum >= target) & (hc > 0), bins, NB))
        # Rounding can leave the target just above the total: take the last non-empty bin.
        d = tl.where(d == NB, tl.max(tl.where(hc > 0, bins, -1)), d)
        before = tl.sum(tl.where(bins == d - 1, cum, 0.0))
        in_bin = tl.sum(tl.where(bins == d, hc, 0))
        pre = p_pre | (d << shift)
        if (in_bin == 1) | (shift == 0):
            p_act = 0
            key_p = pre | ((1 << shift) - 1)
        else:
            p_pre = pre
            p_rem = target - before
    return p_act, p_pre, p_rem, key_p


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["sk", "sb"])
def _stats_kernel(logits, sk, sb, stats, V, C, CHUNK,
                  ANCHOR: tl.constexpr, RULE: tl.constexpr, TILE: tl.constexpr):
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
        za = tl.load(row + ANCHOR * sk.to(tl.int64) + offs, mask=mask, other=NEG_INF)
        amax = tl.maximum(amax, za.to(tl.float32))
        if RULE == 1:
            z0 = tl.load(row + offs, mask=mask, other=NEG_INF).to(tl.float32)
            z1 = tl.load(row + sk.to(tl.int64) + offs, mask=mask, other=NEG_INF).to(tl.float32)
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


@triton.jit(do_not_specialize=["sk", "sb"])
def _score_kernel(logits, sk, sb, weights, log_beta, stats, S, spart, sarg, sflag, V, C, CHUNK,
                  K: tl.constexpr, ANCHOR: tl.constexpr, RULE: tl.constexpr,
                  USE_STATS: tl.constexpr, CP: tl.constexpr, TILE: tl.constexpr):
    """Score s (fp32, -inf = excluded) into S; per chunk: max s, its first index and flags (1: NaN,
    2: +inf, 4: some anchor logit is not -inf)."""
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
        gamma = tl.load(weights + b * K + 1)
    start = c.to(tl.int64) * CHUNK
    lanes = tl.arange(0, TILE)
    best = NEG_INF + tl.zeros([], tl.float32)
    best_i = tl.zeros([], tl.int64) + BIG
    flags = tl.zeros([TILE], tl.int32)
    s_row = S + b * V
    for t in range(0, CHUNK, TILE):
        offs = start + t + lanes
        mask = offs < V
        s = tl.zeros([TILE], tl.float32)
        excl = offs < 0
        za = s
        z0 = s
        z1 = s
        for k in tl.static_range(K):
            z = tl.load(row + k * sk.to(tl.int64) + offs, mask=mask, other=0.0).to(tl.float32)
            flags |= tl.where(z != z, 1, 0) | tl.where(z == float("inf"), 2, 0)  # noqa: PLR0124
            if RULE == 0:
                w = tl.load(weights + b * K + k)
                on = (w + tl.zeros_like(z)) != 0.0  # (compare as a vector: interpreter quirk)
                s = tl.where(on, s + w * z, s)  # no FMA: enable_fp_fusion=False at launch
                excl |= on & (z == NEG_INF)
            if k == 0:
                z0 = z
            if k == 1:
                z1 = z
            if k == ANCHOR:
                za = z
        if RULE == 1:
            lp0 = (z0 - mx0) - lse0
            lp1 = (z1 - mx1) - lse1
            on = (gamma + tl.zeros_like(z0)) != 0.0
            s = tl.where(on, lp0 + gamma * tl.minimum(lp0 - lp1, 0.0), lp0)
            excl |= (z0 == NEG_INF) | (on & (z1 == NEG_INF))
        flags |= tl.where(mask & (za != NEG_INF), 4, 0)  # the anchor is not all -inf
        excl |= (za == NEG_INF) | (za < thr)
        s = tl.where(excl, NEG_INF, s)
        tl.store(s_row + offs, s, mask=mask)
        sv = tl.where(mask, s, NEG_INF)
        tmax = tl.max(sv)
        targ = tl.min(tl.where(mask & (sv == tmax), offs, BIG))
        better = tmax > best
        best_i = tl.where(better, targ, best_i)
        best = tl.where(better, tmax, best)
    out = b * C + c
    tl.store(spart + out, best)
    tl.store(sarg + out, best_i)
    tl.store(sflag + out, tl.max(flags & 1) | tl.max(flags & 2) | tl.max(flags & 4))


@triton.jit
def _next_state(state, slot, cnt, mass, spart, sarg, sflag, temperature, top_k, top_p, b, B, V, C,
                prev_level, prev_shift, PREV: tl.constexpr, NEED: tl.constexpr,
                CP: tl.constexpr, NB: tl.constexpr):
    """Row state of launch ``slot``: built from the score partials (PREV = -1), or the state of
    ``slot - 1`` with the histograms of that launch folded in (PREV = its MODE)."""
    if PREV == -1:
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
        if NEED == 0:
            need = ((status == 0) & (temp > 0.0)).to(tl.int32)
        elif NEED == 1:
            need = (status == 0).to(tl.int32)
        else:
            need = (status == 0).to(tl.int32) | 1
        k = tl.load(top_k + b).to(tl.int32)
        k_act = ((need != 0) & (k > 0) & (k < V)).to(tl.int32)
        k_pre = tl.zeros([], tl.int32)
        k_rem = k
        key_k = tl.zeros([], tl.int32) + MAXKEY
        p_act = ((need != 0) & (tl.load(top_p + b) < 1.0)).to(tl.int32)
        p_pre = tl.zeros([], tl.int32)
        p_rem = tl.zeros([], tl.float64)
        key_p = tl.zeros([], tl.int32) + MAXKEY
    else:
        (status, m, greedy, need, k_act, k_pre, k_rem, key_k,
         p_act, p_pre, p_rem, key_p) = _load_state(state + ((slot - 1) * B + b) * NS)
        hist = ((slot + 1) % 2 * B + b) * C * NB  # histograms written by launch slot - 1
        if PREV == 0:
            k_act, k_pre, k_rem, key_k = _update_topk(k_act, k_pre, k_rem, key_k, cnt + hist, C,
                                                      prev_level, prev_shift, CP, NB)
        else:
            p_act, p_pre, p_rem, key_p = _update_topp(p_act, p_pre, p_rem, key_p,
                                                      tl.load(top_p + b), cnt + hist, mass + hist,
                                                      C, prev_level, prev_shift, CP, NB)
    return status, m, greedy, need, k_act, k_pre, k_rem, key_k, p_act, p_pre, p_rem, key_p


@triton.jit
def _radix_kernel(S, state, cnt, mass, spart, sarg, sflag, temperature, top_k, top_p,
                  B, V, C, CHUNK, slot, prev_level, prev_shift, shift, dmask, hi_mask,
                  MODE: tl.constexpr, PREV: tl.constexpr, NEED: tl.constexpr, CP: tl.constexpr,
                  NB: tl.constexpr, TILE: tl.constexpr):
    """One radix pass: fold the previous launch's histograms into the row state, then histogram
    the digit at ``shift`` of the tokens whose higher bits match the search's prefix.

    MODE 0 = top-k (counts), 1 = top-p (counts + masses over keys <= KEYK). PREV: MODE of the
    previous launch, -1 if this is the first. NEED: 0 = sampling only (greedy rows skip), 1 =
    sampling + log-probs, 2 = log-probs op (bad rows too, with x = 0 as in the reference)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    (status, m, greedy, need, k_act, k_pre, k_rem, key_k, p_act, p_pre, p_rem,
     key_p) = _next_state(state, slot, cnt, mass, spart, sarg, sflag, temperature, top_k, top_p,
                          b, B, V, C, prev_level, prev_shift, PREV, NEED, CP, NB)
    if c == 0:
        _store_state(state + (slot * B + b) * NS, status, m, greedy, need, k_act, k_pre, k_rem,
                     key_k, p_act, p_pre, p_rem, key_p)
    if MODE == 0:
        active = k_act
        prefix = k_pre
    else:
        active = p_act
        prefix = p_pre
    if active != 0:
        temp = tl.load(temperature + b)
        t_eff = tl.where(temp > 0.0, temp, 1.0)
        bad = status != 0
        s_row = S + b * V
        start = c.to(tl.int64) * CHUNK
        lanes = tl.arange(0, TILE)
        bins = tl.arange(0, NB)
        acc_c = tl.zeros([NB], tl.int32)
        acc_m = tl.zeros([NB], tl.float64)
        for t in range(0, CHUNK, TILE):
            offs = start + t + lanes
            x, key, valid = _tile_x(s_row, offs, offs < V, m, t_eff, bad)
            match = valid & ((key & hi_mask) == prefix)
            if MODE == 1:
                match &= key <= key_k
            if tl.max(match.to(tl.int32)) > 0:  # later digits: most tiles have no candidate
                digit = (key >> shift) & dmask
                hit = (digit[:, None] == bins[None, :]) & match[:, None]
                acc_c += tl.sum(hit.to(tl.int32), axis=0)
                if MODE == 1:
                    e = tl.exp(x)
                    acc_m += tl.sum(tl.where(hit, e[:, None], 0.0), axis=0).to(tl.float64)
        out = ((slot % 2 * B + b) * C + c) * NB + bins
        tl.store(cnt + out, acc_c)
        if MODE == 1:
            tl.store(mass + out, acc_m)


@triton.jit
def _final_kernel(S, state, cnt, mass, spart, sarg, sflag, temperature, top_k, top_p, log_min_p,
                  fmass, B, V, C, CHUNK, slot, prev_level, prev_shift, PREV: tl.constexpr,
                  NEED: tl.constexpr, CP: tl.constexpr, NB: tl.constexpr, TILE: tl.constexpr):
    """Last state update, then the fp64 mass of the final set (all masks) per chunk."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    (status, m, greedy, need, k_act, k_pre, k_rem, key_k, p_act, p_pre, p_rem,
     key_p) = _next_state(state, slot, cnt, mass, spart, sarg, sflag, temperature, top_k, top_p,
                          b, B, V, C, prev_level, prev_shift, PREV, NEED, CP, NB)
    if c == 0:
        _store_state(state + (slot * B + b) * NS, status, m, greedy, need, k_act, k_pre, k_rem,
                     key_k, p_act, p_pre, p_rem, key_p)
    acc = tl.zeros([TILE], tl.float64)
    if need != 0:
        temp = tl.load(temperature + b)
        t_eff = tl.where(temp > 0.0, temp, 1.0)
        lmp = tl.load(log_min_p + b)
        kf = tl.minimum(key_k, key_p)
        s_row = S + b * V
        start = c.to(tl.int64) * CHUNK
        lanes = tl.arange(0, TILE)
        for t in range(0, CHUNK, TILE):
            offs = start + t + lanes
            x, key, valid = _tile_x(s_row, offs, offs < V, m, t_eff, status != 0)
            keep = valid & (key <= kf) & (x >= lmp)
            acc += tl.where(keep, tl.exp(x), 0.0).to(tl.float64)
    tl.store(fmass + b * C + c, tl.sum(acc))


@triton.jit
def _sample_kernel(S, state, fmass, temperature, log_min_p, seed, step, tokens, logprobs,
                   status_out, B, V, C, CHUNK, slot, NEED_LP: tl.constexpr, CP: tl.constexpr,
                   TILE: tl.constexpr):
    """Per row: greedy token or inverse-CDF draw over the final set (only one chunk is scanned)."""
    b = tl.program_id(0).to(tl.int64)
    (status, m, greedy, need, k_act, k_pre, k_rem, key_k,
     p_act, p_pre, p_rem, key_p) = _load_state(state + (slot * B + b) * NS)
    temp = tl.load(temperature + b)
    t_eff = tl.where(temp > 0.0, temp, 1.0)
    ci = tl.arange(0, CP)
    fm = tl.where(need != 0, tl.load(fmass + b * C + ci, mask=ci < C, other=0.0), 0.0)
    cum = tl.cumsum(fm, axis=0)
    z = tl.sum(tl.where(ci == C - 1, cum, 0.0))
    tok = greedy
    if (status == 0) & (temp > 0.0):
        u = philox_uniform(tl.load(seed + b), tl.load(step + b))
        target = u * z
        cs = tl.min(tl.where((cum > target) & (fm > 0.0), ci, BIG))
        cs = tl.where(cs == BIG, tl.max(tl.where(fm > 0.0, ci, -1)), cs)
        run = tl.sum(tl.where(ci == cs - 1, cum, 0.0))
        lmp = tl.load(log_min_p + b)
        kf = tl.minimum(key_k, key_p)
        s_row = S + b * V
        start = cs.to(tl.int64) * CHUNK
        lanes = tl.arange(0, TILE)
        first = tl.zeros([], tl.int64) + BIG
        last = tl.zeros([], tl.int64) - 1
        for t in range(0, CHUNK, TILE):
            offs = start + t + lanes
            x, key, valid = _tile_x(s_row, offs, offs < V, m, t_eff, status != 0)
            keep = valid & (key <= kf) & (x >= lmp)
            e = tl.where(keep, tl.exp(x), 0.0).to(tl.float64)
            csum = run + tl.cumsum(e, axis=0)
            first = tl.minimum(first, tl.min(tl.where((csum > target) & (e > 0.0), offs, BIG)))
            last = tl.maximum(last, tl.max(tl.where(e > 0.0, offs, -1)))
            run = tl.max(csum)
        tok = tl.where(first == BIG, last, first)
    tok = tl.where(status == 0, tok, -1)
    tl.store(tokens + b, tok)
    tl.store(status_out + b, status)
    if NEED_LP:
        safe = tl.maximum(tok, 0)
        s_tok = tl.load(S + b * V + safe)
        x_tok = tl.math.div_rn(s_tok - m, t_eff)
        lp = x_tok - tl.log(z.to(tl.float32))
        tl.store(logprobs + b, tl.where(status == 0, lp, float("nan")))


@triton.jit
def _logprobs_kernel(S, state, fmass, temperature, log_min_p, out, status_out, B, V, C, CHUNK,
                     slot, CP: tl.constexpr, TILE: tl.constexpr):
    """out[b, v] = x - log Z_final on the final set, -inf elsewhere (may overwrite S in place)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    (status, m, greedy, need, k_act, k_pre, k_rem, key_k,
     p_act, p_pre, p_rem, key_p) = _load_state(state + (slot * B + b) * NS)
    temp = tl.load(temperature + b)
    t_eff = tl.where(temp > 0.0, temp, 1.0)
    ci = tl.arange(0, CP)
    z = tl.sum(tl.load(fmass + b * C + ci, mask=ci < C, other=0.0))
    log_z = tl.log(z.to(tl.float32))
    lmp = tl.load(log_min_p + b)
    kf = tl.minimum(key_k, key_p)
    s_row = S + b * V
    o_row = out + b * V
    start = c.to(tl.int64) * CHUNK
    lanes = tl.arange(0, TILE)
    for t in range(0, CHUNK, TILE):
        offs = start + t + lanes
        mask = offs < V
        x, key, valid = _tile_x(s_row, offs, mask, m, t_eff, status != 0)
        keep = valid & (key <= kf) & (x >= lmp)
        tl.store(o_row + offs, tl.where(keep, x - log_z, NEG_INF), mask=mask)
    if c == 0:
        tl.store(status_out + b, status)


@triton.jit
def _philox_kernel(seed, step, out, N, BLOCK: tl.constexpr):
    """Test hook: the Philox uniform of each (seed, step) pair."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    u = philox_uniform(tl.load(seed + i, mask=ok, other=0), tl.load(step + i, mask=ok, other=0))
    tl.store(out + i, u, mask=ok)
