"""Wilson intervals and the other summary numbers."""

from __future__ import annotations

import math

import pytest

from safedecode.eval.metrics import (
    mean,
    perplexity,
    quantile,
    rate,
    stderr,
    throughput,
    wilson_interval,
)


@pytest.mark.parametrize("k, n, lo, hi", [  # published values (e.g. Newcombe 1998, table I)
    (0, 10, 0.0, 0.2775),
    (1, 10, 0.0179, 0.4042),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
])
def test_wilson_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_properties_and_errors():
    for n in (1, 7, 50):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            assert (lo, hi) == pytest.approx((1 - wilson_interval(n - k, n)[1],
                                              1 - wilson_interval(n - k, n)[0]))
    assert wilson_interval(5, 10, z=1.0)[1] < wilson_interval(5, 10)[1]
    for k, n in ((0, 0), (3, 2), (-1, 5)):
        with pytest.raises(ValueError, match="wilson_interval"):
            wilson_interval(k, n)


def test_rate_and_summaries():
    r = rate([True, False, True, True])
    assert (r.k, r.n, r.rate) == (3, 4, 0.75)
    assert r.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert (r.lo, r.hi) == wilson_interval(3, 4)
    assert rate([]) is None
    assert mean([1, None, 3, float("nan")]) == 2 and mean([]) is None
    assert stderr([1.0, 3.0]) == pytest.approx(1.0) and stderr([1.0]) is None
    assert quantile([4, 1, 3, 2], 0.5) == 2.5 and quantile([], 0.5) is None
    assert perplexity(2 * math.log(5), 2) == pytest.approx(5) and perplexity(0, 0) is None


def test_throughput_counts_each_batch_once():
    recs = [{"batch": "a", "batch_s": 2.0, "new_tokens": 10, "latency_s": 1.0},
            {"batch": "a", "batch_s": 2.0, "new_tokens": 30, "latency_s": 2.0},
            {"batch": "b", "batch_s": 2.0, "new_tokens": 20, "latency_s": 2.0}]
    t = throughput(recs)
    assert t["tokens_per_s"] == pytest.approx(60 / 4.0) and t["batches"] == 2
    assert t["latency_s_p50"] == 2.0 and t["latency_s_mean"] == pytest.approx(5 / 3)


def test_non_answer_kinds():
    """Stubs, garbled text (by perplexity under the plain model) and loops, in that order;
    a real answer is none of them; no perplexity: garbled is not judged."""
    from safedecode.eval.metrics import GARBLED_PPL, SHORT_TOKENS, loops, non_answer

    answer = "To reinstall, delete the node_modules folder and run npm install again."
    assert non_answer(answer, SHORT_TOKENS) is None
    assert non_answer("Here", 1) == "short"
    assert non_answer(answer, SHORT_TOKENS - 1, ppl=1000.0) == "short"
    assert non_answer(answer, 40, ppl=GARBLED_PPL + 1) == "garbled"
    assert non_answer(answer, 40, ppl=GARBLED_PPL) is None
    assert non_answer("I won strugg acknowled " + "acknowled " * 12, 64, ppl=None) == "loop"
    assert non_answer("I won strugg acknowled " + "acknowled " * 12, 64, ppl=618.0) == "garbled"
    assert loops("Act 1:\n\n" * 13) and loops("ab" * 13) and not loops("ab" * 11)
    assert not loops(" ".join(f"w{i}" for i in range(12)))
    assert loops("a b c " * 4) and not loops("a b c d " * 3)
    assert not loops("| Date | Amount |\n|" + "-" * 30 + "|" + "-" * 30 + "|")
    assert not loops("." * 40)
